//! STUN and TURN for Callisto.
//!
//! - [`stun`]: the message codec (RFC 8489): parsing without copying,
//!   building into caller-provided buffers, MESSAGE-INTEGRITY(-SHA256) and
//!   FINGERPRINT.
//! - [`server`]: the TURN server as a sans-IO state machine (RFC 8656, RFC
//!   6156): packets and `Instant`s in, packets out. It owns no sockets.
//! - [`client`]: a TURN client state machine, for tests and the native peer.
//! - [`auth`]: long-term credentials and the TURN REST shared-secret scheme.
//! - [`net`]: the drivers: UDP worker threads (one socket per core,
//!   batched with recvmmsg/sendmmsg) and TCP/TLS connection tasks, and
//!   the admission of those connections.
//! - [`policy`]: which peers relays may talk to; [`source`]: how the
//!   limits per client source group addresses.
//!
//! The codec is written by hand rather than taken from a crate because it is
//! the relay's hot path: ChannelData and Send/Data indications are parsed in
//! place and relayed without allocating.

pub mod auth;
pub mod client;
pub mod net;
pub mod policy;
pub mod server;
pub mod source;
pub mod stun;
