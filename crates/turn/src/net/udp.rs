//! The UDP driver: one worker thread per core, each with its own listening
//! socket on the TURN port (SO_REUSEPORT, so the kernel spreads clients by
//! 5-tuple and a client always lands on the same worker), its own relay
//! sockets, and its own [`Server`] state machine. A client's allocation,
//! its relay socket and all its traffic stay on one thread: no locks on the
//! data path. Workers share only quotas and the nonce key ([`Shared`]).
//!
//! Each wake-up reads the ready sockets with `recvmmsg`, hands every datagram
//! to the state machine, and sends the whole batch of answers with one
//! `sendmmsg`, straight out of the receive buffers. Reads start small and
//! grow while the socket has more ([`ReadRamp`]). Sockets take turns, a few
//! hundred datagrams each, so a flooded one cannot hold up the others.
//!
//! A round that panics (a bug) costs the worker's own clients their
//! allocations, not everyone their service: the worker resets its state
//! and goes on ([`Worker::round_or_reset`]).

use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket as StdUdpSocket};
use std::ops::{Range, RangeInclusive};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Registry, Token, Waker};
use socket2::{Domain, Protocol, Socket, Type};

use super::batch::{self, ReadRamp, RecvBatch, SendBatch};
use super::icmp;
use super::kernel::KernelRelay;
use crate::server::{
    FiveTuple, HEADROOM, HeldPort, Output, RelayAllocator, RelayId, Server, Shared, TAILROOM,
    Transport,
};

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);
const RELAY_BASE: usize = 2;

/// Where relay sockets are bound.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    pub ipv4: Option<IpAddr>,
    pub ipv6: Option<IpAddr>,
    pub ports: RangeInclusive<u16>,
}

/// Registers a newly bound relay socket with the driver's event loop.
pub type Register<S> = Box<dyn FnMut(&mut S, RelayId) -> io::Result<()> + Send>;

/// Binds relay sockets from the port range, scanning from a per-worker
/// starting point so workers rarely try the same ports.
pub struct RelaySockets<S> {
    cfg: RelayConfig,
    cursor: u32,
    sockets: Vec<Option<S>>,
    register: Register<S>,
    wrap: fn(StdUdpSocket) -> S,
}

impl<S> RelaySockets<S> {
    pub fn new(
        cfg: RelayConfig,
        start: u32,
        wrap: fn(StdUdpSocket) -> S,
        register: Register<S>,
    ) -> Self {
        RelaySockets {
            cfg,
            cursor: start,
            sockets: Vec::new(),
            register,
            wrap,
        }
    }

    pub fn get(&self, id: RelayId) -> Option<&S> {
        self.sockets.get(id.0 as usize).and_then(Option::as_ref)
    }

    pub fn take(&mut self, id: RelayId) -> Option<S> {
        self.sockets.get_mut(id.0 as usize).and_then(Option::take)
    }

    fn bind(&mut self, ip: IpAddr, even: bool) -> io::Result<StdUdpSocket> {
        let (lo, hi) = (
            u32::from(*self.cfg.ports.start()),
            u32::from(*self.cfg.ports.end()),
        );
        let span = hi - lo + 1;
        for _ in 0..span.min(256) {
            let port = lo + self.cursor % span;
            self.cursor = self.cursor.wrapping_add(1);
            if even && port % 2 == 1 {
                continue;
            }
            if let Some(socket) = open_relay(SocketAddr::new(ip, port as u16))? {
                return Ok(socket);
            }
        }
        Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            "no free port in the relay port range",
        ))
    }

    fn install(&mut self, id: RelayId, std: StdUdpSocket) -> io::Result<SocketAddr> {
        let addr = std.local_addr()?;
        let mut socket = (self.wrap)(std);
        (self.register)(&mut socket, id)?;
        let i = id.0 as usize;
        if self.sockets.len() <= i {
            self.sockets.resize_with(i + 1, || None);
        }
        self.sockets[i] = Some(socket);
        Ok(addr)
    }
}

/// A non-blocking relay socket bound to `addr`; `None` if that port is taken.
fn open_relay(addr: SocketAddr) -> io::Result<Option<StdUdpSocket>> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    let _ = socket.set_recv_buffer_size(1 << 20);
    let _ = socket.set_send_buffer_size(1 << 20);
    if socket.bind(&addr.into()).is_err() {
        return Ok(None);
    }
    // Relaying still works without: clients then hear of no ICMP errors,
    // and the datagrams from peers reach them with the default TOS.
    if let Err(e) = icmp::enable(&socket, addr.is_ipv6()) {
        tracing::debug!(error = %e, "relay socket: ICMP errors will not be reported");
    }
    if let Err(e) = batch::receive_tos(&socket, addr.is_ipv6()) {
        tracing::debug!(error = %e, "relay socket: DSCP and ECN will not be passed on");
    }
    socket.set_nonblocking(true)?;
    Ok(Some(socket.into()))
}

impl<S: std::os::fd::AsRawFd> RelayAllocator for RelaySockets<S> {
    fn allocate(&mut self, id: RelayId, ipv6: bool, even: bool) -> io::Result<SocketAddr> {
        let ip = if ipv6 { self.cfg.ipv6 } else { self.cfg.ipv4 }.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::Unsupported,
                "no relay address of that family",
            )
        })?;
        let std = self.bind(ip, even)?;
        self.install(id, std)
    }

    fn release(&mut self, id: RelayId) {
        if let Some(slot) = self.sockets.get_mut(id.0 as usize) {
            *slot = None;
        }
    }

    fn hold_next(&mut self, addr: SocketAddr) -> io::Result<HeldPort> {
        let taken = || io::Error::new(io::ErrorKind::AddrInUse, "the next port is taken");
        let next = addr
            .port()
            .checked_add(1)
            .filter(|p| self.cfg.ports.contains(p))
            .ok_or_else(taken)?;
        let socket = open_relay(SocketAddr::new(addr.ip(), next))?.ok_or_else(taken)?;
        Ok(Box::new(socket))
    }

    fn allocate_held(&mut self, id: RelayId, held: HeldPort) -> io::Result<SocketAddr> {
        let std = held
            .downcast::<StdUdpSocket>()
            .map_err(|_| io::Error::other("a held port of another kind"))?;
        self.install(id, *std)
    }

    fn dont_fragment(&mut self, id: RelayId, ipv6: bool) -> io::Result<()> {
        let socket = self
            .get(id)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such relay"))?;
        icmp::dont_fragment(socket, ipv6)
    }
}

/// Running UDP workers.
pub struct UdpWorkers {
    pub local_addr: SocketAddr,
    /// The listening socket shared with TCP/TLS connections, which send
    /// from it what they relay in place to UDP clients.
    pub sender: Arc<StdUdpSocket>,
    stop: Arc<AtomicBool>,
    wakers: Vec<Arc<Waker>>,
    threads: Vec<JoinHandle<()>>,
    /// Per worker: whether it stopped serving while it should not have.
    pub down: Arc<[AtomicBool]>,
}

impl UdpWorkers {
    /// Binds `threads` sockets to `listen` and starts a worker on each.
    /// With `kernel`, workers hand it their allocations' routes.
    pub fn start(
        listen: SocketAddr,
        threads: usize,
        relay: RelayConfig,
        shared: Arc<Shared>,
        kernel: Option<Arc<KernelRelay>>,
    ) -> io::Result<UdpWorkers> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut addr = listen;
        let mut sockets = Vec::new();
        for _ in 0..threads.max(1) {
            let s = reuseport_socket(addr)?;
            addr = s.local_addr()?; // port 0 → the port the first one got
            sockets.push(s);
        }
        let sender = Arc::new(sockets[0].try_clone()?);
        let down: Arc<[AtomicBool]> = sockets.iter().map(|_| AtomicBool::new(false)).collect();
        let mut wakers = Vec::new();
        let mut handles = Vec::new();
        for (i, std_socket) in sockets.into_iter().enumerate() {
            let (mut worker, waker) =
                Worker::new(std_socket, addr, &relay, shared.clone(), i, threads)?;
            worker.kernel = kernel.clone();
            wakers.push(waker);
            handles.push(spawn(worker, stop.clone(), down.clone())?);
        }
        Ok(UdpWorkers {
            local_addr: addr,
            sender,
            stop,
            wakers,
            threads: handles,
            down,
        })
    }

    /// Stops the workers and waits for them.
    pub fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        for w in &self.wakers {
            let _ = w.wake();
        }
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// Runs `worker` on a thread of its own until `stop`; if it ends before,
/// however it ends, its flag in `down` is raised.
fn spawn(
    mut worker: Worker,
    stop: Arc<AtomicBool>,
    down: Arc<[AtomicBool]>,
) -> io::Result<JoinHandle<()>> {
    /// Raises the flag as the thread ends, unwinding included: a store
    /// cannot panic, so this never turns a panic into an abort.
    struct Ended {
        stop: Arc<AtomicBool>,
        down: Arc<[AtomicBool]>,
        index: usize,
    }
    impl Drop for Ended {
        fn drop(&mut self) {
            if !self.stop.load(Ordering::SeqCst) {
                self.down[self.index].store(true, Ordering::SeqCst);
            }
        }
    }
    let index = worker.index;
    std::thread::Builder::new()
        .name(format!("turn-udp-{index}"))
        .spawn(move || {
            let _ended = Ended {
                stop: stop.clone(),
                down,
                index,
            };
            worker.run(&stop);
        })
}

fn reuseport_socket(addr: SocketAddr) -> io::Result<StdUdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_address(true)?;
    #[cfg(unix)]
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    let _ = socket.set_recv_buffer_size(4 << 20);
    let _ = socket.set_send_buffer_size(4 << 20);
    socket.bind(&addr.into())?;
    socket.set_nonblocking(true)?;
    if let Err(e) = batch::receive_tos(&socket, addr.is_ipv6()) {
        tracing::debug!(error = %e, "TURN listener: DSCP and ECN will not be passed on");
    }
    Ok(socket.into())
}

struct Worker {
    poll: Poll,
    listener: UdpSocket,
    local: SocketAddr,
    server: Server<RelaySockets<UdpSocket>>,
    rx: Box<RecvBatch>,
    tx: SendBatch,
    /// Per batch: datagrams for peers (relay, peer, TOS, bytes in `rx`), kept in
    /// the receive buffers and sent in runs that share a relay socket.
    to_peer: Vec<(RelayId, SocketAddr, u8, Range<usize>)>,
    /// Per batch: datagrams for clients (client, TOS, bytes in `rx`).
    to_client: Vec<(SocketAddr, u8, Range<usize>)>,
    /// Datagrams per socket per round ([`TURN_DATAGRAMS`]).
    turn: usize,
    kernel: Option<Arc<KernelRelay>>,
    /// Which worker this is, for logs.
    index: usize,
    resets: Resets,
    /// Tests make the worker panic on this datagram.
    #[cfg(test)]
    panic_on: Option<Vec<u8>>,
}

/// Resets a worker may make in [`RESET_WINDOW`] before it gives up: a bug
/// that strikes on every round would otherwise keep it busy resetting,
/// and logging, while serving nobody.
const MAX_RESETS: u32 = 10;
const RESET_WINDOW: Duration = Duration::from_secs(60);

/// A worker's recent resets.
struct Resets {
    since: Option<Instant>,
    count: u32,
}

impl Resets {
    /// Counts one at `now`; false past [`MAX_RESETS`] in the window.
    fn allow(&mut self, now: Instant) -> bool {
        match self.since {
            Some(since) if now.saturating_duration_since(since) < RESET_WINDOW => {
                self.count += 1;
            }
            _ => {
                self.since = Some(now);
                self.count = 1;
            }
        }
        self.count <= MAX_RESETS
    }
}

/// Datagrams one socket may hand in before the others get their turn. Under
/// load a socket that always has a batch waiting (the listener, flooded by
/// clients) would otherwise keep the worker from its relay sockets, and the
/// peers' packets would wait behind it. (Measured with two workers and 500
/// pairs in closed loop: p99 halved, from about 95 to 46 ms, for 5–10 %
/// fewer round trips; 4 batches a turn cost 15 % of them.)
const TURN_DATAGRAMS: usize = 16 * batch::BATCH;

/// ICMP errors one relay socket may hand in per round: they arrive no
/// faster than the datagrams that caused them, but a peer's network could
/// forge them.
const ICMP_TURN: usize = 64;

/// Events taken per poll.
const EVENTS: usize = 256;
/// Room for one poll's events plus as many sockets left over from the round
/// before; more only when that many sockets each have 128 datagrams queued.
const MAX_READY: usize = 2 * EVENTS;

/// What a worker keeps from one round to the next.
struct Rounds {
    events: Events,
    /// Sockets to read this round.
    ready: Vec<Token>,
    /// Sockets that used their whole turn and may hold more. Under
    /// edge-triggered polling no new event comes for what is already
    /// queued, so they are carried over to the next round.
    again: Vec<Token>,
    /// Relay sockets with ICMP errors queued, and those whose turn at
    /// them ended before the queue did.
    errors: Vec<Token>,
    errors_again: Vec<Token>,
}

impl Rounds {
    fn new() -> Self {
        Rounds {
            events: Events::with_capacity(EVENTS),
            ready: Vec::with_capacity(MAX_READY),
            again: Vec::with_capacity(MAX_READY),
            errors: Vec::new(),
            errors_again: Vec::new(),
        }
    }
}

impl Worker {
    /// A worker on `socket` (bound to `local`), the `index`th of `threads`.
    fn new(
        socket: StdUdpSocket,
        local: SocketAddr,
        relay: &RelayConfig,
        shared: Arc<Shared>,
        index: usize,
        threads: usize,
    ) -> io::Result<(Worker, Arc<Waker>)> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let mut listener = UdpSocket::from_std(socket);
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let registry: Registry = poll.registry().try_clone()?;
        let span = u32::from(*relay.ports.end() - *relay.ports.start()) + 1;
        let relays = RelaySockets::new(
            relay.clone(),
            span / threads.max(1) as u32 * index as u32,
            UdpSocket::from_std,
            Box::new(move |s: &mut UdpSocket, id: RelayId| {
                registry.register(s, Token(RELAY_BASE + id.0 as usize), Interest::READABLE)
            }),
        );
        let worker = Worker {
            poll,
            listener,
            local,
            server: Server::new(shared, relays),
            rx: Box::default(),
            tx: SendBatch::default(),
            to_peer: Vec::with_capacity(batch::BATCH),
            to_client: Vec::with_capacity(batch::BATCH),
            turn: TURN_DATAGRAMS,
            kernel: None,
            index,
            resets: Resets {
                since: None,
                count: 0,
            },
            #[cfg(test)]
            panic_on: None,
        };
        Ok((worker, waker))
    }

    fn run(&mut self, stop: &AtomicBool) {
        let mut rounds = Rounds::new();
        while !stop.load(Ordering::Relaxed) {
            if let Err(why) = self.round_or_reset(&mut rounds) {
                tracing::error!(
                    worker = self.index,
                    "TURN UDP worker stopped: {why}; /healthz now fails: restart callisto"
                );
                // The others go on; this one's socket closes, and the
                // kernel hands its clients to them.
                break;
            }
        }
        self.server.end_all(Instant::now());
    }

    /// One round. After one that panicked, whatever it was doing is in
    /// doubt: the worker ends its allocations (each logged) and goes on
    /// from empty state on the same socket. Closing the socket instead
    /// would make SO_REUSEPORT spread all clients anew, moving most of the
    /// other workers' clients away from their allocations too. Err when
    /// the worker must stop.
    fn round_or_reset(&mut self, rounds: &mut Rounds) -> Result<(), String> {
        match catch_unwind(AssertUnwindSafe(|| self.round(rounds))) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("poll failed: {e}")),
            Err(_) => {
                // The panic itself was logged by the panic hook.
                let now = Instant::now();
                *rounds = Rounds::new();
                *self.rx = RecvBatch::default();
                self.tx = SendBatch::default();
                self.to_peer.clear();
                self.to_client.clear();
                self.server.reset_after_panic(now);
                self.apply_routes();
                metrics::counter!("callisto_turn_worker_resets_total").increment(1);
                if !self.resets.allow(now) {
                    return Err(format!(
                        "it panicked {} times within {} s",
                        MAX_RESETS + 1,
                        RESET_WINDOW.as_secs()
                    ));
                }
                tracing::error!(
                    worker = self.index,
                    "TURN UDP worker: a bug cut a round short; it ended its allocations and serves on (report the panic above)"
                );
                Ok(())
            }
        }
    }

    /// Waits for sockets to become readable (not at all while some are left
    /// over from the last round), gives each ready socket one turn, and runs
    /// the state machine's timers.
    fn round(&mut self, r: &mut Rounds) -> io::Result<()> {
        let now = Instant::now();
        let timeout = if r.ready.is_empty() && r.errors.is_empty() {
            self.server
                .poll_timeout()
                .map_or(Duration::from_secs(1), |t| t.saturating_duration_since(now))
                .min(Duration::from_secs(1))
        } else {
            Duration::ZERO
        };
        let polled = self.poll.poll(&mut r.events, Some(timeout));
        // A worker that had to wait for this round is keeping up: then
        // reads start small, so one flow's datagrams do not move as a
        // convoy. One that found work waiting reads full batches at once.
        let first = batch::first_read(now.elapsed());
        match polled {
            Ok(()) => {
                for event in r.events.iter() {
                    r.ready.push(event.token());
                    if event.is_error() && event.token().0 >= RELAY_BASE {
                        r.errors.push(event.token());
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
        r.ready.sort_unstable();
        r.ready.dedup();
        for &token in &r.ready {
            let more = match token {
                LISTENER => self.drain_listener(self.turn, first),
                WAKER => false,
                Token(t) => self.drain_relay(RelayId((t - RELAY_BASE) as u32), self.turn, first),
            };
            if more {
                r.again.push(token);
            }
        }
        r.ready.clear();
        std::mem::swap(&mut r.ready, &mut r.again);
        r.errors.sort_unstable();
        r.errors.dedup();
        for &token in &r.errors {
            if self.drain_errors(RelayId((token.0 - RELAY_BASE) as u32)) {
                r.errors_again.push(token);
            }
        }
        r.errors.clear();
        std::mem::swap(&mut r.errors, &mut r.errors_again);
        self.server.on_timeout(Instant::now());
        self.apply_routes();
        Ok(())
    }

    /// Hands the kernel relay the routes the state machine changed.
    fn apply_routes(&mut self) {
        if let Some(kernel) = &self.kernel {
            let mut changes = self.server.route_changes().peekable();
            if changes.peek().is_some() {
                kernel.apply(changes);
            }
        }
    }

    /// Receives and handles up to `budget` datagrams from the listening
    /// socket; true when it may hold more.
    fn drain_listener(&mut self, budget: usize, first: usize) -> bool {
        let mut ramp = ReadRamp::new(budget, first);
        while let Some(want) = ramp.next() {
            // With room around each datagram: ChannelData relayed in place
            // to a client without a channel goes as a Data indication,
            // whose header is written in front of the data.
            let n = match self.rx.recv_up_to(&self.listener, HEADROOM, want) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) => {
                    // EINTR, or an ICMP error (ECONNREFUSED): they concern
                    // one call or one datagram, not the socket.
                    tracing::trace!(error = %e, "TURN UDP receive error");
                    ramp.failed();
                    continue;
                }
            };
            let now = Instant::now();
            let mut replies: Vec<(SocketAddr, Vec<u8>)> = Vec::new();
            self.to_peer.clear();
            self.to_client.clear();
            for i in 0..n {
                let (Some(from), len) = (self.rx.addrs[i], self.rx.lens[i]) else {
                    continue;
                };
                let five = FiveTuple {
                    client: from,
                    server: self.local,
                    transport: Transport::Udp,
                };
                let tos = self.rx.tos[i];
                let buf = &mut self.rx.slot(i)[..HEADROOM + len + TAILROOM];
                #[cfg(test)]
                if self.panic_on.as_deref() == Some(&buf[HEADROOM..HEADROOM + len]) {
                    panic!("the test's datagram");
                }
                let base = i * batch::SLOT;
                match self
                    .server
                    .on_client_in(now, five, buf, HEADROOM..HEADROOM + len)
                {
                    Output::ToPeer { relay, peer, range } => {
                        self.to_peer
                            .push((relay, peer, tos, base + range.start..base + range.end));
                    }
                    Output::ToClient { to, range } => {
                        self.to_client
                            .push((to.client, tos, base + range.start..base + range.end));
                    }
                    Output::Reply { to, data } => replies.push((to.client, data)),
                    Output::ToStream { inbox, range } => inbox.hand_over(&buf[range]),
                    Output::None => {}
                }
            }
            let all = self.rx.slot_all();
            // A full batch means datagrams are waiting: then efficiency
            // beats the latency of the first datagram of a run.
            let behind = n == batch::BATCH;
            for run in self.to_peer.chunk_by(|a, b| a.0 == b.0) {
                if let Some(sock) = self.server.relays().get(run[0].0) {
                    self.tx.send_coalescing(
                        sock,
                        run.iter()
                            .map(|(_, peer, tos, r)| (*peer, *tos, &all[r.clone()])),
                        behind,
                    );
                }
            }
            // Relayed in place between two allocations of this worker.
            self.tx.send_coalescing(
                &self.listener,
                self.to_client
                    .iter()
                    .map(|(to, tos, r)| (*to, *tos, &all[r.clone()])),
                behind,
            );
            // Before the answers: a client that hears its channel is bound
            // finds the kernel's route in place, and one that deleted its
            // allocation finds it gone.
            self.apply_routes();
            if !replies.is_empty() {
                self.tx.send(
                    &self.listener,
                    replies.iter().map(|(to, d)| (*to, d.as_slice())),
                );
            }
            if !ramp.got(want, n) {
                // recvmmsg took all there was: the next datagram raises a
                // new edge, so the call that would only say EAGAIN is saved.
                return false;
            }
        }
        true
    }

    /// Tells clients of the ICMP errors queued on a relay socket, up to a
    /// turn's worth; true when it may hold more.
    fn drain_errors(&mut self, relay: RelayId) -> bool {
        for _ in 0..ICMP_TURN {
            let Some(sock) = self.server.relays().get(relay) else {
                return false;
            };
            let error = match icmp::next_error(sock) {
                Ok(Some(error)) => error,
                Ok(None) => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) => {
                    tracing::debug!(error = %e, "relay socket: reading its ICMP errors failed");
                    return false;
                }
            };
            let mut buf = [0u8; 64];
            if let Output::ToClient { to, range } =
                self.server.on_icmp(Instant::now(), relay, error, &mut buf)
            {
                self.tx
                    .send(&self.listener, std::iter::once((to.client, &buf[range])));
            }
        }
        true
    }

    /// Receives and relays up to `budget` datagrams from a relay socket;
    /// true when it may hold more.
    fn drain_relay(&mut self, relay: RelayId, budget: usize, first: usize) -> bool {
        let mut ramp = ReadRamp::new(budget, first);
        while let Some(want) = ramp.next() {
            let Some(sock) = self.server.relays().get(relay) else {
                return false;
            };
            let n = match self.rx.recv_up_to(sock, HEADROOM, want) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) => {
                    tracing::trace!(error = %e, "relay receive error");
                    ramp.failed();
                    continue;
                }
            };
            let now = Instant::now();
            self.to_client.clear();
            for i in 0..n {
                let (Some(from), len) = (self.rx.addrs[i], self.rx.lens[i]) else {
                    continue;
                };
                let slot = self.rx.slot(i);
                if let Output::ToClient { to, range } =
                    self.server.on_peer(now, relay, from, slot, len)
                {
                    let base = i * batch::SLOT;
                    self.to_client.push((
                        to.client,
                        self.rx.tos[i],
                        base + range.start..base + range.end,
                    ));
                }
            }
            let all = self.rx.slot_all();
            self.tx.send_coalescing(
                &self.listener,
                self.to_client
                    .iter()
                    .map(|(to, tos, r)| (*to, *tos, &all[r.clone()])),
                n == batch::BATCH,
            );
            if !ramp.got(want, n) {
                return false;
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::client::{Client, Event};

    const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    /// Real sockets: the held port is the one above, kept bound until it
    /// is put into service (by any worker's allocator) or dropped.
    #[test]
    fn a_held_port_is_the_next_one_and_stays_bound() {
        // A free even/odd pair to use as the whole range.
        let (even, taken) = loop {
            let probe = socket();
            let p = probe.local_addr().unwrap().port();
            if p % 2 == 0 && p < u16::MAX {
                drop(probe);
                break (p, p + 1);
            }
        };
        let cfg = RelayConfig {
            ipv4: Some(LOOPBACK),
            ipv6: None,
            ports: even..=taken,
        };
        let mut a = RelaySockets::new(cfg.clone(), 0, |s| s, Box::new(|_, _| Ok(())));
        let mut b = RelaySockets::new(cfg, 0, |s| s, Box::new(|_, _| Ok(())));
        let Ok(rtp) = a.allocate(RelayId(0), false, true) else {
            return; // another process took the port meanwhile: nothing to check
        };
        assert_eq!(rtp.port(), even);
        let held = a.hold_next(rtp).unwrap();
        assert!(
            StdUdpSocket::bind(SocketAddr::new(LOOPBACK, taken)).is_err(),
            "held, so nobody else binds it"
        );
        let rtcp = b.allocate_held(RelayId(7), held).unwrap();
        assert_eq!(rtcp, SocketAddr::new(LOOPBACK, taken));
        assert!(b.get(RelayId(7)).is_some());
        // Above the range, or taken: refused.
        assert!(b.hold_next(rtcp).is_err(), "outside the port range");
        assert!(a.hold_next(SocketAddr::new(LOOPBACK, even - 1)).is_err());
        b.release(RelayId(7));
        drop(a.hold_next(rtp).unwrap());
        assert!(
            StdUdpSocket::bind(SocketAddr::new(LOOPBACK, taken)).is_ok(),
            "a dropped hold frees the port"
        );
    }

    fn socket() -> StdUdpSocket {
        let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).unwrap();
        let _ = s.set_recv_buffer_size(1 << 20);
        s.bind(&SocketAddr::new(LOOPBACK, 0).into()).unwrap();
        let s: StdUdpSocket = s.into();
        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        s
    }

    /// Datagrams waiting on `sock`, taken off it.
    fn take_all(sock: &StdUdpSocket) -> Vec<Vec<u8>> {
        sock.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 2048];
        let mut got = Vec::new();
        while let Ok(n) = sock.recv(&mut buf) {
            got.push(buf[..n].to_vec());
        }
        sock.set_nonblocking(false).unwrap();
        got
    }

    /// Turns the worker by hand until the client sees the event `done` wants.
    fn exchange(
        worker: &mut Worker,
        rounds: &mut Rounds,
        sock: &StdUdpSocket,
        client: &mut Client,
        done: impl Fn(&Event) -> bool,
    ) -> Event {
        let mut buf = [0u8; 2048];
        for _ in 0..50 {
            while let Some(t) = client.poll_transmit() {
                sock.send_to(&t, worker.local).unwrap();
            }
            worker.round(rounds).unwrap();
            if let Ok(n) = sock.recv(&mut buf) {
                client.handle_input(Instant::now(), &buf[..n]);
            }
            while let Some(e) = client.poll_event() {
                assert!(!matches!(e, Event::Failed { .. }), "{e:?}");
                if done(&e) {
                    return e;
                }
            }
        }
        panic!("no answer from the worker");
    }

    /// A lone worker of [`crate::net::loopback_test_server`], turned by
    /// hand, and its waker (kept alive).
    fn test_worker() -> (Worker, Rounds, Arc<Waker>) {
        let (shared, relay) = crate::net::loopback_test_server();
        let listener = reuseport_socket((LOOPBACK, 0).into()).unwrap();
        let local = listener.local_addr().unwrap();
        let (worker, waker) = Worker::new(listener, local, &relay, shared, 0, 1).unwrap();
        (worker, Rounds::new(), waker)
    }

    /// The next datagram on `sock` (asked to report TOS) with its TOS.
    fn recv_with_tos(sock: &StdUdpSocket) -> (Vec<u8>, u8) {
        let mut rx = RecvBatch::default();
        let n = rx.recv_up_to(sock, 0, 1).expect("a datagram waiting");
        assert_eq!(n, 1);
        let len = rx.lens[0];
        (rx.slot(0)[..len].to_vec(), rx.tos[0])
    }

    /// RFC 8656 §14: DSCP and ECN (the whole TOS byte) go on with the data,
    /// from client to peer, from peer to client, and from client to client
    /// relayed in place.
    #[test]
    fn dscp_and_ecn_go_with_the_data() {
        let (mut worker, mut rounds, _waker) = test_worker();
        let local = worker.local;
        let (sa, sb, peer) = (socket(), socket(), socket());
        for s in [&sa, &sb, &peer] {
            batch::receive_tos(s, false).unwrap();
        }
        let peer_addr = peer.local_addr().unwrap();
        let mut a = Client::new("u", "p", false, 7);
        let mut b = Client::new("u", "p", false, 8);
        for (sock, client) in [(&sa, &mut a), (&sb, &mut b)] {
            client.allocate(Instant::now());
            exchange(&mut worker, &mut rounds, sock, client, |e| {
                matches!(e, Event::Allocated { .. })
            });
        }
        let (ra, rb) = (a.relayed_address().unwrap(), b.relayed_address().unwrap());
        let mut bind = |sock: &StdUdpSocket, client: &mut Client, to| {
            client.bind_channel(Instant::now(), to);
            exchange(&mut worker, &mut rounds, sock, client, |e| {
                matches!(e, Event::ChannelBound { .. })
            });
        };
        bind(&sa, &mut a, peer_addr);
        bind(&sa, &mut a, rb);
        bind(&sb, &mut b, ra);
        let set_tos = |sock: &StdUdpSocket, tos: u8| {
            socket2::SockRef::from(sock)
                .set_tos_v4(u32::from(tos))
                .unwrap();
        };

        // Client to peer: EF with ECT(1), as an L4S sender marks it.
        set_tos(&sa, 0xb9);
        sa.send_to(&a.send_to(peer_addr, b"to the peer"), local)
            .unwrap();
        worker.round(&mut rounds).unwrap();
        assert_eq!(recv_with_tos(&peer), (b"to the peer".to_vec(), 0xb9));

        // Peer to client: AF11 with CE (congestion experienced).
        set_tos(&peer, 0x2b);
        peer.send_to(b"to the client", ra).unwrap();
        worker.round(&mut rounds).unwrap();
        let (got, tos) = recv_with_tos(&sa);
        assert_eq!(tos, 0x2b);
        a.handle_input(Instant::now(), &got);
        assert_eq!(
            a.poll_event(),
            Some(Event::Data {
                peer: peer_addr,
                data: b"to the client".to_vec()
            })
        );

        // Client to client, relayed in place; then the default again.
        for tos in [0xb9, 0] {
            set_tos(&sa, tos);
            sa.send_to(&a.send_to(rb, b"to b"), local).unwrap();
            worker.round(&mut rounds).unwrap();
            assert_eq!(recv_with_tos(&sb).1, tos);
        }
    }

    /// Data to a port nobody listens on: the ICMP port unreachable that
    /// comes back reaches the client as a Data indication with an ICMP
    /// attribute, naming the peer and its port (RFC 8656 §11.5).
    #[test]
    fn an_icmp_error_reaches_the_client() {
        let (mut worker, mut rounds, _waker) = test_worker();
        let local = worker.local;
        let sock = socket();
        let closed = socket().local_addr().unwrap();
        let mut client = Client::new("u", "p", false, 7);
        client.allocate(Instant::now());
        exchange(&mut worker, &mut rounds, &sock, &mut client, |e| {
            matches!(e, Event::Allocated { .. })
        });
        client.create_permission(Instant::now(), closed.ip());
        exchange(&mut worker, &mut rounds, &sock, &mut client, |e| {
            matches!(e, Event::PermissionCreated(_))
        });
        sock.send_to(&client.send_to(closed, b"anyone there?"), local)
            .unwrap();
        let heard = exchange(&mut worker, &mut rounds, &sock, &mut client, |e| {
            matches!(e, Event::Icmp { .. })
        });
        assert_eq!(
            heard,
            Event::Icmp {
                peer: closed,
                icmp: crate::stun::Icmp {
                    icmp_type: 3,
                    code: 3,
                    error_data: 0
                }
            }
        );
        assert!(rounds.errors.is_empty(), "the error queue was drained");
    }

    /// A round that panics costs the worker's clients their allocations,
    /// whose relay ports and places are given back, and nothing more: the
    /// worker serves on, on the same socket, and the client allocates again.
    #[test]
    fn a_worker_that_panics_ends_its_allocations_and_serves_on() {
        let (mut worker, mut rounds, _waker) = test_worker();
        let local = worker.local;
        let shared = worker.server.shared().clone();
        let sock = socket();
        let mut client = Client::new("u", "p", false, 7);
        client.allocate(Instant::now());
        exchange(&mut worker, &mut rounds, &sock, &mut client, |e| {
            matches!(e, Event::Allocated { .. })
        });
        let relayed = client.relayed_address().unwrap();
        assert_eq!(shared.allocation_count(), 1);

        worker.panic_on = Some(b"a bug's trigger".to_vec());
        sock.send_to(b"a bug's trigger", local).unwrap();
        worker.round_or_reset(&mut rounds).unwrap();
        assert_eq!(shared.allocation_count(), 0);
        assert!(
            StdUdpSocket::bind(relayed).is_ok(),
            "the relay socket is closed"
        );

        let mut again = Client::new("u", "p", false, 8);
        again.allocate(Instant::now());
        exchange(&mut worker, &mut rounds, &sock, &mut again, |e| {
            matches!(e, Event::Allocated { .. })
        });
        assert_eq!(shared.allocation_count(), 1);
    }

    /// Ten resets a minute; the eleventh within the minute is refused, and
    /// a minute after the first, the count starts again.
    #[test]
    fn resets_are_bounded_per_minute() {
        let t0 = Instant::now();
        let mut resets = Resets {
            since: None,
            count: 0,
        };
        for i in 0..MAX_RESETS {
            assert!(resets.allow(t0 + Duration::from_secs(u64::from(i))));
        }
        assert!(!resets.allow(t0 + Duration::from_secs(59)));
        assert!(resets.allow(t0 + RESET_WINDOW));
    }

    /// A worker that panics round after round gives up: its thread ends
    /// and raises its flag in `down`, for /healthz. One asked to stop
    /// raises none.
    #[test]
    fn a_worker_that_keeps_panicking_stops_and_says_so() {
        let (mut worker, _, _waker) = test_worker();
        let local = worker.local;
        worker.panic_on = Some(b"a bug's trigger".to_vec());
        let stop = Arc::new(AtomicBool::new(false));
        let down: Arc<[AtomicBool]> = Arc::new([AtomicBool::new(false)]);
        let thread = spawn(worker, stop.clone(), down.clone()).unwrap();
        let sock = socket();
        for _ in 0..2000 {
            if thread.is_finished() {
                break;
            }
            sock.send_to(b"a bug's trigger", local).unwrap();
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(thread.is_finished(), "it gave up");
        assert!(down[0].load(Ordering::SeqCst));

        let (worker, _, waker) = test_worker();
        let stop = Arc::new(AtomicBool::new(false));
        let down: Arc<[AtomicBool]> = Arc::new([AtomicBool::new(false)]);
        let thread = spawn(worker, stop.clone(), down.clone()).unwrap();
        stop.store(true, Ordering::SeqCst);
        waker.wake().unwrap();
        thread.join().unwrap();
        assert!(!down[0].load(Ordering::SeqCst));
    }

    #[test]
    fn a_flooded_listener_does_not_hold_up_the_relay_sockets() {
        let (mut worker, mut rounds, _waker) = test_worker();
        let local = worker.local;
        // A short turn, so the flood below fits any receive buffer. (Its
        // reads are two full batches, or 2, 4, 8, 16, 32 and 2 should the
        // poll take long enough to count as a wait: 64 datagrams either way.)
        worker.turn = 2 * batch::BATCH;

        let (sock, peer) = (socket(), socket());
        let peer_addr = peer.local_addr().unwrap();
        let mut client = Client::new("u", "p", false, 7);
        client.allocate(Instant::now());
        exchange(&mut worker, &mut rounds, &sock, &mut client, |e| {
            matches!(e, Event::Allocated { .. })
        });
        let relayed = client.relayed_address().unwrap();
        client.bind_channel(Instant::now(), peer_addr);
        exchange(&mut worker, &mut rounds, &sock, &mut client, |e| {
            matches!(e, Event::ChannelBound { .. })
        });

        // More datagrams from the client than one turn takes, all queued
        // before the worker looks, then one datagram from the peer.
        let flood = worker.turn + batch::BATCH;
        let frame = client.send_to(peer_addr, &[0x5a; 100]);
        for _ in 0..flood {
            sock.send_to(&frame, local).unwrap();
        }
        peer.send_to(b"from the peer...", relayed).unwrap();

        worker.round(&mut rounds).unwrap();
        let at_client = take_all(&sock);
        assert_eq!(
            at_client.len(),
            1,
            "the peer's datagram, relayed in the first round"
        );
        assert!(at_client[0].ends_with(b"from the peer..."));
        // Full batches go out by GSO (the worker is behind); the peer still
        // gets every datagram whole.
        let at_peer = take_all(&peer);
        assert!(at_peer.iter().all(|d| d[..] == [0x5a; 100]));
        assert_eq!(
            at_peer.len(),
            worker.turn,
            "the listener's turn ends after {} datagrams",
            worker.turn
        );

        // The rest follows in the next round without a new event: the
        // listener was carried over.
        worker.round(&mut rounds).unwrap();
        assert_eq!(take_all(&peer).len(), batch::BATCH);
        assert!(rounds.ready.is_empty(), "nothing left over");
    }
}
