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

use std::collections::HashMap;

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
    /// The hub removed this peer because its queue overflowed; the driver
    /// should close the connection with this reason.
    fn evict(&self, reason: &'static str);
}

/// Limits the hub enforces.
#[derive(Debug, Clone, Copy)]
pub struct HubLimits {
    pub max_room_size: usize,
    pub max_rooms: usize,
}

/// A snapshot for metrics and health checks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HubStats {
    pub peers: usize,
    pub rooms: usize,
    /// The size of every room, in no particular order.
    pub room_sizes: Vec<usize>,
}

struct Peer<S> {
    name: String,
    room: String,
    sink: S,
}

/// The rooms and the peers in them.
pub struct Hub<S> {
    limits: HubLimits,
    /// Peer ids in join order, per room.
    rooms: HashMap<String, Vec<String>>,
    peers: HashMap<String, Peer<S>>,
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
            new_id: Box::new(new_id),
            evicted: Vec::new(),
        }
    }

    /// Adds a peer to `room` (created on first join), sends it `welcome` and
    /// tells the others. Returns the new peer's id.
    pub fn join(
        &mut self,
        room: &str,
        name: &str,
        sink: S,
        ice_servers: &[IceServer],
    ) -> Result<String, ErrorCode> {
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
        let existing: Vec<PeerInfo> = members
            .into_iter()
            .flatten()
            .filter_map(|pid| {
                self.peers.get(pid).map(|p| PeerInfo {
                    id: pid.clone(),
                    name: p.name.clone(),
                })
            })
            .collect();
        let welcome = Frame::new(&ServerMessage::Welcome {
            id: &id,
            room,
            version: PROTOCOL_VERSION,
            peers: existing,
            ice_servers,
        });
        let joined = Frame::new(&ServerMessage::PeerJoined {
            peer: PeerInfo {
                id: id.clone(),
                name: name.to_owned(),
            },
        });
        self.fan_out(room, None, &joined);
        if sink.send(welcome).is_err() {
            self.evicted.push(id.clone());
        }
        self.peers.insert(
            id.clone(),
            Peer {
                name: name.to_owned(),
                room: room.to_owned(),
                sink,
            },
        );
        self.rooms
            .entry(room.to_owned())
            .or_default()
            .push(id.clone());
        self.settle();
        Ok(id)
    }

    /// Removes a peer and tells the others. Returns `false` if it was not
    /// in a room (already left, or evicted).
    pub fn leave(&mut self, id: &str) -> bool {
        let removed = self.remove(id);
        self.settle();
        removed
    }

    /// Relays `data` from `from` to the peer `to` in the same room.
    pub fn signal(&mut self, from: &str, to: &str, data: &RawValue) -> Result<(), ErrorCode> {
        let room = &self.peers.get(from).ok_or(ErrorCode::NotJoined)?.room;
        let target = self
            .peers
            .get(to)
            .filter(|t| &t.room == room && to != from)
            .ok_or(ErrorCode::UnknownPeer)?;
        let frame = Frame::new(&ServerMessage::Signal { from, data });
        if target.sink.send(frame).is_err() {
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
        self.fan_out(&room, Some(from), &frame);
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
            rooms: self.rooms.len(),
            room_sizes: self.rooms.values().map(Vec::len).collect(),
        }
    }

    fn remove(&mut self, id: &str) -> bool {
        let Some(peer) = self.peers.remove(id) else {
            return false;
        };
        if let Some(members) = self.rooms.get_mut(&peer.room) {
            members.retain(|m| m != id);
            if members.is_empty() {
                self.rooms.remove(&peer.room);
            }
        }
        let left = Frame::new(&ServerMessage::PeerLeft { id });
        self.fan_out(&peer.room, None, &left);
        true
    }

    fn fan_out(&mut self, room: &str, except: Option<&str>, frame: &Frame) {
        let Some(members) = self.rooms.get(room) else {
            return;
        };
        for member in members {
            if Some(member.as_str()) == except {
                continue;
            }
            if let Some(peer) = self.peers.get(member)
                && peer.sink.send(frame.clone()).is_err()
            {
                self.evicted.push(member.clone());
            }
        }
    }

    /// Removes peers whose sinks overflowed; removing one can overflow
    /// another, so this loops until nothing is left.
    fn settle(&mut self) {
        while let Some(id) = self.evicted.pop() {
            if let Some(peer) = self.peers.get(&id) {
                peer.sink
                    .evict("send queue full: the client is not reading");
                tracing::warn!(peer = %id, room = %peer.room, "evicted a peer whose send queue overflowed");
                metrics::counter!("callisto_signaling_evictions_total").increment(1);
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
        Hub::new(
            HubLimits {
                max_room_size,
                max_rooms,
            },
            move || {
                n += 1;
                format!("p{n}")
            },
        )
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
        let ida = hub.join("r", "Ada", a.clone(), &ice).unwrap();
        let welcome = &a.take()[0];
        assert_eq!(welcome["type"], "welcome");
        assert_eq!(welcome["id"], "p1");
        assert_eq!(welcome["peers"], serde_json::json!([]));
        assert_eq!(welcome["iceServers"][0]["urls"][0], "stun:example.org");

        let idb = hub.join("r", "Bob", b.clone(), &ice).unwrap();
        assert_eq!(
            b.take()[0]["peers"],
            serde_json::json!([{"id": "p1", "name": "Ada"}])
        );
        assert_eq!(
            a.take(),
            vec![serde_json::json!({"type": "peer-joined", "peer": {"id": "p2", "name": "Bob"}})]
        );

        hub.signal(&ida, &idb, &raw(r#"{"sdp":"x"}"#)).unwrap();
        assert_eq!(
            b.take(),
            vec![serde_json::json!({"type": "signal", "from": "p1", "data": {"sdp": "x"}})]
        );
        assert!(a.take().is_empty());

        hub.broadcast(&idb, &raw("[1]")).unwrap();
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
        let a = hub.join("r1", "A", Recorder::new(10), &[]).unwrap();
        let b = hub.join("r2", "B", Recorder::new(10), &[]).unwrap();
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
        hub.join("r", "A", Recorder::new(10), &[]).unwrap();
        hub.join("r", "B", Recorder::new(10), &[]).unwrap();
        assert_eq!(
            hub.join("r", "C", Recorder::new(10), &[]),
            Err(ErrorCode::RoomFull)
        );
        assert_eq!(
            hub.join("other", "D", Recorder::new(10), &[]),
            Err(ErrorCode::ServerFull)
        );
        assert_eq!(hub.stats().peers, 2);
    }

    #[test]
    fn ids_never_collide() {
        let mut ids = vec!["same".to_string(), "same".into(), "other".into()].into_iter();
        let mut hub: Hub<Recorder> = Hub::new(
            HubLimits {
                max_room_size: 9,
                max_rooms: 9,
            },
            move || ids.next().unwrap(),
        );
        let a = hub.join("r", "A", Recorder::new(10), &[]).unwrap();
        let b = hub.join("r", "B", Recorder::new(10), &[]).unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn a_peer_that_does_not_read_is_evicted() {
        let mut hub = hub(16, 10);
        let slow = Recorder::new(3); // welcome, peer-joined, one more
        let fast = Recorder::new(100);
        let s = hub.join("r", "Slow", slow.clone(), &[]).unwrap();
        let f = hub.join("r", "Fast", fast.clone(), &[]).unwrap();
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

    #[test]
    fn random_ids_are_128_bit_hex() {
        let a = random_peer_id();
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(a, random_peer_id());
    }
}
