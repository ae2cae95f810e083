//! The `callisto` binary's library: command line, HTTP server, TLS, metrics
//! and logging. Integration tests start the same server the binary runs.

pub mod access;
pub mod alternates;
pub mod bench;
pub mod cli;
pub mod connections;
pub mod flag_files;
pub mod health;
pub mod http;
pub mod http_server;
pub mod load;
pub mod logging;
pub mod open_files;
pub mod origins;
pub mod peer;
pub mod probe;
pub mod revalidation;
pub mod rooms_file;
pub mod secrets;
pub mod serve;
pub mod systemd;
pub mod telemetry;
pub mod tls;
pub mod trusted_proxies;
pub mod turn;
