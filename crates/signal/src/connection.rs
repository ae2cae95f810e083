//! The WebSocket driver: one task per connection, from socket to hub.
//!
//! The task reads the socket and owns a queue of outgoing frames, bounded per
//! client and across all clients together. Inbound text frames are size-
//! and rate-checked, decoded, and applied to the hub under its lock;
//! everything the client is sent (hub frames, errors, pongs) goes through the
//! one queue, so replies keep their order. A writer future, polled beside the
//! reads, drains the queue and pings: a client that stops reading stalls only
//! the writer, so eviction, the heartbeat and shutdown still act at once.
//! Closing sends a close frame. A panic (a bug) ends only its connection,
//! whose peer leaves its room as on any disconnect.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use callisto_protocol::{ClientMessage, ErrorCode, IceServer, ServerMessage, decode_client};
use futures_util::stream::SplitSink;
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::hub::{Frame, Hub, Parked, PeerSink, Seat, SinkFull};
use crate::rate::{RateLimiter, Verdict};
use crate::remote::Remote;

/// The hub as shared by all connection tasks.
pub type SharedHub = Arc<Mutex<Hub<ChannelSink>>>;

/// Produces the `iceServers` for each `welcome` (fresh TURN credentials, say).
pub type IceServerSource = Arc<dyn Fn() -> Vec<IceServer> + Send + Sync>;

/// Whether a `join` may go ahead, given its `access` (none or an access
/// code); the client's address and the room are for the log of a refusal.
pub type AccessCheck = Arc<dyn Fn(Option<&str>, &Remote, &str) -> bool + Send + Sync>;

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
    /// Bytes queued for a client before it counts as not reading (one
    /// frame always fits into an empty queue). Without it, a room could park
    /// `send_queue` frames of `max_message_bytes` each (64 MiB by default)
    /// at a client that does not read.
    pub send_queue_bytes: usize,
    /// Bytes queued across all clients: shared by every connection.
    pub send_budget: Arc<SendBudget>,
    pub ice_servers: IceServerSource,
    /// How often a joined client gets fresh `iceServers` (`ice-servers`),
    /// if they carry credentials that expire: half their lifetime, so the
    /// ones it holds always have at least half of theirs left. Without
    /// this, a page that stays in a room longer than the credentials last
    /// can no longer reach TURN for a newcomer or an ICE restart.
    pub ice_renewal: Option<Duration>,
    /// Changes when the `iceServers` handed out before may soon be refused
    /// (another TURN secret signs): joined clients get fresh ones at once.
    pub ice_changes: Option<watch::Receiver<()>>,
    /// With `Some`, a `join` needs an `access` it accepts (access-denied
    /// otherwise): only people given a code can use the server, and with
    /// it the TURN credentials a `welcome` hands out.
    pub access: Option<AccessCheck>,
}

impl std::fmt::Debug for ConnectionConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionConfig")
            .field("max_message_bytes", &self.max_message_bytes)
            .field("heartbeat_timeout", &self.heartbeat_timeout)
            .field("rate_per_sec", &self.rate_per_sec)
            .field("rate_burst", &self.rate_burst)
            .field("send_queue", &self.send_queue)
            .field("send_queue_bytes", &self.send_queue_bytes)
            .field("send_budget", &self.send_budget)
            .field("ice_renewal", &self.ice_renewal)
            .field("access", &self.access.as_ref().map(|_| "codes"))
            .finish_non_exhaustive()
    }
}

/// The bytes waiting in every client's send queue together, and their
/// bound. The per-client bound stops one client that does not read; this
/// one stops many (10,000 connections at 1 MiB each would be 10 GiB).
/// Past it, a client that already has frames waiting is evicted rather than
/// queued more; a client whose queue is empty still gets its next frame, so
/// clients that keep up are served however much the others owe.
#[derive(Debug)]
pub struct SendBudget {
    queued: AtomicUsize,
    max: usize,
}

impl SendBudget {
    pub fn new(max_bytes: usize) -> Arc<Self> {
        Arc::new(SendBudget {
            queued: AtomicUsize::new(0),
            max: max_bytes,
        })
    }

    /// Bytes waiting now, across all clients.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }
}

/// The driver's [`PeerSink`]: a queue to the connection task, bounded in
/// frames and in bytes, and a token the hub cancels to evict.
#[derive(Clone)]
pub struct ChannelSink {
    tx: mpsc::Sender<Frame>,
    evicted: CancellationToken,
    /// Why the hub evicted it: the reason its close frame gives.
    eviction: Arc<std::sync::OnceLock<&'static str>>,
    /// Bytes in the queue: added by senders, taken off by the task.
    queued: Arc<AtomicUsize>,
    max_bytes: usize,
    budget: Arc<SendBudget>,
}

/// The receiving end of a client's queue. Frames still in it when it drops
/// are taken off the counts, so a closed connection owes nothing.
struct SendQueue {
    rx: mpsc::Receiver<Frame>,
    sink: ChannelSink,
}

impl SendQueue {
    async fn next(&mut self) -> Option<Frame> {
        let frame = self.rx.recv().await?;
        self.sink.taken(&frame);
        Some(frame)
    }

    fn try_next(&mut self) -> Option<Frame> {
        let frame = self.rx.try_recv().ok()?;
        self.sink.taken(&frame);
        Some(frame)
    }
}

impl Drop for SendQueue {
    fn drop(&mut self) {
        // Closed first, so that no sender adds a frame after the drain.
        self.rx.close();
        while self.try_next().is_some() {}
    }
}

impl ChannelSink {
    fn new(frames: usize, max_bytes: usize, budget: Arc<SendBudget>) -> (Self, SendQueue) {
        let (tx, rx) = mpsc::channel(frames.max(4));
        let sink = ChannelSink {
            tx,
            evicted: CancellationToken::new(),
            eviction: Arc::default(),
            queued: Arc::default(),
            max_bytes,
            budget,
        };
        let queue = SendQueue {
            rx,
            sink: sink.clone(),
        };
        (sink, queue)
    }

    /// Queues `frame` unless that would pass a bound.
    fn push(&self, frame: Frame) -> Result<(), SinkFull> {
        let len = frame.len();
        let before = self.queued.fetch_add(len, Ordering::Relaxed);
        let all_before = self.budget.queued.fetch_add(len, Ordering::Relaxed);
        let over = before + len > self.max_bytes || all_before + len > self.budget.max;
        if before > 0 && over {
            self.untake(len);
            return Err(SinkFull);
        }
        self.tx.try_send(frame).map_err(|_| {
            self.untake(len);
            SinkFull
        })
    }

    /// Accounts for a frame the task took off the queue.
    fn taken(&self, frame: &Frame) {
        self.untake(frame.len());
    }

    fn untake(&self, len: usize) {
        self.queued.fetch_sub(len, Ordering::Relaxed);
        self.budget.queued.fetch_sub(len, Ordering::Relaxed);
    }
}

impl PeerSink for ChannelSink {
    fn send(&self, frame: Frame) -> Result<(), SinkFull> {
        self.push(frame)
    }

    fn evict(&self, reason: &'static str) {
        let _ = self.eviction.set(reason);
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
const INTERNAL_ERROR: u16 = 1011;

/// How long a closing connection has to take what is still queued for it
/// (the error that explains the close, say), and then the close frame.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// Frames written before one flush: a fan-out burst goes out in a few
/// writes, not one per frame.
const FRAMES_PER_FLUSH: usize = 64;

type WsWriter = SplitSink<WebSocket, Message>;

/// Runs one client connection until it closes, times out, misbehaves past
/// the limits, or the server shuts down.
pub async fn handle_socket(
    socket: WebSocket,
    hub: SharedHub,
    cfg: Arc<ConnectionConfig>,
    shutdown: CancellationToken,
    remote: Remote,
) {
    metrics::gauge!("callisto_signaling_connections").increment(1.0);
    let (sink, mut queue) = ChannelSink::new(
        cfg.send_queue,
        cfg.send_queue_bytes,
        cfg.send_budget.clone(),
    );
    let mut conn = Conn {
        hub,
        cfg: cfg.clone(),
        sink: sink.clone(),
        seat: None,
        limiter: RateLimiter::new(
            cfg.rate_per_sec,
            cfg.rate_burst,
            cfg.rate_strikes,
            Instant::now().into_std(),
        ),
        remote,
    };
    let (mut ws_tx, mut ws_rx) = socket.split();
    let every = ping_interval(cfg.heartbeat_timeout);
    let finish = CancellationToken::new();
    let mut last_seen = Instant::now();
    let mut heartbeat = tokio::time::interval(every);
    heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
    heartbeat.tick().await;
    let mut ice_renewal = cfg.ice_renewal.map(|every| {
        let mut interval = tokio::time::interval_at(Instant::now() + every, every);
        interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
        interval
    });
    let mut ice_changes = cfg.ice_changes.clone();
    if let Some(changes) = ice_changes.as_mut() {
        // Only changes from now on: this client's credentials are new.
        changes.mark_unchanged();
    }

    // Made once, not per message: each `cancelled()` registers with its
    // token (the shutdown token is shared by every connection) and
    // deregisters when dropped.
    let shutting_down = shutdown.cancelled();
    let evicted = sink.evicted.cancelled();
    tokio::pin!(shutting_down, evicted);
    // Whether the connection was lost rather than closed (no close frame,
    // no leave): its place in the room is then kept for a resume.
    let mut lost = false;
    // Whether the server is shutting down: then nobody leaves. The others
    // are told nothing (no peer-left), so their calls, peer to peer, go
    // on while the server restarts, and each meets the others again under
    // new ids on the new one (docs/protocol.md, "A restart of the server").
    let mut shut_down = false;
    let closing = {
        let writer = write_queue(&mut ws_tx, &mut queue, every, &finish);
        tokio::pin!(writer);
        let served = AssertUnwindSafe(async {
            loop {
                tokio::select! {
                    _ = &mut shutting_down => {
                        shut_down = true;
                        break Some(Closing { code: GOING_AWAY, reason: "server shutting down" });
                    }
                    _ = &mut evicted => break Some(Closing {
                        code: POLICY,
                        reason: sink.eviction.get().copied().unwrap_or("evicted"),
                    }),
                    // It ends only when a write fails: the connection is gone.
                    _ = &mut writer => {
                        lost = true;
                        break None;
                    }
                    _ = heartbeat.tick() => {
                        if last_seen.elapsed() > cfg.heartbeat_timeout {
                            info!(%remote, peer = conn.peer_id(), "heartbeat timeout");
                            lost = true;
                            break Some(Closing { code: GOING_AWAY, reason: "heartbeat timeout" });
                        }
                    }
                    _ = tick_if_some(ice_renewal.as_mut()) => {
                        if let Some(closing) = conn.renew_ice_servers() {
                            break Some(closing);
                        }
                    }
                    () = changed_if_some(&mut ice_changes) => {
                        if let Some(closing) = conn.renew_ice_servers() {
                            break Some(closing);
                        }
                    }
                    incoming = ws_rx.next() => {
                        last_seen = Instant::now();
                        match incoming {
                            Some(Ok(Message::Close(_))) => break None,
                            None => {
                                lost = true;
                                break None;
                            }
                            Some(Err(e)) => {
                                // tungstenite reports frames over its size limit as errors.
                                if is_capacity_error(&e) {
                                    break conn.too_large();
                                }
                                debug!(%remote, error = %e, "websocket read error");
                                lost = true;
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
            }
        })
        .catch_unwind()
        .await;
        let (closing, panicked) = match served {
            Ok(closing) => (closing, false),
            // A bug's panic is the server's loss, not the client's: it may
            // resume on a new connection.
            Err(_) => {
                // The panic itself was logged by the panic hook.
                error!(%remote, peer = conn.peer_id(), "signaling connection closed: a bug cut it short (report the panic above)");
                (
                    Some(Closing {
                        code: INTERNAL_ERROR,
                        reason: "server error",
                    }),
                    true,
                )
            }
        };
        if shut_down {
            // The place goes with the process.
        } else if lost || panicked {
            conn.park();
        } else {
            conn.leave("disconnected");
        }
        // Flush what is already queued (an error explaining the close,
        // say), unless the client was evicted for not reading it, or the
        // writer may be what panicked.
        if closing.is_some() && !panicked && !sink.evicted.is_cancelled() {
            finish.cancel();
            let _ = tokio::time::timeout(CLOSE_WAIT, writer).await;
        }
        closing
    };
    drop(queue);
    if let Some(Closing { code, reason }) = closing
        && let Ok(mut socket) = ws_tx.reunite(ws_rx)
    {
        close_gracefully(&mut socket, code, reason).await;
    }
    metrics::gauge!("callisto_signaling_connections").decrement(1.0);
}

/// How often lost connections' places are checked for expiry: a place is
/// given up at most this much after its grace.
const EXPIRY_CHECK: Duration = Duration::from_millis(500);

/// Gives up the places of lost connections that did not resume in time
/// (the others get `peer-left`). Runs until the process ends.
pub async fn expire_lost_places(hub: SharedHub) {
    let mut every = tokio::time::interval(EXPIRY_CHECK);
    every.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        hub.lock()
            .unwrap_or_else(|p| p.into_inner())
            .expire(Instant::now().into_std());
    }
}

/// Writes queued frames and pings until a write fails, or until `finish`
/// is cancelled and the queue is empty.
async fn write_queue(
    ws: &mut WsWriter,
    queue: &mut SendQueue,
    ping_every: Duration,
    finish: &CancellationToken,
) {
    let mut ping = tokio::time::interval(ping_every);
    ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
    ping.tick().await;
    let finished = finish.cancelled();
    tokio::pin!(finished);
    loop {
        let written = tokio::select! {
            // Frames first: `finish` ends the loop only once they are out.
            biased;
            Some(frame) = queue.next() => write_frames(ws, queue, frame).await,
            _ = &mut finished => return,
            _ = ping.tick() => ws.send(Message::Ping(Default::default())).await,
        };
        if written.is_err() {
            return;
        }
    }
}

/// Writes `first` and whatever else is waiting (up to a bound), then flushes.
async fn write_frames(
    ws: &mut WsWriter,
    queue: &mut SendQueue,
    first: Frame,
) -> Result<(), axum::Error> {
    ws.feed(Message::Text(text_frame(first))).await?;
    for _ in 1..FRAMES_PER_FLUSH {
        let Some(frame) = queue.try_next() else { break };
        ws.feed(Message::Text(text_frame(frame))).await?;
    }
    ws.flush().await
}

/// The next tick of `interval`; never, without one.
async fn tick_if_some(interval: Option<&mut tokio::time::Interval>) {
    match interval {
        Some(interval) => {
            interval.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// The next change to `changes`; never, without one or once its sender
/// is gone (then it is dropped).
async fn changed_if_some(changes: &mut Option<watch::Receiver<()>>) {
    if let Some(rx) = changes.as_mut()
        && rx.changed().await.is_ok()
    {
        return;
    }
    *changes = None;
    std::future::pending().await
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
    if tokio::time::timeout(CLOSE_WAIT, socket.send(Message::Close(Some(frame))))
        .await
        .is_err()
    {
        return;
    }
    let _ = tokio::time::timeout(CLOSE_WAIT, async {
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
    /// Its place in a room, once joined.
    seat: Option<Seat>,
    limiter: RateLimiter,
    remote: Remote,
}

impl Conn {
    fn peer_id(&self) -> &str {
        self.seat.as_ref().map_or("-", |s| s.id.as_str())
    }

    fn hub(&self) -> std::sync::MutexGuard<'_, Hub<ChannelSink>> {
        // No hub operation panics midway; recovering from a poisoned lock
        // keeps one bug from taking every room down.
        self.hub.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn on_text(&mut self, text: &str) -> Option<Closing> {
        #[cfg(test)]
        if text == tests::PANIC_TRIGGER {
            panic!("the test's message");
        }
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
            ClientMessage::Join {
                room,
                name,
                resume,
                access,
                watching,
            } => self.join(&room, &name, watching, resume.as_deref(), access.as_deref()),
            ClientMessage::Signal { to, data } => match &self.seat {
                Some(seat) => self.hub().signal(&seat.id, &to, data),
                None => Err(ErrorCode::NotJoined),
            },
            ClientMessage::Broadcast { data } => match &self.seat {
                Some(seat) => self.hub().broadcast(&seat.id, data),
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
            ClientMessage::Lock {
                locked,
                open_to_audience,
            } => match &self.seat {
                Some(seat) => {
                    let done = self.hub().lock(&seat.id, locked, open_to_audience);
                    if done.is_ok() {
                        info!(remote = %self.remote, room = %seat.room, peer = %seat.id, locked, open_to_audience, "room lock changed");
                    }
                    done
                }
                None => Err(ErrorCode::NotJoined),
            },
            ClientMessage::Admit { id } => self.answer_knock(&id, true),
            ClientMessage::Deny { id } => self.answer_knock(&id, false),
        };
        match result {
            Ok(()) => None,
            Err(code) => self.reply_error(code, explain(code)),
        }
    }

    fn join(
        &mut self,
        room: &str,
        name: &str,
        watching: bool,
        resume: Option<&str>,
        access: Option<&str>,
    ) -> Result<(), ErrorCode> {
        if let Some(seat) = &self.seat {
            // Turned away from a locked room, it may knock again.
            if self.hub().has(seat) {
                return Err(ErrorCode::AlreadyJoined);
            }
            self.seat = None;
        }
        if let Some(check) = &self.cfg.access
            && !check(access, &self.remote, room)
        {
            return Err(ErrorCode::AccessDenied);
        }
        let ice = (self.cfg.ice_servers)();
        let seat = self
            .hub()
            .join(room, name, watching, resume, self.sink.clone(), &ice)?;
        if seat.resumed {
            info!(remote = %self.remote, room, peer = %seat.id, "resumed");
        } else if seat.waiting {
            info!(remote = %self.remote, room, peer = %seat.id, watching, "knocking on a locked room");
        } else {
            info!(remote = %self.remote, room, peer = %seat.id, watching, "joined");
        }
        self.seat = Some(seat);
        Ok(())
    }

    /// Lets in (`admit`) or turns away someone knocking on our room.
    fn answer_knock(&self, knocker: &str, admit: bool) -> Result<(), ErrorCode> {
        let seat = self.seat.as_ref().ok_or(ErrorCode::NotJoined)?;
        let mut hub = self.hub();
        let done = if admit {
            hub.admit(&seat.id, knocker)
        } else {
            hub.deny(&seat.id, knocker)
        };
        if done.is_ok() {
            let what = if admit { "let in" } else { "turned away" };
            info!(remote = %self.remote, room = %seat.room, peer = %seat.id, %knocker, "{what}");
        }
        done
    }

    /// Sends a joined client fresh `iceServers`.
    fn renew_ice_servers(&mut self) -> Option<Closing> {
        let seat = self.seat.as_ref()?;
        // One knocking on a locked room gets no credentials until let in.
        if !self.hub().holds(seat) {
            return None;
        }
        let ice = (self.cfg.ice_servers)();
        debug!(remote = %self.remote, peer = self.peer_id(), "renewed the ICE servers' credentials");
        self.reply(Frame::new(&ServerMessage::IceServers { ice_servers: &ice }))
    }

    /// Leaves the room if in one; returns whether it was.
    fn leave(&mut self, why: &'static str) -> bool {
        let Some(seat) = self.seat.take() else {
            return false;
        };
        let was_in = self.hub().leave(&seat);
        if was_in {
            info!(remote = %self.remote, room = %seat.room, peer = %seat.id, why, "left");
        }
        // An evicted peer was already removed, but it was joined as far as
        // this connection knew.
        was_in || self.sink.evicted.is_cancelled()
    }

    /// The connection was lost: keeps its place for a resume (or, with
    /// no grace, leaves).
    fn park(&mut self) {
        let Some(seat) = self.seat.take() else {
            return;
        };
        let parked = self.hub().park(&seat, Instant::now().into_std());
        let (remote, room, peer) = (&self.remote, &seat.room, &seat.id);
        match parked {
            Parked::Kept => {
                info!(%remote, %room, %peer, "connection lost; its place is kept for a resume");
            }
            Parked::Left => info!(%remote, %room, %peer, why = "disconnected", "left"),
            Parked::NotHeld => {}
        }
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
        match self.sink.push(frame) {
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
        ErrorCode::AccessDenied => {
            "this server needs an access code to join: none or a wrong one was given"
        }
        ErrorCode::NotAdmitted => "someone in the room turned you away",
        ErrorCode::NotAllowed => "only those taking part, not those watching, decide who comes in",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use callisto_protocol::ServerMessage;

    /// A text frame that makes its connection panic, in these tests only.
    pub(super) const PANIC_TRIGGER: &str = "the test's panic";

    type Ws = tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >;

    /// A signaling server on loopback with a hub of `limits` (ids p1, p2,
    /// ...), and the lost places' expiry running; its WebSocket URL.
    async fn serve_hub(limits: crate::hub::HubLimits) -> (SharedHub, String) {
        use axum::extract::WebSocketUpgrade;

        let mut ids = 0;
        let hub: SharedHub = Arc::new(Mutex::new(Hub::new(limits, move || {
            ids += 1;
            format!("p{ids}")
        })));
        let cfg = Arc::new(ConnectionConfig {
            max_message_bytes: 1 << 16,
            heartbeat_timeout: Duration::from_secs(30),
            rate_per_sec: 100,
            rate_burst: 100,
            rate_strikes: 20,
            send_queue: 64,
            send_queue_bytes: 1 << 20,
            send_budget: unbounded(),
            ice_servers: Arc::new(Vec::new),
            ice_renewal: None,
            ice_changes: None,
            access: None,
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = hub.clone();
        let app = axum::Router::new().route(
            "/ws",
            axum::routing::get(move |ws: WebSocketUpgrade| async move {
                ws.on_upgrade(move |socket| {
                    handle_socket(
                        socket,
                        shared,
                        cfg,
                        CancellationToken::new(),
                        Remote::Direct(addr),
                    )
                })
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        tokio::spawn(expire_lost_places(hub.clone()));
        (hub, format!("ws://{addr}/ws"))
    }

    async fn connect(url: &str) -> Ws {
        tokio_tungstenite::connect_async(url).await.unwrap().0
    }

    async fn send(ws: &mut Ws, text: &str) {
        use tokio_tungstenite::tungstenite::Message as WsMessage;
        ws.send(WsMessage::text(text)).await.unwrap();
    }

    /// The next JSON message of `type`, skipping others.
    async fn next_of(ws: &mut Ws, kind: &str) -> serde_json::Value {
        use tokio_tungstenite::tungstenite::Message as WsMessage;
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
                .await
                .expect("a message in time")
                .expect("open")
                .expect("no error");
            if let WsMessage::Text(t) = msg {
                let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap();
                if v["type"] == kind {
                    return v;
                }
            }
        }
    }

    /// The code and reason of the close frame that ends `ws`, skipping
    /// what comes before it.
    async fn close_of(ws: &mut Ws) -> (u16, String) {
        use tokio_tungstenite::tungstenite::Message as WsMessage;
        loop {
            match tokio::time::timeout(Duration::from_secs(10), ws.next())
                .await
                .expect("closed in time")
            {
                Some(Ok(WsMessage::Close(frame))) => {
                    let frame = frame.expect("a close frame");
                    return (u16::from(frame.code), frame.reason.to_string());
                }
                Some(Ok(_)) => {}
                other => panic!("no close frame: {other:?}"),
            }
        }
    }

    /// Whatever JSON messages arrive within `wait`.
    async fn messages_within(ws: &mut Ws, wait: Duration) -> Vec<serde_json::Value> {
        use tokio_tungstenite::tungstenite::Message as WsMessage;
        let mut got = Vec::new();
        while let Ok(Some(Ok(msg))) = tokio::time::timeout(wait, ws.next()).await {
            if let WsMessage::Text(t) = msg {
                got.push(serde_json::from_str(t.as_str()).unwrap());
            }
        }
        got
    }

    const JOIN: &str = r#"{"type":"join","room":"r","name":"n"}"#;

    fn resume_join(token: &serde_json::Value) -> String {
        serde_json::json!({"type": "join", "room": "r", "name": "n", "resume": token}).to_string()
    }

    /// A panic (a bug) closes its connection with 1011; the others are
    /// served on, and the client resumes its place on a new connection,
    /// as from any lost connection: same id, and the others see no
    /// `peer-left`.
    #[tokio::test]
    async fn a_panic_ends_only_its_connection_which_resumes_its_place() {
        use tokio_tungstenite::tungstenite::Message as WsMessage;

        let (hub, url) = serve_hub(crate::hub::HubLimits::new(8, 8)).await;
        let (mut a, mut b) = (connect(&url).await, connect(&url).await);
        send(&mut a, JOIN).await;
        let welcome = next_of(&mut a, "welcome").await;
        send(&mut b, JOIN).await;
        next_of(&mut b, "welcome").await;

        a.send(WsMessage::text(PANIC_TRIGGER)).await.unwrap();
        assert_eq!(
            close_of(&mut a).await,
            (INTERNAL_ERROR, "server error".into())
        );
        send(&mut b, r#"{"type":"ping"}"#).await;
        next_of(&mut b, "pong").await;
        assert_eq!(hub.lock().unwrap().stats().away, 1);

        let mut a = connect(&url).await;
        send(&mut a, &resume_join(&welcome["resume"])).await;
        let again = next_of(&mut a, "welcome").await;
        assert_eq!(again["id"], welcome["id"]);
        assert_eq!(again["resumed"], true);
        let stats = hub.lock().unwrap_or_else(|p| p.into_inner()).stats();
        assert_eq!((stats.peers, stats.away, stats.rooms), (2, 0, 1));
        let seen = messages_within(&mut b, Duration::from_millis(300)).await;
        assert!(seen.iter().all(|m| m["type"] != "peer-left"), "{seen:?}");
    }

    /// A connection lost without a word (its TCP connection just ends)
    /// keeps its place: what others send meanwhile waits for it, and it
    /// comes after the resumed `welcome`, which lists the room as it is
    /// now. A connection that does not come back within the grace is
    /// gone for the others; its token then joins as new. A client that
    /// closes its WebSocket leaves at once.
    #[tokio::test]
    async fn a_lost_connection_resumes_within_the_grace_and_leaves_after_it() {
        let limits = crate::hub::HubLimits {
            resume_grace: Duration::from_millis(700),
            ..crate::hub::HubLimits::new(8, 8)
        };
        let (hub, url) = serve_hub(limits).await;
        let (mut a, mut b) = (connect(&url).await, connect(&url).await);
        send(&mut a, JOIN).await;
        let welcome = next_of(&mut a, "welcome").await;
        let a_id = welcome["id"].as_str().unwrap().to_owned();
        send(&mut b, JOIN).await;
        let b_id = next_of(&mut b, "welcome").await["id"].clone();

        // Lost: the socket is dropped with no close frame.
        drop(a);
        tokio::time::sleep(Duration::from_millis(100)).await;
        send(
            &mut b,
            &format!(r#"{{"type":"signal","to":"{a_id}","data":{{"n":1}}}}"#),
        )
        .await;
        send(&mut b, r#"{"type":"broadcast","data":{"n":2}}"#).await;
        let mut c = connect(&url).await;
        send(&mut c, JOIN).await;
        let c_id = next_of(&mut c, "welcome").await["id"].clone();

        let mut a = connect(&url).await;
        send(&mut a, &resume_join(&welcome["resume"])).await;
        let got = messages_within(&mut a, Duration::from_millis(300)).await;
        assert_eq!(got[0]["type"], "welcome");
        assert_eq!(got[0]["id"], a_id.as_str());
        assert_eq!(got[0]["resumed"], true);
        assert_eq!(
            got[0]["peers"],
            serde_json::json!([{"id": b_id, "name": "n"}, {"id": c_id, "name": "n"}]),
            "the room as it is now"
        );
        assert_eq!(
            got[1..],
            [
                serde_json::json!({"type": "signal", "from": b_id, "data": {"n": 1}}),
                serde_json::json!({"type": "broadcast", "from": b_id, "data": {"n": 2}}),
            ],
            "what waited, in order, and no peer-joined the welcome already told"
        );
        let seen = messages_within(&mut b, Duration::from_millis(100)).await;
        assert!(seen.iter().all(|m| m["type"] != "peer-left"), "{seen:?}");

        // Lost again, and not back in time.
        drop(a);
        assert_eq!(next_of(&mut b, "peer-left").await["id"], a_id.as_str());
        assert_eq!(next_of(&mut c, "peer-left").await["id"], a_id.as_str());
        let mut late = connect(&url).await;
        send(&mut late, &resume_join(&welcome["resume"])).await;
        let fresh = next_of(&mut late, "welcome").await;
        assert_ne!(fresh["id"], a_id.as_str());
        assert_eq!(fresh["resumed"], false);

        // A close frame is a leave: no grace.
        use tokio_tungstenite::tungstenite::Message as WsMessage;
        late.send(WsMessage::Close(None)).await.unwrap();
        assert_eq!(next_of(&mut b, "peer-left").await["id"], fresh["id"]);
        assert_eq!(hub.lock().unwrap().stats().away, 0);
    }

    /// A client that resumes before the server noticed its old connection
    /// was lost takes its place from it: the old connection is closed, and
    /// its end does not remove the place.
    #[tokio::test]
    async fn a_resume_takes_the_place_from_a_connection_not_yet_known_lost() {
        let (hub, url) = serve_hub(crate::hub::HubLimits::new(8, 8)).await;
        let (mut old, mut b) = (connect(&url).await, connect(&url).await);
        send(&mut old, JOIN).await;
        let welcome = next_of(&mut old, "welcome").await;
        send(&mut b, JOIN).await;
        next_of(&mut b, "welcome").await;

        let mut new = connect(&url).await;
        send(&mut new, &resume_join(&welcome["resume"])).await;
        assert_eq!(next_of(&mut new, "welcome").await["id"], welcome["id"]);
        assert_eq!(
            close_of(&mut old).await,
            (POLICY, "resumed on another connection".into())
        );
        let id = welcome["id"].as_str().unwrap();
        send(
            &mut b,
            &format!(r#"{{"type":"signal","to":"{id}","data":3}}"#),
        )
        .await;
        assert_eq!(next_of(&mut new, "signal").await["data"], 3);
        let seen = messages_within(&mut b, Duration::from_millis(300)).await;
        assert!(seen.iter().all(|m| m["type"] != "peer-left"), "{seen:?}");
        assert_eq!(hub.lock().unwrap().stats().peers, 2);
    }

    fn frame(bytes: usize) -> Frame {
        // A pong is 15 bytes; an error's message pads it to the size wanted.
        let message = "x".repeat(bytes.saturating_sub(48));
        Frame::new(&ServerMessage::Error {
            code: ErrorCode::BadMessage,
            message: &message,
        })
    }

    fn unbounded() -> Arc<SendBudget> {
        SendBudget::new(usize::MAX)
    }

    #[test]
    fn the_send_queue_is_bounded_in_bytes_as_well_as_frames() {
        let big = frame(600);
        let (sink, mut queue) = ChannelSink::new(8, 1000, unbounded());
        assert!(sink.push(big.clone()).is_ok());
        assert_eq!(sink.push(big.clone()), Err(SinkFull), "over the bytes");
        // Small frames still fit beside it.
        assert!(sink.push(frame(100)).is_ok());
        // Taking one off makes room again.
        assert!(queue.try_next().is_some());
        assert!(sink.push(big.clone()).is_ok());

        // One frame larger than the whole bound goes into an empty queue.
        let (sink, mut queue) = ChannelSink::new(8, 100, unbounded());
        assert!(sink.push(big.clone()).is_ok());
        assert_eq!(sink.push(frame(60)), Err(SinkFull));
        assert!(queue.try_next().is_some());
        assert!(sink.push(frame(60)).is_ok());

        // And the frame count still holds (the channel's least is 4).
        let (sink, _queue) = ChannelSink::new(4, usize::MAX, unbounded());
        for _ in 0..4 {
            assert!(sink.push(frame(60)).is_ok());
        }
        assert_eq!(sink.push(frame(60)), Err(SinkFull));
        assert_eq!(sink.queued.load(Ordering::Relaxed), 4 * frame(60).len());
    }

    #[test]
    fn the_bytes_waiting_across_all_clients_are_bounded() {
        let len = frame(300).len();
        let budget = SendBudget::new(4 * len);
        let (first, mut first_queue) = ChannelSink::new(64, usize::MAX, budget.clone());
        let (second, _second_queue) = ChannelSink::new(64, usize::MAX, budget.clone());
        let (third, _third_queue) = ChannelSink::new(64, usize::MAX, budget.clone());
        // Two frames each for the first two clients fill the budget.
        for sink in [&first, &second] {
            assert!(sink.push(frame(300)).is_ok());
            assert!(sink.push(frame(300)).is_ok());
        }
        assert_eq!(budget.queued(), 4 * len);
        // A client with a backlog gets no more...
        assert_eq!(first.push(frame(300)), Err(SinkFull));
        // ...but one whose queue is empty still gets its frame.
        assert!(third.push(frame(300)).is_ok());
        assert_eq!(third.push(frame(300)), Err(SinkFull));
        assert_eq!(budget.queued(), 5 * len);

        // Frames taken off, and frames left in a queue that is dropped,
        // are given back.
        assert!(first_queue.try_next().is_some());
        assert_eq!(budget.queued(), 4 * len);
        drop(first_queue);
        assert_eq!(budget.queued(), 3 * len);
        // A dropped queue takes no more frames, and owes none.
        assert_eq!(first.push(frame(300)), Err(SinkFull));
        assert_eq!(budget.queued(), 3 * len);
    }
}
