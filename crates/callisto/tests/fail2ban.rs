//! contrib/fail2ban's filter, run by fail2ban's own `fail2ban-regex` over
//! what `callisto turn` logged, in both log formats, over IPv4 and IPv6,
//! as written to a file and behind a syslog prefix: it finds every wrong
//! password and unknown user with the client's address, and nothing else
//! (not an expired credential, not a client that got in); likewise what
//! `callisto serve` logged of joins refused for want of an access code.
//! And the jail beside them passes fail2ban's own configuration test.
//!
//! Needs the Debian package fail2ban (scripts/test.sh installs it).

mod common;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use callisto_turn::client::{Client, Event};
use common::TempDir;

const BIN: &str = env!("CARGO_BIN_EXE_callisto");
const FILTER: &str = include_str!("../../../contrib/fail2ban/filter.d/callisto-turn.conf");
const ACCESS_FILTER: &str = include_str!("../../../contrib/fail2ban/filter.d/callisto-access.conf");
const JAIL: &str = include_str!("../../../contrib/fail2ban/jail.d/callisto.conf");
const FAIL2BAN_REGEX: &str = "/usr/bin/fail2ban-regex";
const FAIL2BAN_CLIENT: &str = "/usr/bin/fail2ban-client";
/// fail2ban's own definitions, which the filter includes.
const COMMON: &str = "/etc/fail2ban/filter.d/common.conf";

fn fail2ban_installed() {
    assert!(
        [FAIL2BAN_REGEX, FAIL2BAN_CLIENT, COMMON]
            .iter()
            .all(|p| Path::new(p).exists()),
        "fail2ban is missing: install the Debian package fail2ban (bash scripts/test.sh does)"
    );
}

/// Runs our TURN client from `from` against `server` until it allocates
/// or fails; true if it allocated.
fn allocate(from: &UdpSocket, server: SocketAddr, username: &str, password: &str) -> bool {
    let mut client = Client::new(username, password, false, 7);
    client.allocate(Instant::now());
    let mut buf = [0u8; 2048];
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        while let Some(t) = client.poll_transmit() {
            from.send_to(&t, server).unwrap();
        }
        if let Ok(n) = from.recv(&mut buf) {
            client.handle_input(Instant::now(), &buf[..n]);
        }
        while let Some(e) = client.poll_event() {
            match e {
                Event::Allocated { .. } => return true,
                Event::Failed { .. } => return false,
                _ => {}
            }
        }
    }
    panic!("no answer from the server");
}

/// The addresses and log formats each filter is tried with.
const LISTENS: [(&str, &str); 4] = [
    ("127.0.0.1", "text"),
    ("127.0.0.1", "json"),
    ("::1", "text"),
    ("::1", "json"),
];

/// `callisto ARGS`, its log read until `find` finds what it looks for in a
/// line (an address the server listens on, say).
struct Logging<T> {
    child: std::process::Child,
    lines: std::io::Lines<BufReader<std::process::ChildStderr>>,
    log: Vec<String>,
    found: T,
}

impl<T> Logging<T> {
    fn start(args: &[&str], find: impl Fn(&str) -> Option<T>) -> Logging<T> {
        let mut child = Command::new(BIN)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut log = Vec::new();
        let found = loop {
            let line = lines.next().expect("callisto starts").unwrap();
            let found = find(&line);
            log.push(line);
            if let Some(found) = found {
                break found;
            }
        };
        Logging {
            child,
            lines,
            log,
            found,
        }
    }

    /// Stops the server and returns all it logged. Each line is written
    /// before its answer is sent: all are in the pipe.
    fn stop(mut self) -> Vec<String> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.log.extend(self.lines.map_while(Result::ok));
        self.log
    }
}

/// What `callisto turn`, listening on `ip` and logging in `format`, logs
/// while a client gets a wrong password, an unknown user and an expired
/// credential refused, then allocates.
fn logged(ip: &str, format: &str) -> Vec<String> {
    let listen = SocketAddr::new(ip.parse().unwrap(), 0).to_string();
    // The port, from the start line (`udp=…` or `"udp":"…"`).
    let logging = Logging::start(
        &[
            "turn",
            "--turn-listen",
            &listen,
            "--turn-user",
            "user:pass",
            "--turn-secret",
            "s3cret",
            "--log-format",
            format,
        ],
        |line| {
            line.split(['=', '"', ' '])
                .skip_while(|w| *w != "udp")
                .find_map(|w| w.parse::<SocketAddr>().ok())
                .map(|a| a.port())
        },
    );
    let server = SocketAddr::new(ip.parse().unwrap(), logging.found);
    let from = UdpSocket::bind(SocketAddr::new(server.ip(), 0)).unwrap();
    from.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    assert!(!allocate(&from, server, "user", "wrong"));
    assert!(!allocate(&from, server, "mallory", "guess"));
    assert!(!allocate(&from, server, "1:alice", "old"), "expired");
    assert!(allocate(&from, server, "user", "pass"));
    logging.stop()
}

/// The addresses `fail2ban-regex` finds in `lines` with the filter
/// `filter` in `dir`, one per match.
fn matched(dir: &Path, filter: &str, name: &str, lines: &[String]) -> Vec<String> {
    let log = dir.join(name);
    std::fs::write(&log, lines.join("\n") + "\n").unwrap();
    let out = Command::new(FAIL2BAN_REGEX)
        .args(["-o", "ip"])
        .arg(&log)
        .arg(dir.join("filter.d").join(filter))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "fail2ban-regex failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// A directory with `filter` (as `filter.d/NAME`) and fail2ban's
/// definitions it includes.
fn filter_dir(what: &str, name: &str, filter: &str) -> TempDir {
    let dir = TempDir::new(what);
    std::fs::create_dir_all(dir.0.join("filter.d")).unwrap();
    std::fs::write(dir.0.join("filter.d").join(name), filter).unwrap();
    std::fs::copy(COMMON, dir.0.join("filter.d/common.conf")).unwrap();
    dir
}

/// That the filter `name` in `dir` finds `ip` `count` times in `lines`,
/// as written to a file and behind a syslog prefix.
fn assert_found(
    dir: &Path,
    name: &str,
    (ip, format): (&str, &str),
    lines: &[String],
    count: usize,
) {
    let syslog: Vec<String> = lines
        .iter()
        .map(|l| format!("Nov 27 13:27:48 testhost callisto[4242]: {l}"))
        .collect();
    for (kind, lines) in [("plain", lines), ("syslog", &syslog[..])] {
        let found = matched(dir, name, &format!("{name}-{format}-{kind}.log"), lines);
        assert_eq!(
            found,
            vec![ip.to_owned(); count],
            "{name}: {ip}, {format}, {kind}: each failure, none of the rest, in\n{}",
            lines.join("\n")
        );
    }
}

#[test]
fn the_fail2ban_filter_finds_each_guess_and_whose_it_was() {
    fail2ban_installed();
    let dir = filter_dir("fail2ban-filter", "callisto-turn.conf", FILTER);

    for (ip, format) in LISTENS {
        let lines = logged(ip, format);
        let failed = |reason: &str| {
            lines
                .iter()
                .filter(|l| l.contains("TURN authentication failed") && l.contains(reason))
                .count()
        };
        let guesses = failed("bad-integrity") + failed("unknown-user");
        assert!(failed("bad-integrity") > 0, "{format}: {lines:#?}");
        assert!(failed("unknown-user") > 0, "{format}: {lines:#?}");
        assert!(failed("expired") > 0, "{format}: {lines:#?}");
        assert!(
            lines.iter().any(|l| l.contains("allocation created")),
            "{format}: {lines:#?}"
        );
        assert_found(&dir.0, "callisto-turn.conf", (ip, format), &lines, guesses);
    }
}

/// The jail, in a copy of this machine's fail2ban configuration with no
/// other jail: fail2ban's configuration test passes, and the jail reads
/// the journal of contrib/callisto.service's unit and bans UDP and TCP on
/// every port.
#[test]
fn the_jail_passes_fail2bans_configuration_test() {
    fail2ban_installed();
    let dir = TempDir::new("fail2ban-jail");
    let copied = Command::new("cp")
        .args(["-r", "/etc/fail2ban/."])
        .arg(&dir.0)
        .status()
        .unwrap();
    assert!(copied.success());
    // Debian's own jails (sshd) want log files this machine may not have.
    std::fs::remove_dir_all(dir.0.join("jail.d")).unwrap();
    std::fs::create_dir(dir.0.join("jail.d")).unwrap();
    std::fs::write(dir.0.join("jail.d/callisto.conf"), JAIL).unwrap();
    std::fs::write(dir.0.join("filter.d/callisto-turn.conf"), FILTER).unwrap();
    std::fs::write(dir.0.join("filter.d/callisto-access.conf"), ACCESS_FILTER).unwrap();
    let client = |flag: &str| {
        let out = Command::new(FAIL2BAN_CLIENT)
            .arg("-c")
            .arg(&dir.0)
            .arg(flag)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "fail2ban-client {flag}: {text}");
        text
    };
    let tested = client("-t");
    assert!(
        tested.contains("OK: configuration test is successful"),
        "{tested}"
    );
    let dump = client("-d");
    let unit = include_str!("../../../contrib/callisto.service");
    assert!(
        unit.contains("ExecStart="),
        "contrib/callisto.service is the unit"
    );
    for needle in [
        "['add', 'callisto-turn', 'systemd']",
        "['set', 'callisto-turn', 'addjournalmatch', '_SYSTEMD_UNIT=callisto.service']",
        "['set', 'callisto-turn', 'maxretry', 10]",
        "['add', 'callisto-access', 'systemd']",
        "['set', 'callisto-access', 'addjournalmatch', '_SYSTEMD_UNIT=callisto.service']",
        "['set', 'callisto-access', 'maxretry', 10]",
        "['port', '0:65535']",
        "['protocol', 'tcp,udp']",
    ] {
        assert!(dump.contains(needle), "no {needle} in\n{dump}");
    }
}

/// What `callisto serve`, listening on `ip` with access codes and logging
/// in `format`, logs while a client joins with no code, then a wrong one,
/// then the right one.
fn logged_joins(ip: &str, format: &str, codes: &Path) -> Vec<String> {
    let listen = SocketAddr::new(ip.parse().unwrap(), 0).to_string();
    let codes = codes.to_str().unwrap();
    // The URL, from the "serving" line (`url=…` or `"url":"…"`).
    let logging = Logging::start(
        &[
            "serve",
            "--no-turn",
            "--listen",
            &listen,
            "--access-codes-file",
            codes,
            "--log-format",
            format,
        ],
        |line| {
            line.split(['=', '"', ' '])
                .find(|w| w.starts_with("http://"))
                .map(str::to_owned)
        },
    );
    let url = &logging.found;
    let ws = format!(
        "ws{}/ws",
        url.trim_start_matches("http").trim_end_matches('/')
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut client = common::Client::connect(&ws).await;
        for access in [None, Some("a-wrong-code-of-the-team")] {
            let mut join = serde_json::json!({"type": "join", "room": "standup", "name": "M"});
            if let Some(code) = access {
                join["access"] = code.into();
            }
            client.send(join).await;
            client.expect_error("access-denied").await;
        }
        client
            .send(serde_json::json!({"type": "join", "room": "standup", "name": "M", "access": "the-code-of-the-team"}))
            .await;
        client.expect("welcome").await;
    });
    logging.stop()
}

#[test]
fn the_access_filter_finds_each_refused_join_and_whose_it_was() {
    fail2ban_installed();
    let dir = filter_dir("fail2ban-access", "callisto-access.conf", ACCESS_FILTER);
    let codes = dir.0.join("codes");
    std::fs::write(&codes, "the-code-of-the-team\n").unwrap();

    for (ip, format) in LISTENS {
        let lines = logged_joins(ip, format, &codes);
        let refused = lines.iter().filter(|l| l.contains("join refused")).count();
        assert_eq!(refused, 2, "{format}: {lines:#?}");
        assert!(
            lines.iter().any(|l| l.contains("joined")),
            "{format}: {lines:#?}"
        );
        assert_found(&dir.0, "callisto-access.conf", (ip, format), &lines, 2);
    }
}
