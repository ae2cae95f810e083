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

// Parsed once at start: the size of a variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the web app, signaling server and STUN/TURN server. With no
    /// flags it serves http://127.0.0.1:8080 and TURN on 127.0.0.1:3478,
    /// for this machine only.
    Serve(ServeArgs),
    /// Run only the STUN/TURN server.
    Turn(TurnCmdArgs),
    /// Join a room as a native WebRTC peer, without a browser: chat with
    /// those in it (lines on stdin go out, messages come out on stdout)
    /// and receive their media.
    Peer(PeerArgs),
    /// Load a server with native peers: many rooms of several peers each,
    /// every peer connected to the others of its room and chatting, for a
    /// bounded time; then report how joining, connecting and the chat went.
    Load(LoadArgs),
    /// Try a server's STUN and TURN from this machine, as a browser here
    /// would: the address the server sees (behind a NAT or not), and a
    /// relay over each TURN transport it offers.
    Probe(ProbeArgs),
    /// Benchmarks against other servers on this machine (loopback only).
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// TURN relaying: Callisto vs coturn vs turn-rs vs a plain forwarder.
    Turn(BenchTurnArgs),
    /// The plain UDP forwarder the TURN benchmark uses as its ceiling.
    #[command(hide = true)]
    Forwarder {
        #[arg(long)]
        listen: SocketAddr,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchTarget {
    Callisto,
    Coturn,
    #[value(name = "turn-rs")]
    TurnRs,
    Forwarder,
    /// Callisto with the kernel relay on loopback (`--turn-kernel-relay
    /// lo`): needs root, and attaches XDP to the loopback of the network
    /// namespace the benchmark runs in.
    #[value(name = "callisto-kernel")]
    CallistoKernel,
    /// No relay at all: the generator and the echo peer talk directly
    /// (pattern a only). What the two ends cost by themselves, the same for
    /// every server: subtracted from a server's total CPU, it leaves what
    /// the relaying costs, wherever the kernel charges it.
    Direct,
}

/// `--turn-allocation-family`: see [`callisto_turn::server::DefaultFamily`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AllocationFamily {
    Ipv4,
    Ipv6,
    Client,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchPattern {
    /// Client ↔ external UDP echo peer through one allocation.
    A,
    /// Client ↔ client, both allocated on the server.
    B,
}

impl BenchPattern {
    pub fn label(self) -> &'static str {
        match self {
            BenchPattern::A => "a: client↔peer",
            BenchPattern::B => "b: client↔client",
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct BenchTurnArgs {
    /// Servers to measure, in order.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "callisto,coturn,turn-rs,forwarder"
    )]
    pub servers: Vec<BenchTarget>,
    /// Traffic patterns.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "a,b")]
    pub patterns: Vec<BenchPattern>,
    /// Allocations (pattern b: pairs) per run.
    #[arg(long, value_delimiter = ',', default_value = "1,10,500")]
    pub allocations: Vec<usize>,
    /// Payload sizes in bytes (at least 16).
    #[arg(long, value_delimiter = ',', default_value = "100,1200")]
    pub payloads: Vec<usize>,
    /// Round trips per second offered, all allocations together; 0 runs
    /// closed loop (a window in flight per allocation) to find the maximum.
    #[arg(long, default_value_t = 10_000)]
    pub rate: u64,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    /// Worker threads for every server.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Runs per configuration, servers taking turns; the median is shown.
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// The turn-rs binary (default: turn-server on PATH).
    #[arg(long)]
    pub turn_rs: Option<PathBuf>,
    /// Where processes run (Linux only); unset: wherever the scheduler
    /// puts them. `--pin` alone means `split`.
    #[arg(long, value_enum, num_args = 0..=1, default_missing_value = "split")]
    pub pin: Option<BenchPin>,
    /// The load: our own generator, or coturn's `turnutils_uclient` (the
    /// tool the reference figures came from; it paces itself, so `--rate`
    /// and `--duration` do not apply, and `--allocations` is its client
    /// count, `-m`).
    #[arg(long, value_enum, default_value = "ours")]
    pub generator: BenchGenerator,
    /// Messages each uclient client sends (`-n`), with `--generator uclient`.
    #[arg(long, default_value_t = 2000)]
    pub uclient_messages: u64,
    /// Our generator's clients send Send indications (with FINGERPRINT, as
    /// Firefox sends all its media) to permitted peers and receive Data
    /// indications, instead of ChannelData on bound channels. With
    /// `--generator uclient`, uclient's `-s`: its own layout, DATA before
    /// XOR-PEER-ADDRESS.
    #[arg(long)]
    pub send_indications: bool,
    /// With `--generator uclient`: clients reach the servers over TCP
    /// (`-t`), relaying to UDP peers as browsers behind a firewall do.
    /// Only Callisto and coturn run (turn-rs is installed for UDP only).
    #[arg(long)]
    pub uclient_tcp: bool,
    /// With `--generator uclient`: clients reach the servers over TLS
    /// (`-t -S`), each server with a fresh self-signed certificate. Implies
    /// `--uclient-tcp`.
    #[arg(long)]
    pub uclient_tls: bool,
    /// Our generator's clients mark what they send with this TOS byte
    /// (DSCP and ECN, e.g. 0xb9: EF with ECT(1)), and the echo peer
    /// answers with the TOS it received; servers that pass TOS on pay for
    /// it per packet. 0: unmarked, as browsers send by default.
    #[arg(long, default_value = "0", value_parser = parse_tos)]
    pub tos: u8,
    /// Everything over IPv6 on ::1 (RFC 6156): servers listen and relay
    /// there, clients ask for IPv6 relays, and the echo peer is there too
    /// (beside the relays: loopback has one IPv6 address). Our generator
    /// only.
    #[arg(long)]
    pub ipv6: bool,
}

/// A TOS byte, in decimal or as 0x.. hex.
fn parse_tos(s: &str) -> Result<u8, String> {
    let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u8::from_str_radix(hex, 16),
        None => s.parse(),
    };
    parsed.map_err(|_| format!("{s:?} is not a TOS byte: give 0 to 255, or 0x00 to 0xff"))
}

/// Who generates the load in `callisto bench turn`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchGenerator {
    /// Our generator: paced or closed loop, with rates and latency.
    Ours,
    /// coturn's `turnutils_uclient` (and `turnutils_peer` as the echo peer):
    /// CPU per packet and loss under the reference load.
    Uclient,
}

/// CPU placement for `callisto bench turn --pin`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchPin {
    /// Servers on the last CPU, the load generator on the others: they never
    /// preempt each other, but every packet wakes a task on another CPU.
    Split,
    /// Everything on the first CPU: no cross-CPU wake-ups at all, the
    /// cheapest delivery this machine has.
    OneCpu,
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

    #[command(flatten)]
    pub tls: TlsArgs,

    /// Only people with an access code may join a room (and so get TURN
    /// credentials): the codes, one per line (lines starting with # are
    /// comments), read at start and again on SIGHUP. Use long random
    /// ones (openssl rand -base64 18). Without it, anyone who can reach
    /// the server can use it.
    #[arg(long, env = "CALLISTO_ACCESS_CODES_FILE", value_name = "PATH")]
    pub access_codes_file: Option<PathBuf>,

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

    /// Most bytes of signaling waiting, across all clients, to be sent to
    /// clients slower to read than others send to them (each client may
    /// have 1 MiB waiting, or twice --max-message-bytes). Past it, a client
    /// that already has messages waiting is disconnected rather than sent
    /// more; one whose queue is empty still gets its next message.
    #[arg(long, env = "CALLISTO_MAX_QUEUED_BYTES", default_value_t = 256 << 20, value_parser = clap::value_parser!(u64).range(65_536..))]
    pub max_queued_bytes: u64,

    /// Seconds of silence (no message, no pong) before a client is dropped.
    /// The server pings every third of this.
    #[arg(long, env = "CALLISTO_HEARTBEAT_TIMEOUT", default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..=3600))]
    pub heartbeat_timeout: u32,

    /// Seconds a peer whose connection was lost (no leave, no close frame:
    /// a network change, a dropped proxy connection) keeps its place in
    /// the room, so that it can resume on a new connection with the same
    /// id while its calls go on. The others see it leave only after this.
    /// 0 removes it at once.
    #[arg(long, env = "CALLISTO_RESUME_GRACE", value_name = "SECONDS", default_value_t = 15, value_parser = clap::value_parser!(u32).range(0..=3600))]
    pub resume_grace: u32,

    /// Where the rooms are kept across a restart: written at shutdown,
    /// read back (and removed) at start, so that everyone takes their
    /// place back with the same id, in a room still locked, within
    /// --resume-grace. Default: rooms.json in systemd's StateDirectory=
    /// if there is one; else rooms are not kept, and a restart gives
    /// everyone new ids.
    #[arg(long, env = "CALLISTO_STATE_FILE", value_name = "PATH")]
    pub state_file: Option<PathBuf>,

    /// Sustained signaling messages per second allowed per connection.
    #[arg(long, env = "CALLISTO_MAX_MESSAGES_PER_SECOND", default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_messages_per_second: u32,

    /// Messages a connection may send in one burst (ICE candidates come in bursts).
    #[arg(long, env = "CALLISTO_MAX_MESSAGE_BURST", default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_message_burst: u32,

    /// Seconds a client has to send a request's headers, counted from when
    /// the server is ready to read them: also how long an idle kept-alive
    /// HTTP connection stays open. Browsers send theirs at once; a client
    /// that trickles them in is cut off.
    #[arg(long, env = "CALLISTO_REQUEST_HEADER_TIMEOUT", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=3600))]
    pub request_header_timeout: u32,

    /// Most HTTP and WebSocket connections at once. Never more than a
    /// quarter of the open-file limit, which the server raises to its hard
    /// limit at start. A connection that sends nothing for twice the
    /// heartbeat timeout is closed.
    #[arg(long, env = "CALLISTO_MAX_CONNECTIONS", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// Most HTTP and WebSocket connections from one IPv4 address or IPv6
    /// /64. Each browser tab holds one WebSocket and a few HTTP connections
    /// while it loads; raise it for large offices behind one address.
    #[arg(long, env = "CALLISTO_MAX_CONNECTIONS_PER_IP", default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections_per_ip: u32,

    /// Reverse proxies (address or CIDR, repeatable; `none` for none)
    /// whose X-Forwarded-For header names the client: in logs, and for
    /// --max-connections-per-ip, which then counts each client's
    /// WebSockets rather than the proxy's connections. The default,
    /// loopback, fits a proxy on this machine and gives little away (a
    /// program here can connect from any of 127.0.0.0/8 anyway); set it
    /// to your proxy's address if something here forwards other hosts'
    /// connections without writing X-Forwarded-For (an SSH tunnel).
    /// Giving the flag replaces the default.
    #[arg(
        long = "trusted-proxy",
        value_name = "CIDR",
        env = "CALLISTO_TRUSTED_PROXIES",
        value_delimiter = ',',
        default_value = "127.0.0.0/8,::1",
        value_parser = crate::trusted_proxies::parse_flag,
    )]
    pub trusted_proxies: Vec<Option<ipnet::IpNet>>,

    /// Pages of another site allowed to open the signaling WebSocket, as
    /// origins (https://app.example.org, repeatable; `*` for any). Pages
    /// of this server's own host always may; browsers' WebSockets from
    /// anywhere else are refused (403), so that other sites cannot use
    /// this server, and its TURN relay, through their visitors' browsers.
    #[arg(
        long = "allowed-origin",
        value_name = "ORIGIN",
        env = "CALLISTO_ALLOWED_ORIGINS",
        value_delimiter = ',',
        value_parser = crate::origins::parse_flag,
    )]
    pub allowed_origins: Vec<crate::origins::AllowedOrigin>,

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
    #[arg(
        long,
        env = "CALLISTO_ICE_USERNAME",
        requires = "ice_credential",
        conflicts_with_all = ["ice_secret", "ice_secrets_file"]
    )]
    pub ice_username: Option<String>,

    /// Credential for the turn: and turns: URLs of --ice-server.
    #[arg(
        long,
        env = "CALLISTO_ICE_CREDENTIAL",
        requires = "ice_username",
        hide_env_values = true
    )]
    pub ice_credential: Option<String>,

    /// The shared secret of the TURN server of the turn: and turns: URLs of
    /// --ice-server (coturn: static-auth-secret, with use-auth-secret):
    /// each browser gets time-limited credentials signed with it, valid for
    /// --turn-credential-ttl and renewed while it stays, rather than a
    /// password that never expires.
    #[arg(long, env = "CALLISTO_ICE_SECRET", hide_env_values = true)]
    pub ice_secret: Option<String>,

    /// --ice-secret from a file instead, read at start and again on
    /// SIGHUP, so that the TURN server's secret can change without a
    /// restart: one per line (lines starting with # are comments), the
    /// first signs. Browsers in rooms get credentials from a new one at
    /// once.
    #[arg(
        long = "ice-secrets-file",
        env = "CALLISTO_ICE_SECRETS_FILE",
        value_name = "PATH",
        conflicts_with = "ice_secret"
    )]
    pub ice_secrets_file: Option<PathBuf>,

    /// Serve Prometheus metrics at http://ADDR/metrics (plain HTTP), e.g.
    /// 127.0.0.1:9090, instead of on the web port, where anyone who can
    /// load the app can read them.
    #[arg(long, env = "CALLISTO_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,

    /// Do not run the built-in STUN/TURN server (browsers then get only
    /// the --ice-server URLs).
    #[arg(long, env = "CALLISTO_NO_TURN")]
    pub no_turn: bool,

    /// How long the TURN credentials handed to each browser stay valid, in
    /// seconds. A browser in a room gets fresh ones every half of this, so
    /// a shorter lifetime costs only a small message per browser that often.
    #[arg(long, env = "CALLISTO_TURN_CREDENTIAL_TTL", default_value_t = 86_400, value_parser = clap::value_parser!(u64).range(10..))]
    pub turn_credential_ttl: u64,

    #[command(flatten)]
    pub turn: TurnArgs,

    #[command(flatten)]
    pub logging: LogArgs,
}

#[derive(Debug, Clone, Args)]
pub struct LogArgs {
    /// Log filter, RUST_LOG syntax: info, debug, callisto_signal=debug,...
    #[arg(long, env = "CALLISTO_LOG", default_value = "info")]
    pub log: String,

    /// Log line format.
    #[arg(long, env = "CALLISTO_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Args)]
pub struct TlsArgs {
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

    /// How often to look at --tls-cert and --tls-key for a renewed
    /// certificate, in seconds; 0 looks only on SIGHUP. New connections get
    /// the new certificate, open ones go on.
    #[arg(
        long,
        env = "CALLISTO_TLS_RECHECK",
        value_name = "SECONDS",
        default_value_t = 10
    )]
    pub tls_recheck: u64,
}

impl TlsArgs {
    pub fn enabled(&self) -> bool {
        self.tls_self_signed || self.tls_cert.is_some()
    }

    /// How often to look at the certificate files, if at all.
    pub fn recheck(&self) -> Option<std::time::Duration> {
        (self.tls_recheck > 0).then(|| std::time::Duration::from_secs(self.tls_recheck))
    }
}

#[derive(Debug, Clone, Args)]
pub struct TurnCmdArgs {
    #[command(flatten)]
    pub turn: TurnArgs,

    /// Serve Prometheus metrics at http://ADDR/metrics (plain HTTP; off
    /// unless given). `callisto serve` has them on its web port instead.
    #[arg(long, env = "CALLISTO_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,

    #[command(flatten)]
    pub tls: TlsArgs,

    #[command(flatten)]
    pub logging: LogArgs,
}

/// Which Callisto server `peer`, `load` and `probe` talk to, and how
/// they get in.
#[derive(Debug, Clone, Args)]
pub struct ServerTarget {
    /// The server, as in a browser's address bar (http://HOST:PORT or
    /// https://HOST), or its WebSocket (ws://HOST:PORT/ws).
    #[arg(long, default_value = "http://127.0.0.1:8080", value_name = "URL")]
    pub server: String,

    /// The access code, on a server that needs one (it hands out TURN
    /// credentials only to those who join). Read from the environment
    /// rather than the command line, where others can see it.
    #[arg(
        long = "access-code",
        env = "CALLISTO_ACCESS_CODE",
        hide_env_values = true
    )]
    pub access: Option<String>,

    /// For a server with a self-signed certificate (https://): trust it by
    /// its SHA-256 fingerprint, as `callisto serve` logs it (AB:CD:…),
    /// instead of by the system's root certificates; for the signaling
    /// and for TURN over TLS.
    #[arg(long, value_name = "SHA256")]
    pub tls_fingerprint: Option<callisto_peer::Fingerprint>,
}

#[derive(Debug, Clone, Args)]
pub struct PeerArgs {
    #[command(flatten)]
    pub target: ServerTarget,

    /// The room to join.
    #[arg(long)]
    pub room: String,

    /// The name the others see.
    #[arg(long, default_value = "callisto peer")]
    pub name: String,

    /// Send a test pattern (VP8, 320×240, 15 frames a second) as camera
    /// and a 440 Hz tone (Opus) as microphone, to everyone; else it sends
    /// no media.
    #[arg(long, conflicts_with = "watch")]
    pub send_media: bool,

    /// Join to watch: seen only by those taking part, connected only to
    /// them, seeing none of the others who watch (a broadcast's audience).
    #[arg(long)]
    pub watch: bool,

    /// Save the files others offer it in this folder (each under its own
    /// name, never over another file); without it, files are declined.
    #[arg(long, value_name = "DIR")]
    pub save_files: Option<std::path::PathBuf>,

    /// The local address to take media on (default: the one this machine
    /// reaches the server from).
    #[arg(long, value_name = "IP")]
    pub bind: Option<std::net::IpAddr>,

    /// Offer a relayed candidate too, on the server's TURN (with the
    /// credentials it hands out), for peers with no direct path.
    #[arg(long)]
    pub relay: bool,

    /// Offer only a relayed candidate: everything goes through the
    /// server's TURN (a check that TURN works end to end).
    #[arg(long)]
    pub relay_only: bool,

    /// How to reach the TURN server for --relay or --relay-only: udp, or
    /// tcp or tls from a network that lets no UDP out (the relayed
    /// address is UDP either way).
    #[arg(long, value_enum, default_value_t = RelayOver::Udp, value_name = "TRANSPORT")]
    pub relay_over: RelayOver,

    /// Say this in the chat to everyone in the room when joining (as soon
    /// as each connection is up); repeatable.
    #[arg(long, value_name = "TEXT")]
    pub say: Vec<String>,

    /// Leave after this many seconds (default: on Ctrl-C or SIGTERM).
    #[arg(long = "for", value_name = "SECONDS")]
    pub duration: Option<f64>,

    /// Print events as JSON lines instead of text.
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub logging: LogArgs,
}

#[derive(Debug, Clone, Args)]
pub struct LoadArgs {
    #[command(flatten)]
    pub target: ServerTarget,

    /// Rooms, each of its own (named at random).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=250))]
    pub rooms: u32,

    /// Peers in each room; each connects to all the others of its room
    /// (but those watching, to those taking part only).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=16))]
    pub peers: u32,

    /// Of each room's peers, how many join to watch (a broadcast's
    /// audience), the last to join; the others take part.
    #[arg(long, default_value_t = 0, value_name = "PEERS")]
    pub watching: u32,

    /// Seconds from the first join until everyone leaves.
    #[arg(long = "for", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=600), value_name = "SECONDS")]
    pub duration: u32,

    /// Seconds over which the joins are spread (0: all at once).
    #[arg(long, default_value_t = 0.0, value_name = "SECONDS")]
    pub ramp: f64,

    /// Chat messages each peer writes to its room per second (0: none).
    #[arg(long, default_value_t = 1.0, value_name = "PER_SECOND")]
    pub chat_rate: f64,

    /// Every peer through the server's TURN only (relayed candidates),
    /// to load the relay as well as the signaling.
    #[arg(long)]
    pub relay_only: bool,

    /// How the peers reach the TURN server with --relay-only: udp, tcp
    /// or tls (to load TURN's stream transports).
    #[arg(long, value_enum, default_value_t = RelayOver::Udp, value_name = "TRANSPORT", requires = "relay_only")]
    pub relay_over: RelayOver,

    /// Those taking part send a test pattern and a tone (about 210 kbit/s)
    /// to everyone they meet, as cameras and microphones do.
    #[arg(long)]
    pub media: bool,

    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub logging: LogArgs,
}

#[derive(Debug, Clone, Args)]
pub struct ProbeArgs {
    #[command(flatten)]
    pub target: ServerTarget,

    /// Print one JSON object per URL instead of text.
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub logging: LogArgs,
}

/// An inclusive port range, `LOW-HIGH`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange(pub u16, pub u16);

impl std::str::FromStr for PortRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (lo, hi) = s
            .split_once('-')
            .ok_or_else(|| format!("{s:?} is not LOW-HIGH, e.g. 49152-65535"))?;
        let parse = |p: &str| {
            p.trim()
                .parse::<u16>()
                .map_err(|_| format!("{p:?} is not a port number (1-65535)"))
        };
        let (lo, hi) = (parse(lo)?, parse(hi)?);
        if lo == 0 || lo > hi {
            return Err(format!("{s:?}: LOW must be at least 1 and not above HIGH"));
        }
        Ok(PortRange(lo, hi))
    }
}

/// `NAME:PASSWORD` for a static TURN user.
#[derive(Clone, PartialEq, Eq)]
pub struct TurnUser {
    pub name: String,
    pub password: String,
}

impl std::fmt::Debug for TurnUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TurnUser({}:***)", self.name)
    }
}

impl std::str::FromStr for TurnUser {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            Some((n, p)) if !n.is_empty() && !p.is_empty() => Ok(TurnUser {
                name: n.to_owned(),
                password: p.to_owned(),
            }),
            _ => Err("expected NAME:PASSWORD, both non-empty".into()),
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct TurnArgs {
    /// STUN/TURN address for UDP and TCP. Serving on all interfaces
    /// (0.0.0.0:3478) is an explicit choice; it then needs --turn-relay-ip.
    #[arg(long, env = "CALLISTO_TURN_LISTEN", default_value = "127.0.0.1:3478")]
    pub turn_listen: SocketAddr,

    /// TURN over TLS address (e.g. 0.0.0.0:5349); uses the --tls-* certificate.
    #[arg(long, env = "CALLISTO_TURN_TLS_LISTEN")]
    pub turn_tls_listen: Option<SocketAddr>,

    /// Address relay sockets bind to (default: the --turn-listen address).
    /// Give an IPv4 and an IPv6 address (repeat the flag) to relay both:
    /// each client gets the family it asks for, IPv4 unless it asks.
    #[arg(
        long = "turn-relay-ip",
        env = "CALLISTO_TURN_RELAY_IP",
        value_delimiter = ','
    )]
    pub turn_relay_ips: Vec<std::net::IpAddr>,

    /// The relay family of a client that asks for none (browsers do not
    /// ask): ipv4, as RFC 8656 has it; ipv6; or client, that of the
    /// client's own address. Default: ipv4, or client on a server with no
    /// IPv4 relay address (with ipv4 there, browsers would get no relay).
    #[arg(
        long = "turn-allocation-family",
        env = "CALLISTO_TURN_ALLOCATION_FAMILY",
        value_enum
    )]
    pub turn_allocation_family: Option<AllocationFamily>,

    /// Public address to advertise for relays, when the server is behind a
    /// 1:1 NAT; one per family, for the relay address of that family.
    #[arg(
        long = "turn-external-ip",
        env = "CALLISTO_TURN_EXTERNAL_IP",
        value_delimiter = ','
    )]
    pub turn_external_ips: Vec<std::net::IpAddr>,

    /// UDP ports for relays.
    #[arg(long, env = "CALLISTO_TURN_PORT_RANGE", default_value = "49152-65535")]
    pub turn_port_range: PortRange,

    /// Realm for the long-term credential mechanism.
    #[arg(long, env = "CALLISTO_TURN_REALM", default_value = "callisto")]
    pub turn_realm: String,

    /// A static TURN user, NAME:PASSWORD (repeatable).
    #[arg(
        long = "turn-user",
        env = "CALLISTO_TURN_USERS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub turn_users: Vec<TurnUser>,

    /// Shared secret for time-limited credentials (coturn's use-auth-secret
    /// scheme). `serve` generates one at start when none is given.
    #[arg(long, env = "CALLISTO_TURN_SECRET", hide_env_values = true)]
    pub turn_secret: Option<String>,

    /// Shared secrets from a file instead, read at start and again on
    /// SIGHUP: one per line (lines starting with # are comments). All are
    /// accepted; the first signs the credentials `serve` hands out. To
    /// rotate, put the new one first, and remove the old one once the
    /// credentials made with it have expired.
    #[arg(
        long = "turn-secrets-file",
        env = "CALLISTO_TURN_SECRETS_FILE",
        value_name = "PATH",
        conflicts_with = "turn_secret"
    )]
    pub turn_secrets_file: Option<PathBuf>,

    /// Allow relaying to these peers even if private or loopback (CIDR, repeatable).
    #[arg(
        long = "turn-allow-peer",
        env = "CALLISTO_TURN_ALLOW_PEERS",
        value_delimiter = ','
    )]
    pub turn_allow_peers: Vec<ipnet::IpNet>,

    /// Never relay to these peers (CIDR, repeatable).
    #[arg(
        long = "turn-deny-peer",
        env = "CALLISTO_TURN_DENY_PEERS",
        value_delimiter = ','
    )]
    pub turn_deny_peers: Vec<ipnet::IpNet>,

    /// Send UDP and TCP clients that ask for an allocation to these TURN
    /// servers instead, in turn (IP:PORT, repeatable; 300 Try Alternate):
    /// to spread clients over several servers behind one TURN URL. They
    /// must take the same credentials (the same --turn-secret and realm).
    /// A client goes only to one of its own address family.
    #[arg(
        long = "turn-alternate-server",
        env = "CALLISTO_TURN_ALTERNATE_SERVERS",
        value_delimiter = ','
    )]
    pub turn_alternate_servers: Vec<SocketAddr>,

    /// The same for TLS clients: TLS listeners of other servers, whose
    /// certificate is valid for the name the clients used for this one.
    #[arg(
        long = "turn-tls-alternate-server",
        env = "CALLISTO_TURN_TLS_ALTERNATE_SERVERS",
        value_delimiter = ','
    )]
    pub turn_tls_alternate_servers: Vec<SocketAddr>,

    /// Alternate TURN servers from a file instead, read at start and again
    /// on SIGHUP: one IP:PORT per line, or tls IP:PORT for TLS clients (#
    /// comments). Write other servers into it and send SIGHUP to drain
    /// this one of new clients while its calls go on; empty it to serve
    /// them here again.
    #[arg(
        long = "turn-alternate-servers-file",
        env = "CALLISTO_TURN_ALTERNATE_SERVERS_FILE",
        value_name = "PATH",
        conflicts_with_all = ["turn_alternate_servers", "turn_tls_alternate_servers"]
    )]
    pub turn_alternate_servers_file: Option<PathBuf>,

    /// How often to check that each alternate TURN server answers, in
    /// seconds: clients are sent only to those that do (one that has not
    /// answered yet, or missed three checks in a row, is skipped). 0 sends
    /// clients to every alternate, unchecked.
    #[arg(
        long,
        env = "CALLISTO_TURN_ALTERNATE_CHECK",
        value_name = "SECONDS",
        default_value_t = 5
    )]
    pub turn_alternate_check: u64,

    /// Most allocations at once, all users together.
    #[arg(long, env = "CALLISTO_TURN_MAX_ALLOCATIONS", default_value_t = 10_000)]
    pub turn_max_allocations: usize,

    /// Most allocations one username may hold.
    #[arg(long, env = "CALLISTO_TURN_USER_QUOTA", default_value_t = 100)]
    pub turn_user_quota: usize,

    /// Most allocations from one IPv4 address or IPv6 /64, whatever the
    /// usernames (`serve` hands fresh credentials to everyone who joins a
    /// room). A browser takes one per TURN URL and network interface for
    /// each peer it calls; raise it for large offices behind one address.
    #[arg(long, env = "CALLISTO_TURN_MAX_ALLOCATIONS_PER_IP", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub turn_max_allocations_per_ip: u32,

    /// Most TCP and TLS connections at once, together. Never more than a
    /// quarter of the open-file limit, which the server raises to its hard
    /// limit at start: the rest stays for relay sockets and the web server.
    #[arg(long, env = "CALLISTO_TURN_MAX_CONNECTIONS", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub turn_max_connections: u32,

    /// Most TCP and TLS connections from one IPv4 address or IPv6 /64.
    /// A browser behind a firewall that only lets TCP out holds one or two
    /// per call it is in; raise it for large offices behind one address.
    #[arg(long, env = "CALLISTO_TURN_MAX_CONNECTIONS_PER_IP", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub turn_max_connections_per_ip: u32,

    /// Relayed bytes per second per allocation and direction (0: unlimited).
    #[arg(long, env = "CALLISTO_TURN_BPS_PER_ALLOCATION", default_value_t = 0)]
    pub turn_bps_per_allocation: u64,

    /// Answers to unauthenticated requests (STUN Binding, 401 challenges) per
    /// second per source IP; bursts of twice that. Raise it when many users
    /// share one address (a large office NAT).
    #[arg(long, env = "CALLISTO_TURN_UNAUTH_RATE", default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..))]
    pub turn_unauth_rate: u32,

    /// No amplification: bytes a UDP source may be sent, in answers to
    /// unauthenticated requests, beyond the bytes it sent (refilled over
    /// 8 s). Browsers need a little (their first requests are smaller than
    /// any answer); 0 answers nobody more than it sent, which delays a
    /// browser's first TURN answer by its retransmissions (about 2 s).
    #[arg(long, env = "CALLISTO_TURN_UNAUTH_ALLOWANCE", default_value_t = 512)]
    pub turn_unauth_allowance: u32,

    /// UDP worker threads (default: one per CPU core).
    #[arg(long, env = "CALLISTO_TURN_THREADS")]
    pub turn_threads: Option<usize>,

    /// Relay UDP clients' data to and from their peers inside the kernel
    /// (XDP) on this network interface: the interface clients and peers
    /// reach this server through (repeatable; `lo` for loopback; `auto`
    /// for the ones holding the listening and relay addresses). Needs
    /// root, and --turn-listen on one address. Keeps to
    /// --turn-bps-per-allocation as the server does. Everything else is still relayed by the server.
    #[arg(
        long = "turn-kernel-relay",
        env = "CALLISTO_TURN_KERNEL_RELAY",
        value_delimiter = ',',
        value_name = "INTERFACE"
    )]
    pub turn_kernel_relay: Vec<String>,

    /// With --turn-kernel-relay: where the kernel relay cannot run (no
    /// root or CAP_BPF, a kernel without BPF, an interface missing or held
    /// by another XDP program), log why and relay everything in the
    /// server, instead of refusing to start.
    #[arg(
        long = "turn-kernel-relay-optional",
        env = "CALLISTO_TURN_KERNEL_RELAY_OPTIONAL",
        requires = "turn_kernel_relay"
    )]
    pub turn_kernel_relay_optional: bool,
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
        let Command::Serve(a) = cli.command else {
            panic!()
        };
        assert_eq!(a.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(a.max_room_size, 16);
        assert_eq!(a.max_message_bytes, 65_536);
        assert_eq!(a.heartbeat_timeout, 30);
        assert_eq!(a.resume_grace, 15);
        assert_eq!(a.tls.tls_names, ["localhost"]);
        assert!(!a.tls.tls_self_signed);
        assert_eq!(a.turn.turn_listen.to_string(), "127.0.0.1:3478");
        assert_eq!(a.turn.turn_port_range, PortRange(49152, 65535));
        assert!(!a.no_turn);
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

    proptest::proptest! {
        /// Whatever an operator types, the flag parsers answer with a value
        /// or a message, never a panic; and what they accept means what
        /// was typed.
        #[test]
        fn port_ranges_parse_or_explain(text in "[ 0-9]{0,7}-?[ 0-9]{0,7}|\\PC{0,24}") {
            match text.parse::<PortRange>() {
                Ok(PortRange(lo, hi)) => {
                    proptest::prop_assert!(lo >= 1 && lo <= hi);
                    let (l, h) = text.split_once('-').unwrap();
                    proptest::prop_assert_eq!(l.trim().parse::<u16>().ok(), Some(lo));
                    proptest::prop_assert_eq!(h.trim().parse::<u16>().ok(), Some(hi));
                }
                Err(message) => proptest::prop_assert!(!message.is_empty()),
            }
        }

        #[test]
        fn port_ranges_round_trip(lo in 1u16.., span in 0u16..) {
            let hi = lo.saturating_add(span);
            proptest::prop_assert_eq!(format!("{lo}-{hi}").parse::<PortRange>(), Ok(PortRange(lo, hi)));
        }

        #[test]
        fn turn_users_parse_or_explain(text in "[a-z:]{0,12}|\\PC{0,24}") {
            match text.parse::<TurnUser>() {
                Ok(user) => {
                    proptest::prop_assert!(!user.name.is_empty() && !user.password.is_empty());
                    proptest::prop_assert!(!user.name.contains(':'));
                    proptest::prop_assert_eq!(format!("{}:{}", user.name, user.password), text);
                    // The password never shows in logs.
                    let shown = format!("{user:?}");
                    proptest::prop_assert!(shown.ends_with(":***)"), "{}", shown);
                }
                Err(message) => proptest::prop_assert!(!message.is_empty()),
            }
        }
    }
}

/// `--relay-over`: how the native peer reaches the TURN server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RelayOver {
    Udp,
    Tcp,
    Tls,
}

impl From<RelayOver> for callisto_peer::RelayTransport {
    fn from(over: RelayOver) -> Self {
        match over {
            RelayOver::Udp => callisto_peer::RelayTransport::Udp,
            RelayOver::Tcp => callisto_peer::RelayTransport::Tcp,
            RelayOver::Tls => callisto_peer::RelayTransport::Tls,
        }
    }
}
