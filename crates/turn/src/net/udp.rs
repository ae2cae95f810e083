//! The UDP driver: one worker thread per core, each with its own listening
//! socket on the TURN port (SO_REUSEPORT, so the kernel spreads clients by
//! 5-tuple and a client always lands on the same worker), its own relay
//! sockets, and its own [`Server`] state machine. A client's allocation,
//! its relay socket and all its traffic stay on one thread: no locks on the
//! data path. Workers share only quotas and the nonce key ([`Shared`]).
//!
//! Each wake-up drains a socket with `recvmmsg`, hands every datagram to the
//! state machine, and sends the whole batch of answers to clients with one
//! `sendmmsg`, straight out of the receive buffers.

use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket as StdUdpSocket};
use std::ops::{Range, RangeInclusive};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Registry, Token, Waker};
use socket2::{Domain, Protocol, Socket, Type};

use super::batch::{self, RecvBatch, SendBatch};
use crate::server::{
    FiveTuple, HEADROOM, Output, RelayAllocator, RelayId, Server, Shared, Transport,
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
            let socket = Socket::new(
                Domain::for_address(SocketAddr::new(ip, 0)),
                Type::DGRAM,
                Some(Protocol::UDP),
            )?;
            if ip.is_ipv6() {
                socket.set_only_v6(true)?;
            }
            let _ = socket.set_recv_buffer_size(1 << 20);
            let _ = socket.set_send_buffer_size(1 << 20);
            if socket
                .bind(&SocketAddr::new(ip, port as u16).into())
                .is_ok()
            {
                socket.set_nonblocking(true)?;
                return Ok(socket.into());
            }
        }
        Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            "no free port in the relay port range",
        ))
    }
}

impl<S> RelayAllocator for RelaySockets<S> {
    fn allocate(&mut self, id: RelayId, ipv6: bool, even: bool) -> io::Result<SocketAddr> {
        let ip = if ipv6 { self.cfg.ipv6 } else { self.cfg.ipv4 }.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::Unsupported,
                "no relay address of that family",
            )
        })?;
        let std = self.bind(ip, even)?;
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

    fn release(&mut self, id: RelayId) {
        if let Some(slot) = self.sockets.get_mut(id.0 as usize) {
            *slot = None;
        }
    }
}

/// Running UDP workers.
pub struct UdpWorkers {
    pub local_addr: SocketAddr,
    stop: Arc<AtomicBool>,
    wakers: Vec<Arc<Waker>>,
    threads: Vec<JoinHandle<()>>,
}

impl UdpWorkers {
    /// Binds `threads` sockets to `listen` and starts a worker on each.
    pub fn start(
        listen: SocketAddr,
        threads: usize,
        relay: RelayConfig,
        shared: Arc<Shared>,
    ) -> io::Result<UdpWorkers> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut addr = listen;
        let mut sockets = Vec::new();
        for _ in 0..threads.max(1) {
            let s = reuseport_socket(addr)?;
            addr = s.local_addr()?; // port 0 → the port the first one got
            sockets.push(s);
        }
        let mut wakers = Vec::new();
        let mut handles = Vec::new();
        for (i, std_socket) in sockets.into_iter().enumerate() {
            let poll = Poll::new()?;
            let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
            wakers.push(waker);
            let mut listener = UdpSocket::from_std(std_socket);
            poll.registry()
                .register(&mut listener, LISTENER, Interest::READABLE)?;
            let registry: Registry = poll.registry().try_clone()?;
            let span = u32::from(*relay.ports.end() - *relay.ports.start()) + 1;
            let relays = RelaySockets::new(
                relay.clone(),
                span / threads.max(1) as u32 * i as u32,
                UdpSocket::from_std,
                Box::new(move |s: &mut UdpSocket, id: RelayId| {
                    registry.register(s, Token(RELAY_BASE + id.0 as usize), Interest::READABLE)
                }),
            );
            let mut worker = Worker {
                poll,
                listener,
                local: addr,
                server: Server::new(shared.clone(), relays),
                rx: Box::default(),
                tx: SendBatch::default(),
                to_peer: Vec::with_capacity(batch::BATCH),
                to_client: Vec::with_capacity(batch::BATCH),
            };
            let stop = stop.clone();
            handles.push(
                std::thread::Builder::new()
                    .name(format!("turn-udp-{i}"))
                    .spawn(move || worker.run(&stop))?,
            );
        }
        Ok(UdpWorkers {
            local_addr: addr,
            stop,
            wakers,
            threads: handles,
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
    Ok(socket.into())
}

struct Worker {
    poll: Poll,
    listener: UdpSocket,
    local: SocketAddr,
    server: Server<RelaySockets<UdpSocket>>,
    rx: Box<RecvBatch>,
    tx: SendBatch,
    /// Per batch: datagrams for peers (relay, peer, bytes in `rx`), kept in
    /// the receive buffers and sent in runs that share a relay socket.
    to_peer: Vec<(RelayId, SocketAddr, Range<usize>)>,
    /// Per batch: datagrams for clients (client, bytes in `rx`).
    to_client: Vec<(SocketAddr, Range<usize>)>,
}

impl Worker {
    fn run(&mut self, stop: &AtomicBool) {
        let mut events = Events::with_capacity(256);
        while !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            let timeout = self
                .server
                .poll_timeout()
                .map_or(Duration::from_secs(1), |t| t.saturating_duration_since(now))
                .min(Duration::from_secs(1));
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::error!(error = %e, "TURN UDP worker: poll failed");
                    return;
                }
            }
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.drain_listener(),
                    WAKER => {}
                    Token(t) => self.drain_relay(RelayId((t - RELAY_BASE) as u32)),
                }
            }
            self.server.on_timeout(Instant::now());
        }
    }

    fn drain_listener(&mut self) {
        loop {
            let n = match self.rx.recv(&self.listener, 0) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // ICMP errors surface here (ECONNREFUSED); they concern
                    // one datagram, not the socket.
                    tracing::trace!(error = %e, "TURN UDP receive error");
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
                let buf = &mut self.rx.slot(i)[..len];
                let base = i * batch::SLOT;
                match self.server.on_client(now, five, buf) {
                    Output::ToPeer { relay, peer, range } => {
                        self.to_peer
                            .push((relay, peer, base + range.start..base + range.end));
                    }
                    Output::ToClient { to, range } => {
                        self.to_client
                            .push((to.client, base + range.start..base + range.end));
                    }
                    Output::Reply { to, data } => replies.push((to.client, data)),
                    Output::None => {}
                }
            }
            let all = self.rx.slot_all();
            for run in self.to_peer.chunk_by(|a, b| a.0 == b.0) {
                if let Some(sock) = self.server.relays().get(run[0].0) {
                    self.tx.send(
                        sock,
                        run.iter().map(|(_, peer, r)| (*peer, &all[r.clone()])),
                    );
                }
            }
            // Relayed in place between two allocations of this worker.
            self.tx.send(
                &self.listener,
                self.to_client.iter().map(|(to, r)| (*to, &all[r.clone()])),
            );
            if !replies.is_empty() {
                self.tx.send(
                    &self.listener,
                    replies.iter().map(|(to, d)| (*to, d.as_slice())),
                );
            }
            if n < batch::BATCH {
                // recvmmsg took all there was: the next datagram raises a
                // new edge, so the call that would only say EAGAIN is saved.
                return;
            }
        }
    }

    fn drain_relay(&mut self, relay: RelayId) {
        loop {
            let Some(sock) = self.server.relays().get(relay) else {
                return;
            };
            let n = match self.rx.recv(sock, HEADROOM) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::trace!(error = %e, "relay receive error");
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
                    self.to_client
                        .push((to.client, base + range.start..base + range.end));
                }
            }
            let all = self.rx.slot_all();
            self.tx.send(
                &self.listener,
                self.to_client.iter().map(|(to, r)| (*to, &all[r.clone()])),
            );
            if n < batch::BATCH {
                return;
            }
        }
    }
}
