//! `callisto bench turn`: Callisto's TURN server, coturn, turn-rs and a
//! plain forwarder, each started by the benchmark with the same thread
//! count, measured with the same load generator in one run.
//!
//! Two traffic patterns:
//! - (a) client ↔ external UDP echo peer, through one allocation each;
//! - (b) client ↔ client, both allocated on the server (relay/relay, the
//!   common WebRTC case); the second client echoes.
//!
//! Load runs either paced (`--rate` round trips per second, open loop:
//! loss and latency at a given load) or closed loop (`--rate 0`: a window
//! of packets in flight per allocation: the most the pair can do).
//! Server CPU comes from the process's CPU-time clock, memory from
//! /proc/PID/status. `--generator uclient` loads the same servers with
//! coturn's own client instead (see `uclient.rs`).

use std::collections::VecDeque;
use std::io::{self, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use callisto_turn::client::{Client, Event};
use callisto_turn::net::batch::{self, RecvBatch, SendBatch};
use callisto_turn::stun::{ChannelData, Class, Message, MessageBuilder, attr, method};
use mio::{Events, Interest, Poll, Token};

use crate::cli::{BenchGenerator, BenchPattern, BenchPin, BenchTarget, BenchTurnArgs};

pub(super) const USER: &str = "bench";
pub(super) const PASS: &str = "bench-password";
const REALM: &str = "bench";
/// Packets in flight per allocation in closed-loop mode.
const WINDOW: u64 = 8;

/// A server under test, as a child process.
pub(super) struct Target {
    name: &'static str,
    child: Child,
    pub(super) addr: SocketAddr,
    /// The TLS listening port, with `--uclient-tls`.
    pub(super) tls_port: Option<u16>,
    /// Files the server reads, removed with the target.
    _files: Vec<tempfile_path::TempPath>,
}

mod tempfile_path {
    /// A file removed when dropped.
    pub struct TempPath(pub std::path::PathBuf);
    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Target {
    pub(super) fn cpu_seconds(&self) -> f64 {
        proc_cpu_seconds(self.child.id()).unwrap_or(f64::NAN)
    }

    pub(super) fn rss_mib(&self) -> f64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            })
            .map_or(f64::NAN, |kb| kb / 1024.0)
    }
}

/// CPU time, in seconds, of the kernel's softirq threads (`ksoftirqd/N`),
/// where the network stack's receive work goes when it piles up.
///
/// With this, the bench process's own time (generator and echo peer) and
/// the server's, the "total CPU" column counts the work a relayed packet
/// costs wherever the kernel charges it: on loopback the sender of a
/// datagram runs the receiving side of the stack, so what a server does in
/// the kernel (the kernel relay entirely) shows up in the generator's or
/// the peer's time, not the server's. `/proc/stat` would count it too, but
/// in clock ticks sampled at 250 Hz, which miss most of a server's short
/// bursts (it read a quarter of the server's own CPU clock here).
pub(super) fn softirq_threads_cpu_seconds() -> f64 {
    static PIDS: std::sync::OnceLock<Vec<u32>> = std::sync::OnceLock::new();
    let pids = PIDS.get_or_init(|| {
        std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .is_ok_and(|c| c.starts_with("ksoftirqd/"))
            })
            .collect()
    });
    pids.iter().filter_map(|&pid| proc_cpu_seconds(pid)).sum()
}

/// CPU time of this process (the generator and the echo peer), in seconds.
pub(super) fn own_cpu_seconds() -> f64 {
    clock_seconds(libc::CLOCK_PROCESS_CPUTIME_ID).unwrap_or(f64::NAN)
}

/// The reading of `clock`, in seconds.
fn clock_seconds(clock: libc::clockid_t) -> Option<f64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes only into `ts`, a live local of the right type.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return None;
    }
    Some(ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9)
}

/// CPU time of a process and all its threads (user + system), in seconds.
///
/// From the process's CPU-time clock, in nanoseconds. `/proc/PID/stat`
/// counts in clock ticks (10 ms): over a one-second run at 20,000 packets/s
/// that is half a microsecond per packet, coarser than the differences
/// measured here. It remains the fallback.
#[cfg(target_os = "linux")]
pub(super) fn proc_cpu_seconds(pid: u32) -> Option<f64> {
    let mut clock: libc::clockid_t = 0;
    // SAFETY: writes only into `clock`, a live local of the right type.
    let found = unsafe { libc::clock_getcpuclockid(pid as libc::pid_t, &mut clock) } == 0;
    found
        .then(|| clock_seconds(clock))
        .flatten()
        .or_else(|| proc_stat_cpu_seconds(pid))
}

#[cfg(not(target_os = "linux"))]
pub(super) fn proc_cpu_seconds(pid: u32) -> Option<f64> {
    proc_stat_cpu_seconds(pid)
}

/// User + system CPU of a process and all its threads from
/// `/proc/PID/stat`, in seconds (clock-tick resolution).
fn proc_stat_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of the whole line are 12 and 13 after "pid (comm) ".
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks / hz)
}

pub(super) fn free_port() -> io::Result<u16> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn free_tcp_port() -> io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Where everything runs: 127.0.0.1, or ::1 with `--ipv6`.
fn loopback(args: &BenchTurnArgs) -> IpAddr {
    if args.ipv6 {
        Ipv6Addr::LOCALHOST.into()
    } else {
        Ipv4Addr::LOCALHOST.into()
    }
}

fn start_target(which: BenchTarget, args: &BenchTurnArgs, index: usize) -> anyhow::Result<Target> {
    let port = free_port()?;
    let addr = SocketAddr::new(loopback(args), port);
    // The echo peers: uclient's and ours on 127.0.0.1 and 127.0.0.2 (see
    // echo_peer), or ours on ::1.
    let peers: &[&str] = if args.ipv6 {
        &["::1/128"]
    } else {
        &["127.0.0.1/32", "127.0.0.2/32"]
    };
    let threads = args.threads.to_string();
    // Disjoint relay port ranges, so targets never collide.
    let lo = 20000 + index as u32 * 4000;
    let (lo, hi) = (lo, lo + 3999);
    let quiet = || (Stdio::null(), Stdio::null());
    let name = target_name(which);
    let tls_port = if args.uclient_tls {
        Some(free_tcp_port()?)
    } else {
        None
    };
    let tls_listen = tls_port.map(|p| format!("127.0.0.1:{p}"));
    let (child, files) = match which {
        BenchTarget::Callisto | BenchTarget::CallistoKernel => {
            let (o, e) = quiet();
            let kernel = which == BenchTarget::CallistoKernel;
            let child = server_command(std::env::current_exe()?, args.pin)?
                .args([
                    "turn",
                    "--turn-listen",
                    &addr.to_string(),
                    "--turn-threads",
                    &threads,
                ])
                .args([
                    "--turn-user",
                    &format!("{USER}:{PASS}"),
                    "--turn-realm",
                    REALM,
                ])
                .args(peers.iter().flat_map(|p| ["--turn-allow-peer", p]))
                .args(["--turn-port-range", &format!("{lo}-{hi}")])
                .args([
                    "--turn-user-quota",
                    "100000",
                    "--turn-max-allocations",
                    "100000",
                    "--turn-max-allocations-per-ip",
                    "100000",
                    "--log",
                    "warn",
                ])
                // Every benchmark client shares 127.0.0.1; the other servers
                // do not rate-limit challenges at all.
                .args(["--turn-unauth-rate", "1000000"])
                .args(["--turn-unauth-allowance", "100000000"])
                .args(
                    tls_listen
                        .iter()
                        .flat_map(|l| ["--tls-self-signed", "--turn-tls-listen", l]),
                )
                .args(
                    kernel
                        .then_some(["--turn-kernel-relay", "lo"])
                        .into_iter()
                        .flatten(),
                )
                .stdout(o)
                .stderr(e)
                .spawn()
                .context("starting callisto turn")?;
            (child, Vec::new())
        }
        BenchTarget::Coturn => {
            let (o, e) = quiet();
            // Over TLS: a self-signed certificate in two temporary files.
            let mut files = Vec::new();
            let mut tls_args = vec!["--no-tls".to_owned()];
            if let Some(p) = tls_port {
                let generated = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])
                    .context("generating a certificate for coturn")?;
                let base = std::env::temp_dir().join(format!(
                    "callisto-bench-coturn-{}-{index}",
                    std::process::id()
                ));
                let (cert, key) = (base.with_extension("crt"), base.with_extension("key"));
                std::fs::write(&cert, generated.cert.pem())?;
                files.push(tempfile_path::TempPath(cert.clone()));
                std::fs::write(&key, generated.signing_key.serialize_pem())?;
                files.push(tempfile_path::TempPath(key.clone()));
                tls_args = vec![
                    format!("--tls-listening-port={p}"),
                    format!("--cert={}", cert.display()),
                    format!("--pkey={}", key.display()),
                ];
            }
            let child = server_command("turnserver", args.pin)?
                .arg("-n")
                .arg(format!("--listening-ip={}", addr.ip()))
                .arg(format!("--relay-ip={}", addr.ip()))
                .arg(format!("--listening-port={port}"))
                .args([
                    "--lt-cred-mech",
                    &format!("--user={USER}:{PASS}"),
                    &format!("--realm={REALM}"),
                ])
                .args(["--allow-loopback-peers", "--no-cli", "--no-dtls"])
                .args(&tls_args)
                .args((!args.uclient_tcp).then_some("--no-tcp"))
                .arg(format!("--relay-threads={threads}"))
                .arg(format!("--min-port={lo}"))
                .arg(format!("--max-port={hi}"))
                .args([
                    "--log-file=/dev/null",
                    "--pidfile=/dev/null",
                    "--no-stdout-log",
                ])
                .stdout(o)
                .stderr(e)
                .spawn()
                .context("starting coturn's turnserver (apt-get install coturn)")?;
            (child, files)
        }
        BenchTarget::TurnRs => {
            let bin = args
                .turn_rs
                .clone()
                .unwrap_or_else(|| PathBuf::from("turn-server"));
            let path = std::env::temp_dir().join(format!(
                "callisto-bench-turn-rs-{}.toml",
                std::process::id()
            ));
            std::fs::write(
                &path,
                format!(
                    "[server]\nport-range = \"{lo}..{hi}\"\nmax-threads = {threads}\nrealm = \"{REALM}\"\n\
                     [[server.interfaces]]\ntransport = \"udp\"\nlisten = \"{addr}\"\nexternal = \"{addr}\"\nidle-timeout = 60\nmtu = 1500\n\
                     [log]\nlevel = \"error\"\nstdout = false\n\
                     [auth]\nenable-hooks-auth = false\n[auth.static-credentials]\n{USER} = \"{PASS}\"\n"
                ),
            )?;
            let (o, e) = quiet();
            let child = server_command(&bin, args.pin)?
                .arg("--config")
                .arg(&path)
                .stdout(o)
                .stderr(e)
                .spawn()
                .with_context(|| {
                    format!(
                        "starting turn-rs ({}); cargo install turn-server, or pass --turn-rs PATH",
                        bin.display()
                    )
                })?;
            (child, vec![tempfile_path::TempPath(path)])
        }
        BenchTarget::Forwarder => {
            let (o, e) = quiet();
            let child = server_command(std::env::current_exe()?, args.pin)?
                .args(["bench", "forwarder", "--listen", &addr.to_string()])
                .stdout(o)
                .stderr(e)
                .spawn()?;
            (child, Vec::new())
        }
        BenchTarget::Direct => {
            // Nothing relays; a process that does nothing stands in for
            // the server, so that every target is measured alike.
            let (o, e) = quiet();
            let child = server_command("sleep", args.pin)?
                .arg("3600")
                .stdout(o)
                .stderr(e)
                .spawn()?;
            (child, Vec::new())
        }
    };
    std::thread::sleep(Duration::from_millis(400));
    if let Some(pin) = args.pin {
        let (server_cpu, _) = pin_sets(pin)?;
        check_affinity(child.id(), server_cpu).with_context(|| format!("pinning {name}"))?;
    }
    Ok(Target {
        name,
        child,
        addr,
        tls_port,
        _files: files,
    })
}

/// One allocation (or forwarder lane) and its client socket.
struct Lane {
    sock: UdpSocket,
    client: Option<Client>,
    relayed: SocketAddr,
    framing: Framing,
}

/// How a lane wraps what it sends to the server.
#[derive(Debug, Clone, Copy)]
enum Framing {
    /// As it is (the forwarder, the direct target).
    Raw,
    /// ChannelData on this channel.
    Channel(u16),
    /// A Send indication with FINGERPRINT to this peer.
    Send(SocketAddr),
}

impl Framing {
    /// Frames the body in `buf` where it is.
    fn frame(self, buf: &mut Vec<u8>) {
        match self {
            Framing::Raw => {}
            Framing::Channel(channel) => {
                let header = ChannelData::header(channel, buf.len() as u16);
                buf.splice(0..0, header);
            }
            Framing::Send(peer) => {
                // The transaction id is the same for all: indications get
                // no answer, and servers keep no state for them.
                let mut m = MessageBuilder::new(method::SEND, Class::Indication, &[0x5e; 12]);
                m.xor_address(attr::XOR_PEER_ADDRESS, peer)
                    .attr(attr::DATA, buf)
                    .fingerprint();
                *buf = m.finish();
            }
        }
    }

    /// The data in `datagram` from the server: ChannelData's or a Data
    /// indication's; `None` for anything else (a Refresh answer, say).
    fn unframe(self, datagram: &[u8]) -> Option<&[u8]> {
        match self {
            Framing::Raw => Some(datagram),
            Framing::Channel(_) | Framing::Send(_) => {
                if let Some(cd) = ChannelData::parse(datagram) {
                    return Some(&datagram[4..4 + cd.len]);
                }
                let m = Message::parse(datagram).ok()?;
                ((m.method(), m.class()) == (method::DATA, Class::Indication))
                    .then(|| m.get(attr::DATA))
                    .flatten()
            }
        }
    }
}

fn drive(
    lane: &mut Lane,
    server: SocketAddr,
    mut done: impl FnMut(&Event) -> bool,
) -> anyhow::Result<()> {
    let client = lane.client.as_mut().context("not a TURN lane")?;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = [0u8; 2048];
    loop {
        while let Some(t) = client.poll_transmit() {
            lane.sock.send_to(&t, server)?;
        }
        while let Some(e) = client.poll_event() {
            if let Event::Failed { code, reason, .. } = &e {
                bail!("server refused: {code} {reason}");
            }
            if done(&e) {
                if let Event::Allocated { relayed, .. } = e {
                    lane.relayed = relayed;
                }
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("no answer from the server");
        }
        if let Ok((n, _)) = lane.sock.recv_from(&mut buf) {
            client.handle_input(Instant::now(), &buf[..n]);
        }
        client.handle_timeout(Instant::now());
    }
}

fn new_lane(target: &Target, seed: u64, tos: u8) -> anyhow::Result<Lane> {
    let ipv6 = target.addr.is_ipv6();
    let sock = UdpSocket::bind(SocketAddr::new(target.addr.ip(), 0))?;
    sock.set_read_timeout(Some(Duration::from_millis(100)))?;
    let _ = socket2::SockRef::from(&sock).set_recv_buffer_size(1 << 20);
    if tos != 0 && ipv6 {
        socket2::SockRef::from(&sock).set_tclass_v6(u32::from(tos))?;
    } else if tos != 0 {
        socket2::SockRef::from(&sock).set_tos_v4(u32::from(tos))?;
    }
    let mut lane = Lane {
        sock,
        client: None,
        relayed: target.addr,
        framing: Framing::Raw,
    };
    if target.name != "forwarder" && target.name != "direct" {
        let mut c = Client::new(USER, PASS, false, seed);
        if ipv6 {
            c.allocate_ipv6(Instant::now());
        } else {
            c.allocate(Instant::now());
        }
        lane.client = Some(c);
        drive(&mut lane, target.addr, |e| {
            matches!(e, Event::Allocated { .. })
        })?;
    }
    Ok(lane)
}

/// Opens `lane` to `peer`: a channel, or only a permission when clients
/// send Send indications.
fn connect(
    lane: &mut Lane,
    target: &Target,
    peer: SocketAddr,
    send_indications: bool,
) -> anyhow::Result<()> {
    match lane.client.as_mut() {
        Some(c) if send_indications => {
            // With the port, as browsers ask for it.
            c.create_permission_for(Instant::now(), peer);
            lane.framing = Framing::Send(peer);
            drive(lane, target.addr, |e| {
                matches!(e, Event::PermissionCreated(_))
            })
        }
        Some(c) => {
            lane.framing = Framing::Channel(c.bind_channel(Instant::now(), peer));
            drive(lane, target.addr, |e| {
                matches!(e, Event::ChannelBound { .. })
            })
        }
        None => {
            lane.sock
                .send_to(format!("LANE {peer}").as_bytes(), target.addr)?;
            let mut buf = [0u8; 128];
            let (n, _) = lane
                .sock
                .recv_from(&mut buf)
                .context("forwarder did not answer")?;
            lane.relayed = std::str::from_utf8(&buf[..n])?.parse()?;
            Ok(())
        }
    }
}

/// Results of one run.
struct Outcome {
    alloc_per_sec: f64,
    sent: u64,
    received: u64,
    seconds: f64,
    relayed_per_rtt: u64,
    cpu: f64,
    /// The server's, the bench process's and the softirq threads' CPU over
    /// the measurement (see [`softirq_threads_cpu_seconds`]).
    total_cpu: f64,
    rtts_us: Vec<u32>,
    rss_mib: f64,
}

fn echo_peer(stop: Arc<AtomicBool>, ipv6: bool) -> anyhow::Result<SocketAddr> {
    // Not on 127.0.0.1, the servers' relay IP: a peer there is one of
    // their own relayed addresses as far as an address can tell, which
    // Callisto's kernel relay leaves to the workers for Send indications.
    // Over IPv6 loopback has no other address: there, Callisto's kernel
    // relay leaves Send indications to the peer to the workers.
    let std = UdpSocket::bind(if ipv6 { "[::1]:0" } else { "127.0.0.2:0" })?;
    std.set_nonblocking(true)?;
    let _ = socket2::SockRef::from(&std).set_recv_buffer_size(4 << 20);
    batch::receive_tos(&std, ipv6)?;
    let addr = std.local_addr()?;
    let mut sock = mio::net::UdpSocket::from_std(std);
    std::thread::spawn(move || -> io::Result<()> {
        let mut poll = Poll::new()?;
        poll.registry()
            .register(&mut sock, Token(0), Interest::READABLE)?;
        let mut events = Events::with_capacity(8);
        let mut rx: Box<RecvBatch> = Box::default();
        let mut tx = SendBatch::default();
        while !stop.load(Ordering::Relaxed) {
            poll.poll(&mut events, Some(Duration::from_millis(50)))?;
            loop {
                let n = match rx.recv(&sock, 0) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => continue,
                };
                let all = rx.slot_all();
                // With the TOS each came with (see --tos).
                tx.send_coalescing(
                    &sock,
                    (0..n).filter_map(|i| {
                        let data = &all[i * batch::SLOT..i * batch::SLOT + rx.lens[i]];
                        rx.addrs[i].map(|a| (a, rx.tos[i], data))
                    }),
                    false,
                );
            }
        }
        Ok(())
    });
    Ok(addr)
}

fn run_one(
    target: &Target,
    pattern: BenchPattern,
    n: usize,
    payload: usize,
    args: &BenchTurnArgs,
) -> anyhow::Result<Outcome> {
    let stop = Arc::new(AtomicBool::new(false));
    let peer = echo_peer(stop.clone(), args.ipv6)?;
    let direct = target.name == "direct";
    let t0 = Instant::now();
    let mut a: Vec<Lane> = Vec::with_capacity(n);
    let mut b: Vec<Lane> = Vec::new();
    for i in 0..n {
        a.push(new_lane(target, i as u64 * 2 + 1, args.tos)?);
        if pattern == BenchPattern::B {
            b.push(new_lane(target, i as u64 * 2 + 2, args.tos)?);
        }
    }
    let allocations = a.len() + b.len();
    let alloc_per_sec = allocations as f64 / t0.elapsed().as_secs_f64();
    match pattern {
        BenchPattern::A if direct => {
            for lane in &mut a {
                lane.relayed = peer;
            }
        }
        BenchPattern::A => {
            for lane in &mut a {
                connect(lane, target, peer, args.send_indications)?;
            }
        }
        BenchPattern::B => {
            for i in 0..n {
                let (ra, rb) = (a[i].relayed, b[i].relayed);
                connect(&mut a[i], target, rb, args.send_indications)?;
                connect(&mut b[i], target, ra, args.send_indications)?;
            }
        }
    }
    let relayed_per_rtt = match pattern {
        BenchPattern::A => 2,
        BenchPattern::B => 4,
    };

    let base = Instant::now();
    let sent = Arc::new(AtomicU64::new(0));
    let closed_loop = args.rate == 0;
    let duration = Duration::from_secs_f64(args.duration);
    let server = if direct { peer } else { target.addr };
    let a_framing: Vec<Framing> = a.iter().map(|l| l.framing).collect();
    let b_framing: Vec<Framing> = b.iter().map(|l| l.framing).collect();
    let a_socks: Vec<UdpSocket> = a
        .iter()
        .map(|l| l.sock.try_clone())
        .collect::<io::Result<_>>()?;
    let send_probe = move |sock: &UdpSocket, framing: Framing, seq: u64, buf: &mut Vec<u8>| {
        buf.clear();
        buf.extend_from_slice(&seq.to_le_bytes());
        buf.extend_from_slice(&(base.elapsed().as_nanos() as u64).to_le_bytes());
        buf.resize(payload.max(16), 0);
        framing.frame(buf);
        let _ = sock.send_to(buf, server);
    };

    let cpu_before = target.cpu_seconds();
    let others_before = own_cpu_seconds() + softirq_threads_cpu_seconds();
    let started = Instant::now();
    // Open loop: a pacing thread sends; closed loop: the receiver refills.
    let pacer = if closed_loop {
        None
    } else {
        let (socks, framing, sent, rate) = (
            a_socks
                .iter()
                .map(UdpSocket::try_clone)
                .collect::<io::Result<Vec<_>>>()?,
            a_framing.clone(),
            sent.clone(),
            args.rate,
        );
        Some(std::thread::spawn(move || {
            let mut buf = Vec::with_capacity(2048);
            let mut seq = 0u64;
            while started.elapsed() < duration {
                let due = (started.elapsed().as_secs_f64() * rate as f64) as u64;
                while seq < due {
                    let i = (seq % socks.len() as u64) as usize;
                    send_probe(&socks[i], framing[i], seq, &mut buf);
                    seq += 1;
                }
                std::thread::sleep(Duration::from_micros(100));
            }
            sent.store(seq, Ordering::Relaxed);
        }))
    };

    let mut poll = Poll::new()?;
    let mut mio_socks: Vec<mio::net::UdpSocket> = Vec::new();
    for lane in a.iter().chain(b.iter()) {
        let s = lane.sock.try_clone()?;
        s.set_nonblocking(true)?;
        mio_socks.push(mio::net::UdpSocket::from_std(s));
    }
    for (i, s) in mio_socks.iter_mut().enumerate() {
        poll.registry().register(s, Token(i), Interest::READABLE)?;
    }
    let mut events = Events::with_capacity(1024);
    let mut rx: Box<RecvBatch> = Box::default();
    let mut rtts: Vec<u32> = Vec::with_capacity(1 << 20);
    let mut received = 0u64;
    let mut buf = Vec::with_capacity(2048);
    let mut seq = 0u64;
    let mut in_flight: Vec<u64> = vec![0; n];
    let mut last_progress: Vec<Instant> = vec![Instant::now(); n];
    let mut echo: VecDeque<(usize, Vec<u8>)> = VecDeque::new();
    if closed_loop {
        for i in 0..n {
            for _ in 0..WINDOW {
                send_probe(&a_socks[i], a_framing[i], seq, &mut buf);
                seq += 1;
            }
            in_flight[i] = WINDOW;
        }
    }
    let drain_until = duration + Duration::from_millis(500);
    while started.elapsed() < drain_until {
        poll.poll(&mut events, Some(Duration::from_millis(20)))?;
        for ev in events.iter() {
            let idx = ev.token().0;
            loop {
                let count = match rx.recv(&mio_socks[idx], 0) {
                    Ok(c) => c,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => continue,
                };
                for k in 0..count {
                    let len = rx.lens[k];
                    let data = &rx.slot(k)[..len];
                    let framing = if idx < n {
                        a_framing[idx]
                    } else {
                        b_framing[idx - n]
                    };
                    let Some(body) = framing.unframe(data) else {
                        continue; // a STUN answer (to a Refresh, say)
                    };
                    if idx >= n {
                        // Pattern (b): the second client echoes to the first.
                        echo.push_back((idx - n, body.to_vec()));
                        continue;
                    }
                    if body.len() < 16 {
                        continue;
                    }
                    let sent_ns = u64::from_le_bytes(body[8..16].try_into().unwrap_or([0; 8]));
                    let rtt = base.elapsed().as_nanos() as u64 - sent_ns;
                    if started.elapsed() < duration {
                        rtts.push((rtt / 1000).min(u64::from(u32::MAX)) as u32);
                    }
                    received += 1;
                    if closed_loop {
                        last_progress[idx] = Instant::now();
                        if started.elapsed() < duration {
                            send_probe(&a_socks[idx], a_framing[idx], seq, &mut buf);
                            seq += 1;
                        } else {
                            in_flight[idx] = in_flight[idx].saturating_sub(1);
                        }
                    }
                }
                while let Some((i, body)) = echo.pop_front() {
                    buf.clear();
                    buf.extend_from_slice(&body);
                    b_framing[i].frame(&mut buf);
                    let _ = b[i].sock.send_to(&buf, server);
                }
            }
        }
        if closed_loop && started.elapsed() < duration {
            // A lost packet would shrink the window for good: top it up.
            for i in 0..n {
                if last_progress[i].elapsed() > Duration::from_millis(200) {
                    last_progress[i] = Instant::now();
                    send_probe(&a_socks[i], a_framing[i], seq, &mut buf);
                    seq += 1;
                }
            }
        }
    }
    let seconds = duration.as_secs_f64();
    let cpu = target.cpu_seconds() - cpu_before;
    let total_cpu = cpu + own_cpu_seconds() + softirq_threads_cpu_seconds() - others_before;
    stop.store(true, Ordering::Relaxed);
    if let Some(p) = pacer {
        let _ = p.join();
    }
    let sent = if closed_loop {
        seq
    } else {
        sent.load(Ordering::Relaxed)
    };
    // Release the allocations so the next run starts clean.
    for lane in a.iter_mut().chain(b.iter_mut()) {
        if let Some(c) = lane.client.as_mut() {
            c.refresh(Instant::now(), 0);
            while let Some(t) = c.poll_transmit() {
                let _ = lane.sock.send_to(&t, server);
            }
        }
    }
    Ok(Outcome {
        alloc_per_sec,
        sent,
        received,
        seconds,
        relayed_per_rtt,
        cpu,
        total_cpu,
        rtts_us: rtts,
        rss_mib: if direct { f64::NAN } else { target.rss_mib() },
    })
}

fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// One run's figures, in table order after the first four columns; NaN
/// where the generator cannot tell (printed as "–").
pub(super) type Figures = [f64; 9];

/// Runs one configuration once: its figures, or why it failed.
fn measure(
    target: &Target,
    pattern: BenchPattern,
    n: usize,
    payload: usize,
    args: &BenchTurnArgs,
) -> Result<Figures, String> {
    let mut o = run_one(target, pattern, n, payload, args).map_err(|e| format!("{e:#}"))?;
    o.rtts_us.sort_unstable();
    let rtt_rate = o.received as f64 / o.seconds;
    let relayed = (o.received * o.relayed_per_rtt).max(1) as f64;
    Ok([
        o.alloc_per_sec,
        rtt_rate,
        rtt_rate * o.relayed_per_rtt as f64,
        o.cpu * 1e6 / relayed,
        o.total_cpu * 1e6 / relayed,
        percentile(&o.rtts_us, 0.5) as f64,
        percentile(&o.rtts_us, 0.99) as f64,
        100.0 * o.sent.saturating_sub(o.received) as f64 / o.sent.max(1) as f64,
        o.rss_mib,
    ])
}

/// A table row: each figure the median of its runs, so one disturbed run
/// (this machine is shared with the generator) moves no column.
fn row(
    name: &str,
    pattern: &str,
    n: usize,
    payload: usize,
    runs: &[Result<Figures, String>],
) -> String {
    let ok: Vec<&Figures> = runs.iter().filter_map(|r| r.as_ref().ok()).collect();
    if ok.is_empty() {
        let why = runs
            .iter()
            .find_map(|r| r.as_ref().err())
            .map_or("no run", String::as_str);
        return format!("| {name} | {pattern} | {n} | {payload} | failed: {why} |");
    }
    let median = |i: usize, decimals: usize| {
        let mut v: Vec<f64> = ok.iter().map(|f| f[i]).collect();
        v.sort_by(f64::total_cmp);
        let m = v[v.len() / 2];
        if m.is_nan() {
            "–".to_string()
        } else {
            format!("{m:.decimals$}")
        }
    };
    format!(
        "| {name} | {pattern} | {n} | {payload} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
        median(0, 0),
        median(1, 0),
        median(2, 0),
        median(3, 2),
        median(4, 1),
        median(5, 0),
        median(6, 0),
        median(7, 3),
        median(8, 1),
    )
}

/// CPUs for the servers and for the generator under `--pin`.
///
/// The CPU count is read once: after the generator has pinned itself,
/// `available_parallelism` reports only the generator's CPUs, and a server
/// placed by that count would land on the generator's CPU (that happened:
/// the first "split" recordings ran everything on CPU 0).
fn pin_sets(pin: BenchPin) -> anyhow::Result<(usize, std::ops::Range<usize>)> {
    static CPUS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let cpus = *CPUS.get_or_init(|| std::thread::available_parallelism().map_or(1, usize::from));
    match pin {
        BenchPin::OneCpu => Ok((0, 0..1)),
        BenchPin::Split if cpus < 2 => {
            bail!("--pin split needs at least 2 CPUs, this machine has {cpus}")
        }
        BenchPin::Split => Ok((cpus - 1, 0..cpus - 1)),
    }
}

/// Restricts the calling thread (and the threads it starts later) to `cpus`.
#[cfg(target_os = "linux")]
fn set_affinity(cpus: std::ops::Range<usize>) -> io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET writes inside it
    // for the CPU numbers the kernel reported; sched_setaffinity only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for cpu in cpus {
            libc::CPU_SET(cpu, &mut set);
        }
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn set_affinity(_cpus: std::ops::Range<usize>) -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "--pin is Linux only",
    ))
}

/// Checks that every thread of process `pid` may run on CPU `cpu` only.
#[cfg(target_os = "linux")]
fn check_affinity(pid: u32, cpu: usize) -> anyhow::Result<()> {
    let want = cpu.to_string();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let status = std::fs::read_to_string(task?.path().join("status"))?;
        let allowed = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .map(str::trim)
            .context("no Cpus_allowed_list in /proc status")?;
        if allowed != want {
            bail!("a server thread may run on CPUs {allowed}, expected {want} only");
        }
    }
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn check_affinity(_pid: u32, _cpu: usize) -> anyhow::Result<()> {
    Ok(())
}

/// Whether this process may be in the machine's own network namespace:
/// not in one that `ip netns add` made (those are bind-mounted under
/// /run/netns), nor in one other than init's (pid 1's, when readable; in a
/// container it may not be).
fn in_initial_network_namespace() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(mine) = std::fs::metadata("/proc/self/ns/net") else {
        return true;
    };
    let same = |m: std::fs::Metadata| m.ino() == mine.ino() && m.dev() == mine.dev();
    let named = std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| std::fs::metadata(e.path()).is_ok_and(same));
    let not_inits = std::fs::metadata("/proc/1/ns/net").is_ok_and(|m| !same(m));
    !(named || not_inits)
}

/// A server process; under `--pin` it runs on the servers' CPU only.
fn server_command(
    program: impl AsRef<std::ffi::OsStr>,
    pin: Option<BenchPin>,
) -> anyhow::Result<Command> {
    let mut cmd = Command::new(program);
    #[cfg(unix)]
    if let Some(pin) = pin {
        use std::os::unix::process::CommandExt;
        let (server_cpu, _) = pin_sets(pin)?;
        // SAFETY: runs in the child between fork and exec and makes one
        // system call, which is async-signal-safe.
        unsafe {
            cmd.pre_exec(move || set_affinity(server_cpu..server_cpu + 1));
        }
    }
    #[cfg(not(unix))]
    let _ = pin;
    Ok(cmd)
}

/// Runs the whole matrix and prints a Markdown table.
pub fn run(mut args: BenchTurnArgs) -> anyhow::Result<()> {
    args.uclient_tcp |= args.uclient_tls;
    if args.servers.contains(&BenchTarget::CallistoKernel) && in_initial_network_namespace() {
        bail!(
            "`--servers callisto-kernel` attaches XDP to the loopback of the network namespace it runs in, \
             which here is the machine's own: run the bench in a namespace of its own \
             (ip netns add bench && ip -n bench link set lo up && ip netns exec bench ...)"
        );
    }
    if let Some(pin) = args.pin {
        let (_, generator) = pin_sets(pin)?;
        set_affinity(generator).context("pinning the load generator")?;
    }
    let uclient = args.generator == BenchGenerator::Uclient;
    if args.ipv6 && uclient {
        bail!("--ipv6 needs our generator (--generator ours)");
    }
    if args.uclient_tcp && !uclient {
        bail!(
            "--uclient-tcp and --uclient-tls need --generator uclient (our generator speaks UDP only)"
        );
    }
    let mode = if uclient {
        format!(
            "coturn's turnutils_uclient as the load ({} messages per client, 1 ms apart at most{})",
            args.uclient_messages,
            if args.uclient_tls {
                ", clients over TLS"
            } else if args.uclient_tcp {
                ", clients over TCP"
            } else {
                ""
            }
        )
    } else if args.rate == 0 {
        format!("closed loop, {WINDOW} packets in flight per allocation")
    } else {
        format!("open loop, {} round trips/s offered", args.rate)
    };
    let length = if uclient {
        String::new()
    } else {
        format!("{} s per run, ", args.duration)
    };
    println!(
        "callisto bench turn: {mode}, {length}median of {} alternating runs, {} server thread(s), loopback{}{}\n",
        args.repeat,
        args.threads,
        match args.pin {
            Some(BenchPin::Split) =>
                ", servers pinned to the last CPU and the generator to the others",
            Some(BenchPin::OneCpu) => ", servers and generator all pinned to the first CPU",
            None => "",
        },
        if args.ipv6 { " (IPv6, ::1)" } else { "" }
    );
    println!(
        "| server | pattern | {} | payload B | alloc/s | round trips/s | relayed pkt/s | server CPU µs/pkt | total CPU µs/pkt | p50 RTT µs | p99 RTT µs | loss % | RSS MiB |",
        if uclient {
            "uclient clients"
        } else {
            "allocations"
        }
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    // Servers take turns on each configuration, `--repeat` times, so slow
    // drifts of this machine hit them all alike; each figure is the median
    // of its runs.
    for &pattern in &args.patterns {
        for &n in &args.allocations {
            for &payload in &args.payloads {
                let mut runs: Vec<Vec<Result<Figures, String>>> =
                    vec![Vec::new(); args.servers.len()];
                for _ in 0..args.repeat.max(1) {
                    for (index, &which) in args.servers.iter().enumerate() {
                        if matches!(
                            which,
                            BenchTarget::TurnRs | BenchTarget::Forwarder | BenchTarget::Direct
                        ) && pattern != preferred(which)
                        {
                            continue;
                        }
                        if uclient && matches!(which, BenchTarget::Forwarder | BenchTarget::Direct)
                        {
                            continue; // they speak no TURN
                        }
                        if args.uclient_tcp && which == BenchTarget::TurnRs {
                            continue;
                        }
                        // A fresh server per run: no state carried over.
                        let target = start_target(which, &args, index)?;
                        runs[index].push(if uclient {
                            super::uclient::measure(&target, pattern, n, payload, &args)
                        } else {
                            measure(&target, pattern, n, payload, &args)
                        });
                    }
                }
                let label = if args.send_indications {
                    format!("{}, Send/Data", pattern.label())
                } else {
                    pattern.label().to_string()
                };
                for (index, runs) in runs.iter().enumerate() {
                    if !runs.is_empty() {
                        println!(
                            "{}",
                            row(target_name(args.servers[index]), &label, n, payload, runs)
                        );
                        let _ = io::stdout().flush();
                    }
                }
            }
        }
    }
    Ok(())
}

fn target_name(which: BenchTarget) -> &'static str {
    match which {
        BenchTarget::Callisto => "callisto",
        BenchTarget::CallistoKernel => "callisto-kernel",
        BenchTarget::Direct => "direct",
        BenchTarget::Coturn => "coturn",
        BenchTarget::TurnRs => "turn-rs",
        BenchTarget::Forwarder => "forwarder",
    }
}

/// turn-rs relays only between its own allocations, and the forwarder only
/// to an external peer: each runs the one pattern it supports. Direct runs
/// (a) only: its two ends do per round trip what (b)'s two clients do.
fn preferred(which: BenchTarget) -> BenchPattern {
    match which {
        BenchTarget::TurnRs => BenchPattern::B,
        _ => BenchPattern::A,
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn pinning_the_generator_does_not_move_the_servers_onto_its_cpus() {
        std::thread::spawn(|| {
            let Ok((server, generator)) = pin_sets(BenchPin::Split) else {
                return; // one CPU: --pin split refuses to run, nothing to check
            };
            set_affinity(generator.clone()).unwrap();
            let (server_after, generator_after) = pin_sets(BenchPin::Split).unwrap();
            assert_eq!((server_after, generator_after.clone()), (server, generator));
            assert!(!generator_after.contains(&server_after));
            // A child started the way servers are lands on the server CPU.
            let mut child = server_command("sleep", Some(BenchPin::Split))
                .unwrap()
                .arg("2")
                .spawn()
                .unwrap();
            let checked = check_affinity(child.id(), server);
            let _ = child.kill();
            let _ = child.wait();
            checked.unwrap();
        })
        .join()
        .unwrap();
    }

    /// The CPU-time clock and `/proc/PID/stat` measure the same thing, the
    /// clock to the nanosecond.
    #[test]
    fn server_cpu_is_read_from_the_process_cpu_clock() {
        // A busy loop that ends by itself (a few seconds) should the test
        // fail before killing it.
        let mut child = Command::new("sh")
            .args(["-c", "i=0; while [ $i -lt 5000000 ]; do i=$((i+1)); done"])
            .spawn()
            .unwrap();
        let busy = child.id();
        std::thread::sleep(Duration::from_millis(500));
        let fine = proc_cpu_seconds(busy).unwrap();
        let coarse = proc_stat_cpu_seconds(busy).unwrap();
        let _ = child.kill();
        let _ = child.wait();
        assert!(fine > 0.05, "the busy shell ran: {fine} s");
        assert!(
            fine.fract() != 0.0 && (fine * 100.0).fract() != 0.0,
            "finer than ticks: {fine}"
        );
        assert!(
            (fine - coarse).abs() < 0.05,
            "clock {fine} s, /proc {coarse} s"
        );
    }
}
