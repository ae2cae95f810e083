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

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Instant;

use super::{FiveTuple, PeerAccess, Transport};

/// The most channel routes, and the most permission routes, one
/// allocation gets; further channels and permissions are relayed by the
/// sockets. WebRTC clients bind a few channels per allocation, so this is
/// room to spare for them, while the kernel's maps, sized for this many
/// per allocation the server allows (`net::kernel`), can never be filled
/// by a client binding all the channels the server lets it bind.
pub const KERNEL_ROUTES_PER_ALLOCATION: usize = 8;

/// One channel of one UDP client over IPv4, both ways: ChannelData from
/// `client` to `server` on `channel` leaves `relay` for `peer`, and
/// datagrams from `peer` to `relay` reach `client` from `server` on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelRoute {
    pub client: SocketAddrV4,
    pub server: SocketAddrV4,
    pub channel: u16,
    pub relay: SocketAddrV4,
    pub peer: SocketAddrV4,
    pub expires: Instant,
}

/// One permission of one UDP client over IPv4, toward the client only:
/// datagrams from any port of `peer` to `relay` that no channel route
/// takes reach `client` from `server` as Data indications, as the server
/// sends them to a peer without a channel.
///
/// Why: a WebRTC client often receives from peers it never bound a
/// channel to (each browser allocates once per network interface, and its
/// peer may answer on another allocation than the one it sends from).
/// Without these, that media went through the sockets (seen in the
/// browser test: up to three quarters of it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndicationRoute {
    pub client: SocketAddrV4,
    pub server: SocketAddrV4,
    pub relay: SocketAddrV4,
    pub peer: Ipv4Addr,
    pub expires: Instant,
}

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
}

/// What the kernel relay was last told about one allocation.
#[derive(Debug, Default)]
pub(super) struct Routes {
    channels: Vec<KernelRoute>,
    indications: Vec<IndicationRoute>,
}

impl Routes {
    /// The changes that take every one of them out.
    pub(super) fn removals(&self) -> impl Iterator<Item = RouteChange> + '_ {
        let channels = self.channels.iter().map(|r| RouteChange::Remove(*r));
        let indications = self
            .indications
            .iter()
            .map(|r| RouteChange::RemoveIndications(*r));
        indications.chain(channels)
    }
}

fn v4(addr: SocketAddr) -> Option<SocketAddrV4> {
    match addr {
        SocketAddr::V4(a) if !a.ip().is_unspecified() => Some(a),
        _ => None,
    }
}

/// The routes an allocation's access allows at `now`: only for UDP clients
/// on IPv4, with the listening and relay addresses known.
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
    let (Transport::Udp, Some(client), Some(server), Some(relay)) =
        (five.transport, v4(five.client), v4(five.server), v4(relay))
    else {
        return Routes::default();
    };
    if access.closed || access.expires <= now {
        return Routes::default();
    }
    let permitted_until = |ip: Ipv4Addr| {
        access
            .permissions
            .iter()
            .find(|(p, _)| *p == ip)
            .map(|(_, expires)| access.expires.min(*expires))
    };
    let mut live_channels = access.channels.iter().filter_map(|c| {
        let peer = v4(c.peer)?;
        let expires = permitted_until(*peer.ip())?.min(c.expires);
        (expires > now).then_some(KernelRoute {
            client,
            server,
            channel: c.number,
            relay,
            peer,
            expires,
        })
    });
    let channels: Vec<KernelRoute> = live_channels
        .by_ref()
        .take(KERNEL_ROUTES_PER_ALLOCATION)
        .collect();
    // The peers of channels left without a route get no permission route
    // either: the kernel would send them Data indications where the server
    // sends ChannelData.
    let unrouted: Vec<Ipv4Addr> = live_channels.map(|r| *r.peer.ip()).collect();
    let indications = access
        .permissions
        .iter()
        .filter_map(|(ip, _)| {
            let std::net::IpAddr::V4(peer) = *ip else {
                return None;
            };
            let expires = permitted_until(peer)?;
            (expires > now && !unrouted.contains(&peer)).then_some(IndicationRoute {
                client,
                server,
                relay,
                peer,
                expires,
            })
        })
        .take(KERNEL_ROUTES_PER_ALLOCATION)
        .collect();
    Routes {
        channels,
        indications,
    }
}

/// Queues onto `out` what turns `have` into `want`, and keeps `want`:
/// removals first, then channels before indications, so that a peer's
/// data meets its channel route as soon as both are in.
pub(super) fn update(have: &mut Routes, want: Routes, out: &mut Vec<RouteChange>) {
    out.extend(gone(&have.indications, &want.indications).map(RouteChange::RemoveIndications));
    out.extend(gone(&have.channels, &want.channels).map(RouteChange::Remove));
    out.extend(new(&have.channels, &want.channels).map(RouteChange::Set));
    out.extend(new(&have.indications, &want.indications).map(RouteChange::SetIndications));
    *have = want;
}

/// A route's flow: what it relays, whatever its expiry.
pub(super) trait Flow: Copy + PartialEq {
    fn same_flow(&self, other: &Self) -> bool;
}

impl Flow for KernelRoute {
    fn same_flow(&self, other: &Self) -> bool {
        KernelRoute {
            expires: other.expires,
            ..*self
        } == *other
    }
}

impl Flow for IndicationRoute {
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
