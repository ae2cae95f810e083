//! Server → client messages.

use serde::Serialize;
use serde_json::value::RawValue;

use crate::ErrorCode;

/// A peer as others see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PeerInfo {
    pub id: String,
    pub name: String,
    /// Whether the peer only watches (`join.watching`); absent: it takes part.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub watching: bool,
}

/// One entry of `welcome.iceServers`, in the shape `RTCPeerConnection` takes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IceServer {
    pub urls: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
}

/// A message from the server. `data` fields carry the sender's JSON unchanged.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum ServerMessage<'a> {
    Welcome {
        id: &'a str,
        room: &'a str,
        version: u32,
        peers: Vec<PeerInfo>,
        #[serde(rename = "iceServers")]
        ice_servers: &'a [IceServer],
        /// Sent back in `join.resume` after a lost connection, to take this
        /// place in the room again. Known to this client alone.
        resume: &'a str,
        /// Whether this `welcome` resumed a lost connection's place (same
        /// `id`, no `peer-left`/`peer-joined` for the others).
        resumed: bool,
        /// Whether the room is locked (newcomers knock); absent: not.
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        locked: bool,
        /// Whether, locked, the room still lets in without knocking those
        /// who join to watch; absent: not.
        #[serde(rename = "openToAudience", skip_serializing_if = "std::ops::Not::not")]
        open_to_audience: bool,
        /// Who knocks on the locked room, waiting to be let in; absent: nobody.
        #[serde(skip_serializing_if = "Vec::is_empty")]
        waiting: Vec<PeerInfo>,
    },
    /// To a client that joined a locked room: it waits until someone in
    /// the room lets it in (`welcome`) or turns it away (`not-admitted`).
    Waiting {
        room: &'a str,
    },
    /// To those in a locked room: someone knocks.
    Knock {
        peer: PeerInfo,
    },
    /// To those in a locked room: someone stopped knocking: let in
    /// (`admitted`), turned away, or gone.
    KnockEnded {
        id: &'a str,
        admitted: bool,
    },
    /// To everyone in a room: it was locked or unlocked, by `by`; and
    /// whether, locked, it lets in those who join to watch (absent: not).
    Locked {
        locked: bool,
        by: &'a str,
        #[serde(rename = "openToAudience", skip_serializing_if = "std::ops::Not::not")]
        open_to_audience: bool,
    },
    PeerJoined {
        peer: PeerInfo,
    },
    PeerLeft {
        id: &'a str,
    },
    Signal {
        from: &'a str,
        data: &'a RawValue,
    },
    Broadcast {
        from: &'a str,
        data: &'a RawValue,
    },
    /// Fresh `iceServers` for a joined client, before the TURN credentials
    /// of the last ones expire: for the peer connections it makes from now
    /// on (a newcomer, an ICE restart).
    IceServers {
        #[serde(rename = "iceServers")]
        ice_servers: &'a [IceServer],
    },
    Pong,
    Error {
        code: ErrorCode,
        message: &'a str,
    },
}

impl ServerMessage<'_> {
    /// The message's `type`, for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            ServerMessage::Welcome { .. } => "welcome",
            ServerMessage::Waiting { .. } => "waiting",
            ServerMessage::Knock { .. } => "knock",
            ServerMessage::KnockEnded { .. } => "knock-ended",
            ServerMessage::Locked { .. } => "locked",
            ServerMessage::PeerJoined { .. } => "peer-joined",
            ServerMessage::PeerLeft { .. } => "peer-left",
            ServerMessage::Signal { .. } => "signal",
            ServerMessage::Broadcast { .. } => "broadcast",
            ServerMessage::IceServers { .. } => "ice-servers",
            ServerMessage::Pong => "pong",
            ServerMessage::Error { .. } => "error",
        }
    }

    /// Serializes to the text of one WebSocket frame.
    pub fn to_json(&self) -> String {
        // Serializing these types cannot fail: every map key is a string and
        // raw values were validated JSON when they were decoded.
        serde_json::to_string(self).unwrap_or_else(|_| {
            String::from(
                r#"{"type":"error","code":"bad-message","message":"internal serialization error"}"#,
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_shapes() {
        let ice = [IceServer {
            urls: vec!["stun:127.0.0.1:3478".into()],
            username: None,
            credential: None,
        }];
        let welcome = ServerMessage::Welcome {
            id: "p1",
            room: "r",
            version: 1,
            peers: vec![
                PeerInfo {
                    id: "p0".into(),
                    name: "Ada".into(),
                    watching: false,
                },
                PeerInfo {
                    id: "p2".into(),
                    name: "Vi".into(),
                    watching: true,
                },
            ],
            ice_servers: &ice,
            resume: "t1",
            resumed: false,
            locked: false,
            open_to_audience: false,
            waiting: vec![],
        };
        assert_eq!(
            welcome.to_json(),
            r#"{"type":"welcome","id":"p1","room":"r","version":1,"peers":[{"id":"p0","name":"Ada"},{"id":"p2","name":"Vi","watching":true}],"iceServers":[{"urls":["stun:127.0.0.1:3478"]}],"resume":"t1","resumed":false}"#
        );
        let data = RawValue::from_string(r#"{"a": [1, 2]}"#.into()).unwrap();
        assert_eq!(
            ServerMessage::Signal {
                from: "p0",
                data: &data
            }
            .to_json(),
            r#"{"type":"signal","from":"p0","data":{"a": [1, 2]}}"#
        );
        assert_eq!(ServerMessage::Pong.to_json(), r#"{"type":"pong"}"#);
        let knocked = ServerMessage::Welcome {
            id: "p1",
            room: "r",
            version: 1,
            peers: vec![],
            ice_servers: &[],
            resume: "t1",
            resumed: false,
            locked: true,
            open_to_audience: false,
            waiting: vec![PeerInfo {
                id: "p3".into(),
                name: "Cy".into(),
                watching: false,
            }],
        };
        assert_eq!(
            knocked.to_json(),
            r#"{"type":"welcome","id":"p1","room":"r","version":1,"peers":[],"iceServers":[],"resume":"t1","resumed":false,"locked":true,"waiting":[{"id":"p3","name":"Cy"}]}"#
        );
        assert_eq!(
            ServerMessage::Waiting { room: "r" }.to_json(),
            r#"{"type":"waiting","room":"r"}"#
        );
        assert_eq!(
            ServerMessage::KnockEnded {
                id: "p3",
                admitted: true
            }
            .to_json(),
            r#"{"type":"knock-ended","id":"p3","admitted":true}"#
        );
        assert_eq!(
            ServerMessage::Locked {
                locked: true,
                by: "p1",
                open_to_audience: false,
            }
            .to_json(),
            r#"{"type":"locked","locked":true,"by":"p1"}"#
        );
        assert_eq!(
            ServerMessage::Locked {
                locked: true,
                by: "p1",
                open_to_audience: true,
            }
            .to_json(),
            r#"{"type":"locked","locked":true,"by":"p1","openToAudience":true}"#
        );
        assert_eq!(
            ServerMessage::IceServers { ice_servers: &ice }.to_json(),
            r#"{"type":"ice-servers","iceServers":[{"urls":["stun:127.0.0.1:3478"]}]}"#
        );
        assert_eq!(
            ServerMessage::Error {
                code: ErrorCode::RoomFull,
                message: "full"
            }
            .to_json(),
            r#"{"type":"error","code":"room-full","message":"full"}"#
        );
        assert_eq!(
            ServerMessage::PeerLeft { id: "p0" }.to_json(),
            r#"{"type":"peer-left","id":"p0"}"#
        );
    }
}
