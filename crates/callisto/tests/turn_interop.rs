//! The built-in TURN server against coturn's own clients, and our TURN
//! client against coturn's server. Everything runs on 127.0.0.1.
//!
//! Needs the Debian package `coturn` (scripts/test.sh installs it).

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use callisto::bench::uclient::parse_totals;
use callisto_turn::client::{Client, Event};

mod common;

const BIN: &str = env!("CARGO_BIN_EXE_callisto");

fn tool(name: &str) -> Command {
    tool_in(None, name)
}

/// coturn's tool `name`, run in the named network namespace `netns`.
fn tool_in(netns: Option<&str>, name: &str) -> Command {
    let path = format!("/usr/bin/{name}");
    assert!(
        std::path::Path::new(&path).exists(),
        "{path} is missing: install the Debian package coturn (bash scripts/test.sh does)"
    );
    match netns {
        None => Command::new(path),
        Some(ns) => {
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", ns, &path]);
            cmd
        }
    }
}

/// A child process killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_udp_port() -> u16 {
    free_udp_port_on("127.0.0.1".parse().unwrap())
}

fn free_udp_port_on(ip: std::net::IpAddr) -> u16 {
    UdpSocket::bind(SocketAddr::new(ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `callisto serve` (or `turn`) with JSON logs; returns once TURN listens.
struct Callisto {
    proc: Proc,
    /// Every log line so far.
    logs: Arc<Mutex<Vec<String>>>,
    /// Set once stderr has closed and every line is in `logs`.
    log_ended: Arc<std::sync::atomic::AtomicBool>,
    turn_port: u16,
    tls_port: Option<u16>,
    http: Option<SocketAddr>,
    https: bool,
}

/// Accepts the self-signed certificate of the server under test.
#[derive(Debug)]
struct AnyCert;

impl rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A TLS client configuration that takes any certificate (the servers
/// under test have self-signed ones) and offers `alpn`.
fn trusting_any_certificate(alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(AnyCert))
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

fn callisto(sub: &str, extra: &[&str]) -> Callisto {
    callisto_on(sub, "127.0.0.1:0", extra)
}

fn callisto_on(sub: &str, turn_listen: &str, extra: &[&str]) -> Callisto {
    callisto_with_open_files(sub, turn_listen, extra, None)
}

/// [`callisto_on`], with the open-file limit (soft and hard) at
/// `open_files`, if given.
fn callisto_with_open_files(
    sub: &str,
    turn_listen: &str,
    extra: &[&str],
    open_files: Option<u64>,
) -> Callisto {
    let mut cmd = Command::new(BIN);
    if let Some(n) = open_files {
        use std::os::unix::process::CommandExt;
        // SAFETY: setrlimit is async-signal-safe, and the closure touches
        // nothing else of the parent's.
        unsafe {
            cmd.pre_exec(move || {
                let limit = libc::rlimit {
                    rlim_cur: n,
                    rlim_max: n,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    cmd.arg(sub);
    if sub == "serve" {
        cmd.args(["--listen", "127.0.0.1:0"]);
    }
    cmd.args([
        "--turn-listen",
        turn_listen,
        "--log-format",
        "json",
        "--turn-realm",
        "interop",
    ])
    .args(extra)
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let proc = Proc(child);
    let (mut turn_port, mut tls_port, mut http, mut https) = (None, None, None, false);
    let deadline = Instant::now() + Duration::from_secs(20);
    let has_http = sub == "serve" || extra.contains(&"--metrics-listen");
    let mut startup = Vec::new();
    while turn_port.is_none() || (has_http && http.is_none()) {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|e| {
                panic!(
                    "callisto did not start ({e}); it said:\n{}",
                    startup.join("\n")
                )
            });
        let v = serde_json::from_str::<serde_json::Value>(&line);
        startup.push(line);
        let Ok(v) = v else {
            continue;
        };
        if let Some(udp) = v["udp"].as_str() {
            turn_port = Some(udp.parse::<SocketAddr>().unwrap().port());
            tls_port = v["tls"]
                .as_str()
                .and_then(|t| {
                    t.trim_start_matches("Some(")
                        .trim_end_matches(')')
                        .parse::<SocketAddr>()
                        .ok()
                })
                .map(|a| a.port());
        }
        if let Some(metrics) = v["metrics"].as_str() {
            http = Some(metrics.parse().unwrap());
        }
        if let Some(url) = v["url"].as_str() {
            https = url.starts_with("https://");
            let hostport = url
                .trim_start_matches("https://")
                .trim_start_matches("http://");
            http = Some(hostport.parse().unwrap());
        }
    }
    let logs = Arc::new(Mutex::new(startup));
    let sink = logs.clone();
    let log_ended = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ended = log_ended.clone();
    std::thread::spawn(move || {
        for line in rx {
            sink.lock().unwrap().push(line);
        }
        ended.store(true, std::sync::atomic::Ordering::Release);
    });
    Callisto {
        proc,
        logs,
        log_ended,
        turn_port: turn_port.unwrap(),
        tls_port,
        http,
        https,
    }
}

impl Callisto {
    /// Sends SIGHUP, and returns the first log line after it that contains
    /// `logged`.
    fn hang_up(&self, logged: &str) -> String {
        let seen = self.logs.lock().unwrap().len();
        // SAFETY: kill has no memory effects; the pid is our child's.
        let rc = unsafe { libc::kill(self.proc.0.id() as i32, libc::SIGHUP) };
        assert_eq!(rc, 0);
        self.wait_for_log(seen, logged)
    }

    /// Sends SIGTERM and waits up to 10 s for the process to end (its
    /// stderr to close, every line read).
    fn terminate(&self) {
        // SAFETY: kill has no memory effects; the pid is our child's, not
        // yet reaped (Proc does that when dropped).
        let rc = unsafe { libc::kill(self.proc.0.id() as i32, libc::SIGTERM) };
        assert_eq!(rc, 0);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.log_ended.load(std::sync::atomic::Ordering::Acquire) {
            assert!(Instant::now() < deadline, "callisto did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The first log line after the first `seen` that contains `logged`,
    /// waited for up to 10 s.
    fn wait_for_log(&self, seen: usize, logged: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let logs = self.logs.lock().unwrap();
            if let Some(line) = logs[seen..].iter().find(|l| l.contains(logged)) {
                return line.clone();
            }
            drop(logs);
            assert!(Instant::now() < deadline, "no log line with {logged:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits up to 10 s for the metric `name` (with its labels) to be `value`.
    fn wait_for_metric(&self, name: &str, value: f64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while counter(&self.metrics(), name) != value {
            assert!(Instant::now() < deadline, "{name} is not {value}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn metrics(&self) -> String {
        self.get("/metrics")
    }

    /// The whole HTTP response to `GET path`.
    fn get(&self, path: &str) -> String {
        let mut tcp = TcpStream::connect(self.http.expect("an HTTP listener")).unwrap();
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        let request = request.as_bytes();
        let mut out = Vec::new();
        if self.https {
            let conn = rustls::ClientConnection::new(
                trusting_any_certificate(&[]),
                "localhost".try_into().unwrap(),
            )
            .unwrap();
            let mut tls = rustls::StreamOwned::new(conn, tcp);
            tls.write_all(request).unwrap();
            let _ = tls.read_to_end(&mut out);
        } else {
            tcp.write_all(request).unwrap();
            tcp.read_to_end(&mut out).unwrap();
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

fn metric(text: &str, line_prefix: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(line_prefix).map(str::trim))
        .unwrap_or_else(|| panic!("no {line_prefix} in metrics:\n{text}"))
        .parse()
        .unwrap()
}

/// A counter, or 0 before anything counted it (it is not in the metrics
/// until then).
fn counter(text: &str, line_prefix: &str) -> f64 {
    if text.lines().any(|l| l.starts_with(line_prefix)) {
        metric(text, line_prefix)
    } else {
        0.0
    }
}

/// Each of `transports` relayed exactly `each` packets in both directions.
fn assert_relayed_packets(metrics: &str, transports: &[&str], each: f64) {
    for transport in transports {
        for direction in ["to_peer", "to_client"] {
            let packets = metric(
                metrics,
                &format!(
                    "callisto_turn_relayed_packets_total{{direction=\"{direction}\",transport=\"{transport}\"}}"
                ),
            );
            assert_eq!(packets, each, "{direction} over {transport}");
        }
    }
}

fn echo_peer() -> (Proc, u16) {
    echo_peer_on("127.0.0.1")
}

/// turnutils_peer on `host` (an IP address without brackets).
fn echo_peer_on(host: &str) -> (Proc, u16) {
    let port = free_udp_port_on(host.parse().unwrap());
    (echo_peer_at(None, host, port), port)
}

/// turnutils_peer on `host`:`port`, in the named network namespace `netns`.
fn echo_peer_at(netns: Option<&str>, host: &str, port: u16) -> Proc {
    let p = tool_in(netns, "turnutils_peer")
        .args(["-L", host, "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    Proc(p)
}

/// Runs turnutils_uclient; returns (sent, received, whole output).
fn uclient(
    turn_port: u16,
    peer_port: u16,
    flags: &[&str],
    user: &str,
    pass: &str,
) -> (u64, u64, String) {
    uclient_on("127.0.0.1", turn_port, peer_port, flags, user, pass)
}

/// A flag for [`uclient_on`]: leave out `-c`, so each client allocates an
/// RTP relay with EVEN-PORT's R bit and an RTCP one with the
/// RESERVATION-TOKEN it got.
const RTCP_PAIRS: &str = "rtcp-pairs";

/// Runs turnutils_uclient against a server and peer on `host`.
fn uclient_on(
    host: &str,
    turn_port: u16,
    peer_port: u16,
    flags: &[&str],
    user: &str,
    pass: &str,
) -> (u64, u64, String) {
    uclient_in(None, host, host, turn_port, peer_port, flags, (user, pass))
}

/// Runs turnutils_uclient in the named network namespace `netns` against
/// a server on `host` and a peer on `peer_host`.
fn uclient_in(
    netns: Option<&str>,
    host: &str,
    peer_host: &str,
    turn_port: u16,
    peer_port: u16,
    flags: &[&str],
    (user, pass): (&str, &str),
) -> (u64, u64, String) {
    let out = tool_in(netns, "turnutils_uclient")
        .args(flags.iter().filter(|f| **f != RTCP_PAIRS))
        .args([
            "-u",
            user,
            "-w",
            pass,
            "-e",
            peer_host,
            "-r",
            &peer_port.to_string(),
        ])
        .args([
            "-p",
            &turn_port.to_string(),
            "-n",
            "200",
            "-m",
            "10",
            "-l",
            "100",
            "-z",
            "5",
        ])
        .args((!flags.contains(&RTCP_PAIRS)).then_some("-c"))
        .arg(host)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    // A run that ended early (refused) has no totals: nothing sent or received.
    let totals = parse_totals(&text).map_or((0, 0), |t| (t.sent, t.received));
    (totals.0, totals.1, text)
}

fn assert_lossless(label: &str, (sent, received, text): (u64, u64, String)) {
    assert_eq!(sent, 2000, "{label}: sent\n{text}");
    assert_eq!(received, 2000, "{label}: received\n{text}");
    assert!(
        text.contains("Total lost packets 0 (0.000000%)"),
        "{label}:\n{text}"
    );
}

/// `callisto turn` with two UDP workers, user `user:pass`, loopback peers
/// allowed, `/metrics`, and `extra`.
fn two_worker_turn(extra: &[&str]) -> Callisto {
    let mut args = vec![
        "--turn-user",
        "user:pass",
        "--turn-allow-peer",
        "127.0.0.1/32",
        "--turn-threads",
        "2",
        "--metrics-listen",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    callisto("turn", &args)
}

/// uclient's default mode: RTP and RTCP relays on adjacent ports through a
/// reservation. With two workers, a client's RTCP socket often lands on
/// the other worker than its RTP socket, which must still redeem the token.
#[test]
fn uclient_rtp_and_rtcp_pairs_through_port_reservations() {
    let server = two_worker_turn(&[]);
    let (_peer, peer_port) = echo_peer();
    assert_lossless(
        "rtp/rtcp pairs",
        uclient(server.turn_port, peer_port, &[RTCP_PAIRS], "user", "pass"),
    );
    // `-m 10` is five RTP/RTCP sessions, each a probe allocation, then
    // RTP (R bit) and RTCP (token): all fifteen granted.
    let m = server.metrics();
    assert_eq!(
        metric(&m, "callisto_turn_allocations_total{transport=\"udp\"}"),
        15.0
    );
}

/// Client to client (`-y`: the relay/relay case of WebRTC) with two
/// workers, so that clients land on both: data between two of our
/// allocations skips the kernel whichever workers they are on, on
/// channels and as Send indications (`-s`, DATA first).
#[test]
fn uclient_client_to_client_skips_the_kernel_across_workers() {
    let server = two_worker_turn(&[]);
    for (label, flags) in [
        ("client to client", vec!["-y"]),
        ("client to client, send indications", vec!["-y", "-s"]),
    ] {
        assert_lossless(
            label,
            uclient(server.turn_port, free_udp_port(), &flags, "user", "pass"),
        );
    }
    let m = server.metrics();
    let to_client = metric(
        &m,
        "callisto_turn_relayed_packets_total{direction=\"to_client\",transport=\"udp\"}",
    );
    let in_place = metric(&m, "callisto_turn_relayed_in_place_packets_total");
    assert!(to_client >= 2000.0, "{m}");
    assert_eq!(in_place, to_client, "{m}");
}

/// Client to client over TCP and over TLS: what one connection's client
/// sends to another's allocation goes into that connection's inbox, not
/// through two relay sockets and the kernel: ChannelData, and Send
/// indications (`-s`, DATA first) as Data indications.
#[test]
fn uclient_client_to_client_over_tcp_and_tls_skips_the_kernel() {
    let server = callisto(
        "turn",
        &[
            "--turn-user",
            "user:pass",
            "--tls-self-signed",
            "--turn-tls-listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    );
    let tls = server.tls_port.expect("TLS listener");
    for (label, port, flags) in [
        ("tcp client to client", server.turn_port, vec!["-y", "-t"]),
        ("tls client to client", tls, vec!["-y", "-t", "-S"]),
        (
            "tcp send indications",
            server.turn_port,
            vec!["-y", "-t", "-s"],
        ),
        ("tls send indications", tls, vec!["-y", "-t", "-S", "-s"]),
    ] {
        assert_lossless(
            label,
            uclient(port, free_udp_port(), &flags, "user", "pass"),
        );
    }
    let m = server.metrics();
    let mut to_client = 0.0;
    for transport in ["tcp", "tls"] {
        let n = metric(
            &m,
            &format!(
                "callisto_turn_relayed_packets_total{{direction=\"to_client\",transport=\"{transport}\"}}"
            ),
        );
        assert!(n >= 2000.0, "{transport}: {m}");
        to_client += n;
    }
    let in_place = metric(&m, "callisto_turn_relayed_in_place_packets_total");
    assert_eq!(in_place, to_client, "{m}");
}

#[test]
fn stunclient_gets_its_reflexive_address() {
    let server = callisto("turn", &["--turn-user", "u:p"]);
    let out = tool("turnutils_stunclient")
        .args(["-p", &server.turn_port.to_string(), "127.0.0.1"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("UDP reflexive addr: 127.0.0.1:"), "{text}");
}

#[test]
fn uclient_over_udp_tcp_and_tls_with_channels_and_send_indications() {
    let server = callisto(
        "serve",
        &[
            "--turn-user",
            "user:pass",
            "--turn-allow-peer",
            "127.0.0.1/32",
            "--tls-self-signed",
            "--turn-tls-listen",
            "127.0.0.1:0",
        ],
    );
    let (_peer, peer_port) = echo_peer();
    let tls = server.tls_port.expect("TLS listener");
    for (label, port, flags) in [
        ("udp channels", server.turn_port, vec![]),
        ("udp send indications", server.turn_port, vec!["-s"]),
        ("tcp channels", server.turn_port, vec!["-t"]),
        ("tcp send indications", server.turn_port, vec!["-t", "-s"]),
        ("tls channels", tls, vec!["-t", "-S"]),
        ("tls send indications", tls, vec!["-t", "-S", "-s"]),
    ] {
        assert_lossless(label, uclient(port, peer_port, &flags, "user", "pass"));
    }

    // Wrong password: refused, and counted.
    let (_, received, text) = uclient(server.turn_port, peer_port, &[], "user", "wrong");
    assert_eq!(received, 0, "{text}");

    let m = server.metrics();
    assert_relayed_packets(&m, &["udp", "tcp", "tls"], 4000.0);
    for transport in ["udp", "tcp", "tls"] {
        assert!(
            metric(
                &m,
                &format!("callisto_turn_allocations_total{{transport=\"{transport}\"}}")
            ) >= 20.0
        );
    }
    assert!(
        metric(
            &m,
            "callisto_turn_relayed_bytes_total{direction=\"to_peer\",transport=\"udp\"}"
        ) >= 400_000.0
    );
    assert!(
        metric(
            &m,
            "callisto_turn_auth_failures_total{reason=\"bad-integrity\"}"
        ) >= 1.0
    );
    assert!(metric(&m, "callisto_turn_channel_bindings_total") >= 30.0);
    assert!(metric(&m, "callisto_turn_permissions_total") >= 30.0);
    assert!(m.contains("callisto_turn_allocations "), "{m}");
}

#[test]
fn ipv6_relays_for_uclient_over_udp_and_tcp() {
    // RFC 6156: an IPv6 listener relays on IPv6.
    let server = callisto_on(
        "turn",
        "[::1]:0",
        &[
            "--turn-user",
            "user:pass",
            "--turn-allow-peer",
            "::1/128",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    );
    let (_peer, peer_port) = echo_peer_on("::1");
    assert_lossless(
        "ipv6 udp",
        uclient_on("::1", server.turn_port, peer_port, &[], "user", "pass"),
    );
    assert_lossless(
        "ipv6 tcp",
        uclient_on("::1", server.turn_port, peer_port, &["-t"], "user", "pass"),
    );
    let out = tool("turnutils_stunclient")
        .args(["-p", &server.turn_port.to_string(), "::1"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("IPv6. UDP reflexive addr: ::1:"), "{text}");

    // Standalone, metrics come from --metrics-listen, and so does health.
    assert_relayed_packets(&server.metrics(), &["udp", "tcp"], 2000.0);
    let health = server.get("/healthz");
    assert!(
        health.starts_with("HTTP/1.1 200") && health.ends_with("\r\n\r\nok\n"),
        "{health}"
    );
}

/// With an IPv4 and an IPv6 relay address, a client gets an IPv4 relay
/// unless it asks for IPv6 (REQUESTED-ADDRESS-FAMILY, RFC 6156), and then
/// relays to an IPv6 peer (which an IPv4 relay refuses with 443). Without
/// an IPv6 relay address, asking for one gets 440.
#[test]
fn relays_of_both_families_as_clients_ask() {
    let server = callisto(
        "turn",
        &[
            "--turn-user",
            "user:pass",
            "--turn-relay-ip",
            "127.0.0.1",
            "--turn-relay-ip",
            "::1",
            "--turn-allow-peer",
            "127.0.0.1/32",
            "--turn-allow-peer",
            "::1/128",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    );
    let (_peer4, peer4) = echo_peer_on("127.0.0.1");
    let (_peer6, peer6) = echo_peer_on("::1");
    assert_lossless(
        "ipv4 relay by default",
        uclient_in(
            None,
            "127.0.0.1",
            "127.0.0.1",
            server.turn_port,
            peer4,
            &[],
            ("user", "pass"),
        ),
    );
    assert_lossless(
        "ipv6 relay asked for",
        uclient_in(
            None,
            "127.0.0.1",
            "::1",
            server.turn_port,
            peer6,
            &["-x"],
            ("user", "pass"),
        ),
    );
    let v4_only = callisto(
        "turn",
        &["--turn-user", "user:pass", "--turn-allow-peer", "::1/128"],
    );
    let (sent, received, text) = uclient_in(
        None,
        "127.0.0.1",
        "::1",
        v4_only.turn_port,
        peer6,
        &["-x"],
        ("user", "pass"),
    );
    assert_eq!((sent, received), (0, 0), "{text}");
    assert!(text.contains("440"), "{text}");
    // Each family's packets were relayed through its own relay sockets.
    assert_relayed_packets(&server.metrics(), &["udp"], 4000.0);
}

#[test]
fn loopback_peers_are_refused_by_default() {
    let server = callisto("serve", &["--turn-user", "user:pass"]);
    let (_peer, peer_port) = echo_peer();
    let (_, received, text) = uclient(server.turn_port, peer_port, &[], "user", "pass");
    assert_eq!(received, 0, "{text}");
    assert!(text.contains("403"), "uclient reports the refusal:\n{text}");
    assert!(metric(&server.metrics(), "callisto_turn_forbidden_peers_total") >= 1.0);
}

/// Our client, driven over a real UDP socket until `done` says so.
fn drive(
    sock: &UdpSocket,
    server: SocketAddr,
    client: &mut Client,
    done: impl FnMut(&Event) -> bool,
) -> Vec<Event> {
    drive_over(&mut Link::Udp(sock, server), client, done)
}

/// How a test's client reaches a TURN server: a UDP socket (reading with a
/// timeout set), or a TCP connection and what it has read of a message.
enum Link<'a> {
    Udp(&'a UdpSocket, SocketAddr),
    Tcp(TcpStream, Vec<u8>),
}

impl Link<'_> {
    fn send(&mut self, data: &[u8]) {
        match self {
            Link::Udp(sock, server) => {
                sock.send_to(data, *server).unwrap();
            }
            Link::Tcp(tcp, _) => tcp.write_all(data).unwrap(),
        }
    }

    /// The next message from the server, if one comes within the socket's
    /// read timeout.
    fn recv(&mut self) -> Option<Vec<u8>> {
        match self {
            Link::Udp(sock, server) => {
                let mut buf = [0u8; 2048];
                let (n, from) = sock.recv_from(&mut buf).ok()?;
                (from == *server).then(|| buf[..n].to_vec())
            }
            Link::Tcp(tcp, got) => loop {
                if let Ok(Some(len)) = callisto_turn::stun::stream_frame_len(got)
                    && got.len() >= len
                {
                    return Some(got.drain(..len).collect());
                }
                let mut buf = [0u8; 2048];
                let n = tcp.read(&mut buf).ok().filter(|&n| n > 0)?;
                got.extend_from_slice(&buf[..n]);
            },
        }
    }
}

/// Our client, driven over `link` until `done` says so.
fn drive_over(
    link: &mut Link<'_>,
    client: &mut Client,
    mut done: impl FnMut(&Event) -> bool,
) -> Vec<Event> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut events = Vec::new();
    loop {
        while let Some(t) = client.poll_transmit() {
            link.send(&t);
        }
        while let Some(e) = client.poll_event() {
            let finished = done(&e);
            events.push(e);
            if finished {
                return events;
            }
        }
        assert!(
            Instant::now() < deadline,
            "timed out; events so far: {events:?}"
        );
        if let Some(message) = link.recv() {
            client.handle_input(Instant::now(), &message);
        }
        client.handle_timeout(Instant::now());
    }
}

/// A dual allocation (RFC 8656 §7.2) over `link`, for `user`: an IPv4
/// relay and, if `ipv6` is given, an IPv6 one as well; each relays to the
/// echo peers of its family through a Send indication and a channel.
fn dual_allocation_relays_both_families(
    link: &mut Link<'_>,
    reliable: bool,
    user: (&str, &str),
    peers: &[SocketAddr],
    ipv6: Result<&str, Option<u16>>,
) {
    let mut client = Client::new(user.0, user.1, reliable, 7);
    client.allocate_dual(Instant::now());
    let events = drive_over(link, &mut client, |e| {
        matches!(e, Event::Ipv6Relay(_) | Event::Failed { .. })
    });
    let [
        ..,
        Event::Allocated { relayed, .. },
        Event::Ipv6Relay(relayed6),
    ] = events.as_slice()
    else {
        panic!("{events:?}")
    };
    assert_eq!(relayed.ip().to_string(), "127.0.0.1");
    assert_eq!(
        relayed6.map(|a| a.ip().to_string()),
        ipv6.map(str::to_owned),
        "{events:?}"
    );
    for &peer in peers {
        client.create_permission(Instant::now(), peer.ip());
        drive_over(link, &mut client, |e| {
            matches!(e, Event::PermissionCreated(_))
        });
        echoed(link, &mut client, peer, b"by Send indication");
        client.bind_channel(Instant::now(), peer);
        drive_over(link, &mut client, |e| {
            matches!(e, Event::ChannelBound { .. })
        });
        echoed(link, &mut client, peer, b"by ChannelData");
    }
}

/// Sends `payload` to the echo `peer` and checks that it comes back.
fn echoed(link: &mut Link<'_>, client: &mut Client, peer: SocketAddr, payload: &[u8]) {
    link.send(&client.send_to(peer, payload));
    let events = drive_over(link, client, |e| matches!(e, Event::Data { .. }));
    assert_eq!(
        events.last(),
        Some(&Event::Data {
            peer,
            data: payload.to_vec()
        }),
        "through the relay of {peer}'s family"
    );
}

/// Our client's dual allocations from our server, over UDP and over TCP
/// (whose connection reads both relay sockets): both relays, data through
/// each to a peer of its family. And what coturn makes of the same request.
#[test]
fn dual_allocations_from_ours_and_from_coturn() {
    let (_peer4, port4) = echo_peer_on("127.0.0.1");
    let (_peer6, port6) = echo_peer_on("::1");
    let peers = [
        SocketAddr::from(([127, 0, 0, 1], port4)),
        SocketAddr::new("::1".parse().unwrap(), port6),
    ];
    let ours = callisto(
        "turn",
        &[
            "--turn-user",
            "user:pass",
            "--turn-relay-ip",
            "127.0.0.1,::1",
            "--turn-allow-peer",
            "127.0.0.1/32",
            "--turn-allow-peer",
            "::1/128",
        ],
    );
    let server = SocketAddr::from(([127, 0, 0, 1], ours.turn_port));
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    dual_allocation_relays_both_families(
        &mut Link::Udp(&sock, server),
        false,
        ("user", "pass"),
        &peers,
        Ok("::1"),
    );
    let tcp = TcpStream::connect(server).unwrap();
    tcp.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    dual_allocation_relays_both_families(
        &mut Link::Tcp(tcp, Vec::new()),
        true,
        ("user", "pass"),
        &peers,
        Ok("::1"),
    );
    // coturn's own client asks in the draft's numbering (`-Z`): it gets
    // both relays too, and reaches peers of either family without loss.
    for (peer_host, port) in [("127.0.0.1", port4), ("::1", port6)] {
        assert_lossless(
            &format!("uclient -Z, peer {peer_host}"),
            uclient_in(
                None,
                "127.0.0.1",
                peer_host,
                ours.turn_port,
                port,
                &["-Z"],
                ("user", "pass"),
            ),
        );
    }

    let (_coturn, port) = coturn_over_udp(&["127.0.0.1", "::1"]);
    let coturn = SocketAddr::from(([127, 0, 0, 1], port));
    // coturn 4.6.1 knows ADDITIONAL-ADDRESS-FAMILY and ADDRESS-ERROR-CODE
    // only by the codepoints of the draft before RFC 8656 (0x8032, 0x8033,
    // not 0x8000, 0x8001): it takes ours (our client asks as the RFC says)
    // for an unknown optional attribute and gives an IPv4 relay alone,
    // saying nothing of the other.
    dual_allocation_relays_both_families(
        &mut Link::Udp(&sock, coturn),
        false,
        ("alice", "secret"),
        &peers[..1],
        Err(None),
    );
}

/// coturn's `turnserver` on 127.0.0.1 over UDP only, with user
/// alice:secret, relaying on `relay_ips`; and its port.
fn coturn_over_udp(relay_ips: &[&str]) -> (Proc, u16) {
    coturn_over_udp_with(relay_ips, &[])
}

/// [`coturn_over_udp`], with `extra` flags.
fn coturn_over_udp_with(relay_ips: &[&str], extra: &[&str]) -> (Proc, u16) {
    let port = free_udp_port();
    let relay_lo = 40000 + (port % 1000) * 20;
    let coturn = tool("turnserver")
        .args(["-n", "--listening-ip=127.0.0.1"])
        .args(relay_ips.iter().map(|ip| format!("--relay-ip={ip}")))
        .arg(format!("--listening-port={port}"))
        .args([
            "--lt-cred-mech",
            "--user=alice:secret",
            "--realm=coturn.test",
            "--allow-loopback-peers",
        ])
        .args(["--no-cli", "--no-tls", "--no-dtls", "--no-tcp"])
        .arg(format!("--min-port={relay_lo}"))
        .arg(format!("--max-port={}", relay_lo + 19))
        .args(["--log-file=stdout", "--pidfile=/dev/null"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    (Proc(coturn), port)
}

/// Draining a running server: with `--turn-alternate-servers-file`, a
/// SIGHUP after writing another server into the file sends new clients
/// there while the allocation made before keeps being served; an alternate
/// that does not answer gets nobody, and one that stops answering is taken
/// out of use; a file that says something wrong changes nothing (and the
/// log says which line); an empty one serves everyone here again.
#[test]
fn a_server_is_drained_on_sighup_without_a_restart() {
    let file = std::env::temp_dir().join(format!("callisto-alternates-{}", std::process::id()));
    std::fs::write(&file, "# nobody is sent away yet\n").unwrap();
    let server = callisto_on(
        "turn",
        "127.0.0.1:0",
        &[
            "--turn-user",
            "alice:secret",
            "--turn-alternate-servers-file",
            file.to_str().unwrap(),
            "--turn-alternate-check",
            "1",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    );
    let alternate = callisto_on("turn", "127.0.0.1:0", &["--turn-user", "alice:secret"]);
    let elsewhere: SocketAddr = format!("127.0.0.1:{}", alternate.turn_port)
        .parse()
        .unwrap();
    let silent: SocketAddr = format!("127.0.0.1:{}", free_udp_port()).parse().unwrap();
    let gauge = |name: &str| {
        counter(
            &server.metrics(),
            &format!("{name}{{transport=\"udp_tcp\"}}"),
        )
    };
    let alternates = || gauge("callisto_turn_alternate_servers");
    assert_eq!(alternates(), 0.0);
    let turn: SocketAddr = format!("127.0.0.1:{}", server.turn_port).parse().unwrap();
    let sock = udp_socket("127.0.0.1:0");
    let allocate = |seed: u64| {
        let sock = udp_socket("127.0.0.1:0");
        let mut client = Client::new("alice", "secret", false, seed);
        client.allocate(Instant::now());
        let events = drive(&sock, turn, &mut client, |e| {
            matches!(
                e,
                Event::Redirected { .. } | Event::Allocated { .. } | Event::Failed { .. }
            )
        });
        events.last().cloned()
    };
    let mut kept = Client::new("alice", "secret", false, 1);
    kept.allocate(Instant::now());
    drive(&sock, turn, &mut kept, |e| {
        matches!(e, Event::Allocated { .. })
    });

    let hang_up = |text: &str, logged: &str| {
        std::fs::write(&file, text).unwrap();
        server.hang_up(logged)
    };
    let line = hang_up(
        &format!("{silent}\n{elsewhere}\n"),
        "alternate TURN server answers",
    );
    assert!(line.contains(&elsewhere.to_string()), "{line}");
    assert_eq!(alternates(), 1.0);
    assert_eq!(gauge("callisto_turn_alternate_servers_unreachable"), 1.0);
    for seed in [2, 3] {
        assert_eq!(
            allocate(seed),
            Some(Event::Redirected {
                alternate: elsewhere
            }),
            "only the alternate that answers gets clients"
        );
    }
    kept.refresh(Instant::now(), 600);
    let events = drive(&sock, turn, &mut kept, |e| {
        matches!(e, Event::Refreshed { .. } | Event::Failed { .. })
    });
    assert!(
        matches!(events.last(), Some(Event::Refreshed { .. })),
        "{events:?}"
    );

    let error = hang_up(
        &format!("{elsewhere}\nnot an address\n"),
        "alternate TURN servers unchanged",
    );
    assert!(error.contains("line 2"), "{error}");
    assert_eq!(
        allocate(4),
        Some(Event::Redirected {
            alternate: elsewhere
        })
    );

    // The alternate goes away: after a few checks, clients are served here.
    let seen = server.logs.lock().unwrap().len();
    drop(alternate);
    let line = server.wait_for_log(seen, "alternate TURN server does not answer");
    assert!(line.contains(&elsewhere.to_string()), "{line}");
    assert_eq!(alternates(), 0.0);
    assert!(matches!(allocate(5), Some(Event::Allocated { .. })));

    hang_up("", "served here");
    server.wait_for_metric(
        "callisto_turn_alternate_servers_unreachable{transport=\"udp_tcp\"}",
        0.0,
    );
    assert!(matches!(allocate(6), Some(Event::Allocated { .. })));
    let _ = std::fs::remove_file(&file);
}

/// TLS alternates are checked as clients would use them: our own server's
/// TLS port (a handshake, then a Binding over it) is taken for up; a port
/// that accepts connections but speaks no TLS is not.
#[test]
fn tls_alternates_are_checked_with_a_handshake_and_a_binding() {
    let alternate = callisto(
        "turn",
        &[
            "--turn-user",
            "alice:secret",
            "--tls-self-signed",
            "--turn-tls-listen",
            "127.0.0.1:0",
        ],
    );
    let serving = format!("127.0.0.1:{}", alternate.tls_port.expect("TLS listener"));
    let mute = TcpListener::bind("127.0.0.1:0").unwrap();
    let mute_addr = mute.local_addr().unwrap().to_string();
    let server = callisto(
        "turn",
        &[
            "--turn-user",
            "alice:secret",
            "--turn-tls-alternate-server",
            &serving,
            "--turn-tls-alternate-server",
            &mute_addr,
            "--turn-alternate-check",
            "1",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    );
    let line = server.wait_for_log(0, "alternate TURN server answers");
    assert!(line.contains(&serving), "{line}");
    server.wait_for_metric("callisto_turn_alternate_servers{transport=\"tls\"}", 1.0);
    server.wait_for_metric(
        "callisto_turn_alternate_servers_unreachable{transport=\"tls\"}",
        1.0,
    );
    let line = server.wait_for_log(0, "does not answer");
    assert!(
        line.contains(&mute_addr) && line.contains("no answer within"),
        "the log says which alternate, and why: {line}"
    );
    let logs = server.logs.lock().unwrap();
    assert!(
        !logs
            .iter()
            .any(|l| l.contains("answers") && l.contains(&mute_addr)),
        "{logs:?}"
    );
}

/// Each authentication failure is logged with who failed, as whom and why
/// (what tells expired credentials from a wrong password, and what
/// fail2ban reads), the username escaped, and never a password.
#[test]
fn authentication_failures_are_logged_with_who_and_why() {
    use callisto_turn::auth::rest_credentials;
    let server = callisto(
        "turn",
        &[
            "--turn-user",
            "alice:secret",
            "--turn-secret",
            "the-shared-secret",
        ],
    );
    let turn: SocketAddr = format!("127.0.0.1:{}", server.turn_port).parse().unwrap();
    let fail = |username: &str, password: &str, seed: u64| {
        let sock = udp_socket("127.0.0.1:0");
        let mut client = Client::new(username, password, false, seed);
        client.allocate(Instant::now());
        let event = outcome(&sock, turn, &mut client, allocated_or_failed);
        assert!(
            matches!(event, Some(Event::Failed { code: 401, .. })),
            "{event:?}"
        );
        sock.local_addr().unwrap()
    };
    let logged = |seen: usize, client: SocketAddr, reason: &str| {
        let line = server.wait_for_log(seen, &format!("\"reason\":\"{reason}\""));
        assert!(line.contains("TURN authentication failed"), "{line}");
        assert!(line.contains(&client.to_string()), "{line}");
        assert!(line.contains("\"request\":\"Allocate\""), "{line}");
        line
    };

    let seen = server.logs.lock().unwrap().len();
    let client = fail("alice", "not-her-password", 1);
    let line = logged(seen, client, "bad-integrity");
    assert!(line.contains("\"username\":\"alice\""), "{line}");

    let (expired, password) = rest_credentials(b"the-shared-secret", "bob", 1_000);
    let client = fail(&expired, &password, 2);
    let line = logged(seen, client, "expired");
    assert!(
        line.contains(&format!("\"username\":\"{expired}\"")),
        "{line}"
    );

    let client = fail("mallory\n2026-11-27 INFO forged line", "x", 3);
    let line = logged(seen, client, "unknown-user");
    assert!(
        line.contains("mallory\\\\n2026"),
        "the newline is escaped: {line}"
    );

    let logs = server.logs.lock().unwrap().join("\n");
    for secret in ["not-her-password", "the-shared-secret", &password] {
        assert!(!logs.contains(secret), "{secret} is in the log");
    }
}

/// Redirection between coturn and us, both ways, with our client: coturn
/// sends it on after authenticating it (a signed 300), we at its first
/// Allocate (an unsigned one); either way it allocates at the other (whose
/// realm differs: a client learns it from each server's challenge).
#[test]
fn redirections_between_coturn_and_us() {
    let ours = callisto_on("turn", "127.0.0.1:0", &["--turn-user", "alice:secret"]);
    let ours_addr: SocketAddr = format!("127.0.0.1:{}", ours.turn_port).parse().unwrap();
    let (_coturn, port) = coturn_over_udp_with(
        &["127.0.0.1"],
        &[&format!("--alternate-server={ours_addr}")],
    );
    let coturn_addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // coturn's plain sibling, and ours sending everyone to it.
    let (_target, target_port) = coturn_over_udp(&["127.0.0.1"]);
    let target: SocketAddr = format!("127.0.0.1:{target_port}").parse().unwrap();
    let redirecting = callisto_on(
        "turn",
        "127.0.0.1:0",
        &[
            "--turn-user",
            "alice:secret",
            "--turn-alternate-server",
            &target.to_string(),
            "--turn-alternate-check",
            "1",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    );
    let redirecting_addr: SocketAddr = format!("127.0.0.1:{}", redirecting.turn_port)
        .parse()
        .unwrap();
    // Once the check has seen coturn answer.
    redirecting.wait_for_metric(
        "callisto_turn_alternate_servers{transport=\"udp_tcp\"}",
        1.0,
    );
    for (seed, first, then) in [(1, coturn_addr, ours_addr), (2, redirecting_addr, target)] {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        // coturn needs a moment to bind; our client retransmits until it answers.
        let mut client = Client::new("alice", "secret", false, seed);
        client.allocate(Instant::now());
        let events = drive(&sock, first, &mut client, |e| {
            matches!(
                e,
                Event::Redirected { .. } | Event::Allocated { .. } | Event::Failed { .. }
            )
        });
        assert_eq!(
            events.last(),
            Some(&Event::Redirected { alternate: then }),
            "from {first}"
        );
        let mut client = Client::new("alice", "secret", false, seed + 10);
        client.allocate(Instant::now());
        let events = drive(&sock, then, &mut client, |e| {
            matches!(e, Event::Allocated { .. } | Event::Failed { .. })
        });
        assert!(
            matches!(events.last(), Some(Event::Allocated { .. })),
            "at {then}: {events:?}"
        );
    }
    let m = redirecting.metrics();
    assert_eq!(
        counter(&m, "callisto_turn_redirected_total{transport=\"udp\"}"),
        1.0,
        "{m}"
    );
}

#[test]
fn our_client_against_coturn() {
    let (_coturn, port) = coturn_over_udp(&["127.0.0.1"]);
    let server: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let echo = UdpSocket::bind("127.0.0.1:0").unwrap();
    let echo_addr = echo.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = echo.recv_from(&mut buf) {
            let _ = echo.send_to(&buf[..n], from);
        }
    });
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();

    // coturn needs a moment to bind; our client retransmits until it answers.
    let mut client = Client::new("alice", "secret", false, 42);
    client.allocate(Instant::now());
    let events = drive(&sock, server, &mut client, |e| {
        matches!(e, Event::Allocated { .. } | Event::Failed { .. })
    });
    let Some(Event::Allocated {
        relayed, mapped, ..
    }) = events.last()
    else {
        panic!("{events:?}")
    };
    assert_eq!(relayed.ip().to_string(), "127.0.0.1");
    assert_eq!(*mapped, sock.local_addr().unwrap());

    client.create_permission(Instant::now(), echo_addr.ip());
    drive(&sock, server, &mut client, |e| {
        matches!(e, Event::PermissionCreated(_))
    });
    // Send indication out, Data indication back.
    sock.send_to(&client.send_to(echo_addr, b"via indication"), server)
        .unwrap();
    let events = drive(&sock, server, &mut client, |e| {
        matches!(e, Event::Data { .. })
    });
    assert_eq!(
        events.last(),
        Some(&Event::Data {
            peer: echo_addr,
            data: b"via indication".to_vec()
        })
    );

    let channel = client.bind_channel(Instant::now(), echo_addr);
    let events = drive(&sock, server, &mut client, |e| {
        matches!(e, Event::ChannelBound { .. })
    });
    assert_eq!(
        events.last(),
        Some(&Event::ChannelBound {
            peer: echo_addr,
            channel
        })
    );
    for i in 0..20u8 {
        let payload = vec![i; 100 + usize::from(i)];
        sock.send_to(&client.send_to(echo_addr, &payload), server)
            .unwrap();
        let events = drive(&sock, server, &mut client, |e| {
            matches!(e, Event::Data { .. })
        });
        assert_eq!(
            events.last(),
            Some(&Event::Data {
                peer: echo_addr,
                data: payload
            })
        );
    }
    client.refresh(Instant::now(), 0);
    let events = drive(&sock, server, &mut client, |e| {
        matches!(e, Event::Refreshed { .. })
    });
    assert_eq!(
        events.last(),
        Some(&Event::Refreshed {
            lifetime: Duration::ZERO
        })
    );
}

/// No secret reaches the logs, even at trace level: not a static user's
/// password, not the REST secret, not a wrong password a client tried, not
/// the credentials handed out in `welcome`.
#[test]
fn secrets_never_reach_the_logs() {
    let (password, secret, wrong) = ("S3cretPassw0rd", "T0pSecretRestKey", "Wr0ngPassw0rd");
    let mut server = callisto(
        "serve",
        &[
            "--turn-user",
            &format!("user:{password}"),
            "--turn-secret",
            secret,
            "--turn-allow-peer",
            "127.0.0.1/32",
            "--log",
            "trace",
        ],
    );
    let (_peer, peer_port) = echo_peer();
    assert_lossless(
        "right password",
        uclient(server.turn_port, peer_port, &[], "user", password),
    );
    let (_, received, _) = uclient(server.turn_port, peer_port, &[], "user", wrong);
    assert_eq!(received, 0);
    let welcome = welcome_from(&server);
    let handed_out: Vec<String> = welcome["iceServers"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["credential"].as_str().map(str::to_owned))
        .collect();
    assert!(!handed_out.is_empty(), "{welcome}");

    // Stop the server so every line is written, then read them all.
    let _ = server.proc.0.kill();
    let _ = server.proc.0.wait();
    std::thread::sleep(Duration::from_millis(200));
    let logs = server.logs.lock().unwrap().join("\n");
    assert!(
        logs.contains("\"TRACE\"") && logs.contains("authentication failed"),
        "trace logs were written, failures included:\n{logs}"
    );
    for needle in [password, secret, wrong]
        .into_iter()
        .chain(handed_out.iter().map(String::as_str))
    {
        assert!(!logs.contains(needle), "{needle} is in the logs");
    }
}

/// A TCP connection from `source` (a loopback address) to the server.
/// On loopback, a server that resets it at once can do so before
/// `connect` returns, which then fails.
fn try_connect_from(source: &str, port: u16) -> std::io::Result<TcpStream> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    s.bind(&SocketAddr::new(source.parse().unwrap(), 0).into())?;
    s.connect(&SocketAddr::from(([127, 0, 0, 1], port)).into())?;
    Ok(s.into())
}

fn connect_from(source: &str, port: u16) -> TcpStream {
    try_connect_from(source, port).unwrap()
}

/// Whether the server answers a STUN Binding request on `tcp`, rather
/// than having reset or closed the connection.
fn answered(tcp: &mut TcpStream) -> bool {
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    binding_answered(tcp)
}

/// Sends a STUN Binding request on `stream`; whether a Binding success
/// for it comes back.
fn binding_answered(mut stream: impl Read + Write) -> bool {
    use callisto_turn::stun::{Class, Message, MessageBuilder, method};
    let tid = [0x5a; 12];
    let request = MessageBuilder::new(method::BINDING, Class::Request, &tid).finish();
    let mut answer = vec![0u8; 20];
    if stream.write_all(&request).is_err() || stream.read_exact(&mut answer).is_err() {
        return false;
    }
    let len = usize::from(u16::from_be_bytes([answer[2], answer[3]]));
    answer.resize(20 + len, 0);
    stream.read_exact(&mut answer[20..]).is_ok()
        && Message::parse(&answer).is_ok_and(|m| {
            m.method() == method::BINDING
                && m.class() == Class::Success
                && *m.transaction_id() == tid
        })
}

/// The stream connections the server holds, TCP and TLS.
fn stream_connections(metrics: &str) -> f64 {
    ["tcp", "tls"]
        .iter()
        .map(|t| {
            counter(
                metrics,
                &format!("callisto_turn_stream_connections{{transport=\"{t}\"}}"),
            )
        })
        .sum()
}

/// With 256 descriptors, the server keeps 64 TCP connections (a quarter)
/// and resets the rest, so that a host opening connections in a loop
/// cannot take the descriptors UDP clients' relay sockets need: before
/// the limit, 300 idle connections got every later allocation a 508.
/// Once the flood is gone, TCP clients are served again.
#[test]
fn a_flood_of_tcp_connections_leaves_the_others_served() {
    let server = callisto_with_open_files(
        "turn",
        "127.0.0.1:0",
        &[
            "--turn-user",
            "user:pass",
            "--turn-allow-peer",
            "127.0.0.0/8",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
        Some(256),
    );
    let (_peer, peer_port) = echo_peer();
    // From five addresses, so that the total holds them back, not the
    // limit per address (256).
    let flood: Vec<TcpStream> = (0..300)
        .filter_map(|i| try_connect_from(&format!("127.0.0.{}", 2 + i % 5), server.turn_port).ok())
        .collect();
    assert!(flood.len() >= 64);
    let refused = "callisto_turn_stream_refused_total{reason=\"total\"}";
    let m = metrics_once(&server, |m| counter(m, refused) >= 236.0);
    assert_eq!(counter(&m, refused), 236.0, "{m}");
    assert_eq!(stream_connections(&m), 64.0, "{m}");

    assert_lossless(
        "udp, during the flood",
        uclient(server.turn_port, peer_port, &[], "user", "pass"),
    );
    let logs = server.logs.lock().unwrap().join("\n");
    assert!(
        logs.contains(
            "open-file limit leaves room for fewer connections than --turn-max-connections"
        ) && logs.contains("turned TURN TCP/TLS connections away")
            && logs.contains("\"total_limit\":64"),
        "{logs}"
    );

    drop(flood);
    let m = metrics_once(&server, |m| stream_connections(m) == 0.0);
    assert_eq!(stream_connections(&m), 0.0, "{m}");
    assert_lossless(
        "tcp, after the flood",
        uclient(server.turn_port, peer_port, &["-t"], "user", "pass"),
    );
}

/// One address gets `--turn-max-connections-per-ip` connections and no
/// more; another address is still served, and a place given back is
/// taken again.
#[test]
fn one_address_gets_its_share_of_connections() {
    let server = callisto(
        "turn",
        &[
            "--turn-user",
            "user:pass",
            "--turn-max-connections-per-ip",
            "8",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    );
    let mut held: Vec<TcpStream> = (0..8)
        .map(|_| connect_from("127.0.0.2", server.turn_port))
        .collect();
    for tcp in &mut held {
        assert!(answered(tcp), "one of the first 8 was refused");
    }
    if let Ok(mut ninth) = try_connect_from("127.0.0.2", server.turn_port) {
        assert!(!answered(&mut ninth), "the 9th was served");
    }
    let mut other = connect_from("127.0.0.3", server.turn_port);
    assert!(answered(&mut other), "another address was refused");

    drop(held.pop());
    let m = metrics_once(&server, |m| stream_connections(m) == 8.0);
    assert_eq!(stream_connections(&m), 8.0, "{m}");
    assert_eq!(
        counter(
            &m,
            "callisto_turn_stream_refused_total{reason=\"per_source\"}"
        ),
        1.0,
        "{m}"
    );
    let mut again = connect_from("127.0.0.2", server.turn_port);
    assert!(answered(&mut again), "the place given back was not taken");
}

/// With TLS and no `--turn-tls-listen`, TURN over TLS shares the HTTPS
/// port: coturn's client relays through it losslessly, with channels and
/// with Send indications, while the same port serves HTTPS (the metrics
/// below are read through it).
#[test]
fn uclient_over_tls_on_the_https_port() {
    let server = callisto(
        "serve",
        &[
            "--turn-user",
            "user:pass",
            "--turn-allow-peer",
            "127.0.0.1/32",
            "--tls-self-signed",
            "--request-header-timeout",
            "2",
        ],
    );
    assert!(server.https && server.tls_port.is_none());
    let https = server.http.expect("an HTTPS listener").port();
    let (_peer, peer_port) = echo_peer();
    for (label, flags) in [
        ("tls channels", vec!["-t", "-S"]),
        ("tls send indications", vec!["-t", "-S", "-s"]),
    ] {
        assert_lossless(label, uclient(https, peer_port, &flags, "user", "pass"));
    }
    let m = server.metrics();
    assert_relayed_packets(&m, &["tls"], 4000.0);
    // A client offering ALPN "stun.turn" alone (RFC 7443) is served too.
    assert!(tls_binding_answered(https, &[b"stun.turn"]));
    assert!(tls_binding_answered(https, &[]));
    // A connection that says nothing after its handshake, neither HTTP
    // nor TURN, is closed once a request head would have had to be in.
    let started = Instant::now();
    assert!(silent_after_handshake_closed(https, Duration::from_secs(8)));
    assert!(started.elapsed() >= Duration::from_millis(1500));
}

/// Whether the server at 127.0.0.1:`port` closes a TLS connection that,
/// once its handshake is done, sends nothing, within `within`.
fn silent_after_handshake_closed(port: u16, within: Duration) -> bool {
    let mut conn = rustls::ClientConnection::new(
        trusting_any_certificate(&[]),
        "localhost".try_into().unwrap(),
    )
    .unwrap();
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(within)).unwrap();
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).unwrap();
    }
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let mut byte = [0u8; 1];
    match tls.read(&mut byte) {
        Ok(0) => true,
        Err(e) => !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        Ok(_) => false,
    }
}

/// Whether a STUN Binding request over TLS to 127.0.0.1:`port`, with
/// `alpn` offered, is answered.
fn tls_binding_answered(port: u16, alpn: &[&[u8]]) -> bool {
    let conn = rustls::ClientConnection::new(
        trusting_any_certificate(alpn),
        "localhost".try_into().unwrap(),
    )
    .unwrap();
    let tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    binding_answered(rustls::StreamOwned::new(conn, tcp))
}

/// Moves this test's thread into a network namespace of its own with only
/// loopback, up: the kernel relay attaches to that loopback, never to the
/// machine's, and whatever the test starts inherits the namespace. Needs
/// root; without it the test is skipped, unless `CALLISTO_REQUIRE_ROOT_TESTS`
/// is set (scripts/test.sh sets it).
fn own_network_namespace() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        assert!(
            std::env::var_os("CALLISTO_REQUIRE_ROOT_TESTS").is_none(),
            "this test needs root (a network namespace, XDP)"
        );
        eprintln!("skipped: needs root (a network namespace, XDP)");
        return false;
    }
    // SAFETY: unshare affects only the calling thread, this test's own.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "unshare: {}", std::io::Error::last_os_error());
    let up = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .expect("ip (iproute2)");
    assert!(up.success());
    true
}

/// Reads the metrics until `done` holds for them (the kernel relay's
/// counts reach them once a second), or 5 s have passed.
fn metrics_once(server: &Callisto, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let m = server.metrics();
        if done(&m) || Instant::now() > deadline {
            return m;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// coturn's client through the kernel relay (XDP on loopback, in a network
/// namespace of the test's own): to an echo peer and client to client,
/// over two workers, no loss, and every relayed packet relayed by the
/// kernel, none by the workers.
#[test]
fn uclient_through_the_kernel_relay() {
    if !own_network_namespace() {
        return;
    }
    let server = two_worker_turn(&["--turn-kernel-relay", "lo"]);
    let (_peer, peer_port) = echo_peer();
    assert_lossless(
        "to a peer, through the kernel",
        uclient(server.turn_port, peer_port, &[], "user", "pass"),
    );
    assert_lossless(
        "client to client, through the kernel",
        uclient(server.turn_port, free_udp_port(), &["-y"], "user", "pass"),
    );
    // Send indications to a peer on our own relay IP, 127.0.0.1, go
    // through the sockets (only the server knows which of its ports are
    // live relays); the peer's answers, with no channel, come back as Data
    // indications the kernel builds.
    assert_lossless(
        "to a peer with Send indications, Data indications from the kernel",
        uclient(server.turn_port, peer_port, &["-s"], "user", "pass"),
    );
    // Client to client with Send indications: through the kernel, their
    // partial checksums unchecked (on loopback nobody checks them).
    assert_lossless(
        "client to client with Send indications, through the kernel",
        uclient(
            server.turn_port,
            free_udp_port(),
            &["-y", "-s"],
            "user",
            "pass",
        ),
    );
    let m = metrics_once(&server, |m| {
        in_kernel(m, "to_peer") >= 6000.0 && in_kernel(m, "to_client") >= 8000.0
    });
    for (dir, in_sockets) in [("to_peer", 2000.0), ("to_client", 0.0)] {
        let all = metric(
            &m,
            &format!(
                "callisto_turn_relayed_packets_total{{direction=\"{dir}\",transport=\"udp\"}}"
            ),
        );
        assert_eq!(all, 8000.0, "{dir}: {m}");
        assert_eq!(
            all - in_kernel(&m, dir),
            in_sockets,
            "{dir}: all but the Send indications in the kernel\n{m}"
        );
    }
    assert_eq!(
        metric(&m, "callisto_turn_relayed_in_place_packets_total"),
        0.0
    );
    // uclient deleted its allocations: their routes are gone.
    assert_eq!(metric(&m, "callisto_turn_kernel_routes"), 0.0, "{m}");

    // The program goes with the process, however it ends.
    drop(server);
    let link = Command::new("ip")
        .args(["link", "show", "lo"])
        .output()
        .unwrap();
    let link = String::from_utf8_lossy(&link.stdout);
    assert!(
        !link.contains("xdp"),
        "still attached after the server was killed:\n{link}"
    );
}

/// `callisto turn` on `listen` (IPv6), relaying on it through the kernel
/// relay attached to `interface`, with two workers, user `user:pass`,
/// peers in `allowed` allowed.
fn ipv6_kernel_turn(listen: &str, allowed: &str, interface: &str) -> Callisto {
    callisto_on(
        "turn",
        listen,
        &[
            "--turn-user",
            "user:pass",
            "--turn-allow-peer",
            allowed,
            "--turn-threads",
            "2",
            "--metrics-listen",
            "127.0.0.1:0",
            "--turn-kernel-relay",
            interface,
        ],
    )
}

/// Our client over IPv6, through `turn`: two clients (on sockets `a` and
/// `b`, whose read timeouts are set) each allocate an IPv6 relay and bind
/// a channel to the other's relayed address (relay/relay, as browsers),
/// and the first one to the echo peer `echo` too; then `rounds` datagrams
/// go from `a` to `b`, back, and to the echo peer and back, of every
/// length mod 4, and each arrives.
fn our_ipv6_clients(
    turn: SocketAddr,
    (sa, sb): (&UdpSocket, &UdpSocket),
    echo: SocketAddr,
    rounds: u32,
) {
    let (mut a, mut b) = (
        Client::new("user", "pass", false, 1),
        Client::new("user", "pass", false, 2),
    );
    let mut relayed = Vec::new();
    for (sock, client) in [(sa, &mut a), (sb, &mut b)] {
        client.allocate_ipv6(Instant::now());
        let events = drive(sock, turn, client, |e| {
            matches!(e, Event::Allocated { .. } | Event::Failed { .. })
        });
        let Some(Event::Allocated { relayed: r, .. }) = events.last() else {
            panic!("{events:?}")
        };
        assert!(r.is_ipv6(), "{r}");
        relayed.push(*r);
    }
    let bind = |sock: &UdpSocket, client: &mut Client, peer: SocketAddr| {
        client.bind_channel(Instant::now(), peer);
        drive(sock, turn, client, |e| {
            matches!(e, Event::ChannelBound { .. })
        });
    };
    bind(sa, &mut a, relayed[1]);
    bind(sa, &mut a, echo);
    bind(sb, &mut b, relayed[0]);
    let arrives = |sock: &UdpSocket, client: &mut Client, from: SocketAddr, data: &[u8]| {
        let events = drive(sock, turn, client, |e| matches!(e, Event::Data { .. }));
        assert_eq!(
            events.last(),
            Some(&Event::Data {
                peer: from,
                data: data.to_vec()
            })
        );
    };
    for i in 0..rounds {
        let data = vec![i as u8; 100 + (i % 4) as usize];
        sa.send_to(&a.send_to(relayed[1], &data), turn).unwrap();
        arrives(sb, &mut b, relayed[0], &data);
        sb.send_to(&b.send_to(relayed[0], &data), turn).unwrap();
        arrives(sa, &mut a, relayed[1], &data);
        sa.send_to(&a.send_to(echo, &data), turn).unwrap();
        arrives(sa, &mut a, echo, &data);
    }
}

fn udp_socket(addr: &str) -> UdpSocket {
    let s = UdpSocket::bind(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    s
}

/// The packets the kernel relay relayed toward `dir` (0 until it reports
/// some).
fn in_kernel(m: &str, dir: &str) -> f64 {
    counter(
        m,
        &format!("callisto_turn_relayed_in_kernel_packets_total{{direction=\"{dir}\"}}"),
    )
}

/// The packets relayed toward `dir` over UDP, by the kernel or the workers.
fn relayed_udp(m: &str, dir: &str) -> f64 {
    metric(
        m,
        &format!("callisto_turn_relayed_packets_total{{direction=\"{dir}\",transport=\"udp\"}}"),
    )
}

/// IPv6 through the kernel relay on loopback (RFC 6156: an IPv6 listener
/// relays on IPv6), in a network namespace of the test's own: coturn's
/// client to an echo peer on ::1, with channels and with Send indications,
/// and our clients relay/relay and to the echo peer; no loss. On loopback
/// every checksum is partial, and toward a peer the sockets take those
/// (see relay6 in relay.bpf.c): the datagrams toward the peer, ChannelData
/// and Send indications; the rest is the kernel's.
#[test]
fn ipv6_through_the_kernel_relay_on_loopback() {
    if !own_network_namespace() {
        return;
    }
    let server = ipv6_kernel_turn("[::1]:0", "::1/128", "lo");
    let (_peer, peer_port) = echo_peer_on("::1");
    let v6 = |flags: &[&str]| uclient_on("::1", server.turn_port, peer_port, flags, "user", "pass");
    assert_lossless("IPv6, to a peer, with channels", v6(&[]));
    assert_lossless("IPv6, to a peer, with Send indications", v6(&["-s"]));
    let turn: SocketAddr = format!("[::1]:{}", server.turn_port).parse().unwrap();
    let echo: SocketAddr = format!("[::1]:{peer_port}").parse().unwrap();
    our_ipv6_clients(
        turn,
        (&udp_socket("[::1]:0"), &udp_socket("[::1]:0")),
        echo,
        100,
    );
    // uclient: 2000 each way, twice; ours: 100 each way relay/relay, both
    // ways, and 100 each way to the echo peer.
    let m = metrics_once(&server, |m| {
        in_kernel(m, "to_peer") >= 200.0 && in_kernel(m, "to_client") >= 4300.0
    });
    for (dir, kernel) in [("to_peer", 200.0), ("to_client", 4300.0)] {
        assert_eq!(relayed_udp(&m, dir), 4300.0, "{dir}\n{m}");
        assert_eq!(in_kernel(&m, dir), kernel, "{dir}\n{m}");
    }
    assert_eq!(
        metric(&m, "callisto_turn_relayed_in_place_packets_total"),
        0.0,
        "{m}"
    );
    // uclient deleted its allocations; ours are still there: 3 channels,
    // and a permission each (::1, whether echo peer or relayed address).
    assert_eq!(metric(&m, "callisto_turn_kernel_routes"), 5.0, "{m}");
}

/// RFC 8656 §11.5: our client on `sock` allocates on `turn` (in the
/// family of `closed`) and sends over a channel to `closed`, a port
/// nobody listens on; the ICMP port unreachable that comes back reaches
/// it as a Data indication with an ICMP attribute naming `closed`.
fn icmp_comes_back(sock: &UdpSocket, turn: SocketAddr, closed: SocketAddr) {
    let mut client = Client::new("user", "pass", false, 1);
    if closed.is_ipv6() {
        client.allocate_ipv6(Instant::now());
    } else {
        client.allocate(Instant::now());
    }
    drive(sock, turn, &mut client, |e| {
        matches!(e, Event::Allocated { .. })
    });
    client.bind_channel(Instant::now(), closed);
    drive(sock, turn, &mut client, |e| {
        matches!(e, Event::ChannelBound { .. })
    });
    sock.send_to(&client.send_to(closed, b"anyone there?"), turn)
        .unwrap();
    let events = drive(sock, turn, &mut client, |e| matches!(e, Event::Icmp { .. }));
    // Port unreachable: ICMPv4 3/3, ICMPv6 1/4.
    let (icmp_type, code) = if closed.is_ipv6() { (1, 4) } else { (3, 3) };
    assert_eq!(
        events.last(),
        Some(&Event::Icmp {
            peer: closed,
            icmp: callisto_turn::stun::Icmp {
                icmp_type,
                code,
                error_data: 0
            }
        })
    );
}

/// ICMP errors reach our client over IPv4 and IPv6 on loopback, and are
/// counted.
#[test]
fn icmp_errors_reach_our_client() {
    for (listen, allowed) in [("127.0.0.1", "127.0.0.1/32"), ("::1", "::1/128")] {
        let ip: std::net::IpAddr = listen.parse().unwrap();
        let server = callisto_on(
            "turn",
            &SocketAddr::new(ip, 0).to_string(),
            &[
                "--turn-user",
                "user:pass",
                "--turn-allow-peer",
                allowed,
                "--metrics-listen",
                "127.0.0.1:0",
            ],
        );
        let closed = SocketAddr::new(ip, free_udp_port_on(ip));
        let sock = udp_socket(&SocketAddr::new(ip, 0).to_string());
        icmp_comes_back(&sock, SocketAddr::new(ip, server.turn_port), closed);
        let m = server.metrics();
        assert_eq!(counter(&m, "callisto_turn_icmp_relayed_total"), 1.0, "{m}");
    }
}

/// The same through the kernel relay on a network interface (a veth pair
/// into a namespace of the test's own, with full checksums), over both
/// families: the datagram toward the peer is relayed by the kernel and
/// never reaches the server, yet the kernel files the ICMP error that
/// answers it with the relay socket, whose worker tells the client. (On
/// loopback no error comes back: the kernel checks the partial checksum
/// of a datagram for a closed port in full, and drops it.)
#[test]
fn icmp_errors_through_the_kernel_relay_on_a_network_interface() {
    if !own_network_namespace() {
        return;
    }
    let hosts = veth_to(
        "icmp",
        &["10.77.0.1/24", "fd00:78::1/64"],
        &["10.77.0.2/24", "fd00:78::2/64"],
    );
    checksums_in_full(None, "relay0");
    checksums_in_full(Some(&hosts), "hosts0");
    for (server_ip, allowed, host_ip) in [
        ("10.77.0.1", "10.77.0.0/24", "10.77.0.2"),
        ("fd00:78::1", "fd00:78::/64", "fd00:78::2"),
    ] {
        let server_ip: std::net::IpAddr = server_ip.parse().unwrap();
        let host_ip: std::net::IpAddr = host_ip.parse().unwrap();
        let server = ipv6_kernel_turn(&SocketAddr::new(server_ip, 0).to_string(), allowed, "auto");
        let sock = udp_socket_in(&hosts, &SocketAddr::new(host_ip, 0).to_string());
        let turn = SocketAddr::new(server_ip, server.turn_port);
        icmp_comes_back(&sock, turn, SocketAddr::new(host_ip, 3999));
        let m = metrics_once(&server, |m| in_kernel(m, "to_peer") >= 1.0);
        assert_eq!(counter(&m, "callisto_turn_icmp_relayed_total"), 1.0, "{m}");
        assert_eq!(
            in_kernel(&m, "to_peer"),
            1.0,
            "{server_ip}: by the kernel\n{m}"
        );
        assert_eq!(
            relayed_udp(&m, "to_peer"),
            1.0,
            "{server_ip}: only that\n{m}"
        );
    }
}

/// DONT-FRAGMENT on a real path, over both families: the server's end of
/// a veth pair has an MTU of 1280, and a client in the server's namespace
/// sends 1,300 bytes to a peer beyond it. Without DF they reach the peer
/// (fragmented by the relay's kernel, IPv4 and IPv6 alike); with DF, asked
/// for in the Allocate, they are not sent, and the client is told
/// "fragmentation needed" (ICMPv4 3/4) or "packet too big" (ICMPv6 2)
/// with the MTU, 1280.
#[test]
fn dont_fragment_keeps_datagrams_whole_and_tells_the_client_the_mtu() {
    if !own_network_namespace() {
        return;
    }
    let hosts = veth_to(
        "df",
        &["10.77.0.1/24", "fd00:78::1/64"],
        &["10.77.0.2/24", "fd00:78::2/64"],
    );
    ip(&["link", "set", "relay0", "mtu", "1280"]);
    let big = [7u8; 1300];
    for (server_ip, allowed, peer_ip) in [
        ("10.77.0.1", "10.77.0.0/24", "10.77.0.2"),
        ("fd00:78::1", "fd00:78::/64", "fd00:78::2"),
    ] {
        let server_ip: std::net::IpAddr = server_ip.parse().unwrap();
        let server = callisto_on(
            "turn",
            &SocketAddr::new(server_ip, 0).to_string(),
            &["--turn-user", "user:pass", "--turn-allow-peer", allowed],
        );
        let turn = SocketAddr::new(server_ip, server.turn_port);
        let peer_ip: std::net::IpAddr = peer_ip.parse().unwrap();
        let peer_sock = udp_socket_in(&hosts, &SocketAddr::new(peer_ip, 0).to_string());
        // The first datagram to a new neighbour may wait for its
        // link-layer address.
        peer_sock
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let peer = peer_sock.local_addr().unwrap();
        for (seed, dont_fragment) in [(1, false), (2, true)] {
            let sock = udp_socket(&SocketAddr::new(server_ip, 0).to_string());
            let mut client = Client::new("user", "pass", false, seed);
            client.set_dont_fragment(dont_fragment);
            if server_ip.is_ipv6() {
                client.allocate_ipv6(Instant::now());
            } else {
                client.allocate(Instant::now());
            }
            drive(&sock, turn, &mut client, |e| {
                matches!(e, Event::Allocated { .. })
            });
            client.bind_channel(Instant::now(), peer);
            drive(&sock, turn, &mut client, |e| {
                matches!(e, Event::ChannelBound { .. })
            });
            sock.send_to(&client.send_to(peer, &big), turn).unwrap();
            let mut buf = [0u8; 2048];
            if dont_fragment {
                let events = drive(&sock, turn, &mut client, |e| {
                    matches!(e, Event::Icmp { .. })
                });
                let (icmp_type, code) = if server_ip.is_ipv6() { (2, 0) } else { (3, 4) };
                assert_eq!(
                    events.last(),
                    Some(&Event::Icmp {
                        // Linux names the port for IPv6 only (an
                        // unconnected IPv4 socket has no port of its own
                        // to put in a local error).
                        peer: SocketAddr::new(
                            peer.ip(),
                            if server_ip.is_ipv6() { peer.port() } else { 0 }
                        ),
                        icmp: callisto_turn::stun::Icmp {
                            icmp_type,
                            code,
                            error_data: 1280
                        }
                    }),
                    "{server_ip}"
                );
                // The error came back when the kernel refused to send.
                peer_sock
                    .set_read_timeout(Some(Duration::from_millis(300)))
                    .unwrap();
                assert!(
                    peer_sock.recv_from(&mut buf).is_err(),
                    "{server_ip}: nothing reached the peer"
                );
            } else {
                let (n, _) = peer_sock.recv_from(&mut buf).expect("the datagram, whole");
                assert_eq!(n, big.len(), "{server_ip}");
            }
        }
    }
}

/// A UDP socket bound to `addr` in the named network namespace `netns`.
fn udp_socket_in(netns: &NamedNetns, addr: &str) -> UdpSocket {
    let path = format!("/var/run/netns/{}", netns.0);
    let addr = addr.to_owned();
    std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        let ns = std::fs::File::open(&path).unwrap();
        // SAFETY: setns moves only this short-lived thread.
        let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        udp_socket(&addr)
    })
    .join()
    .unwrap()
}

/// IPv6 through the kernel relay on a network interface: as
/// `uclient_through_the_kernel_relay_on_a_network_interface`, over a veth
/// pair with IPv6 addresses (fd00:77::1 here; the clients' fd00:77::2 and
/// the peer's fd00:77::3 beyond), full checksums, `--turn-kernel-relay
/// auto`. coturn's client to the echo peer, with channels and with Send
/// indications, and our clients relay/relay and to the echo peer: all
/// through the kernel, but for the first datagram to each host (its
/// link-layer address is learned from its answer).
#[test]
fn ipv6_through_the_kernel_relay_on_a_network_interface() {
    if !own_network_namespace() {
        return;
    }
    let hosts = veth_to(
        "hosts6",
        &["fd00:77::1/64"],
        &["fd00:77::2/64", "fd00:77::3/64"],
    );
    checksums_in_full(None, "relay0");
    checksums_in_full(Some(&hosts), "hosts0");
    let server = ipv6_kernel_turn("[fd00:77::1]:0", "fd00:77::/64", "auto");
    let _peer = echo_peer_at(Some(&hosts.0), "fd00:77::3", 3480);
    for (how, flags) in [("channels", &[][..]), ("Send indications", &["-s"])] {
        assert_lossless(
            &format!("IPv6 on a veth, to a peer, with {how}"),
            uclient_in(
                Some(&hosts.0),
                "fd00:77::1",
                "fd00:77::3",
                server.turn_port,
                3480,
                flags,
                ("user", "pass"),
            ),
        );
    }
    let turn: SocketAddr = format!("[fd00:77::1]:{}", server.turn_port)
        .parse()
        .unwrap();
    let echo: SocketAddr = "[fd00:77::3]:3480".parse().unwrap();
    let (sa, sb) = (
        udp_socket_in(&hosts, "[fd00:77::2]:0"),
        udp_socket_in(&hosts, "[fd00:77::2]:0"),
    );
    our_ipv6_clients(turn, (&sa, &sb), echo, 100);
    // 4300 each way, Send indications included.
    let m = metrics_once(&server, |m| {
        in_kernel(m, "to_peer") >= 4300.0 - 10.0 && in_kernel(m, "to_client") >= 4300.0 - 10.0
    });
    for dir in ["to_peer", "to_client"] {
        assert_eq!(relayed_udp(&m, dir), 4300.0, "{dir}\n{m}");
        assert!(in_kernel(&m, dir) >= 4300.0 - 10.0, "{dir}\n{m}");
    }
    assert!(
        metric(&m, "callisto_turn_relayed_in_place_packets_total") <= 10.0,
        "{m}"
    );
}

/// A bandwidth limit with the kernel relay: the kernel relays, and keeps
/// to the limit together with the workers (the budgets are shared), each
/// allocation each way: coturn's client sends 20 kB/s per allocation
/// against a limit of 5 kB/s.
#[test]
fn the_kernel_relay_keeps_to_the_bandwidth_limit() {
    if !own_network_namespace() {
        return;
    }
    const LIMIT: f64 = 5000.0;
    let server = two_worker_turn(&[
        "--turn-kernel-relay",
        "lo",
        "--turn-bps-per-allocation",
        "5000",
    ]);
    let (_peer, peer_port) = echo_peer();
    let started = Instant::now();
    let (sent, received, text) = uclient(server.turn_port, peer_port, &[], "user", "pass");
    // Every allocation existed at most this long (uclient's 10).
    let seconds = started.elapsed().as_secs_f64();
    assert_eq!(sent, 2000, "{text}");
    assert!(
        received > 0 && received < sent,
        "{received} of {sent}\n{text}"
    );
    let m = metrics_once(&server, |m| {
        counter(
            m,
            "callisto_turn_over_budget_packets_total{direction=\"to_peer\"}",
        ) > 0.0
    });
    for dir in ["to_peer", "to_client"] {
        let bytes = metric(
            &m,
            &format!("callisto_turn_relayed_bytes_total{{direction=\"{dir}\",transport=\"udp\"}}"),
        );
        // A second's bytes to start with, and the rate after that.
        let allowed = 10.0 * LIMIT * (1.0 + seconds);
        assert!(
            bytes > 0.0 && bytes <= allowed,
            "{dir}: {bytes} bytes in {seconds:.2} s, at most {allowed}\n{m}"
        );
    }
    let in_kernel = metric(
        &m,
        "callisto_turn_relayed_in_kernel_packets_total{direction=\"to_peer\"}",
    );
    assert!(in_kernel > 0.0, "the kernel relays under a limit too\n{m}");
    assert!(
        counter(
            &m,
            "callisto_turn_over_budget_packets_total{direction=\"to_peer\"}"
        ) > 0.0,
        "{m}"
    );
}

/// `--turn-kernel-relay-optional`: where the kernel relay cannot run (here:
/// an interface that does not exist, which without the flag stops the
/// server, below), the server says why and relays everything itself.
#[test]
fn an_optional_kernel_relay_that_cannot_run_leaves_the_relaying_to_the_server() {
    let server = two_worker_turn(&[
        "--turn-kernel-relay",
        "no-such-interface0",
        "--turn-kernel-relay-optional",
    ]);
    let (_peer, peer_port) = echo_peer();
    assert_lossless(
        "to a peer, without the kernel",
        uclient(server.turn_port, peer_port, &[], "user", "pass"),
    );
    let m = metrics_once(&server, |m| {
        m.contains("callisto_turn_relayed_packets_total")
    });
    assert_relayed_packets(&m, &["udp"], 2000.0);
    assert_eq!(
        counter(
            &m,
            "callisto_turn_relayed_in_kernel_packets_total{direction=\"to_peer\"}"
        ),
        0.0,
        "{m}"
    );
    let logs = server.logs.lock().unwrap().join("\n");
    assert!(
        logs.contains("the kernel relay cannot run here") && logs.contains("no-such-interface0"),
        "{logs}"
    );
}

/// The kernel relay is asked for on a machine where it cannot work, or
/// with options it cannot honour: `callisto turn` says what to fix.
#[test]
fn the_kernel_relay_refuses_what_it_cannot_do() {
    let cases: [(&[&str], &str); 3] = [
        (
            &[
                "--turn-listen",
                "[::1]:0",
                "--turn-relay-ip",
                "127.0.0.1",
                "--turn-kernel-relay",
                "lo",
            ],
            "a --turn-relay-ip of its family",
        ),
        (
            &[
                "--turn-listen",
                "127.0.0.1:0",
                "--turn-kernel-relay",
                "no-such-interface0",
            ],
            "no-such-interface0",
        ),
        (
            // TEST-NET-1: held by no interface.
            &[
                "--turn-listen",
                "192.0.2.77:0",
                "--turn-kernel-relay",
                "auto",
            ],
            "no network interface holds 192.0.2.77",
        ),
    ];
    for (args, expected) in cases {
        let out = Command::new(BIN)
            .arg("turn")
            .args(["--turn-user", "u:p"])
            .args(args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        assert!(
            err.contains(expected) || (!root && err.contains("needs root")),
            "{args:?}: {err}"
        );
    }
}

/// A network namespace of the test's own, removed when dropped.
struct NamedNetns(String);

impl Drop for NamedNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn ip(args: &[&str]) {
    let status = Command::new("ip")
        .args(args)
        .status()
        .expect("ip (iproute2)");
    assert!(status.success(), "ip {args:?}");
}

/// `ip -n netns ...`, once per command in `commands`.
fn ip_in(netns: &NamedNetns, commands: &[&[&str]]) {
    for args in commands {
        let mut all = vec!["-n", netns.0.as_str()];
        all.extend_from_slice(args);
        ip(&all);
    }
}

/// A network namespace of the test's own, named after the test process
/// and numbered: tests run at once in one process, and two of them may ask
/// for the same `suffix`.
fn named_netns(suffix: &str) -> NamedNetns {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let netns = NamedNetns(format!("callisto-test-{}-{n}-{suffix}", std::process::id()));
    ip(&["netns", "add", &netns.0]);
    ip_in(&netns, &[&["link", "set", "lo", "up"]]);
    netns
}

/// Turns off `device`'s transmit checksum offload, so that the datagrams it
/// sends carry full UDP checksums, or get them in software when forwarded.
/// Without it, senders on this host leave only the pseudo-header's sum in
/// them (CHECKSUM_PARTIAL), and receivers here trust them unchecked.
fn checksums_in_full(netns: Option<&NamedNetns>, device: &str) {
    let mut cmd = match netns {
        Some(netns) => {
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", &netns.0, "ethtool"]);
            cmd
        }
        None => Command::new("ethtool"),
    };
    let status = cmd
        .args(["-K", device, "tx", "off"])
        .stdout(Stdio::null())
        .status();
    assert!(
        status.is_ok_and(|s| s.success()),
        "ethtool -K {device} tx off (apt-get install ethtool)"
    );
}

/// A veth pair from this namespace (relay0, 10.77.0.1/24) to a new one
/// (hosts0, 10.77.0.2/24), both up.
fn veth_to_hosts() -> NamedNetns {
    veth_to("hosts", &["10.77.0.1/24"], &["10.77.0.2/24"])
}

/// A veth pair from the test's namespace (`relay0`, with `ours`) into a
/// new namespace named after `suffix` (`hosts0`, with `theirs`), both
/// ends up.
fn veth_to(suffix: &str, ours: &[&str], theirs: &[&str]) -> NamedNetns {
    let hosts = named_netns(suffix);
    ip(&[
        "link", "add", "relay0", "type", "veth", "peer", "name", "hosts0", "netns", &hosts.0,
    ]);
    for addr in ours {
        ip(&add_address(addr, "relay0"));
    }
    ip(&["link", "set", "relay0", "up"]);
    let mut commands: Vec<Vec<&str>> = theirs.iter().map(|a| add_address(a, "hosts0")).collect();
    commands.push(vec!["link", "set", "hosts0", "up"]);
    let commands: Vec<&[&str]> = commands.iter().map(Vec::as_slice).collect();
    ip_in(&hosts, &commands);
    hosts
}

/// `ip addr add ADDR dev DEV`, without duplicate address detection for
/// IPv6, so the address serves at once.
fn add_address<'a>(addr: &'a str, dev: &'a str) -> Vec<&'a str> {
    let mut args = vec!["addr", "add", addr, "dev", dev];
    if addr.contains(':') {
        args.push("nodad");
    }
    args
}

/// The kernel relay on a network interface rather than loopback: the
/// server's namespace reaches the client and the peer over a veth pair,
/// whose other end, in a second namespace, holds both their addresses. The
/// program learns the hosts' link-layer addresses from their packets, so
/// the first datagram to the peer goes through the sockets (whose sending
/// resolves it) and everything after through the kernel, out of the
/// interface it came in on.
#[test]
fn uclient_through_the_kernel_relay_on_a_network_interface() {
    if !own_network_namespace() {
        return;
    }
    let hosts = veth_to_hosts();
    ip_in(&hosts, &[&["addr", "add", "10.77.0.3/24", "dev", "hosts0"]]);
    // Full UDP checksums, as from other machines, so that every datagram
    // the program sends is checked by the kernel that receives it.
    checksums_in_full(None, "relay0");
    checksums_in_full(Some(&hosts), "hosts0");
    let server = callisto_on(
        "turn",
        "10.77.0.1:0",
        &[
            "--turn-user",
            "user:pass",
            "--turn-allow-peer",
            "10.77.0.0/24",
            "--metrics-listen",
            "127.0.0.1:0",
            "--turn-kernel-relay",
            "relay0",
        ],
    );
    let _peer = echo_peer_at(Some(&hosts.0), "10.77.0.3", 3480);
    // uclient from the hosts' side, lossless; afterwards `server` has
    // relayed `total` packets each way, all in the kernel but for at most
    // one per client each way: the first datagram to a host the program
    // has not seen on the link yet goes through the sockets, and the
    // answer teaches the program. (What the kernel relayed is added to the
    // totals once a second.)
    let through_the_kernel =
        |server: &Callisto, what: &str, peer_port: u16, flags: &[&str], total: f64| {
            assert_lossless(
                what,
                uclient_in(
                    Some(&hosts.0),
                    "10.77.0.1",
                    "10.77.0.3",
                    server.turn_port,
                    peer_port,
                    flags,
                    ("user", "pass"),
                ),
            );
            let m = metrics_once(server, |m| {
                relayed_udp(m, "to_peer") >= total && relayed_udp(m, "to_client") >= total
            });
            assert_relayed_packets(&m, &["udp"], total);
            for dir in ["to_peer", "to_client"] {
                assert!(in_kernel(&m, dir) >= total - 10.0, "{what}, {dir}: {m}");
            }
            // Nor by the workers in place, but for the same few.
            assert!(
                metric(&m, "callisto_turn_relayed_in_place_packets_total") <= 10.0,
                "{what}: {m}"
            );
        };
    through_the_kernel(
        &server,
        "to a peer, through the kernel, on a veth",
        3480,
        &[],
        2000.0,
    );
    // With Send indications (as Firefox sends all its media): relayed by
    // the kernel, and the peer's answers come back as the kernel's Data
    // indications.
    through_the_kernel(
        &server,
        "to a peer with Send indications",
        3480,
        &["-s"],
        4000.0,
    );
    // Client to client: the peer is another of our relayed addresses, which
    // the card would not loop back; the program hands the data to the other
    // client directly.
    through_the_kernel(
        &server,
        "client to client",
        free_udp_port(),
        &["-y"],
        6000.0,
    );
    // Client to client with Send indications (Firefox binds no channels):
    // handed to the other client in one pass too.
    through_the_kernel(
        &server,
        "client to client with Send indications",
        free_udp_port(),
        &["-y", "-s"],
        8000.0,
    );

    // The same behind a 1:1 NAT (--turn-external-ip): the clients know
    // each other's relayed addresses by the external IP, a TEST-NET address
    // nothing here holds.
    drop(server);
    let server = callisto_on(
        "turn",
        "10.77.0.1:0",
        &[
            "--turn-user",
            "user:pass",
            "--turn-external-ip",
            "198.51.100.1",
            "--metrics-listen",
            "127.0.0.1:0",
            // The interface that holds the listening address: relay0.
            "--turn-kernel-relay",
            "auto",
        ],
    );
    through_the_kernel(
        &server,
        "client to client, with an external IP",
        free_udp_port(),
        &["-y"],
        2000.0,
    );
    through_the_kernel(
        &server,
        "client to client with Send indications, with an external IP",
        free_udp_port(),
        &["-y", "-s"],
        4000.0,
    );
    // Every part runs, the kernel relay's reporter among them.
    let health = server.get("/healthz");
    assert!(health.ends_with("\r\n\r\nok\n"), "{health}");
}

/// What the kernel relay must leave to the sockets, since it cannot send it
/// right, with the relay on a veth and on loopback at once:
/// - Datagrams from a sender on this host, through the veth, whose UDP
///   checksum the sending device would complete (CHECKSUM_PARTIAL). Relayed
///   by the program, they reached the peer behind a router with the
///   checksum written into the wrong bytes, and 99.95 % were dropped.
/// - Data from a client on loopback for a peer on another host: a frame
///   sent back into loopback is not forwarded anywhere (100 % lost).
///
/// And what it still relays on loopback: data between addresses of this
/// host that are not 127.0.0.0/8, once it has seen them there.
#[test]
fn the_kernel_relay_leaves_to_the_sockets_what_it_cannot_send_right() {
    if !own_network_namespace() {
        return;
    }
    // Clients on the far end of a veth; peers behind them, through a
    // router (the hosts' namespace) whose interface to them computes
    // checksums in software, as a card without offload does.
    let hosts = veth_to_hosts();
    let peers = named_netns("peers");
    ip(&[
        "-n", &hosts.0, "link", "add", "fwd0", "type", "veth", "peer", "name", "peer0", "netns",
        &peers.0,
    ]);
    ip_in(
        &hosts,
        &[
            &["addr", "add", "10.88.0.1/24", "dev", "fwd0"],
            &["link", "set", "fwd0", "up"],
        ],
    );
    ip_in(
        &peers,
        &[
            &["addr", "add", "10.88.0.2/24", "dev", "peer0"],
            &["link", "set", "peer0", "up"],
            &["route", "add", "default", "via", "10.88.0.1"],
        ],
    );
    let forwarding = Command::new("ip")
        .args([
            "netns",
            "exec",
            &hosts.0,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ])
        .status();
    assert!(forwarding.is_ok_and(|s| s.success()));
    checksums_in_full(Some(&hosts), "fwd0");
    ip(&["route", "add", "10.88.0.0/24", "via", "10.77.0.2"]);
    // An address of this host's beyond 127.0.0.0/8, for a local peer.
    ip(&["addr", "add", "10.99.0.1/32", "dev", "lo"]);

    let server = callisto_on(
        "turn",
        "10.77.0.1:0",
        &[
            "--turn-user",
            "user:pass",
            "--turn-allow-peer",
            "10.88.0.0/24",
            "--turn-allow-peer",
            "10.99.0.0/24",
            "--metrics-listen",
            "127.0.0.1:0",
            "--turn-kernel-relay",
            "relay0",
            "--turn-kernel-relay",
            "lo",
        ],
    );
    let _far_peer = echo_peer_at(Some(&peers.0), "10.88.0.2", 3480);
    let _near_peer = echo_peer_at(None, "10.99.0.1", 3481);
    let in_kernel = |m: &str| {
        ["to_peer", "to_client"].map(|dir| {
            counter(
                m,
                &format!("callisto_turn_relayed_in_kernel_packets_total{{direction=\"{dir}\"}}"),
            )
        })
    };
    let relayed = |m: &str| {
        ["to_peer", "to_client"].map(|dir| {
            metric(
                m,
                &format!(
                    "callisto_turn_relayed_packets_total{{direction=\"{dir}\",transport=\"udp\"}}"
                ),
            )
        })
    };
    // Runs uclient (2,000 packets each way) from `netns` to `peer`, lossless;
    // returns how many the kernel relayed each way.
    let mut total = 0.0;
    let mut run = |what: &str, netns: Option<&NamedNetns>, peer: &str, port: u16| {
        let before = in_kernel(&server.metrics());
        assert_lossless(
            what,
            uclient_in(
                netns.map(|n| n.0.as_str()),
                "10.77.0.1",
                peer,
                server.turn_port,
                port,
                &[],
                ("user", "pass"),
            ),
        );
        total += 2000.0;
        let m = metrics_once(&server, |m| relayed(m).iter().all(|&n| n >= total));
        assert_relayed_packets(&m, &["udp"], total);
        let after = in_kernel(&m);
        [after[0] - before[0], after[1] - before[1]]
    };

    let kernel = run(
        "partial checksums, to a peer behind a router",
        Some(&hosts),
        "10.88.0.2",
        3480,
    );
    assert_eq!(kernel, [0.0, 0.0], "partial checksums go to the sockets");
    let kernel = run(
        "from loopback to a peer on another host",
        None,
        "10.88.0.2",
        3480,
    );
    assert_eq!(kernel[0], 0.0, "toward the peer, the sockets");
    let kernel = run(
        "from loopback to a peer on this host",
        None,
        "10.99.0.1",
        3481,
    );
    // All but the first datagram to the peer, before its answer showed the
    // program that its address is this host's.
    for (dir, n) in ["to_peer", "to_client"].iter().zip(kernel) {
        assert!(n >= 1990.0, "{dir}: {n} of 2000 in the kernel");
    }
}

/// `UDP_SEGMENT` (linux/udp.h): the socket option that makes one `send`
/// of several datagrams' worth leave as UDP GSO.
const UDP_SEGMENT: libc::c_int = 103;

/// A program on the server's own host that answers through loopback with
/// UDP GSO (`UDP_SEGMENT`, as some QUIC stacks send) hands loopback one
/// buffer of several datagrams. Generic XDP would show it to the kernel
/// relay as a single datagram, to be relayed whole; the relay has loopback
/// cut such buffers into their datagrams before the program sees them.
/// Each datagram arrives as its own Data indication, then its own
/// ChannelData, none lost or merged, most of them relayed by the kernel.
#[test]
fn a_local_peer_sending_udp_gso_over_loopback_loses_nothing() {
    if !own_network_namespace() {
        return;
    }
    let server = two_worker_turn(&["--turn-kernel-relay", "lo"]);
    let turn: SocketAddr = format!("127.0.0.1:{}", server.turn_port).parse().unwrap();
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    let segment: libc::c_int = 100;
    // SAFETY: a plain integer option on a socket this test owns.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&peer),
            libc::SOL_UDP,
            UDP_SEGMENT,
            (&raw const segment).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "UDP_SEGMENT: {}", std::io::Error::last_os_error());

    let mut client = Client::new("user", "pass", false, 7);
    client.allocate(Instant::now());
    let events = drive(&sock, turn, &mut client, |e| {
        matches!(e, Event::Allocated { .. } | Event::Failed { .. })
    });
    let Some(&Event::Allocated { relayed, .. }) = events.last() else {
        panic!("{events:?}")
    };
    let from = peer.local_addr().unwrap();
    client.create_permission(Instant::now(), from.ip());
    drive(&sock, turn, &mut client, |e| {
        matches!(e, Event::PermissionCreated(_))
    });

    let mut sent = 0;
    for channel in [false, true] {
        if channel {
            client.bind_channel(Instant::now(), from);
            drive(&sock, turn, &mut client, |e| {
                matches!(e, Event::ChannelBound { .. })
            });
        }
        // Three datagrams per send, every one of them different.
        let mut expected = Vec::new();
        for batch in 0..30u8 {
            let mut buf = Vec::new();
            for i in 0..3u8 {
                let datagram: Vec<u8> = [u8::from(channel) * 128 + batch, i]
                    .into_iter()
                    .cycle()
                    .take(100)
                    .collect();
                buf.extend_from_slice(&datagram);
                expected.push(datagram);
            }
            assert_eq!(peer.send_to(&buf, relayed).unwrap(), 300);
            sent += 3;
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut buf = [0u8; 2048];
        while got.len() < expected.len() && Instant::now() < deadline {
            if let Ok((n, _)) = sock.recv_from(&mut buf) {
                client.handle_input(Instant::now(), &buf[..n]);
            }
            while let Some(e) = client.poll_event() {
                if let Event::Data { peer, data } = e {
                    assert_eq!(peer, from);
                    got.push(data);
                }
            }
        }
        got.sort();
        expected.sort();
        let lens: Vec<usize> = got.iter().map(Vec::len).filter(|&n| n != 100).collect();
        assert!(lens.is_empty(), "merged datagrams of {lens:?} bytes");
        assert!(
            got == expected,
            "channel: {channel}: {} of {} datagrams arrived intact",
            got.iter().filter(|d| expected.contains(d)).count(),
            expected.len()
        );
    }
    let m = metrics_once(&server, |m| {
        counter(
            m,
            "callisto_turn_relayed_in_kernel_packets_total{direction=\"to_client\"}",
        ) >= f64::from(sent / 2)
    });
    let in_kernel = counter(
        &m,
        "callisto_turn_relayed_in_kernel_packets_total{direction=\"to_client\"}",
    );
    assert!(in_kernel >= f64::from(sent / 2), "most in the kernel: {m}");
}

/// The certificate handed out by the TLS server at `addr`.
fn presented_certificate(addr: SocketAddr) -> Vec<u8> {
    let mut tcp = TcpStream::connect(addr).unwrap();
    let mut conn = rustls::ClientConnection::new(
        trusting_any_certificate(&[b"stun.turn"]),
        "localhost".try_into().unwrap(),
    )
    .unwrap();
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).unwrap();
    }
    conn.peer_certificates().expect("a certificate")[0].to_vec()
}

/// A fresh self-signed certificate and key, written to `cert` and `key`;
/// returns the certificate (DER).
fn write_certificate(cert: &std::path::Path, key: &std::path::Path) -> Vec<u8> {
    write_certificate_valid(cert, key, None)
}

/// [`write_certificate`], valid over `(from, until)` in Unix seconds if
/// given (rcgen's defaults otherwise: 1975 to 4096).
fn write_certificate_valid(
    cert: &std::path::Path,
    key: &std::path::Path,
    validity: Option<(i64, i64)>,
) -> Vec<u8> {
    let signing_key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
    if let Some((from, until)) = validity {
        params.not_before = time::OffsetDateTime::from_unix_timestamp(from).unwrap();
        params.not_after = time::OffsetDateTime::from_unix_timestamp(until).unwrap();
    }
    let generated = params.self_signed(&signing_key).unwrap();
    std::fs::write(cert, generated.pem()).unwrap();
    std::fs::write(key, signing_key.serialize_pem()).unwrap();
    generated.der().to_vec()
}

/// Waits up to 10 s for the TLS server at `addr` to hand out `expected`.
fn wait_for_certificate(addr: SocketAddr, expected: &[u8], what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while presented_certificate(addr) != expected {
        assert!(
            Instant::now() < deadline,
            "{what}: still the old certificate"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A STUN Binding request over an open TLS connection gets its answer.
fn binding_over(tls: &mut rustls::StreamOwned<rustls::ClientConnection, TcpStream>, n: u8) {
    let mut request = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42];
    request.extend_from_slice(&[n; 12]);
    tls.write_all(&request).unwrap();
    let mut head = [0u8; 20];
    tls.read_exact(&mut head).unwrap();
    assert_eq!(&head[..2], &[0x01, 0x01], "a Binding success response");
    assert_eq!(&head[8..], &request[8..], "to our transaction");
    let mut attrs = vec![0u8; usize::from(u16::from_be_bytes([head[2], head[3]]))];
    tls.read_exact(&mut attrs).unwrap();
}

/// A renewed certificate is served without a restart, by TURN over TLS and
/// by HTTPS: on SIGHUP, and by itself once the files change; connections
/// already open go on, and files that cannot be used (a key of another
/// certificate) leave the served certificate as it was.
#[test]
fn a_renewed_certificate_is_served_without_a_restart() {
    let dir = std::env::temp_dir().join(format!("callisto-renewal-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("fullchain.pem"), dir.join("privkey.pem"));
    let first = write_certificate(&cert, &key);
    let (cert_arg, key_arg) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let server = turn_over_tls_from_files(&cert, &key);
    let tls: SocketAddr = format!("127.0.0.1:{}", server.tls_port.expect("TLS listener"))
        .parse()
        .unwrap();
    assert_eq!(presented_certificate(tls), first);
    let conn = rustls::ClientConnection::new(
        trusting_any_certificate(&[b"stun.turn"]),
        "localhost".try_into().unwrap(),
    )
    .unwrap();
    let mut open = rustls::StreamOwned::new(conn, TcpStream::connect(tls).unwrap());
    binding_over(&mut open, 1);

    let second = write_certificate(&cert, &key);
    server.hang_up("TLS certificate replaced");
    assert_eq!(presented_certificate(tls), second);
    binding_over(&mut open, 2);

    // A renewal half done: the new certificate, the old key.
    let unchanged = std::fs::read(&key).unwrap();
    write_certificate(&cert, &key);
    std::fs::write(&key, unchanged).unwrap();
    let line = server.hang_up("TLS certificate kept");
    assert!(line.contains("privkey.pem"), "{line}");
    assert_eq!(presented_certificate(tls), second);
    binding_over(&mut open, 3);
    let metrics = server.metrics();
    for (result, n) in [("replaced", 1.0), ("failed", 1.0)] {
        let name = format!("callisto_tls_certificate_reloads_total{{result=\"{result}\"}}");
        assert_eq!(counter(&metrics, &name), n, "{name}");
    }
    drop(server);

    // `serve`, looking at the files every second, needs no signal.
    let served = write_certificate(&cert, &key);
    let server = callisto(
        "serve",
        &[
            "--tls-cert",
            cert_arg,
            "--tls-key",
            key_arg,
            "--tls-recheck",
            "1",
        ],
    );
    let https = server.http.expect("the HTTPS listener");
    assert_eq!(presented_certificate(https), served);
    let third = write_certificate(&cert, &key);
    wait_for_certificate(https, &third, "HTTPS after the files changed");
    server.wait_for_log(0, "TLS certificate replaced");
    let metrics = server.metrics();
    let replaced = "callisto_tls_certificate_reloads_total{result=\"replaced\"}";
    assert_eq!(counter(&metrics, replaced), 1.0, "{metrics}");
    std::fs::remove_dir_all(&dir).ok();
}

/// `callisto turn` with TURN over TLS on the certificate in `cert` and
/// `key`, read again on SIGHUP only, and metrics.
fn turn_over_tls_from_files(cert: &std::path::Path, key: &std::path::Path) -> Callisto {
    callisto(
        "turn",
        &[
            "--turn-user",
            "user:pass",
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
            "--tls-recheck",
            "0",
            "--turn-tls-listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    )
}

/// The served certificate's expiry is a metric to alert on, and the log
/// warns while there is time to renew; a renewal moves both, and an expired
/// certificate copied back does not replace a working one.
#[test]
fn an_expiring_certificate_is_warned_of_and_exported() {
    use callisto::tls::validity::rfc3339;
    let dir = std::env::temp_dir().join(format!("callisto-expiry-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("fullchain.pem"), dir.join("privkey.pem"));
    let now = common::unix_now() as i64;
    const DAY: i64 = 86_400;
    let expiry = "callisto_tls_certificate_expiry_timestamp_seconds";
    let start = turn_over_tls_from_files;

    // 10 days left of 90: certbot would have renewed it 20 days ago.
    let overdue_until = now + 10 * DAY;
    write_certificate_valid(&cert, &key, Some((now - 80 * DAY, overdue_until)));
    let server = start(&cert, &key);
    let line = server.wait_for_log(0, "should have been renewed");
    assert!(line.contains(&rfc3339(overdue_until)), "{line}");
    server.wait_for_metric(expiry, overdue_until as f64);

    let renewed_until = now + 90 * DAY;
    let renewed = write_certificate_valid(&cert, &key, Some((now - 60, renewed_until)));
    let line = server.hang_up("TLS certificate replaced");
    assert!(line.contains(&rfc3339(renewed_until)), "{line}");
    server.wait_for_metric(expiry, renewed_until as f64);

    let expired_until = now - 10 * DAY;
    write_certificate_valid(&cert, &key, Some((now - 100 * DAY, expired_until)));
    let line = server.hang_up("TLS certificate kept");
    assert!(
        line.contains("expired at") && line.contains(&rfc3339(expired_until)),
        "{line}"
    );
    let tls: SocketAddr = format!("127.0.0.1:{}", server.tls_port.expect("TLS listener"))
        .parse()
        .unwrap();
    assert_eq!(presented_certificate(tls), renewed);
    assert_eq!(metric(&server.metrics(), expiry), renewed_until as f64);
    drop(server);

    // Started with nothing better, it serves the expired one, and says so.
    let server = start(&cert, &key);
    server.wait_for_log(0, "the TLS certificate has expired");
    server.wait_for_metric(expiry, expired_until as f64);
    std::fs::remove_dir_all(&dir).ok();
}

/// The `welcome` of a client that joins a room of `serve`.
fn welcome_from(server: &Callisto) -> serde_json::Value {
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let url = format!("ws://{}/ws", server.http.expect("serve has HTTP"));
        common::Client::connect(&url)
            .await
            .join("welcome", "W")
            .await
    })
}

/// `serve` in front of a coturn that takes time-limited credentials
/// (`use-auth-secret`): with `--ice-secret`, the browsers get credentials
/// signed with coturn's secret for its URLs, and coturn takes them; signed
/// with another secret, it does not.
#[test]
fn a_coturn_server_takes_the_credentials_serve_mints_for_it() {
    let (_coturn, port) = coturn_over_udp_with(
        &["127.0.0.1"],
        &["--use-auth-secret", "--static-auth-secret=coturn-secret"],
    );
    let coturn: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let url = format!("turn:{coturn}?transport=udp");
    let allocates_with = |secret: &str, seed: u64| {
        let server = callisto("serve", &["--ice-server", &url, "--ice-secret", secret]);
        let welcome = welcome_from(&server);
        let entry = welcome["iceServers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["urls"] == serde_json::json!([url]))
            .unwrap_or_else(|| panic!("no entry for coturn in {welcome}"))
            .clone();
        let (username, password) = (
            entry["username"].as_str().unwrap(),
            entry["credential"].as_str().unwrap(),
        );
        let sock = udp_socket("127.0.0.1:0");
        let mut client = Client::new(username, password, false, seed);
        client.allocate(Instant::now());
        let event = outcome(&sock, coturn, &mut client, allocated_or_failed);
        matches!(event, Some(Event::Allocated { .. }))
    };
    assert!(allocates_with("coturn-secret", 1), "coturn takes them");
    assert!(!allocates_with("another-secret", 2), "coturn checks them");
}

/// A coturn whose secret changes, and `serve` with `--ice-secrets-file`:
/// once the file has the new secret and `serve` gets SIGHUP, a browser
/// already in a room is sent credentials coturn takes, at once, and so is
/// each newcomer; no restart.
#[test]
fn a_coturn_secret_change_reaches_browsers_without_a_restart() {
    let (old, new) = ("0ld-coturn-secret", "n3w-coturn-secret");
    let (_coturn, port) = coturn_over_udp_with(
        &["127.0.0.1"],
        &["--use-auth-secret", &format!("--static-auth-secret={new}")],
    );
    let coturn: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let url = format!("turn:{coturn}?transport=udp");
    let file = std::env::temp_dir().join(format!("callisto-ice-secrets-{}", std::process::id()));
    std::fs::write(&file, format!("# coturn's static-auth-secret\n{old}\n")).unwrap();
    let server = callisto(
        "serve",
        &[
            "--ice-server",
            &url,
            "--ice-secrets-file",
            file.to_str().unwrap(),
        ],
    );
    let coturn_takes = |ice_servers: &serde_json::Value, seed: u64| {
        let entry = ice_servers
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["urls"] == serde_json::json!([url]))
            .unwrap_or_else(|| panic!("no entry for coturn in {ice_servers}"));
        let mut client = Client::new(
            entry["username"].as_str().unwrap(),
            entry["credential"].as_str().unwrap(),
            false,
            seed,
        );
        client.allocate(Instant::now());
        let sock = udp_socket("127.0.0.1:0");
        let event = outcome(&sock, coturn, &mut client, allocated_or_failed);
        matches!(event, Some(Event::Allocated { .. }))
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ws = format!("ws://{}/ws", server.http.expect("serve has HTTP"));
    let (mut in_room, welcome) = rt.block_on(async {
        let mut c = common::Client::connect(&ws).await;
        let welcome = c.join("rotation", "R").await;
        (c, welcome)
    });
    assert!(
        !coturn_takes(&welcome["iceServers"], 1),
        "signed with the old secret"
    );

    std::fs::write(&file, format!("{new}\n{old}\n")).unwrap();
    server.hang_up("--ice-secrets-file: TURN shared secrets replaced");
    server.wait_for_metric(
        "callisto_turn_secret_reloads_total{file=\"ice-secrets-file\",result=\"replaced\"}",
        1.0,
    );
    let renewed = rt.block_on(in_room.expect("ice-servers"));
    assert!(
        coturn_takes(&renewed["iceServers"], 2),
        "the browser in the room"
    );
    assert!(
        coturn_takes(&welcome_from(&server)["iceServers"], 3),
        "a newcomer"
    );
    assert!(
        !server
            .logs
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains(new) || l.contains(old)),
        "no secret in the log"
    );
    let _ = std::fs::remove_file(&file);
}

/// The credentials `serve` hands out in `welcome`: (username, password).
fn handed_out_credentials(server: &Callisto) -> (String, String) {
    let welcome = welcome_from(server);
    let turn = welcome["iceServers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["credential"].is_string())
        .unwrap_or_else(|| panic!("no TURN credentials in {welcome}"));
    (
        turn["username"].as_str().unwrap().to_owned(),
        turn["credential"].as_str().unwrap().to_owned(),
    )
}

/// Rotating the shared secret without a restart (`--turn-secrets-file`
/// and SIGHUP): the new secret signs what `serve` hands out from then on,
/// the old one is accepted for as long as the file lists it, allocations
/// made with it go on meanwhile, and once it is removed its credentials are
/// refused. A browser in a room gets credentials from the new secret at
/// once. A file with no secret changes nothing; no secret is logged.
#[test]
fn the_shared_secret_is_rotated_without_a_restart() {
    use callisto_turn::auth::{rest_credentials, rest_password};
    let file = std::env::temp_dir().join(format!("callisto-secrets-{}", std::process::id()));
    let (old, new) = ("0ld-Shared-Secret", "n3w-Shared-Secret");
    std::fs::write(&file, format!("{old}\n")).unwrap();
    let server = callisto("serve", &["--turn-secrets-file", file.to_str().unwrap()]);
    let turn: SocketAddr = format!("127.0.0.1:{}", server.turn_port).parse().unwrap();
    let expires = common::unix_now() + 3_600;
    let signed_with = |secret: &str| {
        let (username, password) = handed_out_credentials(&server);
        assert_eq!(rest_password(secret.as_bytes(), &username), password);
    };
    // Each allocation from a socket of its own: one 5-tuple, one allocation.
    let allocate = |secret: &str, seed: u64| {
        let sock = udp_socket("127.0.0.1:0");
        let (username, password) = rest_credentials(secret.as_bytes(), "rotation", expires);
        let mut client = Client::new(&username, &password, false, seed);
        client.allocate(Instant::now());
        let event = outcome(&sock, turn, &mut client, allocated_or_failed);
        let allocated = matches!(event, Some(Event::Allocated { .. }));
        (allocated, (client, sock))
    };
    let refreshes = |(client, sock): &mut (Client, UdpSocket)| {
        client.refresh(Instant::now(), 600);
        let event = outcome(sock, turn, client, refreshed_or_failed);
        matches!(event, Some(Event::Refreshed { .. }))
    };
    let rewrite = |text: String, logged: &str| {
        std::fs::write(&file, text).unwrap();
        server.hang_up(logged)
    };

    signed_with(old);
    let (allocated, mut made_with_old) = allocate(old, 1);
    assert!(allocated);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let url = format!("ws://{}/ws", server.http.expect("serve has HTTP"));
    let mut in_a_room = runtime.block_on(async {
        let mut client = common::Client::connect(&url).await;
        client.join("rotation", "R").await;
        client
    });

    let line = rewrite(format!("# rotating\n{new}\n{old}\n"), "secrets replaced");
    assert!(line.contains("\"count\":2"), "{line}");
    signed_with(new);
    let renewed = runtime.block_on(in_a_room.expect("ice-servers"));
    let turn = &renewed["iceServers"][1];
    let username = turn["username"].as_str().unwrap();
    assert_eq!(
        rest_password(new.as_bytes(), username),
        turn["credential"].as_str().unwrap(),
        "the browser in the room was sent credentials from the new secret"
    );
    assert!(allocate(new, 2).0);
    assert!(allocate(old, 3).0, "the old secret is still accepted");
    assert!(refreshes(&mut made_with_old));

    rewrite(format!("{new}\n"), "secrets replaced");
    assert!(
        !allocate(old, 4).0,
        "the old secret is refused once removed"
    );
    assert!(!refreshes(&mut made_with_old));
    assert!(allocate(new, 5).0);

    let line = rewrite("# emptied by mistake\n".into(), "secrets unchanged");
    assert!(line.contains("no secret"), "{line}");
    assert!(allocate(new, 6).0);
    signed_with(new);
    // Removing the old secret left the new one signing: nothing to renew.
    runtime.block_on(in_a_room.ping());

    let logs = server.logs.lock().unwrap().join("\n");
    for secret in [old, new] {
        assert!(!logs.contains(secret), "{secret} is in the logs");
    }
    assert!(
        logs.contains("can be read by every user of this machine"),
        "a secrets file others can read (0644 here) is warned of:\n{logs}"
    );
    let _ = std::fs::remove_file(&file);
}

/// Drives `client` until `done` says an event ends it; that event.
fn outcome(
    sock: &UdpSocket,
    turn: SocketAddr,
    client: &mut Client,
    done: impl FnMut(&Event) -> bool,
) -> Option<Event> {
    drive(sock, turn, client, done).last().cloned()
}

fn allocated_or_failed(e: &Event) -> bool {
    matches!(e, Event::Allocated { .. } | Event::Failed { .. })
}

fn refreshed_or_failed(e: &Event) -> bool {
    matches!(e, Event::Refreshed { .. } | Event::Failed { .. })
}

/// Credentials handed out for a short time (applications use an hour or
/// less) make no allocation once expired, but the allocation they made in
/// time goes on being refreshed: the call it relays outlasts them.
#[test]
fn an_allocation_outlives_its_credentials() {
    use callisto_turn::auth::rest_credentials;
    let secret = "Sh0rt-Lived";
    let server = callisto("turn", &["--turn-secret", secret]);
    let turn: SocketAddr = format!("127.0.0.1:{}", server.turn_port).parse().unwrap();
    let expires = common::unix_now() + 2;
    let (username, password) = rest_credentials(secret.as_bytes(), "brief", expires);
    let sock = udp_socket("127.0.0.1:0");
    let mut client = Client::new(&username, &password, false, 1);
    client.allocate(Instant::now());
    let event = outcome(&sock, turn, &mut client, allocated_or_failed);
    assert!(matches!(event, Some(Event::Allocated { .. })), "{event:?}");

    while common::unix_now() <= expires {
        std::thread::sleep(Duration::from_millis(100));
    }
    client.refresh(Instant::now(), 600);
    let event = outcome(&sock, turn, &mut client, refreshed_or_failed);
    assert!(matches!(event, Some(Event::Refreshed { .. })), "{event:?}");

    let other = udp_socket("127.0.0.1:0");
    let mut late = Client::new(&username, &password, false, 2);
    late.allocate(Instant::now());
    let event = outcome(&other, turn, &mut late, allocated_or_failed);
    assert!(matches!(event, Some(Event::Failed { .. })), "{event:?}");
}

/// The log says who held which relay, from when to when and why it ended:
/// what an abuse report about a relayed address needs. One line when an
/// allocation is made, one when it ends (deleted; its TCP connection
/// closed), each with the client, transport, relay and username, and at
/// the end what was relayed each way.
#[test]
fn the_log_says_who_held_which_relay_and_why_it_ended() {
    let (_peer, peer_port) = echo_peer();
    let peer = SocketAddr::from(([127, 0, 0, 1], peer_port));
    let server = callisto(
        "turn",
        &[
            "--turn-user",
            "alice:Pa55word",
            "--turn-allow-peer",
            "127.0.0.1/32",
        ],
    );
    let turn: SocketAddr = format!("127.0.0.1:{}", server.turn_port).parse().unwrap();
    let logged = |message: &str, client: SocketAddr| -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let found = server.logs.lock().unwrap().iter().find_map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).ok()?;
                (v["message"] == message && v["client"] == client.to_string()).then_some(v)
            });
            if let Some(v) = found {
                return v;
            }
            assert!(Instant::now() < deadline, "no {message:?} for {client}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let relayed = |events: &[Event]| match events.last() {
        Some(Event::Allocated { relayed, .. }) => *relayed,
        other => panic!("not allocated: {other:?}"),
    };

    let sock = udp_socket("127.0.0.1:0");
    let mut client = Client::new("alice", "Pa55word", false, 1);
    client.allocate(Instant::now());
    let relay = relayed(&drive(&sock, turn, &mut client, allocated_or_failed));
    let created = logged("allocation created", sock.local_addr().unwrap());
    assert_eq!(created["transport"], "udp");
    assert_eq!(created["relay"], relay.to_string());
    assert_eq!(created["username"], "alice");
    client.create_permission(Instant::now(), peer.ip());
    drive(&sock, turn, &mut client, |e| {
        matches!(e, Event::PermissionCreated(_))
    });
    let mut link = Link::Udp(&sock, turn);
    for n in 0..3u8 {
        echoed(&mut link, &mut client, peer, &[n; 100]);
    }
    client.refresh(Instant::now(), 0);
    drive(&sock, turn, &mut client, refreshed_or_failed);
    let ended = logged("allocation ended", sock.local_addr().unwrap());
    assert_eq!(ended["reason"], "deleted");
    assert_eq!(ended["relay"], relay.to_string());
    // Payload bytes, each way, as the metrics count them.
    for (field, n) in [
        ("to_peer_packets", 3),
        ("to_peer_bytes", 300),
        ("to_client_packets", 3),
        ("to_client_bytes", 300),
    ] {
        assert_eq!(ended[field], n, "{field}: {ended}");
    }

    // An allocation over TCP: its link, the client's address, the relay.
    let allocated_over_tcp = |seed: u64| {
        let tcp = TcpStream::connect(turn).unwrap();
        tcp.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let local = tcp.local_addr().unwrap();
        let mut client = Client::new("alice", "Pa55word", true, seed);
        client.allocate(Instant::now());
        let mut link = Link::Tcp(tcp, Vec::new());
        let relay = relayed(&drive_over(&mut link, &mut client, allocated_or_failed));
        (link, local, relay)
    };
    let (link, local, relay) = allocated_over_tcp(2);
    assert_eq!(logged("allocation created", local)["transport"], "tcp");
    drop(link);
    let ended = logged("allocation ended", local);
    assert_eq!(ended["reason"], "connection closed");
    assert_eq!(ended["relay"], relay.to_string());

    // Allocations still held when the server stops end then, each with
    // its line, over UDP and TCP alike.
    let sock = udp_socket("127.0.0.1:0");
    let mut udp_client = Client::new("alice", "Pa55word", false, 3);
    udp_client.allocate(Instant::now());
    let udp_relay = relayed(&drive(&sock, turn, &mut udp_client, allocated_or_failed));
    let (_link, tcp_local, tcp_relay) = allocated_over_tcp(4);
    server.terminate();
    for (client, relay) in [
        (sock.local_addr().unwrap(), udp_relay),
        (tcp_local, tcp_relay),
    ] {
        let ended = logged("allocation ended", client);
        assert_eq!(ended["reason"], "server stopped", "{ended}");
        assert_eq!(ended["relay"], relay.to_string(), "{ended}");
    }

    let logs = server.logs.lock().unwrap().join("\n");
    assert!(!logs.contains("Pa55word"), "the password is in the logs");
}

/// A server with no IPv4 relay address gives a client that asks for no
/// family (as browsers do) a relay of its own family, unasked: RFC 8656's
/// IPv4 default would give it none.
#[test]
fn an_ipv6_only_server_relays_clients_that_ask_for_no_family() {
    let server = callisto_on("turn", "[::1]:0", &["--turn-user", "user:pass"]);
    let turn: SocketAddr = format!("[::1]:{}", server.turn_port).parse().unwrap();
    let sock = udp_socket("[::1]:0");
    let mut client = Client::new("user", "pass", false, 1);
    client.allocate(Instant::now());
    match outcome(&sock, turn, &mut client, allocated_or_failed) {
        Some(Event::Allocated { relayed, .. }) => assert!(relayed.is_ipv6(), "{relayed}"),
        other => panic!("no relay: {other:?}"),
    }
}
