//! Messages on the `chat` data channel, as the web app writes and reads
//! them (docs/protocol.md, "Chat"): `chat`, and `moved` / `moved-ack`
//! after a restart of the server. The rules are the web app's (chat.js),
//! so a browser and this peer take and refuse the same messages.

use serde_json::{Value, json};

/// The chat channel's label and subprotocol.
pub const CHAT_LABEL: &str = "chat";
pub const CHAT_PROTOCOL: &str = "callisto.chat.v1";

/// The longest chat text, in characters (code points).
pub const MAX_CHAT_CHARS: usize = 4000;
// The longest message read at all: a text of MAX_CHAT_CHARS escaped
// characters and the JSON around it.
const MAX_MESSAGE_BYTES: usize = 6 * MAX_CHAT_CHARS + 64;
// `moved` and `moved-ack` carry an id only.
const MAX_MOVED_BYTES: usize = 200;

/// A message on the chat channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelMessage {
    /// Someone wrote `text`; `private` when to this peer alone.
    Chat { text: String, private: bool },
    /// The sender is back with the server under the id `id`.
    Moved { id: String },
    /// The answer to our `moved`.
    MovedAck { id: String },
}

/// Why a message on the chat channel was ignored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChatError {
    #[error("a binary message")]
    Binary,
    #[error("a message of {0} bytes")]
    TooLong(usize),
    #[error("not JSON")]
    NotJson,
    #[error("an unknown type {0}")]
    UnknownType(String),
    #[error("no text")]
    NoText,
    #[error("a text longer than {MAX_CHAT_CHARS} characters")]
    TextTooLong,
    #[error("a \"private\" that is not true or false")]
    BadPrivate,
    #[error("a \"{0}\" without a peer id")]
    NoPeerId(&'static str),
}

impl ChannelMessage {
    /// A chat message to send, or why it cannot go: empty, only white
    /// space, or over [`MAX_CHAT_CHARS`].
    pub fn chat(text: &str, private: bool) -> Result<ChannelMessage, ChatError> {
        if text.trim().is_empty() {
            return Err(ChatError::NoText);
        }
        if text.chars().count() > MAX_CHAT_CHARS {
            return Err(ChatError::TextTooLong);
        }
        Ok(ChannelMessage::Chat {
            text: text.to_owned(),
            private,
        })
    }

    /// The text of the data channel message.
    pub fn encode(&self) -> String {
        let value = match self {
            ChannelMessage::Chat {
                text,
                private: true,
            } => json!({"type": "chat", "text": text, "private": true}),
            ChannelMessage::Chat { text, .. } => json!({"type": "chat", "text": text}),
            ChannelMessage::Moved { id } => json!({"type": "moved", "id": id}),
            ChannelMessage::MovedAck { id } => json!({"type": "moved-ack", "id": id}),
        };
        value.to_string()
    }

    /// Reads one data channel message.
    pub fn decode(binary: bool, data: &[u8]) -> Result<ChannelMessage, ChatError> {
        if binary {
            return Err(ChatError::Binary);
        }
        if data.len() > MAX_MESSAGE_BYTES {
            return Err(ChatError::TooLong(data.len()));
        }
        let value: Value = serde_json::from_slice(data).map_err(|_| ChatError::NotJson)?;
        let kind = value.get("type").and_then(Value::as_str);
        match kind {
            Some(kind @ ("moved" | "moved-ack")) => {
                let kind = if kind == "moved" {
                    "moved"
                } else {
                    "moved-ack"
                };
                if data.len() > MAX_MOVED_BYTES {
                    return Err(ChatError::TooLong(data.len()));
                }
                let id = value
                    .get("id")
                    .and_then(Value::as_str)
                    .filter(|id| is_peer_id(id))
                    .ok_or(ChatError::NoPeerId(kind))?
                    .to_owned();
                Ok(if kind == "moved" {
                    ChannelMessage::Moved { id }
                } else {
                    ChannelMessage::MovedAck { id }
                })
            }
            Some("chat") => {
                let text = value
                    .get("text")
                    .and_then(Value::as_str)
                    .filter(|t| !t.trim().is_empty())
                    .ok_or(ChatError::NoText)?;
                if text.chars().count() > MAX_CHAT_CHARS {
                    return Err(ChatError::TextTooLong);
                }
                let private = match value.get("private") {
                    None => false,
                    Some(Value::Bool(b)) => *b,
                    Some(_) => return Err(ChatError::BadPrivate),
                };
                Ok(ChannelMessage::Chat {
                    text: text.to_owned(),
                    private,
                })
            }
            _ => Err(ChatError::UnknownType(
                value.get("type").map_or("null".into(), Value::to_string),
            )),
        }
    }
}

/// 1–64 characters of `[A-Za-z0-9_-]`, as the web app checks a `moved` id.
fn is_peer_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn reads_what_the_web_app_writes() {
        assert_eq!(
            ChannelMessage::decode(false, br#"{"type":"chat","text":"hi"}"#),
            Ok(ChannelMessage::Chat {
                text: "hi".into(),
                private: false
            })
        );
        assert_eq!(
            ChannelMessage::decode(false, br#"{"type":"chat","text":"hi","private":true}"#),
            Ok(ChannelMessage::Chat {
                text: "hi".into(),
                private: true
            })
        );
        assert_eq!(
            ChannelMessage::decode(false, br#"{"type":"moved","id":"4f0a"}"#),
            Ok(ChannelMessage::Moved { id: "4f0a".into() })
        );
    }

    #[test]
    fn refuses_what_the_web_app_refuses() {
        let refused: [(&[u8], ChatError); 8] = [
            (b"{}", ChatError::UnknownType("null".into())),
            (b"nope", ChatError::NotJson),
            (br#"{"type":"chat","text":"  "}"#, ChatError::NoText),
            (br#"{"type":"chat","text":7}"#, ChatError::NoText),
            (
                br#"{"type":"chat","text":"a","private":"yes"}"#,
                ChatError::BadPrivate,
            ),
            (
                br#"{"type":"moved","id":"a b"}"#,
                ChatError::NoPeerId("moved"),
            ),
            (br#"{"type":"moved-ack"}"#, ChatError::NoPeerId("moved-ack")),
            (
                br#"{"type":"file"}"#,
                ChatError::UnknownType("\"file\"".into()),
            ),
        ];
        for (data, error) in refused {
            assert_eq!(ChannelMessage::decode(false, data), Err(error));
        }
        assert_eq!(ChannelMessage::decode(true, b"{}"), Err(ChatError::Binary));
        let long = ChannelMessage::Chat {
            text: "é".repeat(MAX_CHAT_CHARS + 1),
            private: false,
        };
        assert_eq!(
            ChannelMessage::decode(false, long.encode().as_bytes()),
            Err(ChatError::TextTooLong)
        );
        assert_eq!(
            ChannelMessage::chat(&"x".repeat(MAX_CHAT_CHARS + 1), false),
            Err(ChatError::TextTooLong)
        );
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(binary: bool, data in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = ChannelMessage::decode(binary, &data);
        }

        #[test]
        fn chat_round_trips(text in "\\PC{1,200}", private: bool) {
            prop_assume!(!text.trim().is_empty());
            let message = ChannelMessage::chat(&text, private).unwrap();
            prop_assert_eq!(ChannelMessage::decode(false, message.encode().as_bytes()), Ok(message));
        }

        #[test]
        fn moved_round_trips(id in "[A-Za-z0-9_-]{1,64}", ack: bool) {
            let message = if ack { ChannelMessage::MovedAck { id } } else { ChannelMessage::Moved { id } };
            prop_assert_eq!(ChannelMessage::decode(false, message.encode().as_bytes()), Ok(message));
        }
    }
}
