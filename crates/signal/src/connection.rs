//! The WebSocket driver: one task per connection, from socket to hub.
//!
//! The task owns the socket and a bounded queue of outgoing frames. Inbound
//! text frames are size- and rate-checked, decoded, and applied to the hub
//! under its lock; everything the client is sent (hub frames, errors,
//! pongs) goes through the one queue, so replies keep their order. The task
//! also sends WebSocket pings and drops a client that stays silent past the
//! heartbeat timeout, and closes with a close frame on shutdown.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use callisto_protocol::{ClientMessage, ErrorCode, IceServer, ServerMessage, decode_client};
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::hub::{Frame, Hub, PeerSink, SinkFull};
use crate::rate::{RateLimiter, Verdict};

/// The hub as shared by all connection tasks.
pub type SharedHub = Arc<Mutex<Hub<ChannelSink>>>;

/// Produces the `iceServers` for each `welcome` (fresh TURN credentials, say).
pub type IceServerSource = Arc<dyn Fn() -> Vec<IceServer> + Send + Sync>;

/// Per-connection limits and timers.
#[derive(Clone)]
pub struct ConnectionConfig {
    /// Largest accepted text frame; a larger one closes the connection.
    pub max_message_bytes: usize,
    /// A client silent for this long is dropped.
    pub heartbeat_timeout: Duration,
    /// Sustained messages per second allowed per connection.
    pub rate_per_sec: u32,
    /// Messages allowed in one burst.
    pub rate_burst: u32,
    /// Refused messages tolerated (one forgiven per second) before closing.
    pub rate_strikes: u32,
    /// Frames queued for a client before it counts as not reading.
    pub send_queue: usize,
    pub ice_servers: IceServerSource,
}

impl std::fmt::Debug for ConnectionConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionConfig")
            .field("max_message_bytes", &self.max_message_bytes)
            .field("heartbeat_timeout", &self.heartbeat_timeout)
            .field("rate_per_sec", &self.rate_per_sec)
            .field("rate_burst", &self.rate_burst)
            .finish_non_exhaustive()
    }
}

/// The driver's [`PeerSink`]: a bounded queue to the connection task, and a
/// token the hub cancels to evict.
#[derive(Clone)]
pub struct ChannelSink {
    tx: mpsc::Sender<Frame>,
    evicted: CancellationToken,
}

impl PeerSink for ChannelSink {
    fn send(&self, frame: Frame) -> Result<(), SinkFull> {
        self.tx.try_send(frame).map_err(|_| SinkFull)
    }

    fn evict(&self, _reason: &'static str) {
        self.evicted.cancel();
    }
}

/// Why the connection task is ending, and what close frame says so.
struct Closing {
    code: u16,
    reason: &'static str,
}

const GOING_AWAY: u16 = 1001;
const POLICY: u16 = 1008;
const TOO_BIG: u16 = 1009;

/// Runs one client connection until it closes, times out, misbehaves past
/// the limits, or the server shuts down.
pub async fn handle_socket(
    mut socket: WebSocket,
    hub: SharedHub,
    cfg: Arc<ConnectionConfig>,
    shutdown: CancellationToken,
    remote: SocketAddr,
) {
    metrics::gauge!("callisto_signaling_connections").increment(1.0);
    let (tx, mut rx) = mpsc::channel(cfg.send_queue.max(4));
    let sink = ChannelSink {
        tx,
        evicted: CancellationToken::new(),
    };
    let mut conn = Conn {
        hub,
        cfg: cfg.clone(),
        sink: sink.clone(),
        peer: None,
        room: String::new(),
        limiter: RateLimiter::new(
            cfg.rate_per_sec,
            cfg.rate_burst,
            cfg.rate_strikes,
            Instant::now().into_std(),
        ),
        remote,
    };
    let mut last_seen = Instant::now();
    let mut heartbeat = tokio::time::interval(ping_interval(cfg.heartbeat_timeout));
    heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
    heartbeat.tick().await;

    let closing: Option<Closing> = loop {
        tokio::select! {
            _ = shutdown.cancelled() => break Some(Closing { code: GOING_AWAY, reason: "server shutting down" }),
            _ = sink.evicted.cancelled() => break Some(Closing { code: POLICY, reason: "too slow: send queue full" }),
            Some(frame) = rx.recv() => {
                if socket.send(Message::Text(text_frame(frame))).await.is_err() {
                    break None;
                }
            }
            _ = heartbeat.tick() => {
                if last_seen.elapsed() > cfg.heartbeat_timeout {
                    info!(%remote, peer = conn.peer_id(), "heartbeat timeout");
                    break Some(Closing { code: GOING_AWAY, reason: "heartbeat timeout" });
                }
                if socket.send(Message::Ping(Default::default())).await.is_err() {
                    break None;
                }
            }
            incoming = socket.recv() => {
                last_seen = Instant::now();
                match incoming {
                    None | Some(Ok(Message::Close(_))) => break None,
                    Some(Err(e)) => {
                        // tungstenite reports frames over its size limit as errors.
                        if is_capacity_error(&e) {
                            break conn.too_large();
                        }
                        debug!(%remote, error = %e, "websocket read error");
                        break None;
                    }
                    Some(Ok(Message::Text(text))) => {
                        if let Some(closing) = conn.on_text(text.as_str()) {
                            break Some(closing);
                        }
                    }
                    Some(Ok(Message::Binary(_))) => {
                        if let Some(closing) = conn.reply_error(ErrorCode::BadMessage, "binary frames are not supported; send JSON text frames") {
                            break Some(closing);
                        }
                    }
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                }
            }
        }
    };

    conn.leave("disconnected");
    if let Some(Closing { code, reason }) = closing {
        // Flush what is already queued (an error explaining the close, say).
        while let Ok(frame) = rx.try_recv() {
            if socket.send(Message::Text(text_frame(frame))).await.is_err() {
                break;
            }
        }
        close_gracefully(&mut socket, code, reason).await;
    }
    metrics::gauge!("callisto_signaling_connections").decrement(1.0);
}

fn ping_interval(timeout: Duration) -> Duration {
    (timeout / 3).max(Duration::from_millis(100))
}

fn text_frame(frame: Frame) -> Utf8Bytes {
    Utf8Bytes::try_from(frame.into_bytes()).unwrap_or_default()
}

fn is_capacity_error(e: &axum::Error) -> bool {
    let text = e.to_string();
    text.contains("Space limit exceeded") || text.contains("too long") || text.contains("Capacity")
}

/// Sends a close frame and waits briefly for the client's answer, so the TCP
/// connection ends cleanly rather than with a reset.
async fn close_gracefully(socket: &mut WebSocket, code: u16, reason: &'static str) {
    let frame = CloseFrame {
        code,
        reason: Utf8Bytes::from_static(reason),
    };
    let wait = Duration::from_secs(2);
    if tokio::time::timeout(wait, socket.send(Message::Close(Some(frame))))
        .await
        .is_err()
    {
        return;
    }
    let _ = tokio::time::timeout(wait, async {
        while let Some(Ok(msg)) = socket.recv().await {
            if matches!(msg, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

/// The per-connection protocol state.
struct Conn {
    hub: SharedHub,
    cfg: Arc<ConnectionConfig>,
    sink: ChannelSink,
    peer: Option<String>,
    room: String,
    limiter: RateLimiter,
    remote: SocketAddr,
}

impl Conn {
    fn peer_id(&self) -> &str {
        self.peer.as_deref().unwrap_or("-")
    }

    fn hub(&self) -> std::sync::MutexGuard<'_, Hub<ChannelSink>> {
        // No hub operation panics midway; recovering from a poisoned lock
        // keeps one bug from taking every room down.
        self.hub.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn on_text(&mut self, text: &str) -> Option<Closing> {
        if text.len() > self.cfg.max_message_bytes {
            return self.too_large();
        }
        match self.limiter.check(Instant::now().into_std()) {
            Verdict::Allow => {}
            Verdict::Refuse => {
                return self.reply_error(ErrorCode::RateLimited, "too many messages; slow down");
            }
            Verdict::Disconnect => {
                warn!(remote = %self.remote, peer = self.peer_id(), "closing: rate limit exceeded persistently");
                self.reply_error(
                    ErrorCode::RateLimited,
                    "too many messages for too long; closing",
                );
                return Some(Closing {
                    code: POLICY,
                    reason: "rate-limited",
                });
            }
        }
        let msg = match decode_client(text) {
            Ok(msg) => msg,
            Err(e) => return self.reply_error(e.code, &e.message),
        };
        metrics::counter!("callisto_signaling_messages_received_total", "type" => msg.kind())
            .increment(1);
        let result = match msg {
            ClientMessage::Join { room, name } => self.join(&room, &name),
            ClientMessage::Signal { to, data } => match &self.peer {
                Some(id) => self.hub().signal(id, &to, data),
                None => Err(ErrorCode::NotJoined),
            },
            ClientMessage::Broadcast { data } => match &self.peer {
                Some(id) => self.hub().broadcast(id, data),
                None => Err(ErrorCode::NotJoined),
            },
            ClientMessage::Leave => {
                if self.leave("left") {
                    Ok(())
                } else {
                    Err(ErrorCode::NotJoined)
                }
            }
            ClientMessage::Ping => return self.reply(Frame::new(&ServerMessage::Pong)),
        };
        match result {
            Ok(()) => None,
            Err(code) => self.reply_error(code, explain(code)),
        }
    }

    fn join(&mut self, room: &str, name: &str) -> Result<(), ErrorCode> {
        if self.peer.is_some() {
            return Err(ErrorCode::AlreadyJoined);
        }
        let ice = (self.cfg.ice_servers)();
        let id = self.hub().join(room, name, self.sink.clone(), &ice)?;
        info!(remote = %self.remote, room, peer = %id, "joined");
        self.peer = Some(id);
        self.room = room.to_owned();
        Ok(())
    }

    /// Leaves the room if in one; returns whether it was.
    fn leave(&mut self, why: &'static str) -> bool {
        let Some(id) = self.peer.take() else {
            return false;
        };
        let was_in = self.hub().leave(&id);
        info!(remote = %self.remote, room = %self.room, peer = %id, why, "left");
        // An evicted peer was already removed, but it was joined as far as
        // this connection knew.
        was_in || self.sink.evicted.is_cancelled()
    }

    fn too_large(&mut self) -> Option<Closing> {
        warn!(remote = %self.remote, peer = self.peer_id(), limit = self.cfg.max_message_bytes, "closing: message too large");
        let msg = format!(
            "message larger than {} bytes; closing",
            self.cfg.max_message_bytes
        );
        self.reply_error(ErrorCode::TooLarge, &msg);
        Some(Closing {
            code: TOO_BIG,
            reason: "too-large",
        })
    }

    fn reply_error(&mut self, code: ErrorCode, message: &str) -> Option<Closing> {
        metrics::counter!("callisto_signaling_errors_total", "code" => code.as_str()).increment(1);
        debug!(remote = %self.remote, peer = self.peer_id(), %code, "refused a message");
        self.reply(Frame::new(&ServerMessage::Error { code, message }))
    }

    fn reply(&mut self, frame: Frame) -> Option<Closing> {
        match self.sink.tx.try_send(frame) {
            Ok(()) => None,
            Err(_) => Some(Closing {
                code: POLICY,
                reason: "too slow: send queue full",
            }),
        }
    }
}

fn explain(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::NotJoined => "join a room first",
        ErrorCode::AlreadyJoined => "already in a room; leave first",
        ErrorCode::UnknownPeer => "no such peer in your room",
        ErrorCode::RoomFull => "the room is full",
        ErrorCode::ServerFull => "the server has no room for another room",
        ErrorCode::BadMessage => "malformed message",
        ErrorCode::BadRoom => "bad room name",
        ErrorCode::BadName => "bad display name",
        ErrorCode::TooLarge => "message too large",
        ErrorCode::RateLimited => "too many messages",
    }
}
