//! Server → client messages as a client receives them.
//!
//! [`ServerMessage`](crate::ServerMessage) is what the server writes: it
//! borrows from the hub's state and only serializes. A client needs the
//! other direction, owned (a frame's strings may hold escapes, so they
//! cannot borrow from it) and lenient where the protocol says clients must
//! be: a message of a `type` it does not know is [`Received::Unknown`], not
//! an error, so the server can add messages; an error `code` stays a
//! string, so the server can add codes.

use serde::Deserialize;
use serde_json::Value;

/// A peer as the server describes it (`welcome.peers`, `peer-joined`, `knock`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ReceivedPeer {
    pub id: String,
    pub name: String,
    /// Whether it only watches: it sends no media, and offers only to
    /// those taking part.
    #[serde(default)]
    pub watching: bool,
}

/// One entry of `iceServers`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ReceivedIceServer {
    pub urls: Vec<String>,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub credential: Option<String>,
}

/// A decoded server message. `data` is the sending peer's JSON.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Received {
    Welcome {
        id: String,
        room: String,
        version: u32,
        peers: Vec<ReceivedPeer>,
        #[serde(rename = "iceServers")]
        ice_servers: Vec<ReceivedIceServer>,
        resume: String,
        resumed: bool,
        #[serde(default)]
        locked: bool,
        #[serde(default, rename = "openToAudience")]
        open_to_audience: bool,
        #[serde(default)]
        waiting: Vec<ReceivedPeer>,
    },
    Waiting {
        room: String,
    },
    Knock {
        peer: ReceivedPeer,
    },
    KnockEnded {
        id: String,
        admitted: bool,
    },
    Locked {
        locked: bool,
        by: String,
        #[serde(default, rename = "openToAudience")]
        open_to_audience: bool,
    },
    PeerJoined {
        peer: ReceivedPeer,
    },
    PeerLeft {
        id: String,
    },
    Signal {
        from: String,
        data: Value,
    },
    Broadcast {
        from: String,
        data: Value,
    },
    IceServers {
        #[serde(rename = "iceServers")]
        ice_servers: Vec<ReceivedIceServer>,
    },
    Pong,
    Error {
        code: String,
        message: String,
    },
    /// A `type` this version does not know: to be ignored.
    #[serde(other)]
    Unknown,
}

/// Why a server frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("undecodable server message: {0}")]
pub struct ReceiveError(String);

/// Decodes one text frame from the server.
pub fn decode_server(text: &str) -> Result<Received, ReceiveError> {
    serde_json::from_str(text).map_err(|e| ReceiveError(e.to_string()))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::value::RawValue;

    use super::*;
    use crate::{ErrorCode, IceServer, PeerInfo, ServerMessage};

    fn peer(id: &str, name: &str, watching: bool) -> PeerInfo {
        PeerInfo {
            id: id.into(),
            name: name.into(),
            watching,
        }
    }

    #[test]
    fn decodes_what_the_server_writes() {
        let ice = [IceServer {
            urls: vec!["turn:127.0.0.1:3478?transport=udp".into()],
            username: Some("1795570000:ab".into()),
            credential: Some("c=".into()),
        }];
        let welcome = ServerMessage::Welcome {
            id: "a1",
            room: "standup",
            version: 1,
            peers: vec![
                peer("b2", "Bob \"the\" builder", false),
                peer("c3", "Cy", true),
            ],
            ice_servers: &ice,
            resume: "tok",
            resumed: false,
            locked: false,
            open_to_audience: false,
            waiting: vec![],
        };
        assert_eq!(
            decode_server(&welcome.to_json()).unwrap(),
            Received::Welcome {
                id: "a1".into(),
                room: "standup".into(),
                version: 1,
                peers: vec![
                    ReceivedPeer {
                        id: "b2".into(),
                        name: "Bob \"the\" builder".into(),
                        watching: false,
                    },
                    ReceivedPeer {
                        id: "c3".into(),
                        name: "Cy".into(),
                        watching: true,
                    }
                ],
                ice_servers: vec![ReceivedIceServer {
                    urls: ice[0].urls.clone(),
                    username: ice[0].username.clone(),
                    credential: ice[0].credential.clone(),
                }],
                resume: "tok".into(),
                resumed: false,
                locked: false,
                open_to_audience: false,
                waiting: vec![],
            }
        );
        let data = RawValue::from_string(r#"{"candidate":null}"#.into()).unwrap();
        let signal = ServerMessage::Signal {
            from: "b2",
            data: &data,
        };
        assert_eq!(
            decode_server(&signal.to_json()).unwrap(),
            Received::Signal {
                from: "b2".into(),
                data: serde_json::json!({"candidate": null}),
            }
        );
        let error = ServerMessage::Error {
            code: ErrorCode::RoomFull,
            message: "full",
        };
        assert_eq!(
            decode_server(&error.to_json()).unwrap(),
            Received::Error {
                code: "room-full".into(),
                message: "full".into()
            }
        );
        assert_eq!(
            decode_server(&ServerMessage::Pong.to_json()).unwrap(),
            Received::Pong
        );
    }

    #[test]
    fn an_unknown_type_is_not_an_error() {
        assert_eq!(
            decode_server(r#"{"type":"from-the-future","x":1}"#).unwrap(),
            Received::Unknown
        );
        assert!(decode_server(r#"{"type":"peer-left"}"#).is_err());
        assert!(decode_server("[]").is_err());
    }

    proptest! {
        #[test]
        fn arbitrary_text_never_panics(text in ".{0,300}") {
            let _ = decode_server(&text);
        }

        #[test]
        fn every_peer_message_round_trips(id in "[0-9a-f]{1,32}", name in "\\PC{1,64}", admitted: bool, watching: bool) {
            let joined = ServerMessage::PeerJoined { peer: peer(&id, &name, watching) };
            prop_assert_eq!(
                decode_server(&joined.to_json()).unwrap(),
                Received::PeerJoined { peer: ReceivedPeer { id: id.clone(), name: name.clone(), watching } }
            );
            let ended = ServerMessage::KnockEnded { id: &id, admitted };
            prop_assert_eq!(
                decode_server(&ended.to_json()).unwrap(),
                Received::KnockEnded { id: id.clone(), admitted }
            );
        }
    }
}
