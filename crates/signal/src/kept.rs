//! What the hub keeps across a restart of the server: every room's places
//! (id, name, role, and a hash of the secret token that resumes each) and
//! its lock. Written at shutdown and read back at start (the `callisto`
//! binary does the I/O), it lets each client take its place back with its
//! token as after a dropped connection: same ids, the room still locked,
//! nothing for the others to notice. Without it, a restart loses rooms
//! and locks, and clients meet again under new ids (`moved`).
//!
//! Only hashes of the tokens are kept, so the file does not hand out
//! places. What comes back is checked as any input would be: a place that
//! is not well formed, or would break a limit, is skipped.

use serde::{Deserialize, Serialize};

/// The rooms as the hub had them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeptRooms {
    pub rooms: Vec<KeptRoom>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KeptRoom {
    pub room: String,
    pub locked: bool,
    #[serde(default)]
    pub open_to_audience: bool,
    /// In join order.
    pub places: Vec<KeptPlace>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KeptPlace {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub watching: bool,
    /// SHA-256 of the place's resume token, in lower-case hex.
    pub token_hash: String,
}

/// What [`crate::hub::Hub::restore`] made of [`KeptRooms`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Restored {
    pub rooms: usize,
    pub places: usize,
    /// Places not taken back: ill-formed, a duplicate, or past a limit.
    pub skipped: usize,
}

/// The key a resume token is known by: its SHA-256, in lower-case hex.
/// Tokens are 128 random bits, so a fast hash is as good as a slow one.
pub fn token_hash(token: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    hex(digest.as_ref())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `text` is `len` lower-case hex digits (a peer id: 32; a token
/// hash: 64).
pub(crate) fn is_hex(text: &str, len: usize) -> bool {
    text.len() == len && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_known_by_its_sha256() {
        // echo -n abc | sha256sum
        assert_eq!(
            token_hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(is_hex(&token_hash("x"), 64));
        assert!(!is_hex("ABCD", 4));
        assert!(!is_hex("abc", 4));
    }

    #[test]
    fn the_file_format_reads_back() {
        let kept = KeptRooms {
            rooms: vec![KeptRoom {
                room: "r".into(),
                locked: true,
                open_to_audience: true,
                places: vec![KeptPlace {
                    id: "a".repeat(32),
                    name: "Zoë".into(),
                    watching: false,
                    token_hash: token_hash("t"),
                }],
            }],
        };
        let text = serde_json::to_string(&kept).unwrap();
        assert!(text.contains("\"openToAudience\":true") && text.contains("\"tokenHash\""));
        assert_eq!(serde_json::from_str::<KeptRooms>(&text).unwrap(), kept);
    }
}
