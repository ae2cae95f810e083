//! Validation of room names and display names, shared by server and clients.

use crate::ErrorCode;

/// Longest room name, in characters (all ASCII).
pub const MAX_ROOM_CHARS: usize = 64;
/// Longest display name, in Unicode scalar values, after trimming.
pub const MAX_NAME_CHARS: usize = 64;

/// Checks a room name: 1–64 characters of `[A-Za-z0-9_-]`.
pub fn validate_room(room: &str) -> Result<&str, ErrorCode> {
    let ok_len = (1..=MAX_ROOM_CHARS).contains(&room.len());
    let ok_chars = room
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok_len && ok_chars {
        Ok(room)
    } else {
        Err(ErrorCode::BadRoom)
    }
}

/// Trims a display name and checks it: 1–64 characters, no control characters
/// (they would let one user forge line breaks or hide text in others' UIs).
pub fn validate_name(name: &str) -> Result<&str, ErrorCode> {
    let trimmed = name.trim();
    let count = trimmed.chars().count();
    if (1..=MAX_NAME_CHARS).contains(&count) && !trimmed.chars().any(char::is_control) {
        Ok(trimmed)
    } else {
        Err(ErrorCode::BadName)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rooms() {
        assert!(validate_room("a").is_ok());
        assert!(validate_room("Team_Standup-2026").is_ok());
        assert!(validate_room(&"x".repeat(64)).is_ok());
        assert_eq!(validate_room(""), Err(ErrorCode::BadRoom));
        assert_eq!(validate_room(&"x".repeat(65)), Err(ErrorCode::BadRoom));
        assert_eq!(validate_room("a b"), Err(ErrorCode::BadRoom));
        assert_eq!(validate_room("ä"), Err(ErrorCode::BadRoom));
        assert_eq!(validate_room("../etc"), Err(ErrorCode::BadRoom));
    }

    #[test]
    fn names() {
        assert_eq!(validate_name("  Ada  "), Ok("Ada"));
        assert_eq!(validate_name("Zoë 🚀"), Ok("Zoë 🚀"));
        assert!(validate_name(&"é".repeat(64)).is_ok());
        assert_eq!(validate_name(&"é".repeat(65)), Err(ErrorCode::BadName));
        assert_eq!(validate_name("   "), Err(ErrorCode::BadName));
        assert_eq!(validate_name(""), Err(ErrorCode::BadName));
        assert_eq!(validate_name("a\u{0}b"), Err(ErrorCode::BadName));
        assert_eq!(validate_name("a\nb"), Err(ErrorCode::BadName));
    }
}
