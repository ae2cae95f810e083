//! Under systemd (`Type=notify`, `WatchdogSec=`): the binary says READY=1
//! once every port is served, pings the watchdog, and says STOPPING=1 at
//! SIGTERM. The notifications go to a socket of the test's own, as they
//! would to systemd's.

mod common;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::TempDir;

const BIN: &str = env!("CARGO_BIN_EXE_callisto");

/// The next notification, waited for up to 10 s.
fn next(sock: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).expect("a notification within 10 s");
    String::from_utf8(buf[..n].to_vec()).unwrap()
}

#[test]
fn tells_systemd_it_is_ready_feeds_the_watchdog_and_says_it_stops() {
    let dir = TempDir::new("systemd");
    let path = dir.0.join("notify");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(["--turn-listen", "127.0.0.1:0", "--log-format", "json"])
        .env("NOTIFY_SOCKET", &path)
        .env("WATCHDOG_USEC", "400000")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });

    let ready = next(&sock);
    assert_eq!(ready, "READY=1\nSTATUS=serving\n");
    // Ready means serving: the port answers. (The start line was written
    // before READY=1, but the thread reading stderr may pass it on later
    // than the socket delivers READY=1, so it is waited for.)
    let url = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the start line");
        let url = serde_json::from_str::<serde_json::Value>(&line)
            .ok()
            .and_then(|v| Some(v["url"].as_str()?.to_owned()));
        if let Some(url) = url {
            break url;
        }
    };
    let addr: SocketAddr = url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .unwrap();
    TcpStream::connect(addr).expect("the web port is open");

    // Half the watchdog period apart: two pings in well under a second,
    // and nothing else while all is well.
    let started = Instant::now();
    for _ in 0..2 {
        assert_eq!(next(&sock), "WATCHDOG=1\n");
    }
    assert!(started.elapsed() < Duration::from_secs(5));

    // SAFETY: kill has no memory effects; the pid is our child's.
    let rc = unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(rc, 0);
    let stopping = loop {
        let n = next(&sock);
        if n != "WATCHDOG=1\n" {
            break n;
        }
    };
    assert_eq!(stopping, "STOPPING=1\n");
    assert!(child.wait().unwrap().success());
}
