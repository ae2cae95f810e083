//! Routes for the kernel relay: the ChannelData flows the kernel may relay
//! on the server's behalf (see `net::kernel`), derived from an allocation's
//! channels and permissions.
//!
//! The state machine recomputes an allocation's routes whenever its access
//! changes (a channel bound or renewed, a permission, a refresh, removal)
//! and queues the difference as [`RouteChange`]s; the driver takes them
//! with [`super::Server::route_changes`] and writes them where the kernel
//! reads them. Each route carries the moment the first of allocation,
//! permission and channel expires, and the kernel stops following it then,
//! so a route never outlives what the server itself would relay, even when
//! nobody removes it in time. The server stays the one authority: a flow
//! without a route only takes the slower path through the sockets.

use std::net::{SocketAddr, SocketAddrV4};
use std::time::Instant;

use super::{FiveTuple, PeerAccess, Transport};

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

impl KernelRoute {
    /// The same flow, whatever the expiry.
    fn same_flow(&self, other: &KernelRoute) -> bool {
        KernelRoute {
            expires: other.expires,
            ..*self
        } == *other
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteChange {
    /// Install, or renew with a new expiry.
    Set(KernelRoute),
    /// Stop following it: the channel, permission or allocation is gone.
    Remove(KernelRoute),
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
/// A peer may be another of our allocations. The kernel then finds no
/// route out of the interface for it (it is local) and leaves the packet
/// to the sockets, where it is relayed in place; on loopback the packet
/// comes back in and meets the receiver's route, or its relay socket. Either
/// way the result is the one the sockets give.
pub(super) fn wanted(
    five: &FiveTuple,
    relay: SocketAddr,
    access: &PeerAccess,
    now: Instant,
) -> Vec<KernelRoute> {
    let (Transport::Udp, Some(client), Some(server), Some(relay)) =
        (five.transport, v4(five.client), v4(five.server), v4(relay))
    else {
        return Vec::new();
    };
    if access.closed || access.expires <= now {
        return Vec::new();
    }
    access
        .channels
        .iter()
        .filter_map(|c| {
            let peer = v4(c.peer)?;
            let permission = access
                .permissions
                .iter()
                .find(|(ip, _)| *ip == c.peer.ip())
                .map(|(_, expires)| *expires)?;
            let expires = access.expires.min(permission).min(c.expires);
            (expires > now).then_some(KernelRoute {
                client,
                server,
                channel: c.number,
                relay,
                peer,
                expires,
            })
        })
        .collect()
}

/// Queues onto `out` what turns `have` into `want`, and keeps `want`.
pub(super) fn update(
    have: &mut Vec<KernelRoute>,
    want: Vec<KernelRoute>,
    out: &mut Vec<RouteChange>,
) {
    for old in have.iter() {
        if !want.iter().any(|w| w.same_flow(old)) {
            out.push(RouteChange::Remove(*old));
        }
    }
    for new in &want {
        if !have.contains(new) {
            out.push(RouteChange::Set(*new));
        }
    }
    *have = want;
}
