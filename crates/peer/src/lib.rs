//! Callisto's native peer: a WebRTC endpoint without a browser.
//!
//! It joins a room on a Callisto server like the web app does, speaks the
//! same conventions (docs/protocol.md), and so meets browsers and other
//! native peers: chat both ways, and the other side's media received and
//! counted. `callisto peer` puts it on the command line, to join a room
//! headless, check a server, or script a call; `callisto probe` tries the
//! server's STUN and TURN from wherever it runs.
//!
//! - [`chat`]: messages on the chat data channel;
//! - [`files`]: files offered to it, each on a data channel of its own;
//! - [`signals`]: what peers put in `signal.data`;
//! - [`link`]: one connection to one peer, sans-IO (str0m);
//! - [`peer`]: the driver: the WebSocket, one UDP socket, the clock,
//!   and the files it saves (`saving`);
//! - [`tls`]: whom to trust for `wss://`;
//! - [`probe`]: the NAT probe: the server's STUN and TURN as seen from here.

pub mod chat;
pub mod clip;
pub mod files;
pub mod link;
pub mod peer;
pub mod probe;
mod relay;
mod saving;
pub mod signals;
pub mod tls;

pub use chat::ChannelMessage;
pub use link::{Link, LinkError, LinkEvent, MediaCounts};
pub use peer::{Command, PeerConfig, PeerError, PeerEvent, RelayUse, Running, Summary, run, spawn};
pub use relay::RelayTransport;
pub use tls::Fingerprint;
