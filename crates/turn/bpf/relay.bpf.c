// SPDX-License-Identifier: MIT OR GPL-2.0
//
// Callisto's kernel relay: an XDP program that relays between a TURN
// client and its peers without waking the server process: ChannelData both
// ways, and peers' data without a channel as Data indications.
//
// User space (crates/turn/src/net/kernel.rs) owns every decision: when a
// UDP client's channel is bound and its peer permitted, it writes one route
// per direction into `client_routes` and `peer_routes`; for each permission
// it writes one into `permission_routes`; each with the moment the flow
// stops (the first of allocation, permission and channel to expire). This
// program only follows routes that have not expired. Everything else --
// STUN requests, Send indications, padded or malformed ChannelData, data
// from peers without a permission, fragments, IP options, IPv6, hosts
// whose link-layer address this interface has not seen yet, and frames
// that would outgrow the MTU -- is passed on untouched to the sockets,
// where the server handles it as it always does. So the server stays the
// one authority, and a missing route only costs speed.
//
// Built with `scripts/build-bpf.sh` (clang -target bpf); the object is
// committed beside this file and embedded in the binary, so building
// Callisto needs no clang.

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "Dual MIT/GPL";

struct mac {
	__u8 addr[6];
	__u16 zero;
	__u32 ifindex; // where it was seen
};

// Addresses and ports are in network byte order, as on the wire; the
// padding fields are zero so that keys compare bytewise.
struct client_key {
	__u32 client_ip;
	__u32 server_ip;
	__u16 client_port;
	__u16 server_port;
	__u16 channel;
	__u16 zero;
};

struct to_peer {
	__u32 relay_ip;
	__u32 peer_ip;
	__u16 relay_port;
	__u16 peer_port;
	__u32 zero;
	__u64 expires_ns; // CLOCK_MONOTONIC, as bpf_ktime_get_ns
};

struct peer_key {
	__u32 peer_ip;
	__u32 relay_ip;
	__u16 peer_port;
	__u16 relay_port;
};

// Data from any port of `peer_ip`: a permission. Followed only when no
// channel route matches (a channel takes its peer's data as ChannelData).
struct permission_key {
	__u32 peer_ip;
	__u32 relay_ip;
	__u16 relay_port;
	__u16 zero;
};

// On a channel route, `channel` is the channel number; on a permission
// route it is zero, and data goes as a Data indication.
struct to_client {
	__u32 server_ip;
	__u32 client_ip;
	__u16 server_port;
	__u16 client_port;
	__u16 channel;
	__u16 zero;
	__u64 expires_ns;
};

// Bytes are payload bytes (without the ChannelData or STUN header), as the
// server counts them.
struct stats {
	__u64 to_peer_packets;
	__u64 to_peer_bytes;
	__u64 to_client_packets;
	__u64 to_client_bytes;
};

// The route maps' sizes are set at load time, from the server's limit on
// allocations (net/kernel.rs: map_capacity); 65,536 is only a default.
// Entries are allocated as routes are added, not all up front (65,536
// took 6.8 MB of kernel memory per map, whatever the load).
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 65536);
	__type(key, struct client_key);
	__type(value, struct to_peer);
} client_routes SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 65536);
	__type(key, struct peer_key);
	__type(value, struct to_client);
} peer_routes SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 65536);
	__type(key, struct permission_key);
	__type(value, struct to_client);
} permission_routes SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct stats);
} stats SEC(".maps");

// With --turn-external-ip, clients know relayed addresses by the external
// IP (the port is the same), while routes hold the address the relay is
// bound to. Zero: no external IP.
struct addresses {
	__u32 relay_ip;
	__u32 external_ip;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct addresses);
} addresses SEC(".maps");

// The link-layer address each relayed host's packets last came from:
// sending back to that address reaches the host (through the router, for
// a host off this link). Learned from packets that matched a route, so
// only from the hosts of live flows. An LRU map: nobody needs to clean it.
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32); // IPv4 address, network byte order
	__type(value, struct mac);
} hop_macs SEC(".maps");

struct headers {
	struct ethhdr eth;
	struct iphdr ip;
	struct udphdr udp;
} __attribute__((packed));

// A Data indication from an IPv4 peer up to its data (RFC 8656 section
// 11.6, RFC 8489 section 14): the STUN header, XOR-PEER-ADDRESS, and the
// DATA attribute's header; its value is padded to a multiple of 4. The
// same bytes as the server's (stun::data_indication_prefix), but for the
// transaction id, which may be anything.
struct indication {
	__u16 type;
	__u16 length;
	__u32 cookie;
	__u32 tid[3];
	__u16 peer_type;
	__u16 peer_length;
	__u8 reserved;
	__u8 family;
	__u16 xport;
	__u32 xaddr;
	__u16 data_type;
	__u16 data_length;
} __attribute__((packed));

#define CHANNEL_HEADER 4
#define INDICATION_HEADER 36
#define MAGIC_COOKIE 0x2112A442
#define LOOPBACK_IFINDEX 1

// One's-complement arithmetic for incremental checksum updates (RFC 1624).
// The sum does not depend on byte order, so fields are taken as stored.
static __always_inline __u32 add16(__u32 sum, __u16 v) { return sum + v; }
static __always_inline __u32 sub16(__u32 sum, __u16 v) { return sum + (__u16)~v; }
static __always_inline __u32 add32(__u32 sum, __u32 v) { return sum + (v & 0xffff) + (v >> 16); }
static __always_inline __u32 sub32(__u32 sum, __u32 v) { return sub16(sub16(sum, v & 0xffff), v >> 16); }

static __always_inline __u16 fold(__u32 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)sum;
}

static __always_inline __u16 ip_checksum(const struct headers *n)
{
	const __u16 *w = (const __u16 *)((const __u8 *)n + sizeof(struct ethhdr));
	__u32 sum = 0;
#pragma unroll
	for (int i = 0; i < 10; i++)
		sum += w[i];
	return ~fold(sum);
}

// Rewrites `n` (a copy of the received headers `h`) for its new hop:
// addresses, ports, lengths and checksums. `added` and `removed` are the
// sums of the 16-bit words joining or leaving the UDP payload (the header
// before the data; padding after it is zeros, which add nothing). Every
// header is of even length, so the data keeps its alignment to 16 bits
// and its share of the sum.
static __always_inline void readdress(struct headers *n, const struct headers *h,
				      __u32 saddr, __u16 sport, __u32 daddr,
				      __u16 dport, int grow, __u32 added, __u32 removed)
{
	__u16 ulen = bpf_htons(bpf_ntohs(h->udp.len) + grow);

	n->ip.tot_len = bpf_htons(bpf_ntohs(h->ip.tot_len) + grow);
	n->ip.saddr = saddr;
	n->ip.daddr = daddr;
	n->ip.ttl = 64;
	n->ip.check = 0;
	n->ip.check = ip_checksum(n);

	n->udp.source = sport;
	n->udp.dest = dport;
	n->udp.len = ulen;
	// Zero means "no checksum" in IPv4 UDP: nothing to keep up to date.
	if (h->udp.check) {
		__u32 sum = (__u16)~h->udp.check;
		sum = sub32(sum, h->ip.saddr);
		sum = sub32(sum, h->ip.daddr);
		sum = add32(sum, saddr);
		sum = add32(sum, daddr);
		sum = sub16(sum, h->udp.source);
		sum = sub16(sum, h->udp.dest);
		sum = add16(sum, sport);
		sum = add16(sum, dport);
		// The length is in the pseudo-header and in the UDP header.
		sum = sub16(sum, h->udp.len);
		sum = sub16(sum, h->udp.len);
		sum = add16(sum, ulen);
		sum = add16(sum, ulen);
		sum = add16(sum, fold(added));
		sum = sub16(sum, fold(removed));
		__u16 check = ~fold(sum);
		n->udp.check = check ? check : 0xffff;
	}
}

// (memcmp would be a call, which BPF programs cannot make.)
static __always_inline int same_mac(const __u8 *a, const __u8 *b)
{
	int same = 1;
#pragma unroll
	for (int i = 0; i < ETH_ALEN; i++)
		same &= a[i] == b[i];
	return same;
}

// Remembers the link-layer address `ip`'s packets come from.
static __always_inline void learn(struct xdp_md *ctx, __u32 ip, const struct ethhdr *eth)
{
	if (ctx->ingress_ifindex == LOOPBACK_IFINDEX)
		return;
	struct mac *known = bpf_map_lookup_elem(&hop_macs, &ip);
	if (known && known->ifindex == ctx->ingress_ifindex && same_mac(known->addr, eth->h_source))
		return;
	struct mac m = { .ifindex = ctx->ingress_ifindex };
	__builtin_memcpy(m.addr, eth->h_source, ETH_ALEN);
	bpf_map_update_elem(&hop_macs, &ip, &m, BPF_ANY);
}

// Addresses the frame for its next hop, or false: the destination has not
// been seen on this interface yet, so the sockets send it (and its answer
// teaches the program), or the frame would outgrow the MTU by `grow`. It
// leaves from the interface it came in on, from that interface's address
// (the one the frame was sent to). Not bpf_fib_lookup: that one insists on
// IP forwarding being enabled, which a relay has no business asking for.
// On loopback the addresses are all zero and stay so.
static __always_inline int next_hop(struct xdp_md *ctx, struct headers *n,
				    const struct headers *h, int grow)
{
	if (ctx->ingress_ifindex == LOOPBACK_IFINDEX)
		return 1;
	__u32 dst = n->ip.daddr;
	struct mac *to = bpf_map_lookup_elem(&hop_macs, &dst);
	if (!to || to->ifindex != ctx->ingress_ifindex)
		return 0;
	__u32 mtu = 0;
	if (grow > 0 && bpf_check_mtu(ctx, 0, &mtu, grow, 0) != BPF_MTU_CHK_RET_SUCCESS)
		return 0;
	__builtin_memcpy(n->eth.h_source, h->eth.h_dest, ETH_ALEN);
	__builtin_memcpy(n->eth.h_dest, to->addr, ETH_ALEN);
	return 1;
}

static __always_inline struct stats *counters(void)
{
	__u32 zero = 0;
	return bpf_map_lookup_elem(&stats, &zero);
}

// Client -> peer: drop the 4-byte channel header, send from the relayed
// address to the peer.
static __always_inline int relay_to_peer(struct xdp_md *ctx, const struct headers *h,
					 const struct to_peer *r, __u16 cd0,
					 __u16 cd1, __u16 len)
{
	struct headers n = *h;
	readdress(&n, h, r->relay_ip, r->relay_port, r->peer_ip, r->peer_port,
		  -CHANNEL_HEADER, 0, (__u32)cd0 + cd1);
	if (!next_hop(ctx, &n, h, -CHANNEL_HEADER))
		return XDP_PASS;
	if (bpf_xdp_adjust_head(ctx, CHANNEL_HEADER))
		return XDP_PASS;
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	if (data + sizeof(n) > end)
		return XDP_DROP; // cannot happen: the packet was longer
	__builtin_memcpy(data, &n, sizeof(n));
	struct stats *s = counters();
	if (s) {
		s->to_peer_packets++;
		s->to_peer_bytes += len;
	}
	return XDP_TX;
}

// Peer -> client: prepend a channel header, send from the TURN port to
// the client.
static __always_inline int relay_to_client(struct xdp_md *ctx, const struct headers *h,
					   const struct to_client *c, __u16 len)
{
	if (len > 0xffff - CHANNEL_HEADER - sizeof(struct iphdr) - sizeof(struct udphdr))
		return XDP_PASS;
	__u16 cd0 = c->channel;
	__u16 cd1 = bpf_htons(len);
	struct headers n = *h;
	readdress(&n, h, c->server_ip, c->server_port, c->client_ip, c->client_port,
		  CHANNEL_HEADER, (__u32)cd0 + cd1, 0);
	if (!next_hop(ctx, &n, h, CHANNEL_HEADER))
		return XDP_PASS;
	if (bpf_xdp_adjust_head(ctx, -CHANNEL_HEADER))
		return XDP_PASS;
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	if (data + sizeof(n) + CHANNEL_HEADER > end)
		return XDP_DROP; // cannot happen: the packet grew
	__builtin_memcpy(data, &n, sizeof(n));
	__u16 *cd = data + sizeof(n);
	cd[0] = cd0;
	cd[1] = cd1;
	struct stats *s = counters();
	if (s) {
		s->to_client_packets++;
		s->to_client_bytes += len;
	}
	return XDP_TX;
}

// Peer -> client without a channel: put a Data indication in front of the
// `len` bytes of data, pad them, send from the TURN port to the client.
// The data comes from `peer_ip`:`peer_port`, after a header of `strip`
// bytes (0, or a channel header whose words sum to `removed`) that goes.
static __always_inline int relay_as_indication(struct xdp_md *ctx, const struct headers *h,
					       const struct to_client *c, __u32 peer_ip,
					       __u16 peer_port, __u16 len, int strip,
					       __u32 removed)
{
	__u32 pad = (4 - (len & 3)) & 3;
	__u32 grow = INDICATION_HEADER - strip + pad;
	if (len > 0xffff - grow - sizeof(struct iphdr) - sizeof(struct udphdr))
		return XDP_PASS;
	struct indication ind = {
		.type = bpf_htons(0x0017), // Data, an indication
		.length = bpf_htons(12 + 4 + len + pad),
		.cookie = bpf_htonl(MAGIC_COOKIE),
		.peer_type = bpf_htons(0x0012), // XOR-PEER-ADDRESS
		.peer_length = bpf_htons(8),
		.family = 1, // IPv4
		.xport = peer_port ^ bpf_htons(MAGIC_COOKIE >> 16),
		.xaddr = peer_ip ^ bpf_htonl(MAGIC_COOKIE),
		.data_type = bpf_htons(0x0013), // DATA
		.data_length = bpf_htons(len),
	};
	ind.tid[0] = bpf_get_prandom_u32();
	ind.tid[1] = bpf_get_prandom_u32();
	ind.tid[2] = bpf_get_prandom_u32();
	__u32 added = 0;
	const __u16 *w = (const __u16 *)&ind;
#pragma unroll
	for (int i = 0; i < INDICATION_HEADER / 2; i++)
		added += w[i];
	struct headers n = *h;
	readdress(&n, h, c->server_ip, c->server_port, c->client_ip, c->client_port,
		  grow, added, removed);
	if (!next_hop(ctx, &n, h, grow))
		return XDP_PASS;
	// The kernel zeroes what the tail grows by: that is the padding.
	if (pad && bpf_xdp_adjust_tail(ctx, pad))
		return XDP_PASS;
	if (bpf_xdp_adjust_head(ctx, -(INDICATION_HEADER - strip))) {
		if (pad)
			bpf_xdp_adjust_tail(ctx, -(int)pad);
		return XDP_PASS;
	}
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	if (data + sizeof(n) + sizeof(ind) > end)
		return XDP_DROP; // cannot happen: the packet grew
	__builtin_memcpy(data, &n, sizeof(n));
	__builtin_memcpy(data + sizeof(n), &ind, sizeof(ind));
	struct stats *s = counters();
	if (s) {
		s->to_client_packets++;
		s->to_client_bytes += len;
		if (strip) { // relayed in place: it left one allocation too
			s->to_peer_packets++;
			s->to_peer_bytes += len;
		}
	}
	return XDP_TX;
}

// Client -> one of our own relayed addresses (relay/relay, both clients
// on this server): what the receiving allocation would get from the
// sender's relayed address goes straight to its client, as ChannelData on
// its channel (the same size: only the channel number changes) or as a
// Data indication. Without this the packet would leave for our own
// address, which a network card does not loop back.
static __always_inline int relay_in_place(struct xdp_md *ctx, const struct headers *h,
					  const struct to_peer *r, __u16 cd0, __u16 cd1,
					  __u16 len, __u64 now)
{
	// The sender's relayed address as the receiver knows it, and the
	// receiver's as its routes hold it.
	__u32 me = r->relay_ip, them = r->peer_ip;
	__u32 zero = 0;
	struct addresses *a = bpf_map_lookup_elem(&addresses, &zero);
	if (a && a->external_ip) {
		if (me == a->relay_ip)
			me = a->external_ip;
		if (them == a->external_ip)
			them = a->relay_ip;
	}
	struct peer_key pk = {
		.peer_ip = me,
		.relay_ip = them,
		.peer_port = r->relay_port,
		.relay_port = r->peer_port,
	};
	struct to_client *c = bpf_map_lookup_elem(&peer_routes, &pk);
	if (c && c->expires_ns > now) {
		struct headers n = *h;
		readdress(&n, h, c->server_ip, c->server_port, c->client_ip, c->client_port,
			  0, c->channel, cd0);
		if (!next_hop(ctx, &n, h, 0))
			return XDP_PASS;
		void *data = (void *)(long)ctx->data;
		void *end = (void *)(long)ctx->data_end;
		if (data + sizeof(n) + CHANNEL_HEADER > end)
			return XDP_PASS;
		__builtin_memcpy(data, &n, sizeof(n));
		*(__u16 *)(data + sizeof(n)) = c->channel;
		struct stats *s = counters();
		if (s) {
			s->to_peer_packets++;
			s->to_peer_bytes += len;
			s->to_client_packets++;
			s->to_client_bytes += len;
		}
		return XDP_TX;
	}
	struct permission_key ik = {
		.peer_ip = me,
		.relay_ip = them,
		.relay_port = r->peer_port,
	};
	c = bpf_map_lookup_elem(&permission_routes, &ik);
	if (c && c->expires_ns > now)
		return relay_as_indication(ctx, h, c, me, r->relay_port, len,
					   CHANNEL_HEADER, (__u32)cd0 + cd1);
	return -1; // not one of ours, or not open to the sender
}

SEC("xdp")
int callisto_turn_relay(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct headers *h = data;

	if ((void *)(h + 1) > end)
		return XDP_PASS;
	if (h->eth.h_proto != bpf_htons(ETH_P_IP) || h->ip.version != 4 ||
	    h->ip.ihl != 5 || h->ip.protocol != IPPROTO_UDP)
		return XDP_PASS;
	if (h->ip.frag_off & bpf_htons(0x3fff)) // a fragment, or more to come
		return XDP_PASS;
	__u16 ulen = bpf_ntohs(h->udp.len);
	if (ulen < sizeof(struct udphdr) ||
	    bpf_ntohs(h->ip.tot_len) != sizeof(struct iphdr) + ulen)
		return XDP_PASS;
	__u16 len = ulen - sizeof(struct udphdr);
	// Frames may carry trailing padding; they may not be short.
	if (data + sizeof(*h) + len > end)
		return XDP_PASS;

	struct headers copy = *h;
	__u64 now = bpf_ktime_get_ns();

	__u8 *p = data + sizeof(*h);
	if (len >= CHANNEL_HEADER && (void *)(p + CHANNEL_HEADER) <= end &&
	    (p[0] & 0xc0) == 0x40) { // 0x4000-0x7fff, as RFC 5766 had it
		__u16 cd0 = *(__u16 *)p;
		__u16 cd1 = *(__u16 *)(p + 2);
		struct client_key k = {
			.client_ip = h->ip.saddr,
			.server_ip = h->ip.daddr,
			.client_port = h->udp.source,
			.server_port = h->udp.dest,
			.channel = cd0,
		};
		struct to_peer *r = bpf_map_lookup_elem(&client_routes, &k);
		if (r) {
			// Padded (allowed over UDP, never seen from browsers) or
			// inconsistent: the server deals with it.
			if (bpf_ntohs(cd1) + CHANNEL_HEADER != len || r->expires_ns <= now)
				return XDP_PASS;
			learn(ctx, copy.ip.saddr, &copy.eth);
			int verdict = relay_in_place(ctx, &copy, r, cd0, cd1, len - CHANNEL_HEADER, now);
			if (verdict >= 0)
				return verdict;
			return relay_to_peer(ctx, &copy, r, cd0, cd1, len - CHANNEL_HEADER);
		}
	}

	struct peer_key pk = {
		.peer_ip = h->ip.saddr,
		.relay_ip = h->ip.daddr,
		.peer_port = h->udp.source,
		.relay_port = h->udp.dest,
	};
	struct to_client *c = bpf_map_lookup_elem(&peer_routes, &pk);
	if (c && c->expires_ns > now) {
		learn(ctx, copy.ip.saddr, &copy.eth);
		return relay_to_client(ctx, &copy, c, len);
	}
	// No live channel (an expired one means the channel, the permission
	// or the allocation ended; the permission route says which).
	struct permission_key ik = {
		.peer_ip = h->ip.saddr,
		.relay_ip = h->ip.daddr,
		.relay_port = h->udp.dest,
	};
	c = bpf_map_lookup_elem(&permission_routes, &ik);
	if (c && c->expires_ns > now) {
		learn(ctx, copy.ip.saddr, &copy.eth);
		return relay_as_indication(ctx, &copy, c, copy.ip.saddr, copy.udp.source, len, 0, 0);
	}
	return XDP_PASS;
}
