//! A TURN client as a sans-IO state machine: allocate (answering the 401
//! and 438 challenges), create permissions, bind channels, refresh before
//! things expire, send and receive relayed data. Used by the tests now and
//! by the native peer later.
//!
//! Feed it datagrams from the server with [`Client::handle_input`], call
//! [`Client::handle_timeout`] at [`Client::poll_timeout`], and send what
//! [`Client::poll_transmit`] returns to the server.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use crate::auth::long_term_key;
use crate::stun::{self, ChannelData, Class, Message, MessageBuilder, attr, method};

/// Something the application should know about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Allocated {
        relayed: SocketAddr,
        mapped: SocketAddr,
        lifetime: Duration,
    },
    /// After `Allocated`, for [`Client::allocate_dual`]: the IPv6 relay
    /// of the dual allocation, or the code of the ADDRESS-ERROR-CODE that
    /// says why there is none (RFC 8656 §7.2); `None` when the server said
    /// nothing of it (it ignored ADDITIONAL-ADDRESS-FAMILY).
    Ipv6Relay(Result<SocketAddr, Option<u16>>),
    PermissionCreated(IpAddr),
    ChannelBound {
        peer: SocketAddr,
        channel: u16,
    },
    Refreshed {
        lifetime: Duration,
    },
    /// Data from a peer, by Data indication or ChannelData.
    Data {
        peer: SocketAddr,
        data: Vec<u8>,
    },
    /// An ICMP error that data sent toward `peer` met past the server
    /// (RFC 8656 §11.5); the port is 0 when the server did not know it.
    Icmp {
        peer: SocketAddr,
        icmp: stun::Icmp,
    },
    /// The server sent this Allocate to another server (300 Try
    /// Alternate, RFC 8489 §10): allocate there instead, over the same
    /// transport and with the same credentials. Once the client has
    /// authenticated, only a signed redirection is believed; an unsigned
    /// one is `Failed`.
    Redirected {
        alternate: SocketAddr,
    },
    /// A request failed for good (error response or no answer).
    Failed {
        method: u16,
        code: u16,
        reason: String,
    },
}

#[derive(Debug, Clone)]
struct Pending {
    method: u16,
    request: Vec<u8>,
    /// How to rebuild the request after a challenge.
    kind: Request,
    sent: Instant,
    rto: Duration,
    tries: u32,
    authed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Request {
    /// `dual`: with ADDITIONAL-ADDRESS-FAMILY, for an IPv6 relay as well;
    /// `ipv6`: with REQUESTED-ADDRESS-FAMILY, for an IPv6 relay alone.
    Allocate {
        dual: bool,
        ipv6: bool,
    },
    Refresh(u32),
    /// For the peer's IP; its port goes into the request (0: none given).
    Permission(SocketAddr),
    Channel(SocketAddr, u16),
}

/// The TURN client.
pub struct Client {
    username: String,
    password: String,
    realm: Option<String>,
    nonce: Option<String>,
    key: Option<Vec<u8>>,
    reliable: bool,
    pending: HashMap<[u8; 12], Pending>,
    transmits: VecDeque<Vec<u8>>,
    events: VecDeque<Event>,
    relayed: Option<SocketAddr>,
    expires: Option<Instant>,
    /// By IP: the address the request named (renewals name it again),
    /// and when the permission ends.
    permissions: HashMap<IpAddr, (SocketAddr, Instant)>,
    channels: HashMap<SocketAddr, (u16, Instant)>,
    next_channel: u16,
    tid_counter: u64,
    tid_seed: u64,
    /// Allocate requests and Send indications carry DONT-FRAGMENT.
    dont_fragment: bool,
}

const RTO: Duration = Duration::from_millis(500);
const MAX_TRIES: u32 = 7;

impl Client {
    /// `reliable` is true over TCP/TLS, where requests are not retransmitted.
    pub fn new(username: &str, password: &str, reliable: bool, seed: u64) -> Self {
        Client {
            username: username.to_owned(),
            password: password.to_owned(),
            realm: None,
            nonce: None,
            key: None,
            reliable,
            pending: HashMap::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            relayed: None,
            expires: None,
            permissions: HashMap::new(),
            channels: HashMap::new(),
            next_channel: stun::CHANNEL_MIN,
            tid_counter: 0,
            tid_seed: seed,
            dont_fragment: false,
        }
    }

    /// Asks that what the relay sends to peers never be fragmented
    /// (DONT-FRAGMENT in Allocate requests and Send indications, RFC 8656
    /// §7.1, §11.1): a datagram too big for the path is dropped, and
    /// [`Event::Icmp`] says which MTU it met.
    pub fn set_dont_fragment(&mut self, on: bool) {
        self.dont_fragment = on;
    }

    pub fn relayed_address(&self) -> Option<SocketAddr> {
        self.relayed
    }

    pub fn allocate(&mut self, now: Instant) {
        self.request(
            now,
            Request::Allocate {
                dual: false,
                ipv6: false,
            },
        );
    }

    /// Allocates an IPv6 relay (REQUESTED-ADDRESS-FAMILY, RFC 8656 §7.1);
    /// without it a server relays on IPv4, whatever the client's family.
    pub fn allocate_ipv6(&mut self, now: Instant) {
        self.request(
            now,
            Request::Allocate {
                dual: false,
                ipv6: true,
            },
        );
    }

    /// Allocates an IPv4 relay and an IPv6 one at once (a dual
    /// allocation): [`Event::Allocated`] for the first, then
    /// [`Event::Ipv6Relay`].
    pub fn allocate_dual(&mut self, now: Instant) {
        self.request(
            now,
            Request::Allocate {
                dual: true,
                ipv6: false,
            },
        );
    }

    /// Refreshes the allocation; `0` deletes it.
    pub fn refresh(&mut self, now: Instant, lifetime_secs: u32) {
        self.request(now, Request::Refresh(lifetime_secs));
    }

    pub fn create_permission(&mut self, now: Instant, peer: IpAddr) {
        self.request(now, Request::Permission(SocketAddr::new(peer, 0)));
    }

    /// [`Client::create_permission`] for `peer`'s IP, naming its port in
    /// the request as browsers do (the port means nothing to the
    /// permission, but some servers, turn-rs among them, refuse a
    /// permission for port 0 of one of their own relayed addresses).
    pub fn create_permission_for(&mut self, now: Instant, peer: SocketAddr) {
        self.request(now, Request::Permission(peer));
    }

    /// Binds the next free channel to `peer`; returns its number.
    pub fn bind_channel(&mut self, now: Instant, peer: SocketAddr) -> u16 {
        let channel = match self.channels.get(&peer) {
            Some((c, _)) => *c,
            None => {
                let c = self.next_channel;
                self.next_channel = if c == stun::CHANNEL_MAX_RFC8656 {
                    stun::CHANNEL_MIN
                } else {
                    c + 1
                };
                c
            }
        };
        self.request(now, Request::Channel(peer, channel));
        channel
    }

    /// Asks for a specific channel number (any value, even an invalid
    /// one: servers must refuse those, and tests check that they do).
    pub fn bind_channel_number(&mut self, now: Instant, peer: SocketAddr, channel: u16) {
        self.request(now, Request::Channel(peer, channel));
    }

    /// Frames `data` for `peer`: ChannelData if a channel is bound, else a
    /// Send indication. The caller sends the result to the server.
    pub fn send_to(&self, peer: SocketAddr, data: &[u8]) -> Vec<u8> {
        if let Some((channel, _)) = self.channels.get(&peer) {
            let mut out = ChannelData::header(*channel, data.len() as u16).to_vec();
            out.extend_from_slice(data);
            if self.reliable {
                out.resize(out.len().next_multiple_of(4), 0);
            }
            return out;
        }
        let tid = self.peek_tid();
        let mut b = MessageBuilder::new(method::SEND, Class::Indication, &tid);
        b.xor_address(attr::XOR_PEER_ADDRESS, peer)
            .attr(attr::DATA, data);
        if self.dont_fragment {
            b.attr(attr::DONT_FRAGMENT, &[]);
        }
        b.finish()
    }

    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.transmits.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The next retransmission or refresh.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let retransmit = self
            .pending
            .values()
            .filter(|_| !self.reliable)
            .map(|p| p.sent + p.rto);
        let early = |e: Instant| e.checked_sub(Duration::from_secs(60)).unwrap_or(e);
        let refresh = self.expires.map(early);
        let perms = self.permissions.values().map(|(_, e)| early(*e));
        let chans = self.channels.values().map(|(_, e)| early(*e));
        retransmit.chain(refresh).chain(perms).chain(chans).min()
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if !self.reliable {
            let due: Vec<[u8; 12]> = self
                .pending
                .iter()
                .filter(|(_, p)| p.sent + p.rto <= now)
                .map(|(t, _)| *t)
                .collect();
            for tid in due {
                let Some(p) = self.pending.get_mut(&tid) else {
                    continue;
                };
                if p.tries >= MAX_TRIES {
                    let method = p.method;
                    self.pending.remove(&tid);
                    self.events.push_back(Event::Failed {
                        method,
                        code: 0,
                        reason: "no answer from the server".into(),
                    });
                } else {
                    p.tries += 1;
                    p.sent = now;
                    p.rto *= 2;
                    self.transmits.push_back(p.request.clone());
                }
            }
        }
        let margin = Duration::from_secs(60);
        if self.expires.is_some_and(|e| e <= now + margin)
            && !self.has_pending(|r| matches!(r, Request::Refresh(_)))
        {
            self.expires = None;
            self.refresh(now, 600);
        }
        let perms: Vec<SocketAddr> = self
            .permissions
            .values()
            .filter(|(_, e)| *e <= now + margin)
            .map(|(named, _)| *named)
            .collect();
        for named in perms {
            self.permissions.remove(&named.ip());
            self.create_permission_for(now, named);
        }
        let chans: Vec<(SocketAddr, u16)> = self
            .channels
            .iter()
            .filter(|(_, (_, e))| *e <= now + margin)
            .map(|(p, (c, _))| (*p, *c))
            .collect();
        for (peer, channel) in chans {
            if let Some(entry) = self.channels.get_mut(&peer) {
                entry.1 = now + Duration::from_secs(600);
            }
            self.request(now, Request::Channel(peer, channel));
        }
    }

    fn has_pending(&self, f: impl Fn(&Request) -> bool) -> bool {
        self.pending.values().any(|p| f(&p.kind))
    }

    /// Handles one datagram (or one framed message) from the server.
    pub fn handle_input(&mut self, now: Instant, buf: &[u8]) {
        if let Some(cd) = ChannelData::parse(buf) {
            if let Some((peer, _)) = self.channels.iter().find(|(_, (c, _))| *c == cd.channel) {
                self.events.push_back(Event::Data {
                    peer: *peer,
                    data: buf[4..4 + cd.len].to_vec(),
                });
            }
            return;
        }
        let Ok(msg) = Message::parse(buf) else { return };
        if msg.class() == Class::Indication && msg.method() == method::DATA {
            let tid = msg.transaction_id();
            let Some(peer) = msg
                .get(attr::XOR_PEER_ADDRESS)
                .and_then(|v| stun::decode_xor_address(attr::XOR_PEER_ADDRESS, v, tid).ok())
            else {
                return;
            };
            if let Some(data) = msg.get(attr::DATA) {
                self.events.push_back(Event::Data {
                    peer,
                    data: data.to_vec(),
                });
            } else if let Some(icmp) = msg.get(attr::ICMP).and_then(stun::Icmp::decode) {
                self.events.push_back(Event::Icmp { peer, icmp });
            }
            return;
        }
        let Some(pending) = self.pending.remove(msg.transaction_id()) else {
            return;
        };
        // Authenticated responses must carry valid integrity.
        if pending.authed
            && msg.has_integrity()
            && !self.key.as_ref().is_some_and(|k| msg.verify_integrity(k))
        {
            self.pending.insert(*msg.transaction_id(), pending);
            return;
        }
        match msg.class() {
            Class::Success => self.on_success(now, &pending, &msg),
            Class::Error => self.on_error(now, pending, &msg),
            _ => {}
        }
    }

    fn on_success(&mut self, now: Instant, pending: &Pending, msg: &Message<'_>) {
        let tid = msg.transaction_id();
        let lifetime = msg
            .get(attr::LIFETIME)
            .and_then(|v| stun::decode_u32(attr::LIFETIME, v).ok())
            .map(|s| Duration::from_secs(u64::from(s)));
        match &pending.kind {
            Request::Allocate { dual, .. } => {
                let addr = |t| {
                    msg.get(t)
                        .and_then(|v| stun::decode_xor_address(t, v, tid).ok())
                };
                // A dual allocation's two relays: two XOR-RELAYED-ADDRESS.
                let mut relays = msg
                    .attrs()
                    .filter(|a| a.typ == attr::XOR_RELAYED_ADDRESS)
                    .filter_map(|a| stun::decode_xor_address(a.typ, a.value, tid).ok());
                if let (Some(relayed), Some(mapped), Some(lifetime)) =
                    (relays.next(), addr(attr::XOR_MAPPED_ADDRESS), lifetime)
                {
                    self.relayed = Some(relayed);
                    self.expires = Some(now + lifetime);
                    self.events.push_back(Event::Allocated {
                        relayed,
                        mapped,
                        lifetime,
                    });
                    if *dual {
                        let refused = msg
                            .get(attr::ADDRESS_ERROR_CODE)
                            .and_then(|v| stun::decode_address_error(v).ok())
                            .map(|(_, code, _)| code);
                        let ipv6 = relays.find(SocketAddr::is_ipv6).ok_or(refused);
                        self.events.push_back(Event::Ipv6Relay(ipv6));
                    }
                }
            }
            Request::Refresh(_) => {
                let lifetime = lifetime.unwrap_or_default();
                self.expires = (!lifetime.is_zero()).then(|| now + lifetime);
                if lifetime.is_zero() {
                    self.relayed = None;
                    self.permissions.clear();
                    self.channels.clear();
                }
                self.events.push_back(Event::Refreshed { lifetime });
            }
            Request::Permission(peer) => {
                let ip = peer.ip();
                self.permissions
                    .insert(ip, (*peer, now + Duration::from_secs(300)));
                self.events.push_back(Event::PermissionCreated(ip));
            }
            Request::Channel(peer, channel) => {
                self.channels
                    .insert(*peer, (*channel, now + Duration::from_secs(600)));
                self.events.push_back(Event::ChannelBound {
                    peer: *peer,
                    channel: *channel,
                });
            }
        }
    }

    fn on_error(&mut self, now: Instant, pending: Pending, msg: &Message<'_>) {
        let (code, reason) = msg
            .get(attr::ERROR_CODE)
            .and_then(|v| stun::decode_error(v).ok())
            .map_or((0, String::new()), |(c, r)| (c, r.to_owned()));
        let realm = msg
            .get(attr::REALM)
            .and_then(|v| std::str::from_utf8(v).ok());
        let nonce = msg
            .get(attr::NONCE)
            .and_then(|v| std::str::from_utf8(v).ok());
        if code == 300
            && pending.method == method::ALLOCATE
            && (!pending.authed || msg.has_integrity())
            && let Some(alternate) = msg
                .get(attr::ALTERNATE_SERVER)
                .and_then(|v| stun::decode_address(attr::ALTERNATE_SERVER, v).ok())
        {
            self.events.push_back(Event::Redirected { alternate });
            return;
        }
        let retry = match code {
            // A first challenge, or a stale nonce: answer it once.
            401 if !pending.authed => true,
            438 => pending.tries < MAX_TRIES,
            _ => false,
        };
        if retry && let (Some(realm), Some(nonce)) = (realm, nonce) {
            self.key = Some(long_term_key(&self.username, realm, &self.password));
            self.realm = Some(realm.to_owned());
            self.nonce = Some(nonce.to_owned());
            let mut again = pending.clone();
            again.tries += 1;
            self.send_request(now, again.kind, again.tries);
            return;
        }
        self.events.push_back(Event::Failed {
            method: pending.method,
            code,
            reason,
        });
    }

    fn request(&mut self, now: Instant, kind: Request) {
        self.send_request(now, kind, 1);
    }

    fn send_request(&mut self, now: Instant, kind: Request, tries: u32) {
        let tid = self.next_tid();
        let m = match kind {
            Request::Allocate { .. } => method::ALLOCATE,
            Request::Refresh(_) => method::REFRESH,
            Request::Permission(_) => method::CREATE_PERMISSION,
            Request::Channel(..) => method::CHANNEL_BIND,
        };
        let mut b = MessageBuilder::new(m, Class::Request, &tid);
        match &kind {
            Request::Allocate { dual, ipv6 } => {
                b.attr(attr::REQUESTED_TRANSPORT, &[attr::TRANSPORT_UDP, 0, 0, 0]);
                if self.dont_fragment {
                    b.attr(attr::DONT_FRAGMENT, &[]);
                }
                if *ipv6 {
                    b.attr(
                        attr::REQUESTED_ADDRESS_FAMILY,
                        &[attr::FAMILY_IPV6, 0, 0, 0],
                    );
                }
                if *dual {
                    b.attr(
                        attr::ADDITIONAL_ADDRESS_FAMILY,
                        &[attr::FAMILY_IPV6, 0, 0, 0],
                    );
                }
            }
            Request::Refresh(secs) => {
                b.u32(attr::LIFETIME, *secs);
            }
            Request::Permission(peer) => {
                b.xor_address(attr::XOR_PEER_ADDRESS, *peer);
            }
            Request::Channel(peer, channel) => {
                let c = channel.to_be_bytes();
                b.attr(attr::CHANNEL_NUMBER, &[c[0], c[1], 0, 0]);
                b.xor_address(attr::XOR_PEER_ADDRESS, *peer);
            }
        }
        let authed =
            if let (Some(realm), Some(nonce), Some(key)) = (&self.realm, &self.nonce, &self.key) {
                b.attr(attr::USERNAME, self.username.as_bytes())
                    .attr(attr::REALM, realm.as_bytes())
                    .attr(attr::NONCE, nonce.as_bytes())
                    .integrity(key);
                true
            } else {
                false
            };
        b.fingerprint();
        let request = b.finish();
        self.transmits.push_back(request.clone());
        self.pending.insert(
            tid,
            Pending {
                method: m,
                request,
                kind,
                sent: now,
                rto: RTO,
                tries,
                authed,
            },
        );
    }

    fn peek_tid(&self) -> [u8; 12] {
        tid_from(self.tid_seed, self.tid_counter.wrapping_add(1 << 40))
    }

    fn next_tid(&mut self) -> [u8; 12] {
        self.tid_counter += 1;
        tid_from(self.tid_seed, self.tid_counter)
    }
}

/// Transaction ids from a seed and a counter: unique per client, and
/// unpredictable to others when the seed is random.
fn tid_from(seed: u64, counter: u64) -> [u8; 12] {
    let mix = |x: u64| {
        let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let a = mix(seed ^ counter);
    let b = mix(a ^ seed.rotate_left(17));
    let mut tid = [0u8; 12];
    tid[..8].copy_from_slice(&a.to_le_bytes());
    tid[8..].copy_from_slice(&b.to_le_bytes()[..4]);
    tid
}
