//! Routes for the kernel relay: the flows the kernel may relay on the
//! server's behalf (see `net::kernel`), derived from an allocation's
//! channels and permissions.
//!
//! The state machine recomputes an allocation's routes whenever its access
//! changes (a channel bound or renewed, a permission, a refresh, removal)
//! and queues the difference as [`RouteChange`]s; the driver takes them
//! with [`super::Server::route_changes`] and writes them where the kernel
//! reads them. Each route carries the moment its flow stops being relayed
//! (the first of allocation, permission and channel to expire), and the
//! kernel stops following it then, so a route never outlives what the
//! server itself would relay, even when nobody removes it in time. The
//! server stays the one authority: a flow without a route only takes the
//! slower path through the sockets.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::time::Instant;

use super::{FiveTuple, PeerAccess, Transport};

/// The most channel routes, and the most permission routes, one
/// allocation gets; further channels and permissions are relayed by the
/// sockets. WebRTC clients bind a few channels per allocation, so this is
/// room to spare for them, while the kernel's maps, sized for this many
/// per allocation the server allows (`net::kernel`), can never be filled
/// by a client binding all the channels the server lets it bind.
pub const KERNEL_ROUTES_PER_ALLOCATION: usize = 8;

/// One channel of one UDP client, both ways: ChannelData from `client` to
/// `server` on `channel` leaves `relay` for `peer`, and datagrams from
/// `peer` to `relay` reach `client` from `server` on it. Over IPv4, or
/// over IPv6 ([`KernelRoute6`]); all four addresses of one family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelRoute<A = SocketAddrV4> {
    pub client: A,
    pub server: A,
    pub channel: u16,
    pub relay: A,
    pub peer: A,
    pub expires: Instant,
}

/// A channel route over IPv6.
pub type KernelRoute6 = KernelRoute<SocketAddrV6>;

/// One permission of one UDP client, toward the client only:
/// datagrams from any port of `peer` to `relay` that no channel route
/// takes reach `client` from `server` as Data indications, as the server
/// sends them to a peer without a channel.
///
/// Why: a WebRTC client often receives from peers it never bound a
/// channel to (each browser allocates once per network interface, and its
/// peer may answer on another allocation than the one it sends from).
/// Without these, that media went through the sockets (seen in the
/// browser test: up to three quarters of it).
///
/// Over IPv4, or over IPv6 ([`IndicationRoute6`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndicationRoute<A = SocketAddrV4, I = Ipv4Addr> {
    pub client: A,
    pub server: A,
    pub relay: A,
    pub peer: I,
    pub expires: Instant,
}

/// A permission's route over IPv6.
pub type IndicationRoute6 = IndicationRoute<SocketAddrV6, Ipv6Addr>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteChange {
    /// Install, or renew with a new expiry.
    Set(KernelRoute),
    /// Stop following it: the channel, permission or allocation is gone.
    Remove(KernelRoute),
    /// Install, or renew with a new expiry.
    SetIndications(IndicationRoute),
    /// Stop following it: the permission or allocation is gone.
    RemoveIndications(IndicationRoute),
    /// [`RouteChange::Set`] over IPv6.
    Set6(KernelRoute6),
    /// [`RouteChange::Remove`] over IPv6.
    Remove6(KernelRoute6),
    /// [`RouteChange::SetIndications`] over IPv6.
    SetIndications6(IndicationRoute6),
    /// [`RouteChange::RemoveIndications`] over IPv6.
    RemoveIndications6(IndicationRoute6),
}

/// What the kernel relay was last told about one allocation.
#[derive(Debug, Default)]
pub(super) struct Routes {
    channels: Vec<KernelRoute>,
    indications: Vec<IndicationRoute>,
    channels6: Vec<KernelRoute6>,
    indications6: Vec<IndicationRoute6>,
}

impl Routes {
    /// The changes that take every one of them out.
    pub(super) fn removals(&self) -> impl Iterator<Item = RouteChange> + '_ {
        let channels = self.channels.iter().map(|r| RouteChange::Remove(*r));
        let indications = self
            .indications
            .iter()
            .map(|r| RouteChange::RemoveIndications(*r));
        let channels6 = self.channels6.iter().map(|r| RouteChange::Remove6(*r));
        let indications6 = self
            .indications6
            .iter()
            .map(|r| RouteChange::RemoveIndications6(*r));
        indications
            .chain(channels)
            .chain(indications6)
            .chain(channels6)
    }
}

fn v4(addr: SocketAddr) -> Option<SocketAddrV4> {
    match addr {
        SocketAddr::V4(a) if !a.ip().is_unspecified() => Some(a),
        _ => None,
    }
}

/// An IPv6 address as it is on the wire: not unspecified, and not an IPv4
/// one in IPv6's clothes (those travel as IPv4).
fn v6(addr: SocketAddr) -> Option<SocketAddrV6> {
    match addr {
        SocketAddr::V6(a) if !a.ip().is_unspecified() && a.ip().to_ipv4_mapped().is_none() => {
            Some(a)
        }
        _ => None,
    }
}

/// The routes an allocation's access allows at `now`: only for UDP clients,
/// with the listening and relay addresses known and of the client's
/// family.
///
/// A peer may be another of our allocations. The kernel then hands the
/// data to that allocation's client along the receiver's own routes for
/// data from this relayed address, which say what the server would do with
/// it; without such a route it leaves the packet to the sockets (on a
/// network card: our own address is not out of the interface), where it is
/// relayed in place. Either way the result is the one the sockets give.
pub(super) fn wanted(
    five: &FiveTuple,
    relay: SocketAddr,
    access: &PeerAccess,
    now: Instant,
) -> Routes {
    if !matches!(five.transport, Transport::Udp) || access.closed || access.expires <= now {
        return Routes::default();
    }
    if let (Some(client), Some(server), Some(relay)) = (v6(five.client), v6(five.server), v6(relay))
    {
        let ends = [client, server, relay];
        let (channels6, unrouted) = channel_routes(ends, access, now, v6);
        let indications6 = indication_routes(ends, access, now, &unrouted, |ip| match ip {
            IpAddr::V6(ip) if ip.to_ipv4_mapped().is_none() => Some(ip),
            _ => None,
        });
        return Routes {
            channels6,
            indications6,
            ..Routes::default()
        };
    }
    let (Some(client), Some(server), Some(relay)) = (v4(five.client), v4(five.server), v4(relay))
    else {
        return Routes::default();
    };
    let ends = [client, server, relay];
    let (channels, unrouted) = channel_routes(ends, access, now, v4);
    let indications = indication_routes(ends, access, now, &unrouted, |ip| match ip {
        IpAddr::V4(ip) => Some(ip),
        IpAddr::V6(_) => None,
    });
    Routes {
        channels,
        indications,
        ..Routes::default()
    }
}

/// The live permissions' routes of `[client, server, relay]`, at most
/// [`KERNEL_ROUTES_PER_ALLOCATION`], for peers that `family` takes. The
/// peers of channels left without a route (`unrouted`) get no permission
/// route either: the kernel would send them Data indications where the
/// server sends ChannelData.
fn indication_routes<A: Copy, I: Copy>(
    [client, server, relay]: [A; 3],
    access: &PeerAccess,
    now: Instant,
    unrouted: &[IpAddr],
    family: fn(IpAddr) -> Option<I>,
) -> Vec<IndicationRoute<A, I>> {
    access
        .permissions
        .iter()
        .filter_map(|(ip, _)| {
            let peer = family(*ip)?;
            let expires = permitted_until(access, *ip)?;
            (expires > now && !unrouted.contains(ip)).then_some(IndicationRoute {
                client,
                server,
                relay,
                peer,
                expires,
            })
        })
        .take(KERNEL_ROUTES_PER_ALLOCATION)
        .collect()
}

/// Until when `access` lets `ip` in: its permission's expiry, or the
/// allocation's if that comes first.
fn permitted_until(access: &PeerAccess, ip: IpAddr) -> Option<Instant> {
    access
        .permissions
        .iter()
        .find(|(p, _)| *p == ip)
        .map(|(_, expires)| access.expires.min(*expires))
}

/// The live channels' routes of `[client, server, relay]`, at most
/// [`KERNEL_ROUTES_PER_ALLOCATION`], for peers that `family` takes; and
/// the IPs of the live channels' peers left without one.
fn channel_routes<A: Copy + Into<SocketAddr>>(
    [client, server, relay]: [A; 3],
    access: &PeerAccess,
    now: Instant,
    family: fn(SocketAddr) -> Option<A>,
) -> (Vec<KernelRoute<A>>, Vec<IpAddr>) {
    let mut live = access.channels.iter().filter_map(|c| {
        let peer = family(c.peer)?;
        let expires = permitted_until(access, c.peer.ip())?.min(c.expires);
        (expires > now).then_some(KernelRoute {
            client,
            server,
            channel: c.number,
            relay,
            peer,
            expires,
        })
    });
    let routes = live.by_ref().take(KERNEL_ROUTES_PER_ALLOCATION).collect();
    let unrouted = live.map(|r| r.peer.into().ip()).collect();
    (routes, unrouted)
}

/// Queues onto `out` what turns `have` into `want`, and keeps `want`:
/// removals first, then channels before indications, so that a peer's
/// data meets its channel route as soon as both are in.
pub(super) fn update(have: &mut Routes, want: Routes, out: &mut Vec<RouteChange>) {
    out.extend(gone(&have.indications, &want.indications).map(RouteChange::RemoveIndications));
    out.extend(gone(&have.channels, &want.channels).map(RouteChange::Remove));
    out.extend(new(&have.channels, &want.channels).map(RouteChange::Set));
    out.extend(new(&have.indications, &want.indications).map(RouteChange::SetIndications));
    out.extend(gone(&have.indications6, &want.indications6).map(RouteChange::RemoveIndications6));
    out.extend(gone(&have.channels6, &want.channels6).map(RouteChange::Remove6));
    out.extend(new(&have.channels6, &want.channels6).map(RouteChange::Set6));
    out.extend(new(&have.indications6, &want.indications6).map(RouteChange::SetIndications6));
    *have = want;
}

/// A route's flow: what it relays, whatever its expiry.
pub(super) trait Flow: Copy + PartialEq {
    fn same_flow(&self, other: &Self) -> bool;
}

impl<A: Copy + PartialEq> Flow for KernelRoute<A> {
    fn same_flow(&self, other: &Self) -> bool {
        KernelRoute {
            expires: other.expires,
            ..*self
        } == *other
    }
}

impl<A: Copy + PartialEq, I: Copy + PartialEq> Flow for IndicationRoute<A, I> {
    fn same_flow(&self, other: &Self) -> bool {
        IndicationRoute {
            expires: other.expires,
            ..*self
        } == *other
    }
}

/// The routes of `have` whose flow `want` no longer has.
fn gone<'a, R: Flow>(have: &'a [R], want: &'a [R]) -> impl Iterator<Item = R> + 'a {
    have.iter()
        .filter(|old| !want.iter().any(|w| w.same_flow(old)))
        .copied()
}

/// The routes of `want` that are new, or renewed.
fn new<'a, R: Flow>(have: &'a [R], want: &'a [R]) -> impl Iterator<Item = R> + 'a {
    want.iter().filter(|w| !have.contains(w)).copied()
}
