//! The signaling hub: who is in which room, and delivery of messages between
//! them.
//!
//! - [`hub`] is the sans-IO core: a deterministic state machine that takes
//!   decoded client messages and hands serialized frames to per-peer sinks. It
//!   owns no sockets, no clock and no random source, and is unit-tested alone.
//! - [`kept`] is what the hub keeps across a restart of the server.
//! - [`rate`] is the per-connection token bucket, with time injected.
//! - [`connection`] is the thin driver: one task per WebSocket that decodes
//!   frames, applies limits and heartbeats, and calls into the hub.
//! - [`remote`] names the client of a connection, direct or proxied.

pub mod connection;
pub mod hub;
pub mod kept;
pub mod rate;
pub mod remote;

pub use connection::{AccessCheck, ConnectionConfig, SendBudget, SharedHub, handle_socket};
pub use hub::{Frame, Hub, HubLimits, HubStats, Parked, PeerSink, Seat, SinkFull, random_peer_id};
pub use kept::{KeptRooms, Restored};
pub use rate::RateLimiter;
pub use remote::Remote;
