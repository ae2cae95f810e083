//! The TCP and TLS driver (RFC 8656 §3.1: TURN over a stream). One tokio
//! task per connection with its own [`Server`] state machine: the
//! connection is the client's 5-tuple, so it holds at most one allocation,
//! whose relay socket the same task reads. Messages are framed by their
//! own length fields; ChannelData is padded to 4 bytes.
//!
//! Data relayed in place to a connection's client by another allocation
//! (see `Server::relay_across`) arrives through the connection's inbox;
//! data this connection's client sends to an allocation of a UDP client
//! leaves from the UDP listening socket.

use std::io;
use std::net::{SocketAddr, UdpSocket as StdUdpSocket};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use socket2::SockRef;
use tokio::io::Interest;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::Notify;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::admission::Admission;
use super::icmp;
use super::udp::{RelayConfig, RelaySockets};
use crate::server::{
    FiveTuple, HEADROOM, Inbox, Output, RelayId, Server, Shared, StreamInbox, TAILROOM, Transport,
};
use crate::stun;

/// The largest frame a client may send: a STUN message or ChannelData with
/// a 16-bit length, plus header and padding.
const MAX_FRAME: usize = 65_535 + 20 + 3;
/// A connection that has not allocated within this time is closed.
const IDLE_WITHOUT_ALLOCATION: Duration = Duration::from_secs(30);
/// A connection whose client takes nothing of what it is sent for this
/// long is closed, and its allocation with it.
const WRITE_STALL: Duration = Duration::from_secs(30);

/// What every stream connection needs besides its stream. The listeners
/// here hold one; so may a listener elsewhere that finds TURN on some of
/// its connections (the web server's, sharing its HTTPS port with TURN
/// over TLS).
#[derive(Clone)]
pub struct StreamConnections {
    relay: RelayConfig,
    shared: Arc<Shared>,
    /// The UDP listening socket: connections relay in place to
    /// allocations of UDP clients from it.
    udp: Arc<StdUdpSocket>,
    stop: CancellationToken,
    /// The connections being served, so that stopping can wait for each
    /// to end its allocation.
    tasks: TaskTracker,
    seed: Arc<AtomicU32>,
    write_stall: Duration,
    /// Tests make a connection panic on this frame.
    #[cfg(test)]
    panic_on: Option<Vec<u8>>,
}

impl StreamConnections {
    pub(crate) fn new(
        relay: RelayConfig,
        shared: Arc<Shared>,
        udp: Arc<StdUdpSocket>,
        stop: CancellationToken,
    ) -> Self {
        StreamConnections {
            relay,
            shared,
            udp,
            stop,
            tasks: TaskTracker::new(),
            seed: Arc::new(AtomicU32::new(0)),
            write_stall: WRITE_STALL,
            #[cfg(test)]
            panic_on: None,
        }
    }

    /// Serves one connection until it ends or the service stops.
    async fn serve<S: AsyncRead + AsyncWrite + Unpin>(&self, stream: S, five: FiveTuple) {
        let _tracked = self.tasks.token();
        let setup = Setup {
            five,
            relay: self.relay.clone(),
            shared: self.shared.clone(),
            udp: self.udp.clone(),
            stop: self.stop.clone(),
            seed: self.seed.fetch_add(7919, Ordering::Relaxed),
            write_stall: self.write_stall,
            #[cfg(test)]
            panic_on: self.panic_on.clone(),
        };
        let transport = five.transport.as_str();
        metrics::gauge!("callisto_turn_stream_connections", "transport" => transport)
            .increment(1.0);
        connection(stream, setup).await;
        metrics::gauge!("callisto_turn_stream_connections", "transport" => transport)
            .decrement(1.0);
    }

    /// Waits, up to `grace`, for the connections to end once the service
    /// is stopping; false if some did not.
    pub(crate) async fn ended_within(&self, grace: Duration) -> bool {
        self.tasks.close();
        tokio::time::timeout(grace, self.tasks.wait()).await.is_ok()
    }

    /// Serves a TLS connection that another listener accepted, admitted,
    /// and did the handshake of, from `client` to that listener's `local`
    /// address, until it ends or the service stops.
    pub async fn serve_tls<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        stream: S,
        client: SocketAddr,
        local: SocketAddr,
    ) {
        let five = FiveTuple {
            client,
            server: local,
            transport: Transport::Tls,
        };
        self.serve(stream, five).await;
    }
}

/// Accepts connections on `listener` until the service stops, as many as
/// `admission` lets in, and serves them with `connections`; with `tls`,
/// each connection does a TLS handshake first.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    admission: Arc<Admission>,
    connections: StreamConnections,
) {
    let local = match listener.local_addr() {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = %e, "TURN stream listener has no address");
            return;
        }
    };
    let transport = if tls.is_some() {
        Transport::Tls
    } else {
        Transport::Tcp
    };
    loop {
        let (tcp, client) = tokio::select! {
            _ = connections.stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "TURN accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Some(admitted) = admission.admit_or_count(
            client.ip(),
            Instant::now(),
            "callisto_turn_stream_refused_total",
            "TURN TCP/TLS",
            "if they are legitimate, raise --turn-max-connections or --turn-max-connections-per-ip",
        ) else {
            // A reset: the refused connection leaves nothing behind, not
            // even TIME_WAIT.
            let _ = SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let five = FiveTuple {
            client,
            server: local,
            transport,
        };
        let tls = tls.clone();
        let connections = connections.clone();
        tokio::spawn(async move {
            let _admitted = admitted;
            match tls {
                Some(acceptor) => {
                    match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await
                    {
                        Ok(Ok(stream)) => connections.serve(stream, five).await,
                        Ok(Err(e)) => {
                            tracing::debug!(%client, error = %e, "TURN TLS handshake failed")
                        }
                        Err(_) => tracing::debug!(%client, "TURN TLS handshake timed out"),
                    }
                }
                None => connections.serve(tcp, five).await,
            }
        });
    }
}

/// Datagrams a connection takes from its relay socket in one go, so that
/// a burst from the peer leaves in one write to the client rather than one
/// write each.
const RELAY_BURST: usize = 64;
/// ICMP errors handled per wake-up (see the UDP workers' `ICMP_TURN`).
const ICMP_BURST: usize = 64;
/// Bytes gathered for the client before they are written.
const WRITE_BATCH: usize = 64 * 1024;

thread_local! {
    /// Where relay datagrams are received, framed for the client and copied
    /// out, all between two awaits: one buffer per worker thread. One per
    /// connection cost each 66 KiB, zero-filled, and all of it resident
    /// once the allocator handed out memory freed by earlier connections
    /// (90 KiB per connection with a relay after a few came and went).
    static RELAY_BUF: std::cell::RefCell<Vec<u8>> =
        std::cell::RefCell::new(vec![0u8; HEADROOM + 65_536 + TAILROOM]);
}

/// Bytes an inbox holds before it drops what else comes. The task empties
/// it on every wake-up, into the kernel's TCP send buffer, which is the
/// real queue; the inbox fills only while that buffer is full, that is
/// while the client does not keep up. (A relay socket's receive buffer,
/// which the data would otherwise wait in, is about 200 KiB, but in the
/// kernel's memory, which has a global bound.)
const INBOX_LIMIT: usize = 64 * 1024;
/// What a connection keeps allocated for data on its way to the client
/// (its inbox, and what it is about to write) once a burst is over: a few
/// large messages' worth. A burst may take up to [`INBOX_LIMIT`] more.
const KEPT: usize = 4 * 1024;

/// A connection's inbox: ChannelData and Data indications relayed in place
/// by other workers and connections, padded for the stream, until the connection's task writes
/// it. Only that task writes to the stream, so everyone else queues here.
#[derive(Default)]
struct ConnectionInbox {
    queue: Mutex<Queued>,
    /// Raised when a message lands in an empty queue.
    notify: Notify,
}

#[derive(Default)]
struct Queued {
    bytes: Vec<u8>,
    /// Where each message ends in `bytes`.
    ends: Vec<usize>,
    /// The connection is gone: nothing more is taken.
    closed: bool,
}

impl ConnectionInbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queued> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Moves everything queued to the end of `out`, and where each message
    /// ends to `ends`.
    fn take_into(&self, out: &mut Vec<u8>, ends: &mut Vec<usize>) {
        let mut q = self.lock();
        let base = out.len();
        out.extend_from_slice(&q.bytes);
        ends.extend(q.ends.iter().map(|e| base + e));
        q.bytes.clear();
        q.ends.clear();
        // A burst does not keep its memory for the connection's lifetime.
        q.bytes.shrink_to(KEPT);
    }

    fn close(&self) {
        let mut q = self.lock();
        q.closed = true;
        q.bytes = Vec::new();
        q.ends = Vec::new();
    }
}

impl StreamInbox for ConnectionInbox {
    fn push(&self, message: &[u8]) -> bool {
        let padded = message.len().next_multiple_of(4);
        let mut q = self.lock();
        if q.closed || q.bytes.len() + padded > INBOX_LIMIT {
            return false;
        }
        let was_empty = q.ends.is_empty();
        q.bytes.extend_from_slice(message);
        let end = q.bytes.len() + padded - message.len();
        q.bytes.resize(end, 0);
        q.ends.push(end);
        drop(q);
        // The task takes the whole queue per wake-up: only the first
        // message after it emptied needs to wake it.
        if was_empty {
            self.notify.notify_one();
        }
        true
    }
}

/// What a connection needs besides its stream.
struct Setup {
    five: FiveTuple,
    relay: RelayConfig,
    shared: Arc<Shared>,
    udp: Arc<StdUdpSocket>,
    stop: CancellationToken,
    seed: u32,
    write_stall: Duration,
    #[cfg(test)]
    panic_on: Option<Vec<u8>>,
}

/// Serves one connection. A panic (a bug) ends it and its allocation,
/// whose places are given back, and no other connection.
async fn connection<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, setup: Setup) {
    let Setup {
        five,
        relay: relay_cfg,
        shared,
        udp,
        stop,
        seed,
        write_stall,
        #[cfg(test)]
        panic_on,
    } = setup;
    let relays = RelaySockets::new(relay_cfg, seed, |s| s, Box::new(|_, _| Ok(())));
    let mut server = Server::new(shared, relays);
    let inbox = Arc::new(ConnectionInbox::default());
    server.set_stream_inbox(Inbox(inbox.clone()));
    if let Ok(addr) = udp.local_addr() {
        server.set_udp_source(addr);
    }
    let mut inbuf: Vec<u8> = Vec::with_capacity(16 * 1024);
    // What goes to the client next: answers and relayed data, in order,
    // and where each message ends.
    let mut out: Vec<u8> = Vec::with_capacity(KEPT);
    let mut ends: Vec<usize> = Vec::new();
    // Over TLS, each message gets a record of its own, as coturn sends
    // them: coturn's own client (turnutils_uclient) takes each TLS read for
    // one message, and loses the others of a record holding several.
    let record_per_message = five.transport == Transport::Tls;
    // The allocation's relay sockets: one, or two for a dual allocation.
    let mut relays: Vec<(RelayId, UdpSocket)> = Vec::new();
    // Which of them is read first, in turns, so one cannot starve the other.
    let mut first_relay = 0;
    let started = Instant::now();
    // Made once, not per wake-up: each `cancelled()` registers with a
    // Notify and each `sleep_until` with the timer wheel, which cost more
    // than relaying a packet.
    let stopped = stop.cancelled();
    tokio::pin!(stopped);
    let timer = tokio::time::sleep_until(started.into());
    tokio::pin!(timer);
    let delivered = inbox.notify.notified();
    tokio::pin!(delivered);
    let mut stopping = false;
    let outcome: std::thread::Result<io::Result<()>> = AssertUnwindSafe(async {
        loop {
            let wake = server
                .poll_timeout()
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
            // A fired timer stays ready until reset.
            if timer.is_elapsed() || timer.deadline() != wake.into() {
                timer.as_mut().reset(wake.into());
            }
            tokio::select! {
                _ = &mut stopped => {
                    stopping = true;
                    return Ok(());
                }
                read = stream.read_buf(&mut inbuf) => {
                    if read? == 0 {
                        return Ok(());
                    }
                    let mut used = 0;
                    while let Some(len) = stun::stream_frame_len(&inbuf[used..])
                        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "not STUN or ChannelData"))?
                    {
                        if len > MAX_FRAME {
                            return Err(io::Error::new(io::ErrorKind::InvalidData, "frame too large"));
                        }
                        if inbuf.len() - used < len {
                            break;
                        }
                        let frame = &mut inbuf[used..used + len];
                        #[cfg(test)]
                        if panic_on.as_deref() == Some(&*frame) {
                            panic!("the test's frame");
                        }
                        // ChannelData is parsed with its padding; STUN exactly.
                        match server.on_client(Instant::now(), five, frame) {
                            Output::Reply { data, .. } => {
                                out.extend_from_slice(&data);
                                ends.push(out.len());
                            }
                            Output::ToPeer { relay, peer, range } => {
                                if let Some((_, sock)) = relays.iter().find(|(id, _)| *id == relay) {
                                    send_datagram(SockRef::from(sock), &frame[range], peer);
                                }
                            }
                            // Relayed in place to another allocation's client.
                            Output::ToClient { to, range } => {
                                send_datagram(SockRef::from(&*udp), &frame[range], to.client);
                            }
                            Output::ToStream { inbox, range } => inbox.hand_over(&frame[range]),
                            Output::None => {}
                        }
                        used += len;
                        sync_relays(&mut server, five, &mut relays)?;
                    }
                    inbuf.drain(..used);
                    if inbuf.len() > MAX_FRAME {
                        return Err(io::Error::new(io::ErrorKind::InvalidData, "frame too large"));
                    }
                }
                which = ready_relay(&relays, first_relay) => {
                    first_relay = which + 1;
                    if let Some((id, sock)) = relays.get(which) {
                        RELAY_BUF.with_borrow_mut(|buf| {
                            let end = buf.len() - TAILROOM;
                            for _ in 0..RELAY_BURST {
                                let (len, from) = match sock.try_recv_from(&mut buf[HEADROOM..end]) {
                                    Ok(got) => got,
                                    // An error concerns one call or one
                                    // datagram (EINTR, an ICMP error), not
                                    // the socket.
                                    Err(e) => {
                                        if e.kind() != io::ErrorKind::WouldBlock {
                                            tracing::trace!(error = %e, "relay receive error");
                                        }
                                        break;
                                    }
                                };
                                if let Output::ToClient { range, .. } =
                                    server.on_peer(Instant::now(), *id, from, buf, len)
                                {
                                    out.extend_from_slice(&buf[range]);
                                    ends.push(out.len());
                                }
                                if out.len() >= WRITE_BATCH {
                                    break;
                                }
                            }
                        });
                    }
                }
                which = relay_error(&relays) => {
                    if let Some((id, sock)) = relays.get(which) {
                        let mut buf = [0u8; 64];
                        for _ in 0..ICMP_BURST {
                            // A WouldBlock clears the error readiness.
                            let error = match sock.try_io(Interest::ERROR, || icmp::next_error(sock)) {
                                Ok(Some(error)) => error,
                                Ok(None) => continue,
                                Err(_) => break,
                            };
                            if let Output::ToClient { range, .. } =
                                server.on_icmp(Instant::now(), *id, error, &mut buf)
                            {
                                out.extend_from_slice(&buf[range]);
                                ends.push(out.len());
                            }
                        }
                    }
                }
                _ = &mut delivered => {
                    delivered.set(inbox.notify.notified());
                    inbox.take_into(&mut out, &mut ends);
                }
                _ = &mut timer => {
                    server.on_timeout(Instant::now());
                    sync_relays(&mut server, five, &mut relays)?;
                    if relays.is_empty() && started.elapsed() > IDLE_WITHOUT_ALLOCATION {
                        return Ok(());
                    }
                }
            }
            if !out.is_empty() {
                let written = async {
                    if record_per_message {
                        let mut start = 0;
                        for &end in &ends {
                            stream.write_all(&out[start..end]).await?;
                            start = end;
                        }
                    } else {
                        stream.write_all(&out).await?;
                    }
                    // TLS may keep part of a record back until flushed.
                    stream.flush().await
                };
                // While this task waits to write, it runs no timer: a
                // client that stops reading would hold its allocation,
                // which could then never expire, and its connection.
                match tokio::time::timeout(write_stall, written).await {
                    Ok(done) => done?,
                    Err(_) => {
                        metrics::counter!("callisto_turn_stream_stalled_total").increment(1);
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "the client took nothing it was sent for too long",
                        ));
                    }
                }
                out.clear();
                out.shrink_to(KEPT);
                ends.clear();
            }
        }
    })
    .catch_unwind()
    .await;
    let Ok(result) = outcome else {
        // The panic itself was logged by the panic hook.
        server.reset_after_panic(Instant::now());
        metrics::counter!("callisto_turn_worker_resets_total").increment(1);
        tracing::error!(
            client = %five.client,
            transport = five.transport.as_str(),
            "TURN connection closed: a bug cut it short, and its allocation ended (report the panic above)"
        );
        inbox.close();
        return;
    };
    if let Err(e) = result {
        tracing::debug!(client = %five.client, error = %e, "TURN stream connection ended");
    }
    if stopping {
        server.end_all(Instant::now());
    } else {
        server.on_client_closed(Instant::now(), five);
    }
    inbox.close();
}

/// Sends one datagram straight to the kernel, counting a failure as a send
/// drop. Not through tokio's `try_send_to`: that refuses (drops the
/// datagram) until its driver has seen a new socket writable, which can be
/// after the first data arrives.
fn send_datagram(sock: SockRef<'_>, data: &[u8], to: SocketAddr) {
    if let Err(e) = sock.send_to(data, &to.into()) {
        tracing::trace!(%to, error = %e, "datagram send failed");
        metrics::counter!("callisto_turn_send_drops_total").increment(1);
    }
}

/// Picks up the relay sockets the state machine bound for this
/// connection's allocation (two for a dual one), and drops ours that it no
/// longer has.
fn sync_relays(
    server: &mut Server<RelaySockets<std::net::UdpSocket>>,
    five: FiveTuple,
    relays: &mut Vec<(RelayId, UdpSocket)>,
) -> io::Result<()> {
    let current = server.relays_of(&five);
    relays.retain(|(id, _)| current.contains(&Some(*id)));
    for id in current.into_iter().flatten() {
        if !relays.iter().any(|(held, _)| *held == id)
            && let Some(std) = server.relays().take(id)
        {
            relays.push((id, UdpSocket::from_std(std)?));
        }
    }
    Ok(())
}

/// The next datagram on any of `relays`, trying them from `first` on;
/// with which one it came from.
/// Which of the relay sockets has a datagram waiting, taking them in turns
/// from `first`; pending while there are none.
async fn ready_relay(relays: &[(RelayId, UdpSocket)], first: usize) -> usize {
    if relays.is_empty() {
        return std::future::pending().await;
    }
    std::future::poll_fn(|cx| {
        for k in 0..relays.len() {
            let i = (first + k) % relays.len();
            // A spurious readiness ends in WouldBlock, which clears it.
            if relays[i].1.poll_recv_ready(cx).is_ready() {
                return Poll::Ready(i);
            }
        }
        Poll::Pending
    })
    .await
}

/// Which of `relays` has ICMP errors queued; pending while none has.
/// (tokio offers no poll for error readiness, only this future, which
/// registers a waiter per call: a few tens of nanoseconds a wake-up.)
async fn relay_error(relays: &[(RelayId, UdpSocket)]) -> usize {
    match relays {
        [] => std::future::pending().await,
        [(_, only)] => {
            let _ = only.ready(Interest::ERROR).await;
            0
        }
        [(_, a), (_, b), ..] => tokio::select! {
            _ = a.ready(Interest::ERROR) => 0,
            _ = b.ready(Interest::ERROR) => 1,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{Client, Event};

    const LOOPBACK: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    /// Runs our client over `near` until it reports what `done` wants.
    async fn exchange(
        near: &mut tokio::io::DuplexStream,
        client: &mut Client,
        done: impl Fn(&Event) -> bool,
    ) -> Event {
        let mut got = Vec::new();
        for _ in 0..50 {
            while let Some(t) = client.poll_transmit() {
                near.write_all(&t).await.unwrap();
            }
            while let Ok(Some(len)) = stun::stream_frame_len(&got) {
                if got.len() < len {
                    break;
                }
                let frame: Vec<u8> = got.drain(..len).collect();
                client.handle_input(Instant::now(), &frame);
            }
            while let Some(e) = client.poll_event() {
                assert!(!matches!(e, Event::Failed { .. }), "{e:?}");
                if done(&e) {
                    return e;
                }
            }
            let mut buf = [0u8; 2048];
            let read = tokio::time::timeout(Duration::from_millis(100), near.read(&mut buf));
            if let Ok(Ok(n)) = read.await {
                got.extend_from_slice(&buf[..n]);
            }
        }
        panic!("no answer from the connection");
    }

    /// [`crate::net::loopback_test_server`]'s connections, as `tune` leaves
    /// them, and its shared state.
    fn test_connections(
        tune: impl FnOnce(&mut StreamConnections),
    ) -> (StreamConnections, Arc<Shared>) {
        let (shared, relay) = crate::net::loopback_test_server();
        let udp = Arc::new(StdUdpSocket::bind((LOOPBACK, 0)).unwrap());
        let mut connections =
            StreamConnections::new(relay, shared.clone(), udp, CancellationToken::new());
        tune(&mut connections);
        (connections, shared)
    }

    /// A TCP connection served by `connections` over a pipe of 4 KiB, and
    /// our client, allocated through it: the pipe's near end, the client
    /// and the connection's task.
    async fn allocated_over_tcp(
        connections: StreamConnections,
    ) -> (tokio::io::DuplexStream, Client, tokio::task::JoinHandle<()>) {
        let (mut near, far) = tokio::io::duplex(4096);
        let five = FiveTuple {
            client: (LOOPBACK, 5).into(),
            server: (LOOPBACK, 3478).into(),
            transport: Transport::Tcp,
        };
        let served = tokio::spawn(async move { connections.serve(far, five).await });
        let mut client = Client::new("u", "p", true, 7);
        client.allocate(Instant::now());
        exchange(&mut near, &mut client, |e| {
            matches!(e, Event::Allocated { .. })
        })
        .await;
        (near, client, served)
    }

    /// A client that stops reading while a peer sends to it is let go once
    /// it has taken nothing for the write-stall limit, and its allocation
    /// with it: while the task waits to write it runs no timer, so the
    /// allocation would otherwise never expire.
    #[tokio::test]
    async fn a_client_that_stops_reading_loses_its_connection_and_allocation() {
        let (connections, shared) =
            test_connections(|c| c.write_stall = Duration::from_millis(500));
        // The pipe is small: what the client does not read soon fills it.
        let (mut near, mut client, served) = allocated_over_tcp(connections).await;
        let peer = StdUdpSocket::bind((LOOPBACK, 0)).unwrap();
        let peer_addr = peer.local_addr().unwrap();
        let relayed = client.relayed_address().unwrap();
        client.bind_channel(Instant::now(), peer_addr);
        exchange(&mut near, &mut client, |e| {
            matches!(e, Event::ChannelBound { .. })
        })
        .await;
        assert_eq!(shared.allocation_count(), 1);

        // The client reads no more; the peer sends far more than fits.
        for _ in 0..200 {
            peer.send_to(&[7; 1000], relayed).unwrap();
        }
        tokio::time::timeout(Duration::from_secs(10), served)
            .await
            .expect("the connection was let go")
            .unwrap();
        assert_eq!(shared.allocation_count(), 0, "and its allocation");
        drop(near);
    }

    /// A panic in a connection ends it and its allocation, whose place is
    /// given back; the connection's task ends normally.
    #[tokio::test]
    async fn a_connection_that_panics_ends_and_gives_its_allocation_back() {
        // ChannelData on channel 0x4000 with 4 bytes.
        let trigger = [0x40, 0x00, 0x00, 0x04, 1, 2, 3, 4];
        let (connections, shared) = test_connections(|c| c.panic_on = Some(trigger.to_vec()));
        let (mut near, client, served) = allocated_over_tcp(connections).await;
        let relayed = client.relayed_address().unwrap();
        assert_eq!(shared.allocation_count(), 1);

        near.write_all(&trigger).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), served)
            .await
            .expect("the connection ended")
            .expect("without the panic reaching its task");
        assert_eq!(shared.allocation_count(), 0, "its allocation ended");
        assert!(
            StdUdpSocket::bind(relayed).is_ok(),
            "the relay socket is closed"
        );
        let mut rest = Vec::new();
        near.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "and the stream closed");
    }

    /// Data over a channel to a port nobody listens on: the ICMP port
    /// unreachable that comes back reaches the TCP client.
    #[tokio::test]
    async fn an_icmp_error_reaches_a_tcp_client() {
        let (connections, _) = test_connections(|_| {});
        let (mut near, mut client, _served) = allocated_over_tcp(connections).await;
        let closed = StdUdpSocket::bind((LOOPBACK, 0))
            .unwrap()
            .local_addr()
            .unwrap();
        client.bind_channel(Instant::now(), closed);
        exchange(&mut near, &mut client, |e| {
            matches!(e, Event::ChannelBound { .. })
        })
        .await;
        near.write_all(&client.send_to(closed, b"anyone there?"))
            .await
            .unwrap();
        let heard = exchange(&mut near, &mut client, |e| matches!(e, Event::Icmp { .. })).await;
        assert_eq!(
            heard,
            Event::Icmp {
                peer: closed,
                icmp: stun::Icmp {
                    icmp_type: 3,
                    code: 3,
                    error_data: 0
                }
            }
        );
    }

    #[test]
    fn an_inbox_pads_each_message_and_refuses_when_full_or_closed() {
        let inbox = ConnectionInbox::default();
        assert!(inbox.push(&[1, 2, 3, 4, 5]));
        assert!(inbox.push(&[6; 4]));
        let (mut out, mut ends) = (vec![9], vec![1]);
        inbox.take_into(&mut out, &mut ends);
        assert_eq!(out, [9, 1, 2, 3, 4, 5, 0, 0, 0, 6, 6, 6, 6]);
        assert_eq!(ends, [1, 9, 13]);

        // Full: what does not fit is refused, what fits still goes in.
        let big = vec![7u8; INBOX_LIMIT / 4];
        for _ in 0..4 {
            assert!(inbox.push(&big));
        }
        assert!(!inbox.push(&[1]));
        let (mut out, mut ends) = (Vec::new(), Vec::new());
        inbox.take_into(&mut out, &mut ends);
        assert_eq!(out.len(), INBOX_LIMIT);
        assert_eq!(ends.len(), 4);
        assert!(inbox.lock().bytes.capacity() <= KEPT);
        assert!(inbox.push(&[1]), "room again once taken");

        // Closed: nothing more, and what was queued is gone.
        inbox.close();
        assert!(!inbox.push(&[1]));
        assert!(inbox.lock().ends.is_empty());
    }

    #[test]
    fn a_message_into_an_empty_inbox_wakes_the_connection() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            let inbox = Arc::new(ConnectionInbox::default());
            // Pushed before anyone waits: the wake-up is kept.
            assert!(inbox.push(b"early"));
            tokio::time::timeout(Duration::from_secs(5), inbox.notify.notified())
                .await
                .expect("woken by the first message");
            let (mut out, mut ends) = (Vec::new(), Vec::new());
            inbox.take_into(&mut out, &mut ends);
            // Pushed from another thread while the task waits.
            let pusher = inbox.clone();
            let waiting = inbox.notify.notified();
            let t = std::thread::spawn(move || pusher.push(b"late"));
            tokio::time::timeout(Duration::from_secs(5), waiting)
                .await
                .expect("woken by a message from another thread");
            assert!(t.join().unwrap());
            inbox.take_into(&mut out, &mut ends);
            assert_eq!(out, b"early\0\0\0late");
        })
    }
}
