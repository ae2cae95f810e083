//! Callisto signaling protocol, version 1.
//!
//! This crate is the single source of truth for what travels over the `/ws`
//! WebSocket: the messages a client may send ([`ClientMessage`]), the messages
//! the server sends ([`ServerMessage`], and [`Received`] as a client decodes
//! them), the error codes ([`ErrorCode`]) and the
//! validation rules for room and display names. It does no I/O; the signaling
//! hub and any third-party client in Rust build on it.
//!
//! The human-readable specification is `docs/protocol.md`; the names used here
//! are exactly the names on the wire.

mod client;
mod error;
mod received;
mod server;
mod validate;

pub use client::{ClientMessage, DecodeError, MAX_RESUME_TOKEN_BYTES, decode_client};
pub use error::ErrorCode;
pub use received::{ReceiveError, Received, ReceivedIceServer, ReceivedPeer, decode_server};
pub use server::{IceServer, PeerInfo, ServerMessage};
pub use validate::{MAX_NAME_CHARS, MAX_ROOM_CHARS, validate_name, validate_room};

/// The protocol version this crate implements; sent in every `welcome`.
pub const PROTOCOL_VERSION: u32 = 1;

/// The WebSocket subprotocol a client may offer to pin version 1.
pub const SUBPROTOCOL_V1: &str = "callisto.v1";
