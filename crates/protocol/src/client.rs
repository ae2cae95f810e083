//! Client → server messages and their decoder.
//!
//! Decoding goes through a flat envelope rather than a serde-tagged enum
//! because `data` must stay opaque: it is kept as the raw JSON text the client
//! sent ([`RawValue`]) and forwarded byte for byte, and serde's internally
//! tagged enums cannot carry raw values. The envelope also lets every error
//! say exactly which field is wrong.

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::{ErrorCode, validate_name, validate_room};

/// A decoded, validated client message. `data` borrows the original frame.
#[derive(Debug, Clone)]
pub enum ClientMessage<'a> {
    /// `{"type":"join","room":R,"name":N}`, with `"resume":TOKEN` to take
    /// back the place of a connection that was lost, and `"access":CODE`
    /// on a server that needs an access code, and `"watching":true` to
    /// watch (receive only, seen only by those taking part); `name` is
    /// already trimmed.
    Join {
        room: String,
        name: String,
        resume: Option<String>,
        access: Option<String>,
        watching: bool,
    },
    /// `{"type":"signal","to":ID,"data":ANY}`
    Signal { to: String, data: &'a RawValue },
    /// `{"type":"broadcast","data":ANY}`
    Broadcast { data: &'a RawValue },
    /// `{"type":"leave"}`: leaves the room, or stops knocking.
    Leave,
    /// `{"type":"ping"}`
    Ping,
    /// `{"type":"lock","locked":BOOL}`: from then on, newcomers knock and
    /// wait until someone in the room lets them in (`false`: they join
    /// straight away, and those waiting come in). With
    /// `"openToAudience":true`, those who join to watch still come in
    /// without knocking: only those taking part are kept out.
    Lock {
        locked: bool,
        open_to_audience: bool,
    },
    /// `{"type":"admit","id":ID}`: lets in someone knocking.
    Admit { id: String },
    /// `{"type":"deny","id":ID}`: turns away someone knocking.
    Deny { id: String },
}

impl PartialEq for ClientMessage<'_> {
    fn eq(&self, other: &Self) -> bool {
        use ClientMessage::*;
        match (self, other) {
            (
                Join {
                    room: r1,
                    name: n1,
                    resume: t1,
                    access: a1,
                    watching: w1,
                },
                Join {
                    room: r2,
                    name: n2,
                    resume: t2,
                    access: a2,
                    watching: w2,
                },
            ) => r1 == r2 && n1 == n2 && t1 == t2 && a1 == a2 && w1 == w2,
            (Signal { to: t1, data: d1 }, Signal { to: t2, data: d2 }) => {
                t1 == t2 && d1.get() == d2.get()
            }
            (Broadcast { data: d1 }, Broadcast { data: d2 }) => d1.get() == d2.get(),
            (Leave, Leave) | (Ping, Ping) => true,
            (
                Lock {
                    locked: l1,
                    open_to_audience: o1,
                },
                Lock {
                    locked: l2,
                    open_to_audience: o2,
                },
            ) => l1 == l2 && o1 == o2,
            (Admit { id: i1 }, Admit { id: i2 }) | (Deny { id: i1 }, Deny { id: i2 }) => i1 == i2,
            _ => false,
        }
    }
}

impl ClientMessage<'_> {
    /// The message's `type`, for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            ClientMessage::Join { .. } => "join",
            ClientMessage::Signal { .. } => "signal",
            ClientMessage::Broadcast { .. } => "broadcast",
            ClientMessage::Leave => "leave",
            ClientMessage::Ping => "ping",
            ClientMessage::Lock { .. } => "lock",
            ClientMessage::Admit { .. } => "admit",
            ClientMessage::Deny { .. } => "deny",
        }
    }
}

/// The longest `join.resume` taken; the server's tokens are 32 characters.
pub const MAX_RESUME_TOKEN_BYTES: usize = 64;

/// The longest `join.access` taken.
pub const MAX_ACCESS_CODE_BYTES: usize = 256;

/// Why a frame was refused, ready to send back as an `error` message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct DecodeError {
    pub code: ErrorCode,
    pub message: String,
}

impl DecodeError {
    fn bad(message: impl Into<String>) -> Self {
        DecodeError {
            code: ErrorCode::BadMessage,
            message: message.into(),
        }
    }
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(rename = "type")]
    kind: Option<String>,
    room: Option<String>,
    name: Option<String>,
    to: Option<String>,
    resume: Option<String>,
    access: Option<String>,
    locked: Option<bool>,
    watching: Option<bool>,
    #[serde(rename = "openToAudience")]
    open_to_audience: Option<bool>,
    id: Option<String>,
    // `null` is a valid payload, so a present `data` must not collapse to None.
    #[serde(default, borrow, deserialize_with = "present")]
    data: Option<&'a RawValue>,
}

fn present<'de, D>(d: D) -> Result<Option<&'de RawValue>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    <&RawValue>::deserialize(d).map(Some)
}

/// Decodes one text frame. Unknown fields are ignored, so that later protocol
/// versions can add fields without breaking version-1 servers.
pub fn decode_client(text: &str) -> Result<ClientMessage<'_>, DecodeError> {
    if !text.trim_start().starts_with('{') {
        return Err(DecodeError::bad("expected a JSON object"));
    }
    let env: Envelope<'_> =
        serde_json::from_str(text).map_err(|e| DecodeError::bad(format!("invalid JSON: {e}")))?;
    let kind = env
        .kind
        .ok_or_else(|| DecodeError::bad("missing field \"type\""))?;
    let field = |value: Option<String>, name: &str| {
        value.ok_or_else(|| DecodeError::bad(format!("\"{kind}\" needs field \"{name}\"")))
    };
    match kind.as_str() {
        "join" => {
            let room = field(env.room, "room")?;
            let name = field(env.name, "name")?;
            validate_room(&room).map_err(|code| DecodeError {
                code,
                message: "room must be 1-64 characters of A-Z, a-z, 0-9, '_' or '-'".into(),
            })?;
            let name = validate_name(&name)
                .map_err(|code| DecodeError {
                    code,
                    message:
                        "name must be 1-64 characters after trimming, without control characters"
                            .into(),
                })?
                .to_owned();
            if env
                .resume
                .as_deref()
                .is_some_and(|t| t.is_empty() || t.len() > MAX_RESUME_TOKEN_BYTES)
            {
                return Err(DecodeError::bad(format!(
                    "resume must be the token from welcome (1-{MAX_RESUME_TOKEN_BYTES} characters)"
                )));
            }
            if env
                .access
                .as_deref()
                .is_some_and(|a| a.is_empty() || a.len() > MAX_ACCESS_CODE_BYTES)
            {
                return Err(DecodeError::bad(format!(
                    "access must be 1-{MAX_ACCESS_CODE_BYTES} bytes"
                )));
            }
            Ok(ClientMessage::Join {
                room,
                name,
                resume: env.resume,
                access: env.access,
                watching: env.watching.unwrap_or(false),
            })
        }
        "signal" => {
            let to = field(env.to, "to")?;
            let data = env
                .data
                .ok_or_else(|| DecodeError::bad("\"signal\" needs field \"data\""))?;
            Ok(ClientMessage::Signal { to, data })
        }
        "broadcast" => {
            let data = env
                .data
                .ok_or_else(|| DecodeError::bad("\"broadcast\" needs field \"data\""))?;
            Ok(ClientMessage::Broadcast { data })
        }
        "leave" => Ok(ClientMessage::Leave),
        "ping" => Ok(ClientMessage::Ping),
        "lock" => {
            let locked = env.locked.ok_or_else(|| {
                DecodeError::bad("\"lock\" needs field \"locked\" (true or false)")
            })?;
            Ok(ClientMessage::Lock {
                locked,
                open_to_audience: env.open_to_audience.unwrap_or(false),
            })
        }
        "admit" => Ok(ClientMessage::Admit {
            id: field(env.id, "id")?,
        }),
        "deny" => Ok(ClientMessage::Deny {
            id: field(env.id, "id")?,
        }),
        other => {
            let shown: String = other.chars().take(32).collect();
            Err(DecodeError::bad(format!(
                "unknown message type \"{shown}\""
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(text: &str) -> ErrorCode {
        decode_client(text).unwrap_err().code
    }

    #[test]
    fn decodes_every_type() {
        assert_eq!(
            decode_client(r#"{"type":"join","room":"r1","name":" Ada "}"#).unwrap(),
            ClientMessage::Join {
                room: "r1".into(),
                name: "Ada".into(),
                resume: None,
                access: None,
                watching: false,
            }
        );
        assert_eq!(
            decode_client(r#"{"type":"join","room":"r1","name":"Ada","resume":"0f"}"#).unwrap(),
            ClientMessage::Join {
                room: "r1".into(),
                name: "Ada".into(),
                resume: Some("0f".into()),
                access: None,
                watching: false,
            }
        );
        assert_eq!(
            decode_client(r#"{"type":"join","room":"r1","name":"Ada","access":"moon rise"}"#)
                .unwrap(),
            ClientMessage::Join {
                room: "r1".into(),
                name: "Ada".into(),
                resume: None,
                access: Some("moon rise".into()),
                watching: false,
            }
        );
        assert_eq!(
            decode_client(r#"{"type":"join","room":"r1","name":"Ada","watching":true}"#).unwrap(),
            ClientMessage::Join {
                room: "r1".into(),
                name: "Ada".into(),
                resume: None,
                access: None,
                watching: true,
            }
        );
        for bad in [
            r#"{"type":"join","room":"r1","name":"Ada","watching":"yes"}"#.to_owned(),
            r#"{"type":"join","room":"r1","name":"Ada","access":""}"#.to_owned(),
            format!(
                r#"{{"type":"join","room":"r1","name":"Ada","access":"{}"}}"#,
                "a".repeat(MAX_ACCESS_CODE_BYTES + 1)
            ),
            r#"{"type":"join","room":"r1","name":"Ada","access":7}"#.to_owned(),
        ] {
            assert_eq!(
                decode_client(&bad).unwrap_err().code,
                ErrorCode::BadMessage,
                "{bad}"
            );
        }
        match decode_client(r#"{"type":"signal","to":"abc","data":{"sdp":"v=0\r\n"}}"#).unwrap() {
            ClientMessage::Signal { to, data } => {
                assert_eq!(to, "abc");
                assert_eq!(data.get(), r#"{"sdp":"v=0\r\n"}"#);
            }
            other => panic!("{other:?}"),
        }
        match decode_client(r#"{"type":"broadcast","data":null}"#).unwrap() {
            ClientMessage::Broadcast { data } => assert_eq!(data.get(), "null"),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            decode_client(r#"{"type":"leave"}"#).unwrap(),
            ClientMessage::Leave
        );
        assert_eq!(
            decode_client(r#" {"type":"ping","extra":[1,2]}"#).unwrap(),
            ClientMessage::Ping
        );
        assert_eq!(
            decode_client(r#"{"type":"lock","locked":true}"#).unwrap(),
            ClientMessage::Lock {
                locked: true,
                open_to_audience: false
            }
        );
        assert_eq!(
            decode_client(r#"{"type":"lock","locked":true,"openToAudience":true}"#).unwrap(),
            ClientMessage::Lock {
                locked: true,
                open_to_audience: true
            }
        );
        assert_eq!(
            decode_client(r#"{"type":"admit","id":"p2"}"#).unwrap(),
            ClientMessage::Admit { id: "p2".into() }
        );
        assert_eq!(
            decode_client(r#"{"type":"deny","id":"p2"}"#).unwrap(),
            ClientMessage::Deny { id: "p2".into() }
        );
        for bad in [
            r#"{"type":"lock"}"#,
            r#"{"type":"lock","locked":"yes"}"#,
            r#"{"type":"lock","locked":true,"openToAudience":1}"#,
            r#"{"type":"admit"}"#,
            r#"{"type":"deny","id":7}"#,
        ] {
            assert_eq!(code(bad), ErrorCode::BadMessage, "{bad}");
        }
    }

    #[test]
    fn refuses_with_the_right_code() {
        assert_eq!(code(""), ErrorCode::BadMessage);
        assert_eq!(code("null"), ErrorCode::BadMessage);
        assert_eq!(code("[1]"), ErrorCode::BadMessage);
        assert_eq!(code("{"), ErrorCode::BadMessage);
        assert_eq!(code(r#"{"room":"r"}"#), ErrorCode::BadMessage);
        assert_eq!(code(r#"{"type":"dance"}"#), ErrorCode::BadMessage);
        assert_eq!(code(r#"{"type":5}"#), ErrorCode::BadMessage);
        assert_eq!(code(r#"{"type":"join","name":"a"}"#), ErrorCode::BadMessage);
        assert_eq!(
            code(r#"{"type":"join","room":7,"name":"a"}"#),
            ErrorCode::BadMessage
        );
        assert_eq!(
            code(r#"{"type":"join","room":"a b","name":"a"}"#),
            ErrorCode::BadRoom
        );
        assert_eq!(
            code(r#"{"type":"join","room":"ab","name":"  "}"#),
            ErrorCode::BadName
        );
        assert_eq!(code(r#"{"type":"signal","to":"x"}"#), ErrorCode::BadMessage);
        assert_eq!(code(r#"{"type":"signal","data":1}"#), ErrorCode::BadMessage);
        assert_eq!(code(r#"{"type":"broadcast"}"#), ErrorCode::BadMessage);
        assert_eq!(
            code(r#"{"type":"join","room":"ab","name":"a","resume":""}"#),
            ErrorCode::BadMessage
        );
        assert_eq!(
            code(&format!(
                r#"{{"type":"join","room":"ab","name":"a","resume":"{}"}}"#,
                "f".repeat(65)
            )),
            ErrorCode::BadMessage
        );
        assert_eq!(
            code(r#"{"type":"join","room":"ab","name":"a","resume":7}"#),
            ErrorCode::BadMessage
        );
    }

    #[test]
    fn unknown_type_is_quoted_briefly() {
        let long = "x".repeat(1000);
        let err = decode_client(&format!(r#"{{"type":"{long}"}}"#)).unwrap_err();
        assert!(err.message.len() < 100, "{}", err.message);
    }
}
