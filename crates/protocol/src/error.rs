//! Error codes sent in `{"type":"error","code":..}` messages.

use serde::Serialize;

/// Why the server refused a client message. The string form (`bad-message`,
/// `room-full`, ...) is part of the protocol: clients match on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorCode {
    /// Not JSON, not an object, unknown `type`, or a missing or mistyped field.
    BadMessage,
    /// `room` is not 1–64 characters of `[A-Za-z0-9_-]`.
    BadRoom,
    /// `name` is empty, longer than 64 characters, or has control characters.
    BadName,
    /// `signal`, `broadcast` or `leave` before a successful `join`.
    NotJoined,
    /// `join` while already in a room (one room per connection).
    AlreadyJoined,
    /// `signal.to` names no peer in the sender's room.
    UnknownPeer,
    /// The room already holds `--max-room-size` peers.
    RoomFull,
    /// The server already holds its maximum number of rooms.
    ServerFull,
    /// A frame larger than `--max-message-bytes`; the connection is closed.
    TooLarge,
    /// More messages than the rate limit allows; sustained, the connection is closed.
    RateLimited,
    /// `join` without `access`, or with one that is not among the server's
    /// access codes (`--access-codes-file`).
    AccessDenied,
    /// Knocking on a locked room: someone in it turned the client away.
    NotAdmitted,
    /// `lock`, `admit` or `deny` from someone who only watches: only those
    /// taking part decide who comes in.
    NotAllowed,
}

impl ErrorCode {
    /// Every code, for documentation, metrics and tests.
    pub const ALL: [ErrorCode; 13] = [
        ErrorCode::BadMessage,
        ErrorCode::BadRoom,
        ErrorCode::BadName,
        ErrorCode::NotJoined,
        ErrorCode::AlreadyJoined,
        ErrorCode::UnknownPeer,
        ErrorCode::RoomFull,
        ErrorCode::ServerFull,
        ErrorCode::TooLarge,
        ErrorCode::RateLimited,
        ErrorCode::AccessDenied,
        ErrorCode::NotAdmitted,
        ErrorCode::NotAllowed,
    ];

    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadMessage => "bad-message",
            ErrorCode::BadRoom => "bad-room",
            ErrorCode::BadName => "bad-name",
            ErrorCode::NotJoined => "not-joined",
            ErrorCode::AlreadyJoined => "already-joined",
            ErrorCode::UnknownPeer => "unknown-peer",
            ErrorCode::RoomFull => "room-full",
            ErrorCode::ServerFull => "server-full",
            ErrorCode::TooLarge => "too-large",
            ErrorCode::RateLimited => "rate-limited",
            ErrorCode::AccessDenied => "access-denied",
            ErrorCode::NotAdmitted => "not-admitted",
            ErrorCode::NotAllowed => "not-allowed",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serde_name_matches_as_str() {
        for code in ErrorCode::ALL {
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
        }
    }
}
