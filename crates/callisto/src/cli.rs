//! The command line: subcommands and their flags. Every `serve` flag can also
//! be set by a `CALLISTO_*` environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "callisto",
    version,
    about = "Self-hosted video calls, screen sharing and chat in the browser: one binary.",
    long_about = None
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the web app and signaling server. With no flags it serves
    /// http://127.0.0.1:8080 for this machine only.
    Serve(ServeArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address and port for HTTP(S) and WebSocket. Use 0.0.0.0:443 (with TLS)
    /// to serve other machines: browsers only allow camera and microphone on
    /// https:// pages or on localhost.
    #[arg(long, env = "CALLISTO_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// TLS certificate chain (PEM). Needs --tls-key.
    #[arg(
        long,
        env = "CALLISTO_TLS_CERT",
        requires = "tls_key",
        conflicts_with = "tls_self_signed"
    )]
    pub tls_cert: Option<PathBuf>,

    /// TLS private key (PEM: PKCS#8, PKCS#1 or SEC1). Needs --tls-cert.
    #[arg(long, env = "CALLISTO_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Serve HTTPS with a certificate generated at start for the --tls-name
    /// names. Browsers will warn; compare the printed SHA-256 fingerprint.
    #[arg(long, env = "CALLISTO_TLS_SELF_SIGNED")]
    pub tls_self_signed: bool,

    /// DNS name or IP address for the self-signed certificate (repeatable, or
    /// comma-separated in the environment variable).
    #[arg(
        long = "tls-name",
        env = "CALLISTO_TLS_NAME",
        value_delimiter = ',',
        default_value = "localhost"
    )]
    pub tls_names: Vec<String>,

    /// Most peers in one room. Calls are full mesh, so every peer sends its
    /// media to every other: 4–6 is comfortable, 16 strains most uplinks.
    #[arg(long, env = "CALLISTO_MAX_ROOM_SIZE", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub max_room_size: u32,

    /// Most rooms open at once; joining a new room past this fails with `server-full`.
    #[arg(long, env = "CALLISTO_MAX_ROOMS", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_rooms: u32,

    /// Largest signaling message in bytes; a larger one closes the connection.
    #[arg(long, env = "CALLISTO_MAX_MESSAGE_BYTES", default_value_t = 65_536, value_parser = clap::value_parser!(u32).range(256..=16_777_216))]
    pub max_message_bytes: u32,

    /// Seconds of silence (no message, no pong) before a client is dropped.
    /// The server pings every third of this.
    #[arg(long, env = "CALLISTO_HEARTBEAT_TIMEOUT", default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..=3600))]
    pub heartbeat_timeout: u32,

    /// Sustained signaling messages per second allowed per connection.
    #[arg(long, env = "CALLISTO_MAX_MESSAGES_PER_SECOND", default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_messages_per_second: u32,

    /// Messages a connection may send in one burst (ICE candidates come in bursts).
    #[arg(long, env = "CALLISTO_MAX_MESSAGE_BURST", default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_message_burst: u32,

    /// STUN or TURN URL handed to browsers in `welcome.iceServers`, e.g.
    /// stun:stun.example.org:3478 or turn:turn.example.org:3478?transport=udp
    /// (repeatable).
    #[arg(
        long = "ice-server",
        env = "CALLISTO_ICE_SERVERS",
        value_delimiter = ','
    )]
    pub ice_servers: Vec<String>,

    /// Username for the turn: and turns: URLs of --ice-server.
    #[arg(long, env = "CALLISTO_ICE_USERNAME", requires = "ice_credential")]
    pub ice_username: Option<String>,

    /// Credential for the turn: and turns: URLs of --ice-server.
    #[arg(
        long,
        env = "CALLISTO_ICE_CREDENTIAL",
        requires = "ice_username",
        hide_env_values = true
    )]
    pub ice_credential: Option<String>,

    /// Log filter, RUST_LOG syntax: info, debug, callisto_signal=debug,...
    #[arg(long, env = "CALLISTO_LOG", default_value = "info")]
    pub log: String,

    /// Log line format.
    #[arg(long, env = "CALLISTO_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn defaults() {
        let cli = Cli::try_parse_from(["callisto", "serve"]).unwrap();
        let Command::Serve(a) = cli.command;
        assert_eq!(a.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(a.max_room_size, 16);
        assert_eq!(a.max_message_bytes, 65_536);
        assert_eq!(a.heartbeat_timeout, 30);
        assert_eq!(a.tls_names, ["localhost"]);
        assert!(!a.tls_self_signed);
    }

    #[test]
    fn refuses_nonsense_with_a_message() {
        let err = Cli::try_parse_from(["callisto", "serve", "--listen", "nowhere"]).unwrap_err();
        assert!(err.to_string().contains("--listen"), "{err}");
        assert!(Cli::try_parse_from(["callisto", "serve", "--tls-cert", "a.pem"]).is_err());
        assert!(Cli::try_parse_from(["callisto", "serve", "--max-room-size", "0"]).is_err());
        assert!(
            Cli::try_parse_from([
                "callisto",
                "serve",
                "--tls-self-signed",
                "--tls-cert",
                "a",
                "--tls-key",
                "b"
            ])
            .is_err()
        );
    }
}
