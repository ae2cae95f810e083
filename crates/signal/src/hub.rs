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

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use callisto_protocol::{ErrorCode, IceServer, PROTOCOL_VERSION, PeerInfo, ServerMessage};
use serde_json::value::RawValue;

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
}

/// A snapshot for metrics and health checks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HubStats {
    pub peers: usize,
    /// Peers among them whose connection is lost, kept for a resume.
    pub away: usize,
    pub rooms: usize,
    /// The size of every room, in no particular order.
    pub room_sizes: Vec<usize>,
}

struct Peer<S> {
    name: String,
    room: String,
    /// The secret that resumes this place (`welcome.resume`).
    token: String,
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
    /// Peer ids by resume token.
    tokens: HashMap<String, String>,
    /// Bytes kept for lost connections, all together.
    away_total: usize,
    /// Places of lost connections: with none, the expiry has nothing to
    /// look through.
    away_count: usize,
    attachments: u64,
    new_id: Box<dyn FnMut() -> String + Send>,
    evicted: Vec<String>,
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
            away_total: 0,
            away_count: 0,
            attachments: 0,
            new_id: Box::new(new_id),
            evicted: Vec::new(),
        }
    }

    /// Adds a peer to `room` (created on first join), sends it `welcome` and
    /// tells the others. With the `resume` token of a place in that room,
    /// the new connection takes the place back instead (see the module
    /// documentation); an unknown or expired token joins as new.
    pub fn join(
        &mut self,
        room: &str,
        name: &str,
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
        self.join_new(room, name, sink, ice_servers)
    }

    fn next_attachment(&mut self) -> u64 {
        self.attachments += 1;
        self.attachments
    }

    /// The others in `room`, in join order, as `welcome` lists them.
    fn members_but(&self, room: &str, except: Option<&str>) -> Vec<PeerInfo> {
        self.rooms
            .get(room)
            .into_iter()
            .flatten()
            .filter(|pid| Some(pid.as_str()) != except)
            .filter_map(|pid| {
                self.peers.get(pid).map(|p| PeerInfo {
                    id: pid.clone(),
                    name: p.name.clone(),
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
            .get(token)
            .filter(|id| self.peers.get(id.as_str()).is_some_and(|p| p.room == room));
        let Some(id) = place.cloned() else {
            metrics::counter!("callisto_signaling_resumes_total", "result" => "unknown")
                .increment(1);
            return Err(sink);
        };
        let attachment = self.next_attachment();
        let peers = self.members_but(room, Some(&id));
        let welcome = Frame::new(&ServerMessage::Welcome {
            id: &id,
            room,
            version: PROTOCOL_VERSION,
            peers,
            ice_servers,
            resume: token,
            resumed: true,
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
        })
    }

    fn join_new(
        &mut self,
        room: &str,
        name: &str,
        sink: S,
        ice_servers: &[IceServer],
    ) -> Result<Seat, ErrorCode> {
        let members = self.rooms.get(room);
        match members {
            Some(m) if m.len() >= self.limits.max_room_size => return Err(ErrorCode::RoomFull),
            None if self.rooms.len() >= self.limits.max_rooms => {
                return Err(ErrorCode::ServerFull);
            }
            _ => {}
        }
        let id = loop {
            let id = (self.new_id)();
            if !self.peers.contains_key(&id) {
                break id;
            }
        };
        let token = random_peer_id();
        let welcome = Frame::new(&ServerMessage::Welcome {
            id: &id,
            room,
            version: PROTOCOL_VERSION,
            peers: self.members_but(room, None),
            ice_servers,
            resume: &token,
            resumed: false,
        });
        let joined = Frame::new(&ServerMessage::PeerJoined {
            peer: PeerInfo {
                id: id.clone(),
                name: name.to_owned(),
            },
        });
        self.fan_out(room, None, &joined, None);
        if sink.send(welcome).is_err() {
            self.evicted.push(id.clone());
        }
        let attachment = self.next_attachment();
        self.tokens.insert(token.clone(), id.clone());
        self.peers.insert(
            id.clone(),
            Peer {
                name: name.to_owned(),
                room: room.to_owned(),
                token,
                attachment,
                link: Link::Live(sink),
            },
        );
        self.rooms
            .entry(room.to_owned())
            .or_default()
            .push(id.clone());
        self.settle();
        Ok(Seat {
            id,
            room: room.to_owned(),
            attachment,
            resumed: false,
        })
    }

    /// Whether `seat` is still its connection's: not evicted, resumed
    /// elsewhere, or expired.
    fn holds(&self, seat: &Seat) -> bool {
        self.peers
            .get(&seat.id)
            .is_some_and(|p| p.attachment == seat.attachment)
    }

    /// Removes a peer and tells the others. Returns `false` if the seat
    /// was no longer its connection's (already left, evicted, or resumed
    /// on another connection).
    pub fn leave(&mut self, seat: &Seat) -> bool {
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

    /// Relays `data` from `from` to the peer `to` in the same room.
    pub fn signal(&mut self, from: &str, to: &str, data: &RawValue) -> Result<(), ErrorCode> {
        let room = &self.peers.get(from).ok_or(ErrorCode::NotJoined)?.room;
        if to == from || self.peers.get(to).is_none_or(|t| &t.room != room) {
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

    /// Relays `data` from `from` to every other peer in its room.
    pub fn broadcast(&mut self, from: &str, data: &RawValue) -> Result<(), ErrorCode> {
        let room = self
            .peers
            .get(from)
            .ok_or(ErrorCode::NotJoined)?
            .room
            .clone();
        let frame = Frame::new(&ServerMessage::Broadcast { from, data });
        self.fan_out(&room, Some(from), &frame, Some(from));
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
            rooms: self.rooms.len(),
            room_sizes: self.rooms.values().map(Vec::len).collect(),
        }
    }

    fn remove(&mut self, id: &str) -> bool {
        let Some(peer) = self.peers.remove(id) else {
            return false;
        };
        self.tokens.remove(&peer.token);
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
        self.fan_out(&peer.room, None, &left, None);
        true
    }

    /// Sends `frame` to everyone in `room` but `except`; `from` is the
    /// peer whose message it relays, if any (see [`Link::take`]).
    fn fan_out(&mut self, room: &str, except: Option<&str>, frame: &Frame, from: Option<&str>) {
        let Some(members) = self.rooms.get(room) else {
            return;
        };
        for member in members {
            if Some(member.as_str()) == except {
                continue;
            }
            if let Some(peer) = self.peers.get_mut(member)
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
        let ida = hub.join("r", "Ada", None, a.clone(), &ice).unwrap();
        let welcome = &a.take()[0];
        assert_eq!(welcome["type"], "welcome");
        assert_eq!(welcome["id"], "p1");
        assert_eq!(welcome["peers"], serde_json::json!([]));
        assert_eq!(welcome["iceServers"][0]["urls"][0], "stun:example.org");

        let idb = hub.join("r", "Bob", None, b.clone(), &ice).unwrap();
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
            .join("r1", "A", None, Recorder::new(10), &[])
            .unwrap()
            .id;
        let b = hub
            .join("r2", "B", None, Recorder::new(10), &[])
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
        hub.join("r", "A", None, Recorder::new(10), &[]).unwrap();
        hub.join("r", "B", None, Recorder::new(10), &[]).unwrap();
        assert_eq!(
            hub.join("r", "C", None, Recorder::new(10), &[]),
            Err(ErrorCode::RoomFull)
        );
        assert_eq!(
            hub.join("other", "D", None, Recorder::new(10), &[]),
            Err(ErrorCode::ServerFull)
        );
        assert_eq!(hub.stats().peers, 2);
    }

    #[test]
    fn ids_never_collide() {
        let mut ids = vec!["same".to_string(), "same".into(), "other".into()].into_iter();
        let mut hub: Hub<Recorder> = Hub::new(HubLimits::new(9, 9), move || ids.next().unwrap());
        let a = hub.join("r", "A", None, Recorder::new(10), &[]).unwrap();
        let b = hub.join("r", "B", None, Recorder::new(10), &[]).unwrap();
        assert_ne!(a.id, b.id);
    }

    #[test]
    fn a_peer_that_does_not_read_is_evicted() {
        let mut hub = hub(16, 10);
        let slow = Recorder::new(3); // welcome, peer-joined, one more
        let fast = Recorder::new(100);
        let s = hub.join("r", "Slow", None, slow.clone(), &[]).unwrap().id;
        let f = hub.join("r", "Fast", None, fast.clone(), &[]).unwrap().id;
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
        let sa = hub.join("r", "A", None, a.clone(), &[]).unwrap();
        let token = a.take()[0]["resume"].as_str().unwrap().to_owned();
        let sb = hub.join("r", "B", None, b.clone(), &[]).unwrap();
        let sc = hub.join("r", "C", None, c.clone(), &[]).unwrap();
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
            .join("s", "X", Some(&token), other.clone(), &[])
            .unwrap();
        assert!(!wrong.resumed);
        let d = Recorder::new(10);
        hub.join("r", "D", None, d, &[]).unwrap();
        let back = Recorder::new(100);
        let seat = hub.join("r", "A", Some(&token), back.clone(), &[]).unwrap();
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
        let se = hub.join("r", "E", None, e.clone(), &[]).unwrap();
        let e_token = e.take()[0]["resume"].as_str().unwrap().to_owned();
        assert_eq!(hub.park(&se, t0), Parked::Kept);
        assert_eq!(hub.expire(t0 + grace), 1);
        assert!(
            b.take()
                .contains(&serde_json::json!({"type": "peer-left", "id": se.id}))
        );
        let again = hub
            .join("r", "E", Some(&e_token), Recorder::new(10), &[])
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
        let sender = hub.join("r", "S", None, Recorder::new(100), &[]).unwrap();
        let (x, y) = (Recorder::new(100), Recorder::new(100));
        let sx = hub.join("r", "X", None, x.clone(), &[]).unwrap();
        let x_token = x.take()[0]["resume"].as_str().unwrap().to_owned();
        let sy = hub.join("r", "Y", None, y, &[]).unwrap();
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
        hub.join("r", "X", Some(&x_token), back.clone(), &[])
            .unwrap();
        assert_eq!(back.take().len(), 3, "welcome and both broadcasts");
        assert_eq!(hub.away_total, 0);
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
        let sa = hub.join("r", "A", None, a, &[]).unwrap();
        hub.join("r", "B", None, b.clone(), &[]).unwrap();
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
        /// Joins room `room` as client `client`, with the token of the
        /// place it last had if `resume`, on a connection whose queue
        /// takes `capacity` frames.
        Join {
            client: usize,
            room: u8,
            resume: bool,
            capacity: usize,
        },
        Leave(usize),
        Lose(usize),
        Signal(usize, usize),
        Broadcast(usize),
        Wait(u64),
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            3 => (0..5usize, 0..2u8, any::<bool>(), prop_oneof![Just(1000usize), 2..12usize]).prop_map(
                |(client, room, resume, capacity)| Op::Join {
                    client,
                    room,
                    resume,
                    capacity
                }
            ),
            1 => (0..5usize).prop_map(Op::Leave),
            2 => (0..5usize).prop_map(Op::Lose),
            1 => (0..5usize, 0..5usize).prop_map(|(a, b)| Op::Signal(a, b)),
            1 => (0..5usize).prop_map(Op::Broadcast),
            1 => (0..1500u64).prop_map(Op::Wait),
        ]
    }

    /// A client's connection: its seat, and what it was sent.
    struct Connection {
        seat: Seat,
        sink: Recorder,
    }

    /// The room as a connection's messages describe it: `welcome.peers`,
    /// then each `peer-joined` and `peer-left` (from the last welcome on);
    /// and the first `signal` or `broadcast` from a peer not in it then.
    fn room_as_told(frames: &[Value]) -> (Vec<String>, Option<Value>) {
        let mut seen: Vec<String> = Vec::new();
        let mut stranger = None;
        for f in frames {
            match f["type"].as_str() {
                Some("signal" | "broadcast") if !seen.iter().any(|id| f["from"] == id.as_str()) => {
                    stranger.get_or_insert_with(|| f.clone());
                }
                Some("welcome") => {
                    seen = f["peers"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|p| p["id"].as_str().unwrap().to_owned())
                        .collect();
                }
                Some("peer-joined") => seen.push(f["peer"]["id"].as_str().unwrap().to_owned()),
                Some("peer-left") => seen.retain(|id| id != f["id"].as_str().unwrap()),
                _ => {}
            }
        }
        (seen, stranger)
    }

    proptest::proptest! {
        /// Arbitrary joins, resumes, leaves, lost connections, signals,
        /// broadcasts and waits by a few clients over two rooms, some with
        /// queues that overflow: the rooms, the peers, the tokens and the
        /// bytes kept for lost connections always agree; every connection
        /// that holds its place was told exactly who else is in its room,
        /// and heard from no one else; and every place lost longer than the
        /// grace is gone.
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
                    Op::Join { client, room, resume, capacity } => {
                        if live[client].is_some() {
                            continue;
                        }
                        let sink = Recorder::new(capacity);
                        let token = tokens[client].clone().filter(|_| resume);
                        let room = format!("r{room}");
                        if let Ok(seat) = hub.join(&room, "n", token.as_deref(), sink.clone(), &[]) {
                            let frames = sink.frames.borrow();
                            if let Some(welcome) = frames.first() {
                                proptest::prop_assert_eq!(welcome["id"].as_str(), Some(seat.id.as_str()));
                                tokens[client] = welcome["resume"].as_str().map(str::to_owned);
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
                }
                // A connection evicted (or whose place was resumed
                // elsewhere) holds nothing any more.
                for c in &mut live {
                    if c.as_ref().is_some_and(|c| !hub.holds(&c.seat)) {
                        *c = None;
                    }
                }

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
                    proptest::prop_assert_eq!(&hub.peers[id].token, token);
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

                // Each connection holding its place knows its room exactly.
                for c in live.iter().flatten() {
                    let (mut told, stranger) = room_as_told(&c.sink.frames.borrow());
                    proptest::prop_assert_eq!(stranger, None, "from someone not in the room");
                    let mut actual: Vec<String> = hub.rooms[&c.seat.room]
                        .iter()
                        .filter(|id| **id != c.seat.id)
                        .cloned()
                        .collect();
                    told.sort();
                    actual.sort();
                    proptest::prop_assert_eq!(told, actual);
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
}
