// SPDX-License-Identifier: MIT OR GPL-2.0
//
// Callisto's kernel relay: an XDP program that relays between a TURN
// client and its peers without waking the server process: ChannelData both
// ways, clients' Send indications, and peers' data without a channel as
// Data indications; over IPv4 and over IPv6 (relay6, below).
//
// User space (crates/turn/src/net/kernel.rs) owns every decision: when a
// UDP client's channel is bound and its peer permitted, it writes one route
// per direction into `client_routes` and `peer_routes`; for each permission
// it writes one into `permission_routes` and one into `send_routes`; each
// with the moment the flow
// stops (the first of allocation, permission and channel to expire). This
// program only follows routes that have not expired. Everything else --
// STUN requests, Send indications laid out otherwise than browsers and
// coturn lay them out, padded or malformed ChannelData, data
// from peers without a permission, fragments, IP options, IPv6 extension
// headers, hosts whose link-layer address this interface has not seen yet, and frames
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
#include <linux/ipv6.h>
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

// A client's Send indication to any port of `peer_ip`: a permission.
struct send_key {
	__u32 client_ip;
	__u32 server_ip;
	__u16 client_port;
	__u16 server_port;
	__u32 peer_ip;
};

// On a channel route, `channel` is the channel number; on a permission
// route it is zero, and data goes as a Data indication. `relay_port` is
// the receiving allocation's, whose budget the data is taken from.
struct to_client {
	__u32 server_ip;
	__u32 client_ip;
	__u16 server_port;
	__u16 client_port;
	__u16 channel;
	__u16 relay_port;
	__u64 expires_ns;
};

// Bytes are payload bytes (without the ChannelData or STUN header), as the
// server counts them. Over budget: packets dropped for an allocation's
// bandwidth limit, by the direction whose budget ran out.
struct stats {
	__u64 to_peer_packets;
	__u64 to_peer_bytes;
	__u64 to_client_packets;
	__u64 to_client_bytes;
	__u64 to_peer_over_budget;
	__u64 to_client_over_budget;
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

// The peer's port in the value is zero: the Send indication names it.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 65536);
	__type(key, struct send_key);
	__type(value, struct to_peer);
} send_routes SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct stats);
} stats SEC(".maps");

// The relay IP, and with --turn-external-ip the external IP: clients know
// relayed addresses by the external IP (the port is the same), while routes
// hold the address the relay is bound to. Zero: unknown, or no external IP.
// And --turn-bps-per-allocation (zero: no limit).
// An IPv6 address, in network byte order.
struct ip6 {
	__u32 w[4];
};

struct settings {
	__u32 relay_ip;
	__u32 external_ip;
	__u64 bytes_per_sec;
	// The same for IPv6 (all zero: none).
	struct ip6 relay_ip6;
	struct ip6 external_ip6;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct settings);
} settings SEC(".maps");

// Each allocation's bandwidth budgets, one per direction, at its relay
// port's index times two (plus one: toward the client). The workers map
// this array into their memory and take from the very same budgets
// (crates/turn/src/server/budget.rs), so a limit holds however an
// allocation's packets are split between the kernel and the sockets.
// IPv6 relays' budgets follow IPv4's (from IPV6_BUDGETS on): a port
// number may be relaying in both families at once.
// Each holds the moment (ns, CLOCK_MONOTONIC) by which all the bytes let
// through so far are paid for at the allowed rate; a packet may go if,
// with its own bytes added, that moment stays within a second of now: a
// token bucket holding one second's bytes (GCRA), in one word, so that
// it can be updated with one compare-and-swap. Sized for every port when
// there is a limit; one element, never read, when there is none.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} budgets SEC(".maps");

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

// IPv6: channels, both ways and in place, permissions' Data indications
// and clients' Send indications, as for IPv4 above, in maps of their own.
struct client_key6 {
	struct ip6 client_ip;
	struct ip6 server_ip;
	__u16 client_port;
	__u16 server_port;
	__u16 channel;
	__u16 zero;
};

struct to_peer6 {
	struct ip6 relay_ip;
	struct ip6 peer_ip;
	__u16 relay_port;
	__u16 peer_port;
	__u32 zero;
	__u64 expires_ns;
};

struct peer_key6 {
	struct ip6 peer_ip;
	struct ip6 relay_ip;
	__u16 peer_port;
	__u16 relay_port;
};

struct permission_key6 {
	struct ip6 peer_ip;
	struct ip6 relay_ip;
	__u16 relay_port;
	__u16 zero;
};

struct to_client6 {
	struct ip6 server_ip;
	struct ip6 client_ip;
	__u16 server_port;
	__u16 client_port;
	__u16 channel;
	__u16 relay_port;
	__u64 expires_ns;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 65536);
	__type(key, struct client_key6);
	__type(value, struct to_peer6);
} client_routes6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 65536);
	__type(key, struct peer_key6);
	__type(value, struct to_client6);
} peer_routes6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 65536);
	__type(key, struct permission_key6);
	__type(value, struct to_client6);
} permission_routes6 SEC(".maps");

// A client's Send indication to any port of `peer_ip`: a permission.
struct send_key6 {
	struct ip6 client_ip;
	struct ip6 server_ip;
	__u16 client_port;
	__u16 server_port;
	struct ip6 peer_ip;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 65536);
	__type(key, struct send_key6);
	__type(value, struct to_peer6);
} send_routes6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct ip6);
	__type(value, struct mac);
} hop_macs6 SEC(".maps");

// What the packet being relayed on this CPU is to be charged (see `owe`).
struct charge {
	__u16 from;
	__u16 to;
	__u32 bytes;
	__u32 base; // where the ports' budgets start: 0, or IPV6_BUDGETS
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct charge);
} charges SEC(".maps");

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
#define FINGERPRINT_ATTRIBUTE 8
#define MAGIC_COOKIE 0x2112A442
#define FINGERPRINT_XOR 0x5354554e
#define LOOPBACK_IFINDEX 1
// The largest Send indication data the program relays: its FINGERPRINT is
// a CRC-32 over the whole message, one table lookup per byte, and the loop
// needs a bound. Larger ones go to the sockets.
#define MAX_SEND_DATA 1500
#define BUDGET_NS 1000000000ull
// The first of the IPv6 relays' budgets: after two for each IPv4 port.
#define IPV6_BUDGETS (2 * 65536)

// CRC-32 (ISO-HDLC, reflected 0xEDB88320), for FINGERPRINT (RFC 8489
// section 14.7); there is no helper for it in XDP. Four tables, to take
// four bytes per step ("slicing by 4"): a STUN message is a whole number
// of 32-bit words. Table k is the CRC of a byte followed by k zero bytes.
static const __u32 crc32_table[4][256] = {
	{
		0x00000000, 0x77073096, 0xee0e612c, 0x990951ba, 0x076dc419, 0x706af48f,
		0xe963a535, 0x9e6495a3, 0x0edb8832, 0x79dcb8a4, 0xe0d5e91e, 0x97d2d988,
		0x09b64c2b, 0x7eb17cbd, 0xe7b82d07, 0x90bf1d91, 0x1db71064, 0x6ab020f2,
		0xf3b97148, 0x84be41de, 0x1adad47d, 0x6ddde4eb, 0xf4d4b551, 0x83d385c7,
		0x136c9856, 0x646ba8c0, 0xfd62f97a, 0x8a65c9ec, 0x14015c4f, 0x63066cd9,
		0xfa0f3d63, 0x8d080df5, 0x3b6e20c8, 0x4c69105e, 0xd56041e4, 0xa2677172,
		0x3c03e4d1, 0x4b04d447, 0xd20d85fd, 0xa50ab56b, 0x35b5a8fa, 0x42b2986c,
		0xdbbbc9d6, 0xacbcf940, 0x32d86ce3, 0x45df5c75, 0xdcd60dcf, 0xabd13d59,
		0x26d930ac, 0x51de003a, 0xc8d75180, 0xbfd06116, 0x21b4f4b5, 0x56b3c423,
		0xcfba9599, 0xb8bda50f, 0x2802b89e, 0x5f058808, 0xc60cd9b2, 0xb10be924,
		0x2f6f7c87, 0x58684c11, 0xc1611dab, 0xb6662d3d, 0x76dc4190, 0x01db7106,
		0x98d220bc, 0xefd5102a, 0x71b18589, 0x06b6b51f, 0x9fbfe4a5, 0xe8b8d433,
		0x7807c9a2, 0x0f00f934, 0x9609a88e, 0xe10e9818, 0x7f6a0dbb, 0x086d3d2d,
		0x91646c97, 0xe6635c01, 0x6b6b51f4, 0x1c6c6162, 0x856530d8, 0xf262004e,
		0x6c0695ed, 0x1b01a57b, 0x8208f4c1, 0xf50fc457, 0x65b0d9c6, 0x12b7e950,
		0x8bbeb8ea, 0xfcb9887c, 0x62dd1ddf, 0x15da2d49, 0x8cd37cf3, 0xfbd44c65,
		0x4db26158, 0x3ab551ce, 0xa3bc0074, 0xd4bb30e2, 0x4adfa541, 0x3dd895d7,
		0xa4d1c46d, 0xd3d6f4fb, 0x4369e96a, 0x346ed9fc, 0xad678846, 0xda60b8d0,
		0x44042d73, 0x33031de5, 0xaa0a4c5f, 0xdd0d7cc9, 0x5005713c, 0x270241aa,
		0xbe0b1010, 0xc90c2086, 0x5768b525, 0x206f85b3, 0xb966d409, 0xce61e49f,
		0x5edef90e, 0x29d9c998, 0xb0d09822, 0xc7d7a8b4, 0x59b33d17, 0x2eb40d81,
		0xb7bd5c3b, 0xc0ba6cad, 0xedb88320, 0x9abfb3b6, 0x03b6e20c, 0x74b1d29a,
		0xead54739, 0x9dd277af, 0x04db2615, 0x73dc1683, 0xe3630b12, 0x94643b84,
		0x0d6d6a3e, 0x7a6a5aa8, 0xe40ecf0b, 0x9309ff9d, 0x0a00ae27, 0x7d079eb1,
		0xf00f9344, 0x8708a3d2, 0x1e01f268, 0x6906c2fe, 0xf762575d, 0x806567cb,
		0x196c3671, 0x6e6b06e7, 0xfed41b76, 0x89d32be0, 0x10da7a5a, 0x67dd4acc,
		0xf9b9df6f, 0x8ebeeff9, 0x17b7be43, 0x60b08ed5, 0xd6d6a3e8, 0xa1d1937e,
		0x38d8c2c4, 0x4fdff252, 0xd1bb67f1, 0xa6bc5767, 0x3fb506dd, 0x48b2364b,
		0xd80d2bda, 0xaf0a1b4c, 0x36034af6, 0x41047a60, 0xdf60efc3, 0xa867df55,
		0x316e8eef, 0x4669be79, 0xcb61b38c, 0xbc66831a, 0x256fd2a0, 0x5268e236,
		0xcc0c7795, 0xbb0b4703, 0x220216b9, 0x5505262f, 0xc5ba3bbe, 0xb2bd0b28,
		0x2bb45a92, 0x5cb36a04, 0xc2d7ffa7, 0xb5d0cf31, 0x2cd99e8b, 0x5bdeae1d,
		0x9b64c2b0, 0xec63f226, 0x756aa39c, 0x026d930a, 0x9c0906a9, 0xeb0e363f,
		0x72076785, 0x05005713, 0x95bf4a82, 0xe2b87a14, 0x7bb12bae, 0x0cb61b38,
		0x92d28e9b, 0xe5d5be0d, 0x7cdcefb7, 0x0bdbdf21, 0x86d3d2d4, 0xf1d4e242,
		0x68ddb3f8, 0x1fda836e, 0x81be16cd, 0xf6b9265b, 0x6fb077e1, 0x18b74777,
		0x88085ae6, 0xff0f6a70, 0x66063bca, 0x11010b5c, 0x8f659eff, 0xf862ae69,
		0x616bffd3, 0x166ccf45, 0xa00ae278, 0xd70dd2ee, 0x4e048354, 0x3903b3c2,
		0xa7672661, 0xd06016f7, 0x4969474d, 0x3e6e77db, 0xaed16a4a, 0xd9d65adc,
		0x40df0b66, 0x37d83bf0, 0xa9bcae53, 0xdebb9ec5, 0x47b2cf7f, 0x30b5ffe9,
		0xbdbdf21c, 0xcabac28a, 0x53b39330, 0x24b4a3a6, 0xbad03605, 0xcdd70693,
		0x54de5729, 0x23d967bf, 0xb3667a2e, 0xc4614ab8, 0x5d681b02, 0x2a6f2b94,
		0xb40bbe37, 0xc30c8ea1, 0x5a05df1b, 0x2d02ef8d,
	},
	{
		0x00000000, 0x191b3141, 0x32366282, 0x2b2d53c3, 0x646cc504, 0x7d77f445,
		0x565aa786, 0x4f4196c7, 0xc8d98a08, 0xd1c2bb49, 0xfaefe88a, 0xe3f4d9cb,
		0xacb54f0c, 0xb5ae7e4d, 0x9e832d8e, 0x87981ccf, 0x4ac21251, 0x53d92310,
		0x78f470d3, 0x61ef4192, 0x2eaed755, 0x37b5e614, 0x1c98b5d7, 0x05838496,
		0x821b9859, 0x9b00a918, 0xb02dfadb, 0xa936cb9a, 0xe6775d5d, 0xff6c6c1c,
		0xd4413fdf, 0xcd5a0e9e, 0x958424a2, 0x8c9f15e3, 0xa7b24620, 0xbea97761,
		0xf1e8e1a6, 0xe8f3d0e7, 0xc3de8324, 0xdac5b265, 0x5d5daeaa, 0x44469feb,
		0x6f6bcc28, 0x7670fd69, 0x39316bae, 0x202a5aef, 0x0b07092c, 0x121c386d,
		0xdf4636f3, 0xc65d07b2, 0xed705471, 0xf46b6530, 0xbb2af3f7, 0xa231c2b6,
		0x891c9175, 0x9007a034, 0x179fbcfb, 0x0e848dba, 0x25a9de79, 0x3cb2ef38,
		0x73f379ff, 0x6ae848be, 0x41c51b7d, 0x58de2a3c, 0xf0794f05, 0xe9627e44,
		0xc24f2d87, 0xdb541cc6, 0x94158a01, 0x8d0ebb40, 0xa623e883, 0xbf38d9c2,
		0x38a0c50d, 0x21bbf44c, 0x0a96a78f, 0x138d96ce, 0x5ccc0009, 0x45d73148,
		0x6efa628b, 0x77e153ca, 0xbabb5d54, 0xa3a06c15, 0x888d3fd6, 0x91960e97,
		0xded79850, 0xc7cca911, 0xece1fad2, 0xf5facb93, 0x7262d75c, 0x6b79e61d,
		0x4054b5de, 0x594f849f, 0x160e1258, 0x0f152319, 0x243870da, 0x3d23419b,
		0x65fd6ba7, 0x7ce65ae6, 0x57cb0925, 0x4ed03864, 0x0191aea3, 0x188a9fe2,
		0x33a7cc21, 0x2abcfd60, 0xad24e1af, 0xb43fd0ee, 0x9f12832d, 0x8609b26c,
		0xc94824ab, 0xd05315ea, 0xfb7e4629, 0xe2657768, 0x2f3f79f6, 0x362448b7,
		0x1d091b74, 0x04122a35, 0x4b53bcf2, 0x52488db3, 0x7965de70, 0x607eef31,
		0xe7e6f3fe, 0xfefdc2bf, 0xd5d0917c, 0xcccba03d, 0x838a36fa, 0x9a9107bb,
		0xb1bc5478, 0xa8a76539, 0x3b83984b, 0x2298a90a, 0x09b5fac9, 0x10aecb88,
		0x5fef5d4f, 0x46f46c0e, 0x6dd93fcd, 0x74c20e8c, 0xf35a1243, 0xea412302,
		0xc16c70c1, 0xd8774180, 0x9736d747, 0x8e2de606, 0xa500b5c5, 0xbc1b8484,
		0x71418a1a, 0x685abb5b, 0x4377e898, 0x5a6cd9d9, 0x152d4f1e, 0x0c367e5f,
		0x271b2d9c, 0x3e001cdd, 0xb9980012, 0xa0833153, 0x8bae6290, 0x92b553d1,
		0xddf4c516, 0xc4eff457, 0xefc2a794, 0xf6d996d5, 0xae07bce9, 0xb71c8da8,
		0x9c31de6b, 0x852aef2a, 0xca6b79ed, 0xd37048ac, 0xf85d1b6f, 0xe1462a2e,
		0x66de36e1, 0x7fc507a0, 0x54e85463, 0x4df36522, 0x02b2f3e5, 0x1ba9c2a4,
		0x30849167, 0x299fa026, 0xe4c5aeb8, 0xfdde9ff9, 0xd6f3cc3a, 0xcfe8fd7b,
		0x80a96bbc, 0x99b25afd, 0xb29f093e, 0xab84387f, 0x2c1c24b0, 0x350715f1,
		0x1e2a4632, 0x07317773, 0x4870e1b4, 0x516bd0f5, 0x7a468336, 0x635db277,
		0xcbfad74e, 0xd2e1e60f, 0xf9ccb5cc, 0xe0d7848d, 0xaf96124a, 0xb68d230b,
		0x9da070c8, 0x84bb4189, 0x03235d46, 0x1a386c07, 0x31153fc4, 0x280e0e85,
		0x674f9842, 0x7e54a903, 0x5579fac0, 0x4c62cb81, 0x8138c51f, 0x9823f45e,
		0xb30ea79d, 0xaa1596dc, 0xe554001b, 0xfc4f315a, 0xd7626299, 0xce7953d8,
		0x49e14f17, 0x50fa7e56, 0x7bd72d95, 0x62cc1cd4, 0x2d8d8a13, 0x3496bb52,
		0x1fbbe891, 0x06a0d9d0, 0x5e7ef3ec, 0x4765c2ad, 0x6c48916e, 0x7553a02f,
		0x3a1236e8, 0x230907a9, 0x0824546a, 0x113f652b, 0x96a779e4, 0x8fbc48a5,
		0xa4911b66, 0xbd8a2a27, 0xf2cbbce0, 0xebd08da1, 0xc0fdde62, 0xd9e6ef23,
		0x14bce1bd, 0x0da7d0fc, 0x268a833f, 0x3f91b27e, 0x70d024b9, 0x69cb15f8,
		0x42e6463b, 0x5bfd777a, 0xdc656bb5, 0xc57e5af4, 0xee530937, 0xf7483876,
		0xb809aeb1, 0xa1129ff0, 0x8a3fcc33, 0x9324fd72,
	},
	{
		0x00000000, 0x01c26a37, 0x0384d46e, 0x0246be59, 0x0709a8dc, 0x06cbc2eb,
		0x048d7cb2, 0x054f1685, 0x0e1351b8, 0x0fd13b8f, 0x0d9785d6, 0x0c55efe1,
		0x091af964, 0x08d89353, 0x0a9e2d0a, 0x0b5c473d, 0x1c26a370, 0x1de4c947,
		0x1fa2771e, 0x1e601d29, 0x1b2f0bac, 0x1aed619b, 0x18abdfc2, 0x1969b5f5,
		0x1235f2c8, 0x13f798ff, 0x11b126a6, 0x10734c91, 0x153c5a14, 0x14fe3023,
		0x16b88e7a, 0x177ae44d, 0x384d46e0, 0x398f2cd7, 0x3bc9928e, 0x3a0bf8b9,
		0x3f44ee3c, 0x3e86840b, 0x3cc03a52, 0x3d025065, 0x365e1758, 0x379c7d6f,
		0x35dac336, 0x3418a901, 0x3157bf84, 0x3095d5b3, 0x32d36bea, 0x331101dd,
		0x246be590, 0x25a98fa7, 0x27ef31fe, 0x262d5bc9, 0x23624d4c, 0x22a0277b,
		0x20e69922, 0x2124f315, 0x2a78b428, 0x2bbade1f, 0x29fc6046, 0x283e0a71,
		0x2d711cf4, 0x2cb376c3, 0x2ef5c89a, 0x2f37a2ad, 0x709a8dc0, 0x7158e7f7,
		0x731e59ae, 0x72dc3399, 0x7793251c, 0x76514f2b, 0x7417f172, 0x75d59b45,
		0x7e89dc78, 0x7f4bb64f, 0x7d0d0816, 0x7ccf6221, 0x798074a4, 0x78421e93,
		0x7a04a0ca, 0x7bc6cafd, 0x6cbc2eb0, 0x6d7e4487, 0x6f38fade, 0x6efa90e9,
		0x6bb5866c, 0x6a77ec5b, 0x68315202, 0x69f33835, 0x62af7f08, 0x636d153f,
		0x612bab66, 0x60e9c151, 0x65a6d7d4, 0x6464bde3, 0x662203ba, 0x67e0698d,
		0x48d7cb20, 0x4915a117, 0x4b531f4e, 0x4a917579, 0x4fde63fc, 0x4e1c09cb,
		0x4c5ab792, 0x4d98dda5, 0x46c49a98, 0x4706f0af, 0x45404ef6, 0x448224c1,
		0x41cd3244, 0x400f5873, 0x4249e62a, 0x438b8c1d, 0x54f16850, 0x55330267,
		0x5775bc3e, 0x56b7d609, 0x53f8c08c, 0x523aaabb, 0x507c14e2, 0x51be7ed5,
		0x5ae239e8, 0x5b2053df, 0x5966ed86, 0x58a487b1, 0x5deb9134, 0x5c29fb03,
		0x5e6f455a, 0x5fad2f6d, 0xe1351b80, 0xe0f771b7, 0xe2b1cfee, 0xe373a5d9,
		0xe63cb35c, 0xe7fed96b, 0xe5b86732, 0xe47a0d05, 0xef264a38, 0xeee4200f,
		0xeca29e56, 0xed60f461, 0xe82fe2e4, 0xe9ed88d3, 0xebab368a, 0xea695cbd,
		0xfd13b8f0, 0xfcd1d2c7, 0xfe976c9e, 0xff5506a9, 0xfa1a102c, 0xfbd87a1b,
		0xf99ec442, 0xf85cae75, 0xf300e948, 0xf2c2837f, 0xf0843d26, 0xf1465711,
		0xf4094194, 0xf5cb2ba3, 0xf78d95fa, 0xf64fffcd, 0xd9785d60, 0xd8ba3757,
		0xdafc890e, 0xdb3ee339, 0xde71f5bc, 0xdfb39f8b, 0xddf521d2, 0xdc374be5,
		0xd76b0cd8, 0xd6a966ef, 0xd4efd8b6, 0xd52db281, 0xd062a404, 0xd1a0ce33,
		0xd3e6706a, 0xd2241a5d, 0xc55efe10, 0xc49c9427, 0xc6da2a7e, 0xc7184049,
		0xc25756cc, 0xc3953cfb, 0xc1d382a2, 0xc011e895, 0xcb4dafa8, 0xca8fc59f,
		0xc8c97bc6, 0xc90b11f1, 0xcc440774, 0xcd866d43, 0xcfc0d31a, 0xce02b92d,
		0x91af9640, 0x906dfc77, 0x922b422e, 0x93e92819, 0x96a63e9c, 0x976454ab,
		0x9522eaf2, 0x94e080c5, 0x9fbcc7f8, 0x9e7eadcf, 0x9c381396, 0x9dfa79a1,
		0x98b56f24, 0x99770513, 0x9b31bb4a, 0x9af3d17d, 0x8d893530, 0x8c4b5f07,
		0x8e0de15e, 0x8fcf8b69, 0x8a809dec, 0x8b42f7db, 0x89044982, 0x88c623b5,
		0x839a6488, 0x82580ebf, 0x801eb0e6, 0x81dcdad1, 0x8493cc54, 0x8551a663,
		0x8717183a, 0x86d5720d, 0xa9e2d0a0, 0xa820ba97, 0xaa6604ce, 0xaba46ef9,
		0xaeeb787c, 0xaf29124b, 0xad6fac12, 0xacadc625, 0xa7f18118, 0xa633eb2f,
		0xa4755576, 0xa5b73f41, 0xa0f829c4, 0xa13a43f3, 0xa37cfdaa, 0xa2be979d,
		0xb5c473d0, 0xb40619e7, 0xb640a7be, 0xb782cd89, 0xb2cddb0c, 0xb30fb13b,
		0xb1490f62, 0xb08b6555, 0xbbd72268, 0xba15485f, 0xb853f606, 0xb9919c31,
		0xbcde8ab4, 0xbd1ce083, 0xbf5a5eda, 0xbe9834ed,
	},
	{
		0x00000000, 0xb8bc6765, 0xaa09c88b, 0x12b5afee, 0x8f629757, 0x37def032,
		0x256b5fdc, 0x9dd738b9, 0xc5b428ef, 0x7d084f8a, 0x6fbde064, 0xd7018701,
		0x4ad6bfb8, 0xf26ad8dd, 0xe0df7733, 0x58631056, 0x5019579f, 0xe8a530fa,
		0xfa109f14, 0x42acf871, 0xdf7bc0c8, 0x67c7a7ad, 0x75720843, 0xcdce6f26,
		0x95ad7f70, 0x2d111815, 0x3fa4b7fb, 0x8718d09e, 0x1acfe827, 0xa2738f42,
		0xb0c620ac, 0x087a47c9, 0xa032af3e, 0x188ec85b, 0x0a3b67b5, 0xb28700d0,
		0x2f503869, 0x97ec5f0c, 0x8559f0e2, 0x3de59787, 0x658687d1, 0xdd3ae0b4,
		0xcf8f4f5a, 0x7733283f, 0xeae41086, 0x525877e3, 0x40edd80d, 0xf851bf68,
		0xf02bf8a1, 0x48979fc4, 0x5a22302a, 0xe29e574f, 0x7f496ff6, 0xc7f50893,
		0xd540a77d, 0x6dfcc018, 0x359fd04e, 0x8d23b72b, 0x9f9618c5, 0x272a7fa0,
		0xbafd4719, 0x0241207c, 0x10f48f92, 0xa848e8f7, 0x9b14583d, 0x23a83f58,
		0x311d90b6, 0x89a1f7d3, 0x1476cf6a, 0xaccaa80f, 0xbe7f07e1, 0x06c36084,
		0x5ea070d2, 0xe61c17b7, 0xf4a9b859, 0x4c15df3c, 0xd1c2e785, 0x697e80e0,
		0x7bcb2f0e, 0xc377486b, 0xcb0d0fa2, 0x73b168c7, 0x6104c729, 0xd9b8a04c,
		0x446f98f5, 0xfcd3ff90, 0xee66507e, 0x56da371b, 0x0eb9274d, 0xb6054028,
		0xa4b0efc6, 0x1c0c88a3, 0x81dbb01a, 0x3967d77f, 0x2bd27891, 0x936e1ff4,
		0x3b26f703, 0x839a9066, 0x912f3f88, 0x299358ed, 0xb4446054, 0x0cf80731,
		0x1e4da8df, 0xa6f1cfba, 0xfe92dfec, 0x462eb889, 0x549b1767, 0xec277002,
		0x71f048bb, 0xc94c2fde, 0xdbf98030, 0x6345e755, 0x6b3fa09c, 0xd383c7f9,
		0xc1366817, 0x798a0f72, 0xe45d37cb, 0x5ce150ae, 0x4e54ff40, 0xf6e89825,
		0xae8b8873, 0x1637ef16, 0x048240f8, 0xbc3e279d, 0x21e91f24, 0x99557841,
		0x8be0d7af, 0x335cb0ca, 0xed59b63b, 0x55e5d15e, 0x47507eb0, 0xffec19d5,
		0x623b216c, 0xda874609, 0xc832e9e7, 0x708e8e82, 0x28ed9ed4, 0x9051f9b1,
		0x82e4565f, 0x3a58313a, 0xa78f0983, 0x1f336ee6, 0x0d86c108, 0xb53aa66d,
		0xbd40e1a4, 0x05fc86c1, 0x1749292f, 0xaff54e4a, 0x322276f3, 0x8a9e1196,
		0x982bbe78, 0x2097d91d, 0x78f4c94b, 0xc048ae2e, 0xd2fd01c0, 0x6a4166a5,
		0xf7965e1c, 0x4f2a3979, 0x5d9f9697, 0xe523f1f2, 0x4d6b1905, 0xf5d77e60,
		0xe762d18e, 0x5fdeb6eb, 0xc2098e52, 0x7ab5e937, 0x680046d9, 0xd0bc21bc,
		0x88df31ea, 0x3063568f, 0x22d6f961, 0x9a6a9e04, 0x07bda6bd, 0xbf01c1d8,
		0xadb46e36, 0x15080953, 0x1d724e9a, 0xa5ce29ff, 0xb77b8611, 0x0fc7e174,
		0x9210d9cd, 0x2aacbea8, 0x38191146, 0x80a57623, 0xd8c66675, 0x607a0110,
		0x72cfaefe, 0xca73c99b, 0x57a4f122, 0xef189647, 0xfdad39a9, 0x45115ecc,
		0x764dee06, 0xcef18963, 0xdc44268d, 0x64f841e8, 0xf92f7951, 0x41931e34,
		0x5326b1da, 0xeb9ad6bf, 0xb3f9c6e9, 0x0b45a18c, 0x19f00e62, 0xa14c6907,
		0x3c9b51be, 0x842736db, 0x96929935, 0x2e2efe50, 0x2654b999, 0x9ee8defc,
		0x8c5d7112, 0x34e11677, 0xa9362ece, 0x118a49ab, 0x033fe645, 0xbb838120,
		0xe3e09176, 0x5b5cf613, 0x49e959fd, 0xf1553e98, 0x6c820621, 0xd43e6144,
		0xc68bceaa, 0x7e37a9cf, 0xd67f4138, 0x6ec3265d, 0x7c7689b3, 0xc4caeed6,
		0x591dd66f, 0xe1a1b10a, 0xf3141ee4, 0x4ba87981, 0x13cb69d7, 0xab770eb2,
		0xb9c2a15c, 0x017ec639, 0x9ca9fe80, 0x241599e5, 0x36a0360b, 0x8e1c516e,
		0x866616a7, 0x3eda71c2, 0x2c6fde2c, 0x94d3b949, 0x090481f0, 0xb1b8e695,
		0xa30d497b, 0x1bb12e1e, 0x43d23e48, 0xfb6e592d, 0xe9dbf6c3, 0x516791a6,
		0xccb0a91f, 0x740cce7a, 0x66b96194, 0xde0506f1,
	},
};

// Keeps the compiler from recomputing a packet pointer after its bounds
// check: the verifier only trusts the register it checked.
#define same_register(x) asm volatile("" : "+r"(x))

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

// The UDP pseudo-header's words, summed (unfolded).
static __always_inline __u32 pseudo_header_sum(const struct headers *h)
{
	__u32 sum = 0;
	sum = add32(sum, h->ip.saddr);
	sum = add32(sum, h->ip.daddr);
	sum = add16(sum, bpf_htons(IPPROTO_UDP));
	return add16(sum, h->udp.len);
}

// Whether the UDP checksum field holds only the pseudo-header's sum: the
// datagram is CHECKSUM_PARTIAL, from a sender on this host (through a
// veth, say) or a virtual card's host (virtio-net), whose checksum the
// device that sends it on completes, at the offset the socket buffer
// records. The program cannot relay such a datagram: moving the headers
// leaves that offset pointing elsewhere, so a router or card that
// completes the checksum later writes it into the wrong bytes, and the
// receiver drops the datagram (a test saw 99.95 % loss). The sockets take
// these. A complete checksum looks like this by chance once in 65,536
// datagrams, which then go to the sockets too: slower, never wrong.
static __always_inline int partial_checksum(const struct headers *h)
{
	return h->udp.check == fold(pseudo_header_sum(h));
}

// Whether a UDP checksum holds: `pseudo` is the pseudo-header's sum,
// `payload` the payload's (as message_step sums it, in 32-bit words).
static __always_inline int checksum_holds(__u32 pseudo, struct udphdr udp,
					  __u64 payload)
{
	__u32 sum = pseudo;
	sum = add16(sum, udp.source);
	sum = add16(sum, udp.dest);
	sum = add16(sum, udp.len);
	sum = add16(sum, udp.check);
	__u64 all = payload + sum;
	all = (all & 0xffffffff) + (all >> 32);
	all = (all & 0xffffffff) + (all >> 32);
	return fold((__u32)all) == 0xffff;
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

// 127.0.0.0/8, from an address in network byte order.
static __always_inline int loopback_ip(__u32 ip) { return (ip & 0xff) == 127; }

// Remembers the link-layer address `ip`'s packets come from. On loopback
// there are no link-layer addresses, but what it learns still matters: a
// packet arrives on loopback only from this host, so its source is one of
// this host's addresses, which a frame sent back into loopback reaches.
// (127.0.0.0/8 always is: nothing to learn.)
static __always_inline void learn(__u32 ifindex, __u32 ip, const struct ethhdr *eth)
{
	if (ifindex == LOOPBACK_IFINDEX && loopback_ip(ip))
		return;
	struct mac *known = bpf_map_lookup_elem(&hop_macs, &ip);
	if (known && known->ifindex == ifindex && same_mac(known->addr, eth->h_source))
		return;
	struct mac m = { .ifindex = ifindex };
	__builtin_memcpy(m.addr, eth->h_source, ETH_ALEN);
	bpf_map_update_elem(&hop_macs, &ip, &m, BPF_ANY);
}

// Addresses the frame for its next hop, or false: the destination has not
// been seen on this interface yet, so the sockets send it (and its answer
// teaches the program), or the frame would outgrow the MTU by `grow`. It
// leaves from the interface it came in on, from that interface's address
// (the one the frame was sent to). Not bpf_fib_lookup: that one insists on
// IP forwarding being enabled, which a relay has no business asking for.
// On loopback the addresses are all zero and stay so, and a frame goes
// back in only to an address of this host's (127.0.0.0/8, or one seen on
// loopback): one for another host would be dropped there, as the kernel
// does not forward what it receives on loopback.
static __always_inline int next_hop(struct xdp_md *ctx, struct headers *n,
				    const struct headers *h, int grow)
{
	__u32 dst = n->ip.daddr;
	__u32 ifindex = ctx->ingress_ifindex;
	if (ifindex == LOOPBACK_IFINDEX && loopback_ip(dst))
		return 1;
	struct mac *to = bpf_map_lookup_elem(&hop_macs, &dst);
	if (!to || to->ifindex != ifindex)
		return 0;
	if (ifindex == LOOPBACK_IFINDEX)
		return 1;
	__u32 mtu = 0;
	if (grow > 0 && bpf_check_mtu(ctx, 0, &mtu, grow, 0) != BPF_MTU_CHK_RET_SUCCESS)
		return 0;
	__builtin_memcpy(n->eth.h_source, h->eth.h_dest, ETH_ALEN);
	__builtin_memcpy(n->eth.h_dest, to->addr, ETH_ALEN);
	return 1;
}

// Takes `bytes` from the budget of relay port `port` (network order) in
// direction `dir` (0: toward the peer, 1: toward the client), of the
// family whose budgets start at `base`, as the workers do
// (server::budget::Budget::take); true if there are not enough.
static __always_inline int over_budget(__u64 rate, __u32 base, __u16 port, int dir,
				       __u32 bytes, __u64 now)
{
	__u32 i = base + (__u32)bpf_ntohs(port) * 2 + dir;
	__u64 *paid = bpf_map_lookup_elem(&budgets, &i);
	if (!paid)
		return 1; // cannot happen: with a limit, every port has its budgets
	__u64 cost = (__u64)bytes * BUDGET_NS / rate;
	// Another CPU, or a worker, may take from the same budget at the same
	// moment, and win: then once more. Losing twice in a row takes two
	// others in that very instant; the packet is dropped then, as if over
	// budget. (A bound, for the verifier.)
#pragma unroll
	for (int tries = 0; tries < 2; tries++) {
		__u64 was = *(volatile __u64 *)paid;
		__u64 until = (was > now ? was : now) + cost;
		if (until - now > BUDGET_NS)
			return 1;
		if (__sync_val_compare_and_swap(paid, was, until) == was)
			return 0;
	}
	return 1;
}

// The verdict on a packet relayed and ready to leave, charged as `owe`
// noted: XDP_TX, counted; or, if a budget it is taken from is spent,
// XDP_DROP, as the server drops it. Taken only here, once nothing can
// send the packet to the sockets any more, where the server would take
// it again.
static __noinline int relayed(void)
{
	__u32 zero = 0;
	struct charge *ch = bpf_map_lookup_elem(&charges, &zero);
	if (!ch)
		return XDP_DROP; // cannot happen: an array has its element
	__u16 from = ch->from, to = ch->to;
	__u32 bytes = ch->bytes, base = ch->base;
	struct stats *s = bpf_map_lookup_elem(&stats, &zero);
	struct settings *set = bpf_map_lookup_elem(&settings, &zero);
	__u64 rate = set ? set->bytes_per_sec : 0;
	__u64 now = rate ? bpf_ktime_get_ns() : 0;
	if (rate && from && over_budget(rate, base, from, 0, bytes, now)) {
		if (s)
			s->to_peer_over_budget++;
		return XDP_DROP;
	}
	if (rate && to && over_budget(rate, base, to, 1, bytes, now)) {
		if (s)
			s->to_client_over_budget++;
		return XDP_DROP;
	}
	if (!s)
		return XDP_TX;
	if (from) {
		s->to_peer_packets++;
		s->to_peer_bytes += bytes;
	}
	if (to) {
		s->to_client_packets++;
		s->to_client_bytes += bytes;
	}
	return XDP_TX;
}

// Notes what the packet about to be relayed is to be charged: `bytes` of
// data out of the allocation at relay port `from` (toward a peer; zero:
// it came from a peer), to the client of the one at `to` (zero: to a
// peer), or both (in place, between two of our allocations). Taken if it
// is relayed after all (see `relayed`). Noted here, in a per-CPU map,
// rather than carried to the end: that took registers and stack the
// program does not have (512 bytes, nearly all in use). Per CPU is safe
// where XDP runs with preemption off, as on every kernel but PREEMPT_RT;
// there another packet's run could come between the note and its use,
// and charge one packet's bytes to the other's budgets (as the per-CPU
// counters could lose a count there). The ports' budgets start at `base`:
// 0 for IPv4 relays, IPV6_BUDGETS for IPv6 ones.
static __always_inline void owe_at(__u32 base, __u16 from, __u16 to, __u32 bytes)
{
	__u32 zero = 0;
	struct charge *ch = bpf_map_lookup_elem(&charges, &zero);
	if (ch) {
		ch->base = base;
		ch->from = from;
		ch->to = to;
		ch->bytes = bytes;
	}
}

// `owe_at` for IPv4 relays.
static __always_inline void owe(__u16 from, __u16 to, __u32 bytes)
{
	owe_at(0, from, to, bytes);
}

// Client -> peer: drop the 4-byte channel header, send from the relayed
// address to the peer.
static __always_inline int relay_to_peer(struct xdp_md *ctx, const struct headers *h,
					 const struct to_peer *r, __u16 cd0,
					 __u16 cd1, __u16 len)
{
	owe(r->relay_port, 0, len);
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
	owe(0, c->relay_port, len);
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
	return XDP_TX;
}

// Peer -> client without a channel: put a Data indication in front of the
// `len` bytes of data, pad them, send from the TURN port to the client.
// The data comes from `peer_ip`:`peer_port`, after a header of `strip`
// bytes that goes (none; a channel header; a Send indication's), and
// before `after` bytes (none; a Send indication's padding and attributes)
// of which the first `pad` stay as the padding, zeroed as the server's
// are, and the rest go; `removed` is the sum of the words that go or are
// zeroed.
static __always_inline int relay_as_indication(struct xdp_md *ctx, const struct headers *h,
					       const struct to_client *c, __u32 peer_ip,
					       __u16 peer_port, __u16 len, int strip,
					       __u32 removed, int after)
{
	int pad = (4 - (len & 3)) & 3;
	int grow = INDICATION_HEADER - strip + pad - after;
	if (len > 0xffff - INDICATION_HEADER - pad - sizeof(struct iphdr) - sizeof(struct udphdr))
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
	// In place, its header stripped: it left an allocation too, the
	// one whose relayed address is the "peer".
	owe(strip ? peer_port : 0, c->relay_port, len);
	struct headers n = *h;
	readdress(&n, h, c->server_ip, c->server_port, c->client_ip, c->client_port,
		  grow, added, removed);
	if (!next_hop(ctx, &n, h, grow))
		return XDP_PASS;
	// The kernel zeroes what the tail grows by: that is the padding.
	int tail = pad - after;
	if (tail > 0 && bpf_xdp_adjust_tail(ctx, tail))
		return XDP_PASS;
	if (bpf_xdp_adjust_head(ctx, -(INDICATION_HEADER - strip))) {
		if (tail > 0)
			bpf_xdp_adjust_tail(ctx, -tail);
		return XDP_PASS;
	}
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	if (data + sizeof(n) + sizeof(ind) > end)
		return XDP_DROP; // cannot happen: the packet grew
	__builtin_memcpy(data, &n, sizeof(n));
	__builtin_memcpy(data + sizeof(n), &ind, sizeof(ind));
	if (after) {
		__u8 *z = data + sizeof(n) + sizeof(ind) + len;
		for (int i = 0; i < 3; i++) {
			if (i >= pad)
				break;
			__u8 *b = z + i;
			same_register(b);
			if ((void *)(b + 1) > end)
				return XDP_DROP; // cannot happen: the padding was there
			*b = 0;
		}
	}
	// Were this refused, the frame would still be right: IP's length ends
	// the datagram, the rest is padding.
	if (tail < 0)
		bpf_xdp_adjust_tail(ctx, tail);
	return XDP_TX;
}

// The route of our allocation at `them`:`port` for data from `r`'s
// relayed address: its channel's (*channel set) or else its permission's,
// if live; NULL if there is none (not one of ours, or not open to the
// sender). `*me` is the sender's relayed IP as the receiver knows it: with
// an external IP, the clients know each other's relayed addresses by it,
// while the routes hold the relay IP.
static __always_inline struct to_client *receiver_route(const struct to_peer *r, __u32 them,
							__u16 port, __u64 now, __u32 *me,
							int *channel)
{
	*me = r->relay_ip;
	__u32 zero = 0;
	struct settings *a = bpf_map_lookup_elem(&settings, &zero);
	if (a && a->external_ip) {
		if (*me == a->relay_ip)
			*me = a->external_ip;
		if (them == a->external_ip)
			them = a->relay_ip;
	}
	struct peer_key pk = {
		.peer_ip = *me,
		.relay_ip = them,
		.peer_port = r->relay_port,
		.relay_port = port,
	};
	struct to_client *c = bpf_map_lookup_elem(&peer_routes, &pk);
	*channel = c && c->expires_ns > now;
	if (*channel)
		return c;
	struct permission_key ik = {
		.peer_ip = *me,
		.relay_ip = them,
		.relay_port = port,
	};
	c = bpf_map_lookup_elem(&permission_routes, &ik);
	return c && c->expires_ns > now ? c : NULL;
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
	__u32 me;
	int channel;
	struct to_client *c = receiver_route(r, r->peer_ip, r->peer_port, now, &me, &channel);
	if (!c)
		return -1; // not one of ours, or not open to the sender
	if (channel) {
		owe(r->relay_port, c->relay_port, len);
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
		return XDP_TX;
	}
	return relay_as_indication(ctx, h, c, me, r->relay_port, len, CHANNEL_HEADER,
				   (__u32)cd0 + cd1, 0);
}

// One pass over a Send indication of `len` bytes (a multiple of 4): the
// CRC of its first `crc_len` bytes, for FINGERPRINT, and the sum of all of
// them, for the UDP checksum. 16 bytes per step of bpf_loop: its callback
// is verified once, where a loop would be verified step by step, each step
// reaching the rest of the program in a state of its own (over the
// verifier's limit). Four words per call: a call per word took twice the
// time.
struct message_pass {
	__u8 *p;
	void *end;
	__u32 len;
	__u32 crc_len;
	__u32 crc;
	__u32 bad;
	__u64 sum;
};

static long message_step(__u64 index, void *ctx)
{
	struct message_pass *c = ctx;
	__u32 crc = c->crc;
	__u64 sum = c->sum;
#pragma unroll
	for (__u32 k = 0; k < 4; k++) {
		__u32 at = (index * 16 + k * 4) & 0x7ff;
		if (at >= c->len)
			break;
		__u8 *b = c->p + at;
		if ((void *)(b + 4) > c->end) {
			c->bad = 1;
			return 1;
		}
		__u32 word = *(__u32 *)b;
		sum += word;
		if (at < c->crc_len) {
			crc ^= word; // little-endian, as the tables want (the object is built for bpfel)
			crc = crc32_table[3][crc & 0xff] ^ crc32_table[2][(crc >> 8) & 0xff] ^
			      crc32_table[1][(crc >> 16) & 0xff] ^ crc32_table[0][crc >> 24];
		}
	}
	c->crc = crc;
	c->sum = sum;
	return 0;
}

// One's-complement sum, as stored, of the byte at UDP payload offset `at`
// (the payload starts at an even offset: a byte at an even offset is the
// first of its 16-bit word, which little-endian loads put low).
static __always_inline __u32 byte_word(__u8 b, __u32 at)
{
	return at & 1 ? (__u32)b << 8 : b;
}

// A Send indication's `d` bytes of data, after `start` bytes and before
// `after`, from the relayed address of `r` to another of ours,
// `peer_ip`:`peer_port`: to the client of that allocation, along its routes
// for data from the sender's relayed address, as ChannelData (the words
// summing to `removed` go) or as a Data indication (the same words go;
// the padding stays in place, zeroed). -1 if there is no such route:
// the server alone knows whether the port is a live relay at all.
static __always_inline int send_in_place(struct xdp_md *ctx, const struct headers *h,
					 const struct to_peer *r, __u32 peer_ip, __u16 peer_port,
					 __u32 start, __u32 d, __u32 after, __u32 removed,
					 __u64 now)
{
	__u32 me;
	int channel;
	struct to_client *c = receiver_route(r, peer_ip, peer_port, now, &me, &channel);
	if (!c)
		return -1;
	if (channel) {
		__u16 cd1 = bpf_htons(d);
		int grow = CHANNEL_HEADER - (int)start - (int)after;
		owe(r->relay_port, c->relay_port, d);
		struct headers n = *h;
		readdress(&n, h, c->server_ip, c->server_port, c->client_ip, c->client_port,
			  grow, (__u32)c->channel + cd1, removed);
		if (!next_hop(ctx, &n, h, grow))
			return XDP_PASS;
		if (bpf_xdp_adjust_head(ctx, (int)start - CHANNEL_HEADER))
			return XDP_PASS;
		void *data = (void *)(long)ctx->data;
		void *end = (void *)(long)ctx->data_end;
		if (data + sizeof(n) + CHANNEL_HEADER > end)
			return XDP_DROP; // cannot happen: the message was longer
		__builtin_memcpy(data, &n, sizeof(n));
		__u16 *cd = data + sizeof(n);
		cd[0] = c->channel;
		cd[1] = cd1;
		// Were this refused, the frame would still be right: IP's length
		// ends the datagram, the rest is padding.
		if (after)
			bpf_xdp_adjust_tail(ctx, -(int)after);
		return XDP_TX;
	}
	return relay_as_indication(ctx, h, c, me, r->relay_port, d, start, removed, after);
}

// Client -> peer, a Send indication laid out as clients send it:
// XOR-PEER-ADDRESS (IPv4) then DATA (browsers), or DATA then
// XOR-PEER-ADDRESS (coturn's clients), and FINGERPRINT or not. Its data
// leaves the relayed address for the peer, the rest goes; to another of
// our relayed addresses, it goes to that allocation's client (as
// relay_in_place does for ChannelData). Returns -1 for anything else, and
// for a port on our relay IP that no route shows to be a live relay open
// to the sender: only the server can tell those from ports it must keep
// closed.
static __always_inline int relay_send(struct xdp_md *ctx, const struct headers *h,
				      __u16 len, __u64 now, int loopback)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	__u8 *p = data + sizeof(*h);
	if ((void *)(p + INDICATION_HEADER) > end || len < INDICATION_HEADER ||
	    len > INDICATION_HEADER + MAX_SEND_DATA + 3 + FINGERPRINT_ATTRIBUTE)
		return -1;
	if (p[0] != 0x00 || p[1] != 0x16 || *(__u32 *)(p + 4) != bpf_htonl(MAGIC_COOKIE))
		return -1;
	if (bpf_ntohs(*(__u16 *)(p + 2)) + 20 != len)
		return -1;
	// Whether it ends with FINGERPRINT; what it holds is checked last,
	// below, as that reads the whole message.
	__u32 body = len;
	__u32 at = len - FINGERPRINT_ATTRIBUTE;
	same_register(at);
	if (at > INDICATION_HEADER + MAX_SEND_DATA + 3)
		return -1;
	__u8 *f = p + at;
	same_register(f);
	if ((void *)(f + FINGERPRINT_ATTRIBUTE) > end)
		return -1;
	int fingerprint = *(__u16 *)f == bpf_htons(0x8028) && *(__u16 *)(f + 2) == bpf_htons(4);
	if (fingerprint)
		body = len - FINGERPRINT_ATTRIBUTE;
	// Where the data starts, how long it is, where XOR-PEER-ADDRESS is.
	__u32 start, d, xpa;
	if (*(__u16 *)(p + 20) == bpf_htons(0x0012)) {
		if (*(__u16 *)(p + 32) != bpf_htons(0x0013))
			return -1;
		start = INDICATION_HEADER;
		d = bpf_ntohs(*(__u16 *)(p + 34));
		xpa = 20;
	} else if (*(__u16 *)(p + 20) == bpf_htons(0x0013)) {
		start = 24;
		d = bpf_ntohs(*(__u16 *)(p + 22));
		xpa = start + d + ((4 - (d & 3)) & 3);
	} else {
		return -1;
	}
	__u32 pad = (4 - (d & 3)) & 3;
	// Both attributes and the header, nothing else.
	if (d > MAX_SEND_DATA || body != 20 + 12 + 4 + d + pad)
		return -1;
	if (xpa > 24 + MAX_SEND_DATA + 3)
		return -1;
	__u8 *x = p + xpa;
	same_register(x);
	if ((void *)(x + 12) > end)
		return -1;
	if (*(__u16 *)x != bpf_htons(0x0012) || *(__u16 *)(x + 2) != bpf_htons(8) || x[5] != 1)
		return -1;
	__u32 peer_ip = *(__u32 *)(x + 8) ^ bpf_htonl(MAGIC_COOKIE);
	__u16 peer_port = *(__u16 *)(x + 6) ^ bpf_htons(MAGIC_COOKIE >> 16);
	__u32 zero = 0;
	struct settings *a = bpf_map_lookup_elem(&settings, &zero);
	if (!a || !a->relay_ip)
		return -1;
	int ours = peer_ip == a->relay_ip || peer_ip == a->external_ip;
	struct send_key k = {
		.client_ip = h->ip.saddr,
		.server_ip = h->ip.daddr,
		.client_port = h->udp.source,
		.server_port = h->udp.dest,
		.peer_ip = peer_ip,
	};
	struct to_peer *r = bpf_map_lookup_elem(&send_routes, &k);
	if (!r || r->expires_ns <= now)
		return -1;
	// FINGERPRINT, if there is one, and the UDP checksum, if the datagram
	// has one, in one pass over the message. The checksum because one that
	// does not hold cannot be updated into one that holds; the sockets take
	// such datagrams, as the server drops or relays them. Not the partial
	// ones of loopback (see partial_checksum; elsewhere those never get
	// here): there every checksum is partial, and nobody completes or checks
	// it, as the frame stays on this host (see next_hop).
	int check = h->udp.check && !(loopback && partial_checksum(h));
	if (fingerprint || check) {
		struct message_pass c = {
			.p = p, .end = end, .len = len, .crc_len = fingerprint ? body : 0, .crc = 0xffffffff,
		};
		if (bpf_loop((len + 15) / 16, message_step, &c, 0) < 0 || c.bad)
			return -1;
		if (fingerprint &&
		    (c.crc ^ 0xffffffff ^ FINGERPRINT_XOR) != bpf_ntohl(*(__u32 *)(f + 4)))
			return -1;
		if (check && !checksum_holds(pseudo_header_sum(h), h->udp, c.sum))
			return -1;
	}
	// What leaves the payload: the words before the data, and every byte
	// after it (padding, which may be anything, XOR-PEER-ADDRESS when it
	// comes last, FINGERPRINT).
	__u32 removed = 0;
	const __u16 *w = (const __u16 *)p;
#pragma unroll
	for (int i = 0; i < 12; i++) // the header and the first attribute's
		removed += w[i];
	if (start == INDICATION_HEADER) {
#pragma unroll
		for (int i = 12; i < INDICATION_HEADER / 2; i++)
			removed += w[i];
	}
	__u8 *t = p + start + d;
	__u32 after = len - start - d;
	for (__u32 i = 0; i < 3 + 12 + FINGERPRINT_ATTRIBUTE; i++) {
		if (i >= after)
			break;
		__u8 *b = t + i;
		same_register(b);
		if ((void *)b >= end)
			return -1;
		removed += byte_word(*b, start + d + i);
	}
	if (ours)
		return send_in_place(ctx, h, r, peer_ip, peer_port, start, d, after, removed, now);
	owe(r->relay_port, 0, d);
	struct headers n = *h;
	int shrink = start + after;
	readdress(&n, h, r->relay_ip, r->relay_port, peer_ip, peer_port, -shrink, 0, removed);
	if (!next_hop(ctx, &n, h, -shrink))
		return XDP_PASS;
	if (bpf_xdp_adjust_head(ctx, start))
		return XDP_PASS;
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	if (data + sizeof(n) > end)
		return XDP_DROP; // cannot happen: the message was longer
	__builtin_memcpy(data, &n, sizeof(n));
	// Trim what followed the data. Were that refused, the frame would
	// still be right: IP's length ends the datagram, the rest is padding.
	if (after)
		bpf_xdp_adjust_tail(ctx, -(int)after);
	return XDP_TX;
}

// The packet, relayed if it can be (XDP_TX; see `owe`), or XDP_PASS,
// untouched, for the sockets.
static __always_inline int relay(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	__u32 ifindex = ctx->ingress_ifindex;
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
	if (ifindex != LOOPBACK_IFINDEX && partial_checksum(h))
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
			learn(ifindex, copy.ip.saddr, &copy.eth);
			int verdict =
				relay_in_place(ctx, &copy, r, cd0, cd1, len - CHANNEL_HEADER, now);
			if (verdict >= 0)
				return verdict;
			return relay_to_peer(ctx, &copy, r, cd0, cd1, len - CHANNEL_HEADER);
		}
	}

	if (len >= INDICATION_HEADER && (void *)(p + 2) <= end && p[0] == 0x00 && p[1] == 0x16) {
		int verdict = relay_send(ctx, &copy, len, now, ifindex == LOOPBACK_IFINDEX);
		if (verdict >= 0) {
			// A valid Send on a live route, even one that goes to the
			// sockets for want of its next hop: a client that sends
			// nothing else (Firefox) must be learned from these, or
			// nothing relayed in place could ever reach it.
			learn(ifindex, copy.ip.saddr, &copy.eth);
			return verdict;
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
		learn(ifindex, copy.ip.saddr, &copy.eth);
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
		learn(ifindex, copy.ip.saddr, &copy.eth);
		return relay_as_indication(ctx, &copy, c, copy.ip.saddr, copy.udp.source, len, 0, 0, 0);
	}
	return XDP_PASS;
}

// IPv6. What differs from IPv4: the UDP checksum is not optional (a
// datagram without one is the stack's to drop), the IP header has none,
// addresses are four words, and loopback is ::1 alone.
struct headers6 {
	struct ethhdr eth;
	struct ipv6hdr ip;
	struct udphdr udp;
} __attribute__((packed));

// Where a Data indication's `len` bytes of data come from (`ip`:`port`),
// the header of `strip` bytes before them that goes (none, a channel
// header, a Send indication's), and the `after` bytes after them (none, or
// a Send indication's padding and attributes) of which the padding stays,
// zeroed; `removed` is the sum of the words that go or are zeroed.
struct data_from6 {
	struct ip6 ip;
	__u16 port;
	__u16 len;
	__u16 strip;
	__u16 after;
	__u32 removed;
};

// A Data indication from an IPv6 peer up to its data: as `struct
// indication`, with XOR-PEER-ADDRESS's 16-byte address XORed with the
// magic cookie and the transaction id (RFC 8489 section 14.2).
struct indication6 {
	__u16 type;
	__u16 length;
	__u32 cookie;
	__u32 tid[3];
	__u16 peer_type;
	__u16 peer_length;
	__u8 reserved;
	__u8 family;
	__u16 xport;
	__u32 xaddr[4];
	__u16 data_type;
	__u16 data_length;
} __attribute__((packed));

#define INDICATION6_HEADER 48

// What relay6 decided for the packet, for act6 to do.
enum action6 {
	TO_PEER6 = 1,	// ChannelData along `from`, to its peer
	TO_CLIENT6,	// a channel's peer's data along `to`, as ChannelData
	IN_PLACE6,	// ChannelData along `from`, to `to`'s client on its channel
	INDICATION6,	// `data` along `to`, as a Data indication
	SEND_TO_PEER6,	// a Send indication's `data` along `from`, to its peer
	SEND_IN_PLACE6,	// a Send indication's `data` to `to`'s client on its channel
};

// relay6's decision, and act6's workspace: per CPU rather than on the
// stack. What one packet leaves here the next finds: every decision sets
// all the fields its action reads. The two run one after the other from the program's entry, each
// with 512 bytes of stack; the IPv6 rewrites (four-word addresses, their
// checksum arithmetic) took more than a function that also looks routes
// up could spare. (Per CPU is safe as for `charges`: XDP runs with
// preemption off.)
struct scratch6 {
	struct headers6 h;	// as received
	struct headers6 n;	// as it leaves
	struct indication6 ind;
	struct to_peer6 from;	// copies of the routes: a worker may change
	struct to_client6 to;	// them while the packet is on its way
	struct data_from6 data;
	__u16 cd0, cd1;		// the channel header, as received
	__u16 len;		// the data's length (for decide_send6: the datagram's)
	__u16 action;		// enum action6
	__u32 partial;		// for decide_send6: whether its checksum is partial
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct scratch6);
} scratch6 SEC(".maps");

static __always_inline struct scratch6 *scratch6_here(void)
{
	__u32 zero = 0;
	return bpf_map_lookup_elem(&scratch6, &zero);
}

static __always_inline __u32 add_ip6(__u32 sum, const struct ip6 *a)
{
#pragma unroll
	for (int i = 0; i < 4; i++)
		sum = add32(sum, a->w[i]);
	return sum;
}

static __always_inline __u32 sub_ip6(__u32 sum, const struct ip6 *a)
{
#pragma unroll
	for (int i = 0; i < 4; i++)
		sum = sub32(sum, a->w[i]);
	return sum;
}

static __always_inline int same_ip6(const struct ip6 *a, const struct ip6 *b)
{
	return a->w[0] == b->w[0] && a->w[1] == b->w[1] && a->w[2] == b->w[2] &&
	       a->w[3] == b->w[3];
}

static __always_inline int zero_ip6(const struct ip6 *a)
{
	return !(a->w[0] | a->w[1] | a->w[2] | a->w[3]);
}

static __always_inline int loopback_ip6(const struct ip6 *a)
{
	return !(a->w[0] | a->w[1] | a->w[2]) && a->w[3] == bpf_htonl(1);
}

static __always_inline void source6(struct ip6 *a, const struct headers6 *h)
{
	__builtin_memcpy(a, &h->ip.saddr, sizeof(*a));
}

static __always_inline void destination6(struct ip6 *a, const struct headers6 *h)
{
	__builtin_memcpy(a, &h->ip.daddr, sizeof(*a));
}

// As pseudo_header_sum, for IPv6's pseudo-header (its 32-bit length sums
// as the 16-bit one).
static __always_inline __u32 pseudo_header_sum6(const struct headers6 *h)
{
	struct ip6 s, d;
	source6(&s, h);
	destination6(&d, h);
	__u32 sum = add_ip6(add_ip6(0, &s), &d);
	sum = add16(sum, bpf_htons(IPPROTO_UDP));
	return add16(sum, h->udp.len);
}

// As partial_checksum.
static __always_inline int partial_checksum6(const struct headers6 *h)
{
	return h->udp.check == fold(pseudo_header_sum6(h));
}

// As readdress. The flow label goes: it named the sender's flow, not this
// one (zero: none).
static __always_inline void readdress6(struct headers6 *n, const struct headers6 *h,
				       const struct ip6 *saddr, __u16 sport,
				       const struct ip6 *daddr, __u16 dport, int grow,
				       __u32 added, __u32 removed)
{
	__u16 ulen = bpf_htons(bpf_ntohs(h->udp.len) + grow);
	struct ip6 was_s, was_d;
	source6(&was_s, h);
	destination6(&was_d, h);

	n->ip.payload_len = ulen;
	n->ip.hop_limit = 64;
	n->ip.flow_lbl[0] &= 0xf0; // the low half is the traffic class's
	n->ip.flow_lbl[1] = 0;
	n->ip.flow_lbl[2] = 0;
	__builtin_memcpy(&n->ip.saddr, saddr, sizeof(*saddr));
	__builtin_memcpy(&n->ip.daddr, daddr, sizeof(*daddr));
	n->udp.source = sport;
	n->udp.dest = dport;
	n->udp.len = ulen;

	__u32 sum = (__u16)~h->udp.check;
	sum = sub_ip6(sum, &was_s);
	sum = sub_ip6(sum, &was_d);
	sum = add_ip6(sum, saddr);
	sum = add_ip6(sum, daddr);
	sum = sub16(sum, h->udp.source);
	sum = sub16(sum, h->udp.dest);
	sum = add16(sum, sport);
	sum = add16(sum, dport);
	sum = sub16(sum, h->udp.len);
	sum = sub16(sum, h->udp.len);
	sum = add16(sum, ulen);
	sum = add16(sum, ulen);
	sum = add16(sum, fold(added));
	sum = sub16(sum, fold(removed));
	__u16 check = ~fold(sum);
	n->udp.check = check ? check : 0xffff;
}

// As learn.
static __always_inline void learn6(__u32 ifindex, const struct ip6 *ip, const struct ethhdr *eth)
{
	if (ifindex == LOOPBACK_IFINDEX && loopback_ip6(ip))
		return;
	struct mac *known = bpf_map_lookup_elem(&hop_macs6, ip);
	if (known && known->ifindex == ifindex && same_mac(known->addr, eth->h_source))
		return;
	struct mac m = { .ifindex = ifindex };
	__builtin_memcpy(m.addr, eth->h_source, ETH_ALEN);
	bpf_map_update_elem(&hop_macs6, ip, &m, BPF_ANY);
}

// As next_hop.
static __always_inline int next_hop6(struct xdp_md *ctx, struct headers6 *n,
				     const struct headers6 *h, int grow)
{
	struct ip6 dst;
	destination6(&dst, n);
	__u32 ifindex = ctx->ingress_ifindex;
	if (ifindex == LOOPBACK_IFINDEX && loopback_ip6(&dst))
		return 1;
	struct mac *to = bpf_map_lookup_elem(&hop_macs6, &dst);
	if (!to || to->ifindex != ifindex)
		return 0;
	if (ifindex == LOOPBACK_IFINDEX)
		return 1;
	__u32 mtu = 0;
	if (grow > 0 && bpf_check_mtu(ctx, 0, &mtu, grow, 0) != BPF_MTU_CHK_RET_SUCCESS)
		return 0;
	__builtin_memcpy(n->eth.h_source, h->eth.h_dest, ETH_ALEN);
	__builtin_memcpy(n->eth.h_dest, to->addr, ETH_ALEN);
	return 1;
}

// Writes `n`, and after it `channel` (if not zero) and `length`, at the
// front of the packet once its head has moved by `shift` bytes.
static __always_inline int put6(struct xdp_md *ctx, const struct headers6 *n, int shift,
				__u16 channel, __u16 length)
{
	if (shift && bpf_xdp_adjust_head(ctx, shift))
		return XDP_PASS;
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	if (data + sizeof(*n) + (channel ? CHANNEL_HEADER : 0) > end)
		return XDP_DROP; // cannot happen: the packet was, or grew, this long
	__builtin_memcpy(data, n, sizeof(*n));
	if (channel) {
		__u16 *cd = data + sizeof(*n);
		cd[0] = channel;
		cd[1] = length;
	}
	return XDP_TX;
}

// Rewrites the packet as relay6 decided (see `struct scratch6`): XDP_TX
// (see `owe`), or XDP_PASS if it cannot leave after all (no next hop yet,
// no room), untouched but for the tail a Data indication may have grown.
static __noinline int act6(struct xdp_md *ctx)
{
	struct scratch6 *sc = scratch6_here();
	if (!sc)
		return XDP_PASS;
	const struct headers6 *h = &sc->h;
	struct headers6 *n = &sc->n;
	const struct to_peer6 *r = &sc->from;
	const struct to_client6 *c = &sc->to;
	__u16 cd0 = sc->cd0, cd1 = sc->cd1, len = sc->len;
	*n = *h;
	switch (sc->action) {
	case TO_PEER6: // as relay_to_peer
		owe_at(IPV6_BUDGETS, r->relay_port, 0, len);
		readdress6(n, h, &r->relay_ip, r->relay_port, &r->peer_ip, r->peer_port,
			   -CHANNEL_HEADER, 0, (__u32)cd0 + cd1);
		if (!next_hop6(ctx, n, h, -CHANNEL_HEADER))
			return XDP_PASS;
		return put6(ctx, n, CHANNEL_HEADER, 0, 0);
	case TO_CLIENT6: // as relay_to_client
		if (len > 0xffff - CHANNEL_HEADER - sizeof(struct udphdr))
			return XDP_PASS;
		cd0 = c->channel;
		cd1 = bpf_htons(len);
		owe_at(IPV6_BUDGETS, 0, c->relay_port, len);
		readdress6(n, h, &c->server_ip, c->server_port, &c->client_ip, c->client_port,
			   CHANNEL_HEADER, (__u32)cd0 + cd1, 0);
		if (!next_hop6(ctx, n, h, CHANNEL_HEADER))
			return XDP_PASS;
		return put6(ctx, n, -CHANNEL_HEADER, cd0, cd1);
	case IN_PLACE6: // as relay_in_place, on the receiver's channel
		owe_at(IPV6_BUDGETS, r->relay_port, c->relay_port, len);
		readdress6(n, h, &c->server_ip, c->server_port, &c->client_ip, c->client_port, 0,
			   c->channel, cd0);
		if (!next_hop6(ctx, n, h, 0))
			return XDP_PASS;
		return put6(ctx, n, 0, c->channel, cd1);
	case SEND_TO_PEER6: { // as relay_send, to a peer elsewhere
		const struct data_from6 *d = &sc->data;
		int shrink = d->strip + d->after;
		owe_at(IPV6_BUDGETS, r->relay_port, 0, d->len);
		readdress6(n, h, &r->relay_ip, r->relay_port, &r->peer_ip, r->peer_port, -shrink,
			   0, d->removed);
		if (!next_hop6(ctx, n, h, -shrink))
			return XDP_PASS;
		int verdict = put6(ctx, n, d->strip, 0, 0);
		// Were this refused, the frame would still be right: IP's length
		// ends the datagram, the rest is padding.
		if (verdict == XDP_TX && d->after)
			bpf_xdp_adjust_tail(ctx, -(int)d->after);
		return verdict;
	}
	case SEND_IN_PLACE6: { // as send_in_place, on the receiver's channel
		const struct data_from6 *d = &sc->data;
		__u16 length = bpf_htons(d->len);
		int grow = CHANNEL_HEADER - (int)d->strip - (int)d->after;
		owe_at(IPV6_BUDGETS, r->relay_port, c->relay_port, d->len);
		readdress6(n, h, &c->server_ip, c->server_port, &c->client_ip, c->client_port, grow,
			   (__u32)c->channel + length, d->removed);
		if (!next_hop6(ctx, n, h, grow))
			return XDP_PASS;
		int verdict = put6(ctx, n, (int)d->strip - CHANNEL_HEADER, c->channel, length);
		if (verdict == XDP_TX && d->after)
			bpf_xdp_adjust_tail(ctx, -(int)d->after);
		return verdict;
	}
	case INDICATION6:
		break;
	default:
		return XDP_PASS;
	}
	// As relay_as_indication.
	const struct data_from6 *from = &sc->data;
	len = from->len;
	int strip = from->strip;
	int after = from->after;
	int pad = (4 - (len & 3)) & 3;
	int grow = INDICATION6_HEADER - strip + pad - after;
	if (len > 0xffff - INDICATION6_HEADER - pad - sizeof(struct udphdr))
		return XDP_PASS;
	struct indication6 *ind = &sc->ind;
	ind->type = bpf_htons(0x0017); // Data, an indication
	ind->length = bpf_htons(24 + 4 + len + pad);
	ind->cookie = bpf_htonl(MAGIC_COOKIE);
	ind->tid[0] = bpf_get_prandom_u32();
	ind->tid[1] = bpf_get_prandom_u32();
	ind->tid[2] = bpf_get_prandom_u32();
	ind->peer_type = bpf_htons(0x0012); // XOR-PEER-ADDRESS
	ind->peer_length = bpf_htons(20);
	ind->reserved = 0;
	ind->family = 2; // IPv6
	ind->xport = from->port ^ bpf_htons(MAGIC_COOKIE >> 16);
	ind->xaddr[0] = from->ip.w[0] ^ bpf_htonl(MAGIC_COOKIE);
	ind->xaddr[1] = from->ip.w[1] ^ ind->tid[0];
	ind->xaddr[2] = from->ip.w[2] ^ ind->tid[1];
	ind->xaddr[3] = from->ip.w[3] ^ ind->tid[2];
	ind->data_type = bpf_htons(0x0013); // DATA
	ind->data_length = bpf_htons(len);
	__u32 added = 0;
	const __u16 *w = (const __u16 *)ind;
#pragma unroll
	for (int i = 0; i < INDICATION6_HEADER / 2; i++)
		added += w[i];
	// In place, its channel header stripped: it left an allocation too.
	owe_at(IPV6_BUDGETS, strip ? from->port : 0, c->relay_port, len);
	readdress6(n, h, &c->server_ip, c->server_port, &c->client_ip, c->client_port, grow,
		   added, from->removed);
	if (!next_hop6(ctx, n, h, grow))
		return XDP_PASS;
	// The kernel zeroes what the tail grows by: that is the padding.
	int tail = pad - after;
	if (tail > 0 && bpf_xdp_adjust_tail(ctx, tail))
		return XDP_PASS;
	if (bpf_xdp_adjust_head(ctx, -(INDICATION6_HEADER - strip))) {
		if (tail > 0)
			bpf_xdp_adjust_tail(ctx, -tail);
		return XDP_PASS;
	}
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	if (data + sizeof(*n) + sizeof(*ind) > end)
		return XDP_DROP; // cannot happen: the packet grew
	__builtin_memcpy(data, n, sizeof(*n));
	__builtin_memcpy(data + sizeof(*n), ind, sizeof(*ind));
	if (after) {
		// A Send indication's padding stays where it was, zeroed.
		__u8 *z = data + sizeof(*n) + sizeof(*ind) + (len & 0x7ff);
		for (int i = 0; i < 3; i++) {
			if (i >= pad)
				break;
			__u8 *b = z + i;
			same_register(b);
			if ((void *)(b + 1) > end)
				return XDP_DROP; // cannot happen: the padding was there
			*b = 0;
		}
	}
	// Were this refused, the frame would still be right: IP's length ends
	// the datagram, the rest is padding.
	if (tail < 0)
		bpf_xdp_adjust_tail(ctx, tail);
	return XDP_TX;
}

// relay6's answers when act6 is to relay the packet, and when
// decide_send6 is to look at it first.
#define ACT6 -1
#define SEND6 -2

// Hands the packet with headers `h` to act6, to do `action`. The headers
// are copied only here, for packets that are to be relayed.
static __always_inline int decided6(struct scratch6 *sc, const struct headers6 *h,
				    enum action6 action)
{
	sc->h = *h;
	sc->action = action;
	return ACT6;
}

// What relay6 hands on (SEND6) for a datagram that looks like a Send
// indication: ACT6, decided, for one from a client as relay_send takes them
// (XOR-PEER-ADDRESS of 20 bytes, IPv6): to the peer, or in place to
// another of our allocations' client, on its channel or as a Data
// indication; XDP_PASS for anything else. On loopback with a partial
// checksum, only what keeps the headers where they are or moves them down
// (see relay6). Called from the program's entry, not from relay6: the
// two, and the bpf_loop callback, would not fit one stack.
static __noinline int decide_send6(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct headers6 *h = data;
	if ((void *)(h + 1) > end)
		return XDP_PASS;
	struct scratch6 *sc = scratch6_here();
	if (!sc)
		return XDP_PASS;
	// As relay6 found them.
	__u32 len = sc->len;
	int partial = sc->partial;
	__u8 *p = data + sizeof(*h);
	if ((void *)(p + INDICATION6_HEADER) > end || len < INDICATION6_HEADER ||
	    len > INDICATION6_HEADER + MAX_SEND_DATA + 3 + FINGERPRINT_ATTRIBUTE)
		return XDP_PASS;
	if (p[0] != 0x00 || p[1] != 0x16 || *(__u32 *)(p + 4) != bpf_htonl(MAGIC_COOKIE))
		return XDP_PASS;
	if (bpf_ntohs(*(__u16 *)(p + 2)) + 20 != len)
		return XDP_PASS;
	__u32 body = len;
	__u32 at = len - FINGERPRINT_ATTRIBUTE;
	same_register(at);
	if (at > INDICATION6_HEADER + MAX_SEND_DATA + 3)
		return XDP_PASS;
	__u8 *f = p + at;
	same_register(f);
	if ((void *)(f + FINGERPRINT_ATTRIBUTE) > end)
		return XDP_PASS;
	int fingerprint = *(__u16 *)f == bpf_htons(0x8028) && *(__u16 *)(f + 2) == bpf_htons(4);
	if (fingerprint)
		body = len - FINGERPRINT_ATTRIBUTE;
	__u32 start, d, xpa;
	if (*(__u16 *)(p + 20) == bpf_htons(0x0012)) {
		if (*(__u16 *)(p + 44) != bpf_htons(0x0013))
			return XDP_PASS;
		start = INDICATION6_HEADER;
		d = bpf_ntohs(*(__u16 *)(p + 46));
		xpa = 20;
	} else if (*(__u16 *)(p + 20) == bpf_htons(0x0013)) {
		start = 24;
		d = bpf_ntohs(*(__u16 *)(p + 22));
		xpa = start + d + ((4 - (d & 3)) & 3);
	} else {
		return XDP_PASS;
	}
	__u32 pad = (4 - (d & 3)) & 3;
	if (d > MAX_SEND_DATA || body != 20 + 24 + 4 + d + pad)
		return XDP_PASS;
	if (xpa > 24 + MAX_SEND_DATA + 3)
		return XDP_PASS;
	__u8 *x = p + xpa;
	same_register(x);
	if ((void *)(x + 24) > end)
		return XDP_PASS;
	if (*(__u16 *)x != bpf_htons(0x0012) || *(__u16 *)(x + 2) != bpf_htons(20) || x[5] != 2)
		return XDP_PASS;
	struct send_key6 k;
	source6(&k.client_ip, h);
	destination6(&k.server_ip, h);
	k.client_port = h->udp.source;
	k.server_port = h->udp.dest;
	// XOR-PEER-ADDRESS: XORed with the cookie and the transaction id.
	k.peer_ip.w[0] = *(__u32 *)(x + 8) ^ bpf_htonl(MAGIC_COOKIE);
	k.peer_ip.w[1] = *(__u32 *)(x + 12) ^ *(__u32 *)(p + 8);
	k.peer_ip.w[2] = *(__u32 *)(x + 16) ^ *(__u32 *)(p + 12);
	k.peer_ip.w[3] = *(__u32 *)(x + 20) ^ *(__u32 *)(p + 16);
	__u16 peer_port = *(__u16 *)(x + 6) ^ bpf_htons(MAGIC_COOKIE >> 16);
	__u64 now = bpf_ktime_get_ns();
	struct to_peer6 *r = bpf_map_lookup_elem(&send_routes6, &k);
	if (!r || r->expires_ns <= now)
		return XDP_PASS;
	// FINGERPRINT and the UDP checksum (always there over IPv6), as
	// relay_send checks them; not a partial checksum of loopback's.
	if (fingerprint || !partial) {
		struct message_pass c = {
			.p = p, .end = end, .len = len, .crc_len = fingerprint ? body : 0, .crc = 0xffffffff,
		};
		if (bpf_loop((len + 15) / 16, message_step, &c, 0) < 0 || c.bad)
			return XDP_PASS;
		if (fingerprint &&
		    (c.crc ^ 0xffffffff ^ FINGERPRINT_XOR) != bpf_ntohl(*(__u32 *)(f + 4)))
			return XDP_PASS;
		if (!partial && !checksum_holds(pseudo_header_sum6(h), h->udp, c.sum))
			return XDP_PASS;
	}
	// A valid Send on a live route: its sender is learned even if the
	// sockets take it (a client that sends nothing else must be).
	learn6(ctx->ingress_ifindex, &k.client_ip, &h->eth);
	// What leaves the payload: the words before the data, and every byte
	// after it.
	__u32 removed = 0;
	const __u16 *w = (const __u16 *)p;
#pragma unroll
	for (int i = 0; i < 12; i++) // the header and the first attribute's
		removed += w[i];
	if (start == INDICATION6_HEADER) {
#pragma unroll
		for (int i = 12; i < INDICATION6_HEADER / 2; i++)
			removed += w[i];
	}
	__u8 *t = p + start + d;
	__u32 after = len - start - d;
	for (__u32 i = 0; i < 3 + 24 + FINGERPRINT_ATTRIBUTE; i++) {
		if (i >= after)
			break;
		__u8 *b = t + i;
		same_register(b);
		if ((void *)b >= end)
			return XDP_PASS;
		removed += byte_word(*b, start + d + i);
	}
	sc->from = *r;
	sc->from.peer_ip = k.peer_ip;
	sc->from.peer_port = peer_port;
	sc->data.ip = r->relay_ip;
	sc->data.port = r->relay_port;
	sc->data.len = d;
	sc->data.strip = start;
	sc->data.after = after;
	sc->data.removed = removed;
	__u32 zero = 0;
	struct settings *a = bpf_map_lookup_elem(&settings, &zero);
	if (!a)
		return XDP_PASS;
	int ours = same_ip6(&k.peer_ip, &a->relay_ip6) ||
		   (!zero_ip6(&a->external_ip6) && same_ip6(&k.peer_ip, &a->external_ip6));
	if (!ours) {
		if (partial)
			return XDP_PASS;
		return decided6(sc, h, SEND_TO_PEER6);
	}
	// To another of our allocations, along its route for data from the
	// sender's relayed address (known by the external address, if any).
	struct peer_key6 pk = {
		.peer_ip = r->relay_ip,
		.relay_ip = k.peer_ip,
		.peer_port = r->relay_port,
		.relay_port = peer_port,
	};
	if (!zero_ip6(&a->external_ip6)) {
		if (same_ip6(&pk.peer_ip, &a->relay_ip6))
			pk.peer_ip = a->external_ip6;
		if (same_ip6(&pk.relay_ip, &a->external_ip6))
			pk.relay_ip = a->relay_ip6;
	}
	sc->data.ip = pk.peer_ip;
	struct to_client6 *c = bpf_map_lookup_elem(&peer_routes6, &pk);
	if (c && c->expires_ns > now) {
		if (partial)
			return XDP_PASS;
		sc->to = *c;
		return decided6(sc, h, SEND_IN_PLACE6);
	}
	struct permission_key6 ik = {
		.peer_ip = pk.peer_ip,
		.relay_ip = pk.relay_ip,
		.relay_port = pk.relay_port,
	};
	c = bpf_map_lookup_elem(&permission_routes6, &ik);
	if (!c || c->expires_ns <= now)
		return XDP_PASS; // only the server knows which of its ports are live relays
	sc->to = *c;
	return decided6(sc, h, INDICATION6);
}

// Decides what becomes of an IPv6 packet: XDP_PASS, untouched, for the
// sockets, or ACT6, with the decision in `struct scratch6`: ChannelData on
// a channel route (to its peer, or in place to another of our
// allocations' clients, on their channel or as a Data indication), data
// from a channel's peer, and data from a permitted peer without a channel.
// Not a datagram with a partial checksum (on loopback) toward a peer:
// IPv6 takes the headers it pulls off out of such a datagram's checksum,
// and once those reach past where the checksum was to start (as there,
// where the headers move up over the channel header), it checks the whole
// checksum, which the partial one is not. (IPv4 does not; nor does IPv6
// where the headers stay or move down: there nobody checks it.)
static __noinline int relay6(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	__u32 ifindex = ctx->ingress_ifindex;
	struct headers6 *h = data;

	if ((void *)(h + 1) > end)
		return XDP_PASS;
	// No extension headers (nor fragments, which come with one).
	if (h->eth.h_proto != bpf_htons(ETH_P_IPV6) || h->ip.version != 6 ||
	    h->ip.nexthdr != IPPROTO_UDP)
		return XDP_PASS;
	__u16 ulen = bpf_ntohs(h->udp.len);
	if (ulen < sizeof(struct udphdr) || bpf_ntohs(h->ip.payload_len) != ulen)
		return XDP_PASS;
	__u16 len = ulen - sizeof(struct udphdr);
	if (data + sizeof(*h) + len > end)
		return XDP_PASS;
	if (!h->udp.check)
		return XDP_PASS;
	int partial = partial_checksum6(h);
	if (ifindex != LOOPBACK_IFINDEX && partial)
		return XDP_PASS;
	struct scratch6 *sc = scratch6_here();
	if (!sc)
		return XDP_PASS;
	struct ip6 src, dst;
	source6(&src, h);
	destination6(&dst, h);
	__u16 sport = h->udp.source, dport = h->udp.dest;
	__u64 now = bpf_ktime_get_ns();

	__u8 *p = data + sizeof(*h);
	if (len >= CHANNEL_HEADER && (void *)(p + CHANNEL_HEADER) <= end &&
	    (p[0] & 0xc0) == 0x40) {
		__u16 cd0 = *(__u16 *)p;
		__u16 cd1 = *(__u16 *)(p + 2);
		struct client_key6 k = {
			.client_ip = src,
			.server_ip = dst,
			.client_port = sport,
			.server_port = dport,
			.channel = cd0,
		};
		struct to_peer6 *r = bpf_map_lookup_elem(&client_routes6, &k);
		if (r) {
			if (bpf_ntohs(cd1) + CHANNEL_HEADER != len || r->expires_ns <= now)
				return XDP_PASS;
			learn6(ifindex, &src, &h->eth);
			sc->from = *r;
			sc->cd0 = cd0;
			sc->cd1 = cd1;
			sc->len = len - CHANNEL_HEADER;
			// To another of our allocations? Along its route for data
			// from the sender's relayed address, as relay_in_place.
			struct peer_key6 pk = {
				.peer_ip = r->relay_ip,
				.relay_ip = r->peer_ip,
				.peer_port = r->relay_port,
				.relay_port = r->peer_port,
			};
			__u32 zero = 0;
			struct settings *a = bpf_map_lookup_elem(&settings, &zero);
			if (a && !zero_ip6(&a->external_ip6)) {
				if (same_ip6(&pk.peer_ip, &a->relay_ip6))
					pk.peer_ip = a->external_ip6;
				if (same_ip6(&pk.relay_ip, &a->external_ip6))
					pk.relay_ip = a->relay_ip6;
			}
			struct to_client6 *c = bpf_map_lookup_elem(&peer_routes6, &pk);
			if (c && c->expires_ns > now) {
				sc->to = *c;
				return decided6(sc, h, IN_PLACE6);
			}
			struct permission_key6 ik = {
				.peer_ip = pk.peer_ip,
				.relay_ip = pk.relay_ip,
				.relay_port = pk.relay_port,
			};
			c = bpf_map_lookup_elem(&permission_routes6, &ik);
			if (c && c->expires_ns > now) {
				sc->to = *c;
				sc->data.ip = pk.peer_ip;
				sc->data.port = pk.peer_port;
				sc->data.len = len - CHANNEL_HEADER;
				sc->data.strip = CHANNEL_HEADER;
				sc->data.after = 0;
				sc->data.removed = (__u32)cd0 + cd1;
				return decided6(sc, h, INDICATION6);
			}
			if (partial)
				return XDP_PASS;
			return decided6(sc, h, TO_PEER6);
		}
	}

	struct peer_key6 pk = {
		.peer_ip = src,
		.relay_ip = dst,
		.peer_port = sport,
		.relay_port = dport,
	};
	struct to_client6 *c = bpf_map_lookup_elem(&peer_routes6, &pk);
	if (c && c->expires_ns > now) {
		learn6(ifindex, &src, &h->eth);
		sc->to = *c;
		sc->len = len;
		return decided6(sc, h, TO_CLIENT6);
	}
	// No live channel (an expired one means the channel, the permission
	// or the allocation ended; the permission route says which).
	struct permission_key6 ik = {
		.peer_ip = src,
		.relay_ip = dst,
		.relay_port = dport,
	};
	c = bpf_map_lookup_elem(&permission_routes6, &ik);
	if (c && c->expires_ns > now) {
		learn6(ifindex, &src, &h->eth);
		sc->to = *c;
		sc->data.ip = src;
		sc->data.port = sport;
		sc->data.len = len;
		sc->data.strip = 0;
		sc->data.after = 0;
		sc->data.removed = 0;
		return decided6(sc, h, INDICATION6);
	}
	// A Send indication, perhaps (a peer's datagram to a relay port would
	// have matched above): decide_send6's.
	if (len >= INDICATION6_HEADER && (void *)(p + 2) <= end && p[0] == 0x00 && p[1] == 0x16) {
		sc->len = len;
		sc->partial = partial;
		return SEND6;
	}
	return XDP_PASS;
}

// IPv4 (and whatever is neither): a function of its own, with its own
// stack, as are relay6 and relayed: the verifier counts the deepest chain
// of frames against its 512 bytes (relay4's, with the bpf_loop callback
// of relay_send, is most of them), not the sum over both families.
static __noinline int relay4(struct xdp_md *ctx)
{
	return relay(ctx);
}

SEC("xdp")
int callisto_turn_relay(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > end)
		return XDP_PASS;
	int verdict = eth->h_proto == bpf_htons(ETH_P_IPV6) ? relay6(ctx) : relay4(ctx);
	if (verdict == SEND6)
		verdict = decide_send6(ctx);
	if (verdict == ACT6)
		verdict = act6(ctx);
	// Charged in one place: its code, and the verifier's walk over it, once.
	if (verdict != XDP_TX)
		return verdict;
	return relayed();
}
