//! A TURN relay for the native peer: one allocation on the server's TURN
//! (with the credentials of `welcome.iceServers`), reached over UDP, TCP
//! or TLS, offered to every link as a relayed candidate. What a link sends
//! from the relay address goes to the server framed for its peer
//! (ChannelData once a channel is bound, a Send indication before); what
//! the server relays back is handed to the links as if it had come to the
//! relay address. So the peer reaches browsers it has no direct path to,
//! and, over TCP or TLS, from a network that lets no UDP out.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use callisto_protocol::ReceivedIceServer;
use callisto_turn::client::{Client, Event};
use callisto_turn::stun;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::{Mutex, mpsc};
use tokio::task::JoinHandle;

use crate::probe::{Found, IceKind, IceUrl};

/// The longest datagram read from the TURN server.
pub(crate) const MAX_DATAGRAM: usize = 2048;

/// How the peer reaches the TURN server (the relayed address is UDP
/// whichever it is).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RelayTransport {
    #[default]
    Udp,
    Tcp,
    Tls,
}

impl RelayTransport {
    fn describe(self) -> &'static str {
        match self {
            RelayTransport::Udp => "TURN-over-UDP",
            RelayTransport::Tcp => "TURN-over-TCP",
            RelayTransport::Tls => "TURN-over-TLS (turns:)",
        }
    }

    fn kind(self) -> IceKind {
        match self {
            RelayTransport::Udp => IceKind::TurnUdp,
            RelayTransport::Tcp => IceKind::TurnTcp,
            RelayTransport::Tls => IceKind::TurnTls,
        }
    }
}

/// The connection to the TURN server.
pub(crate) enum ToServer {
    Udp(UdpSocket),
    /// TCP or TLS. A stream splits and joins messages anywhere: a task of
    /// its own reads it and hands on whole ones.
    Stream {
        writer: Box<dyn AsyncWrite + Send + Sync + Unpin>,
        frames: Mutex<mpsc::Receiver<Vec<u8>>>,
        reader: JoinHandle<()>,
    },
}

impl Drop for ToServer {
    fn drop(&mut self) {
        if let ToServer::Stream { reader, .. } = self {
            reader.abort();
        }
    }
}

/// An allocation, with its connection to the server.
pub(crate) struct Relay {
    client: Client,
    socket: ToServer,
    /// The relayed address: the candidate's.
    pub relayed: SocketAddr,
    /// Our end of the socket to the server.
    pub base: SocketAddr,
    /// Peers we asked for a permission and a channel to.
    known: HashSet<SocketAddr>,
    permitted: HashSet<IpAddr>,
}

impl Relay {
    /// Allocates on the first TURN URL of `servers` over `over` that
    /// works; `tls` trusts the server's certificate, for TLS.
    pub(crate) async fn allocate(
        servers: &[ReceivedIceServer],
        over: RelayTransport,
        tls: impl Fn() -> Result<Arc<rustls::ClientConfig>, String>,
    ) -> Result<Relay, String> {
        let mut why = format!("the server hands out no {} URL", over.describe());
        for server in servers {
            let (Some(user), Some(password)) = (&server.username, &server.credential) else {
                continue;
            };
            for url in &server.urls {
                let Ok(target) = url.parse::<IceUrl>() else {
                    continue;
                };
                if target.kind != over.kind() {
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
                let client = Client::new(user, password, over != RelayTransport::Udp, tid_seed());
                let connect = async {
                    match over {
                        RelayTransport::Udp => allocate_udp(address, client)
                            .await
                            .map(|(client, socket, found)| (client, ToServer::Udp(socket), found)),
                        RelayTransport::Tcp => {
                            let tcp = TcpStream::connect(address)
                                .await
                                .map_err(|e| e.to_string())?;
                            allocate_over_stream(tcp, client).await
                        }
                        RelayTransport::Tls => {
                            let tcp = TcpStream::connect(address)
                                .await
                                .map_err(|e| e.to_string())?;
                            let local = tcp.local_addr().map_err(|e| e.to_string())?;
                            let name = rustls::pki_types::ServerName::try_from(target.host.clone())
                                .map_err(|e| format!("{}: {e}", target.host))?;
                            let stream = tokio_rustls::TlsConnector::from(tls()?)
                                .connect(name, tcp)
                                .await
                                .map_err(|e| format!("TLS: {e}"))?;
                            allocate_over_stream(Local(stream, local), client).await
                        }
                    }
                };
                let attempt = tokio::time::timeout(Duration::from_secs(5), connect)
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

    /// The next message from the TURN server.
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

impl ToServer {
    pub(crate) async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            ToServer::Udp(socket) => socket.send(bytes).await.map(|_| ()),
            ToServer::Stream { writer, .. } => writer.write_all(bytes).await,
        }
    }

    async fn recv(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            ToServer::Udp(socket) => socket.recv(buf).await,
            ToServer::Stream { frames, .. } => {
                let frame = frames.lock().await.recv().await.ok_or_else(|| {
                    std::io::Error::new(
                        std::io::ErrorKind::ConnectionReset,
                        "the TURN server closed the connection",
                    )
                })?;
                let len = frame.len().min(buf.len());
                buf[..len].copy_from_slice(&frame[..len]);
                Ok(len)
            }
        }
    }
}

/// A stream with the local address of the TCP connection under it.
pub(crate) struct Local<S>(pub S, pub SocketAddr);

/// A stream to the TURN server that knows its local address.
pub(crate) trait ServerStream:
    AsyncRead + AsyncWrite + Send + Sync + Unpin + 'static
{
    fn local(&self) -> std::io::Result<SocketAddr>;
}

impl ServerStream for TcpStream {
    fn local(&self) -> std::io::Result<SocketAddr> {
        self.local_addr()
    }
}

impl<S: AsyncRead + AsyncWrite + Send + Sync + Unpin + 'static> ServerStream for Local<S> {
    fn local(&self) -> std::io::Result<SocketAddr> {
        Ok(self.1)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Local<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Local<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Whole messages from what a stream has read so far (`buf`, drained of
/// them); an error if it holds something that is not STUN or ChannelData,
/// or is too long.
fn stream_frames(buf: &mut Vec<u8>) -> Result<Vec<Vec<u8>>, String> {
    let mut frames = Vec::new();
    while let Some(len) = stun::stream_frame_len(buf).map_err(|e| e.to_string())? {
        if len > MAX_DATAGRAM {
            return Err(format!("a message of {len} bytes"));
        }
        if buf.len() < len {
            break;
        }
        frames.push(buf.drain(..len).collect());
    }
    Ok(frames)
}

/// Allocates over a TCP or TLS stream; the client, and the stream made a
/// [`ToServer`] whose reader hands on whole messages.
pub(crate) async fn allocate_over_stream(
    stream: impl ServerStream,
    mut client: Client,
) -> Result<(Client, ToServer, Found), String> {
    let local = stream.local().map_err(|e| e.to_string())?;
    let (mut reader, mut writer) = tokio::io::split(stream);
    client.allocate(Instant::now());
    let mut buf = Vec::new();
    let mut chunk = [0u8; MAX_DATAGRAM];
    let found = loop {
        while let Some(out) = client.poll_transmit() {
            writer.write_all(&out).await.map_err(|e| e.to_string())?;
        }
        if let Some(outcome) = settled(&mut client, local) {
            break outcome?;
        }
        let read = reader.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if read == 0 {
            return Err("the server closed the connection".into());
        }
        buf.extend_from_slice(&chunk[..read]);
        for frame in stream_frames(&mut buf)? {
            client.handle_input(Instant::now(), &frame);
        }
    };
    let (tx, rx) = mpsc::channel(256);
    let reader = tokio::spawn(async move {
        loop {
            match stream_frames(&mut buf) {
                Ok(frames) => {
                    for frame in frames {
                        if tx.send(frame).await.is_err() {
                            return;
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!("closing the connection to the TURN server: it sent {e}");
                    return;
                }
            }
            match reader.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(read) => buf.extend_from_slice(&chunk[..read]),
            }
        }
    });
    let socket = ToServer::Stream {
        writer: Box::new(writer),
        frames: Mutex::new(rx),
        reader,
    };
    Ok((client, socket, found))
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
