//! Files offered to this peer: the receiving end of the web app's file
//! protocol (docs/protocol.md, "Files"), sans-IO. Each file comes over a
//! data channel of its own (label `file`, subprotocol
//! `callisto.file.v1`): an offer, our accept or decline, the bytes in
//! binary messages, an end; we close the channel once the file is kept,
//! the sender's proof of delivery. Where the bytes go is the driver's
//! business: [`Incoming`] only says what each message is, and refuses
//! anything out of turn.

use std::time::{Duration, Instant};

use serde_json::Value;

pub const FILE_LABEL: &str = "file";
pub const FILE_PROTOCOL: &str = "callisto.file.v1";
/// The largest file an offer may claim (the web app's limit).
pub const MAX_FILE_BYTES: u64 = 64 << 30;
/// Files under way from one peer at once; more channels are closed.
pub const MAX_INCOMING: usize = 8;
/// How long a new channel may take to say what it offers.
pub const OFFER_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_CONTROL_CHARS: usize = 2048;
const MAX_CHUNK_BYTES: usize = 256 * 1024;
const MAX_NAME_CHARS: usize = 255;

/// What we say on a file's channel.
pub const ACCEPT: &str = r#"{"type":"accept"}"#;
pub const DECLINE: &str = r#"{"type":"decline"}"#;
/// We cannot keep the file (docs/protocol.md): said before closing.
pub const FAILED: &str = r#"{"type":"failed"}"#;

/// A file offered: its name made safe to save, its size, and whether it
/// came to us alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offer {
    pub name: String,
    pub size: u64,
    pub private: bool,
}

/// Why a file's channel is closed: what the sender did wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FileError {
    #[error("binary data out of turn")]
    BinaryOutOfTurn,
    #[error("a control message of {0} characters")]
    TooLong(usize),
    #[error("a control message that is not JSON")]
    NotJson,
    #[error("an unknown type {0}")]
    UnknownType(String),
    #[error("{0:?} out of turn")]
    OutOfTurn(&'static str),
    #[error("an offer without a usable {0}")]
    BadOffer(&'static str),
    #[error("an offer of {0} bytes, over the {MAX_FILE_BYTES} limit")]
    TooLarge(u64),
    #[error("a message of {0} bytes")]
    LargeChunk(usize),
    #[error("more than the {0} bytes offered")]
    MoreThanOffered(u64),
    #[error("the end after {got} of {size} bytes")]
    ShortEnd { got: u64, size: u64 },
}

/// What a message on a file's channel was.
#[derive(Debug, PartialEq, Eq)]
pub enum Step<'a> {
    /// The offer: accept or decline it.
    Offered(Offer),
    /// Bytes of the file, in order.
    Data(&'a [u8]),
    /// All `size` bytes came: keep the file, then close the channel.
    Ended,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for the offer, until then.
    Opening(Instant),
    Offered,
    Receiving(u64),
    Done,
}

/// One file's channel, from our side.
#[derive(Debug)]
pub struct Incoming {
    phase: Phase,
    offer: Option<Offer>,
}

impl Incoming {
    /// A channel just opened to us at `now`.
    pub fn new(now: Instant) -> Incoming {
        Incoming {
            phase: Phase::Opening(now + OFFER_TIMEOUT),
            offer: None,
        }
    }

    /// The offer, once made.
    pub fn offer(&self) -> Option<&Offer> {
        self.offer.as_ref()
    }

    /// Until when it may make its offer, while it has not.
    pub fn deadline(&self) -> Option<Instant> {
        match self.phase {
            Phase::Opening(at) => Some(at),
            _ => None,
        }
    }

    /// Takes a message from the sender (`binary` or text). An error ends
    /// the transfer: close the channel.
    pub fn take<'a>(&mut self, binary: bool, data: &'a [u8]) -> Result<Step<'a>, FileError> {
        let step = self.step(binary, data);
        if step.is_err() {
            self.phase = Phase::Done;
        }
        step
    }

    fn step<'a>(&mut self, binary: bool, data: &'a [u8]) -> Result<Step<'a>, FileError> {
        if binary {
            let Phase::Receiving(received) = self.phase else {
                return Err(FileError::BinaryOutOfTurn);
            };
            if data.len() > MAX_CHUNK_BYTES {
                return Err(FileError::LargeChunk(data.len()));
            }
            let size = self.offer.as_ref().map_or(0, |o| o.size);
            let received = received + data.len() as u64;
            if received > size {
                return Err(FileError::MoreThanOffered(size));
            }
            self.phase = Phase::Receiving(received);
            return Ok(Step::Data(data));
        }
        let msg = decode_control(data)?;
        let kind = msg["type"].as_str().unwrap_or_default();
        match (self.phase, kind) {
            (Phase::Opening(_), "offer") => {
                let offer = check_offer(&msg)?;
                self.offer = Some(offer.clone());
                self.phase = Phase::Offered;
                Ok(Step::Offered(offer))
            }
            (Phase::Receiving(got), "end") => {
                let size = self.offer.as_ref().map_or(0, |o| o.size);
                if got != size {
                    return Err(FileError::ShortEnd { got, size });
                }
                self.phase = Phase::Done;
                Ok(Step::Ended)
            }
            (_, "offer") => Err(FileError::OutOfTurn("offer")),
            (_, "accept") => Err(FileError::OutOfTurn("accept")),
            (_, "decline") => Err(FileError::OutOfTurn("decline")),
            (_, "end") => Err(FileError::OutOfTurn("end")),
            _ => Err(FileError::OutOfTurn("failed")),
        }
    }

    /// We accept the offer: say [`ACCEPT`]. False if there is none to accept.
    pub fn accept(&mut self) -> bool {
        if self.phase != Phase::Offered {
            return false;
        }
        self.phase = Phase::Receiving(0);
        true
    }

    /// The transfer is over for us (declined, failed, or kept).
    pub fn end(&mut self) {
        self.phase = Phase::Done;
    }

    /// Whether it was offered and not yet ended: a close now stops it.
    pub fn under_way(&self) -> bool {
        matches!(self.phase, Phase::Offered | Phase::Receiving(_))
    }
}

/// A control message: a JSON object with a known `type`.
fn decode_control(data: &[u8]) -> Result<Value, FileError> {
    let text = std::str::from_utf8(data).map_err(|_| FileError::NotJson)?;
    let chars = text.chars().count();
    if chars > MAX_CONTROL_CHARS {
        return Err(FileError::TooLong(chars));
    }
    let msg: Value = serde_json::from_str(text).map_err(|_| FileError::NotJson)?;
    match msg.get("type").and_then(Value::as_str) {
        Some("offer" | "accept" | "decline" | "end" | "failed") => Ok(msg),
        other => Err(FileError::UnknownType(
            serde_json::to_string(&other).unwrap_or_default(),
        )),
    }
}

fn check_offer(msg: &Value) -> Result<Offer, FileError> {
    let name = msg["name"]
        .as_str()
        .filter(|n| !n.is_empty() && n.chars().count() <= MAX_NAME_CHARS)
        .ok_or(FileError::BadOffer("name"))?;
    // JSON numbers past 2^53 are not exact, as the web app refuses them.
    let size = msg["size"]
        .as_u64()
        .filter(|&s| s < 1 << 53)
        .ok_or(FileError::BadOffer("size"))?;
    if size > MAX_FILE_BYTES {
        return Err(FileError::TooLarge(size));
    }
    let private = match &msg["private"] {
        Value::Null => false,
        Value::Bool(b) => *b,
        _ => return Err(FileError::BadOffer("private")),
    };
    Ok(Offer {
        name: safe_name(name),
        size,
        private,
    })
}

/// A name that is only a file name (the web app's rule): no folders, no
/// control characters, no leading dot, never empty.
pub fn safe_name(name: &str) -> String {
    let replaced: String = name
        .chars()
        .map(|c| {
            // C0 controls and DEL (the web app's \u0000-\u001f\u007f).
            let control = c.is_control() && u32::from(c) < 0x80;
            if control || c == '/' || c == '\\' {
                '_'
            } else {
                c
            }
        })
        .collect();
    let trimmed = replaced.trim();
    let clean = match trimmed.strip_prefix('.') {
        Some(_) => format!("_{}", trimmed.trim_start_matches('.')),
        None => trimmed.to_owned(),
    };
    if clean.is_empty() {
        "file".to_owned()
    } else {
        clean
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn offer(name: &str, size: u64) -> String {
        serde_json::json!({"type": "offer", "name": name, "size": size}).to_string()
    }

    #[test]
    fn a_file_offered_accepted_sent_and_ended() {
        let now = Instant::now();
        let mut file = Incoming::new(now);
        assert_eq!(file.deadline(), Some(now + OFFER_TIMEOUT));
        let text = offer("../notes <1>.txt", 5);
        let got = file.take(false, text.as_bytes()).unwrap();
        assert_eq!(
            got,
            Step::Offered(Offer {
                name: "__notes <1>.txt".into(),
                size: 5,
                private: false
            })
        );
        assert!(file.under_way());
        assert_eq!(
            file.take(true, b"he"),
            Err(FileError::BinaryOutOfTurn),
            "before the accept"
        );
        let mut file = Incoming::new(now);
        file.take(false, offer("a", 5).as_bytes()).unwrap();
        assert!(file.accept());
        assert!(!file.accept(), "once");
        assert_eq!(file.take(true, b"hel").unwrap(), Step::Data(b"hel"));
        assert_eq!(
            file.take(false, br#"{"type":"end"}"#),
            Err(FileError::ShortEnd { got: 3, size: 5 })
        );
        let mut file = Incoming::new(now);
        file.take(false, offer("a", 5).as_bytes()).unwrap();
        file.accept();
        file.take(true, b"hel").unwrap();
        assert_eq!(file.take(true, b"lo!"), Err(FileError::MoreThanOffered(5)));
        let mut file = Incoming::new(now);
        file.take(
            false,
            br#"{"type":"offer","name":"p","size":2,"private":true}"#,
        )
        .unwrap();
        assert!(file.offer().unwrap().private);
        file.accept();
        file.take(true, b"ok").unwrap();
        assert_eq!(file.take(false, br#"{"type":"end"}"#).unwrap(), Step::Ended);
        assert!(!file.under_way());
    }

    #[test]
    fn bad_offers_are_refused() {
        let now = Instant::now();
        for (text, why) in [
            (offer("", 1), FileError::BadOffer("name")),
            (offer(&"n".repeat(256), 1), FileError::BadOffer("name")),
            (
                offer("a", MAX_FILE_BYTES + 1),
                FileError::TooLarge(MAX_FILE_BYTES + 1),
            ),
            (
                r#"{"type":"offer","name":"a","size":-1}"#.into(),
                FileError::BadOffer("size"),
            ),
            (
                r#"{"type":"offer","name":"a","size":0.5}"#.into(),
                FileError::BadOffer("size"),
            ),
            (
                r#"{"type":"offer","name":"a","size":1,"private":"yes"}"#.into(),
                FileError::BadOffer("private"),
            ),
            (
                r#"{"type":"file"}"#.into(),
                FileError::UnknownType("\"file\"".into()),
            ),
            ("{".into(), FileError::NotJson),
            (r#"{"type":"end"}"#.into(), FileError::OutOfTurn("end")),
            (
                format!(
                    r#"{{"type":"offer","name":"{}","size":1}}"#,
                    "x".repeat(2100)
                ),
                FileError::TooLong(2135),
            ),
        ] {
            assert_eq!(
                Incoming::new(now).take(false, text.as_bytes()),
                Err(why),
                "{text:.80}"
            );
        }
    }

    #[test]
    fn safe_names_match_the_web_app() {
        // As files.js's safeName makes them (tests/app/wire.test.js).
        for (name, safe) in [
            ("notes <1>.bin", "notes <1>.bin"),
            ("../../etc/passwd", "__.._etc_passwd"),
            ("..", "_"),
            (".", "_"),
            ("\\\\server\\share", "__server_share"),
            ("a\u{0}b", "a_b"),
            ("  ", "file"),
            (".hidden", "_hidden"),
            ("tab\there", "tab_here"),
        ] {
            assert_eq!(safe_name(name), safe, "{name:?}");
        }
    }

    /// What a sender may put on a file's channel, well-formed or not.
    fn message() -> impl Strategy<Value = (bool, Vec<u8>)> {
        prop_oneof![
            3 => (0u64..40).prop_map(|size| (false, offer("f", size).into_bytes())),
            1 => prop::sample::select(vec!["accept", "decline", "end", "failed"])
                .prop_map(|t| (false, format!(r#"{{"type":"{t}"}}"#).into_bytes())),
            2 => Just((false, br#"{"type":"end"}"#.to_vec())),
            1 => any::<String>().prop_map(|s| (false, s.into_bytes())),
            1 => prop::collection::vec(any::<u8>(), 0..40).prop_map(|b| (false, b)),
            4 => prop::collection::vec(any::<u8>(), 0..16).prop_map(|b| (true, b)),
        ]
    }

    proptest! {
        /// Whatever a sender says, the receiver takes only an accepted
        /// offer's exact bytes, in order, and the end only when all of
        /// them came; anything else ends the transfer, and nothing
        /// panics.
        #[test]
        fn a_receiver_takes_only_an_accepted_offers_exact_bytes(
            messages in prop::collection::vec(message(), 0..30),
            accept_after in 0usize..3,
        ) {
            let mut file = Incoming::new(Instant::now());
            let mut got = Vec::new();
            let mut size = None;
            let mut accepted = false;
            for (i, (binary, data)) in messages.iter().enumerate() {
                if size.is_some() && !accepted && i >= accept_after {
                    prop_assert!(file.accept());
                    accepted = true;
                }
                match file.take(*binary, data) {
                    Ok(Step::Offered(offer)) => {
                        prop_assert!(size.is_none(), "one offer");
                        size = Some(offer.size);
                    }
                    Ok(Step::Data(bytes)) => {
                        prop_assert!(accepted && *binary);
                        got.extend_from_slice(bytes);
                        prop_assert!(got.len() as u64 <= size.unwrap_or(0));
                    }
                    Ok(Step::Ended) => {
                        prop_assert_eq!(Some(got.len() as u64), size);
                        prop_assert!(!file.under_way());
                        break;
                    }
                    Err(_) => {
                        prop_assert!(!file.under_way());
                        prop_assert!(file.take(true, b"x").is_err(), "nothing after");
                        break;
                    }
                }
            }
        }

        #[test]
        fn a_safe_name_is_only_a_file_name(name in any::<String>()) {
            let safe = safe_name(&name);
            prop_assert!(!safe.is_empty());
            prop_assert!(!safe.contains(['/', '\\']));
            let control = safe.chars().any(|c| u32::from(c) < 0x20 || u32::from(c) == 0x7f);
            prop_assert!(!control, "a control character in {:?}", safe);
            prop_assert!(!safe.starts_with('.'));
            prop_assert_eq!(safe_name(&safe), safe.clone());
        }
    }
}
