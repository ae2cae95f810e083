//! The HTTP side: the embedded app, health, metrics and security headers.

mod common;

use std::time::{Duration, Instant};

use common::Server;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn serves_the_app_with_security_headers() {
    let server = Server::start(&[]).await;
    for path in ["/", "/r/team-standup"] {
        let (head, body) = server.get(path).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{path}: {head}");
        let lower = head.to_ascii_lowercase();
        assert!(lower.contains("content-type: text/html"), "{head}");
        assert!(
            lower.contains("content-security-policy: default-src 'self'; script-src 'self';"),
            "{head}"
        );
        assert!(lower.contains("x-content-type-options: nosniff"), "{head}");
        assert!(
            body.contains("<script type=\"module\" src=\"/js/app.js\">"),
            "{body}"
        );
    }
    let (head, body) = server.get("/js/app.js").await;
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/javascript"),
        "{head}"
    );
    assert!(body.contains("import"), "app.js is an ES module");
    let (head, _) = server.get("/js/../../Cargo.toml").await;
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    let (head, _) = server.get("/nope").await;
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
}

/// The app's files carry an ETag, the hash of what this binary serves: a
/// browser that has a file gets 304 and no body, one with another version
/// gets the file.
#[tokio::test]
async fn the_app_is_revalidated_by_its_etag() {
    let server = Server::start(&[]).await;
    let etag_of = |head: &str| {
        head.lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .starts_with("etag:")
                    .then(|| l[5..].trim().to_owned())
            })
            .unwrap_or_else(|| panic!("no ETag in {head}"))
    };
    let mut tags = Vec::new();
    for path in ["/", "/r/standup", "/js/app.js", "/css/app.css"] {
        let (head, body) = server.get(path).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{path}: {head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("cache-control: no-cache")
        );
        let tag = etag_of(&head);

        let has_it = format!("If-None-Match: {tag}\r\n");
        let (again, rest) = common::get_with(server.addr, path, &has_it).await;
        assert!(again.starts_with("HTTP/1.1 304"), "{path}: {again}");
        assert_eq!(etag_of(&again), tag);
        assert!(rest.is_empty(), "{path}: no body with 304");

        let older = "If-None-Match: \"0123456789abcdef\", W/\"x\"\r\n";
        let (fresh, same) = common::get_with(server.addr, path, older).await;
        assert!(fresh.starts_with("HTTP/1.1 200"), "{path}: {fresh}");
        assert_eq!(same, body);
        tags.push(tag);
    }
    assert_eq!(tags[0], tags[1], "every room serves the one page");
    assert_ne!(tags[0], tags[2]);
    assert_ne!(tags[2], tags[3]);
}

#[tokio::test]
async fn healthz_and_metrics() {
    let server = Server::start(&[]).await;
    let (head, body) = server.get("/healthz").await;
    assert!(head.starts_with("HTTP/1.1 200"));
    assert_eq!(body, "ok\n");

    let mut c = server.client().await;
    c.join("metrics-room", "M").await;
    c.send(json!({"type": "join", "room": "other", "name": "M"}))
        .await;
    c.expect_error("already-joined").await;
    c.send_text("garbage").await;
    c.expect_error("bad-message").await;

    let (head, body) = server.get("/metrics").await;
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain"),
        "{head}"
    );
    for needle in [
        "callisto_signaling_messages_received_total{type=\"join\"}",
        "callisto_signaling_messages_sent_total{type=\"welcome\"}",
        "callisto_signaling_errors_total{code=\"already-joined\"}",
        "callisto_signaling_errors_total{code=\"bad-message\"}",
        "callisto_signaling_connections",
        "# TYPE callisto_room_size histogram",
        "callisto_rooms ",
        "callisto_clients ",
        format!(
            "callisto_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )
        .as_str(),
    ] {
        assert!(body.contains(needle), "missing {needle} in\n{body}");
    }
    assert!(server.metric("callisto_rooms").await >= 1.0);
}

/// With `--metrics-listen`, `/metrics` (the hub's gauges too) is served
/// there only: not on the web port, where anyone who loads the app could
/// read it.
#[tokio::test]
async fn metrics_on_a_port_of_their_own() {
    let server = Server::start(&["--metrics-listen", "127.0.0.1:0"]).await;
    let metrics = server.running.metrics_addr.expect("a metrics port");
    let mut c = server.client().await;
    c.join("counted", "M").await;

    let (head, _) = server.get("/metrics").await;
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    let (head, body) = common::get_at(metrics, "/metrics").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    for needle in [
        "callisto_signaling_messages_sent_total{type=\"welcome\"}",
        "callisto_signaling_queued_bytes ",
        "callisto_rooms ",
        "callisto_clients ",
        format!(
            "callisto_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )
        .as_str(),
    ] {
        assert!(body.contains(needle), "missing {needle} in\n{body}");
    }
    let (head, body) = common::get_at(metrics, "/healthz").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, "ok\n");

    // It stops with the server.
    server.shutdown.cancel();
    server.running.wait().await;
    assert!(TcpStream::connect(metrics).await.is_err());
}

/// A TCP connection from `source` (a loopback address), or the error when
/// the server reset it before `connect` returned.
async fn connect_from(source: &str, to: std::net::SocketAddr) -> std::io::Result<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(std::net::SocketAddr::new(source.parse().unwrap(), 0))?;
    socket.connect(to).await
}

/// Whether the server answers `GET /healthz` on `tcp`.
async fn healthy(mut tcp: TcpStream) -> bool {
    let req = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    if tcp.write_all(req).await.is_err() {
        return false;
    }
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(common::TIMEOUT, tcp.read_to_end(&mut buf)).await;
    String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 200")
}

/// Whether the server closes `tcp`, silent on our side, within `within`.
async fn closed_within(tcp: &mut TcpStream, within: Duration) -> bool {
    let mut byte = [0u8; 1];
    matches!(
        tokio::time::timeout(within, tcp.read(&mut byte)).await,
        Ok(Ok(0) | Err(_))
    )
}

/// One address gets `--max-connections-per-ip` connections and no more,
/// while others are still served; a connection that says nothing is closed
/// after twice the heartbeat timeout, which gives its place back, and a
/// WebSocket client that keeps talking stays.
#[tokio::test]
async fn connections_are_limited_per_address_and_silent_ones_closed() {
    // The test's clients are on loopback, trusted as proxies by default.
    let server = Server::start(&[
        "--max-connections-per-ip",
        "4",
        "--heartbeat-timeout",
        "1",
        "--trusted-proxy",
        "127.0.0.1",
    ])
    .await;
    // A WebSocket client that keeps talking, for 3 s (past the 2 s).
    let mut ws = server.client().await;
    ws.join("limits", "L").await;
    let talking = tokio::spawn(async move {
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(3) {
            ws.ping().await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        ws.ping().await;
    });

    let mut silent = Vec::new();
    for _ in 0..4 {
        silent.push(connect_from("127.0.0.2", server.addr).await.unwrap());
    }
    if let Ok(fifth) = connect_from("127.0.0.2", server.addr).await {
        assert!(!healthy(fifth).await, "a 5th connection was served");
    }
    let other = connect_from("127.0.0.3", server.addr).await.unwrap();
    assert!(healthy(other).await, "another address was refused");
    let (_, metrics) = server.get("/metrics").await;
    assert!(
        metrics.contains("callisto_http_connections_refused_total{reason=\"per_source\"}"),
        "{metrics}"
    );

    // The silent four go after 2 s.
    let started = Instant::now();
    for tcp in &mut silent {
        assert!(
            closed_within(tcp, Duration::from_secs(10)).await,
            "a silent connection stayed"
        );
    }
    assert!(started.elapsed() >= Duration::from_millis(1500));
    talking
        .await
        .expect("the WebSocket client stayed connected");
    let again = connect_from("127.0.0.2", server.addr).await.unwrap();
    assert!(healthy(again).await, "the places were not given back");
}

/// A request's head must arrive within `--request-header-timeout`, however
/// steadily it trickles in (before, each byte renewed the idle limit, so a
/// byte a minute held a connection for good); a kept-alive connection
/// waits as long for its next request. Others are served meanwhile.
#[tokio::test]
async fn a_request_head_must_come_in_time() {
    let server = Server::start(&["--request-header-timeout", "1"]).await;
    let tcp = connect_from("127.0.0.2", server.addr).await.unwrap();
    let (mut rx, mut tx) = tcp.into_split();
    let trickle = tokio::spawn(async move {
        tx.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
            .await?;
        for _ in 0..50 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            tx.write_all(b"a").await?;
        }
        std::io::Result::Ok(())
    });
    let started = Instant::now();
    let mut reply = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(4), rx.read_to_end(&mut reply)).await;
    assert!(
        matches!(read, Ok(Ok(_) | Err(_))),
        "a trickling request head held its connection"
    );
    assert!(started.elapsed() >= Duration::from_millis(800));
    assert!(!String::from_utf8_lossy(&reply).contains("200 OK"));
    trickle.abort();
    assert!(healthy(connect_from("127.0.0.3", server.addr).await.unwrap()).await);
    let timed_out =
        |reason: &str| format!("callisto_http_connections_timed_out_total{{reason=\"{reason}\"}}");
    assert!(server.metric(&timed_out("request_head")).await >= 1.0);

    // Kept alive after an answer, then closed when no request follows.
    let mut tcp = connect_from("127.0.0.4", server.addr).await.unwrap();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut answer = [0u8; 12];
    tcp.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"HTTP/1.1 200");
    let mut rest = Vec::new();
    let drained = tokio::time::timeout(Duration::from_secs(4), tcp.read_to_end(&mut rest)).await;
    assert!(
        drained.is_ok(),
        "an idle kept-alive connection outlived the header timeout"
    );
    assert!(server.metric(&timed_out("idle")).await >= 1.0);
}

/// A client that asks and never reads what it is sent is let go after the
/// idle limit (twice the heartbeat timeout), with its place.
#[tokio::test]
async fn a_client_that_reads_nothing_is_let_go() {
    const REQUESTS: usize = 3000;
    let server =
        Server::start(&["--heartbeat-timeout", "1", "--max-connections-per-ip", "1"]).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let tcp = socket.connect(server.addr).await.unwrap();
    let (mut rx, mut tx) = tcp.into_split();
    // Pipelined: far more answers (10 KB each) than the socket buffers
    // hold, so the server's writes stall until we read.
    let asking = tokio::spawn(async move {
        let request = b"GET /js/app.js HTTP/1.1\r\nHost: localhost\r\n\r\n";
        for _ in 0..REQUESTS {
            if tx.write_all(request).await.is_err() {
                break;
            }
        }
        tx
    });
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), rx.read_to_end(&mut got)).await;
    let answers = String::from_utf8_lossy(&got)
        .matches("HTTP/1.1 200")
        .count();
    assert!(
        read.is_ok() && answers < REQUESTS,
        "the stalled connection stayed: {answers} answers of {REQUESTS}"
    );
    drop(asking.await);
    // Its place is free again.
    assert!(healthy(connect_from("127.0.0.2", server.addr).await.unwrap()).await);
    let not_reading = "callisto_http_connections_timed_out_total{reason=\"not_reading\"}";
    assert!(server.metric(not_reading).await >= 1.0);
}

/// A browser's WebSocket must come from a page of this server's host, or
/// of an origin given with --allowed-origin; other sites' pages are
/// refused (403), counted and logged. Clients that send no Origin are not
/// browsers, and are let through.
#[tokio::test]
async fn pages_of_other_sites_may_not_open_websockets() {
    let (logs, _logging) = common::Logs::capture();
    let server = Server::start(&["--allowed-origin", "https://app.example.org"]).await;
    let url = server.ws_url();
    let open = |origin: Option<String>| {
        let url = url.clone();
        let addr = server.addr;
        async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let headers: Vec<(&str, &str)> =
                origin.iter().map(|o| ("origin", o.as_str())).collect();
            common::Client::handshake(tcp, &url, &headers).await
        }
    };
    let own = format!("http://{}", server.addr);
    for origin in [Some(own), Some("https://app.example.org".into()), None] {
        let mut client = open(origin.clone())
            .await
            .unwrap_or_else(|status| panic!("{origin:?} refused: {status}"));
        client.ping().await;
    }
    for origin in ["https://elsewhere.example", "null", "http://127.0.0.2:1"] {
        assert_eq!(open(Some(origin.into())).await.err(), Some(403), "{origin}");
    }
    // A proxy that passes a Host of its own (Apache's default) says in
    // X-Forwarded-Host which host was asked for; only a trusted one is
    // believed (loopback, by default).
    let behind_proxy = [
        ("origin", "https://call.example.org"),
        ("x-forwarded-host", "call.example.org"),
    ];
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let mut proxied = common::Client::handshake(tcp, &url, &behind_proxy)
        .await
        .expect("a trusted proxy's X-Forwarded-Host counts");
    proxied.ping().await;
    let untrusted = Server::start(&["--trusted-proxy", "127.0.0.2"]).await;
    let tcp = TcpStream::connect(untrusted.addr).await.unwrap();
    let refused = common::Client::handshake(tcp, &untrusted.ws_url(), &behind_proxy).await;
    assert_eq!(refused.err(), Some(403), "anyone else's is not");

    let (_, metrics) = server.get("/metrics").await;
    assert!(
        metrics.contains("callisto_http_websockets_refused_total{reason=\"foreign_origin\"} 4"),
        "{metrics}"
    );
    let text = logs.text();
    let refusals: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("refused a WebSocket from another site's page"))
        .collect();
    assert_eq!(refusals.len(), 4, "{text}");
    assert!(
        refusals[0].contains("origin=https://elsewhere.example")
            && refusals[0].contains(&format!("host={}", server.addr)),
        "{text}"
    );
}
