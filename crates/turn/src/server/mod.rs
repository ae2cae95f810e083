//! The TURN server as a sans-IO state machine (RFC 8656, RFC 6156, with
//! STUN Binding from RFC 8489).
//!
//! A driver feeds it what arrives — [`Server::on_client`] for bytes from a
//! client on a listening socket, [`Server::on_peer`] for bytes from a peer
//! on a relay socket — together with the current `Instant`, and sends what
//! it returns. It calls [`Server::on_timeout`] at [`Server::poll_timeout`].
//! The state machine owns no sockets and reads no clock: relay sockets are
//! obtained through the [`RelayAllocator`] the driver provides.
//!
//! Relayed data is never copied: the driver receives into a buffer with
//! [`HEADROOM`] free bytes in front, and the server either points into it
//! (client → peer) or writes the ChannelData or Data-indication header into
//! the headroom (peer → client).
//!
//! One `Server` serves any number of clients; several (one per thread) can
//! share quotas and the nonce key through [`Shared`].

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::ops::{Range, RangeInclusive};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ring::hmac;

use crate::auth::{AuthFailure, Credentials};
use crate::policy::PeerPolicy;
use crate::source::Source;
use crate::stun::{self, ChannelData, Class, Message, MessageBuilder, RawAttr, attr, method};

mod budget;
mod failure_log;
mod routes;
use budget::{Budget, Direction};
pub use budget::{BudgetWords, SHARED_BUDGET_WORDS, SharedBudgets};
pub use failure_log::{FailureLog, loggable};
pub use routes::{
    IndicationRoute, IndicationRoute6, KERNEL_ROUTES_PER_ALLOCATION, KernelRoute, KernelRoute6,
    RouteChange,
};

/// Free bytes a driver must leave in front of a peer datagram, for the
/// largest header the server may write there (a Data indication to an
/// IPv6 peer: 20 + 24 + 4).
pub const HEADROOM: usize = 48;
/// Free bytes a driver must leave after a peer datagram (padding to 4).
pub const TAILROOM: usize = 3;

/// Default allocation lifetime (RFC 8656 §3.2).
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(600);
/// Permissions last 300 s (RFC 8656 §9).
pub const PERMISSION_LIFETIME: Duration = Duration::from_secs(300);
/// Channel bindings last 600 s (RFC 8656 §12).
pub const CHANNEL_LIFETIME: Duration = Duration::from_secs(600);
/// After a channel binding expires, its number and peer stay reserved.
const CHANNEL_QUARANTINE: Duration = Duration::from_secs(300);
/// How long the port above an EVEN-PORT allocation with the R bit is held
/// for a RESERVATION-TOKEN (RFC 8656 §7.2 suggests about 30 s).
pub const RESERVATION_LIFETIME: Duration = Duration::from_secs(30);
/// Tries at an even port whose successor is free, before 508.
const RESERVATION_TRIES: usize = 8;
/// Other workers' relayed addresses a worker remembers looking up; beyond
/// that it starts again (only a flood of peers gets there).
const MAX_CACHED_VIEWS: usize = 4096;

/// How a client reaches the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    Udp,
    Tcp,
    Tls,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    fn is_stream(self) -> bool {
        !matches!(self, Transport::Udp)
    }
}

/// The client's 5-tuple: who, to which of our addresses, over what.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FiveTuple {
    pub client: SocketAddr,
    pub server: SocketAddr,
    pub transport: Transport,
}

/// A relay socket, numbered by the server; the driver maps it to a socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RelayId(pub u32);

/// A relay port bound but not yet in service: the port held for a
/// RESERVATION-TOKEN. Opaque to the server, which only keeps it (in
/// [`Shared`], so a worker other than the reserving one may redeem it) and
/// hands it back to a [`RelayAllocator`]; dropping it frees the port.
pub type HeldPort = Box<dyn std::any::Any + Send>;

/// Binds and closes relay sockets for the server.
pub trait RelayAllocator {
    /// Binds a UDP relay socket (IPv6 if `ipv6`, on an even port if
    /// `even`) for `id`; returns the address it is bound to.
    fn allocate(&mut self, id: RelayId, ipv6: bool, even: bool) -> io::Result<SocketAddr>;
    /// Closes the socket of `id`.
    fn release(&mut self, id: RelayId);
    /// Binds the port right above `addr` (an allocation's relay) and holds
    /// it out of service (EVEN-PORT with the R bit).
    fn hold_next(&mut self, addr: SocketAddr) -> io::Result<HeldPort>;
    /// Puts a port from [`RelayAllocator::hold_next`], possibly another
    /// worker's, into service as `id`'s relay socket.
    fn allocate_held(&mut self, id: RelayId, held: HeldPort) -> io::Result<SocketAddr>;
    /// From now on, what `id`'s relay socket (of IPv6 if `ipv6`) sends
    /// goes with the DF bit and is never fragmented (DONT-FRAGMENT); one
    /// too big for the path is refused and reported as an ICMP error.
    fn dont_fragment(&mut self, id: RelayId, ipv6: bool) -> io::Result<()>;
}

/// A port held for a RESERVATION-TOKEN.
struct Reservation {
    held: HeldPort,
    expires: Instant,
    /// Who asked: each user, and each source, may hold as many ports as
    /// allocations.
    username: String,
    source: Source,
}

/// The family of the relay a client gets when it asks for none
/// (REQUESTED-ADDRESS-FAMILY, RFC 8656 section 7.2): browsers ask for none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DefaultFamily {
    /// IPv4, as the RFC has it (without an IPv4 relay address: 440).
    #[default]
    Ipv4,
    Ipv6,
    /// That of the client's own address (coturn's `keep`): an IPv6-only
    /// server can serve browsers, which ask for no family.
    Client,
}

/// Server settings.
#[derive(Debug, Clone)]
pub struct Config {
    pub credentials: Credentials,
    pub policy: PeerPolicy,
    /// Relay addresses (IP) this server hands out, and their port range:
    /// peers there are other allocations of this server, always allowed.
    pub relay_ips: Vec<IpAddr>,
    pub relay_ports: RangeInclusive<u16>,
    /// The relay family of a client that asks for none.
    pub default_family: DefaultFamily,
    /// Advertised in XOR-RELAYED-ADDRESS instead of the bound IP of the
    /// same family (behind 1:1 NAT); at most one per family.
    pub external_ips: Vec<IpAddr>,
    pub max_lifetime: Duration,
    pub nonce_lifetime: Duration,
    pub max_allocations: usize,
    pub user_quota: usize,
    /// Allocations from one client source (an IPv4 address or an IPv6
    /// /64), whatever the usernames: `callisto serve` hands fresh
    /// credentials to everyone who joins a room, so the user quota alone
    /// does not keep one host from taking every allocation.
    pub source_quota: usize,
    pub max_permissions: usize,
    /// Channels per allocation, expired ones still reserved included: each
    /// costs the server a little memory and, with the kernel relay, a
    /// route; browsers bind one per remote candidate in use.
    pub max_channels: usize,
    /// Relayed bytes per second per allocation, each direction; 0 = unlimited.
    pub bps_per_allocation: u64,
    /// Data between two of our allocations goes from one client straight
    /// to the other (see `Server::relay_across`); off, it crosses the two
    /// relay sockets. Off only to compare the two, as the tests do.
    pub relay_in_place: bool,
    /// Keep routes for the kernel relay (see [`Server::route_changes`]).
    /// With a bandwidth limit, only once the kernel's budgets are shared
    /// ([`Shared::share_budgets`]): a kernel and workers that each kept
    /// their own would let twice the limit through.
    pub kernel_routes: bool,
    /// Unauthenticated requests per second per source IP (burst: twice that).
    pub unauth_rate: u32,
    /// Bytes a UDP source may be sent in answers to unauthenticated requests
    /// beyond the bytes of those requests (refilled over 8 s); 0 = never
    /// more than it sent. See `Server::unauth_answer`.
    pub unauth_allowance: u32,
    /// Where clients are sent instead of getting an allocation here, at
    /// start (see [`Shared::set_alternates`] for later).
    pub alternates: Alternates,
    pub software: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            credentials: Credentials::new("callisto"),
            policy: PeerPolicy::default(),
            relay_ips: Vec::new(),
            relay_ports: 49152..=65535,
            default_family: DefaultFamily::Ipv4,
            external_ips: Vec::new(),
            max_lifetime: Duration::from_secs(3600),
            nonce_lifetime: Duration::from_secs(600),
            max_allocations: 10_000,
            user_quota: 100,
            source_quota: 1000,
            max_permissions: 64,
            max_channels: 64,
            bps_per_allocation: 0,
            relay_in_place: true,
            kernel_routes: false,
            unauth_rate: 50,
            unauth_allowance: 512,
            alternates: Alternates::default(),
            software: None,
        }
    }
}

/// Servers that clients asking for an allocation are sent to with 300
/// (Try Alternate) instead, in turn (RFC 8489 §10, coturn's
/// `alternate-server`): to spread clients over several servers behind one
/// address, or to drain one of new clients while its calls go on. Only
/// those of the client's family are used; with none, it stays.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Alternates {
    /// For UDP and TCP clients.
    pub udp_tcp: Vec<SocketAddr>,
    /// For TLS clients, whom a server must answer over TLS.
    pub tls: Vec<SocketAddr>,
}

impl Alternates {
    pub fn is_empty(&self) -> bool {
        self.udp_tcp.is_empty() && self.tls.is_empty()
    }
}

impl Config {
    /// What clients and peers know a relay bound on `bound` by: the
    /// external address of its family, if any.
    pub fn advertised_ip(&self, bound: IpAddr) -> IpAddr {
        self.external_ips
            .iter()
            .copied()
            .find(|e| e.is_ipv4() == bound.is_ipv4())
            .unwrap_or(bound)
    }
}

/// Allocations held, by user and by source, for the quotas.
#[derive(Default)]
struct Held {
    by_user: HashMap<String, usize>,
    by_source: HashMap<Source, usize>,
}

/// Takes one off `key`'s count, forgetting it at zero.
fn give_back<K, Q>(counts: &mut HashMap<K, usize>, key: &Q)
where
    K: std::borrow::Borrow<Q> + std::hash::Hash + Eq,
    Q: std::hash::Hash + Eq + ?Sized,
{
    if let Some(n) = counts.get_mut(key) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            counts.remove(key);
        }
    }
}

/// State shared by every `Server` of one process: configuration, the nonce
/// key, and the allocation quotas.
pub struct Shared {
    pub config: Config,
    nonce_key: hmac::Key,
    allocations: AtomicUsize,
    held: Mutex<Held>,
    /// Every live relay address of every worker (bound and advertised).
    /// Peers that are our own relays are allowed even on a loopback or
    /// private relay IP, but only the exact addresses, so other services on
    /// that IP stay unreachable; and data between two of our allocations
    /// skips the kernel even when they belong to different workers.
    relays: RwLock<HashMap<SocketAddr, Arc<RelayView>>>,
    /// Counts changes to `relays`, so workers can cache lookups in it.
    relays_version: AtomicU64,
    /// Ports held for RESERVATION-TOKENs, by token; shared because the
    /// client's second socket may land on another worker.
    reservations: Mutex<HashMap<[u8; 8], Reservation>>,
    /// Numbers the reservation tokens (which are MACs of it).
    reservation_serial: AtomicU64,
    /// Maps `Instant`s to Unix time for REST credential expiry.
    epoch: (Instant, u64),
    /// The kernel relay's bandwidth budgets, which allocations take from
    /// instead of their own.
    budgets: Option<SharedBudgets>,
    /// Where clients are sent now: `Config::alternates` until changed.
    alternates: RwLock<Alternates>,
    /// Counts redirections, to take the alternate servers in turn.
    redirected: AtomicUsize,
    /// Bounds the log lines about authentication failures, process-wide.
    failure_log: Mutex<failure_log::FailureLog>,
}

impl Shared {
    /// `nonce_secret` should be random; `epoch` pairs an `Instant` with the
    /// Unix time at that instant.
    pub fn new(config: Config, nonce_secret: &[u8], epoch: (Instant, u64)) -> Self {
        count_alternates(&config.alternates);
        Shared {
            alternates: RwLock::new(config.alternates.clone()),
            config,
            nonce_key: hmac::Key::new(hmac::HMAC_SHA256, nonce_secret),
            allocations: AtomicUsize::new(0),
            held: Mutex::new(Held::default()),
            relays: RwLock::new(HashMap::new()),
            relays_version: AtomicU64::new(0),
            reservations: Mutex::new(HashMap::new()),
            reservation_serial: AtomicU64::new(0),
            epoch,
            budgets: None,
            redirected: AtomicUsize::new(0),
            failure_log: Mutex::default(),
        }
    }

    /// Sends clients to `alternates` from now on (none: serves them all
    /// here again); allocations already made stay.
    pub fn set_alternates(&self, alternates: Alternates) {
        count_alternates(&alternates);
        *self.alternates.write().unwrap_or_else(|e| e.into_inner()) = alternates;
    }

    /// Where to send a client that asks this server for an allocation,
    /// if anywhere: the next alternate server of its family for its
    /// transport (ALTERNATE-SERVER must be of the request's family, RFC
    /// 8489 §14.15).
    fn alternate_for(&self, five: &FiveTuple) -> Option<SocketAddr> {
        let alternates = self.alternates.read().unwrap_or_else(|e| e.into_inner());
        let list = match five.transport {
            Transport::Tls => &alternates.tls,
            Transport::Udp | Transport::Tcp => &alternates.udp_tcp,
        };
        let ipv4 = five.client.ip().to_canonical().is_ipv4();
        let count = list.iter().filter(|a| a.is_ipv4() == ipv4).count();
        if count == 0 {
            return None;
        }
        let turn = self.redirected.fetch_add(1, Ordering::Relaxed) % count;
        list.iter()
            .filter(|a| a.is_ipv4() == ipv4)
            .nth(turn)
            .copied()
    }

    /// Takes bandwidth from `budgets` (the kernel relay's), so that the
    /// workers and the kernel spend the same budgets. Ignored unless they
    /// hold every port's.
    pub fn share_budgets(&mut self, budgets: SharedBudgets) {
        if budgets.cover_every_port() {
            self.budgets = Some(budgets);
        } else {
            tracing::warn!(
                ?budgets,
                "shared bandwidth budgets too short for every port: not used"
            );
        }
    }

    /// Like [`Shared::new`] with the real clock as epoch.
    pub fn with_system_clock(config: Config, nonce_secret: &[u8]) -> Self {
        let unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Self::new(config, nonce_secret, (Instant::now(), unix))
    }

    fn unix(&self, now: Instant) -> u64 {
        self.epoch.1 + now.saturating_duration_since(self.epoch.0).as_secs()
    }

    pub fn allocation_count(&self) -> usize {
        self.allocations.load(Ordering::Relaxed)
    }

    /// Takes a place for an allocation of `user` from `source`: 486 over
    /// the user's or the source's quota, 508 over the server's.
    fn reserve(&self, user: &str, source: Source) -> Result<(), u16> {
        let c = &self.config;
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if held.by_user.get(user).copied().unwrap_or(0) >= c.user_quota {
            return Err(486);
        }
        if held.by_source.get(&source).copied().unwrap_or(0) >= c.source_quota {
            metrics::counter!("callisto_turn_source_quota_refusals_total").increment(1);
            return Err(486);
        }
        if self
            .allocations
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |a| {
                (a < c.max_allocations).then_some(a + 1)
            })
            .is_err()
        {
            return Err(508);
        }
        *held.by_user.entry(user.to_owned()).or_insert(0) += 1;
        *held.by_source.entry(source).or_insert(0) += 1;
        Ok(())
    }

    fn unreserve(&self, user: &str, source: Source) {
        self.allocations.fetch_sub(1, Ordering::Relaxed);
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        give_back(&mut held.by_user, user);
        give_back(&mut held.by_source, &source);
    }

    fn is_live_relay(&self, addr: SocketAddr) -> bool {
        self.relay_view(addr).is_some()
    }

    fn relay_view(&self, addr: SocketAddr) -> Option<Arc<RelayView>> {
        self.relays
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&addr)
            .cloned()
    }

    /// Publishes (`Some`) or withdraws (`None`) the relayed addresses of an
    /// allocation.
    fn set_relay(&self, addrs: [SocketAddr; 2], view: Option<&Arc<RelayView>>) {
        let mut r = self.relays.write().unwrap_or_else(|p| p.into_inner());
        for a in addrs {
            match view {
                Some(v) => r.insert(a, v.clone()),
                None => r.remove(&a),
            };
        }
        // Under the lock, so a reader that sees the new version sees the
        // new map too.
        self.relays_version.fetch_add(1, Ordering::Release);
    }

    fn relays_version(&self) -> u64 {
        self.relays_version.load(Ordering::Acquire)
    }

    fn make_nonce(&self, five: &FiveTuple, now: Instant) -> String {
        let expiry = self.unix(now) + self.config.nonce_lifetime.as_secs();
        format!("{expiry:016x}{}", self.nonce_mac(five, expiry))
    }

    /// Whether `nonce` is one this server gave `five` and has not expired.
    fn nonce_is_valid(&self, five: &FiveTuple, nonce: &[u8], now: Instant) -> bool {
        let Ok(text) = std::str::from_utf8(nonce) else {
            return false;
        };
        if text.len() != 32 {
            return false;
        }
        let Ok(expiry) = u64::from_str_radix(&text[..16], 16) else {
            return false;
        };
        let mac = self.nonce_mac(five, expiry);
        stun::ct_eq(mac.as_bytes(), &nonce[16..]) && expiry > self.unix(now)
    }

    /// Keeps `held` for [`RESERVATION_LIFETIME`] under a new token, or
    /// refuses when as many ports are held as allocations may exist, in
    /// all, for this user or from this source (else allocating and
    /// deleting in a loop would hold the whole port range).
    fn hold(
        &self,
        held: HeldPort,
        username: &str,
        source: Source,
        now: Instant,
    ) -> Option<[u8; 8]> {
        self.expire_reservations(now);
        let mut r = self.reservations.lock().unwrap_or_else(|p| p.into_inner());
        let mine = r.values().filter(|v| v.username == username).count();
        let from_source = r.values().filter(|v| v.source == source).count();
        if r.len() >= self.config.max_allocations
            || mine >= self.config.user_quota
            || from_source >= self.config.source_quota
        {
            return None;
        }
        // A MAC of a serial number: unique, and unguessable to anyone
        // without the key, so nobody takes a port reserved for another.
        let serial = self.reservation_serial.fetch_add(1, Ordering::Relaxed);
        let mut ctx = hmac::Context::with_key(&self.nonce_key);
        ctx.update(b"reservation");
        ctx.update(&serial.to_be_bytes());
        let mut token = [0u8; 8];
        token.copy_from_slice(&ctx.sign().as_ref()[..8]);
        r.insert(
            token,
            Reservation {
                held,
                expires: now + RESERVATION_LIFETIME,
                username: username.to_owned(),
                source,
            },
        );
        Some(token)
    }

    /// Takes the port held for `token`, if the token is known and live.
    fn redeem(&self, token: &[u8], now: Instant) -> Option<HeldPort> {
        let token: [u8; 8] = token.try_into().ok()?;
        let mut r = self.reservations.lock().unwrap_or_else(|p| p.into_inner());
        r.remove(&token).filter(|v| v.expires > now).map(|v| v.held)
    }

    /// Frees the ports of expired reservations.
    fn expire_reservations(&self, now: Instant) {
        let mut r = self.reservations.lock().unwrap_or_else(|p| p.into_inner());
        r.retain(|_, v| v.expires > now);
    }

    /// Ports held for reservations now.
    pub fn reservation_count(&self) -> usize {
        self.reservations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// Binds a nonce to the client's 5-tuple, so one captured from another
    /// client is useless.
    fn nonce_mac(&self, five: &FiveTuple, expiry: u64) -> String {
        let mut ctx = hmac::Context::with_key(&self.nonce_key);
        ctx.update(&expiry.to_be_bytes());
        ctx.update(five.client.to_string().as_bytes());
        ctx.update(five.server.to_string().as_bytes());
        ctx.update(five.transport.as_str().as_bytes());
        ctx.sign().as_ref()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// An ICMP error met by a datagram a relay socket sent, as the driver
/// reads it from the socket's error queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IcmpError {
    /// Where the datagram was going: the peer, with port 0 if the
    /// operating system did not say.
    pub peer: SocketAddr,
    pub icmp_type: u8,
    pub code: u8,
    /// The next hop's MTU, for the errors that carry one.
    pub mtu: u32,
}

/// What to send after handling one input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Nothing (dropped, or consumed).
    None,
    /// Send `buf[range]` (the caller's buffer) to the client.
    ToClient { to: FiveTuple, range: Range<usize> },
    /// Hand `buf[range]`, one ChannelData message without its stream
    /// padding or one Data indication, to a TCP or TLS client's
    /// connection through its inbox.
    ToStream { inbox: Inbox, range: Range<usize> },
    /// Send `buf[range]` from relay socket `relay` to `peer`.
    ToPeer {
        relay: RelayId,
        peer: SocketAddr,
        range: Range<usize>,
    },
    /// Send this STUN response to the client.
    Reply { to: FiveTuple, data: Vec<u8> },
}

/// Where data relayed in place for a TCP or TLS client goes: its
/// connection's task, which alone writes to the stream, takes it from
/// there. The stream driver implements it; UDP workers and other
/// connections push into it.
pub trait StreamInbox: Send + Sync {
    /// Queues one message (ChannelData, unpadded, or a Data indication)
    /// for the client; false
    /// when the inbox is full and the message was dropped.
    fn push(&self, message: &[u8]) -> bool;
}

/// A handle on a [`StreamInbox`]; two are equal when they are the same inbox.
#[derive(Clone)]
pub struct Inbox(pub Arc<dyn StreamInbox>);

impl PartialEq for Inbox {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for Inbox {}

impl Inbox {
    /// Pushes `message`; what a full inbox refuses is counted as a send
    /// drop, as a full socket buffer's would be.
    pub fn hand_over(&self, message: &[u8]) {
        if !self.0.push(message) {
            metrics::counter!("callisto_turn_send_drops_total").increment(1);
        }
    }
}

impl std::fmt::Debug for Inbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Inbox({:p})", Arc::as_ptr(&self.0))
    }
}

/// A cheap hasher for the per-packet lookups (keys are not attacker-chosen
/// in a way that matters: 5-tuples come from the kernel).
#[derive(Default)]
struct FxHasher(u64);

impl Hasher for FxHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(b));
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    fn write_u32(&mut self, v: u32) {
        self.write_u64(u64::from(v));
    }

    fn write_u16(&mut self, v: u16) {
        self.write_u64(u64::from(v));
    }

    fn write_u8(&mut self, v: u8) {
        self.write_u64(u64::from(v));
    }

    fn write_usize(&mut self, v: usize) {
        self.write_u64(v as u64);
    }
}

type FxMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;

#[derive(Debug, Clone)]
struct Channel {
    number: u16,
    peer: SocketAddr,
    expires: Instant,
}

#[derive(Debug)]
struct Allocation {
    five: FiveTuple,
    relay: RelayId,
    relay_addr: SocketAddr,
    /// The relayed address as clients and peers know it.
    advertised: SocketAddr,
    username: String,
    access: PeerAccess,
    /// A copy of `access` for other workers, renewed when it grows.
    view: Arc<RelayView>,
    /// The Allocate request's transaction id and our answer, for retransmits.
    allocate_tid: [u8; 12],
    allocate_response: Vec<u8>,
    /// What the kernel relay was last told about this allocation.
    routes: routes::Routes,
    /// The other half of a dual allocation (RFC 8656 §7.2: one relay of
    /// each family for one client): a slot of its own, with its own relay,
    /// permissions, channels and lifetime, found from the half in
    /// `by_five` (the IPv4 one, until it goes).
    sibling: Option<u32>,
    /// The client asked for DONT-FRAGMENT, in its Allocate or in a Send
    /// indication since: its relay socket sends with DF from then on.
    dont_fragment: bool,
    /// When it was made, for the log line that says it ended.
    created: Instant,
}

/// Why an allocation (or half of one) ended, as the log says it.
#[derive(Debug, Clone, Copy)]
enum Ended {
    /// Its client deleted it (a Refresh with lifetime 0).
    Deleted,
    /// Its client did not refresh it in time.
    Expired,
    /// Its client's TCP or TLS connection closed.
    ConnectionClosed,
    /// Its Allocate asked for what could not be done after all.
    Refused,
    /// The server (or the worker holding it) stopped.
    ServerStopped,
    /// A bug (a panic) left its server's state in doubt.
    Failed,
}

impl Ended {
    fn as_str(self) -> &'static str {
        match self {
            Ended::Deleted => "deleted",
            Ended::Expired => "expired",
            Ended::ConnectionClosed => "connection closed",
            Ended::Refused => "refused",
            Ended::ServerStopped => "server stopped",
            Ended::Failed => "server error",
        }
    }
}

impl Allocation {
    /// Lets other workers see the permissions, channels and lifetime as
    /// they are now. Only needed when they grow or are renewed: readers
    /// check expiry times themselves.
    fn publish(&self) {
        *self.view.lock() = self.access.clone();
    }
}

/// What the halves of one allocation share when put into service.
struct Installed<'a> {
    five: FiveTuple,
    username: &'a str,
    expires: Instant,
    allocate_tid: [u8; 12],
    allocate_response: &'a [u8],
}

/// What decides whether data from a peer reaches an allocation's client:
/// the allocation's lifetime, its permissions and its channels.
#[derive(Debug, Clone)]
struct PeerAccess {
    expires: Instant,
    permissions: Vec<(IpAddr, Instant)>,
    channels: Vec<Channel>,
    /// Set in a view when its allocation is removed.
    closed: bool,
}

/// What becomes of data from one of our allocations to another
/// allocation's relayed address, if it is relayed in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InPlace {
    /// Straight to the receiving client, on this channel of its.
    Deliver(u16),
    /// Straight to the receiving client, as a Data indication: it permits
    /// the sender but has no channel for it. Only where the buffer has room
    /// for the indication's header before the data, or after it to move
    /// the data there ([`indication_shift`]): a Send indication does, and
    /// ChannelData when the driver left headroom ([`Server::on_client_in`]).
    Indicate,
    /// The receiver does not permit the sender: dropped, as the kernel path
    /// would drop it at the receiving relay.
    Drop,
    /// Not at all, or not here: the kernel path decides, through the
    /// receiving relay socket.
    Kernel,
}

impl InPlace {
    /// Whether `buf[data]` can be framed this way where it lies; the data
    /// is from `from`.
    fn fits(self, from: SocketAddr, data: &Range<usize>, buf_len: usize) -> bool {
        match self {
            InPlace::Deliver(_) => data.start >= 4,
            InPlace::Indicate => {
                let shift = indication_shift(from, data);
                data.end + shift + stun::padding(data.len()) <= buf_len
            }
            InPlace::Drop | InPlace::Kernel => true,
        }
    }
}

/// How far `data` must move toward the end of its buffer to leave room
/// before it for a Data indication's header from `from`: the STUN header,
/// XOR-PEER-ADDRESS and DATA's own header. Nothing for a Send indication
/// with XOR-PEER-ADDRESS first (as browsers send them) or for a datagram
/// received with headroom; 12 or 24 bytes for one with DATA first (as
/// coturn's and Pion's clients send them), which its XOR-PEER-ADDRESS
/// after the data makes room for.
fn indication_shift(from: SocketAddr, data: &Range<usize>) -> usize {
    let header: usize = if from.is_ipv4() {
        20 + 12 + 4
    } else {
        20 + 24 + 4
    };
    header.saturating_sub(data.start)
}

impl PeerAccess {
    fn new(expires: Instant) -> Self {
        PeerAccess {
            expires,
            permissions: Vec::new(),
            channels: Vec::new(),
            closed: false,
        }
    }

    fn permitted(&self, ip: IpAddr, now: Instant) -> bool {
        self.permissions
            .iter()
            .any(|(p, exp)| *p == ip && *exp > now)
    }

    fn channel_by_number(&self, number: u16) -> Option<&Channel> {
        self.channels.iter().find(|c| c.number == number)
    }

    fn channel_by_peer(&self, peer: SocketAddr, now: Instant) -> Option<u16> {
        self.channels
            .iter()
            .find(|c| c.peer == peer && c.expires > now)
            .map(|c| c.number)
    }

    /// For ChannelData from our relayed address `from`, relayed in place.
    fn in_place(&self, from: SocketAddr, now: Instant) -> InPlace {
        if self.expires <= now {
            return InPlace::Kernel;
        }
        let permitted = self.permitted(from.ip(), now);
        match self.channel_by_peer(from, now) {
            None if permitted => InPlace::Indicate,
            None => InPlace::Kernel,
            Some(_) if !permitted => InPlace::Drop,
            Some(channel) => InPlace::Deliver(channel),
        }
    }
}

/// A Send indication's peer, and where its data lies in `buf` (the bytes
/// `msg` was parsed from); `None` without either.
fn send_indication_parts(msg: &Message<'_>, buf: &[u8]) -> Option<(SocketAddr, Range<usize>)> {
    let peer = msg.get(attr::XOR_PEER_ADDRESS).and_then(|v| {
        stun::decode_xor_address(attr::XOR_PEER_ADDRESS, v, msg.transaction_id()).ok()
    })?;
    let data = msg.get(attr::DATA)?;
    let offset = data.as_ptr() as usize - buf.as_ptr() as usize;
    Some((peer, offset..offset + data.len()))
}

/// A worker's memory of a lookup in `Shared`'s relay views.
enum Cached {
    Found(Arc<RelayView>),
    /// Nobody had that address while `Shared`'s relay version was this.
    Nobody(u64),
}

/// An allocation as other workers see it: enough to relay ChannelData from
/// their own allocations straight to its client (see `Server::relay_across`).
#[derive(Debug)]
pub struct RelayView {
    to: FiveTuple,
    /// For a TCP or TLS client: where data relayed in place goes.
    inbox: Option<Inbox>,
    access: Mutex<PeerAccess>,
    /// Bytes per second the client may send and be sent, whoever relays
    /// them (other workers relaying in place take from it too); none when
    /// unlimited.
    budget: Option<Budget>,
    /// What the workers relayed for it, whichever did, for the log line
    /// that says it ended.
    relayed: [Tally; 2],
}

/// Packets and payload bytes relayed one way for one allocation.
#[derive(Debug, Default)]
struct Tally {
    packets: AtomicU64,
    bytes: AtomicU64,
}

impl Tally {
    fn add(&self, len: usize) {
        self.packets.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(len as u64, Ordering::Relaxed);
    }

    fn get(&self) -> (u64, u64) {
        (
            self.packets.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
        )
    }
}

impl RelayView {
    fn lock(&self) -> std::sync::MutexGuard<'_, PeerAccess> {
        self.access.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes `len` bytes from the client's budget toward it, and counts
    /// them relayed; false: over it, drop.
    fn take_to_client(&self, len: usize, now: Instant) -> bool {
        self.take(Direction::ToClient, TO_CLIENT, len, now)
    }

    /// Takes `len` bytes from the client's budget toward its peers.
    fn take_to_peer(&self, len: usize, now: Instant) -> bool {
        self.take(Direction::ToPeer, TO_PEER, len, now)
    }

    fn take(&self, direction: Direction, tally: usize, len: usize, now: Instant) -> bool {
        let within = self
            .budget
            .as_ref()
            .is_none_or(|b| b.take(direction, len, now));
        if within {
            self.relayed[tally].add(len);
        }
        within
    }
}

/// Counter handles resolved once, so the per-packet cost is one atomic add.
struct RelayCounters {
    packets: [[metrics::Counter; 3]; 2],
    bytes: [[metrics::Counter; 3]; 2],
    /// Packets between two of our allocations that skipped the kernel.
    in_place: metrics::Counter,
}

const TO_PEER: usize = 0;
const TO_CLIENT: usize = 1;

impl RelayCounters {
    fn new() -> Self {
        let make = |name: &'static str| {
            [TO_PEER, TO_CLIENT].map(|dir| {
                [Transport::Udp, Transport::Tcp, Transport::Tls].map(|t| {
                    metrics::counter!(name,
                        "direction" => if dir == TO_PEER { "to_peer" } else { "to_client" },
                        "transport" => t.as_str())
                })
            })
        };
        RelayCounters {
            packets: make("callisto_turn_relayed_packets_total"),
            bytes: make("callisto_turn_relayed_bytes_total"),
            in_place: metrics::counter!("callisto_turn_relayed_in_place_packets_total"),
        }
    }

    fn count(&self, dir: usize, t: Transport, bytes: usize) {
        self.packets[dir][t.index()].increment(1);
        self.bytes[dir][t.index()].increment(bytes as u64);
    }
}

/// What one source IP may still be answered without authentication.
struct UnauthBudget {
    /// Answers (token bucket of `unauth_rate`).
    answers: f64,
    /// Bytes (UDP only): the requests' bytes plus the allowance, less the
    /// answers' bytes.
    bytes: f64,
    last: Instant,
}

/// Earned byte credit a source can bank beyond its allowance: enough for a
/// retransmitting client to be answered, too little to matter to a victim.
const UNAUTH_BANKED: f64 = 1280.0;
/// Sources tracked at once; beyond that, new ones are answered only when
/// the answer is no larger than the request.
const UNAUTH_TRACKED: usize = 100_000;

/// The TURN server state machine. See the module documentation.
pub struct Server<A> {
    shared: Arc<Shared>,
    relays: A,
    allocations: Vec<Option<Allocation>>,
    free_slots: Vec<u32>,
    by_five: FxMap<FiveTuple, u32>,
    /// This server's own allocations by relayed address (bound and advertised).
    by_relay_addr: FxMap<SocketAddr, u32>,
    /// Other workers' allocations by relayed address, as looked up in
    /// `Shared` (see [`Server::view_of`]).
    views: FxMap<SocketAddr, Cached>,
    unauth: HashMap<IpAddr, UnauthBudget>,
    next_sweep: Option<Instant>,
    counters: RelayCounters,
    /// Numbers the Data indications this server sends.
    indications: u64,
    /// Where data relayed in place to this server's stream client goes.
    inbox: Option<Inbox>,
    /// The listening address from which this server's driver can send to
    /// UDP clients, if its own clients are not on UDP.
    udp_source: Option<SocketAddr>,
    /// Kernel routes to install or remove, in order.
    route_changes: Vec<RouteChange>,
    /// Slots taken, with their quota places, for allocations not yet
    /// installed: what a panic half-way through an Allocate would leave
    /// held, since no slot says whose the places are.
    unfilled: Vec<Unfilled>,
}

/// A slot taken by [`Server::take_slot`] and neither installed nor given
/// back yet.
struct Unfilled {
    slot: u32,
    username: String,
    source: Source,
}

/// An error response in the making: code, reason, and whether to sign it.
struct Refusal {
    code: u16,
    reason: &'static str,
}

fn refuse(code: u16, reason: &'static str) -> Refusal {
    Refusal { code, reason }
}

/// The authenticated identity of a request.
struct Authed {
    username: String,
    key: Vec<u8>,
}

impl<A: RelayAllocator> Server<A> {
    pub fn new(shared: Arc<Shared>, relays: A) -> Self {
        Server {
            shared,
            relays,
            allocations: Vec::new(),
            free_slots: Vec::new(),
            by_five: FxMap::default(),
            by_relay_addr: FxMap::default(),
            views: FxMap::default(),
            unauth: HashMap::new(),
            next_sweep: None,
            counters: RelayCounters::new(),
            indications: 0,
            inbox: None,
            udp_source: None,
            route_changes: Vec::new(),
            unfilled: Vec::new(),
        }
    }

    /// What the kernel relay must learn or forget since the last call, in
    /// order (see `server::routes`). Empty unless `Config::kernel_routes`.
    pub fn route_changes(&mut self) -> std::vec::Drain<'_, RouteChange> {
        self.route_changes.drain(..)
    }

    /// After an allocation's permissions, channels or lifetime grew or were
    /// renewed: tells the other workers (its view) and the kernel relay.
    fn access_changed(&mut self, slot: u32, now: Instant) {
        if let Some(a) = self.allocations.get(slot as usize).and_then(Option::as_ref) {
            a.publish();
        }
        self.sync_routes(slot, now);
    }

    /// Brings an allocation's kernel routes in line with its access.
    fn sync_routes(&mut self, slot: u32, now: Instant) {
        let config = &self.shared.config;
        if !config.kernel_routes
            || (config.bps_per_allocation != 0 && self.shared.budgets.is_none())
        {
            return;
        }
        let Some(a) = self
            .allocations
            .get_mut(slot as usize)
            .and_then(Option::as_mut)
        else {
            return;
        };
        // The kernel relay keeps the DF bit a datagram came with, and the
        // client's may have none: DONT-FRAGMENT traffic stays with the
        // workers, whose relay socket sets it.
        let want = if a.dont_fragment {
            routes::Routes::default()
        } else {
            routes::wanted(&a.five, a.relay_addr, &a.access, now)
        };
        routes::update(&mut a.routes, want, &mut self.route_changes);
    }

    /// For a stream connection's server: other workers and connections
    /// deliver data for its client's allocation into `inbox`.
    pub fn set_stream_inbox(&mut self, inbox: Inbox) {
        self.inbox = Some(inbox);
    }

    /// For a stream connection's server: its driver can send datagrams to
    /// UDP clients from the listening address `addr`
    /// ([`Output::ToClient`] with a UDP 5-tuple).
    pub fn set_udp_source(&mut self, addr: SocketAddr) {
        self.udp_source = Some(addr);
    }

    pub fn relays(&mut self) -> &mut A {
        &mut self.relays
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Live allocations in this server.
    pub fn allocation_count(&self) -> usize {
        self.by_five.len()
    }

    /// The relay of `five`'s allocation, if it has one.
    pub fn relay_of(&self, five: &FiveTuple) -> Option<RelayId> {
        let slot = *self.by_five.get(five)?;
        self.allocations[slot as usize].as_ref().map(|a| a.relay)
    }

    /// The relays of `five`'s allocation: one, or two for a dual one.
    pub fn relays_of(&self, five: &FiveTuple) -> [Option<RelayId>; 2] {
        let Some(&slot) = self.by_five.get(five) else {
            return [None, None];
        };
        let other = self.allocations[slot as usize]
            .as_ref()
            .and_then(|a| a.sibling);
        [Some(RelayId(slot)), other.map(RelayId)]
    }

    /// When to call [`Server::on_timeout`] next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.next_sweep
    }

    /// Handles `buf[..len]` from a client. ChannelData may be padded
    /// (stream transports pad to 4 bytes).
    ///
    /// The buffer is mutable because ChannelData between two allocations of
    /// this server is relayed in place: the header is rewritten for the
    /// receiving client and the result comes back as [`Output::ToClient`].
    pub fn on_client(&mut self, now: Instant, five: FiveTuple, buf: &mut [u8]) -> Output {
        let all = 0..buf.len();
        self.on_client_in(now, five, buf, all)
    }

    /// [`Server::on_client`] for the datagram `buf[datagram]`, which a
    /// driver received with free bytes around it ([`HEADROOM`] before,
    /// [`TAILROOM`] after): then ChannelData relayed in place to a receiver
    /// that has no channel for the sender can go as a Data indication,
    /// written in front of the data, instead of through two relay sockets.
    /// Ranges in the output are into `buf`.
    pub fn on_client_in(
        &mut self,
        now: Instant,
        five: FiveTuple,
        buf: &mut [u8],
        datagram: Range<usize>,
    ) -> Output {
        let Some(bytes) = buf.get(datagram.clone()) else {
            return Output::None;
        };
        if let Some(cd) = ChannelData::parse(bytes) {
            let data = datagram.start + 4..datagram.start + 4 + cd.len;
            return self.client_channel_data(now, five, cd.channel, data, buf);
        }
        let msg = match Message::parse(bytes) {
            Ok(m) => m,
            Err(e) => {
                tracing::trace!(client = %five.client, error = %e, "dropped a malformed message");
                metrics::counter!("callisto_turn_malformed_total").increment(1);
                return Output::None;
            }
        };
        match msg.class() {
            Class::Request => self.on_request(now, five, &msg),
            Class::Indication if msg.method() == method::SEND => {
                let Some((peer, data)) = send_indication_parts(&msg, buf) else {
                    return Output::None;
                };
                let dont_fragment = msg.get(attr::DONT_FRAGMENT).is_some();
                self.on_send_indication(now, five, peer, data, dont_fragment, buf)
            }
            // Responses and other indications mean nothing to a server.
            _ => Output::None,
        }
    }

    /// Handles `len` bytes a peer sent to relay `relay`, which the driver
    /// placed at `buf[HEADROOM..HEADROOM + len]`, with [`TAILROOM`] bytes
    /// free after them.
    pub fn on_peer(
        &mut self,
        now: Instant,
        relay: RelayId,
        from: SocketAddr,
        buf: &mut [u8],
        len: usize,
    ) -> Output {
        let Some(Some(alloc)) = self.allocations.get_mut(relay.0 as usize) else {
            return Output::None;
        };
        let access = &alloc.access;
        if access.expires <= now || !access.permitted(from.ip(), now) || len > usize::from(u16::MAX)
        {
            return Output::None;
        }
        if !alloc.view.take_to_client(len, now) {
            return Output::None;
        }
        let five = alloc.five;
        let start = HEADROOM;
        let end = start + len;
        if buf.len() < end + TAILROOM {
            return Output::None;
        }
        let range = if let Some(number) = alloc.access.channel_by_peer(from, now) {
            buf[start - 4..start].copy_from_slice(&ChannelData::header(number, len as u16));
            let mut end = end;
            if five.transport.is_stream() {
                let pad = stun::padding(len);
                buf[end..end + pad].fill(0);
                end += pad;
            }
            start - 4..end
        } else {
            let tid = self.indication_tid();
            let (prefix, plen) = stun::data_indication_prefix(from, len, &tid);
            buf[start - plen..start].copy_from_slice(&prefix[..plen]);
            let pad = stun::padding(len);
            buf[end..end + pad].fill(0);
            start - plen..end + pad
        };
        self.counters.count(TO_CLIENT, five.transport, len);
        Output::ToClient { to: five, range }
    }

    /// Handles an ICMP error that a datagram sent from relay `relay` met on
    /// its way to a peer (RFC 8656 §11.5): the client hears of it in a Data
    /// indication with an ICMP attribute instead of DATA, written at the
    /// start of `buf`. Only destination unreachable and time exceeded
    /// (ICMPv4 3 and 11), and destination unreachable, packet too big and
    /// time exceeded (ICMPv6 1, 2 and 3), and only for a peer the
    /// allocation has a permission for (by address; ports are not
    /// compared), as for data.
    pub fn on_icmp(
        &mut self,
        now: Instant,
        relay: RelayId,
        error: IcmpError,
        buf: &mut [u8],
    ) -> Output {
        let relayed = match error.peer {
            SocketAddr::V4(_) => matches!(error.icmp_type, 3 | 11),
            SocketAddr::V6(_) => matches!(error.icmp_type, 1..=3),
        };
        if !relayed {
            return Output::None;
        }
        // Header, XOR-PEER-ADDRESS and ICMP.
        let len = 20 + 4 + if error.peer.is_ipv4() { 8 } else { 20 } + 4 + 8;
        let Some(Some(alloc)) = self.allocations.get_mut(relay.0 as usize) else {
            return Output::None;
        };
        if alloc.access.expires <= now
            || !alloc.access.permitted(error.peer.ip(), now)
            || buf.len() < len
            || !alloc.view.take_to_client(len, now)
        {
            return Output::None;
        }
        let five = alloc.five;
        let mtu_carried = match error.peer {
            SocketAddr::V4(_) => error.icmp_type == 3 && error.code == 4,
            SocketAddr::V6(_) => error.icmp_type == 2,
        };
        let icmp = stun::Icmp {
            icmp_type: error.icmp_type,
            code: u16::from(error.code),
            error_data: if mtu_carried { error.mtu } else { 0 },
        };
        let tid = self.indication_tid();
        let mut message = MessageBuilder::new(method::DATA, Class::Indication, &tid);
        message
            .xor_address(attr::XOR_PEER_ADDRESS, error.peer)
            .attr(attr::ICMP, &icmp.encode());
        let message = message.finish();
        debug_assert_eq!(message.len(), len);
        buf[..len].copy_from_slice(&message);
        metrics::counter!("callisto_turn_icmp_relayed_total").increment(1);
        Output::ToClient {
            to: five,
            range: 0..len,
        }
    }

    /// Data indications need a transaction id, and any value will do
    /// (RFC 8656 §11.6): a counter, scrambled so ids do not look sequential.
    fn indication_tid(&mut self) -> [u8; 12] {
        self.indications += 1;
        let mut h = FxHasher::default();
        h.write_u64(self.indications);
        let mut tid = [0u8; 12];
        tid[..8].copy_from_slice(&h.finish().to_le_bytes());
        tid[8..].copy_from_slice(&(self.indications as u32).to_le_bytes());
        tid
    }

    /// Expires allocations, permissions and channels.
    pub fn on_timeout(&mut self, now: Instant) {
        if self.next_sweep.is_some_and(|t| t > now) {
            return;
        }
        self.shared.expire_reservations(now);
        let expired: Vec<u32> = self
            .allocations
            .iter()
            .enumerate()
            .filter_map(|(i, a)| {
                a.as_ref()
                    .filter(|a| a.access.expires <= now)
                    .map(|_| i as u32)
            })
            .collect();
        for slot in expired {
            // Each half of a dual allocation has a lifetime of its own.
            self.remove_half(slot, Ended::Expired, now);
        }
        let mut shrunk = Vec::new();
        for (slot, a) in self.allocations.iter_mut().enumerate() {
            let Some(a) = a else { continue };
            let a = &mut a.access;
            let before = (a.permissions.len(), a.channels.len());
            a.permissions.retain(|(_, exp)| *exp > now);
            a.channels.retain(|c| c.expires + CHANNEL_QUARANTINE > now);
            let removed_p = before.0 - a.permissions.len();
            let removed_c = before.1 - a.channels.len();
            if removed_p + removed_c > 0 {
                shrunk.push(slot as u32);
            }
            // Looking a metric up costs a hash lookup: skip it when nothing
            // expired, which is nearly every allocation at every sweep.
            if removed_p > 0 {
                metrics::gauge!("callisto_turn_permissions").decrement(removed_p as f64);
            }
            if removed_c > 0 {
                metrics::gauge!("callisto_turn_channels").decrement(removed_c as f64);
            }
        }
        for slot in shrunk {
            self.sync_routes(slot, now);
        }
        self.unauth
            .retain(|_, b| now.saturating_duration_since(b.last) < Duration::from_secs(10));
        self.next_sweep = (!self.by_five.is_empty() || !self.unauth.is_empty())
            .then(|| now + Duration::from_secs(1));
    }

    /// Ends every allocation, as the server stops: each is logged as
    /// ended, with what it relayed, so that the log says until when its
    /// client held its relay, and its quota places are given back.
    pub fn end_all(&mut self, now: Instant) {
        let live: Vec<u32> = self.by_five.values().copied().collect();
        for slot in live {
            self.remove_allocation(slot, Ended::ServerStopped, now);
        }
    }

    /// Ends every allocation after a panic (a bug) may have left this
    /// server's state half-changed, and forgets what else it kept (views of
    /// other workers' relays, budgets of unauthenticated sources), as a
    /// new server would start. The slots themselves are walked, not the
    /// indexes into them, which the panic may have left behind. Its clients
    /// find their allocations gone (437) and allocate again; other
    /// servers' clients are untouched. Route removals are left for the
    /// driver to apply.
    pub fn reset_after_panic(&mut self, now: Instant) {
        // Places taken for allocations the panic cut short; those of
        // installed ones are given back as they end, below.
        for u in std::mem::take(&mut self.unfilled) {
            if self
                .allocations
                .get(u.slot as usize)
                .is_none_or(Option::is_none)
            {
                self.shared.unreserve(&u.username, u.source);
            }
        }
        for slot in 0..self.allocations.len() {
            let slot = slot as u32;
            self.remove_half(slot, Ended::Failed, now);
            // A socket bound for an allocation that the panic cut short.
            self.relays.release(RelayId(slot));
        }
        self.allocations.clear();
        self.free_slots.clear();
        self.by_five.clear();
        self.by_relay_addr.clear();
        self.views.clear();
        self.unauth.clear();
        self.next_sweep = None;
    }

    /// Drops every allocation of a client whose stream connection closed.
    pub fn on_client_closed(&mut self, now: Instant, five: FiveTuple) {
        if let Some(slot) = self.by_five.get(&five).copied() {
            self.remove_allocation(slot, Ended::ConnectionClosed, now);
        }
    }

    /// ChannelData on `channel` from `five`'s client, whose data is
    /// `buf[data]`.
    fn client_channel_data(
        &mut self,
        now: Instant,
        five: FiveTuple,
        channel: u16,
        data: Range<usize>,
        buf: &mut [u8],
    ) -> Output {
        let Some(&slot) = self.by_five.get(&five) else {
            return Output::None;
        };
        let Some(first) = self.allocations[slot as usize].as_ref() else {
            return Output::None;
        };
        // On this half, else on the other half of a dual allocation.
        let found = match first.access.channel_by_number(channel) {
            Some(bound) => Some((first, bound)),
            None => first
                .sibling
                .and_then(|other| self.allocations[other as usize].as_ref())
                .and_then(|a| Some((a, a.access.channel_by_number(channel)?))),
        };
        let Some((alloc, bound)) = found else {
            return Output::None;
        };
        let access = &alloc.access;
        let peer = bound.peer;
        if bound.expires <= now || access.expires <= now || !access.permitted(peer.ip(), now) {
            return Output::None;
        }
        if !alloc.view.take_to_peer(data.len(), now) {
            return Output::None;
        }
        let relay = alloc.relay;
        let from = alloc.advertised;
        self.counters.count(TO_PEER, five.transport, data.len());
        if let Some(out) = self
            .relay_locally(now, from, peer, data.clone(), buf)
            .or_else(|| self.relay_across(now, five, from, peer, data.clone(), buf))
        {
            return out;
        }
        Output::ToPeer {
            relay,
            peer,
            range: data,
        }
    }

    /// When the peer is another allocation of this same server (the common
    /// relay/relay case of WebRTC), hands the data `buf[data]` straight to
    /// that allocation's client instead of sending it through two relay
    /// sockets and the kernel: a header for the receiver is written in
    /// front of the data, where the sender's was. ChannelData on the
    /// receiver's channel for `from`; without a channel, a Data indication,
    /// when the data has room for its header before it ([`InPlace::fits`]).
    /// Only when the receiver is on UDP; otherwise the kernel path runs,
    /// with identical results.
    fn relay_locally(
        &mut self,
        now: Instant,
        from: SocketAddr,
        peer: SocketAddr,
        data: Range<usize>,
        buf: &mut [u8],
    ) -> Option<Output> {
        if !self.shared.config.relay_in_place {
            return None;
        }
        let &slot = self.by_relay_addr.get(&peer)?;
        let target = self.allocations[slot as usize].as_mut()?;
        if target.five.transport != Transport::Udp {
            return None;
        }
        let how = target.access.in_place(from, now);
        match how {
            InPlace::Kernel => return None,
            InPlace::Drop => return Some(Output::None),
            _ if !how.fits(from, &data, buf.len()) => return None,
            _ => {}
        }
        if !target.view.take_to_client(data.len(), now) {
            return Some(Output::None);
        }
        let to = target.five;
        Some(self.deliver(to, None, how, from, data, buf))
    }

    /// Like [`Server::relay_locally`], when the peer is an allocation of
    /// another worker: without this, data between two clients that landed
    /// on different workers would cost a send, a wake-up of the other
    /// worker and a receive more than between two on the same one. This
    /// worker sends it to the receiving client itself, from its own socket
    /// on the same address, after checking the receiver's permissions and
    /// channels as published in `Shared`.
    ///
    /// A UDP receiver gets it from the listening address it talks to,
    /// when this worker can send from there (its own, or for a stream
    /// connection the `udp_source`); a TCP or TLS receiver through its
    /// connection's inbox. A bandwidth limit holds whoever relays: the
    /// receiver's budget is in its view.
    fn relay_across(
        &mut self,
        now: Instant,
        sender: FiveTuple,
        from: SocketAddr,
        peer: SocketAddr,
        data: Range<usize>,
        buf: &mut [u8],
    ) -> Option<Output> {
        if !self.shared.config.relay_in_place {
            return None;
        }
        // Most peers are not ours at all: no lookup for them.
        if !self.is_own_relay_ip(peer.ip()) {
            return None;
        }
        let view = self.view_of(peer)?;
        let reachable = match (&view.inbox, view.to.transport) {
            (Some(_), _) => true,
            (None, Transport::Udp) => {
                let source = match sender.transport {
                    Transport::Udp => Some(sender.server),
                    Transport::Tcp | Transport::Tls => self.udp_source,
                };
                source == Some(view.to.server)
            }
            (None, Transport::Tcp | Transport::Tls) => false,
        };
        if !reachable {
            return None;
        }
        let access = view.lock();
        if access.closed {
            // Its allocation is gone: look again next time (the address
            // may have been given to a new one).
            drop(access);
            self.views.remove(&peer);
            return None;
        }
        let how = access.in_place(from, now);
        drop(access);
        match how {
            InPlace::Kernel => return None,
            InPlace::Drop => return Some(Output::None),
            _ if !how.fits(from, &data, buf.len()) => return None,
            _ => {}
        }
        if !view.take_to_client(data.len(), now) {
            return Some(Output::None);
        }
        Some(self.deliver(view.to, view.inbox.as_ref(), how, from, data, buf))
    }

    /// Another worker's allocation at `peer`, from this worker's cache or
    /// else from `Shared`. A view found stays cached until its allocation
    /// is gone, however many others come and go meanwhile; that `peer` is
    /// nobody's is remembered only until the next allocation anywhere.
    fn view_of(&mut self, peer: SocketAddr) -> Option<Arc<RelayView>> {
        let version = self.shared.relays_version();
        if self.views.len() >= MAX_CACHED_VIEWS {
            self.views.clear();
        }
        match self.views.get(&peer) {
            Some(Cached::Found(view)) => return Some(view.clone()),
            Some(Cached::Nobody(v)) if *v == version => return None,
            _ => {}
        }
        let found = self.shared.relay_view(peer);
        let entry = match &found {
            Some(view) => Cached::Found(view.clone()),
            None => Cached::Nobody(version),
        };
        self.views.insert(peer, entry);
        found
    }

    /// Frames `buf[data]` from `from` for `to`, as `how` says (which
    /// [`InPlace::fits`] it), for its stream's `inbox` if it has one.
    fn deliver(
        &mut self,
        to: FiveTuple,
        inbox: Option<&Inbox>,
        how: InPlace,
        from: SocketAddr,
        data: Range<usize>,
        buf: &mut [u8],
    ) -> Output {
        let len = data.len();
        let range = match how {
            InPlace::Deliver(channel) => {
                buf[data.start - 4..data.start]
                    .copy_from_slice(&ChannelData::header(channel, len as u16));
                data.start - 4..data.end
            }
            InPlace::Indicate => {
                // Everything after the data was parsed already: moving the
                // data over it loses nothing.
                let shift = indication_shift(from, &data);
                let data = if shift > 0 {
                    buf.copy_within(data.clone(), data.start + shift);
                    data.start + shift..data.end + shift
                } else {
                    data
                };
                let tid = self.indication_tid();
                let (prefix, plen) = stun::data_indication_prefix(from, len, &tid);
                let end = data.end + stun::padding(len);
                buf[data.start - plen..data.start].copy_from_slice(&prefix[..plen]);
                buf[data.end..end].fill(0);
                data.start - plen..end
            }
            InPlace::Drop | InPlace::Kernel => return Output::None,
        };
        self.counters.count(TO_CLIENT, to.transport, len);
        self.counters.in_place.increment(1);
        match inbox {
            Some(inbox) => Output::ToStream {
                inbox: inbox.clone(),
                range,
            },
            None => Output::ToClient { to, range },
        }
    }

    /// `buf[data]` from `five`'s client for `peer`. To another of our
    /// allocations it is relayed in place, as ChannelData does: a Send
    /// indication has room before its data for either header.
    /// With `dont_fragment` (the indication's DONT-FRAGMENT), the relay
    /// sends with DF from then on: the socket option is the relay's, not
    /// the datagram's, and keeping it costs nothing but fragmentation by
    /// this server, which a client that asked once does not want.
    fn on_send_indication(
        &mut self,
        now: Instant,
        five: FiveTuple,
        peer: SocketAddr,
        data: Range<usize>,
        dont_fragment: bool,
        buf: &mut [u8],
    ) -> Output {
        let Some(slot) = self
            .by_five
            .get(&five)
            .and_then(|&slot| self.half_of_family(slot, peer.is_ipv6()))
        else {
            return Output::None;
        };
        if !self.shared_port_ok(peer) {
            return Output::None;
        }
        let Some(alloc) = self.allocations[slot as usize].as_ref() else {
            return Output::None;
        };
        if alloc.access.expires <= now || !alloc.access.permitted(peer.ip(), now) {
            return Output::None;
        }
        if !alloc.view.take_to_peer(data.len(), now) {
            return Output::None;
        }
        let relay = alloc.relay;
        let from = alloc.advertised;
        if dont_fragment && let Err(e) = self.set_dont_fragment(slot, now) {
            // RFC 8656 §11.2: a server that cannot set DF discards it.
            tracing::debug!(error = %e, "dropped a Send indication with DONT-FRAGMENT: cannot set DF");
            return Output::None;
        }
        self.counters.count(TO_PEER, five.transport, data.len());
        if let Some(out) = self
            .relay_locally(now, from, peer, data.clone(), buf)
            .or_else(|| self.relay_across(now, five, from, peer, data.clone(), buf))
        {
            return out;
        }
        Output::ToPeer {
            relay,
            peer,
            range: data,
        }
    }

    /// A peer on one of our own relay IPs must be one of our live relays:
    /// the relay IP may be loopback or private, and its other ports are
    /// not ours to open up.
    fn shared_port_ok(&self, peer: SocketAddr) -> bool {
        !self.is_own_relay_ip(peer.ip()) || self.peer_allowed(peer, true)
    }

    fn is_own_relay_ip(&self, ip: IpAddr) -> bool {
        let c = &self.shared.config;
        c.relay_ips.contains(&ip) || c.external_ips.contains(&ip)
    }

    /// Permissions name an IP only; channels (`check_port`) a whole address.
    fn peer_allowed(&self, peer: SocketAddr, check_port: bool) -> bool {
        if self.shared.config.policy.is_allowed(peer.ip()) {
            return true;
        }
        if check_port {
            self.shared.is_live_relay(peer)
        } else {
            self.is_own_relay_ip(peer.ip())
        }
    }

    fn on_request(&mut self, now: Instant, five: FiveTuple, msg: &Message<'_>) -> Output {
        tracing::trace!(client = %five.client, method = msg.method(), len = msg.as_bytes().len(), integrity = msg.has_integrity(), "request");
        let unknown = msg.unknown_required(attr::is_known);
        if !unknown.is_empty() {
            return self.unauth_answer(now, five, msg, |this| {
                let mut b = this.response(msg, Class::Error);
                b.error(420, "Unknown Attribute");
                let list: Vec<u8> = unknown.iter().flat_map(|t| t.to_be_bytes()).collect();
                b.attr(attr::UNKNOWN_ATTRIBUTES, &list);
                b
            });
        }
        if msg.method() == method::BINDING {
            return self.unauth_answer(now, five, msg, |this| {
                let mut b = this.response(msg, Class::Success);
                b.xor_address(attr::XOR_MAPPED_ADDRESS, five.client);
                b
            });
        }
        if !matches!(
            msg.method(),
            method::ALLOCATE | method::REFRESH | method::CREATE_PERMISSION | method::CHANNEL_BIND
        ) {
            return self.unauth_answer(now, five, msg, |this| {
                let mut b = this.response(msg, Class::Error);
                b.error(400, "Bad Request: unknown method");
                b
            });
        }
        // A retransmitted Allocate gets the same answer, without re-checking
        // the (possibly since expired) nonce.
        if msg.method() == method::ALLOCATE
            && let Some(&slot) = self.by_five.get(&five)
            && let Some(a) = &self.allocations[slot as usize]
            && &a.allocate_tid == msg.transaction_id()
        {
            return Output::Reply {
                to: five,
                data: a.allocate_response.clone(),
            };
        }
        // A client sent to an alternate server (RFC 8489 §10) is sent
        // there at its first Allocate, before any challenge: a browser
        // goes on with the realm and nonce it has (none yet, so it is
        // challenged there by the alternate's own), while one that had
        // authenticated here would go with this server's nonce, which the
        // alternate refuses; Chromium then gives up. The unsigned answer
        // goes through `unauth_answer` like a challenge. A request that
        // comes signed gets a signed answer, below.
        let alternate = (msg.method() == method::ALLOCATE && !self.by_five.contains_key(&five))
            .then(|| self.shared.alternate_for(&five))
            .flatten();
        let redirect = |this: &Self, alternate: SocketAddr| {
            let mut b = this.response(msg, Class::Error);
            b.error(300, "Try Alternate");
            b.address(attr::ALTERNATE_SERVER, alternate);
            b
        };
        let sent = |out: Output, alternate: SocketAddr| {
            if matches!(out, Output::Reply { .. }) {
                metrics::counter!("callisto_turn_redirected_total", "transport" => five.transport.as_str())
                    .increment(1);
                tracing::debug!(client = %five.client, %alternate, "sent a client to an alternate server");
            }
            out
        };
        if let Some(alternate) = alternate
            && !msg.has_integrity()
        {
            let out = self.unauth_answer(now, five, msg, |this| redirect(this, alternate));
            return sent(out, alternate);
        }
        let authed = match self.authenticate(now, five, msg) {
            Ok(a) => a,
            Err(out) => return out,
        };
        if let Some(alternate) = alternate {
            let b = redirect(self, alternate);
            return sent(self.reply(five, msg, b, Some(&authed.key)), alternate);
        }
        let result = match msg.method() {
            method::ALLOCATE => self.allocate(now, five, msg, &authed),
            method::REFRESH => self.refresh(now, five, msg, &authed),
            method::CREATE_PERMISSION => self.create_permission(now, five, msg, &authed),
            _ => self.channel_bind(now, five, msg, &authed),
        };
        match result {
            Ok(out) => out,
            Err(r) => {
                tracing::debug!(client = %five.client, code = r.code, reason = r.reason, "refused a TURN request");
                let mut b = self.response(msg, Class::Error);
                b.error(r.code, r.reason);
                self.reply(five, msg, b, Some(&authed.key))
            }
        }
    }

    /// The long-term credential mechanism: 401 with a nonce for a request
    /// without integrity, 438 for a stale nonce, 401 for bad credentials.
    fn authenticate(
        &mut self,
        now: Instant,
        five: FiveTuple,
        msg: &Message<'_>,
    ) -> Result<Authed, Output> {
        let shared = self.shared.clone();
        let creds = &shared.config.credentials;
        let challenge = |this: &mut Self, code: u16, reason: &str| -> Output {
            this.unauth_answer(now, five, msg, |this| {
                let mut b = this.response(msg, Class::Error);
                b.error(code, reason)
                    .attr(attr::REALM, creds.realm().as_bytes())
                    .attr(attr::NONCE, shared.make_nonce(&five, now).as_bytes());
                b
            })
        };
        if !msg.has_integrity() {
            return Err(challenge(self, 401, "Unauthorized"));
        }
        let (Some(username), Some(_realm), Some(nonce)) = (
            msg.get(attr::USERNAME),
            msg.get(attr::REALM),
            msg.get(attr::NONCE),
        ) else {
            return Err(self.unauth_answer(now, five, msg, |this| {
                let mut b = this.response(msg, Class::Error);
                b.error(400, "Bad Request: missing USERNAME, REALM or NONCE");
                b
            }));
        };
        let failed = |reason: &'static str| {
            shared.auth_failed(now, &five, msg.method(), username, reason);
        };
        if !shared.nonce_is_valid(&five, nonce, now) {
            // Expired, or not one this server gave this 5-tuple: from
            // before a restart (the nonce key is new at each start), from
            // another server, or from before the client's NAT moved it.
            // RFC 8489 §9.2.5 answers a nonce no longer valid with 438; the
            // client retries with the fresh one, from where it really is,
            // so a nonce captured elsewhere is still of no use. Not an
            // authentication failure: nothing was guessed.
            return Err(challenge(self, 438, "Stale Nonce"));
        }
        let Ok(username) = std::str::from_utf8(username) else {
            failed("bad-username");
            return Err(challenge(self, 401, "Unauthorized"));
        };
        // Credentials that have expired since they made this 5-tuple's
        // allocation still sign for it, as in coturn: an allocation lives
        // as long as it is refreshed, so a call outlasts the credentials'
        // lifetime (applications hand out credentials for an hour or
        // less). Their secret must still be one in use: removing it cuts
        // the allocation off at its next request.
        let holds_allocation = msg.method() != method::ALLOCATE
            && self
                .by_five
                .get(&five)
                .and_then(|&slot| self.allocations[slot as usize].as_ref())
                .is_some_and(|a| a.username == username);
        let keys = if holds_allocation {
            creds.keys_ignoring_expiry(username)
        } else {
            creds.keys(username, shared.unix(now))
        };
        let keys = match keys {
            Ok(k) => k,
            Err(failure) => {
                failed(match failure {
                    AuthFailure::UnknownUser => "unknown-user",
                    AuthFailure::Expired => "expired",
                });
                return Err(challenge(self, 401, "Unauthorized"));
            }
        };
        match keys.into_iter().find(|k| msg.verify_integrity(k)) {
            Some(key) => Ok(Authed {
                username: username.to_owned(),
                key,
            }),
            None => {
                failed("bad-integrity");
                Err(challenge(self, 401, "Unauthorized"))
            }
        }
    }

    /// Every answer to a request that is not authenticated goes through
    /// here, so the server can neither be made to flood a spoofed address
    /// nor to amplify: per source IP, answers are rate limited
    /// (`unauth_rate`), and over UDP the bytes answered never exceed the
    /// bytes received plus a small allowance (`unauth_allowance`). The
    /// allowance is what lets a browser in: Chromium's 20-byte Binding and
    /// 28-byte Allocate requests are smaller than any valid answer (32 and
    /// 88 bytes), so a rule applied to each message alone would leave every
    /// browser unanswered. With no allowance a client is still answered
    /// once its retransmissions have paid for the answer.
    fn unauth_answer(
        &mut self,
        now: Instant,
        five: FiveTuple,
        msg: &Message<'_>,
        build: impl FnOnce(&Self) -> MessageBuilder,
    ) -> Output {
        let request = msg.as_bytes().len();
        if !self.unauth_admit(five, request, now) {
            unauth_dropped("rate");
            return Output::None;
        }
        let data = self.sign(build(self), msg, None);
        if !self.unauth_spend(five, request, data.len()) {
            unauth_dropped("amplification");
            return Output::None;
        }
        Output::Reply { to: five, data }
    }

    /// Refills the source's budget, credits the request's bytes, and takes
    /// one answer from its rate.
    fn unauth_admit(&mut self, five: FiveTuple, request: usize, now: Instant) -> bool {
        let rate = f64::from(self.shared.config.unauth_rate.max(1));
        let allowance = f64::from(self.shared.config.unauth_allowance);
        let tracked = self.unauth.len() < UNAUTH_TRACKED;
        if self.next_sweep.is_none() {
            self.next_sweep = Some(now + Duration::from_secs(1));
        }
        let b = match self.unauth.entry(five.client.ip()) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) if tracked => e.insert(UnauthBudget {
                answers: rate * 2.0,
                bytes: allowance,
                last: now,
            }),
            // Untracked: each answer is judged alone (`unauth_spend`).
            std::collections::hash_map::Entry::Vacant(_) => return true,
        };
        let dt = now.saturating_duration_since(b.last).as_secs_f64();
        b.last = now;
        b.answers = (b.answers + dt * rate).min(rate * 2.0);
        b.bytes = (b.bytes + dt * allowance / 8.0 + request as f64).min(allowance + UNAUTH_BANKED);
        if b.answers >= 1.0 {
            b.answers -= 1.0;
            true
        } else {
            false
        }
    }

    /// Pays for an answer from the source's byte budget. Streams are exempt:
    /// their source address is proven by the handshake.
    fn unauth_spend(&mut self, five: FiveTuple, request: usize, answer: usize) -> bool {
        if five.transport != Transport::Udp {
            return true;
        }
        match self.unauth.get_mut(&five.client.ip()) {
            Some(b) if b.bytes >= answer as f64 => {
                b.bytes -= answer as f64;
                true
            }
            Some(_) => false,
            None => answer <= request,
        }
    }

    fn allocate(
        &mut self,
        now: Instant,
        five: FiveTuple,
        msg: &Message<'_>,
        authed: &Authed,
    ) -> Result<Output, Refusal> {
        if self.by_five.contains_key(&five) {
            return Err(refuse(437, "Allocation Mismatch"));
        }
        let tid = msg.transaction_id();
        let transport = msg
            .get(attr::REQUESTED_TRANSPORT)
            .ok_or(refuse(400, "Bad Request: REQUESTED-TRANSPORT missing"))?;
        if transport.len() != 4 {
            return Err(refuse(400, "Bad Request: malformed REQUESTED-TRANSPORT"));
        }
        if transport[0] != attr::TRANSPORT_UDP {
            return Err(refuse(442, "Unsupported Transport Protocol"));
        }
        // EVEN-PORT: an even relay port, and with the R bit the port above
        // it held for a second Allocate that brings the RESERVATION-TOKEN
        // (RTP and RTCP on adjacent ports).
        let (even, reserve) = match msg.get(attr::EVEN_PORT) {
            None => (false, false),
            Some([r]) => (true, r & 0x80 != 0),
            Some(_) => return Err(refuse(400, "Bad Request: malformed EVEN-PORT")),
        };
        let token = msg.get(attr::RESERVATION_TOKEN);
        let requested = msg.get(attr::REQUESTED_ADDRESS_FAMILY);
        // A dual allocation, asked for in the RFC's numbering or in the
        // draft's (coturn's clients); answered in the same.
        let (additional, address_error_kind) = match msg.get(attr::ADDITIONAL_ADDRESS_FAMILY) {
            Some(v) => (Some(v), attr::ADDRESS_ERROR_CODE),
            None => (
                msg.get(attr::ADDITIONAL_ADDRESS_FAMILY_DRAFT),
                attr::ADDRESS_ERROR_CODE_DRAFT,
            ),
        };
        if requested.is_some() && additional.is_some() {
            return Err(refuse(400, "Bad Request: both address family attributes"));
        }
        // A pair of ports is held in one family: RFC 8656 §7.2 refuses
        // asking for it with two families.
        if reserve && additional.is_some() {
            return Err(refuse(
                400,
                "Bad Request: EVEN-PORT with the R bit and ADDITIONAL-ADDRESS-FAMILY",
            ));
        }
        if let Some(token) = token {
            // The reserved port decides the family and the parity.
            if token.len() != 8 {
                return Err(refuse(400, "Bad Request: malformed RESERVATION-TOKEN"));
            }
            if even || requested.is_some() || additional.is_some() {
                return Err(refuse(
                    400,
                    "Bad Request: RESERVATION-TOKEN with EVEN-PORT or an address family",
                ));
            }
        }
        let ipv6 = match requested.map(|v| v.first().copied()) {
            None => match self.shared.config.default_family {
                DefaultFamily::Ipv4 => false,
                DefaultFamily::Ipv6 => true,
                // An IPv4 address in IPv6's clothes (a dual-stack socket)
                // is an IPv4 client.
                DefaultFamily::Client => match five.client.ip() {
                    IpAddr::V6(ip) => ip.to_ipv4_mapped().is_none(),
                    IpAddr::V4(_) => false,
                },
            },
            Some(Some(attr::FAMILY_IPV4)) => false,
            Some(Some(attr::FAMILY_IPV6)) => true,
            Some(_) => return Err(refuse(440, "Address Family not Supported")),
        };
        if let Some(v) = additional
            && v.first() != Some(&attr::FAMILY_IPV6)
        {
            return Err(refuse(
                400,
                "Bad Request: ADDITIONAL-ADDRESS-FAMILY must be IPv6",
            ));
        }
        let lifetime = self.lifetime(msg)?;
        let source = Source::of(five.client.ip());
        let slot = self.take_slot(&authed.username, source)?;
        let relay = RelayId(slot);
        let bound = match token {
            Some(token) => match self.shared.redeem(token, now) {
                Some(held) => self.relays.allocate_held(relay, held).map(|a| (a, None)),
                None => {
                    self.give_slot_back(slot);
                    return Err(refuse(
                        508,
                        "Insufficient Capacity: unknown or expired RESERVATION-TOKEN",
                    ));
                }
            },
            None if reserve => self.allocate_pair(relay, ipv6, &authed.username, source, now),
            None => self.relays.allocate(relay, ipv6, even).map(|a| (a, None)),
        };
        let (relay_addr, reservation) = match bound {
            Ok(a) => a,
            Err(e) => {
                self.give_slot_back(slot);
                tracing::warn!(error = %e, ipv6, reserve, "no relay socket available");
                // No relay address of the family, asked for or not: 440
                // (RFC 8656 section 7.2), which says so; 508 would say to
                // try again later.
                return Err(if e.kind() == io::ErrorKind::Unsupported {
                    refuse(440, "Address Family not Supported")
                } else {
                    refuse(508, "Insufficient Capacity")
                });
            }
        };
        // A dual allocation's IPv6 half; when it cannot be had, the IPv4
        // one is still given, with ADDRESS-ERROR-CODE saying why not.
        let second = additional.map(|_| self.bind_ipv6_half(&authed.username, source));
        let advertise = |addr: SocketAddr| {
            SocketAddr::new(self.shared.config.advertised_ip(addr.ip()), addr.port())
        };
        let advertised = advertise(relay_addr);
        let mut b = self.response(msg, Class::Success);
        b.xor_address(attr::XOR_RELAYED_ADDRESS, advertised);
        if let Some(Ok((_, addr))) = second {
            b.xor_address(attr::XOR_RELAYED_ADDRESS, advertise(addr));
        }
        b.u32(attr::LIFETIME, lifetime.as_secs() as u32)
            .xor_address(attr::XOR_MAPPED_ADDRESS, five.client);
        if let Some(token) = reservation {
            b.attr(attr::RESERVATION_TOKEN, &token);
        }
        if let Some(Err(why)) = &second {
            b.address_error_as(address_error_kind, attr::FAMILY_IPV6, why.code, why.reason);
        }
        let response = self.sign(b, msg, Some(&authed.key));
        let installed = Installed {
            five,
            username: &authed.username,
            expires: now + lifetime,
            allocate_tid: *tid,
            allocate_response: &response,
        };
        self.install(slot, relay_addr, &installed, now);
        self.by_five.insert(five, slot);
        if let Some(Ok((half, addr))) = second {
            self.install(half, addr, &installed, now);
            for (one, other) in [(slot, half), (half, slot)] {
                if let Some(a) = self.allocations[one as usize].as_mut() {
                    a.sibling = Some(other);
                }
            }
        }
        if msg.get(attr::DONT_FRAGMENT).is_some() {
            let halves: Vec<u32> = self.halves(slot).collect();
            for half in halves {
                if let Err(e) = self.set_dont_fragment(half, now) {
                    // Not on Linux, where the socket option always takes.
                    tracing::warn!(error = %e, "cannot send with DF: the Allocate that asked for it is refused");
                    self.remove_allocation(slot, Ended::Refused, now);
                    return Err(refuse(508, "Insufficient Capacity: cannot set DF"));
                }
            }
        }
        Ok(Output::Reply {
            to: five,
            data: response,
        })
    }

    /// Makes relay `slot` send with DF from now on (DONT-FRAGMENT), and
    /// takes its routes out of the kernel relay.
    fn set_dont_fragment(&mut self, slot: u32, now: Instant) -> io::Result<()> {
        let Some(a) = self
            .allocations
            .get_mut(slot as usize)
            .and_then(Option::as_mut)
        else {
            return Ok(());
        };
        if a.dont_fragment {
            return Ok(());
        }
        self.relays.dont_fragment(a.relay, a.relay_addr.is_ipv6())?;
        a.dont_fragment = true;
        self.sync_routes(slot, now);
        Ok(())
    }

    /// Puts a relay bound at `relay_addr` into service as slot `slot`: an
    /// allocation, or half of a dual one.
    fn install(&mut self, slot: u32, relay_addr: SocketAddr, how: &Installed<'_>, now: Instant) {
        let five = how.five;
        let advertised = SocketAddr::new(
            self.shared.config.advertised_ip(relay_addr.ip()),
            relay_addr.port(),
        );
        let bps = self.shared.config.bps_per_allocation;
        let shared_budgets = self.shared.budgets.as_ref();
        let view = Arc::new(RelayView {
            to: five,
            inbox: self.inbox.clone().filter(|_| five.transport.is_stream()),
            access: Mutex::new(PeerAccess::new(how.expires)),
            budget: (bps != 0)
                .then(|| Budget::new(bps, shared_budgets, relay_addr, self.shared.epoch.0)),
            relayed: Default::default(),
        });
        self.allocations[slot as usize] = Some(Allocation {
            five,
            relay: RelayId(slot),
            relay_addr,
            advertised,
            username: how.username.to_owned(),
            access: PeerAccess::new(how.expires),
            view: view.clone(),
            allocate_tid: how.allocate_tid,
            allocate_response: how.allocate_response.to_vec(),
            routes: routes::Routes::default(),
            sibling: None,
            dont_fragment: false,
            created: now,
        });
        self.unfilled.retain(|u| u.slot != slot);
        self.by_relay_addr.insert(relay_addr, slot);
        self.by_relay_addr.insert(advertised, slot);
        self.shared.set_relay([relay_addr, advertised], Some(&view));
        self.next_sweep.get_or_insert(now + Duration::from_secs(1));
        metrics::counter!("callisto_turn_allocations_total", "transport" => five.transport.as_str())
            .increment(1);
        metrics::gauge!("callisto_turn_allocations").increment(1.0);
        // Who held which relay when: what an abuse report about a relayed
        // address needs. Usernames are not secret; passwords never come here.
        tracing::info!(
            client = %five.client,
            transport = five.transport.as_str(),
            relay = %advertised,
            username = how.username,
            lifetime_s = how.expires.saturating_duration_since(now).as_secs(),
            "allocation created"
        );
    }

    /// A free slot for a new allocation (or half of one) of `username`
    /// from `source`, within the quotas; the caller fills it, or gives the
    /// slot and the quota back.
    fn take_slot(&mut self, username: &str, source: Source) -> Result<u32, Refusal> {
        self.shared.reserve(username, source).map_err(|code| {
            if code == 486 {
                refuse(486, "Allocation Quota Reached")
            } else {
                refuse(508, "Insufficient Capacity")
            }
        })?;
        let slot = self.free_slots.pop().unwrap_or_else(|| {
            self.allocations.push(None);
            (self.allocations.len() - 1) as u32
        });
        self.unfilled.push(Unfilled {
            slot,
            username: username.to_owned(),
            source,
        });
        Ok(slot)
    }

    /// Frees a slot from [`Server::take_slot`] that was not installed, and
    /// gives its quota places back.
    fn give_slot_back(&mut self, slot: u32) {
        if let Some(i) = self.unfilled.iter().position(|u| u.slot == slot) {
            let u = self.unfilled.swap_remove(i);
            self.free_slots.push(slot);
            self.shared.unreserve(&u.username, u.source);
        }
    }

    /// Binds the IPv6 relay of a dual allocation, in a slot of its own and
    /// under the quotas like any allocation.
    fn bind_ipv6_half(
        &mut self,
        username: &str,
        source: Source,
    ) -> Result<(u32, SocketAddr), Refusal> {
        let slot = self.take_slot(username, source)?;
        self.relays.allocate(RelayId(slot), true, false).map(|addr| (slot, addr)).map_err(|e| {
            self.give_slot_back(slot);
            if e.kind() == io::ErrorKind::Unsupported {
                refuse(440, "Address Family not Supported")
            } else {
                tracing::warn!(error = %e, "no IPv6 relay socket available for a dual allocation");
                refuse(508, "Insufficient Capacity")
            }
        })
    }

    /// Binds an even relay port for `relay` and holds the one above it
    /// under a new token; tries a few even ports whose successor is free.
    fn allocate_pair(
        &mut self,
        relay: RelayId,
        ipv6: bool,
        username: &str,
        source: Source,
        now: Instant,
    ) -> io::Result<(SocketAddr, Option<[u8; 8]>)> {
        let mut last = io::Error::new(io::ErrorKind::AddrInUse, "no free pair of ports");
        for _ in 0..RESERVATION_TRIES {
            let addr = self.relays.allocate(relay, ipv6, true)?;
            match self.relays.hold_next(addr) {
                Ok(held) => {
                    return match self.shared.hold(held, username, source, now) {
                        Some(token) => Ok((addr, Some(token))),
                        None => {
                            self.relays.release(relay);
                            Err(io::Error::other("too many ports held for reservations"))
                        }
                    };
                }
                Err(e) => {
                    self.relays.release(relay);
                    last = e;
                }
            }
        }
        Err(last)
    }

    fn lifetime(&self, msg: &Message<'_>) -> Result<Duration, Refusal> {
        let max = self.shared.config.max_lifetime;
        match msg.get(attr::LIFETIME) {
            None => Ok(DEFAULT_LIFETIME.min(max)),
            Some(v) => {
                let secs = stun::decode_u32(attr::LIFETIME, v)
                    .map_err(|_| refuse(400, "Bad Request: malformed LIFETIME"))?;
                let asked = Duration::from_secs(u64::from(secs));
                if asked.is_zero() {
                    return Ok(Duration::ZERO);
                }
                Ok(asked.max(DEFAULT_LIFETIME).min(max))
            }
        }
    }

    /// The allocation of `five`, checked against the request's user.
    fn own_allocation(&mut self, five: FiveTuple, authed: &Authed) -> Result<u32, Refusal> {
        let slot = *self
            .by_five
            .get(&five)
            .ok_or(refuse(437, "Allocation Mismatch"))?;
        match &self.allocations[slot as usize] {
            Some(a) if a.username == authed.username => Ok(slot),
            Some(_) => Err(refuse(441, "Wrong Credentials")),
            None => Err(refuse(437, "Allocation Mismatch")),
        }
    }

    fn refresh(
        &mut self,
        now: Instant,
        five: FiveTuple,
        msg: &Message<'_>,
        authed: &Authed,
    ) -> Result<Output, Refusal> {
        let slot = self.own_allocation(five, authed)?;
        let lifetime = self.lifetime(msg)?;
        // With REQUESTED-ADDRESS-FAMILY, only the relay of that family is
        // refreshed or deleted (RFC 8656 §7.3): one half of a dual
        // allocation.
        let halves: Vec<u32> = match msg.get(attr::REQUESTED_ADDRESS_FAMILY) {
            Some(v) => {
                let ipv6 = v.first() == Some(&attr::FAMILY_IPV6);
                let half = self
                    .half_of_family(slot, ipv6)
                    .ok_or(refuse(443, "Peer Address Family Mismatch"))?;
                vec![half]
            }
            None => self.halves(slot).collect(),
        };
        for half in halves {
            if lifetime.is_zero() {
                self.remove_half(half, Ended::Deleted, now);
            } else if let Some(a) = self.allocations[half as usize].as_mut() {
                a.access.expires = now + lifetime;
                self.access_changed(half, now);
            }
        }
        let mut b = self.response(msg, Class::Success);
        b.u32(attr::LIFETIME, lifetime.as_secs() as u32);
        Ok(self.reply(five, msg, b, Some(&authed.key)))
    }

    /// Of `slot`'s allocation, the half whose relay is IPv6 if `ipv6`, or
    /// IPv4: `slot` itself, or the other half of a dual allocation.
    fn half_of_family(&self, slot: u32, ipv6: bool) -> Option<u32> {
        let a = self.allocations.get(slot as usize)?.as_ref()?;
        if a.relay_addr.is_ipv6() == ipv6 {
            return Some(slot);
        }
        let other = a.sibling?;
        let b = self.allocations.get(other as usize)?.as_ref()?;
        (b.relay_addr.is_ipv6() == ipv6).then_some(other)
    }

    /// `slot`, and the other half of its allocation if it is dual.
    fn halves(&self, slot: u32) -> impl Iterator<Item = u32> + use<A> {
        let other = self
            .allocations
            .get(slot as usize)
            .and_then(Option::as_ref)
            .and_then(|a| a.sibling);
        std::iter::once(slot).chain(other)
    }

    /// The XOR-PEER-ADDRESS values of a request, each checked, with the
    /// half of the allocation whose relay serves it.
    fn peers(
        &self,
        msg: &Message<'_>,
        slot: u32,
        check_port: bool,
    ) -> Result<Vec<(SocketAddr, u32)>, Refusal> {
        let mut peers = Vec::new();
        for RawAttr { typ, value } in msg.attrs() {
            if typ != attr::XOR_PEER_ADDRESS {
                continue;
            }
            let peer = stun::decode_xor_address(typ, value, msg.transaction_id())
                .map_err(|_| refuse(400, "Bad Request: malformed XOR-PEER-ADDRESS"))?;
            let Some(half) = self.half_of_family(slot, peer.is_ipv6()) else {
                return Err(refuse(443, "Peer Address Family Mismatch"));
            };
            if !self.peer_allowed(peer, check_port) {
                metrics::counter!("callisto_turn_forbidden_peers_total").increment(1);
                tracing::info!(peer = %peer.ip(), "refused a forbidden peer address");
                return Err(refuse(403, "Forbidden: peer address not allowed"));
            }
            peers.push((peer, half));
        }
        if peers.is_empty() {
            return Err(refuse(400, "Bad Request: XOR-PEER-ADDRESS missing"));
        }
        Ok(peers)
    }

    fn create_permission(
        &mut self,
        now: Instant,
        five: FiveTuple,
        msg: &Message<'_>,
        authed: &Authed,
    ) -> Result<Output, Refusal> {
        let slot = self.own_allocation(five, authed)?;
        let peers = self.peers(msg, slot, false)?;
        let max = self.shared.config.max_permissions;
        // All or nothing: each half's room is checked before any is used.
        let halves: Vec<u32> = self.halves(slot).collect();
        for &half in &halves {
            let Some(a) = self.allocations[half as usize].as_ref() else {
                return Err(refuse(437, "Allocation Mismatch"));
            };
            let permitted = |ip: IpAddr| a.access.permissions.iter().any(|(p, _)| *p == ip);
            let mut new: Vec<IpAddr> = peers
                .iter()
                .filter(|(p, h)| *h == half && !permitted(p.ip()))
                .map(|(p, _)| p.ip())
                .collect();
            new.sort_unstable();
            new.dedup();
            if a.access.permissions.len() + new.len() > max {
                return Err(refuse(508, "Insufficient Capacity: too many permissions"));
            }
        }
        for (p, half) in peers {
            if let Some(a) = self.allocations[half as usize].as_mut() {
                install_permission(&mut a.access, p.ip(), now);
            }
        }
        for half in halves {
            self.access_changed(half, now);
        }
        let b = self.response(msg, Class::Success);
        Ok(self.reply(five, msg, b, Some(&authed.key)))
    }

    fn channel_bind(
        &mut self,
        now: Instant,
        five: FiveTuple,
        msg: &Message<'_>,
        authed: &Authed,
    ) -> Result<Output, Refusal> {
        let slot = self.own_allocation(five, authed)?;
        let number = msg
            .get(attr::CHANNEL_NUMBER)
            .and_then(|v| stun::decode_channel(v).ok())
            .ok_or(refuse(400, "Bad Request: CHANNEL-NUMBER missing"))?;
        if !(stun::CHANNEL_MIN..=stun::CHANNEL_MAX).contains(&number) {
            return Err(refuse(400, "Bad Request: channel number out of range"));
        }
        let peers = self.peers(msg, slot, true)?;
        let &[(peer, half)] = peers.as_slice() else {
            return Err(refuse(400, "Bad Request: one XOR-PEER-ADDRESS expected"));
        };
        // A channel number names one peer in the whole allocation, both
        // halves of a dual one included.
        if self.halves(slot).filter(|&h| h != half).any(|h| {
            self.allocations[h as usize]
                .as_ref()
                .is_some_and(|a| a.access.channel_by_number(number).is_some())
        }) {
            return Err(refuse(400, "Bad Request: channel or peer bound otherwise"));
        }
        let slot = half;
        let max = self.shared.config.max_permissions;
        let max_channels = self.shared.config.max_channels;
        let Some(a) = self.allocations[slot as usize].as_mut() else {
            return Err(refuse(437, "Allocation Mismatch"));
        };
        let access = &mut a.access;
        let by_number = access.channels.iter().position(|c| c.number == number);
        let by_peer = access.channels.iter().position(|c| c.peer == peer);
        match (by_number, by_peer) {
            (Some(i), Some(j)) if i == j => access.channels[i].expires = now + CHANNEL_LIFETIME,
            (None, None) => {
                if !access.permissions.iter().any(|(ip, _)| *ip == peer.ip())
                    && access.permissions.len() >= max
                {
                    return Err(refuse(508, "Insufficient Capacity: too many permissions"));
                }
                if access.channels.len() >= max_channels {
                    return Err(refuse(508, "Insufficient Capacity: too many channels"));
                }
                access.channels.push(Channel {
                    number,
                    peer,
                    expires: now + CHANNEL_LIFETIME,
                });
                metrics::counter!("callisto_turn_channel_bindings_total").increment(1);
                metrics::gauge!("callisto_turn_channels").increment(1.0);
            }
            _ => return Err(refuse(400, "Bad Request: channel or peer bound otherwise")),
        }
        install_permission(access, peer.ip(), now);
        self.access_changed(slot, now);
        let b = self.response(msg, Class::Success);
        Ok(self.reply(five, msg, b, Some(&authed.key)))
    }

    /// Removes `slot`'s allocation, both halves if it is dual.
    fn remove_allocation(&mut self, slot: u32, why: Ended, now: Instant) {
        let halves: Vec<u32> = self.halves(slot).collect();
        for half in halves {
            self.remove_half(half, why, now);
        }
    }

    /// Removes one relay: an allocation, or one half of a dual one, whose
    /// other half then stands alone.
    fn remove_half(&mut self, slot: u32, why: Ended, now: Instant) {
        let Some(a) = self.allocations[slot as usize].take() else {
            return;
        };
        let duration_s = now.saturating_duration_since(a.created).as_secs();
        let client = a.five.client;
        let transport = a.five.transport.as_str();
        let (reason, relay, username) = (why.as_str(), a.advertised, &a.username);
        if self.shared.config.kernel_routes {
            // The kernel relay counts only totals: a tally of the workers'
            // part alone would mislead.
            tracing::info!(%client, transport, %relay, username, reason, duration_s, "allocation ended");
        } else {
            let (to_peer_packets, to_peer_bytes) = a.view.relayed[TO_PEER].get();
            let (to_client_packets, to_client_bytes) = a.view.relayed[TO_CLIENT].get();
            tracing::info!(
                %client,
                transport,
                %relay,
                username,
                reason,
                duration_s,
                to_peer_packets,
                to_peer_bytes,
                to_client_packets,
                to_client_bytes,
                "allocation ended"
            );
        }
        let other = a.sibling;
        if let Some(b) = other.and_then(|s| self.allocations[s as usize].as_mut()) {
            b.sibling = None;
        }
        if self.by_five.get(&a.five) == Some(&slot) {
            match other {
                Some(s) => self.by_five.insert(a.five, s),
                None => self.by_five.remove(&a.five),
            };
        }
        self.by_relay_addr.remove(&a.relay_addr);
        self.by_relay_addr.remove(&a.advertised);
        // A worker that still holds the view relays nothing more through it.
        *a.view.lock() = PeerAccess {
            closed: true,
            ..PeerAccess::new(a.access.expires)
        };
        self.shared.set_relay([a.relay_addr, a.advertised], None);
        self.relays.release(a.relay);
        self.shared
            .unreserve(&a.username, Source::of(a.five.client.ip()));
        self.free_slots.push(slot);
        self.route_changes.extend(a.routes.removals());
        metrics::gauge!("callisto_turn_allocations").decrement(1.0);
        metrics::gauge!("callisto_turn_permissions").decrement(a.access.permissions.len() as f64);
        metrics::gauge!("callisto_turn_channels").decrement(a.access.channels.len() as f64);
    }

    fn response(&self, msg: &Message<'_>, class: Class) -> MessageBuilder {
        let mut b = MessageBuilder::new(msg.method(), class, msg.transaction_id());
        if let Some(s) = &self.shared.config.software {
            b.attr(attr::SOFTWARE, s.as_bytes());
        }
        b
    }

    fn sign(&self, mut b: MessageBuilder, msg: &Message<'_>, key: Option<&[u8]>) -> Vec<u8> {
        if let Some(k) = key {
            b.integrity(k);
        }
        if msg.has_fingerprint() {
            b.fingerprint();
        }
        b.finish()
    }

    fn reply(
        &self,
        five: FiveTuple,
        msg: &Message<'_>,
        b: MessageBuilder,
        key: Option<&[u8]>,
    ) -> Output {
        Output::Reply {
            to: five,
            data: self.sign(b, msg, key),
        }
    }
}

fn install_permission(a: &mut PeerAccess, ip: IpAddr, now: Instant) {
    let expires = now + PERMISSION_LIFETIME;
    match a.permissions.iter_mut().find(|(p, _)| *p == ip) {
        Some(entry) => entry.1 = expires,
        None => {
            a.permissions.push((ip, expires));
            metrics::counter!("callisto_turn_permissions_total").increment(1);
            metrics::gauge!("callisto_turn_permissions").increment(1.0);
        }
    }
}

/// How many alternate servers clients are sent to, by transport: above 0
/// while a server is being drained, say.
fn count_alternates(alternates: &Alternates) {
    metrics::gauge!("callisto_turn_alternate_servers", "transport" => "udp_tcp")
        .set(alternates.udp_tcp.len() as f64);
    metrics::gauge!("callisto_turn_alternate_servers", "transport" => "tls")
        .set(alternates.tls.len() as f64);
}

fn unauth_dropped(reason: &'static str) {
    metrics::counter!("callisto_turn_unauthenticated_dropped_total", "reason" => reason)
        .increment(1);
}

/// A request's method, for the log.
fn method_name(method: u16) -> &'static str {
    match method {
        method::ALLOCATE => "Allocate",
        method::REFRESH => "Refresh",
        method::CREATE_PERMISSION => "CreatePermission",
        method::CHANNEL_BIND => "ChannelBind",
        _ => "other",
    }
}

impl Shared {
    /// Counts an authentication failure, and logs it within the process's
    /// budget of such lines ([`failure_log`]). The username is the
    /// client's to choose: it is cut short and logged escaped, so that it
    /// cannot forge a line. No key or password is logged.
    fn auth_failed(
        &self,
        now: Instant,
        five: &FiveTuple,
        method: u16,
        username: &[u8],
        reason: &'static str,
    ) {
        metrics::counter!("callisto_turn_auth_failures_total", "reason" => reason).increment(1);
        let admitted = self
            .failure_log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .admit(now);
        let Some(left_out) = admitted else { return };
        tracing::info!(
            client = %five.client,
            transport = five.transport.as_str(),
            request = method_name(method),
            username = %loggable(username, 64),
            reason,
            left_out,
            "TURN authentication failed"
        );
    }
}

#[cfg(test)]
mod tests;
