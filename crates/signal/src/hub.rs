//! The sans-IO signaling core: rooms, presence and relay.
//!
//! The hub is a plain state machine. Each operation takes a decoded message
//! from one peer, changes the room state, and hands serialized frames to the
//! [`PeerSink`]s of the peers that must see them. Every operation runs under
//! one lock in the driver, so each peer observes joins and leaves in one
//! global order: a newcomer's `welcome` list plus the `peer-joined` messages
//! that follow it always add up to the room's exact membership.
//!
//! A sink that cannot take another frame (the peer's socket is not draining)
//! gets the peer evicted instead of the hub buffering without bound: the peer
//! is removed, the others see `peer-left`, and the sink is told to close.
//!
//! A peer whose connection was lost (not closed: no `leave`, no close frame)
//! keeps its place for [`HubLimits::resume_grace`]: a new connection that
//! brings the place's secret token takes it back, with the same id, and the
//! others notice nothing. Media flows between the browsers, not through
//! here, so a call survives a dropped WebSocket, a proxy's idle timeout or a
//! network change, instead of every peer connection being torn down and
//! negotiated again. What the others send it meanwhile waits, bounded.
//!
//! Anyone in a room may lock it. A newcomer to a locked room knocks: it
//! gets `waiting`, the room gets `knock`, and it waits, seen by nobody and
//! seeing nothing, until someone in the room admits it (`welcome`, and
//! `peer-joined` for the others) or turns it away (`not-admitted`). Those
//! knocking when the room is unlocked, or when everyone in it has left,
//! come in. A lost connection that resumes its place does not knock.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use callisto_protocol::{
    ErrorCode, IceServer, PROTOCOL_VERSION, PeerInfo, ServerMessage, validate_name, validate_room,
};
use serde_json::value::RawValue;

use crate::kept::{KeptPlace, KeptRoom, KeptRooms, Restored, is_hex, token_hash};

/// One serialized server message: UTF-8 JSON, cheap to clone for fan-out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame(Bytes);

impl Frame {
    pub fn new(msg: &ServerMessage<'_>) -> Self {
        metrics::counter!("callisto_signaling_messages_sent_total", "type" => msg.kind())
            .increment(1);
        Frame(Bytes::from(msg.to_json()))
    }

    /// Its size in bytes, as queued for a client.
    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    /// The JSON text of the frame.
    pub fn as_str(&self) -> &str {
        // Built only from `String`s in `new`, so always UTF-8.
        std::str::from_utf8(&self.0).unwrap_or("")
    }

    pub fn into_bytes(self) -> Bytes {
        self.0
    }
}

/// The sink could not take the frame: its queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SinkFull;

/// Where the hub puts frames for one peer; implemented by the driver with a
/// bounded channel to the peer's socket task.
pub trait PeerSink {
    /// Queues a frame without waiting.
    fn send(&self, frame: Frame) -> Result<(), SinkFull>;
    /// The hub took the peer's place from this sink (its queue overflowed,
    /// or another connection resumed the place); the driver should close
    /// the connection with this reason.
    fn evict(&self, reason: &'static str);
}

/// Limits the hub enforces.
#[derive(Debug, Clone, Copy)]
pub struct HubLimits {
    pub max_room_size: usize,
    pub max_rooms: usize,
    /// How long a lost connection's place is kept for it to resume; zero
    /// removes the peer at once, as an explicit leave does.
    pub resume_grace: Duration,
    /// Frames, and bytes, kept for a peer whose connection is lost; past
    /// either, its place is given up.
    pub away_frames: usize,
    pub away_bytes: usize,
    /// Bytes kept for all lost connections together: without it, a host
    /// that opens and drops connections, and sends to the places they
    /// leave, could hold `away_bytes` for each of thousands of them.
    pub away_bytes_total: usize,
}

impl HubLimits {
    /// `max_room_size` and `max_rooms` with the default resume settings.
    pub fn new(max_room_size: usize, max_rooms: usize) -> Self {
        HubLimits {
            max_room_size,
            max_rooms,
            resume_grace: DEFAULT_RESUME_GRACE,
            away_frames: 256,
            away_bytes: 256 * 1024,
            away_bytes_total: 64 << 20,
        }
    }
}

/// How long a lost connection's place is kept by default: long enough for
/// a network change, and for several of the web app's reconnection
/// attempts (0.5, 1.5 and 3.5 s after the loss, then every 2 s); short
/// enough that the others are not left looking at someone who is gone.
pub const DEFAULT_RESUME_GRACE: Duration = Duration::from_secs(15);

/// What [`Hub::park`] did with a lost connection's place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parked {
    /// Kept for a resume, until the grace ends.
    Kept,
    /// Given up at once: there is no grace.
    Left,
    /// Nothing: the seat was no longer the connection's.
    NotHeld,
}

/// A connection's hold on its place in a room: the peer id, and which
/// connection holds it, so that a lost connection that ends late cannot
/// remove the place another connection has resumed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seat {
    pub id: String,
    pub room: String,
    pub attachment: u64,
    /// Whether the place was resumed, not newly taken.
    pub resumed: bool,
    /// Whether the connection knocks on a locked room, not in it (yet):
    /// once admitted, the same seat holds its place in the room.
    pub waiting: bool,
}

/// Most who may knock on one locked room at once; more get `room-full`.
pub const MAX_WAITING: usize = 8;

/// A newcomer to a room, with what its `welcome` will need: knocking on
/// a locked room, or being seated.
struct Newcomer<S> {
    name: String,
    room: String,
    watching: bool,
    attachment: u64,
    sink: S,
    ice_servers: Vec<IceServer>,
}

/// A locked room's lobby.
#[derive(Debug, Default)]
struct Lock {
    /// Who knocks on it, in order.
    waiting: Vec<String>,
    /// Whether it lets in those who join to watch: only those who would
    /// take part knock (a broadcast's stage is closed, its audience open).
    open_to_audience: bool,
}

/// A snapshot for metrics and health checks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HubStats {
    pub peers: usize,
    /// Peers among them whose connection is lost, kept for a resume.
    pub away: usize,
    /// Peers among them who joined to watch.
    pub watching: usize,
    pub rooms: usize,
    /// The size of every room, in no particular order.
    pub room_sizes: Vec<usize>,
}

struct Peer<S> {
    name: String,
    room: String,
    /// Watches only: it sees, and is seen by, only those taking part.
    watching: bool,
    /// The hash of the secret that resumes this place (`welcome.resume`;
    /// [`token_hash`]): the key of `Hub::tokens`.
    token_hash: String,
    attachment: u64,
    link: Link<S>,
}

/// Where a peer's frames go.
enum Link<S> {
    Live(S),
    /// The connection is lost: what others send it (`signal`, `broadcast`)
    /// waits here, with its sender, until it resumes or `until` passes.
    /// Room changes are not kept: the resumed `welcome` lists the room.
    Away {
        until: Instant,
        missed: Vec<(Frame, String)>,
        bytes: usize,
    },
}

impl<S: PeerSink> Link<S> {
    /// Passes `frame` on, or keeps it if it came `from` a peer while the
    /// connection is away; `false` when it cannot be taken, and the peer
    /// must be evicted.
    /// `away_total` counts what all lost connections hold.
    fn take(
        &mut self,
        frame: &Frame,
        from: Option<&str>,
        limits: &HubLimits,
        away_total: &mut usize,
    ) -> bool {
        match self {
            Link::Live(sink) => sink.send(frame.clone()).is_ok(),
            Link::Away { missed, bytes, .. } => {
                let Some(from) = from else { return true };
                if missed.len() >= limits.away_frames
                    || *bytes + frame.len() > limits.away_bytes
                    || *away_total + frame.len() > limits.away_bytes_total
                {
                    return false;
                }
                *bytes += frame.len();
                *away_total += frame.len();
                missed.push((frame.clone(), from.to_owned()));
                true
            }
        }
    }
}

/// The rooms and the peers in them.
pub struct Hub<S> {
    limits: HubLimits,
    /// Peer ids in join order, per room.
    rooms: HashMap<String, Vec<String>>,
    peers: HashMap<String, Peer<S>>,
    /// Peer ids by the hash of their resume token.
    tokens: HashMap<String, String>,
    /// The locked rooms.
    locks: HashMap<String, Lock>,
    waiters: HashMap<String, Newcomer<S>>,
    /// Bytes kept for lost connections, all together.
    away_total: usize,
    /// Places of lost connections: with none, the expiry has nothing to
    /// look through.
    away_count: usize,
    attachments: u64,
    new_id: Box<dyn FnMut() -> String + Send>,
    evicted: Vec<String>,
}

/// Whether a peer sees another in its room (`welcome.peers`, `peer-joined`,
/// `peer-left`, their `broadcast`s and `signal`s), by whether each only
/// watches: those taking part see everyone, and those who watch see only
/// those taking part. So a broadcast's audience connect to its speakers
/// alone, not to each other, and do not learn who else watches.
fn sees(watching: bool, other_watching: bool) -> bool {
    !watching || !other_watching
}

/// An unguessable peer id: 128 random bits from the OS, as 32 hex digits.
pub fn random_peer_id() -> String {
    let mut bytes = [0u8; 16];
    // The OS random source failing is unrecoverable and not caused by input.
    getrandom::fill(&mut bytes).expect("the operating system's random source failed");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl<S: PeerSink> Hub<S> {
    /// A hub whose peer ids come from `new_id` (random in production,
    /// a counter in tests).
    pub fn new(limits: HubLimits, new_id: impl FnMut() -> String + Send + 'static) -> Self {
        Hub {
            limits,
            rooms: HashMap::new(),
            peers: HashMap::new(),
            tokens: HashMap::new(),
            locks: HashMap::new(),
            waiters: HashMap::new(),
            away_total: 0,
            away_count: 0,
            attachments: 0,
            new_id: Box::new(new_id),
            evicted: Vec::new(),
        }
    }

    /// Adds a peer to `room` (created on first join), sends it `welcome` and
    /// tells the others; `watching`, to watch (see [`sees`]). With the
    /// `resume` token of a place in that room, the new connection takes
    /// the place back instead (see the module documentation), in the role
    /// it had; an unknown or expired token joins as new.
    pub fn join(
        &mut self,
        room: &str,
        name: &str,
        watching: bool,
        resume: Option<&str>,
        sink: S,
        ice_servers: &[IceServer],
    ) -> Result<Seat, ErrorCode> {
        let sink = match resume {
            Some(token) => match self.resume(token, room, sink, ice_servers) {
                Ok(seat) => return Ok(seat),
                Err(sink) => sink,
            },
            None => sink,
        };
        let attachment = self.next_attachment();
        self.join_new(Newcomer {
            name: name.to_owned(),
            room: room.to_owned(),
            watching,
            attachment,
            sink,
            ice_servers: ice_servers.to_vec(),
        })
    }

    fn next_attachment(&mut self) -> u64 {
        self.attachments += 1;
        self.attachments
    }

    /// The others in `room` whom a peer (`watching` or not) sees, in
    /// join order, as `welcome` lists them.
    fn members_but(&self, room: &str, except: Option<&str>, watching: bool) -> Vec<PeerInfo> {
        self.rooms
            .get(room)
            .into_iter()
            .flatten()
            .filter(|pid| Some(pid.as_str()) != except)
            .filter_map(|pid| {
                self.peers
                    .get(pid)
                    .filter(|p| sees(watching, p.watching))
                    .map(|p| PeerInfo {
                        id: pid.clone(),
                        name: p.name.clone(),
                        watching: p.watching,
                    })
            })
            .collect()
    }

    /// Gives the place of `token` in `room` to a new connection's `sink`:
    /// `welcome` (resumed, listing the room as it is now), then what was
    /// kept for it from peers still there. A connection still holding the
    /// place (its loss not noticed yet) is closed. Gives the sink back if
    /// there is no such place.
    fn resume(
        &mut self,
        token: &str,
        room: &str,
        sink: S,
        ice_servers: &[IceServer],
    ) -> Result<Seat, S> {
        let place = self
            .tokens
            .get(&token_hash(token))
            .filter(|id| self.peers.get(id.as_str()).is_some_and(|p| p.room == room));
        let Some(id) = place.cloned() else {
            metrics::counter!("callisto_signaling_resumes_total", "result" => "unknown")
                .increment(1);
            return Err(sink);
        };
        let attachment = self.next_attachment();
        let watching = self.peers.get(&id).is_some_and(|p| p.watching);
        let peers = self.members_but(room, Some(&id), watching);
        let welcome = Frame::new(&ServerMessage::Welcome {
            id: &id,
            room,
            version: PROTOCOL_VERSION,
            peers,
            ice_servers,
            resume: token,
            resumed: true,
            locked: !watching && self.locks.contains_key(room),
            open_to_audience: !watching && self.open_to_audience(room),
            waiting: self.knocking(room, watching),
        });
        let Some(peer) = self.peers.get_mut(&id) else {
            return Err(sink);
        };
        let old = std::mem::replace(&mut peer.link, Link::Live(sink));
        peer.attachment = attachment;
        let mut ok = true;
        if let Link::Away { bytes, .. } = &old {
            self.away_total -= bytes;
            self.away_count -= 1;
        }
        if let Some(Link::Live(sink)) = self.peers.get(&id).map(|p| &p.link) {
            ok = sink.send(welcome).is_ok();
            match old {
                Link::Live(old) => old.evict("resumed on another connection"),
                Link::Away { missed, .. } => {
                    for (frame, from) in missed {
                        // From a peer that has left since: the welcome
                        // said it is gone.
                        if ok && self.peers.contains_key(&from) {
                            ok = sink.send(frame).is_ok();
                        }
                    }
                }
            }
        }
        metrics::counter!("callisto_signaling_resumes_total", "result" => "resumed").increment(1);
        if !ok {
            self.evicted.push(id.clone());
        }
        self.settle();
        Ok(Seat {
            id,
            room: room.to_owned(),
            attachment,
            resumed: true,
            waiting: false,
        })
    }

    /// Who knocks on `room`, in order, as `welcome.waiting` lists them:
    /// nobody to one who watches, who has no say in it.
    fn knocking(&self, room: &str, watching: bool) -> Vec<PeerInfo> {
        if watching {
            return Vec::new();
        }
        self.locks
            .get(room)
            .into_iter()
            .flat_map(|lock| &lock.waiting)
            .filter_map(|id| {
                self.waiters.get(id).map(|w| PeerInfo {
                    id: id.clone(),
                    name: w.name.clone(),
                    watching: w.watching,
                })
            })
            .collect()
    }

    /// A peer id no one has, in the room or knocking.
    fn fresh_id(&mut self) -> String {
        loop {
            let id = (self.new_id)();
            if !self.peers.contains_key(&id) && !self.waiters.contains_key(&id) {
                break id;
            }
        }
    }

    fn join_new(&mut self, newcomer: Newcomer<S>) -> Result<Seat, ErrorCode> {
        let members = self.rooms.get(&newcomer.room);
        match members {
            Some(m) if m.len() >= self.limits.max_room_size => return Err(ErrorCode::RoomFull),
            None if self.rooms.len() >= self.limits.max_rooms => {
                return Err(ErrorCode::ServerFull);
            }
            _ => {}
        }
        if self.locks.contains_key(&newcomer.room)
            && !(newcomer.watching && self.open_to_audience(&newcomer.room))
        {
            return self.knock(newcomer);
        }
        let id = self.fresh_id();
        let seat = Seat {
            id,
            room: newcomer.room.clone(),
            attachment: newcomer.attachment,
            resumed: false,
            waiting: false,
        };
        self.seat_new(&seat.id, newcomer);
        self.settle();
        Ok(seat)
    }

    /// Puts a newcomer knocking on locked `room` in its lobby, and tells
    /// the room.
    fn knock(&mut self, newcomer: Newcomer<S>) -> Result<Seat, ErrorCode> {
        let room = newcomer.room.clone();
        if self
            .locks
            .get(&room)
            .is_some_and(|lock| lock.waiting.len() >= MAX_WAITING)
        {
            return Err(ErrorCode::RoomFull);
        }
        let id = self.fresh_id();
        // A sink that cannot take its first frame is closing anyway.
        let _ = newcomer
            .sink
            .send(Frame::new(&ServerMessage::Waiting { room: &room }));
        let knock = Frame::new(&ServerMessage::Knock {
            peer: PeerInfo {
                id: id.clone(),
                name: newcomer.name.clone(),
                watching: newcomer.watching,
            },
        });
        self.fan_out(&room, None, &knock, None, false);
        self.locks
            .entry(room.clone())
            .or_default()
            .waiting
            .push(id.clone());
        let attachment = newcomer.attachment;
        self.waiters.insert(id.clone(), newcomer);
        metrics::counter!("callisto_signaling_knocks_total", "result" => "knocked").increment(1);
        self.settle();
        Ok(Seat {
            id,
            room,
            attachment,
            resumed: false,
            waiting: true,
        })
    }

    /// Takes a newcomer into its room (created if need be) with a fresh
    /// id: `welcome` for it, `peer-joined` for the others who see it.
    fn seat_new(&mut self, id: &str, newcomer: Newcomer<S>) {
        let Newcomer {
            name,
            room,
            watching,
            attachment,
            sink,
            ice_servers,
        } = newcomer;
        let token = random_peer_id();
        let welcome = Frame::new(&ServerMessage::Welcome {
            id,
            room: &room,
            version: PROTOCOL_VERSION,
            peers: self.members_but(&room, None, watching),
            ice_servers: &ice_servers,
            resume: &token,
            resumed: false,
            locked: !watching && self.locks.contains_key(&room),
            open_to_audience: !watching && self.open_to_audience(&room),
            waiting: self.knocking(&room, watching),
        });
        let joined = Frame::new(&ServerMessage::PeerJoined {
            peer: PeerInfo {
                id: id.to_owned(),
                name: name.clone(),
                watching,
            },
        });
        self.fan_out(&room, None, &joined, None, !watching);
        if sink.send(welcome).is_err() {
            self.evicted.push(id.to_owned());
        }
        let token_hash = token_hash(&token);
        self.tokens.insert(token_hash.clone(), id.to_owned());
        self.rooms
            .entry(room.clone())
            .or_default()
            .push(id.to_owned());
        self.peers.insert(
            id.to_owned(),
            Peer {
                name,
                room,
                watching,
                token_hash,
                attachment,
                link: Link::Live(sink),
            },
        );
    }

    /// Locks (or unlocks) the room of peer `by`, and tells everyone in
    /// it who takes part. Unlocking lets in whoever knocks; locking
    /// `open_to_audience` lets in whoever knocks to watch.
    pub fn lock(
        &mut self,
        by: &str,
        locked: bool,
        open_to_audience: bool,
    ) -> Result<(), ErrorCode> {
        let room = self.taking_part(by)?.room.clone();
        let open_to_audience = locked && open_to_audience;
        let frame = Frame::new(&ServerMessage::Locked {
            locked,
            by,
            open_to_audience,
        });
        self.fan_out(&room, None, &frame, None, false);
        if locked {
            let lock = self.locks.entry(room).or_default();
            lock.open_to_audience = open_to_audience;
            if open_to_audience {
                let watchers: Vec<String> = lock
                    .waiting
                    .iter()
                    .filter(|id| self.waiters.get(*id).is_some_and(|w| w.watching))
                    .cloned()
                    .collect();
                for id in watchers {
                    self.let_in(&id);
                }
            }
        } else if let Some(lock) = self.locks.remove(&room) {
            for id in lock.waiting {
                self.let_in(&id);
            }
        }
        self.settle();
        Ok(())
    }

    /// Whether `room` is locked but lets in those who join to watch.
    fn open_to_audience(&self, room: &str) -> bool {
        self.locks.get(room).is_some_and(|l| l.open_to_audience)
    }

    /// Lets `id`, knocking on the room of peer `by`, in.
    pub fn admit(&mut self, by: &str, id: &str) -> Result<(), ErrorCode> {
        self.check_knock(by, id)?;
        self.let_in(id);
        self.settle();
        Ok(())
    }

    /// Turns `id`, knocking on the room of peer `by`, away: it gets
    /// `not-admitted`, and may knock again.
    pub fn deny(&mut self, by: &str, id: &str) -> Result<(), ErrorCode> {
        self.check_knock(by, id)?;
        if let Some(waiter) = self.stop_knocking(id, false) {
            let _ = waiter.sink.send(Frame::new(&ServerMessage::Error {
                code: ErrorCode::NotAdmitted,
                message: "someone in the room turned you away",
            }));
            metrics::counter!("callisto_signaling_knocks_total", "result" => "denied").increment(1);
        }
        self.settle();
        Ok(())
    }

    /// Peer `by`, if it is in a room and takes part: one who watches has
    /// no say in who comes in.
    fn taking_part(&self, by: &str) -> Result<&Peer<S>, ErrorCode> {
        match self.peers.get(by) {
            None => Err(ErrorCode::NotJoined),
            Some(p) if p.watching => Err(ErrorCode::NotAllowed),
            Some(p) => Ok(p),
        }
    }

    /// Whether `by` takes part in a room that `id` knocks on.
    fn check_knock(&self, by: &str, id: &str) -> Result<(), ErrorCode> {
        let room = &self.taking_part(by)?.room;
        match self.waiters.get(id) {
            Some(w) if &w.room == room => Ok(()),
            _ => Err(ErrorCode::UnknownPeer),
        }
    }

    /// Takes `id` out of its room's lobby, and tells the room why
    /// (`admitted` or not).
    fn stop_knocking(&mut self, id: &str, admitted: bool) -> Option<Newcomer<S>> {
        let waiter = self.waiters.remove(id)?;
        if let Some(lock) = self.locks.get_mut(&waiter.room) {
            lock.waiting.retain(|w| w != id);
        }
        let ended = Frame::new(&ServerMessage::KnockEnded { id, admitted });
        self.fan_out(&waiter.room, None, &ended, None, false);
        Some(waiter)
    }

    /// Lets a waiter in, unless its room filled up meanwhile.
    fn let_in(&mut self, id: &str) {
        let full = self.waiters.get(id).is_some_and(|w| {
            self.rooms
                .get(&w.room)
                .is_some_and(|m| m.len() >= self.limits.max_room_size)
        });
        let Some(waiter) = self.stop_knocking(id, !full) else {
            return;
        };
        if full {
            let _ = waiter.sink.send(Frame::new(&ServerMessage::Error {
                code: ErrorCode::RoomFull,
                message: "the room filled up while you waited",
            }));
            return;
        }
        metrics::counter!("callisto_signaling_knocks_total", "result" => "admitted").increment(1);
        self.seat_new(id, waiter);
    }

    /// Whether `seat` is still its connection's: not evicted, resumed
    /// elsewhere, or expired (nor knocking).
    pub fn holds(&self, seat: &Seat) -> bool {
        self.peers
            .get(&seat.id)
            .is_some_and(|p| p.attachment == seat.attachment)
    }

    /// Whether `seat` still knocks on its room.
    fn knocks(&self, seat: &Seat) -> bool {
        self.waiters
            .get(&seat.id)
            .is_some_and(|w| w.attachment == seat.attachment)
    }

    /// Whether `seat` still holds a place in its room, or knocks on it:
    /// one turned away, evicted or resumed elsewhere may join again.
    pub fn has(&self, seat: &Seat) -> bool {
        self.holds(seat) || self.knocks(seat)
    }

    /// Removes a peer and tells the others. Returns `false` if the seat
    /// was no longer its connection's (already left, evicted, or resumed
    /// on another connection).
    pub fn leave(&mut self, seat: &Seat) -> bool {
        if self.knocks(seat) {
            self.stop_knocking(&seat.id, false);
            metrics::counter!("callisto_signaling_knocks_total", "result" => "withdrawn")
                .increment(1);
            self.settle();
            return true;
        }
        if !self.holds(seat) {
            return false;
        }
        let removed = self.remove(&seat.id);
        self.settle();
        removed
    }

    /// The connection of `seat` was lost: its place is kept until `now`
    /// plus the resume grace, for a new connection with its token. With
    /// no grace, this is [`Hub::leave`].
    pub fn park(&mut self, seat: &Seat, now: Instant) -> Parked {
        if self.knocks(seat) {
            // No place to keep: knocking again is as quick.
            self.leave(seat);
            return Parked::Left;
        }
        if !self.holds(seat) {
            return Parked::NotHeld;
        }
        if self.limits.resume_grace.is_zero() {
            self.leave(seat);
            return Parked::Left;
        }
        let until = now + self.limits.resume_grace;
        // No connection holds the place now; only its token takes it back.
        let attachment = self.next_attachment();
        if let Some(peer) = self.peers.get_mut(&seat.id) {
            self.away_count += 1;
            peer.attachment = attachment;
            peer.link = Link::Away {
                until,
                missed: Vec::new(),
                bytes: 0,
            };
        }
        Parked::Kept
    }

    /// Removes the peers whose connection was lost longer than the resume
    /// grace ago, and tells the others; returns how many.
    pub fn expire(&mut self, now: Instant) -> usize {
        if self.away_count == 0 {
            return 0;
        }
        let gone: Vec<String> = self
            .peers
            .iter()
            .filter(|(_, p)| matches!(p.link, Link::Away { until, .. } if until <= now))
            .map(|(id, _)| id.clone())
            .collect();
        for id in &gone {
            if let Some(peer) = self.peers.get(id) {
                tracing::info!(peer = %id, room = %peer.room, "left: lost connection not resumed in time");
            }
            self.remove(id);
        }
        self.settle();
        gone.len()
    }

    /// Every room's places and lock, to be restored by the next server
    /// (see [`crate::kept`]). Who knocks is not kept: their connections
    /// end with this server, and they knock again.
    pub fn keep(&self) -> KeptRooms {
        let mut rooms: Vec<KeptRoom> = self
            .rooms
            .iter()
            .map(|(room, ids)| KeptRoom {
                room: room.clone(),
                locked: self.locks.contains_key(room),
                open_to_audience: self.open_to_audience(room),
                places: ids
                    .iter()
                    .filter_map(|id| {
                        self.peers.get(id).map(|p| KeptPlace {
                            id: id.clone(),
                            name: p.name.clone(),
                            watching: p.watching,
                            token_hash: p.token_hash.clone(),
                        })
                    })
                    .collect(),
            })
            .collect();
        rooms.sort_by(|a, b| a.room.cmp(&b.room));
        KeptRooms { rooms }
    }

    /// Takes back what a server before this one kept: each place as a lost
    /// connection's, until `now` plus the resume grace, for its client to
    /// resume with its token. Places that are not well formed, are
    /// already taken, or would break a limit are skipped; a lock with no
    /// place left taking part in its room is dropped, as it would be.
    pub fn restore(&mut self, kept: KeptRooms, now: Instant) -> Restored {
        let mut restored = Restored::default();
        let until = now + self.limits.resume_grace;
        for room in kept.rooms {
            if validate_room(&room.room).is_err()
                || self.rooms.contains_key(&room.room)
                || self.rooms.len() >= self.limits.max_rooms
                || self.limits.resume_grace.is_zero()
            {
                restored.skipped += room.places.len();
                continue;
            }
            let mut ids = Vec::new();
            for place in room.places {
                let well_formed = is_hex(&place.id, 32)
                    && is_hex(&place.token_hash, 64)
                    && validate_name(&place.name) == Ok(place.name.as_str());
                if !well_formed
                    || ids.len() >= self.limits.max_room_size
                    || self.peers.contains_key(&place.id)
                    || self.tokens.contains_key(&place.token_hash)
                {
                    restored.skipped += 1;
                    continue;
                }
                let attachment = self.next_attachment();
                self.tokens
                    .insert(place.token_hash.clone(), place.id.clone());
                self.peers.insert(
                    place.id.clone(),
                    Peer {
                        name: place.name,
                        room: room.room.clone(),
                        watching: place.watching,
                        token_hash: place.token_hash,
                        attachment,
                        link: Link::Away {
                            until,
                            missed: Vec::new(),
                            bytes: 0,
                        },
                    },
                );
                self.away_count += 1;
                ids.push(place.id);
            }
            if ids.is_empty() {
                continue;
            }
            restored.rooms += 1;
            restored.places += ids.len();
            self.rooms.insert(room.room.clone(), ids);
            if room.locked && self.has_deciders(&room.room) {
                self.locks.insert(
                    room.room,
                    Lock {
                        waiting: Vec::new(),
                        open_to_audience: room.open_to_audience,
                    },
                );
            }
        }
        restored
    }

    /// Whether anyone in `room` takes part (rather than watches): someone
    /// with a say in who comes in.
    fn has_deciders(&self, room: &str) -> bool {
        self.rooms
            .get(room)
            .into_iter()
            .flatten()
            .any(|m| self.peers.get(m).is_some_and(|p| !p.watching))
    }

    /// Relays `data` from `from` to the peer `to` in the same room.
    /// Two who watch do not see each other: to one, the other is unknown.
    pub fn signal(&mut self, from: &str, to: &str, data: &RawValue) -> Result<(), ErrorCode> {
        let sender = self.peers.get(from).ok_or(ErrorCode::NotJoined)?;
        if to == from
            || self
                .peers
                .get(to)
                .is_none_or(|t| t.room != sender.room || !sees(sender.watching, t.watching))
        {
            return Err(ErrorCode::UnknownPeer);
        }
        let frame = Frame::new(&ServerMessage::Signal { from, data });
        if let Some(target) = self.peers.get_mut(to)
            && !target
                .link
                .take(&frame, Some(from), &self.limits, &mut self.away_total)
        {
            self.evicted.push(to.to_owned());
        }
        self.settle();
        Ok(())
    }

    /// Relays `data` from `from` to every other peer in its room who sees it.
    pub fn broadcast(&mut self, from: &str, data: &RawValue) -> Result<(), ErrorCode> {
        let sender = self.peers.get(from).ok_or(ErrorCode::NotJoined)?;
        let (room, to_watchers) = (sender.room.clone(), !sender.watching);
        let frame = Frame::new(&ServerMessage::Broadcast { from, data });
        self.fan_out(&room, Some(from), &frame, Some(from), to_watchers);
        self.settle();
        Ok(())
    }

    /// Whether `id` is currently in a room.
    pub fn contains(&self, id: &str) -> bool {
        self.peers.contains_key(id)
    }

    pub fn stats(&self) -> HubStats {
        HubStats {
            peers: self.peers.len(),
            away: self.away_count,
            watching: self.peers.values().filter(|p| p.watching).count(),
            rooms: self.rooms.len(),
            room_sizes: self.rooms.values().map(Vec::len).collect(),
        }
    }

    fn remove(&mut self, id: &str) -> bool {
        let Some(peer) = self.peers.remove(id) else {
            return false;
        };
        self.tokens.remove(&peer.token_hash);
        if let Link::Away { bytes, .. } = peer.link {
            self.away_total -= bytes;
            self.away_count -= 1;
        }
        if let Some(members) = self.rooms.get_mut(&peer.room) {
            members.retain(|m| m != id);
            if members.is_empty() {
                self.rooms.remove(&peer.room);
            }
        }
        let left = Frame::new(&ServerMessage::PeerLeft { id });
        self.fan_out(&peer.room, None, &left, None, !peer.watching);
        // Nobody is left to let them in, or to keep out of the room (those
        // who watch have no say): those knocking come in, to the room as
        // unlocked.
        if !self.has_deciders(&peer.room)
            && let Some(lock) = self.locks.remove(&peer.room)
        {
            for waiter in lock.waiting {
                self.let_in(&waiter);
            }
        }
        true
    }

    /// Sends `frame` to everyone in `room` but `except`, and but those who
    /// watch unless `to_watchers`; `from` is the peer whose message it
    /// relays, if any (see [`Link::take`]).
    fn fan_out(
        &mut self,
        room: &str,
        except: Option<&str>,
        frame: &Frame,
        from: Option<&str>,
        to_watchers: bool,
    ) {
        let Some(members) = self.rooms.get(room) else {
            return;
        };
        for member in members {
            if Some(member.as_str()) == except {
                continue;
            }
            if let Some(peer) = self.peers.get_mut(member)
                && (to_watchers || !peer.watching)
                && !peer
                    .link
                    .take(frame, from, &self.limits, &mut self.away_total)
            {
                self.evicted.push(member.clone());
            }
        }
    }

    /// Removes peers whose sinks overflowed; removing one can overflow
    /// another, so this loops until nothing is left.
    fn settle(&mut self) {
        while let Some(id) = self.evicted.pop() {
            match self.peers.get(&id).map(|p| (&p.link, &p.room)) {
                Some((Link::Live(sink), room)) => {
                    sink.evict("send queue full: the client is not reading");
                    tracing::warn!(peer = %id, %room, "evicted a peer whose send queue overflowed");
                    metrics::counter!("callisto_signaling_evictions_total").increment(1);
                }
                Some((Link::Away { .. }, room)) => {
                    tracing::info!(peer = %id, %room, "left: too much waited for a lost connection to resume");
                    metrics::counter!("callisto_signaling_evictions_total").increment(1);
                }
                None => {}
            }
            self.remove(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::rc::Rc;

    use serde_json::Value;

    use super::*;

    /// Records frames as parsed JSON; refuses past `capacity`.
    #[derive(Clone)]
    struct Recorder {
        frames: Rc<RefCell<Vec<Value>>>,
        evicted: Rc<RefCell<Option<&'static str>>>,
        capacity: usize,
    }

    impl Recorder {
        fn new(capacity: usize) -> Self {
            Recorder {
                frames: Rc::default(),
                evicted: Rc::default(),
                capacity,
            }
        }
        fn take(&self) -> Vec<Value> {
            std::mem::take(&mut *self.frames.borrow_mut())
        }
    }

    impl PeerSink for Recorder {
        fn send(&self, frame: Frame) -> Result<(), SinkFull> {
            let mut frames = self.frames.borrow_mut();
            if frames.len() >= self.capacity {
                return Err(SinkFull);
            }
            frames.push(serde_json::from_str(frame.as_str()).unwrap());
            Ok(())
        }
        fn evict(&self, reason: &'static str) {
            *self.evicted.borrow_mut() = Some(reason);
        }
    }

    fn hub(max_room_size: usize, max_rooms: usize) -> Hub<Recorder> {
        let mut n = 0;
        Hub::new(HubLimits::new(max_room_size, max_rooms), move || {
            n += 1;
            format!("p{n}")
        })
    }

    /// The types of the frames `r` took since last asked.
    fn types(r: &Recorder) -> Vec<String> {
        r.take()
            .iter()
            .map(|f| f["type"].as_str().unwrap().to_owned())
            .collect()
    }

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_owned()).unwrap()
    }

    #[test]
    fn join_signal_broadcast_leave() {
        let mut hub = hub(16, 10);
        let (a, b) = (Recorder::new(100), Recorder::new(100));
        let ice = [IceServer {
            urls: vec!["stun:example.org".into()],
            username: None,
            credential: None,
        }];
        let ida = hub.join("r", "Ada", false, None, a.clone(), &ice).unwrap();
        let welcome = &a.take()[0];
        assert_eq!(welcome["type"], "welcome");
        assert_eq!(welcome["id"], "p1");
        assert_eq!(welcome["peers"], serde_json::json!([]));
        assert_eq!(welcome["iceServers"][0]["urls"][0], "stun:example.org");

        let idb = hub.join("r", "Bob", false, None, b.clone(), &ice).unwrap();
        assert_eq!(
            b.take()[0]["peers"],
            serde_json::json!([{"id": "p1", "name": "Ada"}])
        );
        assert_eq!(
            a.take(),
            vec![serde_json::json!({"type": "peer-joined", "peer": {"id": "p2", "name": "Bob"}})]
        );

        hub.signal(&ida.id, &idb.id, &raw(r#"{"sdp":"x"}"#))
            .unwrap();
        assert_eq!(
            b.take(),
            vec![serde_json::json!({"type": "signal", "from": "p1", "data": {"sdp": "x"}})]
        );
        assert!(a.take().is_empty());

        hub.broadcast(&idb.id, &raw("[1]")).unwrap();
        assert_eq!(
            a.take(),
            vec![serde_json::json!({"type": "broadcast", "from": "p2", "data": [1]})]
        );
        assert!(
            b.take().is_empty(),
            "the sender does not get its own broadcast"
        );

        assert!(hub.leave(&ida));
        assert!(!hub.leave(&ida));
        assert_eq!(
            b.take(),
            vec![serde_json::json!({"type": "peer-left", "id": "p1"})]
        );
        assert_eq!(hub.stats().peers, 1);
        hub.leave(&idb);
        assert_eq!(hub.stats(), HubStats::default(), "empty rooms are dropped");
    }

    #[test]
    fn signal_errors() {
        let mut hub = hub(16, 10);
        let a = hub
            .join("r1", "A", false, None, Recorder::new(10), &[])
            .unwrap()
            .id;
        let b = hub
            .join("r2", "B", false, None, Recorder::new(10), &[])
            .unwrap()
            .id;
        let d = raw("1");
        assert_eq!(
            hub.signal(&a, &b, &d),
            Err(ErrorCode::UnknownPeer),
            "other room"
        );
        assert_eq!(hub.signal(&a, "nobody", &d), Err(ErrorCode::UnknownPeer));
        assert_eq!(hub.signal(&a, &a, &d), Err(ErrorCode::UnknownPeer), "self");
        assert_eq!(hub.signal("ghost", &a, &d), Err(ErrorCode::NotJoined));
        assert_eq!(hub.broadcast("ghost", &d), Err(ErrorCode::NotJoined));
    }

    #[test]
    fn room_full_and_server_full() {
        let mut hub = hub(2, 1);
        hub.join("r", "A", false, None, Recorder::new(10), &[])
            .unwrap();
        hub.join("r", "B", false, None, Recorder::new(10), &[])
            .unwrap();
        assert_eq!(
            hub.join("r", "C", false, None, Recorder::new(10), &[]),
            Err(ErrorCode::RoomFull)
        );
        assert_eq!(
            hub.join("other", "D", false, None, Recorder::new(10), &[]),
            Err(ErrorCode::ServerFull)
        );
        assert_eq!(hub.stats().peers, 2);
    }

    #[test]
    fn ids_never_collide() {
        let mut ids = vec!["same".to_string(), "same".into(), "other".into()].into_iter();
        let mut hub: Hub<Recorder> = Hub::new(HubLimits::new(9, 9), move || ids.next().unwrap());
        let a = hub
            .join("r", "A", false, None, Recorder::new(10), &[])
            .unwrap();
        let b = hub
            .join("r", "B", false, None, Recorder::new(10), &[])
            .unwrap();
        assert_ne!(a.id, b.id);
    }

    #[test]
    fn a_peer_that_does_not_read_is_evicted() {
        let mut hub = hub(16, 10);
        let slow = Recorder::new(3); // welcome, peer-joined, one more
        let fast = Recorder::new(100);
        let s = hub
            .join("r", "Slow", false, None, slow.clone(), &[])
            .unwrap()
            .id;
        let f = hub
            .join("r", "Fast", false, None, fast.clone(), &[])
            .unwrap()
            .id;
        fast.take();
        hub.broadcast(&f, &raw("1")).unwrap();
        assert!(hub.contains(&s));
        assert!(slow.evicted.borrow().is_none());
        assert_eq!(hub.signal(&f, &s, &raw("2")), Ok(()));
        assert!(!hub.contains(&s));
        assert!(slow.evicted.borrow().is_some());
        assert_eq!(
            fast.take(),
            vec![serde_json::json!({"type": "peer-left", "id": s})]
        );
    }

    /// A hub whose ids are 32 hex digits, as the server's are (restored
    /// places must have such ids).
    fn hex_hub(first: u128) -> Hub<Recorder> {
        let mut n = first;
        Hub::new(HubLimits::new(4, 10), move || {
            n += 1;
            format!("{n:032x}")
        })
    }

    /// A restart that keeps the rooms: every client takes its place back
    /// with its token, under its id, in its role; the room is still
    /// locked (and open to its audience), so a newcomer knocks; who
    /// knocked before knocks again; who does not come back is gone after
    /// the grace, and the lock with the last of those taking part.
    #[test]
    fn rooms_kept_across_a_restart_are_taken_back_by_token() {
        let t0 = Instant::now();
        let mut old = hex_hub(0);
        let (a, b, w, k) = (
            Recorder::new(100),
            Recorder::new(100),
            Recorder::new(100),
            Recorder::new(100),
        );
        let sa = old.join("r", "Alice", false, None, a.clone(), &[]).unwrap();
        let ta = a.take()[0]["resume"].as_str().unwrap().to_owned();
        let sb = old.join("r", "Bob", false, None, b.clone(), &[]).unwrap();
        let tb = b.take()[0]["resume"].as_str().unwrap().to_owned();
        old.lock(&sa.id, true, true).unwrap();
        let sw = old.join("r", "Vi", true, None, w.clone(), &[]).unwrap();
        let tw = w.take()[0]["resume"].as_str().unwrap().to_owned();
        assert!(!sw.waiting, "open to its audience");
        assert!(old.join("r", "Kim", false, None, k, &[]).unwrap().waiting);
        old.join("s", "Solo", false, None, Recorder::new(10), &[])
            .unwrap();

        // Through the file's JSON, with no token in it.
        let kept = old.keep();
        let text = serde_json::to_string(&kept).unwrap();
        for token in [&ta, &tb, &tw] {
            assert!(!text.contains(token.as_str()), "no token is kept");
        }
        let kept: KeptRooms = serde_json::from_str(&text).unwrap();
        assert_eq!(kept.rooms.len(), 2);
        assert_eq!(kept.rooms[0].places.len(), 3, "Kim, knocking, is not kept");

        let mut new = hex_hub(1000);
        assert_eq!(
            new.restore(kept.clone(), t0),
            Restored {
                rooms: 2,
                places: 4,
                skipped: 0
            }
        );
        assert_eq!(new.keep(), kept, "kept again as it came");
        assert_eq!(new.stats().away, 4);

        // Alice comes back: her place, her id, the room still locked and
        // open to its audience.
        let a2 = Recorder::new(100);
        let alice = new
            .join("r", "Alice", false, Some(&ta), a2.clone(), &[])
            .unwrap();
        assert_eq!((alice.id.as_str(), alice.resumed), (sa.id.as_str(), true));
        let welcome = &a2.take()[0];
        assert_eq!(welcome["locked"], true);
        assert_eq!(welcome["openToAudience"], true);
        assert_eq!(
            welcome["peers"],
            serde_json::json!([{"id": sb.id, "name": "Bob"}, {"id": sw.id, "name": "Vi", "watching": true}])
        );
        // Vi comes back watching; Kim knocks again, and Alice is told.
        let w2 = Recorder::new(100);
        let seat = new
            .join("r", "Vi", false, Some(&tw), w2.clone(), &[])
            .unwrap();
        assert_eq!((seat.id.as_str(), seat.resumed), (sw.id.as_str(), true));
        let k2 = Recorder::new(100);
        assert!(
            new.join("r", "Kim", false, None, k2.clone(), &[])
                .unwrap()
                .waiting
        );
        assert_eq!(types(&a2), ["knock"]);
        // A token of no kept place joins as new.
        let x = Recorder::new(100);
        let seat = new.join("s", "X", false, Some(&ta), x, &[]).unwrap();
        assert!(!seat.resumed);

        // Bob never comes back: gone after the grace; then Alice leaves,
        // the last one taking part, and Kim comes in to the room unlocked.
        assert_eq!(
            new.expire(t0 + DEFAULT_RESUME_GRACE),
            1 + 1,
            "Bob, and Solo"
        );
        assert!(!new.contains(&sb.id));
        new.leave(&alice);
        assert_eq!(types(&k2), ["waiting", "welcome"]);
        assert!(new.keep().rooms.iter().all(|r| !r.locked));
    }

    /// What comes back from the file is input: ill-formed places, ones
    /// already taken, and ones past the limits are skipped, and a lock
    /// with only watchers left is dropped.
    #[test]
    fn a_kept_place_must_be_well_formed_and_within_the_limits() {
        let t0 = Instant::now();
        let place = |id: u128, name: &str, token: &str| KeptPlace {
            id: format!("{id:032x}"),
            name: name.into(),
            watching: false,
            token_hash: token_hash(token),
        };
        let good = |room: &str, places: Vec<KeptPlace>| KeptRoom {
            room: room.into(),
            locked: true,
            open_to_audience: false,
            places,
        };
        let mut bad_id = place(9, "I", "i");
        bad_id.id = "P1".into();
        let mut bad_hash = place(10, "H", "h");
        bad_hash.token_hash = "00".into();
        let mut watcher = place(11, "W", "w");
        watcher.watching = true;
        let kept = KeptRooms {
            rooms: vec![
                good(
                    "ok",
                    vec![
                        place(1, "A", "a"),
                        place(1, "Twin", "b"),
                        place(2, "B", "a"),
                    ],
                ),
                good(
                    "full",
                    (20..26).map(|n| place(n, "F", &n.to_string())).collect(),
                ),
                good("bad room!", vec![place(3, "C", "c")]),
                good(
                    "names",
                    vec![
                        place(4, " padded ", "d"),
                        place(5, "", "e"),
                        place(6, "ctl\u{7}", "f"),
                    ],
                ),
                good("forms", vec![bad_id, bad_hash]),
                good("watchers", vec![watcher]),
                good("ok", vec![place(7, "Again", "g")]),
            ],
        };
        let mut hub = hex_hub(100);
        let restored = hub.restore(kept, t0);
        // ok: A (Twin's id and B's token are taken); full: 4 of 6;
        // watchers: W.
        assert_eq!(
            restored,
            Restored {
                rooms: 3,
                places: 6,
                skipped: 1 + 1 + 2 + 1 + 3 + 2 + 1
            }
        );
        let kept = hub.keep();
        let watchers = kept.rooms.iter().find(|r| r.room == "watchers").unwrap();
        assert!(!watchers.locked, "no one taking part to keep the lock");
        assert!(kept.rooms.iter().find(|r| r.room == "ok").unwrap().locked);
        assert_eq!(hub.stats().peers, 6);
    }

    /// The place of a lost connection: kept until the grace ends (not a
    /// moment longer), resumed only with its token and in its room, even
    /// when the room is full; what waits for it is bounded, and messages
    /// from peers that left meanwhile are not handed over.
    #[test]
    fn a_lost_place_is_kept_for_the_grace_and_no_longer() {
        let t0 = Instant::now();
        let grace = DEFAULT_RESUME_GRACE;
        let limits = HubLimits {
            away_frames: 3,
            ..HubLimits::new(3, 10)
        };
        let mut hub = Hub::new(limits, {
            let mut n = 0;
            move || {
                n += 1;
                format!("p{n}")
            }
        });
        let (a, b, c) = (Recorder::new(100), Recorder::new(100), Recorder::new(100));
        let sa = hub.join("r", "A", false, None, a.clone(), &[]).unwrap();
        let token = a.take()[0]["resume"].as_str().unwrap().to_owned();
        let sb = hub.join("r", "B", false, None, b.clone(), &[]).unwrap();
        let sc = hub.join("r", "C", false, None, c.clone(), &[]).unwrap();
        b.take();

        assert_eq!(hub.park(&sa, t0), Parked::Kept);
        assert_eq!(hub.park(&sa, t0), Parked::NotHeld, "parked once");
        assert!(!hub.leave(&sa), "the lost connection no longer holds it");
        assert_eq!(hub.stats().away, 1);
        hub.signal(&sb.id, &sa.id, &raw("1")).unwrap();
        hub.broadcast(&sc.id, &raw("2")).unwrap();
        hub.leave(&sc);
        assert_eq!(hub.expire(t0 + grace - Duration::from_millis(1)), 0);
        assert!(
            b.take()
                .iter()
                .all(|m| m["type"] != "peer-left" || m["id"] != "p1")
        );

        // Another room's join cannot take it, and the full room still
        // lets it back.
        let other = Recorder::new(10);
        let wrong = hub
            .join("s", "X", false, Some(&token), other.clone(), &[])
            .unwrap();
        assert!(!wrong.resumed);
        let d = Recorder::new(10);
        hub.join("r", "D", false, None, d, &[]).unwrap();
        let back = Recorder::new(100);
        let seat = hub
            .join("r", "A", false, Some(&token), back.clone(), &[])
            .unwrap();
        assert_eq!((seat.id.as_str(), seat.resumed), ("p1", true));
        let got = back.take();
        assert_eq!(got[0]["type"], "welcome");
        assert_eq!(
            got[0]["peers"],
            serde_json::json!([{"id": "p2", "name": "B"}, {"id": "p5", "name": "D"}])
        );
        assert_eq!(
            got[1..],
            [serde_json::json!({"type": "signal", "from": "p2", "data": 1})],
            "C's broadcast is not handed over: C has left"
        );
        assert!(!hub.leave(&sa), "the old seat is stale");
        assert_eq!(hub.stats().away, 0);

        // Lost again: too much waits for it, and it is given up.
        assert_eq!(hub.park(&seat, t0), Parked::Kept);
        for n in 0..3 {
            hub.broadcast(&sb.id, &raw(&n.to_string())).unwrap();
        }
        assert!(hub.contains("p1"));
        hub.broadcast(&sb.id, &raw("3")).unwrap();
        assert!(!hub.contains("p1"));
        assert!(
            b.take()
                .contains(&serde_json::json!({"type": "peer-left", "id": "p1"}))
        );

        // And one whose grace passes is gone too, as is its token.
        let e = Recorder::new(100);
        let se = hub.join("r", "E", false, None, e.clone(), &[]).unwrap();
        let e_token = e.take()[0]["resume"].as_str().unwrap().to_owned();
        assert_eq!(hub.park(&se, t0), Parked::Kept);
        assert_eq!(hub.expire(t0 + grace), 1);
        assert!(
            b.take()
                .contains(&serde_json::json!({"type": "peer-left", "id": se.id}))
        );
        let again = hub
            .join("r", "E", false, Some(&e_token), Recorder::new(10), &[])
            .unwrap();
        assert!(!again.resumed);
    }

    /// What all lost connections hold together is bounded too: past it,
    /// the place something more is sent to is given up; a resume or a
    /// place given up frees its share.
    #[test]
    fn what_lost_connections_hold_together_is_bounded() {
        let one = Frame::new(&ServerMessage::Broadcast {
            from: "p1",
            data: &raw("1"),
        })
        .len();
        let mut hub = Hub::new(
            HubLimits {
                away_bytes_total: 3 * one,
                ..HubLimits::new(8, 10)
            },
            {
                let mut n = 0;
                move || {
                    n += 1;
                    format!("p{n}")
                }
            },
        );
        let t0 = Instant::now();
        let sender = hub
            .join("r", "S", false, None, Recorder::new(100), &[])
            .unwrap();
        let (x, y) = (Recorder::new(100), Recorder::new(100));
        let sx = hub.join("r", "X", false, None, x.clone(), &[]).unwrap();
        let x_token = x.take()[0]["resume"].as_str().unwrap().to_owned();
        let sy = hub.join("r", "Y", false, None, y, &[]).unwrap();
        assert_eq!(hub.park(&sx, t0), Parked::Kept);
        assert_eq!(hub.park(&sy, t0), Parked::Kept);
        hub.broadcast(&sender.id, &raw("1")).unwrap();
        assert_eq!(hub.away_total, 2 * one);
        // The next broadcast fits for X, not for Y: Y is given up.
        hub.broadcast(&sender.id, &raw("2")).unwrap();
        assert_eq!((hub.contains("p2"), hub.contains("p3")), (true, false));
        assert_eq!(hub.away_total, 2 * one);
        // X resumes: its share is free again.
        let back = Recorder::new(100);
        hub.join("r", "X", false, Some(&x_token), back.clone(), &[])
            .unwrap();
        assert_eq!(back.take().len(), 3, "welcome and both broadcasts");
        assert_eq!(hub.away_total, 0);
    }

    #[test]
    fn a_locked_room_lets_in_only_whom_someone_in_it_admits() {
        let mut hub = hub(16, 10);
        let (a, b, c) = (Recorder::new(100), Recorder::new(100), Recorder::new(100));
        let ada = hub.join("r", "Ada", false, None, a.clone(), &[]).unwrap();
        a.take();
        hub.lock(&ada.id, true, false).unwrap();
        assert_eq!(
            a.take(),
            vec![serde_json::json!({"type": "locked", "locked": true, "by": "p1"})]
        );

        // Bob knocks: he waits, seen by nobody and seeing nothing.
        let bob = hub.join("r", "Bob", false, None, b.clone(), &[]).unwrap();
        assert!(bob.waiting);
        assert_eq!(
            b.take(),
            vec![serde_json::json!({"type": "waiting", "room": "r"})]
        );
        assert_eq!(
            a.take(),
            vec![serde_json::json!({"type": "knock", "peer": {"id": "p2", "name": "Bob"}})]
        );
        assert_eq!(
            hub.signal(&bob.id, &ada.id, &raw("1")),
            Err(ErrorCode::NotJoined)
        );
        assert_eq!(
            hub.signal(&ada.id, &bob.id, &raw("1")),
            Err(ErrorCode::UnknownPeer)
        );
        assert_eq!(hub.lock(&bob.id, false, false), Err(ErrorCode::NotJoined));
        assert_eq!(hub.admit(&bob.id, &bob.id), Err(ErrorCode::NotJoined));
        assert_eq!(hub.stats().peers, 1);

        // Cy knocks too; Ada lets Bob in, who hears of Cy.
        let cy = hub.join("r", "Cy", false, None, c.clone(), &[]).unwrap();
        a.take();
        c.take();
        hub.admit(&ada.id, &bob.id).unwrap();
        assert_eq!(types(&a), ["knock-ended", "peer-joined"]);
        let welcome = &b.take()[0];
        assert_eq!(welcome["type"], "welcome");
        assert_eq!(welcome["id"], "p2", "the id he knocked with");
        assert_eq!(welcome["locked"], true);
        assert_eq!(
            welcome["peers"],
            serde_json::json!([{"id": "p1", "name": "Ada"}])
        );
        assert_eq!(
            welcome["waiting"],
            serde_json::json!([{"id": "p3", "name": "Cy"}])
        );
        assert!(hub.holds(&bob), "the seat he knocked with holds his place");

        // Bob turns Cy away: Cy may knock again, and then gives up.
        hub.deny(&bob.id, &cy.id).unwrap();
        assert_eq!(c.take()[0]["code"], "not-admitted");
        assert_eq!(
            a.take(),
            vec![serde_json::json!({"type": "knock-ended", "id": "p3", "admitted": false})]
        );
        assert_eq!(types(&b), ["knock-ended"]);
        assert!(!hub.has(&cy));
        assert_eq!(hub.admit(&ada.id, &cy.id), Err(ErrorCode::UnknownPeer));
        let cy = hub.join("r", "Cy", false, None, c.clone(), &[]).unwrap();
        assert!(hub.leave(&cy), "stops knocking");
        assert_eq!(types(&a), ["knock", "knock-ended"]);

        // Someone in another room can neither let in nor turn away.
        let (d, e) = (Recorder::new(100), Recorder::new(100));
        let dee = hub.join("r", "Dee", false, None, d.clone(), &[]).unwrap();
        let eve = hub
            .join("elsewhere", "Eve", false, None, e.clone(), &[])
            .unwrap();
        assert_eq!(hub.admit(&eve.id, &dee.id), Err(ErrorCode::UnknownPeer));
        assert_eq!(hub.deny(&eve.id, &dee.id), Err(ErrorCode::UnknownPeer));

        // Unlocked, whoever knocks comes in.
        a.take();
        hub.lock(&ada.id, false, false).unwrap();
        assert_eq!(types(&a), ["locked", "knock-ended", "peer-joined"]);
        let welcome = &d.take()[1];
        assert_eq!(welcome["type"], "welcome");
        assert!(welcome.get("locked").is_none(), "absent when unlocked");
        assert!(hub.holds(&dee));
    }

    #[test]
    fn those_who_watch_see_only_those_taking_part_and_have_no_say_in_who_comes_in() {
        use serde_json::json;
        let mut hub = hub(16, 10);
        let [a, v, w, b, k] = [(); 5].map(|_| Recorder::new(100));
        let ada = hub.join("r", "Ada", false, None, a.clone(), &[]).unwrap();
        let vi = hub.join("r", "Vi", true, None, v.clone(), &[]).unwrap();
        let wu = hub.join("r", "Wu", true, None, w.clone(), &[]).unwrap();
        assert_eq!(hub.stats().watching, 2);
        assert_eq!(
            a.take()[1..],
            [
                json!({"type": "peer-joined", "peer": {"id": "p2", "name": "Vi", "watching": true}}),
                json!({"type": "peer-joined", "peer": {"id": "p3", "name": "Wu", "watching": true}}),
            ]
        );
        // Each who watches sees Ada alone, not the other.
        for r in [&v, &w] {
            let frames = r.take();
            assert_eq!(frames.len(), 1, "{frames:?}");
            assert_eq!(frames[0]["peers"], json!([{"id": "p1", "name": "Ada"}]));
        }
        assert_eq!(
            hub.signal(&vi.id, &wu.id, &raw("1")),
            Err(ErrorCode::UnknownPeer)
        );
        hub.signal(&vi.id, &ada.id, &raw("1")).unwrap();
        hub.broadcast(&vi.id, &raw("2")).unwrap();
        assert_eq!(types(&a), ["signal", "broadcast"]);
        assert!(w.take().is_empty(), "Vi's broadcast reaches only Ada");
        hub.broadcast(&ada.id, &raw("3")).unwrap();
        hub.signal(&ada.id, &wu.id, &raw("4")).unwrap();
        assert_eq!(types(&v), ["broadcast"]);
        assert_eq!(types(&w), ["broadcast", "signal"]);

        // Bob, taking part, sees everyone, and everyone sees him.
        let bob = hub.join("r", "Bob", false, None, b.clone(), &[]).unwrap();
        assert_eq!(
            b.take()[0]["peers"],
            json!([
                {"id": "p1", "name": "Ada"},
                {"id": "p2", "name": "Vi", "watching": true},
                {"id": "p3", "name": "Wu", "watching": true},
            ])
        );
        for r in [&a, &v, &w] {
            assert_eq!(types(r), ["peer-joined"]);
        }

        // Only those taking part lock, hear knocks, and let in.
        assert_eq!(hub.lock(&vi.id, true, false), Err(ErrorCode::NotAllowed));
        hub.lock(&ada.id, true, false).unwrap();
        let kay = hub.join("r", "Kay", true, None, k.clone(), &[]).unwrap();
        assert!(kay.waiting);
        assert_eq!(
            b.take()[1],
            json!({"type": "knock", "peer": {"id": "p5", "name": "Kay", "watching": true}})
        );
        assert!(v.take().is_empty() && w.take().is_empty());
        assert_eq!(hub.admit(&vi.id, &kay.id), Err(ErrorCode::NotAllowed));
        assert_eq!(hub.deny(&vi.id, &kay.id), Err(ErrorCode::NotAllowed));

        // Wu goes: only those taking part hear it.
        assert!(hub.leave(&wu));
        assert_eq!(types(&v), Vec::<String>::new());
        assert_eq!(types(&a), ["locked", "knock", "peer-left"]);

        // With everyone taking part gone, Vi cannot open the room: Kay,
        // knocking, comes in, and those watching see nothing of her.
        assert!(hub.leave(&ada));
        assert!(hub.leave(&bob));
        assert!(hub.holds(&kay));
        assert!(!hub.locks.contains_key("r"));
        assert_eq!(types(&v), ["peer-left", "peer-left"]);
        let welcome = &k.take()[1];
        assert_eq!(welcome["peers"], json!([]));
    }

    #[test]
    fn a_room_locked_open_to_its_audience_lets_those_who_watch_in_and_keeps_the_stage_closed() {
        use serde_json::json;
        let mut hub = hub(16, 10);
        let [a, k, v, p] = [(); 4].map(|_| Recorder::new(100));
        let ada = hub.join("r", "Ada", false, None, a.clone(), &[]).unwrap();
        hub.lock(&ada.id, true, false).unwrap();
        // Kay knocks to watch while the room is closed to all.
        let kay = hub.join("r", "Kay", true, None, k.clone(), &[]).unwrap();
        assert!(kay.waiting);
        a.take();
        // Opened to its audience: Kay comes in, and so does the next who watches.
        hub.lock(&ada.id, true, true).unwrap();
        assert_eq!(
            a.take()[0],
            json!({"type": "locked", "locked": true, "by": ada.id, "openToAudience": true})
        );
        assert!(hub.holds(&kay));
        assert_eq!(types(&k), ["waiting", "welcome"]);
        let vi = hub.join("r", "Vi", true, None, v.clone(), &[]).unwrap();
        assert!(!vi.waiting && hub.holds(&vi));
        assert_eq!(types(&a), ["peer-joined"]);
        // One who would take part still knocks; let in, she hears how the room is locked.
        let pat = hub.join("r", "Pat", false, None, p.clone(), &[]).unwrap();
        assert!(pat.waiting);
        hub.admit(&ada.id, &pat.id).unwrap();
        let welcome = &p.take()[1];
        assert_eq!(welcome["locked"], true);
        assert_eq!(welcome["openToAudience"], true);
        // Locked to all again: the next who watches knocks.
        hub.lock(&ada.id, true, false).unwrap();
        let wu = hub.join("r", "Wu", true, None, Recorder::new(100), &[]);
        assert!(wu.unwrap().waiting);
        // Unlocked, a room is not "open to its audience": there is no lock.
        hub.lock(&ada.id, false, true).unwrap();
        assert!(!hub.open_to_audience("r"));
    }

    #[test]
    fn a_locked_room_is_left_to_those_knocking_when_everyone_leaves_and_resumes_do_not_knock() {
        let mut hub = hub(16, 10);
        let (a, b, c) = (Recorder::new(100), Recorder::new(100), Recorder::new(100));
        let ada = hub.join("r", "Ada", false, None, a.clone(), &[]).unwrap();
        let token = a.take()[0]["resume"].as_str().unwrap().to_owned();
        hub.lock(&ada.id, true, false).unwrap();

        // Ada's connection drops and comes back: she takes her place
        // back without knocking.
        assert_eq!(hub.park(&ada, Instant::now()), Parked::Kept);
        let again = hub
            .join("r", "Ada", false, Some(&token), a.clone(), &[])
            .unwrap();
        assert!(again.resumed && !again.waiting);
        assert_eq!(a.take().last().unwrap()["locked"], true);

        // At most MAX_WAITING knock at once.
        let knockers: Vec<Seat> = (0..MAX_WAITING)
            .map(|_| {
                hub.join("r", "K", false, None, Recorder::new(100), &[])
                    .unwrap()
            })
            .collect();
        assert_eq!(
            hub.join("r", "K", false, None, b.clone(), &[]),
            Err(ErrorCode::RoomFull)
        );
        // One whose connection is lost stops knocking at once.
        assert_eq!(hub.park(&knockers[0], Instant::now()), Parked::Left);
        let bob = hub.join("r", "Bob", false, None, b.clone(), &[]).unwrap();
        assert!(bob.waiting);

        // Ada leaves: nobody is left to let them in, so they come in, to
        // the room as new and unlocked.
        hub.leave(&again);
        assert!(hub.holds(&bob));
        assert_eq!(hub.stats().peers, MAX_WAITING);
        let welcome = b
            .take()
            .into_iter()
            .find(|f| f["type"] == "welcome")
            .unwrap();
        assert!(welcome.get("locked").is_none());
        let cy = hub.join("r", "Cy", false, None, c.clone(), &[]).unwrap();
        assert!(!cy.waiting);
    }

    #[test]
    fn without_a_grace_a_lost_connection_leaves_at_once() {
        let mut hub = Hub::new(
            HubLimits {
                resume_grace: Duration::ZERO,
                ..HubLimits::new(3, 10)
            },
            random_peer_id,
        );
        let (a, b) = (Recorder::new(10), Recorder::new(10));
        let sa = hub.join("r", "A", false, None, a, &[]).unwrap();
        hub.join("r", "B", false, None, b.clone(), &[]).unwrap();
        assert_eq!(hub.park(&sa, Instant::now()), Parked::Left);
        assert!(
            b.take()
                .contains(&serde_json::json!({"type": "peer-left", "id": sa.id}))
        );
        assert_eq!(hub.stats().peers, 1);
    }

    /// What a client can do, in the property test below.
    #[derive(Debug, Clone)]
    enum Op {
        /// Joins room `room` as client `client`, to watch if `watching`,
        /// with the token of the place it last had if `resume`, on a
        /// connection whose queue takes `capacity` frames.
        Join {
            client: usize,
            room: u8,
            watching: bool,
            resume: bool,
            capacity: usize,
        },
        Leave(usize),
        Lose(usize),
        Signal(usize, usize),
        Broadcast(usize),
        Wait(u64),
        /// Locks (or unlocks) the room, open to its audience or not.
        Lock(usize, bool, bool),
        Admit(usize, usize),
        Deny(usize, usize),
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            3 => (0..5usize, 0..2u8, any::<bool>(), any::<bool>(), prop_oneof![Just(1000usize), 2..12usize]).prop_map(
                |(client, room, watching, resume, capacity)| Op::Join {
                    client,
                    room,
                    watching,
                    resume,
                    capacity
                }
            ),
            1 => (0..5usize).prop_map(Op::Leave),
            2 => (0..5usize).prop_map(Op::Lose),
            1 => (0..5usize, 0..5usize).prop_map(|(a, b)| Op::Signal(a, b)),
            1 => (0..5usize).prop_map(Op::Broadcast),
            1 => (0..1500u64).prop_map(Op::Wait),
            1 => (0..5usize, any::<bool>(), any::<bool>()).prop_map(|(c, locked, open)| Op::Lock(c, locked, open)),
            1 => (0..5usize, 0..5usize).prop_map(|(a, b)| Op::Admit(a, b)),
            1 => (0..5usize, 0..5usize).prop_map(|(a, b)| Op::Deny(a, b)),
        ]
    }

    /// A client's connection: its seat, and what it was sent.
    struct Connection {
        seat: Seat,
        sink: Recorder,
    }

    /// A room as a connection's messages describe it.
    #[derive(Debug, Default)]
    struct Told {
        /// `welcome.peers`, then each `peer-joined` and `peer-left`.
        peers: Vec<String>,
        /// The first `signal` or `broadcast` from a peer not in it then.
        stranger: Option<Value>,
        /// `welcome.locked`, then each `locked`.
        locked: bool,
        /// `welcome.openToAudience`, then each `locked`'s.
        open: bool,
        /// `welcome.waiting`, then each `knock` and `knock-ended`.
        waiting: Vec<String>,
        /// The last `welcome`'s resume token.
        token: Option<String>,
    }

    fn ids(list: &Value) -> Vec<String> {
        list.as_array()
            .into_iter()
            .flatten()
            .map(|p| p["id"].as_str().unwrap().to_owned())
            .collect()
    }

    /// The room as `frames` tell it (from the last welcome on).
    fn room_as_told(frames: &[Value]) -> Told {
        let mut told = Told::default();
        for f in frames {
            match f["type"].as_str() {
                Some("signal" | "broadcast")
                    if !told.peers.iter().any(|id| f["from"] == id.as_str()) =>
                {
                    told.stranger.get_or_insert_with(|| f.clone());
                }
                Some("welcome") => {
                    told.peers = ids(&f["peers"]);
                    told.locked = f["locked"] == true;
                    told.open = f["openToAudience"] == true;
                    told.waiting = ids(&f["waiting"]);
                    told.token = f["resume"].as_str().map(str::to_owned);
                }
                Some("peer-joined") => told
                    .peers
                    .push(f["peer"]["id"].as_str().unwrap().to_owned()),
                Some("peer-left") => told.peers.retain(|id| id != f["id"].as_str().unwrap()),
                Some("locked") => {
                    told.locked = f["locked"] == true;
                    told.open = f["openToAudience"] == true;
                }
                Some("knock") => told
                    .waiting
                    .push(f["peer"]["id"].as_str().unwrap().to_owned()),
                Some("knock-ended") => told.waiting.retain(|id| id != f["id"].as_str().unwrap()),
                _ => {}
            }
        }
        told
    }

    proptest::proptest! {
        /// Arbitrary joins, resumes, leaves, lost connections, signals,
        /// broadcasts, waits, locks, admissions and refusals by a few
        /// clients over two rooms, some with queues that overflow: the
        /// rooms, the peers, the tokens, the lobbies and the bytes kept for
        /// lost connections always agree; every connection that holds its
        /// place was told exactly who else is in its room, whether it is
        /// locked and who knocks, and heard from no one else; one knocking
        /// was told nothing of the room; and every place lost longer than
        /// the grace is gone.
        #[test]
        fn the_rooms_and_what_each_connection_was_told_always_agree(
            ops in proptest::collection::vec(op(), 1..80),
        ) {
            let grace = Duration::from_secs(2);
            let mut hub: Hub<Recorder> = Hub::new(
                HubLimits {
                    resume_grace: grace,
                    away_frames: 4,
                    away_bytes: 4096,
                    away_bytes_total: 300,
                    ..HubLimits::new(3, 10)
                },
                random_peer_id,
            );
            let mut now = Instant::now();
            let mut live: Vec<Option<Connection>> = (0..5).map(|_| None).collect();
            // Each client's last token, and when its place was lost.
            let mut tokens: Vec<Option<String>> = vec![None; 5];
            let mut lost: Vec<(String, Instant)> = Vec::new();
            for op in ops {
                match op {
                    Op::Join { client, room, watching, resume, capacity } => {
                        if live[client].is_some() {
                            continue;
                        }
                        let sink = Recorder::new(capacity);
                        let token = tokens[client].clone().filter(|_| resume);
                        let room = format!("r{room}");
                        if let Ok(seat) = hub.join(&room, "n", watching, token.as_deref(), sink.clone(), &[]) {
                            let frames = sink.frames.borrow();
                            if let Some(first) = frames.first() {
                                if seat.waiting {
                                    proptest::prop_assert_eq!(&first["type"], "waiting");
                                } else {
                                    proptest::prop_assert_eq!(first["id"].as_str(), Some(seat.id.as_str()));
                                }
                            }
                            drop(frames);
                            lost.retain(|(id, _)| *id != seat.id);
                            live[client] = Some(Connection { seat, sink });
                        }
                    }
                    Op::Leave(client) => {
                        if let Some(c) = live[client].take() {
                            hub.leave(&c.seat);
                        }
                    }
                    Op::Lose(client) => {
                        if let Some(c) = live[client].take()
                            && hub.park(&c.seat, now) == Parked::Kept
                        {
                            lost.push((c.seat.id, now));
                        }
                    }
                    Op::Signal(a, b) => {
                        if let (Some(from), Some(to)) = (&live[a], &live[b]) {
                            let (from, to) = (from.seat.id.clone(), to.seat.id.clone());
                            let _ = hub.signal(&from, &to, &raw("1"));
                        }
                    }
                    Op::Broadcast(a) => {
                        if let Some(from) = &live[a] {
                            let from = from.seat.id.clone();
                            let _ = hub.broadcast(&from, &raw("2"));
                        }
                    }
                    Op::Wait(ms) => {
                        now += Duration::from_millis(ms);
                        hub.expire(now);
                    }
                    Op::Lock(client, locked, open) => {
                        if let Some(c) = &live[client] {
                            let by = c.seat.id.clone();
                            let _ = hub.lock(&by, locked, open);
                        }
                    }
                    Op::Admit(a, b) | Op::Deny(a, b) => {
                        if let (Some(by), Some(id)) = (&live[a], &live[b]) {
                            let (by, id) = (by.seat.id.clone(), id.seat.id.clone());
                            let _ = if matches!(op, Op::Admit(..)) { hub.admit(&by, &id) } else { hub.deny(&by, &id) };
                        }
                    }
                }
                // A connection evicted, turned away (or whose place was
                // resumed elsewhere) holds nothing any more.
                for (client, c) in live.iter_mut().enumerate() {
                    if let Some(conn) = c {
                        if let Some(token) = room_as_told(&conn.sink.frames.borrow()).token {
                            tokens[client] = Some(token);
                        }
                        if !hub.has(&conn.seat) {
                            *c = None;
                        }
                    }
                }

                // The lobbies: of locked rooms, holding every waiter once.
                let mut knocking = 0;
                for (room, lock) in &hub.locks {
                    proptest::prop_assert!(
                        hub.rooms[room].iter().any(|m| !hub.peers[m].watching),
                        "a lock outlived those who can open it"
                    );
                    proptest::prop_assert!(lock.waiting.len() <= MAX_WAITING);
                    for w in &lock.waiting {
                        proptest::prop_assert_eq!(&hub.waiters[w].room, room);
                        proptest::prop_assert!(!hub.peers.contains_key(w));
                        // Open to its audience, none who would watch waits.
                        proptest::prop_assert!(
                            !(lock.open_to_audience && hub.waiters[w].watching),
                            "one who watches knocks on a room open to its audience"
                        );
                    }
                    knocking += lock.waiting.len();
                }
                proptest::prop_assert_eq!(knocking, hub.waiters.len());

                // The rooms and the peers agree.
                let mut in_rooms = 0;
                for (room, members) in &hub.rooms {
                    proptest::prop_assert!(!members.is_empty());
                    for m in members {
                        proptest::prop_assert_eq!(&hub.peers[m].room, room);
                    }
                    in_rooms += members.len();
                }
                proptest::prop_assert_eq!(in_rooms, hub.peers.len());
                proptest::prop_assert_eq!(hub.tokens.len(), hub.peers.len());
                for (token, id) in &hub.tokens {
                    proptest::prop_assert_eq!(&hub.peers[id].token_hash, token);
                }
                let kept: usize = hub
                    .peers
                    .values()
                    .map(|p| match &p.link {
                        Link::Away { bytes, missed, .. } => {
                            assert_eq!(*bytes, missed.iter().map(|(f, _)| f.len()).sum::<usize>());
                            *bytes
                        }
                        Link::Live(_) => 0,
                    })
                    .sum();
                proptest::prop_assert_eq!(kept, hub.away_total);
                let away = hub.peers.values().filter(|p| matches!(p.link, Link::Away { .. })).count();
                proptest::prop_assert_eq!(away, hub.away_count);
                proptest::prop_assert!(kept <= hub.limits.away_bytes_total);

                // Each connection holding its place knows its room exactly;
                // one knocking knows nothing of it.
                for c in live.iter().flatten() {
                    let mut told = room_as_told(&c.sink.frames.borrow());
                    proptest::prop_assert_eq!(&told.stranger, &None, "from someone not in the room");
                    if !hub.holds(&c.seat) {
                        let frames = c.sink.frames.borrow();
                        proptest::prop_assert!(frames.iter().all(|f| f["type"] == "waiting"), "told while knocking: {:?}", frames);
                        continue;
                    }
                    // Those who watch see only those taking part, and
                    // nothing of the lobby.
                    let watching = hub.peers[&c.seat.id].watching;
                    let mut actual: Vec<String> = hub.rooms[&c.seat.room]
                        .iter()
                        .filter(|id| **id != c.seat.id && sees(watching, hub.peers[*id].watching))
                        .cloned()
                        .collect();
                    told.peers.sort();
                    actual.sort();
                    proptest::prop_assert_eq!(told.peers, actual);
                    proptest::prop_assert_eq!(told.locked, !watching && hub.locks.contains_key(&c.seat.room));
                    proptest::prop_assert_eq!(told.open, !watching && hub.open_to_audience(&c.seat.room));
                    let waiting = hub.locks.get(&c.seat.room).filter(|_| !watching).map(|l| l.waiting.clone()).unwrap_or_default();
                    proptest::prop_assert_eq!(told.waiting, waiting);
                }
                // No place outlives its grace.
                for (id, since) in &lost {
                    if now >= *since + grace {
                        proptest::prop_assert!(!hub.contains(id), "{} kept past its grace", id);
                    }
                }
            }
        }
    }

    #[test]
    fn random_ids_are_128_bit_hex() {
        let a = random_peer_id();
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(a, random_peer_id());
    }

    /// A kept place, well formed or not: ids, names and token hashes from
    /// small pools (so duplicates come up) or anything at all.
    fn kept_place() -> impl proptest::strategy::Strategy<Value = KeptPlace> {
        use proptest::prelude::*;
        (
            prop_oneof![4 => (0u128..12).prop_map(|n| format!("{n:032x}")), 1 => any::<String>()],
            prop_oneof![4 => proptest::sample::select(vec!["Ann", "Bo", "Zoë"]).prop_map(String::from), 1 => any::<String>()],
            any::<bool>(),
            prop_oneof![4 => (0u8..12).prop_map(|n| token_hash(&n.to_string())), 1 => any::<String>()],
        )
            .prop_map(|(id, name, watching, token_hash)| KeptPlace { id, name, watching, token_hash })
    }

    fn kept_rooms() -> impl proptest::strategy::Strategy<Value = KeptRooms> {
        use proptest::prelude::*;
        let room = (
            prop_oneof![4 => proptest::sample::select(vec!["r", "s", "t-1"]).prop_map(String::from), 1 => any::<String>()],
            any::<bool>(),
            any::<bool>(),
            proptest::collection::vec(kept_place(), 0..7),
        )
            .prop_map(|(room, locked, open_to_audience, places)| KeptRoom { room, locked, open_to_audience, places });
        proptest::collection::vec(room, 0..14).prop_map(|rooms| KeptRooms { rooms })
    }

    proptest::proptest! {
        /// Whatever a file of kept rooms holds, restoring it never panics,
        /// accounts for every place (taken back or skipped), keeps within
        /// the limits, and leaves a hub whose own keeping restores to
        /// itself; every place taken back resumes with its token, and
        /// with no other.
        #[test]
        fn any_kept_rooms_restore_within_the_limits_and_round_trip(kept in kept_rooms()) {
            let t0 = Instant::now();
            let total: usize = kept.rooms.iter().map(|r| r.places.len()).sum();
            let mut hub = hex_hub(0);
            let restored = hub.restore(kept.clone(), t0);
            proptest::prop_assert_eq!(restored.places + restored.skipped, total);
            let stats = hub.stats();
            proptest::prop_assert_eq!((stats.peers, stats.away, stats.rooms), (restored.places, restored.places, restored.rooms));
            proptest::prop_assert!(stats.rooms <= 10 && stats.room_sizes.iter().all(|&n| (1..=4).contains(&n)));
            proptest::prop_assert_eq!(hub.tokens.len(), hub.peers.len());
            for (room, lock) in &hub.locks {
                proptest::prop_assert!(lock.waiting.is_empty());
                proptest::prop_assert!(hub.rooms[room].iter().any(|m| !hub.peers[m].watching));
            }
            let again = hub.keep();
            let mut other = hex_hub(0);
            proptest::prop_assert_eq!(other.restore(again.clone(), t0).skipped, 0);
            proptest::prop_assert_eq!(other.keep(), again);
            // The tokens whose hashes were kept: "0" to "11".
            for n in 0u8..12 {
                let token = n.to_string();
                let owner = hub.tokens.get(&token_hash(&token)).cloned();
                let Some(owner) = owner else { continue };
                let room = hub.peers[&owner].room.clone();
                let seat = hub.join(&room, "X", false, Some(&token), Recorder::new(100), &[]).unwrap();
                proptest::prop_assert_eq!((seat.id, seat.resumed), (owner, true));
            }
            // Another token joins as new, if there is room for it.
            let other_token = hub.join("r", "X", false, Some("not kept"), Recorder::new(100), &[]);
            proptest::prop_assert!(other_token.is_ok_and(|s| !s.resumed) || hub.rooms.get("r").is_some_and(|r| r.len() >= 4) || hub.rooms.len() >= 10);
        }
    }
}
