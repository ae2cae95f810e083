//! What Callisto peers put in `signal.data` and `broadcast.data` (the
//! conventions of the web app, docs/protocol.md): a session description,
//! a trickled ICE candidate, "restart ICE", "send your offer again", and
//! the sender's media state. The server relays them without reading them,
//! so they are read here as what they are: input from another peer.

use serde_json::{Value, json};

/// The longest SDP taken; Chromium's offers are a few KiB.
const MAX_SDP_BYTES: usize = 64 * 1024;
/// The longest candidate line taken.
const MAX_CANDIDATE_BYTES: usize = 1024;

/// An offer or an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SdpKind {
    Offer,
    Answer,
}

/// One decoded signal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signal {
    Description {
        kind: SdpKind,
        sdp: String,
    },
    /// A trickled candidate (`candidate:…`); `None` is the end of them.
    Candidate(Option<String>),
    /// The polite side asks the impolite one to restart ICE.
    Restart,
    /// "Your offer has not reached me": send it again.
    Resend,
    /// Microphone, camera and screen on or off.
    State {
        audio: bool,
        video: bool,
        screen: bool,
    },
}

/// Why a signal was ignored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignalError {
    #[error("not an object with description, candidate, restart, resend or state")]
    Unknown,
    #[error("a description that is not an offer or an answer with its sdp")]
    BadDescription,
    #[error("an sdp of {0} bytes")]
    SdpTooLong(usize),
    #[error(
        "a candidate that is not {{\"candidate\": \"…\"}} of at most {MAX_CANDIDATE_BYTES} bytes"
    )]
    BadCandidate,
    #[error("a state whose audio, video or screen is not true or false")]
    BadState,
}

impl Signal {
    /// Reads one `data`.
    pub fn decode(data: &Value) -> Result<Signal, SignalError> {
        if let Some(description) = data.get("description") {
            let kind = match description.get("type").and_then(Value::as_str) {
                Some("offer") => SdpKind::Offer,
                Some("answer") => SdpKind::Answer,
                _ => return Err(SignalError::BadDescription),
            };
            let sdp = description
                .get("sdp")
                .and_then(Value::as_str)
                .ok_or(SignalError::BadDescription)?;
            if sdp.len() > MAX_SDP_BYTES {
                return Err(SignalError::SdpTooLong(sdp.len()));
            }
            return Ok(Signal::Description {
                kind,
                sdp: sdp.to_owned(),
            });
        }
        if let Some(candidate) = data.get("candidate") {
            return match candidate {
                Value::Null => Ok(Signal::Candidate(None)),
                Value::Object(_) => match candidate.get("candidate") {
                    Some(Value::String(line)) if line.is_empty() => Ok(Signal::Candidate(None)),
                    Some(Value::String(line)) if line.len() <= MAX_CANDIDATE_BYTES => {
                        Ok(Signal::Candidate(Some(line.clone())))
                    }
                    _ => Err(SignalError::BadCandidate),
                },
                _ => Err(SignalError::BadCandidate),
            };
        }
        if data.get("restart") == Some(&Value::Bool(true)) {
            return Ok(Signal::Restart);
        }
        if data.get("resend") == Some(&Value::Bool(true)) {
            return Ok(Signal::Resend);
        }
        if let Some(state) = data.get("state") {
            let flag = |name| match state.get(name) {
                None => Ok(false),
                Some(Value::Bool(b)) => Ok(*b),
                Some(_) => Err(SignalError::BadState),
            };
            return Ok(Signal::State {
                audio: flag("audio")?,
                video: flag("video")?,
                screen: flag("screen")?,
            });
        }
        Err(SignalError::Unknown)
    }

    /// The `data` to send.
    pub fn encode(&self) -> Value {
        match self {
            Signal::Description { kind, sdp } => {
                let kind = match kind {
                    SdpKind::Offer => "offer",
                    SdpKind::Answer => "answer",
                };
                json!({"description": {"type": kind, "sdp": sdp}})
            }
            Signal::Candidate(Some(line)) => {
                json!({"candidate": {"candidate": line, "sdpMLineIndex": 0}})
            }
            Signal::Candidate(None) => json!({"candidate": null}),
            Signal::Restart => json!({"restart": true}),
            Signal::Resend => json!({"resend": true}),
            Signal::State {
                audio,
                video,
                screen,
            } => json!({"state": {"audio": audio, "video": video, "screen": screen}}),
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn reads_a_browsers_signals() {
        let candidate = json!({"candidate": {
            "candidate": "candidate:1 1 udp 2122260223 127.0.0.1 50000 typ host generation 0",
            "sdpMid": "0", "sdpMLineIndex": 0, "usernameFragment": "x"}});
        assert!(matches!(
            Signal::decode(&candidate),
            Ok(Signal::Candidate(Some(line))) if line.starts_with("candidate:1 1 udp")
        ));
        assert_eq!(
            Signal::decode(&json!({"candidate": {"candidate": ""}})),
            Ok(Signal::Candidate(None))
        );
        assert_eq!(
            Signal::decode(&json!({"state": {"audio": true, "video": false}})),
            Ok(Signal::State {
                audio: true,
                video: false,
                screen: false
            })
        );
        assert_eq!(
            Signal::decode(&json!({"description": {"type": "rollback"}})),
            Err(SignalError::BadDescription)
        );
        assert_eq!(
            Signal::decode(&json!({"candidate": 5})),
            Err(SignalError::BadCandidate)
        );
        assert_eq!(Signal::decode(&json!(null)), Err(SignalError::Unknown));
        assert_eq!(
            Signal::decode(&json!({"restart": false})),
            Err(SignalError::Unknown)
        );
    }

    fn arbitrary_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            prop_oneof![
                Just("description".to_owned()),
                Just("candidate".to_owned()),
                Just("offer".to_owned()),
                ".{0,20}"
            ]
            .prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::btree_map(
                    prop_oneof![
                        Just("description".to_owned()),
                        Just("candidate".to_owned()),
                        Just("type".to_owned()),
                        Just("sdp".to_owned()),
                        Just("state".to_owned()),
                        Just("restart".to_owned()),
                        Just("resend".to_owned()),
                        "[a-z]{1,6}"
                    ],
                    inner,
                    0..4
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn arbitrary_json_never_panics(data in arbitrary_json()) {
            let _ = Signal::decode(&data);
        }

        #[test]
        fn signals_round_trip(sdp in "\\PC{0,100}", offer: bool, line in "candidate:[ -~]{1,80}",
                              audio: bool, video: bool, screen: bool) {
            let kind = if offer { SdpKind::Offer } else { SdpKind::Answer };
            for signal in [
                Signal::Description { kind, sdp: sdp.clone() },
                Signal::Candidate(Some(line.clone())),
                Signal::Candidate(None),
                Signal::Restart,
                Signal::Resend,
                Signal::State { audio, video, screen },
            ] {
                prop_assert_eq!(Signal::decode(&signal.encode()), Ok(signal));
            }
        }
    }
}
