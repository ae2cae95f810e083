//! The kernel relay: an XDP program (`bpf/relay.bpf.c`) that relays
//! between UDP clients and their peers inside the kernel (ChannelData both
//! ways, Send indications, Data indications from peers without a channel;
//! over IPv4 and IPv6), so that a relayed packet wakes no worker and
//! crosses no socket.
//!
//! Why: below saturation, nearly all of what a relayed packet costs a
//! user-space relay is the kernel's: receiving it, waking the worker, and
//! sending it on (see `docs/benchmarks.md`); the protocol work is a few
//! percent. The only way to cut that cost is not to take the packet out of
//! the kernel at all.
//!
//! The state machine decides which flows the kernel may relay and reports
//! them as [`RouteChange`]s (see `server::routes`); the UDP workers hand them
//! to [`KernelRelay::apply`], which writes them into the program's maps.
//! Everything the program does not relay reaches the sockets untouched.
//! The program counts what it relays; [`KernelRelay::report`] adds that to
//! the relay metrics.

use std::collections::{HashMap as StdHashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use aya::maps::{Array, HashMap, MapData, MapError, PerCpuArray};
use aya::programs::{Xdp, XdpFlags};
use aya::{Ebpf, EbpfLoader};

use super::offload::{self, UdpSegmentationOff};
use crate::server::{
    IndicationRoute, KERNEL_ROUTES_PER_ALLOCATION, KernelRoute, RouteChange, SHARED_BUDGET_WORDS,
    SharedBudgets,
};

/// The compiled program, built from `bpf/relay.bpf.c` by
/// `scripts/build-bpf.sh`; committed, so that building needs no clang.
static PROGRAM: &[u8] = aya::include_bytes_aligned!("../../bpf/relay.bpf.o");
const PROGRAM_NAME: &str = "callisto_turn_relay";

/// The map layouts of `relay.bpf.c`, for both families: `I` is an
/// address as the maps hold it, one word for IPv4 and four for IPv6
/// (`struct ip6`). Addresses and ports in network byte order, as the
/// program reads them off the wire; padding zeroed, as keys are compared
/// bytewise.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ClientKey<I> {
    client_ip: I,
    server_ip: I,
    client_port: u16,
    server_port: u16,
    channel: u16,
    zero: u16,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ToPeer<I> {
    relay_ip: I,
    peer_ip: I,
    relay_port: u16,
    peer_port: u16,
    zero: u32,
    expires_ns: u64,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PeerKey<I> {
    peer_ip: I,
    relay_ip: I,
    peer_port: u16,
    relay_port: u16,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SendKey<I> {
    client_ip: I,
    server_ip: I,
    client_port: u16,
    server_port: u16,
    peer_ip: I,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PermissionKey<I> {
    peer_ip: I,
    relay_ip: I,
    relay_port: u16,
    zero: u16,
}

/// On a permission route, `channel` is zero: data goes as Data indications.
/// `relay_port` is the receiving allocation's, for its bandwidth budget.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ToClient<I> {
    server_ip: I,
    client_ip: I,
    server_port: u16,
    client_port: u16,
    channel: u16,
    relay_port: u16,
    expires_ns: u64,
}

/// The relay IP and the external IP it is advertised as (zero: none), and
/// the bandwidth limit per allocation and direction (zero: none); then the
/// relay and external IPv6 addresses (all zero: none).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Settings {
    relay_ip: u32,
    external_ip: u32,
    bytes_per_sec: u64,
    relay_ip6: [u32; 4],
    external_ip6: [u32; 4],
}

/// What the program relayed since it was loaded, summed over CPUs. Bytes
/// are payload bytes (without ChannelData or STUN headers), as the workers
/// count them.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KernelStats {
    pub to_peer_packets: u64,
    pub to_peer_bytes: u64,
    pub to_client_packets: u64,
    pub to_client_bytes: u64,
    /// Packets dropped for a bandwidth budget spent, by its direction.
    pub to_peer_over_budget: u64,
    pub to_client_over_budget: u64,
}

/// An address as the maps hold it: `u32` (IPv4) or `[u32; 4]` (IPv6).
/// Only those two: with them, the layouts above have no implicit padding.
trait MapIp: aya::Pod + Copy + Eq + std::fmt::Debug {}
impl MapIp for u32 {}
impl MapIp for [u32; 4] {}

// SAFETY: plain `repr(C)` integers whose padding is spelled out as fields
// (for either `MapIp`), so every byte is initialised and any bit pattern
// is valid.
unsafe impl<I: MapIp> aya::Pod for ClientKey<I> {}
unsafe impl<I: MapIp> aya::Pod for ToPeer<I> {}
unsafe impl<I: MapIp> aya::Pod for PeerKey<I> {}
unsafe impl<I: MapIp> aya::Pod for PermissionKey<I> {}
unsafe impl<I: MapIp> aya::Pod for SendKey<I> {}
unsafe impl<I: MapIp> aya::Pod for ToClient<I> {}
unsafe impl aya::Pod for KernelStats {}
unsafe impl aya::Pod for Settings {}

fn ip6(ip: &Ipv6Addr) -> [u32; 4] {
    let o = ip.octets();
    std::array::from_fn(|i| {
        u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
    })
}

/// One address family's routes, as its maps hold them.
trait MapFamily: Copy + Into<SocketAddr> {
    type Ip: MapIp;
    /// A permission's peer: an address without a port.
    type PeerIp: Copy + Into<IpAddr>;
    fn map_ip(ip: &Self::PeerIp) -> Self::Ip;
    fn bare_ip(&self) -> Self::PeerIp;
    fn port(&self) -> u16;
    /// The family's maps.
    fn maps(inner: &mut Inner) -> &mut FamilyMaps<Self::Ip>;
}

impl MapFamily for SocketAddrV4 {
    type Ip = u32;
    type PeerIp = Ipv4Addr;
    fn map_ip(ip: &Ipv4Addr) -> u32 {
        u32::from_ne_bytes(ip.octets())
    }
    fn bare_ip(&self) -> Ipv4Addr {
        *self.ip()
    }
    fn port(&self) -> u16 {
        SocketAddrV4::port(self)
    }
    fn maps(inner: &mut Inner) -> &mut FamilyMaps<u32> {
        &mut inner.v4
    }
}

impl MapFamily for SocketAddrV6 {
    type Ip = [u32; 4];
    type PeerIp = Ipv6Addr;
    fn map_ip(ip: &Ipv6Addr) -> [u32; 4] {
        ip6(ip)
    }
    fn bare_ip(&self) -> Ipv6Addr {
        *self.ip()
    }
    fn port(&self) -> u16 {
        SocketAddrV6::port(self)
    }
    fn maps(inner: &mut Inner) -> &mut FamilyMaps<[u32; 4]> {
        &mut inner.v6
    }
}

/// `a`'s address as the maps hold it.
fn ip<A: MapFamily>(a: &A) -> A::Ip {
    A::map_ip(&a.bare_ip())
}

/// `a`'s port as the maps hold it.
fn port<A: MapFamily>(a: &A) -> u16 {
    a.port().to_be()
}

/// A permission's route, for one family.
type PermissionRoute<A> = IndicationRoute<A, <A as MapFamily>::PeerIp>;

impl<I: MapIp> ClientKey<I> {
    fn of<A: MapFamily<Ip = I>>(r: &KernelRoute<A>) -> Self {
        ClientKey {
            client_ip: ip(&r.client),
            server_ip: ip(&r.server),
            client_port: port(&r.client),
            server_port: port(&r.server),
            channel: r.channel.to_be(),
            zero: 0,
        }
    }
}

impl<I: MapIp> PeerKey<I> {
    fn of<A: MapFamily<Ip = I>>(r: &KernelRoute<A>) -> Self {
        PeerKey {
            peer_ip: ip(&r.peer),
            relay_ip: ip(&r.relay),
            peer_port: port(&r.peer),
            relay_port: port(&r.relay),
        }
    }
}

impl<I: MapIp> PermissionKey<I> {
    fn of<A: MapFamily<Ip = I>>(r: &PermissionRoute<A>) -> Self {
        PermissionKey {
            peer_ip: A::map_ip(&r.peer),
            relay_ip: ip(&r.relay),
            relay_port: port(&r.relay),
            zero: 0,
        }
    }
}

impl<I: MapIp> SendKey<I> {
    fn of<A: MapFamily<Ip = I>>(r: &PermissionRoute<A>) -> Self {
        SendKey {
            client_ip: ip(&r.client),
            server_ip: ip(&r.server),
            client_port: port(&r.client),
            server_port: port(&r.server),
            peer_ip: A::map_ip(&r.peer),
        }
    }
}

impl<I: MapIp> ToPeer<I> {
    fn of<A: MapFamily<Ip = I>>(r: &KernelRoute<A>, expires_ns: u64) -> Self {
        ToPeer {
            relay_ip: ip(&r.relay),
            peer_ip: ip(&r.peer),
            relay_port: port(&r.relay),
            peer_port: port(&r.peer),
            zero: 0,
            expires_ns,
        }
    }

    /// For Send indications to any port of the permitted peer.
    fn sends<A: MapFamily<Ip = I>>(r: &PermissionRoute<A>, expires_ns: u64) -> Self {
        ToPeer {
            relay_ip: ip(&r.relay),
            peer_ip: A::map_ip(&r.peer),
            relay_port: port(&r.relay),
            peer_port: 0,
            zero: 0,
            expires_ns,
        }
    }
}

impl<I: MapIp> ToClient<I> {
    /// From `server` to `client` (of the allocation at `relay`), on
    /// `channel`, or as Data indications if it is zero.
    fn new<A: MapFamily<Ip = I>>(
        server: &A,
        client: &A,
        relay: &A,
        channel: u16,
        expires_ns: u64,
    ) -> Self {
        ToClient {
            server_ip: ip(server),
            client_ip: ip(client),
            server_port: port(server),
            client_port: port(client),
            channel: channel.to_be(),
            relay_port: port(relay),
            expires_ns,
        }
    }

    fn of<A: MapFamily<Ip = I>>(r: &KernelRoute<A>, expires_ns: u64) -> Self {
        ToClient::new(&r.server, &r.client, &r.relay, r.channel, expires_ns)
    }

    fn indications<A: MapFamily<Ip = I>>(r: &PermissionRoute<A>, expires_ns: u64) -> Self {
        ToClient::new(&r.server, &r.client, &r.relay, 0, expires_ns)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KernelRelayError {
    #[error(
        "loading the kernel relay (XDP) failed: it needs root (or CAP_BPF and CAP_NET_ADMIN) and a Linux kernel with BPF"
    )]
    Load(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error(
        "attaching the kernel relay (XDP) to interface {interface:?} failed: is that the interface that carries the TURN traffic (see `ip link`), with no other XDP program attached to it?"
    )]
    Attach {
        interface: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error(
        "the kernel relay cannot keep to --turn-bps-per-allocation on a PREEMPT_RT kernel, where its program can be preempted between noting a packet's charge and taking it (one packet could be charged to another's allocation): run without the kernel relay, or without the limit"
    )]
    PreemptRt,
}

/// Whether the running kernel is PREEMPT_RT, from `/sys/kernel/realtime`
/// (present, and "1", only there) or the version string (`uname -v`).
fn preempt_rt(realtime: Option<&str>, version: &str) -> bool {
    realtime.is_some_and(|r| r.trim() == "1") || version.contains("PREEMPT_RT")
}

fn running_preempt_rt() -> bool {
    let realtime = std::fs::read_to_string("/sys/kernel/realtime").ok();
    let version = std::fs::read_to_string("/proc/sys/kernel/version").unwrap_or_default();
    preempt_rt(realtime.as_deref(), &version)
}

/// The loaded and attached program and its maps. Detached when dropped (and
/// when the process ends: the attachment is a BPF link, owned by us).
pub struct KernelRelay {
    inner: Mutex<Inner>,
    budgets: Option<SharedBudgets>,
}

/// One family's route maps.
struct FamilyMaps<I: MapIp> {
    client_routes: HashMap<MapData, ClientKey<I>, ToPeer<I>>,
    peer_routes: HashMap<MapData, PeerKey<I>, ToClient<I>>,
    permission_routes: HashMap<MapData, PermissionKey<I>, ToClient<I>>,
    send_routes: HashMap<MapData, SendKey<I>, ToPeer<I>>,
}

impl<I: MapIp> FamilyMaps<I> {
    /// The maps named with `suffix` ("6" for IPv6), out of the program.
    fn take(
        take: &mut impl FnMut(&str) -> Result<aya::maps::Map, KernelRelayError>,
        suffix: &str,
    ) -> Result<Self, KernelRelayError> {
        Ok(FamilyMaps {
            client_routes: HashMap::try_from(take(&format!("client_routes{suffix}"))?)
                .map_err(load_error)?,
            peer_routes: HashMap::try_from(take(&format!("peer_routes{suffix}"))?)
                .map_err(load_error)?,
            permission_routes: HashMap::try_from(take(&format!("permission_routes{suffix}"))?)
                .map_err(load_error)?,
            send_routes: HashMap::try_from(take(&format!("send_routes{suffix}"))?)
                .map_err(load_error)?,
        })
    }
}

struct Inner {
    /// Owns the program and its links.
    _ebpf: Ebpf,
    /// Loopback's UDP segmentation offload, off while the program runs
    /// there; back on when dropped, after the program is detached.
    _udp_segmentation_off: Vec<UdpSegmentationOff>,
    v4: FamilyMaps<u32>,
    v6: FamilyMaps<[u32; 4]>,
    stats: PerCpuArray<MapData, KernelStats>,
    /// What [`KernelRelay::report`] has already added to the metrics.
    reported: KernelStats,
    /// Routes in the maps, channel and permission routes both.
    routes: usize,
    /// Channel routes the maps refused, by relay and peer, and how many
    /// per relay and peer IP. While a peer has one, its permission route
    /// stays out of the maps too, or the kernel would send Data
    /// indications where the server sends ChannelData; it comes back with
    /// its next renewal after that.
    refused: HashSet<(SocketAddr, SocketAddr)>,
    refused_by_ip: StdHashMap<(SocketAddr, IpAddr), usize>,
}

/// How to attach to `interface`: on a network card, natively where its
/// driver runs XDP (before any socket buffer is built) and generically
/// elsewhere; on a virtual device (no `device` in sysfs: loopback, veth,
/// bridges, tunnels), or one sysfs does not show, always generically. A veth's native XDP_TX hands the
/// frame to the other end only if that end has NAPI (an XDP program, or
/// GRO) enabled, which a container's end usually has not: the frames were
/// dropped (seen in the namespace test).
fn attach_mode(interface: &str) -> XdpFlags {
    if offload::is_on_a_bus(interface) {
        XdpFlags::default()
    } else {
        XdpFlags::SKB_MODE
    }
}

/// The network interface that holds `ip`, if one does: where clients and
/// peers sending to it arrive (`--turn-kernel-relay auto`).
pub fn interface_holding(ip: IpAddr) -> std::io::Result<Option<String>> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes the head of a list it allocated into
    // `list`, freed below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut found = None;
    let mut node = list;
    while !node.is_null() {
        // SAFETY: `node` is an element of the list, which stays allocated
        // until freeifaddrs; its address, when present, is a sockaddr of
        // the family it names, and its name a C string.
        unsafe {
            let ifa = &*node;
            let addr = ifa.ifa_addr;
            let held = if addr.is_null() {
                None
            } else {
                match i32::from((*addr).sa_family) {
                    libc::AF_INET => {
                        let sin = &*(addr as *const libc::sockaddr_in);
                        Some(IpAddr::from(Ipv4Addr::from(u32::from_be(
                            sin.sin_addr.s_addr,
                        ))))
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(addr as *const libc::sockaddr_in6);
                        Some(IpAddr::from(Ipv6Addr::from(sin6.sin6_addr.s6_addr)))
                    }
                    _ => None,
                }
            };
            if held == Some(ip) {
                let name = std::ffi::CStr::from_ptr(ifa.ifa_name);
                found = Some(name.to_string_lossy().into_owned());
                break;
            }
            node = ifa.ifa_next;
        }
    }
    // SAFETY: `list` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(list) };
    Ok(found)
}

/// Nanoseconds on `CLOCK_MONOTONIC`, the clock of `bpf_ktime_get_ns` (and
/// of `Instant` on Linux).
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write into.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Entries per route map: [`KERNEL_ROUTES_PER_ALLOCATION`] for each
/// allocation the server allows, so that no client can fill the maps and
/// push others' flows out to the sockets. Entries are allocated as routes
/// come (about 100 bytes each); what is set aside up front is the hash
/// table's buckets, 16 bytes per entry rounded up to a power of two: 2 MiB
/// per map for the default 10,000 allocations. Capped at 2^22 entries.
pub fn map_capacity(max_allocations: usize) -> usize {
    max_allocations
        .saturating_mul(KERNEL_ROUTES_PER_ALLOCATION)
        .clamp(1024, 1 << 22)
}

/// Words in the `budgets` map: two for every port of each family with a
/// limit (2 MiB), one unused without.
fn budget_words(bytes_per_sec: u64) -> usize {
    if bytes_per_sec == 0 {
        1
    } else {
        SHARED_BUDGET_WORDS
    }
}

/// The `budgets` map's words, mapped into this process (it is made
/// `BPF_F_MMAPABLE` for this), where the workers take from them with
/// atomic instructions, as the program does.
struct MappedWords {
    words: std::ptr::NonNull<AtomicU64>,
    len: usize,
}

// SAFETY: the mapping is shared memory that lives until dropped, and is
// only ever accessed as atomics.
unsafe impl Send for MappedWords {}
unsafe impl Sync for MappedWords {}

impl MappedWords {
    fn map(map: &MapData, len: usize) -> std::io::Result<Self> {
        use std::os::fd::{AsFd, AsRawFd};
        // SAFETY: maps `len` words of an array map of 8-byte values (the
        // kernel refuses a length beyond the map, and a map that is not
        // mmapable); the mapping holds the map, whatever becomes of `map`.
        let at = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len * 8,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if at == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let words = std::ptr::NonNull::new(at.cast::<AtomicU64>())
            .ok_or_else(|| std::io::Error::other("mmap returned a null mapping"))?;
        Ok(MappedWords { words, len })
    }
}

impl AsRef<[AtomicU64]> for MappedWords {
    fn as_ref(&self) -> &[AtomicU64] {
        // SAFETY: `len` page-aligned, initialised words, mapped until drop.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr(), self.len) }
    }
}

impl Drop for MappedWords {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `map` mapped; no reference into it
        // outlives `self`.
        unsafe { libc::munmap(self.words.as_ptr().cast(), self.len * 8) };
    }
}

fn load_error(e: impl std::error::Error + Send + Sync + 'static) -> KernelRelayError {
    KernelRelayError::Load(Box::new(e))
}

/// What the program needs to know of the server.
#[derive(Debug, Clone, Default)]
pub struct KernelRelayConfig {
    /// The interfaces that carry the TURN traffic, clients' and peers'.
    pub interfaces: Vec<String>,
    /// The server's limit on allocations: the route maps get room for all
    /// their routes (see [`map_capacity`]).
    pub max_allocations: usize,
    /// The relay IP. Send indications to it (another of our relayed
    /// addresses, or a port that is none) are left to the server, which
    /// alone knows which of its ports are live relays; without it, all are.
    pub relay_ip: Option<Ipv4Addr>,
    /// The external IP the relay IP is advertised as (`--turn-external-ip`):
    /// clients relayed to each other know their relayed addresses by it.
    pub external_ip: Option<Ipv4Addr>,
    /// The IPv6 relay address, and the external address it is advertised
    /// as: for channels between two of our IPv6 allocations. Without it the
    /// maps for IPv6 routes get no room (the server has no IPv6 relays).
    pub relay_ip6: Option<Ipv6Addr>,
    pub external_ip6: Option<Ipv6Addr>,
    /// `--turn-bps-per-allocation` (0: none). With a limit, the program
    /// takes from the budgets the workers take from ([`KernelRelay::budgets`]).
    pub bytes_per_sec: u64,
}

impl KernelRelay {
    /// Loads the program, tells it `config`, and attaches it to the
    /// interfaces.
    pub fn attach(config: &KernelRelayConfig) -> Result<KernelRelay, KernelRelayError> {
        // The program notes each packet's charge in a per-CPU map before
        // taking it (see `owe` in relay.bpf.c), which is safe only where
        // XDP runs with preemption off: everywhere but PREEMPT_RT.
        if running_preempt_rt() {
            if config.bytes_per_sec != 0 {
                return Err(KernelRelayError::PreemptRt);
            }
            tracing::warn!(
                "PREEMPT_RT kernel: the kernel relay's per-CPU packet counts may come out a little low"
            );
        }
        let (interfaces, max_allocations) = (&config.interfaces, config.max_allocations);
        let capacity = map_capacity(max_allocations);
        if capacity < max_allocations.saturating_mul(KERNEL_ROUTES_PER_ALLOCATION) {
            tracing::warn!(
                capacity,
                max_allocations,
                "the kernel relay's maps cannot hold every route this many allocations may have; routes beyond them are relayed by the sockets"
            );
        }
        // Without an IPv6 relay there are no IPv6 routes: the maps for
        // them take next to nothing.
        let ipv6 = config.relay_ip6.is_some();
        let capacity6 = if ipv6 { capacity } else { 1 };
        // The program reads no kernel structures, so it needs no
        // relocation against the kernel's BTF, which the loader has parsed
        // by now (megabytes): drop it, and give the memory back.
        let mut ebpf = EbpfLoader::new()
            .btf(None)
            .set_max_entries("client_routes", capacity as u32)
            .set_max_entries("peer_routes", capacity as u32)
            .set_max_entries("permission_routes", capacity as u32)
            .set_max_entries("send_routes", capacity as u32)
            .set_max_entries("client_routes6", capacity6 as u32)
            .set_max_entries("peer_routes6", capacity6 as u32)
            .set_max_entries("permission_routes6", capacity6 as u32)
            .set_max_entries("send_routes6", capacity6 as u32)
            // An LRU map is allocated whole, up front (about 6 MB).
            .set_max_entries("hop_macs6", if ipv6 { 65536 } else { 1 })
            .set_max_entries("budgets", budget_words(config.bytes_per_sec) as u32)
            .load(PROGRAM)
            .map_err(load_error)?;
        // SAFETY: malloc_trim only returns free heap memory to the system.
        unsafe { libc::malloc_trim(0) };
        let program: &mut Xdp = ebpf
            .program_mut(PROGRAM_NAME)
            .ok_or_else(|| {
                load_error(MapError::InvalidName {
                    name: PROGRAM_NAME.into(),
                })
            })?
            .try_into()
            .map_err(load_error)?;
        program.load().map_err(load_error)?;
        let mut udp_segmentation_off = Vec::new();
        for interface in interfaces.iter().filter(|i| offload::is_loopback(i)) {
            match UdpSegmentationOff::switch_off(interface) {
                Ok(Some(off)) => {
                    tracing::info!(
                        interface,
                        "switched UDP segmentation offload off while the kernel relay runs there, so that the program sees each datagram of a local UDP GSO sender"
                    );
                    udp_segmentation_off.push(off);
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(interface, error = %e, "could not switch UDP segmentation offload off: data from local programs that send UDP GSO over it to a relayed address will be lost");
                }
            }
        }
        for interface in interfaces {
            let mode = attach_mode(interface);
            program
                .attach(interface, mode)
                .or_else(|refused| {
                    if mode.contains(XdpFlags::SKB_MODE) {
                        return Err(refused);
                    }
                    // Some drivers take native XDP only with enough queues,
                    // or not with other offloads on: generic still works.
                    tracing::warn!(interface, error = %refused, "the driver refused native XDP; attaching generically, after the kernel builds its socket buffers (slower)");
                    program.attach(interface, XdpFlags::SKB_MODE)
                })
                .map_err(|source| KernelRelayError::Attach {
                    interface: interface.clone(),
                    source,
                })?;
        }
        let mut take = |name: &str| {
            ebpf.take_map(name)
                .ok_or_else(|| load_error(MapError::InvalidName { name: name.into() }))
        };
        let v4 = FamilyMaps::take(&mut take, "")?;
        let v6 = FamilyMaps::take(&mut take, "6")?;
        let stats = PerCpuArray::try_from(take("stats")?).map_err(load_error)?;
        let budgets = if config.bytes_per_sec == 0 {
            None
        } else {
            let aya::maps::Map::Array(map) = take("budgets")? else {
                return Err(load_error(MapError::InvalidName {
                    name: "budgets".into(),
                }));
            };
            let words =
                MappedWords::map(&map, budget_words(config.bytes_per_sec)).map_err(load_error)?;
            Some(SharedBudgets {
                words: Arc::new(words),
                clock: (Instant::now(), monotonic_ns()),
            })
        };
        let mut settings: Array<MapData, Settings> =
            Array::try_from(take("settings")?).map_err(load_error)?;
        let octets = |ip: Option<Ipv4Addr>| ip.map_or(0, |ip| u32::from_ne_bytes(ip.octets()));
        let s = Settings {
            relay_ip: octets(config.relay_ip),
            external_ip: octets(config.external_ip.filter(|e| Some(*e) != config.relay_ip)),
            bytes_per_sec: config.bytes_per_sec,
            relay_ip6: config.relay_ip6.map_or([0; 4], |ip| ip6(&ip)),
            external_ip6: config
                .external_ip6
                .filter(|e| Some(*e) != config.relay_ip6)
                .map_or([0; 4], |ip| ip6(&ip)),
        };
        settings.set(0, s, 0).map_err(load_error)?;
        tracing::info!(?interfaces, "kernel relay (XDP) attached");
        Ok(KernelRelay {
            inner: Mutex::new(Inner {
                _ebpf: ebpf,
                _udp_segmentation_off: udp_segmentation_off,
                v4,
                v6,
                stats,
                reported: KernelStats::default(),
                routes: 0,
                refused: HashSet::new(),
                refused_by_ip: StdHashMap::new(),
            }),
            budgets,
        })
    }

    /// The bandwidth budgets the program takes from, for the server to take
    /// from too ([`crate::server::Shared::share_budgets`]); none without a
    /// limit.
    pub fn budgets(&self) -> Option<SharedBudgets> {
        self.budgets.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes route changes into the program's maps, in order. A route
    /// that does not fit (only when the kernel is short of memory, as the
    /// maps have room for every route the server gives) is left to the
    /// sockets, and counted.
    pub fn apply(&self, changes: impl IntoIterator<Item = RouteChange>) {
        let mut inner = self.lock();
        let now = (Instant::now(), monotonic_ns());
        let expires_ns =
            |at: Instant| now.1 + at.saturating_duration_since(now.0).as_nanos() as u64;
        for change in changes {
            match change {
                RouteChange::Set(r) => inner.set_channel(&r, expires_ns(r.expires)),
                RouteChange::Remove(r) => inner.remove_channel(&r),
                RouteChange::SetIndications(r) => inner.set_indications(&r, expires_ns(r.expires)),
                RouteChange::RemoveIndications(r) => inner.remove_indications(&r),
                RouteChange::Set6(r) => inner.set_channel(&r, expires_ns(r.expires)),
                RouteChange::Remove6(r) => inner.remove_channel(&r),
                RouteChange::SetIndications6(r) => inner.set_indications(&r, expires_ns(r.expires)),
                RouteChange::RemoveIndications6(r) => inner.remove_indications(&r),
            }
        }
        metrics::gauge!("callisto_turn_kernel_routes").set(inner.routes as f64);
    }

    /// What the program relayed so far, summed over CPUs.
    pub fn stats(&self) -> KernelStats {
        total(&self.lock().stats)
    }

    /// Adds what the program relayed since the last call to the relay
    /// metrics, as UDP (the only transport it relays for).
    pub fn report(&self) {
        let mut inner = self.lock();
        let now = total(&inner.stats);
        let was = std::mem::replace(&mut inner.reported, now);
        drop(inner);
        for (dir, packets, bytes, over_budget) in [
            (
                "to_peer",
                now.to_peer_packets - was.to_peer_packets,
                now.to_peer_bytes - was.to_peer_bytes,
                now.to_peer_over_budget - was.to_peer_over_budget,
            ),
            (
                "to_client",
                now.to_client_packets - was.to_client_packets,
                now.to_client_bytes - was.to_client_bytes,
                now.to_client_over_budget - was.to_client_over_budget,
            ),
        ] {
            if over_budget != 0 {
                metrics::counter!("callisto_turn_over_budget_packets_total", "direction" => dir)
                    .increment(over_budget);
            }
            if packets == 0 {
                continue;
            }
            let labels = [("direction", dir), ("transport", "udp")];
            metrics::counter!("callisto_turn_relayed_packets_total", &labels).increment(packets);
            metrics::counter!("callisto_turn_relayed_bytes_total", &labels).increment(bytes);
            metrics::counter!("callisto_turn_relayed_in_kernel_packets_total", "direction" => dir)
                .increment(packets);
            metrics::counter!("callisto_turn_relayed_in_kernel_bytes_total", "direction" => dir)
                .increment(bytes);
        }
    }
}

/// A route's map value: until when it holds.
trait Expiring: aya::Pod + PartialEq {
    fn expires_ns(&self) -> u64;
}

impl<I: MapIp> Expiring for ToPeer<I> {
    fn expires_ns(&self) -> u64 {
        self.expires_ns
    }
}

impl<I: MapIp> Expiring for ToClient<I> {
    fn expires_ns(&self) -> u64 {
        self.expires_ns
    }
}

/// Writes a channel route's two entries, one per direction; if the maps
/// refuse either, takes both out. Whether the first was new, and the
/// maps' answer.
fn set_pair<K1: aya::Pod, V1: aya::Pod, K2: aya::Pod, V2: aya::Pod>(
    first: &mut HashMap<MapData, K1, V1>,
    (k1, v1): (K1, V1),
    second: &mut HashMap<MapData, K2, V2>,
    (k2, v2): (K2, V2),
) -> (bool, Result<(), MapError>) {
    let fresh = first.get(&k1, 0).is_err();
    let set = first
        .insert(k1, v1, 0)
        .and_then(|()| second.insert(k2, v2, 0));
    if set.is_err() {
        let _ = first.remove(&k1);
        let _ = second.remove(&k2);
    }
    (fresh, set)
}

/// Takes `key` out if it still holds the flow whose value, at any expiry,
/// is `value(expiry)`: another worker may since have given the same relay
/// port, or channel, to a new flow, and set it first. Whether it did.
fn remove_mine<K: aya::Pod, V: Expiring>(
    map: &mut HashMap<MapData, K, V>,
    key: &K,
    value: impl Fn(u64) -> V,
) -> bool {
    map.get(key, 0).is_ok_and(|v| v == value(v.expires_ns())) && map.remove(key).is_ok()
}

impl Inner {
    /// Counts a channel route [`set_pair`] wrote, or the failure, for the
    /// flow from `relay` to `peer`; whether it is in.
    fn channel_set(
        &mut self,
        (relay, peer): (SocketAddr, SocketAddr),
        channel: u16,
        (fresh, set): (bool, Result<(), MapError>),
    ) -> bool {
        match set {
            Ok(()) => {
                self.routes += usize::from(fresh);
                self.unrefuse(relay, peer);
                true
            }
            Err(e) => {
                self.routes = self.routes.saturating_sub(usize::from(!fresh));
                self.refuse(relay, peer);
                metrics::counter!("callisto_turn_kernel_route_failures_total").increment(1);
                tracing::debug!(error = %e, channel, "kernel route not installed; the sockets relay this flow");
                false
            }
        }
    }

    /// A channel route refused takes its peer's permission route out with
    /// it (see `refused`).
    fn set_channel<A: MapFamily>(&mut self, r: &KernelRoute<A>, expires_ns: u64) {
        let maps = A::maps(self);
        let set = set_pair(
            &mut maps.client_routes,
            (ClientKey::of(r), ToPeer::of(r, expires_ns)),
            &mut maps.peer_routes,
            (PeerKey::of(r), ToClient::of(r, expires_ns)),
        );
        if !self.channel_set((r.relay.into(), r.peer.into()), r.channel, set) {
            self.remove_indications(&IndicationRoute {
                client: r.client,
                server: r.server,
                relay: r.relay,
                peer: r.peer.bare_ip(),
                expires: r.expires,
            });
        }
    }

    fn remove_channel<A: MapFamily>(&mut self, r: &KernelRoute<A>) {
        self.unrefuse(r.relay.into(), r.peer.into());
        let maps = A::maps(self);
        let mine = remove_mine(&mut maps.client_routes, &ClientKey::of(r), |e| {
            ToPeer::of(r, e)
        });
        remove_mine(&mut maps.peer_routes, &PeerKey::of(r), |e| {
            ToClient::of(r, e)
        });
        if mine {
            self.routes = self.routes.saturating_sub(1);
        }
    }

    /// Notes a channel whose route the maps refused: its peer's IP gets no
    /// permission route while it lasts.
    fn refuse(&mut self, relay: SocketAddr, peer: SocketAddr) {
        if self.refused.insert((relay, peer)) {
            *self.refused_by_ip.entry((relay, peer.ip())).or_default() += 1;
        }
    }

    fn unrefuse(&mut self, relay: SocketAddr, peer: SocketAddr) {
        if self.refused.remove(&(relay, peer)) {
            let key = (relay, peer.ip());
            if let Some(n) = self.refused_by_ip.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    self.refused_by_ip.remove(&key);
                }
            }
        }
    }

    fn set_indications<A: MapFamily>(&mut self, r: &PermissionRoute<A>, expires_ns: u64) {
        if self
            .refused_by_ip
            .contains_key(&(r.relay.into(), r.peer.into()))
        {
            self.remove_indications(r);
            return;
        }
        let mut routes = self.routes;
        let maps = A::maps(self);
        // The client's Send indications to the peer go with it (held back
        // with it too, which only costs speed).
        set_sends(
            &mut maps.send_routes,
            SendKey::of(r),
            ToPeer::sends(r, expires_ns),
        );
        let value = ToClient::indications(r, expires_ns);
        set_permission(
            &mut routes,
            &mut maps.permission_routes,
            PermissionKey::of(r),
            value,
        );
        self.routes = routes;
    }

    /// Only this flow's entries, as for channels.
    fn remove_indications<A: MapFamily>(&mut self, r: &PermissionRoute<A>) {
        let maps = A::maps(self);
        remove_mine(&mut maps.send_routes, &SendKey::of(r), |e| {
            ToPeer::sends(r, e)
        });
        let key = PermissionKey::of(r);
        if remove_mine(&mut maps.permission_routes, &key, |e| {
            ToClient::indications(r, e)
        }) {
            self.routes = self.routes.saturating_sub(1);
        }
    }
}

/// Writes the route of a client's Send indications to a permitted peer;
/// one the maps refuse leaves them to the sockets.
fn set_sends<K: aya::Pod, V: aya::Pod>(map: &mut HashMap<MapData, K, V>, key: K, value: V) {
    if let Err(e) = map.insert(key, value, 0) {
        metrics::counter!("callisto_turn_kernel_route_failures_total").increment(1);
        tracing::debug!(error = %e, "kernel route not installed; the sockets relay this client's Send indications");
    }
}

/// Writes a permission route, counting it in `routes` if new. If the maps
/// refuse it, what the key held before goes too: it may be another flow's
/// (an earlier allocation on the same relay port, with another client).
fn set_permission<K: aya::Pod, V: aya::Pod>(
    routes: &mut usize,
    map: &mut HashMap<MapData, K, V>,
    key: K,
    value: V,
) {
    let fresh = map.get(&key, 0).is_err();
    match map.insert(key, value, 0) {
        Ok(()) => *routes += usize::from(fresh),
        Err(e) => {
            if !fresh && map.remove(&key).is_ok() {
                *routes = routes.saturating_sub(1);
            }
            metrics::counter!("callisto_turn_kernel_route_failures_total").increment(1);
            tracing::debug!(error = %e, "kernel route not installed; the sockets relay this peer's Data indications");
        }
    }
}

fn total(stats: &PerCpuArray<MapData, KernelStats>) -> KernelStats {
    let mut sum = KernelStats::default();
    if let Ok(per_cpu) = stats.get(&0, 0) {
        for s in per_cpu.iter() {
            sum.to_peer_packets += s.to_peer_packets;
            sum.to_peer_bytes += s.to_peer_bytes;
            sum.to_client_packets += s.to_client_packets;
            sum.to_client_bytes += s.to_client_bytes;
            sum.to_peer_over_budget += s.to_peer_over_budget;
            sum.to_client_over_budget += s.to_client_over_budget;
        }
    }
    sum
}

#[cfg(test)]
mod tests {
    //! The program itself, run by the kernel on packets built here
    //! (`BPF_PROG_TEST_RUN`): no interface is touched. Needs root; skipped
    //! without it unless `CALLISTO_REQUIRE_ROOT_TESTS` is set, as the test
    //! script does.

    use std::net::SocketAddr;
    use std::os::fd::{AsFd, AsRawFd};
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use super::*;
    use crate::server::{IndicationRoute6, KernelRoute6};

    #[test]
    fn preempt_rt_kernels_are_told_apart() {
        let stock = "#1 SMP PREEMPT_DYNAMIC Debian 6.1.153-1 (2025-09-20)";
        assert!(!preempt_rt(None, stock));
        assert!(!preempt_rt(Some("0\n"), stock));
        assert!(preempt_rt(Some("1\n"), stock));
        assert!(preempt_rt(None, "#1 SMP PREEMPT_RT Debian 6.1.153-1"));
        // This machine's, which the tests' kernel relay runs on.
        assert!(!running_preempt_rt());
    }

    const XDP_PASS: u32 = 2;
    const XDP_TX: u32 = 3;

    fn loaded() -> Option<KernelRelay> {
        loaded_with(None)
    }

    /// The program, told of the relay IP 127.0.0.1 and `external_ip`, if
    /// root.
    fn loaded_with(external_ip: Option<Ipv4Addr>) -> Option<KernelRelay> {
        loaded_as(Ipv4Addr::LOCALHOST, external_ip)
    }

    /// The program, told of `relay_ip` and `external_ip`, if root.
    fn loaded_as(relay_ip: Ipv4Addr, external_ip: Option<Ipv4Addr>) -> Option<KernelRelay> {
        loaded_by(KernelRelayConfig {
            relay_ip: Some(relay_ip),
            external_ip,
            ..KernelRelayConfig::default()
        })
    }

    /// The program, told of `config` and given small maps (one test fills
    /// one), if root.
    fn loaded_by(config: KernelRelayConfig) -> Option<KernelRelay> {
        try_loaded_by(config).map(|loaded| loaded.expect("the program loads"))
    }

    /// [`loaded_by`], with the loader's error (the verifier's log, when
    /// it refuses the program) instead of a panic.
    fn try_loaded_by(config: KernelRelayConfig) -> Option<Result<KernelRelay, String>> {
        if !super::super::root_or_skip("the kernel relay tests") {
            return None;
        }
        let config = KernelRelayConfig {
            interfaces: Vec::new(),
            max_allocations: 128,
            ..config
        };
        Some(KernelRelay::attach(&config).map_err(|e| format!("{e:?}")))
    }

    #[test]
    fn finds_the_interface_holding_an_address() {
        assert_eq!(
            interface_holding(Ipv4Addr::LOCALHOST.into()).expect("getifaddrs"),
            Some("lo".to_string())
        );
        assert_eq!(
            interface_holding(Ipv6Addr::LOCALHOST.into()).expect("getifaddrs"),
            Some("lo".to_string())
        );
        // TEST-NET-1: documentation only, held by no interface here.
        let nobody = Ipv4Addr::new(192, 0, 2, 77);
        assert_eq!(interface_holding(nobody.into()).expect("getifaddrs"), None);
    }

    /// `bpf_attr` for `BPF_PROG_TEST_RUN`, zero-padded.
    #[repr(C)]
    #[derive(Default)]
    struct TestRun {
        prog_fd: u32,
        retval: u32,
        data_size_in: u32,
        data_size_out: u32,
        data_in: u64,
        data_out: u64,
        repeat: u32,
        duration: u32,
        ctx_size_in: u32,
        ctx_size_out: u32,
        ctx_in: u64,
        ctx_out: u64,
        flags: u32,
        cpu: u32,
        batch_size: u32,
        pad: [u32; 5],
    }

    /// Runs the program on `packet` (as received on loopback); returns its
    /// verdict and the packet as it left.
    fn run(relay: &KernelRelay, packet: &[u8]) -> (u32, Vec<u8>) {
        let (verdict, out, _) = run_repeated(relay, packet, 1);
        (verdict, out)
    }

    /// [`run`], `repeat` times in the kernel; also returns the mean time
    /// per run in nanoseconds, as the kernel measured it.
    fn run_repeated(relay: &KernelRelay, packet: &[u8], repeat: u32) -> (u32, Vec<u8>, u32) {
        let inner = relay.lock();
        let program: &Xdp = inner
            ._ebpf
            .program(PROGRAM_NAME)
            .expect("loaded")
            .try_into()
            .expect("XDP");
        let fd = program.fd().expect("loaded").as_fd().as_raw_fd();
        let mut out = vec![0u8; packet.len() + 256];
        let mut attr = TestRun {
            prog_fd: fd as u32,
            data_size_in: packet.len() as u32,
            data_size_out: out.len() as u32,
            data_in: packet.as_ptr() as u64,
            data_out: out.as_mut_ptr() as u64,
            repeat,
            ..TestRun::default()
        };
        // SAFETY: `attr` is a valid BPF_PROG_TEST_RUN attribute whose
        // buffers outlive the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                10, // BPF_PROG_TEST_RUN
                &mut attr as *mut TestRun,
                std::mem::size_of::<TestRun>(),
            )
        };
        assert_eq!(rc, 0, "BPF_PROG_TEST_RUN: {}", io_error());
        out.truncate(attr.data_size_out as usize);
        (attr.retval, out, attr.duration)
    }

    /// What the program costs per packet, by kind of packet, as the kernel
    /// times `BPF_PROG_TEST_RUN` (median and 99th percentile of 20,001
    /// single runs, in ns; each includes the kernel's timing of it). A
    /// measurement, not a check: `cargo test --release -p callisto-turn
    /// --lib program_cost -- --ignored --nocapture` (as root).
    #[test]
    #[ignore]
    fn program_cost() {
        let Some(relay) = loaded() else { return };
        costs(&relay, "none");
        // A limit no packet reaches: every packet pays for its budget.
        let limited = loaded_by(KernelRelayConfig {
            relay_ip: Some(Ipv4Addr::LOCALHOST),
            bytes_per_sec: 1 << 40,
            ..KernelRelayConfig::default()
        });
        costs(
            &limited.expect("loaded as the first was"),
            "bytes per second",
        );
        costs6(&loaded6(None, 0).expect("loaded as the first was"));
    }

    /// [`program_cost`]'s table for one program, loaded with `limit`.
    fn costs(relay: &KernelRelay, limit: &str) {
        let later = Instant::now() + Duration::from_secs(3600);
        let (r, i) = (a_route(later), an_indication_route(later));
        // Another allocation of ours, open to r's relayed address, which
        // r's client may send to.
        let ours = addr("127.0.0.1:50001");
        let to_ours = IndicationRoute {
            peer: *r.relay.ip(),
            ..i
        };
        let theirs = IndicationRoute {
            client: addr("127.0.0.4:40001"),
            relay: ours,
            ..to_ours
        };
        relay.apply([
            RouteChange::Set(r),
            RouteChange::SetIndications(i),
            RouteChange::SetIndications(to_ours),
            RouteChange::SetIndications(theirs),
        ]);
        let to = SocketAddrV4::new(*r.peer.ip(), 7001);
        let stranger = addr("127.0.0.9:7000");
        for size in [100usize, 1200] {
            let data = vec![0x5au8; size];
            let cases = [
                (
                    "not ours (passed on)",
                    frame(stranger, addr("127.0.0.1:9"), &data, true),
                    XDP_PASS,
                ),
                (
                    "ChannelData to the peer",
                    frame(r.client, r.server, &channel_data(0x4001, &data), true),
                    XDP_TX,
                ),
                (
                    "peer to ChannelData",
                    frame(r.peer, r.relay, &data, true),
                    XDP_TX,
                ),
                (
                    "peer to Data indication",
                    frame(to, r.relay, &data, true),
                    XDP_TX,
                ),
                (
                    "Send indication to the peer",
                    frame(
                        r.client,
                        r.server,
                        &send_indication(to, &data, false, 0),
                        true,
                    ),
                    XDP_TX,
                ),
                (
                    "Send indication with FINGERPRINT",
                    frame(
                        r.client,
                        r.server,
                        &send_indication(to, &data, true, 0),
                        true,
                    ),
                    XDP_TX,
                ),
                (
                    "Send indication with FINGERPRINT to our own allocation",
                    frame(
                        r.client,
                        r.server,
                        &send_indication(ours, &data, true, 0),
                        true,
                    ),
                    XDP_TX,
                ),
            ];
            for (name, packet, expected) in cases {
                cost_row(relay, name, limit, size, &packet, expected);
            }
        }
    }

    /// One row of [`program_cost`]'s table: `packet`'s median and 99th
    /// percentile.
    fn cost_row(
        relay: &KernelRelay,
        name: &str,
        limit: &str,
        size: usize,
        packet: &[u8],
        expected: u32,
    ) {
        // One run per call: a relayed frame is changed in place, so the
        // kernel's own repeats would see it changed.
        let mut times: Vec<u32> = (0..20_001)
            .map(|_| {
                let (verdict, _, ns) = run_repeated(relay, packet, 1);
                assert_eq!(verdict, expected, "{name}");
                ns
            })
            .collect();
        times.sort_unstable();
        println!(
            "| {name} | {limit} | {size} | {} | {} |",
            times[10_000], times[19_800]
        );
    }

    /// [`program_cost`]'s rows for IPv6 (no limit: under one the sockets
    /// take IPv6).
    fn costs6(relay: &KernelRelay) {
        let r = a_route6(Instant::now() + Duration::from_secs(3600));
        let a = KernelRoute6 {
            client: addr6("[::1]:40002"),
            channel: 0x4002,
            peer: addr6("[::1]:50001"),
            ..r
        };
        let b = KernelRoute6 {
            client: addr6("[::1]:40001"),
            channel: 0x4005,
            relay: a.peer,
            peer: a.relay,
            ..a
        };
        relay.apply([
            RouteChange::Set6(r),
            RouteChange::SetIndications6(an_indication_route6(r.expires)),
            RouteChange::Set6(a),
            RouteChange::Set6(b),
        ]);
        for size in [100usize, 1200] {
            let data = vec![0x5au8; size];
            let cases = [
                (
                    "IPv6: not ours (passed on)",
                    frame6(addr6("[::1]:7009"), addr6("[::1]:9"), &data),
                    XDP_PASS,
                ),
                (
                    "IPv6: ChannelData to the peer",
                    frame6(r.client, r.server, &channel_data(0x4001, &data)),
                    XDP_TX,
                ),
                (
                    "IPv6: peer to ChannelData",
                    frame6(r.peer, r.relay, &data),
                    XDP_TX,
                ),
                (
                    "IPv6: peer to Data indication",
                    frame6(SocketAddrV6::new(*r.peer.ip(), 7001, 0, 0), r.relay, &data),
                    XDP_TX,
                ),
                (
                    "IPv6: ChannelData to our own allocation",
                    frame6(a.client, a.server, &channel_data(0x4002, &data)),
                    XDP_TX,
                ),
            ];
            for (name, packet, expected) in cases {
                cost_row(relay, name, "none", size, &packet, expected);
            }
        }
    }

    fn io_error() -> std::io::Error {
        std::io::Error::last_os_error()
    }

    fn checksum(chunks: &[&[u8]]) -> u16 {
        let mut sum = 0u32;
        let bytes: Vec<u8> = chunks.concat();
        for pair in bytes.chunks(2) {
            let hi = u32::from(pair[0]) << 8;
            sum += hi | pair.get(1).map_or(0, |&b| u32::from(b));
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    /// An Ethernet frame (loopback: zero addresses) with a UDP datagram,
    /// checksums right (`udp_checksum`: or zero, "none").
    fn frame(from: SocketAddrV4, to: SocketAddrV4, payload: &[u8], udp_checksum: bool) -> Vec<u8> {
        let udp_len = 8 + payload.len() as u16;
        let mut ip = vec![0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, 17, 0, 0];
        ip[2..4].copy_from_slice(&(20 + udp_len).to_be_bytes());
        ip.extend_from_slice(&from.ip().octets());
        ip.extend_from_slice(&to.ip().octets());
        let check = checksum(&[&ip]);
        ip[10..12].copy_from_slice(&check.to_be_bytes());
        let mut udp = Vec::new();
        udp.extend_from_slice(&from.port().to_be_bytes());
        udp.extend_from_slice(&to.port().to_be_bytes());
        udp.extend_from_slice(&udp_len.to_be_bytes());
        udp.extend_from_slice(&[0, 0]);
        udp.extend_from_slice(payload);
        if udp_checksum {
            let check = match udp_checksum_of(&from, &to, &udp) {
                0 => 0xffff,
                c => c,
            };
            udp[6..8].copy_from_slice(&check.to_be_bytes());
        }
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&[0x08, 0x00]);
        f.extend_from_slice(&ip);
        f.extend_from_slice(&udp);
        f
    }

    fn udp_checksum_of(from: &SocketAddrV4, to: &SocketAddrV4, udp: &[u8]) -> u16 {
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&from.ip().octets());
        pseudo.extend_from_slice(&to.ip().octets());
        pseudo.extend_from_slice(&[0, 17]);
        pseudo.extend_from_slice(&(udp.len() as u16).to_be_bytes());
        checksum(&[&pseudo, udp])
    }

    /// Checks a frame the program sent: addresses, lengths, TTL and both
    /// checksums; returns the UDP payload.
    fn sent(frame: &[u8], from: SocketAddrV4, to: SocketAddrV4, udp_checksum: bool) -> Vec<u8> {
        assert_eq!(&frame[12..14], &[0x08, 0x00]);
        let ip = &frame[14..34];
        assert_eq!(checksum(&[ip]), 0, "IP header checksum");
        assert_eq!(ip[8], 64, "TTL");
        assert_eq!(&ip[12..16], &from.ip().octets());
        assert_eq!(&ip[16..20], &to.ip().octets());
        let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
        assert_eq!(total, frame.len() - 14);
        let udp = &frame[34..];
        assert_eq!(u16::from_be_bytes([udp[0], udp[1]]), from.port());
        assert_eq!(u16::from_be_bytes([udp[2], udp[3]]), to.port());
        assert_eq!(usize::from(u16::from_be_bytes([udp[4], udp[5]])), udp.len());
        if udp_checksum {
            assert_eq!(udp_checksum_of(&from, &to, udp), 0, "UDP checksum");
        } else {
            assert_eq!(&udp[6..8], &[0, 0], "no checksum stays none");
        }
        udp[8..].to_vec()
    }

    fn addr(s: &str) -> SocketAddrV4 {
        s.parse().expect("an address")
    }

    fn a_route(expires: Instant) -> KernelRoute {
        KernelRoute {
            client: addr("127.0.0.2:40000"),
            server: addr("127.0.0.1:3478"),
            channel: 0x4001,
            relay: addr("127.0.0.1:50000"),
            peer: addr("127.0.0.3:7000"),
            expires,
        }
    }

    /// The permission route beside [`a_route`]: the same client, relay and
    /// peer IP.
    fn an_indication_route(expires: Instant) -> IndicationRoute {
        let r = a_route(expires);
        IndicationRoute {
            client: r.client,
            server: r.server,
            relay: r.relay,
            peer: *r.peer.ip(),
            expires,
        }
    }

    /// Another allocation of ours, relayed at `relay`, open to `a`'s
    /// relayed address: its route for a channel (0x4005) to it, and its
    /// permission route for it.
    fn allocation_open_to(a: KernelRoute, relay: SocketAddrV4) -> (KernelRoute, IndicationRoute) {
        let b = KernelRoute {
            client: addr("127.0.0.4:40001"),
            channel: 0x4005,
            relay,
            peer: a.relay,
            ..a
        };
        let permission = IndicationRoute {
            client: b.client,
            server: b.server,
            relay: b.relay,
            peer: *a.relay.ip(),
            expires: a.expires,
        };
        (b, permission)
    }

    /// The Data indication the server would send for `data` from `peer`,
    /// with the transaction id of `sent` (any value will do there).
    fn data_indication(peer: impl Into<SocketAddr>, data: &[u8], sent: &[u8]) -> Vec<u8> {
        let tid: [u8; 12] = sent
            .get(8..20)
            .and_then(|t| t.try_into().ok())
            .unwrap_or_default();
        let (prefix, len) = crate::stun::data_indication_prefix(peer.into(), data.len(), &tid);
        let mut m = prefix[..len].to_vec();
        m.extend_from_slice(data);
        m.resize(m.len() + crate::stun::padding(data.len()), 0);
        m
    }

    /// A Send indication as browsers lay it out (XOR-PEER-ADDRESS first),
    /// its padding bytes `padding` (any value is allowed).
    fn send_indication(
        peer: impl Into<SocketAddr>,
        data: &[u8],
        fingerprint: bool,
        padding: u8,
    ) -> Vec<u8> {
        send_indication_in_order(peer, data, fingerprint, padding, false)
    }

    /// [`send_indication`], with DATA first if `data_first` (as coturn's
    /// clients lay it out).
    fn send_indication_in_order(
        peer: impl Into<SocketAddr>,
        data: &[u8],
        fingerprint: bool,
        padding: u8,
        data_first: bool,
    ) -> Vec<u8> {
        use crate::stun::{Class, MessageBuilder, attr, method};
        let peer = peer.into();
        let mut b = MessageBuilder::new(method::SEND, Class::Indication, &[7; 12]);
        b.padding_byte(padding);
        if data_first {
            b.attr(attr::DATA, data)
                .xor_address(attr::XOR_PEER_ADDRESS, peer);
        } else {
            b.xor_address(attr::XOR_PEER_ADDRESS, peer)
                .attr(attr::DATA, data);
        }
        if fingerprint {
            b.fingerprint();
        }
        b.finish()
    }

    fn channel_data(channel: u16, data: &[u8]) -> Vec<u8> {
        let mut cd = channel.to_be_bytes().to_vec();
        cd.extend_from_slice(&(data.len() as u16).to_be_bytes());
        cd.extend_from_slice(data);
        cd
    }

    #[test]
    fn relays_channel_data_both_ways_with_correct_headers() {
        let Some(relay) = loaded() else { return };
        let r = a_route(Instant::now() + Duration::from_secs(60));
        relay.apply([RouteChange::Set(r)]);
        for udp_checksum in [true, false] {
            // Client → peer: the header goes, the rest leaves the relay.
            let to_server = frame(
                r.client,
                r.server,
                &channel_data(0x4001, b"hello"),
                udp_checksum,
            );
            let (verdict, out) = run(&relay, &to_server);
            assert_eq!(verdict, XDP_TX);
            assert_eq!(sent(&out, r.relay, r.peer, udp_checksum), b"hello");

            // Peer → client: on the channel, from the TURN port.
            let odd = b"world!!"; // an odd length tests the checksum's last byte
            let (verdict, out) = run(&relay, &frame(r.peer, r.relay, odd, udp_checksum));
            assert_eq!(verdict, XDP_TX);
            assert_eq!(
                sent(&out, r.server, r.client, udp_checksum),
                channel_data(0x4001, odd)
            );
        }
        assert_eq!(
            relay.stats(),
            KernelStats {
                to_peer_packets: 2,
                to_peer_bytes: 10,
                to_client_packets: 2,
                to_client_bytes: 14,
                ..KernelStats::default()
            }
        );
    }

    /// RFC 8656 §14: the TOS byte (DSCP and ECN) goes on with the data,
    /// both ways, as the workers pass it on.
    #[test]
    fn relays_keep_the_tos_byte() {
        let Some(relay) = loaded() else { return };
        let r = a_route(Instant::now() + Duration::from_secs(60));
        relay.apply([RouteChange::Set(r)]);
        let with_tos = |mut f: Vec<u8>, tos: u8| {
            f[15] = tos;
            f[24..26].fill(0);
            let check = checksum(&[&f[14..34]]);
            f[24..26].copy_from_slice(&check.to_be_bytes());
            f
        };
        for tos in [0xb9, 0x2b, 0x01] {
            let to_peer = with_tos(
                frame(r.client, r.server, &channel_data(0x4001, b"hi"), true),
                tos,
            );
            let (verdict, out) = run(&relay, &to_peer);
            assert_eq!(verdict, XDP_TX);
            assert_eq!(sent(&out, r.relay, r.peer, true), b"hi");
            assert_eq!(out[15], tos, "toward the peer");
            let (verdict, out) = run(&relay, &with_tos(frame(r.peer, r.relay, b"yo", true), tos));
            assert_eq!(verdict, XDP_TX);
            assert_eq!(
                sent(&out, r.server, r.client, true),
                channel_data(0x4001, b"yo")
            );
            assert_eq!(out[15], tos, "toward the client");
        }
    }

    /// With a bandwidth limit, the program takes from the budgets the
    /// workers take from (mapped into our memory, on the same clock):
    /// each allocation's own, each direction's own, and in place both the
    /// sender's and the receiver's; what a budget cannot pay for is
    /// dropped, as the workers drop it, and counted.
    #[test]
    fn keeps_to_the_bandwidth_budgets_the_workers_take_from() {
        let Some(relay) = loaded_by(KernelRelayConfig {
            relay_ip: Some(Ipv4Addr::LOCALHOST),
            bytes_per_sec: 1000,
            ..KernelRelayConfig::default()
        }) else {
            return;
        };
        let budgets = relay.budgets().expect("a limit, so budgets");
        let words = (*budgets.words).as_ref();
        assert_eq!(words.len(), SHARED_BUDGET_WORDS);
        let r = a_route(Instant::now() + Duration::from_secs(60));
        // A's client also has a channel (0x4002) to B, another of ours.
        let b_relay = addr("127.0.0.1:50002");
        let a_to_b = KernelRoute {
            channel: 0x4002,
            peer: b_relay,
            ..r
        };
        let (b, _) = allocation_open_to(r, b_relay);
        relay.apply([
            RouteChange::Set(r),
            RouteChange::Set(a_to_b),
            RouteChange::Set(b),
        ]);
        const XDP_DROP: u32 = 1;
        let verdicts = |f: &[u8], n: usize| (0..n).map(|_| run(&relay, f).0).collect::<Vec<_>>();
        // Half a second's bytes each: two go, the third waits half a second.
        let half = [7u8; 500];
        let to_peer = frame(r.client, r.server, &channel_data(0x4001, &half), true);
        assert_eq!(verdicts(&to_peer, 3), [XDP_TX, XDP_TX, XDP_DROP]);
        // The other direction has a budget of its own.
        let to_client = frame(r.peer, r.relay, &half, true);
        assert_eq!(verdicts(&to_client, 3), [XDP_TX, XDP_TX, XDP_DROP]);

        // What the workers take, the program finds taken: B's budget toward
        // its client nine-tenths spent (its word says paid up to 0.9 s from
        // now) leaves room for 50 bytes from A, relayed in place, not 500.
        let monotonic = |at: Instant| {
            budgets.clock.1 + at.saturating_duration_since(budgets.clock.0).as_nanos() as u64
        };
        let b_to_client = &words[2 * usize::from(b_relay.port()) + 1];
        let a_to_peer = &words[2 * usize::from(r.relay.port())];
        a_to_peer.store(0, Ordering::Relaxed);
        b_to_client.store(monotonic(Instant::now()) + 900_000_000, Ordering::Relaxed);
        let in_place = |data: &[u8]| {
            let packet = frame(r.client, r.server, &channel_data(0x4002, data), true);
            run(&relay, &packet).0
        };
        assert_eq!(in_place(&half), XDP_DROP, "B's budget is spent");
        assert_eq!(in_place(&half[..50]), XDP_TX, "but for 50 bytes");
        // A's budget toward its peers paid for both (0.55 s), the one
        // dropped for B's too: more than the 50 bytes' 0.05 s is owed, even
        // if this thread stalled for a while since.
        let ahead = a_to_peer
            .load(Ordering::Relaxed)
            .saturating_sub(monotonic(Instant::now()));
        assert!(
            (150_000_000..=550_000_000).contains(&ahead),
            "A's budget is paid {ahead} ns ahead"
        );
        // A budget emptied again (a new allocation on the port) pays again.
        a_to_peer.store(0, Ordering::Relaxed);
        assert_eq!(run(&relay, &to_peer).0, XDP_TX);

        // Send indications and Data indications (A permits the peer's IP)
        // take from the same budgets as ChannelData: half a second of A's
        // budget toward peers is left, then none.
        relay.apply([RouteChange::SetIndications(an_indication_route(r.expires))]);
        let other_port = SocketAddrV4::new(*r.peer.ip(), 7001);
        let send = frame(
            r.client,
            r.server,
            &send_indication(other_port, &half, true, 0),
            true,
        );
        assert_eq!(verdicts(&send, 2), [XDP_TX, XDP_DROP]);
        // A's budget toward its client is spent (above); emptied, it pays.
        let data_indication = frame(other_port, r.relay, &half, true);
        assert_eq!(run(&relay, &data_indication).0, XDP_DROP);
        words[2 * usize::from(r.relay.port()) + 1].store(0, Ordering::Relaxed);
        assert_eq!(run(&relay, &data_indication).0, XDP_TX);

        let stats = relay.stats();
        assert_eq!(
            (stats.to_peer_over_budget, stats.to_client_over_budget),
            (1 + 1, 2 + 1)
        );
        assert_eq!(stats.to_peer_packets, 2 + 1 + 1 + 1);
        assert_eq!(stats.to_client_packets, 2 + 1 + 1);
    }

    /// A frame sent back into loopback reaches only this host: the program
    /// sends one there only to 127.0.0.0/8 or to an address it has seen
    /// packets come from on loopback (one of this host's). Anything else
    /// goes to the sockets, which route it.
    #[test]
    fn on_loopback_relays_only_to_addresses_of_this_host() {
        let Some(relay) = loaded() else { return };
        let r = KernelRoute {
            client: addr("10.99.0.2:40000"),
            peer: addr("10.99.0.3:7000"),
            ..a_route(Instant::now() + Duration::from_secs(60))
        };
        relay.apply([RouteChange::Set(r)]);
        let to_peer = frame(r.client, r.server, &channel_data(0x4001, b"hi"), true);
        assert_eq!(run(&relay, &to_peer), (XDP_PASS, to_peer.clone()));
        // The client's packets came in on loopback: its address is ours.
        let (verdict, out) = run(&relay, &frame(r.peer, r.relay, b"back", true));
        assert_eq!(verdict, XDP_TX);
        assert_eq!(
            sent(&out, r.server, r.client, true),
            channel_data(0x4001, b"back")
        );
        // And now so did the peer's.
        let (verdict, out) = run(&relay, &to_peer);
        assert_eq!(verdict, XDP_TX);
        assert_eq!(sent(&out, r.relay, r.peer, true), b"hi");
    }

    #[test]
    fn relays_data_from_a_peer_without_a_channel_as_a_data_indication() {
        let Some(relay) = loaded() else { return };
        let later = Instant::now() + Duration::from_secs(60);
        let (r, i) = (a_route(later), an_indication_route(later));
        relay.apply([RouteChange::Set(r), RouteChange::SetIndications(i)]);
        // Another port of the permitted peer: no channel, so an indication;
        // every length, so every padding.
        let other_port = SocketAddrV4::new(*r.peer.ip(), 7001);
        let mut bytes = 0;
        let mut tids = HashSet::new();
        for udp_checksum in [true, false] {
            for data in [&b""[..], b"a", b"ab", b"abc", b"abcd", b"hello"] {
                let (verdict, out) = run(&relay, &frame(other_port, r.relay, data, udp_checksum));
                assert_eq!(verdict, XDP_TX, "{data:?}");
                let payload = sent(&out, r.server, r.client, udp_checksum);
                assert_eq!(
                    payload,
                    data_indication(other_port, data, &payload),
                    "{data:?}"
                );
                assert!(crate::stun::Message::parse(&payload).is_ok(), "{data:?}");
                tids.insert(payload[8..20].to_vec());
                bytes += data.len() as u64;
            }
        }
        assert_eq!(tids.len(), 12, "transaction ids differ");
        // The channel's own peer still gets ChannelData.
        let (verdict, out) = run(&relay, &frame(r.peer, r.relay, b"x", true));
        assert_eq!(verdict, XDP_TX);
        assert_eq!(
            sent(&out, r.server, r.client, true),
            channel_data(0x4001, b"x")
        );
        // Once the channel ends, before the permission, its peer's data
        // goes as indications too.
        relay.apply([RouteChange::Set(KernelRoute {
            expires: Instant::now(),
            ..r
        })]);
        let (verdict, out) = run(&relay, &frame(r.peer, r.relay, b"y", true));
        assert_eq!(verdict, XDP_TX);
        let payload = sent(&out, r.server, r.client, true);
        assert_eq!(payload, data_indication(r.peer, b"y", &payload));
        assert_eq!(
            relay.stats(),
            KernelStats {
                to_client_packets: 14,
                to_client_bytes: bytes + 2,
                ..KernelStats::default()
            }
        );
        // Gone with the permission.
        relay.apply([RouteChange::RemoveIndications(i)]);
        let packet = frame(other_port, r.relay, b"z", true);
        assert_eq!(run(&relay, &packet), (XDP_PASS, packet));
    }

    #[test]
    fn relays_send_indications_to_the_peer() {
        let Some(relay) = loaded() else { return };
        let later = Instant::now() + Duration::from_secs(60);
        let (r, i) = (a_route(later), an_indication_route(later));
        relay.apply([RouteChange::SetIndications(i)]);
        // Any port of the permitted peer; with and without FINGERPRINT,
        // every padding, padding bytes that are not zero (they count in the
        // UDP checksum), with and without a UDP checksum.
        let to = SocketAddrV4::new(*r.peer.ip(), 7001);
        let mut bytes = 0;
        for udp_checksum in [true, false] {
            for (fingerprint, data_first) in
                [(false, false), (true, false), (false, true), (true, true)]
            {
                for data in [&b""[..], b"a", b"ab", b"abc", b"abcd", b"hello"] {
                    let m = send_indication_in_order(to, data, fingerprint, 0xa5, data_first);
                    let (verdict, out) = run(&relay, &frame(r.client, r.server, &m, udp_checksum));
                    let case =
                        format!("{data:?}, FINGERPRINT {fingerprint}, DATA first {data_first}");
                    assert_eq!(verdict, XDP_TX, "{case}");
                    assert_eq!(sent(&out, r.relay, to, udp_checksum), data, "{case}");
                    bytes += data.len() as u64;
                }
            }
        }
        let big = vec![9u8; 1200];
        let (verdict, out) = run(
            &relay,
            &frame(
                r.client,
                r.server,
                &send_indication(to, &big, true, 0),
                true,
            ),
        );
        assert_eq!(verdict, XDP_TX);
        assert_eq!(sent(&out, r.relay, to, true), big);
        assert_eq!(
            relay.stats(),
            KernelStats {
                to_peer_packets: 49,
                to_peer_bytes: bytes + 1200,
                ..KernelStats::default()
            }
        );

        // What the server decides, or drops, or lays out otherwise, is
        // left to it.
        let mut bad_fingerprint = send_indication(to, b"hello", true, 0);
        bad_fingerprint[36] ^= 1;
        let mut extra = crate::stun::MessageBuilder::new(
            crate::stun::method::SEND,
            crate::stun::Class::Indication,
            &[7; 12],
        );
        extra
            .xor_address(crate::stun::attr::XOR_PEER_ADDRESS, to.into())
            .attr(crate::stun::attr::DATA, b"x")
            .attr(0x001a, b""); // DONT-FRAGMENT
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("a bad FINGERPRINT", bad_fingerprint),
            ("another attribute", extra.finish()),
            (
                "a peer without a permission",
                send_indication(addr("127.0.0.9:7000"), b"x", false, 0),
            ),
            (
                "our own relay IP",
                send_indication(addr("127.0.0.1:50001"), b"x", false, 0),
            ),
            (
                "more data than the program checks",
                send_indication(to, &[1; 1501], true, 0),
            ),
        ];
        for (case, m) in cases {
            let packet = frame(r.client, r.server, &m, true);
            assert_eq!(run(&relay, &packet), (XDP_PASS, packet.clone()), "{case}");
        }
        // A UDP checksum that does not hold: the program could not make it
        // hold. One that holds only the pseudo-header's sum, as a sender on
        // this host leaves it for its offload (CHECKSUM_PARTIAL), is
        // relayed on loopback (these runs are), where every checksum is so
        // and nobody checks them; elsewhere it goes to the sockets (tested
        // on a veth: the_kernel_relay_leaves_to_the_sockets_what_it_cannot_send_right).
        let mut broken = frame(
            r.client,
            r.server,
            &send_indication(to, b"hello", true, 0),
            true,
        );
        broken[40] ^= 0x10;
        assert_eq!(
            run(&relay, &broken),
            (XDP_PASS, broken.clone()),
            "a wrong UDP checksum"
        );
        let mut partial = frame(
            r.client,
            r.server,
            &send_indication(to, b"hello", true, 0),
            false,
        );
        let mut pseudo = r.client.ip().octets().to_vec();
        pseudo.extend_from_slice(&r.server.ip().octets());
        pseudo.extend_from_slice(&[0, 17]);
        pseudo.extend_from_slice(&partial[38..40]);
        let pseudo_sum = !checksum(&[&pseudo]);
        partial[40..42].copy_from_slice(&pseudo_sum.to_be_bytes());
        let (verdict, out) = run(&relay, &partial);
        assert_eq!(verdict, XDP_TX, "a partial UDP checksum, on loopback");
        assert_eq!(sent_loosely(&out, r.relay, to, false, true), b"hello");

        let packet = frame(
            addr("127.0.0.9:40000"),
            r.server,
            &send_indication(to, b"x", false, 0),
            true,
        );
        assert_eq!(
            run(&relay, &packet),
            (XDP_PASS, packet.clone()),
            "another client"
        );
        relay.apply([RouteChange::RemoveIndications(i)]);
        let packet = frame(
            r.client,
            r.server,
            &send_indication(to, b"x", false, 0),
            true,
        );
        assert_eq!(run(&relay, &packet), (XDP_PASS, packet.clone()), "removed");
    }

    #[test]
    fn relays_between_two_of_our_allocations_in_one_pass() {
        let Some(relay) = loaded() else { return };
        let later = Instant::now() + Duration::from_secs(60);
        // Two clients of this server, each with a channel to the other's
        // relayed address.
        let a = KernelRoute {
            peer: addr("127.0.0.1:50001"),
            ..a_route(later)
        };
        let b = KernelRoute {
            client: addr("127.0.0.4:40001"),
            channel: 0x4005,
            relay: a.peer,
            peer: a.relay,
            ..a
        };
        relay.apply([RouteChange::Set(a), RouteChange::Set(b)]);
        for (udp_checksum, data) in [(true, &b"hello"[..]), (false, b"odd"), (true, b"")] {
            // What A sends on its channel reaches B on B's, from the TURN
            // port: the relayed addresses are skipped, not sent to.
            let (verdict, out) = run(
                &relay,
                &frame(
                    a.client,
                    a.server,
                    &channel_data(0x4001, data),
                    udp_checksum,
                ),
            );
            assert_eq!(verdict, XDP_TX);
            assert_eq!(
                sent(&out, b.server, b.client, udp_checksum),
                channel_data(0x4005, data)
            );
        }
        // Without B's channel but with its permission, as a Data indication
        // from A's relayed address.
        let b_permission = IndicationRoute {
            client: b.client,
            server: b.server,
            relay: b.relay,
            peer: *a.relay.ip(),
            expires: later,
        };
        relay.apply([
            RouteChange::Remove(b),
            RouteChange::SetIndications(b_permission),
        ]);
        for data in [&b"abc"[..], b"abcd", b"abcdefg"] {
            let (verdict, out) = run(
                &relay,
                &frame(a.client, a.server, &channel_data(0x4001, data), true),
            );
            assert_eq!(verdict, XDP_TX);
            let payload = sent(&out, b.server, b.client, true);
            assert_eq!(payload, data_indication(a.relay, data, &payload));
        }
        let bytes = 5 + 3 + 3 + 4 + 7;
        assert_eq!(
            relay.stats(),
            KernelStats {
                to_peer_packets: 6,
                to_peer_bytes: bytes,
                to_client_packets: 6,
                to_client_bytes: bytes,
                ..KernelStats::default()
            }
        );
        // Without either, the packet leaves for B's relayed address, as for
        // any peer (on loopback it comes back in there).
        relay.apply([RouteChange::RemoveIndications(b_permission)]);
        let (verdict, out) = run(
            &relay,
            &frame(a.client, a.server, &channel_data(0x4001, b"x"), true),
        );
        assert_eq!(verdict, XDP_TX);
        assert_eq!(sent(&out, a.relay, a.peer, true), b"x");
    }

    /// Send indications from one client of this server to another's relayed
    /// address (relay/relay from a client that binds no channels, as
    /// Firefox): handed to the other client in one pass, as ChannelData on
    /// its channel or as a Data indication from the sender's relayed
    /// address, whatever the sender's layout, FINGERPRINT, padding and
    /// checksum.
    #[test]
    fn relays_send_indications_between_two_of_our_allocations_in_one_pass() {
        let Some(relay) = loaded() else { return };
        let later = Instant::now() + Duration::from_secs(60);
        let a = a_route(later);
        let a_permission = IndicationRoute {
            peer: *a.relay.ip(),
            ..an_indication_route(later)
        };
        let (b, b_permission) = allocation_open_to(a, addr("127.0.0.1:50001"));
        let mut bytes = 0;
        let mut packets = 0;
        for b_has_a_channel in [true, false] {
            let b_routes = if b_has_a_channel {
                vec![
                    RouteChange::Set(b),
                    RouteChange::SetIndications(b_permission),
                ]
            } else {
                vec![
                    RouteChange::Remove(b),
                    RouteChange::SetIndications(b_permission),
                ]
            };
            relay.apply([RouteChange::SetIndications(a_permission)]);
            relay.apply(b_routes);
            for udp_checksum in [true, false] {
                for (fingerprint, data_first) in
                    [(false, false), (true, false), (false, true), (true, true)]
                {
                    for data in [&b""[..], b"a", b"ab", b"abc", b"abcd", b"hello"] {
                        let m =
                            send_indication_in_order(b.relay, data, fingerprint, 0xa5, data_first);
                        let (verdict, out) =
                            run(&relay, &frame(a.client, a.server, &m, udp_checksum));
                        let case = format!(
                            "{data:?}, FINGERPRINT {fingerprint}, DATA first {data_first}, channel {b_has_a_channel}"
                        );
                        assert_eq!(verdict, XDP_TX, "{case}");
                        let payload = sent(&out, b.server, b.client, udp_checksum);
                        if b_has_a_channel {
                            assert_eq!(payload, channel_data(0x4005, data), "{case}");
                        } else {
                            assert_eq!(payload, data_indication(a.relay, data, &payload), "{case}");
                            assert!(crate::stun::Message::parse(&payload).is_ok(), "{case}");
                        }
                        bytes += data.len() as u64;
                        packets += 1;
                    }
                }
            }
        }
        assert_eq!(
            relay.stats(),
            KernelStats {
                to_peer_packets: packets,
                to_peer_bytes: bytes,
                to_client_packets: packets,
                to_client_bytes: bytes,
                ..KernelStats::default()
            }
        );
        // Without B's routes the server decides: it alone knows whether the
        // port is a live relay open to A.
        relay.apply([
            RouteChange::Remove(b),
            RouteChange::RemoveIndications(b_permission),
        ]);
        let packet = frame(
            a.client,
            a.server,
            &send_indication(b.relay, b"x", true, 0),
            true,
        );
        assert_eq!(run(&relay, &packet), (XDP_PASS, packet));
    }

    #[test]
    fn relays_between_two_of_our_allocations_known_by_the_external_ip() {
        let external: Ipv4Addr = "198.51.100.1".parse().expect("an address");
        let Some(relay) = loaded_with(Some(external)) else {
            return;
        };
        let later = Instant::now() + Duration::from_secs(60);
        // Each client binds a channel to the other's advertised address; the
        // routes hold the bound relay address.
        let a = KernelRoute {
            peer: SocketAddrV4::new(external, 50001),
            ..a_route(later)
        };
        let b = KernelRoute {
            client: addr("127.0.0.4:40001"),
            channel: 0x4005,
            relay: addr("127.0.0.1:50001"),
            peer: SocketAddrV4::new(external, 50000),
            ..a
        };
        relay.apply([RouteChange::Set(a), RouteChange::Set(b)]);
        let (verdict, out) = run(
            &relay,
            &frame(a.client, a.server, &channel_data(0x4001, b"hi"), true),
        );
        assert_eq!(verdict, XDP_TX);
        assert_eq!(
            sent(&out, b.server, b.client, true),
            channel_data(0x4005, b"hi")
        );
        // As a Data indication, the sender is its advertised address.
        let b_permission = IndicationRoute {
            client: b.client,
            server: b.server,
            relay: b.relay,
            peer: external,
            expires: later,
        };
        relay.apply([
            RouteChange::Remove(b),
            RouteChange::SetIndications(b_permission),
        ]);
        let (verdict, out) = run(
            &relay,
            &frame(a.client, a.server, &channel_data(0x4001, b"hi"), true),
        );
        assert_eq!(verdict, XDP_TX);
        let payload = sent(&out, b.server, b.client, true);
        assert_eq!(payload, data_indication(b.peer, b"hi", &payload));
    }

    #[test]
    fn a_refused_channel_keeps_its_peers_data_indications_out_of_the_kernel() {
        let Some(relay) = loaded() else { return };
        let later = Instant::now() + Duration::from_secs(60);
        let (r, i) = (a_route(later), an_indication_route(later));
        relay.apply([RouteChange::SetIndications(i)]);
        // Fill the client routes' map with other flows.
        {
            let mut inner = relay.lock();
            let other = ToPeer::of(&r, 0);
            for n in 0u32.. {
                let key = ClientKey {
                    client_ip: n,
                    ..ClientKey::of(&r)
                };
                if inner.v4.client_routes.insert(key, other, 0).is_err() {
                    break;
                }
            }
        }
        relay.apply([RouteChange::Set(r)]);
        // The server sends ChannelData from this peer: the kernel must not
        // send indications instead, so it leaves the peer to the sockets.
        let packet = frame(r.peer, r.relay, b"x", true);
        assert_eq!(run(&relay, &packet), (XDP_PASS, packet.clone()));
        relay.apply([RouteChange::SetIndications(i)]);
        assert_eq!(run(&relay, &packet), (XDP_PASS, packet.clone()), "renewed");
        // Without the channel, the permission's next renewal brings the
        // route back.
        relay.apply([RouteChange::Remove(r), RouteChange::SetIndications(i)]);
        let (verdict, out) = run(&relay, &packet);
        assert_eq!(verdict, XDP_TX);
        let payload = sent(&out, r.server, r.client, true);
        assert_eq!(payload, data_indication(r.peer, b"x", &payload));
    }

    #[test]
    fn leaves_everything_else_to_the_sockets() {
        let Some(relay) = loaded() else { return };
        let now = Instant::now();
        let r = a_route(now + Duration::from_secs(60));
        let i = an_indication_route(now + Duration::from_secs(60));
        relay.apply([RouteChange::Set(r), RouteChange::SetIndications(i)]);
        let stranger = addr("127.0.0.9:7000");
        let mut padded = channel_data(0x4001, b"abc");
        padded.push(0);
        let mut options = frame(r.client, r.server, &channel_data(0x4001, b"x"), true);
        options[14] = 0x46;
        let mut fragment = frame(r.peer, r.relay, b"x", true);
        fragment[20] = 0x20; // more fragments
        let cases: Vec<(&str, Vec<u8>)> = vec![
            (
                "another channel",
                frame(r.client, r.server, &channel_data(0x4002, b"x"), true),
            ),
            (
                "another client",
                frame(stranger, r.server, &channel_data(0x4001, b"x"), true),
            ),
            ("padded", frame(r.client, r.server, &padded, true)),
            ("length beyond the datagram", {
                let mut cd = channel_data(0x4001, b"abc");
                cd[3] = 9;
                frame(r.client, r.server, &cd, true)
            }),
            (
                "a STUN request",
                frame(
                    r.client,
                    r.server,
                    &[0, 1, 0, 0, 0x21, 0x12, 0xa4, 0x42],
                    true,
                ),
            ),
            (
                "a peer without a permission",
                frame(stranger, r.relay, b"x", true),
            ),
            (
                "another relay port",
                frame(r.peer, addr("127.0.0.1:50001"), b"x", true),
            ),
            ("IP options", options),
            ("a fragment", fragment),
            (
                "truncated",
                frame(r.peer, r.relay, b"abcdef", true)[..40].to_vec(),
            ),
        ];
        for (case, packet) in &cases {
            let (verdict, out) = run(&relay, packet);
            assert_eq!((verdict, &out), (XDP_PASS, packet), "{case}");
        }

        // An expired route is not followed, even before it is removed.
        relay.apply([
            RouteChange::Set(KernelRoute { expires: now, ..r }),
            RouteChange::SetIndications(IndicationRoute { expires: now, ..i }),
        ]);
        let (verdict, _) = run(&relay, &frame(r.peer, r.relay, b"x", true));
        assert_eq!(verdict, XDP_PASS, "expired");
        // A removed one neither.
        relay.apply([
            RouteChange::Set(r),
            RouteChange::Remove(r),
            RouteChange::RemoveIndications(i),
        ]);
        let (verdict, _) = run(&relay, &frame(r.peer, r.relay, b"x", true));
        assert_eq!(verdict, XDP_PASS, "removed");
        assert_eq!(relay.stats(), KernelStats::default());
    }

    #[test]
    fn the_committed_program_was_built_from_the_committed_source() {
        let source = include_bytes!("../../bpf/relay.bpf.c");
        let recorded = include_str!("../../bpf/relay.bpf.c.sha256").trim();
        let digest = ring::digest::digest(&ring::digest::SHA256, source);
        let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex, recorded,
            "bpf/relay.bpf.c changed since relay.bpf.o was built: run scripts/build-bpf.sh"
        );
    }

    /// A frame for the property below: a valid one for the routes (from
    /// the client: ChannelData or a Send indication; from the channel's
    /// peer, from another port of the peer), or random bytes; then some
    /// bytes overwritten.
    fn arb_frame() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::prelude::*;
        let r = a_route(Instant::now());
        let valid = (
            0..4,
            proptest::collection::vec(any::<u8>(), 0..64),
            any::<bool>(),
            prop_oneof![Just(0x4001u16), any::<u16>()],
            prop_oneof![Just(None), any::<u16>().prop_map(Some)],
            any::<u16>(),
            (
                any::<bool>(),
                any::<u8>(),
                prop_oneof![
                    Just(*r.peer.ip()),
                    any::<[u8; 4]>().prop_map(std::net::Ipv4Addr::from)
                ],
                // The port `b` relays on, when the peer's IP is ours.
                prop_oneof![Just(r.peer.port()), any::<u16>()],
            ),
        )
            .prop_map(
                move |(
                    from,
                    data,
                    check,
                    channel,
                    len,
                    port,
                    (fingerprint, padding, peer_ip, send_port),
                )| {
                    match from {
                        0 => {
                            let mut cd = channel_data(channel, &data);
                            if let Some(len) = len {
                                cd[2..4].copy_from_slice(&len.to_be_bytes());
                            }
                            frame(r.client, r.server, &cd, check)
                        }
                        1 => frame(r.peer, r.relay, &data, check),
                        2 => frame(SocketAddrV4::new(*r.peer.ip(), port), r.relay, &data, check),
                        _ => {
                            let to = SocketAddrV4::new(peer_ip, send_port);
                            frame(
                                r.client,
                                r.server,
                                &send_indication(to, &data, fingerprint, padding),
                                check,
                            )
                        }
                    }
                },
            );
        // The kernel hands XDP no frame shorter than an Ethernet header
        // (and its test runner takes none).
        let any_bytes = proptest::collection::vec(any::<u8>(), 14..120);
        with_bytes_overwritten(prop_oneof![3 => valid, 1 => any_bytes])
    }

    /// `frames`, with up to two bytes of each overwritten anywhere.
    fn with_bytes_overwritten(
        frames: impl proptest::strategy::Strategy<Value = Vec<u8>>,
    ) -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::prelude::*;
        (
            frames,
            proptest::collection::vec((any::<usize>(), any::<u8>()), 0..3),
        )
            .prop_map(|(mut f, flips)| {
                for (at, byte) in flips {
                    if !f.is_empty() {
                        let i = at % f.len();
                        f[i] = byte;
                    }
                }
                f
            })
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(
            std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2000)
        ))]

        /// Whatever arrives, the program either leaves it untouched for the
        /// sockets, or relays exactly it along the route: the right
        /// addresses, the payload with the channel header taken off or put
        /// on, and checksums that still hold where they held. The route's
        /// peer is sometimes another allocation of ours (`peer_is_ours`:
        /// with a channel back, or only a permission), whose client then
        /// gets the data directly; so do Send indications to it when the
        /// program knows the peer's IP as our relay IP (`send_to_ours`).
        #[test]
        fn any_frame_is_relayed_along_its_route_or_left_alone(
            packet in arb_frame(),
            peer_is_ours in 0..3u8,
            send_to_ours in proptest::prelude::any::<bool>(),
        ) {
            // Loaded once: the verifier takes tens of milliseconds. With
            // `send_to_ours`, the program takes the peer's IP for our relay
            // IP, so Send indications to it go to our own allocation `b`.
            // A refusal is kept too: every case then fails at once, where
            // loading again for each (the verifier taking half a minute to
            // give up on a program too complex) kept the suite busy for a
            // quarter of an hour.
            type Loaded = Option<Result<KernelRelay, String>>;
            static RELAY: std::sync::OnceLock<Loaded> = std::sync::OnceLock::new();
            static RELAY_OURS: std::sync::OnceLock<Loaded> = std::sync::OnceLock::new();
            let later = Instant::now() + Duration::from_secs(60);
            let r = a_route(later);
            let relay_ip = |ip: Ipv4Addr| KernelRelayConfig {
                relay_ip: Some(ip),
                ..KernelRelayConfig::default()
            };
            let loaded = if send_to_ours {
                RELAY_OURS.get_or_init(|| try_loaded_by(relay_ip(*r.peer.ip())))
            } else {
                RELAY.get_or_init(|| try_loaded_by(relay_ip(Ipv4Addr::LOCALHOST)))
            };
            let Some(loaded) = loaded else { return Ok(()) };
            let relay = loaded.as_ref().expect("the program loads");
            // The peer's side, were it one of ours.
            let (b, b_permission) = allocation_open_to(r, r.peer);
            relay.apply([
                RouteChange::Set(r),
                RouteChange::SetIndications(an_indication_route(later)),
                RouteChange::Remove(b),
                RouteChange::RemoveIndications(b_permission),
            ]);
            match peer_is_ours {
                1 => relay.apply([RouteChange::Set(b)]),
                2 => relay.apply([RouteChange::SetIndications(b_permission)]),
                _ => {}
            }
            let (verdict, out) = run(relay, &packet);
            if verdict == XDP_PASS {
                proptest::prop_assert_eq!(&out, &packet);
                return Ok(());
            }
            proptest::prop_assert_eq!(verdict, XDP_TX);
            // Only well-formed frames get here: check what left against
            // what came.
            let udp_in = &packet[34..];
            let from = SocketAddrV4::new(
                std::net::Ipv4Addr::new(packet[26], packet[27], packet[28], packet[29]),
                u16::from_be_bytes([udp_in[0], udp_in[1]]),
            );
            let to = SocketAddrV4::new(
                std::net::Ipv4Addr::new(packet[30], packet[31], packet[32], packet[33]),
                u16::from_be_bytes([udp_in[2], udp_in[3]]),
            );
            let checked = udp_in[6..8] != [0, 0] && udp_checksum_of(&from, &to, udp_in) == 0;
            let ip_ok = checksum(&[&packet[14..34]]) == 0;
            let payload_in = &udp_in[8..];
            if (from, to) == (r.client, r.server) && payload_in.first() == Some(&0) {
                // A Send indication: relayed only if the server's own parser
                // takes it (FINGERPRINT included) as one to a permitted peer.
                use crate::stun::{attr, method, Class, Message};
                let m = Message::parse(payload_in);
                proptest::prop_assert!(m.is_ok(), "relayed what the server would drop: {:?}", m.err());
                let m = m.unwrap();
                proptest::prop_assert_eq!((m.method(), m.class()), (method::SEND, Class::Indication));
                let peer = crate::stun::decode_xor_address(
                    attr::XOR_PEER_ADDRESS,
                    m.get(attr::XOR_PEER_ADDRESS).unwrap_or_default(),
                    m.transaction_id(),
                );
                let data = m.get(attr::DATA).unwrap_or_default();
                if send_to_ours {
                    // To `b`'s relayed address, along `b`'s routes.
                    proptest::prop_assert_eq!(peer.ok(), Some(SocketAddr::V4(b.relay)));
                    let out_payload = sent_loosely(&out, b.server, b.client, checked, ip_ok);
                    let expected = match peer_is_ours {
                        1 => channel_data(0x4005, data),
                        2 => data_indication(r.relay, data, &out_payload),
                        _ => Vec::new(), // no route of b's: nothing may leave
                    };
                    proptest::prop_assert_eq!(out_payload, expected);
                } else {
                    let out_payload = sent_loosely(&out, r.relay, sent_to(&out), checked, ip_ok);
                    proptest::prop_assert_eq!(peer.ok(), Some(SocketAddr::V4(sent_to(&out))));
                    proptest::prop_assert_eq!(*sent_to(&out).ip(), *r.peer.ip());
                    proptest::prop_assert_eq!(data, &out_payload[..]);
                }
            } else if (from, to) == (r.client, r.server) {
                let data = &payload_in[4..];
                match peer_is_ours {
                    1 => {
                        let out_payload = sent_loosely(&out, b.server, b.client, checked, ip_ok);
                        proptest::prop_assert_eq!(out_payload, channel_data(0x4005, data));
                    }
                    2 => {
                        let out_payload = sent_loosely(&out, b.server, b.client, checked, ip_ok);
                        let expected = data_indication(r.relay, data, &out_payload);
                        proptest::prop_assert_eq!(out_payload, expected);
                    }
                    _ => {
                        let out_payload = sent_loosely(&out, r.relay, r.peer, checked, ip_ok);
                        proptest::prop_assert_eq!(&out_payload[..], data);
                    }
                }
                proptest::prop_assert_eq!(&payload_in[..2], &0x4001u16.to_be_bytes());
                let declared = u16::from_be_bytes([payload_in[2], payload_in[3]]);
                proptest::prop_assert_eq!(usize::from(declared), payload_in.len() - 4);
            } else if from == r.peer {
                proptest::prop_assert_eq!(to, r.relay);
                let out_payload = sent_loosely(&out, r.server, r.client, checked, ip_ok);
                proptest::prop_assert_eq!(out_payload, channel_data(0x4001, payload_in));
            } else {
                proptest::prop_assert_eq!((from.ip(), to), (r.peer.ip(), r.relay));
                let out_payload = sent_loosely(&out, r.server, r.client, checked, ip_ok);
                let expected = data_indication(from, payload_in, &out_payload);
                proptest::prop_assert_eq!(out_payload, expected);
            }
        }
    }

    /// Where a frame the program sent goes.
    fn sent_to(frame: &[u8]) -> SocketAddrV4 {
        SocketAddrV4::new(
            std::net::Ipv4Addr::new(frame[30], frame[31], frame[32], frame[33]),
            u16::from_be_bytes([frame[36], frame[37]]),
        )
    }

    /// [`sent`], but checksums are only checked where the input's held: a
    /// frame damaged on the way stays damaged (IP's is made anew).
    fn sent_loosely(
        frame: &[u8],
        from: SocketAddrV4,
        to: SocketAddrV4,
        udp_ok: bool,
        _ip_ok: bool,
    ) -> Vec<u8> {
        if udp_ok {
            return sent(frame, from, to, true);
        }
        let mut copy = frame.to_vec();
        copy[40..42].copy_from_slice(&[0, 0]);
        sent(&copy, from, to, false)
    }

    #[test]
    fn a_removal_spares_a_newer_flow_on_the_same_relay_port() {
        let Some(relay) = loaded() else { return };
        let later = Instant::now() + Duration::from_secs(60);
        let old = a_route(later);
        let new = KernelRoute {
            client: addr("127.0.0.4:40000"),
            channel: 0x4005,
            ..old
        };
        // Another worker set the new flow before this one's removal of
        // the old arrived.
        relay.apply([
            RouteChange::Set(old),
            RouteChange::Set(new),
            RouteChange::Remove(old),
        ]);
        let (verdict, out) = run(&relay, &frame(new.peer, new.relay, b"x", true));
        assert_eq!(verdict, XDP_TX);
        assert_eq!(
            sent(&out, new.server, new.client, true),
            channel_data(0x4005, b"x")
        );
    }

    // IPv6.

    fn addr6(s: &str) -> SocketAddrV6 {
        s.parse().expect("an IPv6 address")
    }

    /// The program, told of the relay IPs 127.0.0.1 and ::1 and `config`'s
    /// IPv6 external address and limit, if root.
    fn loaded6(external_ip6: Option<Ipv6Addr>, bytes_per_sec: u64) -> Option<KernelRelay> {
        loaded_by(KernelRelayConfig {
            relay_ip: Some(Ipv4Addr::LOCALHOST),
            relay_ip6: Some(Ipv6Addr::LOCALHOST),
            external_ip6,
            bytes_per_sec,
            ..KernelRelayConfig::default()
        })
    }

    fn a_route6(expires: Instant) -> KernelRoute6 {
        KernelRoute6 {
            client: addr6("[::1]:40000"),
            server: addr6("[::1]:3478"),
            channel: 0x4001,
            relay: addr6("[::1]:50000"),
            peer: addr6("[::1]:7000"),
            expires,
        }
    }

    fn udp6_checksum_of(from: &SocketAddrV6, to: &SocketAddrV6, udp: &[u8]) -> u16 {
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&from.ip().octets());
        pseudo.extend_from_slice(&to.ip().octets());
        pseudo.extend_from_slice(&(udp.len() as u32).to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, 17]);
        checksum(&[&pseudo, udp])
    }

    /// An Ethernet frame (loopback: zero addresses) with an IPv6 UDP
    /// datagram, its checksum right, traffic class 0xab, flow label
    /// 0xcdef0 and hop limit 33.
    fn frame6(from: SocketAddrV6, to: SocketAddrV6, payload: &[u8]) -> Vec<u8> {
        let udp_len = 8 + payload.len() as u16;
        let mut udp = Vec::new();
        udp.extend_from_slice(&from.port().to_be_bytes());
        udp.extend_from_slice(&to.port().to_be_bytes());
        udp.extend_from_slice(&udp_len.to_be_bytes());
        udp.extend_from_slice(&[0, 0]);
        udp.extend_from_slice(payload);
        let check = match udp6_checksum_of(&from, &to, &udp) {
            0 => 0xffff,
            c => c,
        };
        udp[6..8].copy_from_slice(&check.to_be_bytes());
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&[0x86, 0xdd, 0x6a, 0xbc, 0xde, 0xf0]);
        f.extend_from_slice(&udp_len.to_be_bytes());
        f.extend_from_slice(&[17, 33]);
        f.extend_from_slice(&from.ip().octets());
        f.extend_from_slice(&to.ip().octets());
        f.extend_from_slice(&udp);
        f
    }

    /// Checks a frame the program sent over IPv6: addresses, lengths, hop
    /// limit, the traffic class kept and the flow label gone, and (if
    /// `udp_checksum`) the checksum; returns the UDP payload.
    fn sent6(frame: &[u8], from: SocketAddrV6, to: SocketAddrV6, udp_checksum: bool) -> Vec<u8> {
        sent6_of_class(frame, from, to, udp_checksum, 0xab)
    }

    /// [`sent6`], for a frame that came in with traffic class `class`.
    fn sent6_of_class(
        frame: &[u8],
        from: SocketAddrV6,
        to: SocketAddrV6,
        udp_checksum: bool,
        class: u8,
    ) -> Vec<u8> {
        assert_eq!(&frame[12..14], &[0x86, 0xdd]);
        let ip = &frame[14..54];
        assert_eq!(
            &ip[..4],
            &[0x60 | class >> 4, class << 4, 0, 0],
            "version, class, label"
        );
        assert_eq!(
            usize::from(u16::from_be_bytes([ip[4], ip[5]])),
            frame.len() - 54
        );
        assert_eq!((ip[6], ip[7]), (17, 64), "UDP, hop limit");
        assert_eq!(&ip[8..24], &from.ip().octets());
        assert_eq!(&ip[24..40], &to.ip().octets());
        let udp = &frame[54..];
        assert_eq!(u16::from_be_bytes([udp[0], udp[1]]), from.port());
        assert_eq!(u16::from_be_bytes([udp[2], udp[3]]), to.port());
        assert_eq!(usize::from(u16::from_be_bytes([udp[4], udp[5]])), udp.len());
        assert_ne!(&udp[6..8], &[0, 0], "IPv6 UDP always has a checksum");
        if udp_checksum {
            assert_eq!(udp6_checksum_of(&from, &to, udp), 0, "UDP checksum");
        }
        udp[8..].to_vec()
    }

    #[test]
    fn relays_channel_data_over_ipv6_both_ways_with_correct_headers() {
        let Some(relay) = loaded6(None, 0) else {
            return;
        };
        let r = a_route6(Instant::now() + Duration::from_secs(60));
        relay.apply([RouteChange::Set6(r)]);
        for data in [&b"hello"[..], b"odd", b""] {
            let (verdict, out) = run(
                &relay,
                &frame6(r.client, r.server, &channel_data(0x4001, data)),
            );
            assert_eq!(verdict, XDP_TX);
            assert_eq!(sent6(&out, r.relay, r.peer, true), data);

            let (verdict, out) = run(&relay, &frame6(r.peer, r.relay, data));
            assert_eq!(verdict, XDP_TX);
            assert_eq!(
                sent6(&out, r.server, r.client, true),
                channel_data(0x4001, data)
            );
        }
        assert_eq!(
            relay.stats(),
            KernelStats {
                to_peer_packets: 3,
                to_peer_bytes: 8,
                to_client_packets: 3,
                to_client_bytes: 8,
                ..KernelStats::default()
            }
        );
        // Removed, it is the sockets' again.
        relay.apply([RouteChange::Remove6(r)]);
        let to_peer = frame6(r.client, r.server, &channel_data(0x4001, b"x"));
        assert_eq!(run(&relay, &to_peer), (XDP_PASS, to_peer));
        assert_eq!(relay.lock().routes, 0);
    }

    /// Two IPv6 clients of this server with channels to each other's
    /// relayed addresses, known by the relay IP or by an external one:
    /// handed over in one pass. Without the receiver's channel the packet
    /// leaves for its relayed address, where the sockets take it (they
    /// send Data indications over IPv6).
    #[test]
    fn relays_over_ipv6_between_two_of_our_allocations_in_one_pass() {
        let external: Ipv6Addr = "2001:db8::1".parse().unwrap();
        for external_ip6 in [None, Some(external)] {
            let Some(relay) = loaded6(external_ip6, 0) else {
                return;
            };
            let known =
                |port| SocketAddrV6::new(external_ip6.unwrap_or(Ipv6Addr::LOCALHOST), port, 0, 0);
            let a = KernelRoute6 {
                peer: known(50001),
                ..a_route6(Instant::now() + Duration::from_secs(60))
            };
            let b = KernelRoute6 {
                client: addr6("[::1]:40001"),
                channel: 0x4005,
                relay: addr6("[::1]:50001"),
                peer: known(50000),
                ..a
            };
            relay.apply([RouteChange::Set6(a), RouteChange::Set6(b)]);
            let (verdict, out) = run(
                &relay,
                &frame6(a.client, a.server, &channel_data(0x4001, b"hello")),
            );
            assert_eq!(verdict, XDP_TX, "{external_ip6:?}");
            assert_eq!(
                sent6(&out, b.server, b.client, true),
                channel_data(0x4005, b"hello")
            );
            assert_eq!(relay.stats().to_peer_packets, 1);
            assert_eq!(relay.stats().to_client_packets, 1);

            relay.apply([RouteChange::Remove6(b)]);
            let to_b = frame6(a.client, a.server, &channel_data(0x4001, b"hi"));
            let (verdict, out) = run(&relay, &to_b);
            if external_ip6.is_some() {
                // Not this host's on loopback, nor seen there: the sockets'.
                assert_eq!((verdict, out), (XDP_PASS, to_b));
            } else {
                assert_eq!(verdict, XDP_TX);
                assert_eq!(sent6(&out, a.relay, a.peer, true), b"hi");
            }
        }
    }

    /// As over IPv4: on loopback, only to addresses of this host, ::1 or
    /// one a packet came from there.
    #[test]
    fn over_ipv6_on_loopback_relays_only_to_addresses_of_this_host() {
        let Some(relay) = loaded6(None, 0) else {
            return;
        };
        let r = KernelRoute6 {
            client: addr6("[2001:db8::2]:40000"),
            peer: addr6("[2001:db8::3]:7000"),
            ..a_route6(Instant::now() + Duration::from_secs(60))
        };
        relay.apply([RouteChange::Set6(r)]);
        let to_peer = frame6(r.client, r.server, &channel_data(0x4001, b"hi"));
        assert_eq!(run(&relay, &to_peer), (XDP_PASS, to_peer.clone()));
        let (verdict, out) = run(&relay, &frame6(r.peer, r.relay, b"back"));
        assert_eq!(verdict, XDP_TX);
        assert_eq!(
            sent6(&out, r.server, r.client, true),
            channel_data(0x4001, b"back")
        );
        let (verdict, out) = run(&relay, &to_peer);
        assert_eq!(verdict, XDP_TX);
        assert_eq!(sent6(&out, r.relay, r.peer, true), b"hi");
    }

    #[test]
    fn over_ipv6_leaves_everything_else_to_the_sockets() {
        let Some(relay) = loaded6(None, 0) else {
            return;
        };
        let later = Instant::now() + Duration::from_secs(60);
        let r = a_route6(later);
        let expired = KernelRoute6 {
            client: addr6("[::1]:40009"),
            expires: Instant::now(),
            ..r
        };
        relay.apply([RouteChange::Set6(r), RouteChange::Set6(expired)]);
        let cd = |data: &[u8]| frame6(r.client, r.server, &channel_data(0x4001, data));
        let mut no_checksum = cd(b"x");
        no_checksum[60..62].copy_from_slice(&[0, 0]);
        let mut extension_header = cd(b"x");
        extension_header[20] = 0; // hop-by-hop options
        let mut padded = cd(b"abc");
        padded.push(0);
        padded[18..20].copy_from_slice(&16u16.to_be_bytes());
        padded[58..60].copy_from_slice(&16u16.to_be_bytes());
        let mut short = cd(b"abcdef");
        short.truncate(short.len() - 2);
        let mut too_long = cd(b"x");
        too_long[57] = 9; // the ChannelData length says 9 bytes
        let a_send = frame6(r.client, r.server, &send_indication(r.peer, b"x", false, 0));
        let cases = [
            ("no UDP checksum", no_checksum),
            ("an extension header", extension_header),
            ("padded ChannelData", padded),
            ("short frame", short),
            ("ChannelData longer than the datagram", too_long),
            (
                "another channel",
                frame6(r.client, r.server, &channel_data(0x4002, b"x")),
            ),
            (
                "another client port",
                frame6(addr6("[::1]:40001"), r.server, &channel_data(0x4001, b"x")),
            ),
            (
                "an expired route",
                frame6(expired.client, r.server, &channel_data(0x4001, b"x")),
            ),
            ("a Send indication", a_send),
            (
                "another port of the peer",
                frame6(addr6("[::1]:7001"), r.relay, b"x"),
            ),
            (
                "another relay port",
                frame6(r.peer, addr6("[::1]:50001"), b"x"),
            ),
            (
                "a STUN request",
                frame6(r.client, r.server, &[0, 1, 0, 0, 0x21, 0x12, 0xa4, 0x42]),
            ),
        ];
        for (case, packet) in cases {
            assert_eq!(run(&relay, &packet), (XDP_PASS, packet.clone()), "{case}");
        }
        assert_eq!(relay.stats(), KernelStats::default());
    }

    /// Over IPv6 the program takes from the IPv6 relays' budgets, which
    /// follow the IPv4 ones': an IPv6 relay on a port number an IPv4 relay
    /// also has keeps to a limit of its own, each direction, directly and
    /// in place.
    #[test]
    fn over_ipv6_keeps_to_budgets_of_its_own() {
        let Some(relay) = loaded6(None, 1000) else {
            return;
        };
        let budgets = relay.budgets().expect("a limit, so budgets");
        let words = (*budgets.words).as_ref();
        let r = a_route6(Instant::now() + Duration::from_secs(60));
        // A second allocation of ours, with channels both ways to r's.
        let a_to_b = KernelRoute6 {
            channel: 0x4002,
            peer: addr6("[::1]:50002"),
            ..r
        };
        let b = KernelRoute6 {
            client: addr6("[::1]:40001"),
            channel: 0x4005,
            relay: a_to_b.peer,
            peer: r.relay,
            ..r
        };
        relay.apply([
            RouteChange::Set6(r),
            RouteChange::Set6(a_to_b),
            RouteChange::Set6(b),
        ]);
        const XDP_DROP: u32 = 1;
        let verdicts = |f: &[u8], n: usize| (0..n).map(|_| run(&relay, f).0).collect::<Vec<_>>();
        let half = [7u8; 500];
        let to_peer = frame6(r.client, r.server, &channel_data(0x4001, &half));
        assert_eq!(verdicts(&to_peer, 3), [XDP_TX, XDP_TX, XDP_DROP]);
        let to_client = frame6(r.peer, r.relay, &half);
        assert_eq!(verdicts(&to_client, 3), [XDP_TX, XDP_TX, XDP_DROP]);
        // The IPv6 words of r's port, not the IPv4 ones.
        let port = usize::from(r.relay.port());
        let v6 = SHARED_BUDGET_WORDS / 2;
        assert!(words[v6 + 2 * port].load(Ordering::Relaxed) > 0);
        assert!(words[v6 + 2 * port + 1].load(Ordering::Relaxed) > 0);
        assert_eq!(words[2 * port].load(Ordering::Relaxed), 0);
        assert_eq!(words[2 * port + 1].load(Ordering::Relaxed), 0);
        // In place: from the sender's budget toward peers (spent above)...
        let in_place = frame6(r.client, r.server, &channel_data(0x4002, &half[..50]));
        assert_eq!(run(&relay, &in_place).0, XDP_DROP);
        words[v6 + 2 * port].store(0, Ordering::Relaxed);
        assert_eq!(run(&relay, &in_place).0, XDP_TX);
        // ...and the receiver's toward its client.
        let b_port = usize::from(b.relay.port());
        assert!(words[v6 + 2 * b_port + 1].load(Ordering::Relaxed) > 0);
        let stats = relay.stats();
        assert_eq!(
            (stats.to_peer_over_budget, stats.to_client_over_budget),
            (2, 1)
        );
    }

    /// The permission route beside [`a_route6`].
    fn an_indication_route6(expires: Instant) -> IndicationRoute6 {
        let r = a_route6(expires);
        IndicationRoute6 {
            client: r.client,
            server: r.server,
            relay: r.relay,
            peer: *r.peer.ip(),
            expires,
        }
    }

    /// Data from a permitted IPv6 peer without a channel (another port of
    /// the channel's peer) reaches the client as the Data indication the
    /// server would send, XOR-PEER-ADDRESS of 20 bytes, data padded.
    #[test]
    fn relays_data_from_a_permitted_ipv6_peer_as_a_data_indication() {
        let Some(relay) = loaded6(None, 0) else {
            return;
        };
        let later = Instant::now() + Duration::from_secs(60);
        let r = a_route6(later);
        relay.apply([
            RouteChange::Set6(r),
            RouteChange::SetIndications6(an_indication_route6(later)),
        ]);
        let other = SocketAddrV6::new(*r.peer.ip(), 7001, 0, 0);
        for data in [&b"abc"[..], b"abcd", b"abcdefg", b""] {
            let (verdict, out) = run(&relay, &frame6(other, r.relay, data));
            assert_eq!(verdict, XDP_TX);
            let payload = sent6(&out, r.server, r.client, true);
            assert_eq!(payload, data_indication(other, data, &payload));
            // The channel's own port still gets ChannelData.
            let (verdict, out) = run(&relay, &frame6(r.peer, r.relay, data));
            assert_eq!(verdict, XDP_TX);
            assert_eq!(
                sent6(&out, r.server, r.client, true),
                channel_data(0x4001, data)
            );
        }
        assert_eq!(relay.stats().to_client_packets, 8);
        assert_eq!(relay.stats().to_client_bytes, 2 * (3 + 4 + 7));
        // Removed, it is the sockets' again.
        relay.apply([RouteChange::RemoveIndications6(an_indication_route6(later))]);
        let packet = frame6(other, r.relay, b"x");
        assert_eq!(run(&relay, &packet), (XDP_PASS, packet.clone()));
    }

    /// Between two of our IPv6 allocations, the receiver open to the
    /// sender's relayed address without a channel: a Data indication from
    /// that address, in one pass.
    #[test]
    fn relays_over_ipv6_in_place_as_a_data_indication() {
        let Some(relay) = loaded6(None, 0) else {
            return;
        };
        let later = Instant::now() + Duration::from_secs(60);
        let a = KernelRoute6 {
            peer: addr6("[::1]:50001"),
            ..a_route6(later)
        };
        let b_permission = IndicationRoute6 {
            client: addr6("[::1]:40001"),
            server: a.server,
            relay: a.peer,
            peer: *a.relay.ip(),
            expires: later,
        };
        relay.apply([
            RouteChange::Set6(a),
            RouteChange::SetIndications6(b_permission),
        ]);
        for data in [&b"abc"[..], b"abcd", b"abcdefg"] {
            let (verdict, out) = run(
                &relay,
                &frame6(a.client, a.server, &channel_data(0x4001, data)),
            );
            assert_eq!(verdict, XDP_TX);
            let payload = sent6(&out, b_permission.server, b_permission.client, true);
            assert_eq!(payload, data_indication(a.relay, data, &payload));
        }
        let stats = relay.stats();
        assert_eq!((stats.to_peer_packets, stats.to_client_packets), (3, 3));
    }

    /// A client's Send indications over IPv6, in both layouts, with
    /// FINGERPRINT or not, any padding: to a permitted peer as the bare
    /// data, from the relayed address; to another of our allocations along
    /// its routes, as ChannelData or a Data indication; a wrong FINGERPRINT
    /// or checksum, or a peer not permitted, to the sockets.
    #[test]
    fn relays_ipv6_send_indications() {
        let Some(relay) = loaded6(None, 0) else {
            return;
        };
        let later = Instant::now() + Duration::from_secs(60);
        // A peer elsewhere than our relay IP (::1), which the program has
        // seen on loopback: its data to the relayed address came in there.
        let r = KernelRoute6 {
            peer: addr6("[2001:db8::3]:7000"),
            ..a_route6(later)
        };
        let permission = IndicationRoute6 {
            client: r.client,
            server: r.server,
            relay: r.relay,
            peer: *r.peer.ip(),
            expires: later,
        };
        relay.apply([RouteChange::SetIndications6(permission)]);
        assert_eq!(run(&relay, &frame6(r.peer, r.relay, b"hi")).0, XDP_TX);
        let to = SocketAddrV6::new(*r.peer.ip(), 7001, 0, 0);
        let mut relayed = 0;
        for data in [&b""[..], b"a", b"ab", b"abc", b"abcd", &[9u8; 1200]] {
            for (fingerprint, padding, data_first) in [
                (false, 0, false),
                (true, 0xee, false),
                (true, 0, true),
                (false, 7, true),
            ] {
                let send = send_indication_in_order(to, data, fingerprint, padding, data_first);
                let (verdict, out) = run(&relay, &frame6(r.client, r.server, &send));
                assert_eq!(
                    verdict,
                    XDP_TX,
                    "{} bytes, {fingerprint} {data_first}",
                    data.len()
                );
                assert_eq!(sent6(&out, r.relay, to, true), data);
                relayed += 1;
            }
        }
        assert_eq!(relay.stats().to_peer_packets, relayed);
        // The program keeps what it decided for a packet in a per-CPU map;
        // a Data indication after a Send indication with attributes after
        // its data (coturn's layout, FINGERPRINT) finds nothing of it.
        let other = SocketAddrV6::new(*r.peer.ip(), 7002, 0, 0);
        let (verdict, out) = run(&relay, &frame6(other, r.relay, b"after a Send"));
        assert_eq!(verdict, XDP_TX);
        let payload = sent6(&out, r.server, r.client, true);
        assert_eq!(payload, data_indication(other, b"after a Send", &payload));
        // A wrong FINGERPRINT, a wrong checksum, a peer not permitted.
        let mut bad_fingerprint = send_indication(to, b"data", true, 0);
        let n = bad_fingerprint.len();
        bad_fingerprint[n - 1] ^= 1;
        let mut bad_checksum = frame6(r.client, r.server, &send_indication(to, b"data", false, 0));
        bad_checksum[60] ^= 1;
        let stranger = addr6("[2001:db8::99]:7000");
        for packet in [
            frame6(r.client, r.server, &bad_fingerprint),
            bad_checksum,
            frame6(
                r.client,
                r.server,
                &send_indication(stranger, b"data", false, 0),
            ),
        ] {
            assert_eq!(run(&relay, &packet), (XDP_PASS, packet.clone()));
        }

        // To another of ours: b, relayed at [::1]:50001.
        let b_relay = addr6("[::1]:50001");
        let b = KernelRoute6 {
            client: addr6("[::1]:40001"),
            channel: 0x4005,
            relay: b_relay,
            peer: r.relay,
            ..r
        };
        let b_permission = IndicationRoute6 {
            client: b.client,
            server: b.server,
            relay: b.relay,
            peer: *r.relay.ip(),
            expires: later,
        };
        relay.apply([RouteChange::SetIndications6(IndicationRoute6 {
            peer: *b_relay.ip(),
            ..permission
        })]);
        let to_b = |data: &[u8], data_first| {
            let send = send_indication_in_order(b_relay, data, true, 0x55, data_first);
            run(&relay, &frame6(r.client, r.server, &send))
        };
        // Without a route of b's for r's relayed address: the sockets'.
        assert_eq!(to_b(b"x", false).0, XDP_PASS);
        relay.apply([RouteChange::SetIndications6(b_permission)]);
        for data_first in [false, true] {
            for data in [&b"abc"[..], b"abcd", b"abcdefg"] {
                let (verdict, out) = to_b(data, data_first);
                assert_eq!(verdict, XDP_TX);
                let payload = sent6(&out, b.server, b.client, true);
                assert_eq!(payload, data_indication(r.relay, data, &payload));
            }
        }
        relay.apply([RouteChange::Set6(b)]);
        for data_first in [false, true] {
            let (verdict, out) = to_b(b"hello", data_first);
            assert_eq!(verdict, XDP_TX);
            assert_eq!(
                sent6(&out, b.server, b.client, true),
                channel_data(0x4005, b"hello")
            );
        }
    }

    /// On loopback, senders leave only the pseudo-header's sum in the UDP
    /// checksum (CHECKSUM_PARTIAL): toward the client (the headers move
    /// down) the kernel relays it, as nobody checks it there; toward the
    /// peer (they move up) IPv6 would check it in full, so the sockets
    /// take it.
    #[test]
    fn over_ipv6_partial_checksums_go_to_a_peer_through_the_sockets() {
        let Some(relay) = loaded6(None, 0) else {
            return;
        };
        let r = a_route6(Instant::now() + Duration::from_secs(60));
        relay.apply([RouteChange::Set6(r)]);
        let partial = |mut f: Vec<u8>| {
            let mut pseudo = f[22..54].to_vec();
            pseudo.extend_from_slice(&[0, 0, f[58], f[59], 0, 0, 0, 17]);
            f[60..62].copy_from_slice(&(!checksum(&[&pseudo])).to_be_bytes());
            f
        };
        let to_peer = partial(frame6(r.client, r.server, &channel_data(0x4001, b"hi")));
        assert_eq!(run(&relay, &to_peer), (XDP_PASS, to_peer.clone()));
        // A Send indication to it too.
        relay.apply([RouteChange::SetIndications6(an_indication_route6(
            r.expires,
        ))]);
        let send = partial(frame6(
            r.client,
            r.server,
            &send_indication(r.peer, b"hi", true, 0),
        ));
        assert_eq!(run(&relay, &send), (XDP_PASS, send.clone()));
        let (verdict, out) = run(&relay, &partial(frame6(r.peer, r.relay, b"back")));
        assert_eq!(verdict, XDP_TX);
        assert_eq!(
            sent6(&out, r.server, r.client, false),
            channel_data(0x4001, b"back")
        );
    }

    /// A frame for the property below, over IPv6: ChannelData from the
    /// client (any channel, any declared length), data from the channel's
    /// peer or another port of its, or random bytes after an IPv6
    /// Ethernet type; then some bytes overwritten.
    fn arb_frame6() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::prelude::*;
        let r = a_route6(Instant::now());
        let valid = (
            0..3,
            proptest::collection::vec(any::<u8>(), 0..64),
            prop_oneof![Just(0x4001u16), any::<u16>()],
            prop_oneof![Just(None), any::<u16>().prop_map(Some)],
            any::<u16>(),
        )
            .prop_map(move |(from, data, channel, len, port)| match from {
                0 => {
                    let mut cd = channel_data(channel, &data);
                    if let Some(len) = len {
                        cd[2..4].copy_from_slice(&len.to_be_bytes());
                    }
                    frame6(r.client, r.server, &cd)
                }
                1 => frame6(r.peer, r.relay, &data),
                _ => frame6(SocketAddrV6::new(*r.peer.ip(), port, 0, 0), r.relay, &data),
            });
        let any_bytes = proptest::collection::vec(any::<u8>(), 0..120).prop_map(|b| {
            let mut f = vec![0u8; 12];
            f.extend_from_slice(&[0x86, 0xdd]);
            f.extend_from_slice(&b);
            f
        });
        with_bytes_overwritten(prop_oneof![3 => valid, 1 => any_bytes])
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(
            std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2000)
        ))]

        /// As `any_frame_is_relayed_along_its_route_or_left_alone`, over
        /// IPv6: left untouched, or relayed exactly along the route, to
        /// the peer or (`peer_is_ours`: with a channel back, or only a
        /// permission) to the client of our allocation there, with a
        /// checksum that holds where it held; data from another port of
        /// the peer as a Data indication.
        #[test]
        fn any_ipv6_frame_is_relayed_along_its_route_or_left_alone(
            packet in arb_frame6(),
            peer_is_ours in 0..3u8,
        ) {
            type Loaded = Option<Result<KernelRelay, String>>;
            static RELAY: std::sync::OnceLock<Loaded> = std::sync::OnceLock::new();
            let loaded = RELAY.get_or_init(|| try_loaded_by(KernelRelayConfig {
                relay_ip6: Some(Ipv6Addr::LOCALHOST),
                ..KernelRelayConfig::default()
            }));
            let Some(loaded) = loaded else { return Ok(()) };
            let relay = loaded.as_ref().expect("the program loads");
            let r = a_route6(Instant::now() + Duration::from_secs(60));
            // The peer's side, were it one of ours.
            let b = KernelRoute6 {
                client: addr6("[::1]:40001"),
                channel: 0x4005,
                relay: r.peer,
                peer: r.relay,
                ..r
            };
            let b_permission = IndicationRoute6 {
                client: b.client,
                server: b.server,
                relay: b.relay,
                peer: *r.relay.ip(),
                expires: r.expires,
            };
            relay.apply([
                RouteChange::Set6(r),
                RouteChange::SetIndications6(an_indication_route6(r.expires)),
                RouteChange::Remove6(b),
                RouteChange::RemoveIndications6(b_permission),
            ]);
            match peer_is_ours {
                1 => relay.apply([RouteChange::Set6(b)]),
                2 => relay.apply([RouteChange::SetIndications6(b_permission)]),
                _ => {}
            }
            let (verdict, out) = run(relay, &packet);
            if verdict == XDP_PASS {
                proptest::prop_assert_eq!(&out, &packet);
                return Ok(());
            }
            proptest::prop_assert_eq!(verdict, XDP_TX);
            let ip = |at: usize| Ipv6Addr::from(<[u8; 16]>::try_from(&packet[at..at + 16]).unwrap());
            let udp_in = &packet[54..];
            let from = SocketAddrV6::new(ip(22), u16::from_be_bytes([udp_in[0], udp_in[1]]), 0, 0);
            let to = SocketAddrV6::new(ip(38), u16::from_be_bytes([udp_in[2], udp_in[3]]), 0, 0);
            let checked = udp6_checksum_of(&from, &to, udp_in) == 0;
            let class = packet[14] << 4 | packet[15] >> 4;
            let sent6 = |out: &[u8], from, to, checked| sent6_of_class(out, from, to, checked, class);
            let payload_in = &udp_in[8..];
            if (from, to) == (r.client, r.server) {
                proptest::prop_assert_eq!(&payload_in[..2], &0x4001u16.to_be_bytes());
                let declared = u16::from_be_bytes([payload_in[2], payload_in[3]]);
                proptest::prop_assert_eq!(usize::from(declared), payload_in.len() - 4);
                let data = &payload_in[4..];
                match peer_is_ours {
                    1 => {
                        let out_payload = sent6(&out, b.server, b.client, checked);
                        proptest::prop_assert_eq!(out_payload, channel_data(0x4005, data));
                    }
                    2 => {
                        let out_payload = sent6(&out, b.server, b.client, checked);
                        let expected = data_indication(r.relay, data, &out_payload);
                        proptest::prop_assert_eq!(out_payload, expected);
                    }
                    _ => proptest::prop_assert_eq!(sent6(&out, r.relay, r.peer, checked), data),
                }
            } else if from == r.peer {
                proptest::prop_assert_eq!(to, r.relay);
                let out_payload = sent6(&out, r.server, r.client, checked);
                proptest::prop_assert_eq!(out_payload, channel_data(0x4001, payload_in));
            } else {
                proptest::prop_assert_eq!((from.ip(), to), (r.peer.ip(), r.relay));
                let out_payload = sent6(&out, r.server, r.client, checked);
                let expected = data_indication(from, payload_in, &out_payload);
                proptest::prop_assert_eq!(out_payload, expected);
            }
        }
    }
}
