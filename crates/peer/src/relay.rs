//! A TURN relay for the native peer: one allocation over UDP on the
//! server's TURN (with the credentials of `welcome.iceServers`), offered
//! to every link as a relayed candidate. What a link sends from the relay
//! address goes to the server framed for its peer (ChannelData once a
//! channel is bound, a Send indication before); what the server relays
//! back is handed to the links as if it had come to the relay address.
//! So the peer reaches browsers it has no direct path to.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use callisto_protocol::ReceivedIceServer;
use callisto_turn::client::{Client, Event};
use tokio::net::UdpSocket;

use crate::probe::{Found, IceKind, IceUrl};

/// The longest datagram read from the TURN server.
pub(crate) const MAX_DATAGRAM: usize = 2048;

/// An allocation, with its socket.
pub(crate) struct Relay {
    client: Client,
    socket: UdpSocket,
    /// The relayed address: the candidate's.
    pub relayed: SocketAddr,
    /// Our end of the socket to the server.
    pub base: SocketAddr,
    /// Peers we asked for a permission and a channel to.
    known: HashSet<SocketAddr>,
    permitted: HashSet<IpAddr>,
}

impl Relay {
    /// Allocates on the first TURN-over-UDP URL of `servers` that works.
    pub(crate) async fn allocate(servers: &[ReceivedIceServer]) -> Result<Relay, String> {
        let mut why = "the server hands out no TURN-over-UDP URL".to_owned();
        for server in servers {
            let (Some(user), Some(password)) = (&server.username, &server.credential) else {
                continue;
            };
            for url in &server.urls {
                let Ok(target) = url.parse::<IceUrl>() else {
                    continue;
                };
                if target.kind != IceKind::TurnUdp {
                    continue;
                }
                let address = match tokio::net::lookup_host((target.host.as_str(), target.port))
                    .await
                    .map(|mut a| a.next())
                {
                    Ok(Some(address)) => address,
                    _ => {
                        why = format!("{url}: cannot resolve {}", target.host);
                        continue;
                    }
                };
                let client = Client::new(user, password, false, tid_seed());
                let attempt =
                    tokio::time::timeout(Duration::from_secs(5), allocate_udp(address, client))
                        .await
                        .unwrap_or_else(|_| Err("no answer within 5 s".into()));
                match attempt {
                    Ok((client, socket, found)) => {
                        let relayed = found.relayed.ok_or("an allocation without a relay")?;
                        return Ok(Relay {
                            client,
                            socket,
                            relayed,
                            base: found.local,
                            known: HashSet::new(),
                            permitted: HashSet::new(),
                        });
                    }
                    Err(e) => why = format!("{url}: {e}"),
                }
            }
        }
        Err(why)
    }

    /// Sends `data` to `peer` through the relay, asking for a permission
    /// and a channel the first time (the first packets may be dropped
    /// until they are granted; ICE sends its checks again).
    pub(crate) async fn send(&mut self, peer: SocketAddr, data: &[u8]) {
        if self.known.insert(peer) {
            let now = Instant::now();
            if self.permitted.insert(peer.ip()) {
                self.client.create_permission_for(now, peer);
            }
            self.client.bind_channel(now, peer);
        }
        let framed = self.client.send_to(peer, data);
        self.flush().await;
        if let Err(e) = self.socket.send(&framed).await {
            tracing::debug!(%peer, "sending through the relay failed: {e}");
        }
    }

    /// Sends what the TURN client has to send (requests, refreshes).
    pub(crate) async fn flush(&mut self) {
        while let Some(out) = self.client.poll_transmit() {
            if let Err(e) = self.socket.send(&out).await {
                tracing::debug!("sending to the TURN server failed: {e}");
            }
        }
    }

    /// The next datagram from the TURN server.
    pub(crate) async fn recv(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.socket.recv(buf).await
    }

    /// Takes a datagram from the server; returns what peers sent us.
    pub(crate) fn handle_input(&mut self, buf: &[u8]) -> Vec<(SocketAddr, Vec<u8>)> {
        self.client.handle_input(Instant::now(), buf);
        self.data()
    }

    fn data(&mut self) -> Vec<(SocketAddr, Vec<u8>)> {
        let mut data = Vec::new();
        while let Some(event) = self.client.poll_event() {
            match event {
                Event::Data { peer, data: bytes } => data.push((peer, bytes)),
                Event::Failed {
                    method,
                    code,
                    reason,
                } => {
                    tracing::warn!(method, code, reason, "a TURN request failed");
                }
                _ => {}
            }
        }
        data
    }

    /// When to call [`Relay::handle_timeout`].
    pub(crate) fn timeout(&self) -> Option<Instant> {
        self.client.poll_timeout()
    }

    pub(crate) fn handle_timeout(&mut self) {
        self.client.handle_timeout(Instant::now());
        // Nothing comes from timeouts but requests, sent by the next flush.
        let _ = self.data();
    }

    /// Lets the allocation go (a Refresh of lifetime 0).
    pub(crate) async fn release(&mut self) {
        self.client.refresh(Instant::now(), 0);
        self.flush().await;
    }
}

/// A seed for a TURN client's transaction ids. Random, so that the many
/// clients of one process (`callisto load`) do not all send the same ids.
pub(crate) fn tid_seed() -> u64 {
    let mut seed = [0u8; 8];
    match getrandom::fill(&mut seed) {
        Ok(()) => u64::from_le_bytes(seed),
        // Still distinct per client: the clock's nanoseconds.
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
    }
}

/// A UDP socket connected to `server` from this machine's address for it.
pub(crate) async fn bound_udp(server: SocketAddr) -> Result<UdpSocket, String> {
    let any: SocketAddr = if server.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(any).await.map_err(|e| e.to_string())?;
    socket.connect(server).await.map_err(|e| e.to_string())?;
    Ok(socket)
}

/// Allocates over UDP; the client and its socket, with what the server said.
pub(crate) async fn allocate_udp(
    server: SocketAddr,
    mut client: Client,
) -> Result<(Client, UdpSocket, Found), String> {
    let socket = bound_udp(server).await?;
    let local = socket.local_addr().map_err(|e| e.to_string())?;
    client.allocate(Instant::now());
    let mut buf = [0u8; MAX_DATAGRAM];
    loop {
        while let Some(out) = client.poll_transmit() {
            socket.send(&out).await.map_err(|e| e.to_string())?;
        }
        if let Some(outcome) = settled(&mut client, local) {
            return outcome.map(|found| (client, socket, found));
        }
        let wake = client
            .poll_timeout()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
        match tokio::time::timeout_at(wake.into(), socket.recv(&mut buf)).await {
            Ok(received) => {
                let len = received.map_err(|e| e.to_string())?;
                client.handle_input(Instant::now(), &buf[..len]);
            }
            Err(_) => client.handle_timeout(Instant::now()),
        }
    }
}

/// What an allocation ended in, once the client said.
pub(crate) fn settled(client: &mut Client, local: SocketAddr) -> Option<Result<Found, String>> {
    while let Some(event) = client.poll_event() {
        match event {
            Event::Allocated {
                relayed, mapped, ..
            } => {
                return Some(Ok(Found {
                    local,
                    mapped,
                    relayed: Some(relayed),
                }));
            }
            Event::Failed { code, reason, .. } => return Some(Err(format!("{code} {reason}"))),
            Event::Redirected { alternate } => {
                return Some(Err(format!("sent on to another server, {alternate}")));
            }
            _ => {}
        }
    }
    None
}
