//! Callisto behind a real nginx, configured by contrib/nginx-site.conf, with
//! clients on distinct loopback addresses: each is told apart and held to
//! its own share, what a client says about itself is not believed, and
//! the site's pages may open WebSockets through it while others' may not.
//!
//! Needs the Debian package nginx (scripts/test.sh installs it).

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Client, Logs, Server, TIMEOUT, TempDir};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;

/// nginx, as a reverse proxy in front of `upstream`; killed when dropped.
struct Nginx {
    child: Child,
    addr: SocketAddr,
    _dir: TempDir,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The site configuration operators are given, and docs/operators.md shows.
const SITE: &str = include_str!("../../../contrib/nginx-site.conf");

/// [`SITE`], listening on `addr` without TLS and passing to `upstream`.
fn site_for_test(addr: SocketAddr, upstream: SocketAddr) -> String {
    let mut site = SITE.to_owned();
    for (from, to) in [
        ("listen 443 ssl;", format!("listen {addr};")),
        ("http://127.0.0.1:8080;", format!("http://{upstream};")),
    ] {
        assert!(
            site.contains(from),
            "contrib/nginx-site.conf has no {from:?}"
        );
        site = site.replace(from, &to);
    }
    let lines = site.lines().count();
    let site: String = site
        .lines()
        .filter(|l| !l.trim_start().starts_with("ssl_certificate"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(site.lines().count(), lines - 2, "the two certificate lines");
    site
}

#[test]
fn the_operators_guide_shows_the_tested_site_configuration() {
    let guide = include_str!("../../../docs/operators.md");
    assert!(
        guide.contains(&format!("```\n{SITE}```")),
        "docs/operators.md must show contrib/nginx-site.conf as it is"
    );
}

impl Nginx {
    /// nginx in front of `upstream`, on a free port of its own. nginx cannot
    /// be given a listening socket, only a port: one found free may be taken
    /// by another test before nginx binds it, so a start that fails is tried
    /// again on another port.
    async fn start(upstream: SocketAddr) -> Nginx {
        for _ in 0..5 {
            if let Some(nginx) = Nginx::try_start(upstream).await {
                return nginx;
            }
        }
        panic!("nginx did not start on any of 5 free ports");
    }

    async fn try_start(upstream: SocketAddr) -> Option<Nginx> {
        let path = "/usr/sbin/nginx";
        assert!(
            std::path::Path::new(path).exists(),
            "{path} is missing: install the Debian package nginx (bash scripts/test.sh does)"
        );
        let dir = TempDir::new("nginx");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let d = dir.0.display();
        let conf = format!(
            r#"
daemon off;
master_process off;
worker_processes 1;
# Ignored unless run as root, which otherwise would hand the work to nobody.
user root;
error_log stderr warn;
pid {d}/nginx.pid;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
{site}
}}
"#,
            site = site_for_test(addr, upstream),
        );
        let conf_path = dir.0.join("nginx.conf");
        std::fs::File::create(&conf_path)
            .unwrap()
            .write_all(conf.as_bytes())
            .unwrap();
        let child = Command::new(path)
            .args(["-e", "stderr", "-p"])
            .arg(&dir.0)
            .arg("-c")
            .arg(&conf_path)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut nginx = Nginx {
            child,
            addr,
            _dir: dir,
        };
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(status) = nginx.child.try_wait().unwrap() {
                eprintln!("nginx exited ({status}) on {addr}: trying another port");
                return None;
            }
            match server_header(addr).await {
                Some(server) if server.starts_with("nginx") => return Some(nginx),
                // Another test's server took the port first.
                Some(server) => {
                    eprintln!("{addr} is {server:?}'s, not nginx's: trying another port");
                    return None;
                }
                None => {}
            }
            assert!(Instant::now() < deadline, "nginx did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The `Server` header of the answer to a plain GET to `addr` (empty if it
/// has none), or None if nothing answers there yet.
async fn server_header(addr: SocketAddr) -> Option<String> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    stream
        .write_all(b"GET / HTTP/1.0\r\nHost: test\r\n\r\n")
        .await
        .ok()?;
    let mut answer = Vec::new();
    tokio::time::timeout(TIMEOUT, stream.read_to_end(&mut answer))
        .await
        .ok()?
        .ok()?;
    let answer = String::from_utf8_lossy(&answer);
    let head = answer.split("\r\n\r\n").next()?;
    Some(
        head.lines()
            .find_map(|l| l.strip_prefix("Server: ").or(l.strip_prefix("server: ")))
            .unwrap_or("")
            .to_owned(),
    )
}

/// A WebSocket to `to` from the loopback address `source`, with these
/// headers added; the HTTP status if refused.
async fn websocket_from(
    source: &str,
    to: SocketAddr,
    headers: &[(&str, &str)],
) -> Result<Client, u16> {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(source.parse().unwrap(), 0))
        .unwrap();
    let tcp = socket.connect(to).await.unwrap();
    Client::handshake(tcp, &format!("ws://{to}/ws"), headers).await
}

#[tokio::test]
async fn behind_nginx_each_client_is_told_apart_and_held_to_its_share() {
    let (logs, _logging) = Logs::capture();

    // The clients are on loopback too, so only nginx's address is trusted.
    let server = Server::start(&[
        "--trusted-proxy",
        "127.0.0.1",
        "--max-connections-per-ip",
        "2",
    ])
    .await;
    let nginx = Nginx::start(server.addr).await;

    // Two pages from one address; the second claims to be someone else,
    // which nginx passes on, left of the address it saw.
    let mut a1 = websocket_from("127.0.0.2", nginx.addr, &[]).await.unwrap();
    a1.join("proxied", "A1").await;
    let mut a2 = websocket_from(
        "127.0.0.2",
        nginx.addr,
        &[("x-forwarded-for", "198.51.100.9")],
    )
    .await
    .unwrap();
    a2.join("proxied", "A2").await;
    // A third from that address is over its share, and is told so.
    assert_eq!(
        websocket_from(
            "127.0.0.2",
            nginx.addr,
            &[("x-forwarded-for", "198.51.100.10")]
        )
        .await
        .err(),
        Some(429)
    );
    // Another address has its own share, though all come from nginx.
    let mut b = websocket_from("127.0.0.3", nginx.addr, &[]).await.unwrap();
    b.join("proxied", "B").await;
    let mut b2 = websocket_from("127.0.0.3", nginx.addr, &[]).await.unwrap();
    b2.ping().await;

    // A page of the site nginx serves may connect, though nginx passes
    // the host on without its port; another site's page may not.
    let site = format!("http://{}", nginx.addr);
    let mut page = websocket_from("127.0.0.5", nginx.addr, &[("origin", &site)])
        .await
        .unwrap();
    page.ping().await;
    let foreign = [("origin", "https://elsewhere.example")];
    assert_eq!(
        websocket_from("127.0.0.5", nginx.addr, &foreign)
            .await
            .err(),
        Some(403)
    );
    let (_, metrics) = server.get("/metrics").await;
    assert!(
        metrics.contains("callisto_http_connections_refused_total{reason=\"per_source\"} 1"),
        "{metrics}"
    );

    // Straight to the server, a claimed address means nothing.
    let mut direct = websocket_from(
        "127.0.0.4",
        server.addr,
        &[("x-forwarded-for", "198.51.100.11")],
    )
    .await
    .unwrap();
    direct.join("proxied", "D").await;

    let text = logs.text();
    let joined: Vec<&str> = text.lines().filter(|l| l.contains("joined")).collect();
    assert_eq!(joined.len(), 4, "{text}");
    assert_eq!(
        joined
            .iter()
            .filter(|l| l.contains("remote=127.0.0.2 (via 127.0.0.1:"))
            .count(),
        2,
        "{text}"
    );
    assert!(
        joined[2].contains("remote=127.0.0.3 (via 127.0.0.1:"),
        "{text}"
    );
    assert!(joined[3].contains("remote=127.0.0.4:"), "{text}");
    assert!(
        !text.contains("198.51.100."),
        "a claimed address was believed: {text}"
    );
    assert!(
        text.contains("turned proxied WebSocket connections away"),
        "{text}"
    );
    let refused = text
        .lines()
        .find(|l| l.contains("refused a WebSocket from another site's page"))
        .unwrap_or_else(|| panic!("no refusal logged: {text}"));
    assert!(
        refused.contains("remote=127.0.0.5 (via 127.0.0.1:")
            && refused.contains("origin=https://elsewhere.example"),
        "{refused}"
    );

    // A page that leaves gives its place back.
    drop(a1);
    let deadline = Instant::now() + TIMEOUT;
    let mut again = loop {
        match websocket_from("127.0.0.2", nginx.addr, &[]).await {
            Ok(client) => break client,
            Err(429) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(status) => panic!("no place came back: {status}"),
        }
    };
    again.ping().await;
    drop(nginx);
}
