//! The driver: one signaling WebSocket, one UDP socket shared by every
//! [`Link`], and the clock. It joins the room, meets the others as the web
//! app does (the newcomer offers to everyone already there; the others
//! wait for its offer), and reports what happens as [`PeerEvent`]s.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use callisto_protocol::{Received, ReceivedIceServer, ReceivedPeer, decode_server};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use str0m::Candidate;
use str0m::channel::ChannelId;
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::http::Uri;
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

use crate::chat::ChannelMessage;
use crate::files::Offer;
use crate::link::{Link, LinkError, LinkEvent, MediaCounts};
use crate::relay::{Relay, RelayTransport};
use crate::saving::Saving;
use crate::signals::{SdpKind, Signal};
use crate::tls::{Fingerprint, TlsError, client_config, is_secure};

/// How long `run` waits for the server's answer to `join`.
const JOIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a lost signaling connection is tried again before the peer
/// gives up: past the server's default `--resume-grace` (15 s), and
/// long enough for a restart of the server.
const RECONNECT_FOR: Duration = Duration::from_secs(30);
/// The longest wait between two attempts.
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(2);
/// How long a `moved` waits for its answer: a peer that let us go (it saw
/// us leave) has closed its end, and never answers (as the web app waits).
const MOVED_ACK: Duration = Duration::from_secs(2);
/// How long a link to someone the server no longer lists waits for them
/// to say, over it, that they came back under a new id.
const MOVED_WAIT: Duration = Duration::from_secs(20);
/// How long someone the server lists, back after a restart, is given to
/// say over a connection of ours that they are its peer under a new id,
/// before we offer them a new one (as the web app waits).
const MEET_DELAY: Duration = Duration::from_millis(1500);
/// The largest datagram read; WebRTC keeps to about 1,200 bytes.
const MAX_DATAGRAM: usize = 2048;

/// Where and as whom to join.
#[derive(Debug, Clone)]
pub struct PeerConfig {
    /// The server, as a browser would open it (`http://host:port`) or its
    /// WebSocket (`ws://host:port/ws`).
    pub server: String,
    pub room: String,
    pub name: String,
    /// Whether to join to watch: the server shows it only to those taking
    /// part, and to it only them (docs/protocol.md, "Watching").
    pub watching: bool,
    /// An access code, on a server that needs one.
    pub access: Option<String>,
    /// The address to take media on; by default the one this machine
    /// reaches the server from.
    pub bind: Option<IpAddr>,
    /// For `https://` / `wss://`: trust only the certificate with this
    /// fingerprint (a self-signed one), instead of the system's roots.
    pub pin: Option<Fingerprint>,
    /// Whether to reach the others through the server's TURN too.
    pub relay: RelayUse,
    /// How to reach the TURN server for that: UDP, TCP or TLS.
    pub relay_over: RelayTransport,
    /// Whether to send the embedded test pattern and tone as camera and
    /// microphone (`crate::clip`); else it sends no media.
    pub send_media: bool,
    /// A folder to save the files offered to it in; without one, it
    /// declines them.
    pub save_files: Option<PathBuf>,
}

/// Which candidates the peer offers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RelayUse {
    /// Its host address only.
    #[default]
    Never,
    /// Its host address, and a relayed one on the server's TURN (UDP).
    Also,
    /// A relayed one only: everything goes through the TURN server.
    Only,
}

/// What the caller asks of a running peer.
#[derive(Debug, Clone)]
pub enum Command {
    /// Writes in the chat: to everyone, or to the peer with this id alone.
    Chat { text: String, to: Option<String> },
    /// Leaves the room; `run` then returns.
    Leave,
}

/// What happens to a running peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerEvent {
    /// In the room, as `id`, with these others (to one who watches,
    /// only those taking part).
    Joined {
        id: String,
        peers: Vec<ReceivedPeer>,
    },
    /// The room is locked: knocking, until someone lets us in.
    Knocking,
    PeerJoined {
        id: String,
        name: String,
        /// It only watches (and offers to us, if we take part).
        watching: bool,
    },
    PeerLeft {
        id: String,
        name: String,
    },
    /// The signaling connection was lost; trying to connect again.
    SignalingLost {
        reason: String,
    },
    /// Back with the server: in the same place (`resumed`), or anew,
    /// under a new id, having met everyone again.
    Rejoined {
        id: String,
        resumed: bool,
    },
    /// A connection to this peer is up.
    Connected {
        id: String,
        name: String,
    },
    Disconnected {
        id: String,
        name: String,
    },
    /// A chat message from `name`.
    Chat {
        from: String,
        name: String,
        text: String,
        private: bool,
    },
    /// A chat message could not go to this peer.
    NotSent {
        to: String,
        reason: String,
    },
    /// The server refused a message of ours.
    ServerError {
        code: String,
        message: String,
    },
    /// A file from `name` (`from`) came whole, and is saved at `path`.
    FileSaved {
        from: String,
        name: String,
        file: String,
        size: u64,
        path: PathBuf,
    },
    /// A file was offered, and declined: no folder to save it in.
    FileDeclined {
        from: String,
        name: String,
        file: String,
        size: u64,
    },
    /// A file accepted did not come whole (what of it came is removed).
    FileFailed {
        from: String,
        name: String,
        file: String,
        why: String,
    },
}

/// What a peer received, per peer met, when it left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub peers: Vec<PeerSummary>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSummary {
    pub id: String,
    pub name: String,
    pub connected: bool,
    /// Received.
    pub media: MediaCounts,
    /// Video and audio frames sent (`send_media`).
    pub sent: (u64, u64),
}

/// Why a peer could not join, or stopped.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("{0:?} is not a server address: give http://HOST:PORT or ws://HOST:PORT/ws")]
    BadServer(String),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(
        "the server's certificate is not trusted ({0}); a self-signed one can be trusted by its fingerprint (callisto peer --tls-fingerprint), which callisto serve logs"
    )]
    Untrusted(String),
    #[error("cannot reach {server}: {source}")]
    Unreachable {
        server: String,
        source: std::io::Error,
    },
    #[error("signaling: {0}")]
    WebSocket(#[from] tokio_tungstenite::tungstenite::Error),
    #[error("the server refused to let us join: {code}: {message}")]
    Refused { code: String, message: String },
    #[error("the server did not answer the join within {0:?}")]
    JoinTimeout(Duration),
    #[error("the server closed the signaling connection: {code} {reason}")]
    Closed { code: u16, reason: String },
    #[error("the signaling connection was lost and could not be made again within {0:?}")]
    SignalingLost(Duration),
    #[error("UDP: {0}")]
    Udp(std::io::Error),
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error("no TURN relay: {0}")]
    Relay(String),
    #[error("the system gave no random numbers: {0}")]
    Random(String),
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A peer [`spawn`]ed on the runtime: what to tell it, what it says, and
/// (once it has left) what it received.
pub struct Running {
    pub commands: mpsc::UnboundedSender<Command>,
    pub events: mpsc::UnboundedReceiver<PeerEvent>,
    pub task: tokio::task::JoinHandle<Result<Summary, PeerError>>,
}

/// Starts [`run`] on a task of its own, with channels to and from it.
pub fn spawn(config: PeerConfig) -> Running {
    let (commands, command_rx) = mpsc::unbounded_channel();
    let (event_tx, events) = mpsc::unbounded_channel();
    Running {
        commands,
        events,
        task: tokio::spawn(run(config, command_rx, event_tx)),
    }
}

/// Joins, runs until [`Command::Leave`] (or the end of `commands`), and
/// returns what was received. Events go to `events` as they happen.
pub async fn run(
    config: PeerConfig,
    mut commands: mpsc::UnboundedReceiver<Command>,
    events: mpsc::UnboundedSender<PeerEvent>,
) -> Result<Summary, PeerError> {
    let url = websocket_url(&config.server)?;
    let bind = match config.bind {
        Some(ip) => ip,
        None => route_to(&url).await?,
    };
    let socket = UdpSocket::bind(SocketAddr::new(bind, 0))
        .await
        .map_err(PeerError::Udp)?;
    let local = socket.local_addr().map_err(PeerError::Udp)?;
    let (ws, connector) = open(&url, config.pin).await?;
    let mut join = json!({"type": "join", "room": config.room, "name": config.name});
    if config.watching {
        join["watching"] = json!(true);
    }
    if let Some(access) = &config.access {
        join["access"] = json!(access);
    }
    let mut session = Session {
        ws: Some(ws),
        url,
        connector,
        join,
        resume: None,
        reconnecting: None,
        relay_use: config.relay,
        relay_over: config.relay_over,
        pin: config.pin,
        watching: config.watching,
        send_media: config.send_media && !config.watching,
        save_files: config.save_files,
        saving: HashMap::new(),
        relay: None,
        socket,
        local,
        id: String::new(),
        members: HashMap::new(),
        links: HashMap::new(),
        gone: Vec::new(),
        moving: None,
        awaiting_move: HashMap::new(),
        to_meet: HashMap::new(),
        events,
    };
    let join = session.join.clone();
    session.send_json(&join).await;
    session.await_welcome().await?;

    let mut buf = vec![0; MAX_DATAGRAM];
    let mut relay_buf = vec![0; MAX_DATAGRAM];
    loop {
        let wake = session
            .links
            .values()
            .map(|(_, link)| link.timeout())
            .chain(session.relay.as_ref().and_then(Relay::timeout))
            .chain(session.moving.as_ref().map(|m| m.until))
            .chain(session.awaiting_move.values().copied())
            .chain(session.to_meet.values().copied())
            .min()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
        tokio::select! {
            frame = next_frame(&mut session.ws) => match frame {
                Some(Ok(Message::Text(text))) => session.on_server_text(&text).await?,
                Some(Ok(Message::Close(Some(frame)))) if u16::from(frame.code) == 1008 => {
                    // Rate-limited, too slow, or our place taken by
                    // another connection: coming back would not help.
                    return Err(PeerError::Closed { code: 1008, reason: frame.reason.to_string() });
                }
                Some(Ok(Message::Close(frame))) => {
                    let reason = frame.map_or_else(|| "closed".to_owned(), |f| format!("{} {}", u16::from(f.code), f.reason));
                    session.lost(reason);
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => session.lost(e.to_string()),
                None => session.lost("closed".to_owned()),
            },
            connected = reconnected(&mut session.reconnecting) => {
                session.reconnecting = None;
                session.ws = Some(connected?);
                let mut join = session.join.clone();
                if let Some(token) = &session.resume {
                    join["resume"] = json!(token);
                }
                session.send_json(&join).await;
            }
            received = session.socket.recv_from(&mut buf) => {
                let (len, source) = received.map_err(PeerError::Udp)?;
                session.on_datagram(source, session.local, &buf[..len]).await?;
            }
            received = relayed(&session.relay, &mut relay_buf) => match received {
                Ok(len) => session.on_relayed(&relay_buf[..len]).await?,
                // An ICMP error on the socket to the TURN server (it is
                // down, restarting): the relay's requests say the rest.
                Err(e) => tracing::debug!("from the TURN server: {e}"),
            },
            () = tokio::time::sleep_until(wake.into()) => session.on_timeout().await?,
            command = commands.recv() => match command {
                Some(Command::Chat { text, to }) => session.chat(&text, to.as_deref()).await?,
                Some(Command::Leave) | None => return session.leave().await,
            },
        }
    }
}

/// Takes out of `deadlines` the ids whose time has come by `now`.
fn take_due(deadlines: &mut HashMap<String, Instant>, now: Instant) -> Vec<String> {
    let due: Vec<String> = deadlines
        .iter()
        .filter(|(_, at)| **at <= now)
        .map(|(id, _)| id.clone())
        .collect();
    for id in &due {
        deadlines.remove(id);
    }
    due
}

/// The server's WebSocket URL from what a person would type.
pub(crate) fn websocket_url(server: &str) -> Result<Uri, PeerError> {
    let bad = || PeerError::BadServer(server.to_owned());
    let uri: Uri = server.parse().map_err(|_| bad())?;
    let scheme = match uri.scheme_str() {
        Some("ws" | "http") => "ws",
        Some("wss" | "https") => "wss",
        _ => return Err(bad()),
    };
    let authority = uri.authority().ok_or_else(bad)?;
    let path = match uri.path() {
        "" | "/" => "/ws",
        path => path,
    };
    format!("{scheme}://{authority}{path}")
        .parse()
        .map_err(|_| bad())
}

/// The local address this machine reaches the server's host from: the
/// one a peer there (or on its network) can reach us on.
async fn route_to(url: &Uri) -> Result<IpAddr, PeerError> {
    let host = url.host().unwrap_or_default();
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = url
        .port_u16()
        .unwrap_or(if is_secure(url) { 443 } else { 80 });
    let unreachable = |source| PeerError::Unreachable {
        server: url.to_string(),
        source,
    };
    let server = tokio::net::lookup_host((host, port))
        .await
        .map_err(unreachable)?
        .next()
        .ok_or_else(|| unreachable(std::io::ErrorKind::NotFound.into()))?;
    let any: SocketAddr = if server.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    // Connecting a UDP socket sends nothing: it only asks for the route.
    let probe = std::net::UdpSocket::bind(any).map_err(unreachable)?;
    probe.connect(server).map_err(unreachable)?;
    Ok(probe.local_addr().map_err(unreachable)?.ip())
}

/// The next frame of the signaling connection; never, while there is none.
async fn next_frame(
    ws: &mut Option<Ws>,
) -> Option<Result<Message, tokio_tungstenite::tungstenite::Error>> {
    match ws {
        Some(ws) => ws.next().await,
        None => std::future::pending().await,
    }
}

/// The next datagram from the TURN server; never, without a relay.
async fn relayed(relay: &Option<Relay>, buf: &mut [u8]) -> std::io::Result<usize> {
    match relay {
        Some(relay) => relay.recv(buf).await,
        None => std::future::pending().await,
    }
}

/// The new signaling connection, once made; never, while none is tried.
async fn reconnected(
    attempt: &mut Option<tokio::task::JoinHandle<Result<Ws, PeerError>>>,
) -> Result<Ws, PeerError> {
    match attempt {
        Some(handle) => handle
            .await
            .unwrap_or(Err(PeerError::SignalingLost(RECONNECT_FOR))),
        None => std::future::pending().await,
    }
}

/// The first signaling connection to `url`: over TLS for `wss://`,
/// trusting the certificate pinned by `pin` or else the system's roots
/// (an untrusted one is refused saying what to do); with the connector,
/// to connect again later.
pub(crate) async fn open(
    url: &Uri,
    pin: Option<Fingerprint>,
) -> Result<(Ws, Connector), PeerError> {
    let connector = match is_secure(url) {
        true => Connector::Rustls(client_config(pin)?),
        false => Connector::Plain,
    };
    let ws = connect(url, connector.clone())
        .await
        .map_err(|e| match untrusted(&e) {
            Some(why) if pin.is_none() => PeerError::Untrusted(why),
            _ => e.into(),
        })?;
    Ok((ws, connector))
}

/// A WebSocket to `url`, over TLS if `connector` says so.
async fn connect(
    url: &Uri,
    connector: Connector,
) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
    // Nagle off: signals are small and each is awaited at the other end.
    let (ws, _) =
        tokio_tungstenite::connect_async_tls_with_config(url, None, true, Some(connector)).await?;
    Ok(ws)
}

/// Why the server's certificate was refused, if that is what failed.
fn untrusted(error: &tokio_tungstenite::tungstenite::Error) -> Option<String> {
    let tokio_tungstenite::tungstenite::Error::Io(io) = error else {
        return None;
    };
    match io.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::InvalidCertificate(why) => Some(format!("{why:?}")),
        _ => None,
    }
}

/// Connects again, with growing pauses, for up to [`RECONNECT_FOR`].
async fn reconnect(url: Uri, connector: Connector) -> Result<Ws, PeerError> {
    let give_up = Instant::now() + RECONNECT_FOR;
    let mut delay = Duration::from_millis(250);
    loop {
        tokio::time::sleep(delay).await;
        match connect(&url, connector.clone()).await {
            Ok(ws) => return Ok(ws),
            Err(e) if Instant::now() + delay < give_up => {
                tracing::debug!("connecting to {url} again: {e}");
                delay = (delay * 2).min(MAX_RECONNECT_DELAY);
            }
            Err(_) => return Err(PeerError::SignalingLost(RECONNECT_FOR)),
        }
    }
}

struct Session {
    /// The signaling connection; none while it is being made again.
    ws: Option<Ws>,
    url: Uri,
    connector: Connector,
    /// Our `join`, to send again on a new connection.
    join: Value,
    /// The token of our place, from the last `welcome`.
    resume: Option<String>,
    reconnecting: Option<tokio::task::JoinHandle<Result<Ws, PeerError>>>,
    relay_use: RelayUse,
    relay_over: RelayTransport,
    /// The server's certificate, if pinned: for TURN over TLS too.
    pin: Option<Fingerprint>,
    /// Joined to watch: it sends no `state` (docs/protocol.md).
    watching: bool,
    /// Sends the test pattern and the tone on every link.
    send_media: bool,
    /// Where files offered are saved; none: they are declined.
    save_files: Option<PathBuf>,
    /// The files being saved, by link and channel, with what was offered.
    saving: HashMap<(String, ChannelId), (Offer, Saving)>,
    /// The allocation links are offered, with `RelayUse::Also` or `Only`.
    relay: Option<Relay>,
    socket: UdpSocket,
    local: SocketAddr,
    /// Our id in the room.
    id: String,
    /// Everyone else in the room: id → name.
    members: HashMap<String, String>,
    /// Our connections: id → (name, link).
    links: HashMap<String, (String, Link)>,
    /// What was received from those who left.
    gone: Vec<PeerSummary>,
    /// Back under a new id after a restart of the server: the links told
    /// so (`moved`), until when they may answer, and those that did.
    moving: Option<Moving>,
    /// Links to peers the server does not list, each until when it waits
    /// for its peer to say it moved.
    awaiting_move: HashMap<String, Instant>,
    /// Those our welcome listed, back after a restart, whom we offer to
    /// at the given time unless one of our links turns out to be theirs.
    to_meet: HashMap<String, Instant>,
    events: mpsc::UnboundedSender<PeerEvent>,
}

/// Our `moved` to each link, after a restart of the server.
struct Moving {
    until: Instant,
    asked: HashSet<String>,
    answered: HashSet<String>,
}

impl Session {
    /// Sends on the signaling connection. While it is lost the message is
    /// dropped, as the server would have dropped it; a failed send loses it.
    async fn send_json(&mut self, value: &Value) {
        if let Some(ws) = &mut self.ws
            && let Err(e) = ws.send(Message::text(value.to_string())).await
        {
            self.lost(e.to_string());
        }
    }

    /// The signaling connection ended: the calls go on meanwhile, and
    /// a new connection takes our place back (or joins anew).
    fn lost(&mut self, reason: String) {
        tracing::warn!("signaling connection lost ({reason}); connecting again");
        self.ws = None;
        // Who is in the room is the server's word, and we have none now:
        // a peer may tell us it moved until the next welcome says.
        self.members.clear();
        self.emit(PeerEvent::SignalingLost { reason });
        self.reconnecting = Some(tokio::spawn(reconnect(
            self.url.clone(),
            self.connector.clone(),
        )));
    }

    fn emit(&self, event: PeerEvent) {
        // The caller may have stopped listening; the peer goes on.
        let _ = self.events.send(event);
    }

    /// Waits for `welcome`, through a knock on a locked room.
    async fn await_welcome(&mut self) -> Result<(), PeerError> {
        let mut deadline = Instant::now() + JOIN_TIMEOUT;
        loop {
            let frame = tokio::time::timeout_at(deadline.into(), next_frame(&mut self.ws))
                .await
                .map_err(|_| PeerError::JoinTimeout(JOIN_TIMEOUT))?;
            let text = match frame {
                Some(Ok(Message::Text(text))) => text,
                Some(Ok(Message::Close(frame))) => {
                    return Err(PeerError::Closed {
                        code: frame.as_ref().map_or(1005, |f| u16::from(f.code)),
                        reason: frame.map(|f| f.reason.to_string()).unwrap_or_default(),
                    });
                }
                None => {
                    return Err(PeerError::Closed {
                        code: 1006,
                        reason: "no close frame".into(),
                    });
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(e.into()),
            };
            match decode_server(&text) {
                Ok(Received::Welcome {
                    id,
                    peers,
                    resume,
                    ice_servers,
                    ..
                }) => {
                    self.resume = Some(resume);
                    self.allocate_relay(&ice_servers).await?;
                    return self.welcome(id, peers).await;
                }
                Ok(Received::Waiting { .. }) => {
                    // Someone inside decides; that may take a while.
                    deadline = Instant::now() + Duration::from_secs(24 * 3600);
                    self.emit(PeerEvent::Knocking);
                }
                Ok(Received::Error { code, message }) => {
                    return Err(PeerError::Refused { code, message });
                }
                Ok(_) => {}
                Err(e) => tracing::warn!("{e}"),
            }
        }
    }

    async fn welcome(&mut self, id: String, peers: Vec<ReceivedPeer>) -> Result<(), PeerError> {
        self.id = id;
        self.emit(PeerEvent::Joined {
            id: self.id.clone(),
            peers: peers.clone(),
        });
        // The web app shows our tile with camera and microphone on or off
        // by it.
        self.announce_state().await;
        // The newcomer offers to everyone already there.
        for peer in peers {
            self.members.insert(peer.id.clone(), peer.name.clone());
            self.offer_to(peer.id, peer.name).await?;
        }
        Ok(())
    }

    /// A new link to `id`, which starts with our offer.
    async fn offer_to(&mut self, id: String, name: String) -> Result<(), PeerError> {
        let mut link = self.new_link(&id)?;
        link.offer()?;
        self.links.insert(id.clone(), (name, link));
        self.flush(&id).await
    }

    /// Tells the room our media state (see [`Session::state`]); watching,
    /// we have none to tell.
    async fn announce_state(&mut self) {
        if !self.watching {
            let state = self.state().encode();
            self.send_json(&json!({"type": "broadcast", "data": state}))
                .await;
        }
    }

    /// Allocates the relay, if asked for, before any link is made. With
    /// `RelayUse::Also` the peer goes on without one when it fails.
    async fn allocate_relay(&mut self, servers: &[ReceivedIceServer]) -> Result<(), PeerError> {
        if self.relay_use == RelayUse::Never {
            return Ok(());
        }
        let pin = self.pin;
        let tls = move || client_config(pin).map_err(|e| e.to_string());
        match Relay::allocate(servers, self.relay_over, tls).await {
            Ok(relay) => {
                tracing::debug!(relayed = %relay.relayed, "TURN relay allocated");
                self.relay = Some(relay);
                Ok(())
            }
            Err(why) if self.relay_use == RelayUse::Only => Err(PeerError::Relay(why)),
            Err(why) => {
                tracing::warn!("going on without a TURN relay: {why}");
                Ok(())
            }
        }
    }

    /// A link to `peer`: polite if our id is the greater, sending media
    /// if we do.
    fn new_link(&self, peer: &str) -> Result<Link, PeerError> {
        let mut link = Link::new(self.candidates()?, self.id.as_str() > peer, Instant::now())?;
        if self.send_media {
            link.send_media();
        }
        Ok(link)
    }

    /// Our media state, as the web app shows it on our tile: camera and
    /// microphone on if we send the pattern and the tone; no screen.
    fn state(&self) -> Signal {
        Signal::State {
            audio: self.send_media,
            video: self.send_media,
            screen: false,
        }
    }

    /// The candidates a new link offers.
    fn candidates(&self) -> Result<Vec<Candidate>, PeerError> {
        let mut candidates = Vec::new();
        if self.relay_use != RelayUse::Only {
            candidates.push(
                Candidate::host(self.local, "udp")
                    .map_err(|_| LinkError::LocalAddress(self.local))?,
            );
        }
        if let Some(relay) = &self.relay {
            candidates.push(
                Candidate::relayed(relay.relayed, relay.base, "udp")
                    .map_err(|_| LinkError::LocalAddress(relay.relayed))?,
            );
        }
        Ok(candidates)
    }

    /// Back with the server on a new connection. In our place again, the
    /// connections to those still there go on (those who joined meanwhile
    /// offer, and their offers are among what the server kept for us).
    /// Else, under a new id (the server restarted), each connection is
    /// told our new id over its chat channel (`moved`, as the web app
    /// does: end to end, so it proves it is us), and those whose peer
    /// answers go on untouched; the rest, and a relayed peer's (its
    /// allocation went with the old server), are made anew, as a
    /// newcomer makes them.
    async fn rejoined(
        &mut self,
        id: String,
        peers: Vec<ReceivedPeer>,
        resumed: bool,
        ice_servers: &[ReceivedIceServer],
    ) -> Result<(), PeerError> {
        self.emit(PeerEvent::Rejoined {
            id: id.clone(),
            resumed,
        });
        if resumed {
            let present: Vec<&str> = peers.iter().map(|p| p.id.as_str()).collect();
            let gone: Vec<String> = self
                .links
                .keys()
                .filter(|id| !present.contains(&id.as_str()))
                .cloned()
                .collect();
            for id in gone {
                self.drop_link(&id);
            }
            self.members = peers.into_iter().map(|p| (p.id, p.name)).collect();
            return Ok(());
        }
        self.members.clear();
        self.awaiting_move.clear();
        self.to_meet.clear();
        let keep = self.relay_use == RelayUse::Never && !self.links.is_empty();
        if !keep {
            // A new server (or a place given up) may not hold our old
            // allocation: the new links get a fresh one.
            let ids: Vec<String> = self.links.keys().cloned().collect();
            for id in ids {
                self.drop_link(&id);
            }
            self.relay = None;
            self.allocate_relay(ice_servers).await?;
            return self.welcome(id, peers).await;
        }
        self.id = id.clone();
        self.members = peers
            .iter()
            .map(|p| (p.id.clone(), p.name.clone()))
            .collect();
        // Those listed now: we offer to them, as a newcomer does (who
        // joins later offers to us), unless a link of ours is theirs.
        let later = Instant::now() + MOVED_WAIT;
        self.to_meet = peers.iter().map(|p| (p.id.clone(), later)).collect();
        self.emit(PeerEvent::Joined {
            id: id.clone(),
            peers,
        });
        self.announce_state().await;
        let moved = ChannelMessage::Moved { id };
        let mut asked = HashSet::new();
        let ids: Vec<String> = self.links.keys().cloned().collect();
        for link_id in ids {
            let told = match self.links.get_mut(&link_id) {
                Some((_, link)) if link.is_chat_open() => link.send(&moved).is_ok(),
                _ => false,
            };
            if told {
                asked.insert(link_id.clone());
                self.flush(&link_id).await?;
            } else {
                self.drop_link(&link_id);
            }
        }
        let nobody = asked.is_empty();
        self.moving = Some(Moving {
            until: Instant::now() + MOVED_ACK,
            asked,
            answered: HashSet::new(),
        });
        if nobody {
            self.moved_all().await?;
        }
        Ok(())
    }

    /// The answers to our `moved` are in, or their time is up: the links
    /// not answered go; those to peers the server does not list (yet)
    /// wait for their word; those our welcome listed without a link are
    /// met as a newcomer meets them: at once, or, while links wait, a
    /// little later (one of them may be theirs, its word on its way).
    async fn moved_all(&mut self) -> Result<(), PeerError> {
        let Some(moving) = self.moving.take() else {
            return Ok(());
        };
        for id in moving.asked.difference(&moving.answered) {
            self.drop_link(id);
        }
        let now = Instant::now();
        for id in self.links.keys() {
            if !self.members.contains_key(id) {
                self.awaiting_move.insert(id.clone(), now + MOVED_WAIT);
            }
        }
        let at = if self.awaiting_move.is_empty() {
            now
        } else {
            now + MEET_DELAY
        };
        for when in self.to_meet.values_mut() {
            *when = at;
        }
        self.meet_due(now).await
    }

    /// Offers to those of `to_meet` due by `now` who are still listed and
    /// still have no link (none while our `moved` waits for answers).
    async fn meet_due(&mut self, now: Instant) -> Result<(), PeerError> {
        if self.moving.is_some() {
            return Ok(());
        }
        for id in take_due(&mut self.to_meet, now) {
            let Some(name) = self.members.get(&id).cloned() else {
                continue;
            };
            if !self.links.contains_key(&id) {
                self.offer_to(id, name).await?;
            }
        }
        Ok(())
    }

    /// The peer of the link `old` says it is back with the server as
    /// `new`: the link goes by that from now on, and says it is kept.
    /// Only a peer the server no longer lists under its old id can have
    /// moved: one still listed cannot take another's id.
    async fn peer_moved(&mut self, old: &str, new: String) -> Result<bool, PeerError> {
        if self.members.contains_key(old) {
            tracing::warn!(peer = %old, "says it moved to {new}, but the server still lists it: ignored");
            return Ok(false);
        }
        if old != new && self.links.contains_key(&new) {
            tracing::warn!(peer = %old, "says it moved to {new}, which another link has: ignored");
            return Ok(false);
        }
        let Some((name, mut link)) = self.links.remove(old) else {
            return Ok(false);
        };
        self.awaiting_move.remove(old);
        if let Some(moving) = &mut self.moving
            && moving.asked.remove(old)
        {
            moving.asked.insert(new.clone());
        }
        if let Err(e) = link.send(&ChannelMessage::MovedAck { id: new.clone() }) {
            tracing::debug!(peer = %new, "could not answer its moved: {e}");
        }
        self.links.insert(new.clone(), (name, link));
        for (channel, saving) in self.take_saving(old) {
            self.saving.insert((new.clone(), channel), saving);
        }
        self.flush(&new).await?;
        Ok(true)
    }

    async fn on_server_text(&mut self, text: &str) -> Result<(), PeerError> {
        let message = match decode_server(text) {
            Ok(message) => message,
            Err(e) => {
                tracing::warn!("{e}");
                return Ok(());
            }
        };
        match message {
            Received::Welcome {
                id,
                peers,
                resume,
                resumed,
                ice_servers,
                ..
            } => {
                self.resume = Some(resume);
                self.rejoined(id, peers, resumed, &ice_servers).await?;
            }
            Received::PeerJoined { peer } => {
                self.members.insert(peer.id.clone(), peer.name.clone());
                if !self.watching {
                    let state = self.state().encode();
                    self.send_json(&json!({"type": "signal", "to": peer.id, "data": state}))
                        .await;
                }
                self.emit(PeerEvent::PeerJoined {
                    id: peer.id,
                    name: peer.name,
                    watching: peer.watching,
                });
            }
            Received::PeerLeft { id } => {
                let name = self.members.remove(&id).unwrap_or_default();
                self.drop_link(&id);
                self.emit(PeerEvent::PeerLeft { id, name });
            }
            Received::Signal { from, data } => self.on_signal(from, &data).await?,
            Received::Error { code, message } => {
                self.emit(PeerEvent::ServerError { code, message });
            }
            _ => {}
        }
        Ok(())
    }

    async fn on_signal(&mut self, from: String, data: &Value) -> Result<(), PeerError> {
        let Some(name) = self.members.get(&from).cloned() else {
            return Ok(());
        };
        let signal = match Signal::decode(data) {
            Ok(signal) => signal,
            Err(e) => {
                tracing::warn!(peer = %from, "ignoring a signal: {e}");
                return Ok(());
            }
        };
        let new = !self.links.contains_key(&from);
        if new {
            // Others start their connection to us with an offer; until
            // it comes there is nothing to apply the rest to.
            if !matches!(
                signal,
                Signal::Description {
                    kind: SdpKind::Offer,
                    ..
                }
            ) {
                return Ok(());
            }
            let link = self.new_link(&from)?;
            self.links.insert(from.clone(), (name, link));
        }
        if let Some((_, link)) = self.links.get_mut(&from)
            && let Err(e) = link.handle_signal(signal)
        {
            tracing::warn!(peer = %from, "ignoring a signal: {e}");
            if new {
                // An offer we cannot take starts nothing.
                self.links.remove(&from);
                return Ok(());
            }
        }
        self.flush(&from).await
    }

    /// What the TURN server sent: relayed data for the links, or its own
    /// answers to the client.
    async fn on_relayed(&mut self, datagram: &[u8]) -> Result<(), PeerError> {
        let Some(relay) = &mut self.relay else {
            return Ok(());
        };
        let data = relay.handle_input(datagram);
        let relayed = relay.relayed;
        relay.flush().await;
        for (peer, bytes) in data {
            self.on_datagram(peer, relayed, &bytes).await?;
        }
        Ok(())
    }

    /// A datagram from `source` to our `destination`: the host socket's
    /// address, or the relayed one.
    async fn on_datagram(
        &mut self,
        source: SocketAddr,
        destination: SocketAddr,
        contents: &[u8],
    ) -> Result<(), PeerError> {
        let now = Instant::now();
        let mut taker = None;
        for (id, (_, link)) in &mut self.links {
            match link.handle_datagram(now, source, destination, contents) {
                Ok(true) => {
                    taker = Some(id.clone());
                    break;
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(peer = %id, "connection failed: {e}");
                    link.close();
                    taker = Some(id.clone());
                    break;
                }
            }
        }
        match taker {
            Some(id) => self.flush(&id).await,
            None => Ok(()),
        }
    }

    async fn on_timeout(&mut self) -> Result<(), PeerError> {
        let now = Instant::now();
        if let Some(relay) = &mut self.relay
            && relay.timeout().is_some_and(|at| at <= now)
        {
            relay.handle_timeout();
            relay.flush().await;
        }
        if self.moving.as_ref().is_some_and(|m| m.until <= now) {
            self.moved_all().await?;
        }
        self.meet_due(now).await?;
        for id in take_due(&mut self.awaiting_move, now) {
            if !self.members.contains_key(&id) {
                tracing::info!(peer = %id, "did not come back after the restart: its connection goes");
                self.drop_link(&id);
            }
        }
        let due: Vec<String> = self
            .links
            .iter()
            .filter(|(_, (_, link))| link.timeout() <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            if let Some((_, link)) = self.links.get_mut(&id)
                && let Err(e) = link.handle_timeout(now)
            {
                tracing::warn!(peer = %id, "connection failed: {e}");
                link.close();
            }
            self.flush(&id).await?;
        }
        Ok(())
    }

    async fn chat(&mut self, text: &str, to: Option<&str>) -> Result<(), PeerError> {
        let message = match ChannelMessage::chat(text, to.is_some()) {
            Ok(message) => message,
            Err(e) => {
                self.emit(PeerEvent::NotSent {
                    to: to.unwrap_or("everyone").to_owned(),
                    reason: e.to_string(),
                });
                return Ok(());
            }
        };
        let targets: Vec<String> = match to {
            Some(id) if self.links.contains_key(id) => vec![id.to_owned()],
            Some(id) => {
                self.emit(PeerEvent::NotSent {
                    to: id.to_owned(),
                    reason: "no connection to that peer".into(),
                });
                return Ok(());
            }
            None => self.links.keys().cloned().collect(),
        };
        for id in targets {
            if let Some((_, link)) = self.links.get_mut(&id)
                && let Err(e) = link.send(&message)
            {
                self.emit(PeerEvent::NotSent {
                    to: id.clone(),
                    reason: e.to_string(),
                });
            }
            self.flush(&id).await?;
        }
        Ok(())
    }

    /// A file offered on a link: saved if there is a folder for it,
    /// else declined.
    fn file_offered(&mut self, id: &str, name: &str, channel: ChannelId, offer: Offer) {
        let Some((_, link)) = self.links.get_mut(id) else {
            return;
        };
        let Some(dir) = &self.save_files else {
            if let Err(e) = link.decline_file(channel) {
                tracing::debug!(peer = %id, "declining a file: {e}");
            }
            self.emit(PeerEvent::FileDeclined {
                from: id.to_owned(),
                name: name.to_owned(),
                file: offer.name,
                size: offer.size,
            });
            return;
        };
        match Saving::create(dir, &offer.name) {
            Ok(saving) => {
                if let Err(e) = link.accept_file(channel) {
                    tracing::debug!(peer = %id, "accepting a file: {e}");
                }
                self.saving
                    .insert((id.to_owned(), channel), (offer, saving));
            }
            Err(e) => {
                let why = format!("cannot save it in {}: {e}", dir.display());
                self.file_failed(id, name, channel, offer, why);
            }
        }
    }

    /// Writes a file's bytes; true if that failed, and the sender is told.
    fn file_data(&mut self, id: &str, name: &str, channel: ChannelId, data: &[u8]) -> bool {
        let key = (id.to_owned(), channel);
        let Some((_, saving)) = self.saving.get_mut(&key) else {
            return false;
        };
        let Err(e) = saving.write(data) else {
            return false;
        };
        let Some((offer, saving)) = self.saving.remove(&key) else {
            return false;
        };
        let why = format!("cannot write {}: {e}", saving.path.display());
        saving.abort();
        self.file_failed(id, name, channel, offer, why);
        true
    }

    /// A file came whole: on disk, then the sender is told (the channel closes).
    fn file_ended(&mut self, id: &str, name: &str, channel: ChannelId) {
        let Some((offer, saving)) = self.saving.remove(&(id.to_owned(), channel)) else {
            return;
        };
        let path = saving.path.clone();
        match saving.finish() {
            Ok((path, size)) => {
                if let Some((_, link)) = self.links.get_mut(id)
                    && let Err(e) = link.file_kept(channel)
                {
                    tracing::debug!(peer = %id, "closing a file's channel: {e}");
                }
                tracing::info!(peer = %id, path = %path.display(), size, "saved a file");
                self.emit(PeerEvent::FileSaved {
                    from: id.to_owned(),
                    name: name.to_owned(),
                    file: offer.name,
                    size,
                    path,
                });
            }
            Err(e) => {
                let why = format!("cannot write {}: {e}", path.display());
                if let Err(e) = std::fs::remove_file(&path) {
                    tracing::warn!(path = %path.display(), "could not remove a file not saved whole: {e}");
                }
                self.file_failed(id, name, channel, offer, why);
            }
        }
    }

    /// A file cannot be kept: the sender is told so (not why), and the caller.
    fn file_failed(&mut self, id: &str, name: &str, channel: ChannelId, offer: Offer, why: String) {
        tracing::warn!(peer = %id, file = %offer.name, "a file was not saved: {why}");
        if let Some((_, link)) = self.links.get_mut(id)
            && let Err(e) = link.file_failed(channel)
        {
            tracing::debug!(peer = %id, "closing a file's channel: {e}");
        }
        self.emit(PeerEvent::FileFailed {
            from: id.to_owned(),
            name: name.to_owned(),
            file: offer.name,
            why,
        });
    }

    async fn leave(mut self) -> Result<Summary, PeerError> {
        let ids: Vec<String> = self.links.keys().cloned().collect();
        for id in ids {
            self.drop_link(&id);
        }
        if let Some(relay) = &mut self.relay {
            relay.release().await;
        }
        // `leave` and a close frame: the others know at once. Failing
        // here, the server sees a lost connection, which ends in a leave.
        if let Some(ws) = &mut self.ws {
            let _ = ws
                .send(Message::text(json!({"type": "leave"}).to_string()))
                .await;
            let _ = ws.close(None).await;
        }
        Ok(Summary { peers: self.gone })
    }

    /// The files being saved from the link `id`, taken out of `saving`.
    fn take_saving(&mut self, id: &str) -> Vec<(ChannelId, (Offer, Saving))> {
        let keys: Vec<_> = self
            .saving
            .keys()
            .filter(|(of, _)| of == id)
            .cloned()
            .collect();
        keys.into_iter()
            .filter_map(|key| self.saving.remove(&key).map(|saving| (key.1, saving)))
            .collect()
    }

    fn drop_link(&mut self, id: &str) {
        for (_, (_, saving)) in self.take_saving(id) {
            saving.abort();
        }
        if let Some((name, mut link)) = self.links.remove(id) {
            link.close();
            self.gone.push(PeerSummary {
                id: id.to_owned(),
                name,
                connected: link.is_connected(),
                media: link.media(),
                sent: link.frames_sent(),
            });
        }
    }

    /// Sends what a link left behind, and reports what happened to it.
    async fn flush(&mut self, id: &str) -> Result<(), PeerError> {
        let Some((name, link)) = self.links.get_mut(id) else {
            return Ok(());
        };
        let name = name.clone();
        let mut signals = Vec::new();
        while let Some(data) = link.poll_signal() {
            signals.push(data);
        }
        while let Some(transmit) = link.poll_transmit() {
            match &mut self.relay {
                Some(relay) if transmit.source == relay.relayed => {
                    relay.send(transmit.destination, &transmit.contents).await;
                }
                _ => {
                    if let Err(e) = self
                        .socket
                        .send_to(&transmit.contents, transmit.destination)
                        .await
                    {
                        // One unreachable candidate must not stop the others.
                        tracing::debug!(to = %transmit.destination, "sending failed: {e}");
                    }
                }
            }
        }
        let mut events = Vec::new();
        while let Some(event) = link.poll_event() {
            events.push(event);
        }
        let alive = link.is_alive();
        for data in signals {
            self.send_json(&json!({"type": "signal", "to": id, "data": data}))
                .await;
        }
        // The link's id: its peer's new one once it says it moved, for
        // what follows on the channel (ordered) to be told by it.
        let mut id = id.to_owned();
        let mut again = false;
        for event in events {
            match event {
                LinkEvent::Connected => self.emit(PeerEvent::Connected {
                    id: id.to_owned(),
                    name: name.clone(),
                }),
                LinkEvent::Disconnected => self.emit(PeerEvent::Disconnected {
                    id: id.to_owned(),
                    name: name.clone(),
                }),
                LinkEvent::Message(ChannelMessage::Chat { text, private }) => {
                    self.emit(PeerEvent::Chat {
                        from: id.to_owned(),
                        name: name.clone(),
                        text,
                        private,
                    })
                }
                LinkEvent::Message(ChannelMessage::Moved { id: new }) => {
                    if Box::pin(self.peer_moved(&id, new.clone())).await? {
                        id = new;
                    }
                }
                LinkEvent::Message(ChannelMessage::MovedAck { id: ours }) => {
                    if ours == self.id
                        && let Some(moving) = &mut self.moving
                    {
                        moving.answered.insert(id.to_owned());
                    }
                }
                LinkEvent::BadMessage(e) => {
                    tracing::warn!(peer = %id, "ignoring a chat channel message: {e}")
                }
                LinkEvent::FileOffered { channel, offer } => {
                    self.file_offered(&id, &name, channel, offer);
                    again = true;
                }
                LinkEvent::FileData { channel, data } => {
                    again |= self.file_data(&id, &name, channel, &data);
                }
                LinkEvent::FileEnded { channel } => {
                    self.file_ended(&id, &name, channel);
                    again = true;
                }
                LinkEvent::FileStopped { channel, why } => {
                    if let Some((offer, saving)) = self.saving.remove(&(id.clone(), channel)) {
                        saving.abort();
                        self.emit(PeerEvent::FileFailed {
                            from: id.clone(),
                            name: name.clone(),
                            file: offer.name,
                            why,
                        });
                    }
                }
                LinkEvent::ChatOpen | LinkEvent::Closed => {}
            }
        }
        // What the file events had the link say.
        if again {
            Box::pin(self.flush(&id)).await?;
        }
        if !alive {
            self.drop_link(&id);
        }
        if self
            .moving
            .as_ref()
            .is_some_and(|m| m.answered.len() == m.asked.len())
        {
            Box::pin(self.moved_all()).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn any_server_address_is_taken_or_refused_without_a_panic(server in "\\PC{0,80}") {
            let _ = websocket_url(&server);
        }

        #[test]
        fn any_http_address_becomes_its_websocket(host in "[a-z][a-z0-9.-]{0,30}", port: u16) {
            let url = websocket_url(&format!("http://{host}:{port}")).unwrap();
            prop_assert_eq!(url.to_string(), format!("ws://{host}:{port}/ws"));
        }
    }

    #[test]
    fn the_server_address_is_taken_as_people_write_it() {
        let url = |s| websocket_url(s).map(|u| u.to_string());
        assert_eq!(
            url("http://127.0.0.1:8080").unwrap(),
            "ws://127.0.0.1:8080/ws"
        );
        assert_eq!(
            url("http://127.0.0.1:8080/").unwrap(),
            "ws://127.0.0.1:8080/ws"
        );
        assert_eq!(url("ws://[::1]:8080/ws").unwrap(), "ws://[::1]:8080/ws");
        assert_eq!(
            url("https://call.example.org").unwrap(),
            "wss://call.example.org/ws"
        );
        assert!(matches!(
            url("127.0.0.1:8080"),
            Err(PeerError::BadServer(_))
        ));
        assert!(matches!(url("ftp://x"), Err(PeerError::BadServer(_))));
    }
}
