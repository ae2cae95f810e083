//! The signaling protocol end to end: real server, real WebSocket clients.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{Client, Ended, Server, TempDir, unix_now};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

fn id(v: &Value) -> String {
    v.as_str().expect("string id").to_owned()
}

#[tokio::test]
async fn join_signal_broadcast_leave() {
    let server = Server::start(&["--ice-server", "stun:stun.example.test:3478"]).await;
    let mut a = server.client().await;
    let mut b = server.client().await;

    let wa = a.join("standup", "Ada").await;
    let ida = id(&wa["id"]);
    assert!(ida.len() >= 24, "ids carry at least 96 bits");
    assert_eq!(wa["room"], "standup");
    assert_eq!(wa["version"], 1);
    assert_eq!(wa["peers"], json!([]));
    // The built-in STUN/TURN server first, with fresh credentials, then the configured one.
    let ice = wa["iceServers"].as_array().unwrap();
    let turn = server.running.turn.unwrap();
    assert_eq!(
        ice[0],
        json!({"urls": [format!("stun:127.0.0.1:{}", turn.udp.port())]})
    );
    assert_eq!(
        ice[1]["urls"],
        json!([
            format!("turn:127.0.0.1:{}?transport=udp", turn.udp.port()),
            format!("turn:127.0.0.1:{}?transport=tcp", turn.tcp.port())
        ])
    );
    let username = ice[1]["username"].as_str().unwrap();
    let (expiry, _) = username.split_once(':').unwrap();
    let now = unix_now();
    assert!(
        expiry.parse::<u64>().unwrap() > now + 3600,
        "credentials last long enough"
    );
    assert_eq!(ice[1]["credential"].as_str().unwrap().len(), 28);
    assert_eq!(ice[2], json!({"urls": ["stun:stun.example.test:3478"]}));

    let wb = b.join("standup", "  Bob  ").await;
    assert_ne!(
        wb["iceServers"][1]["username"], wa["iceServers"][1]["username"],
        "fresh per welcome"
    );
    let idb = id(&wb["id"]);
    assert_eq!(wb["peers"], json!([{"id": ida, "name": "Ada"}]));
    let pj = a.expect("peer-joined").await;
    assert_eq!(pj["peer"], json!({"id": idb, "name": "Bob"}));

    let sdp =
        json!({"description": {"type": "offer", "sdp": "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\n"}});
    a.send(json!({"type": "signal", "to": idb, "data": sdp}))
        .await;
    let got = b.expect("signal").await;
    assert_eq!(got["from"], ida.as_str());
    assert_eq!(got["data"], sdp);

    b.send(json!({"type": "broadcast", "data": {"muted": true}}))
        .await;
    let got = a.expect("broadcast").await;
    assert_eq!(
        got,
        json!({"type": "broadcast", "from": idb, "data": {"muted": true}})
    );

    a.ping().await;
    b.ping().await; // b did not get its own broadcast: the next thing it sees is the pong

    a.send(json!({"type": "leave"})).await;
    let left = b.expect("peer-left").await;
    assert_eq!(left["id"], ida.as_str());

    // The connection stays usable, and may join again with a fresh id.
    let again = a.join("standup", "Ada").await;
    assert_ne!(id(&again["id"]), ida);
    assert_eq!(again["peers"], json!([{"id": idb, "name": "Bob"}]));
}

#[tokio::test]
async fn closing_the_socket_leaves_the_room() {
    let server = Server::start(&["--resume-grace", "1"]).await;
    let mut a = server.client().await;
    let mut b = server.client().await;
    a.join("r", "A").await;
    let idb = id(&b.join("r", "B").await["id"]);
    a.expect("peer-joined").await;
    b.ws.close(None).await.unwrap();
    assert_eq!(a.expect("peer-left").await["id"], idb.as_str());

    // Dropping the TCP connection without a close frame is a lost
    // connection: its place is kept for a resume, then given up.
    let mut c = server.client().await;
    let idc = id(&c.join("r", "C").await["id"]);
    a.expect("peer-joined").await;
    let lost = tokio::time::Instant::now();
    drop(c);
    assert_eq!(a.expect("peer-left").await["id"], idc.as_str());
    assert!(
        lost.elapsed() >= Duration::from_secs(1),
        "kept for the grace"
    );
}

#[tokio::test]
async fn heartbeat_timeout_drops_a_silent_client() {
    let server = Server::start(&["--heartbeat-timeout", "1", "--resume-grace", "0"]).await;
    let mut a = server.client().await;
    let mut silent = server.client().await;
    a.join("r", "A").await;
    let ids = id(&silent.join("r", "Silent").await["id"]);
    a.expect("peer-joined").await;
    // `silent` never reads, so it never answers the server's pings; `a`
    // reads (and so answers pings) while it waits.
    let left = a.expect("peer-left").await;
    assert_eq!(left["id"], ids.as_str());
    a.ping().await;
    assert_eq!(
        silent.ended().await,
        Ended::Close(1001, "heartbeat timeout".into())
    );
}

#[tokio::test]
async fn bad_messages_get_bad_message_and_the_connection_stays_open() {
    let server = Server::start(&[]).await;
    let mut c = server.client().await;
    for text in [
        "not json",
        "[1,2]",
        "{\"type\":",
        "{}",
        "{\"type\":\"dance\"}",
        "{\"type\":7}",
        "{\"type\":\"join\",\"name\":\"x\"}",
        "{\"type\":\"join\",\"room\":[],\"name\":\"x\"}",
        "{\"type\":\"signal\",\"to\":\"x\"}",
        "{\"type\":\"broadcast\"}",
    ] {
        c.send_text(text).await;
        c.expect_error("bad-message").await;
    }
    c.ws.send(Message::binary(vec![1, 2, 3])).await.unwrap();
    c.expect_error("bad-message").await;
    c.ping().await;
    c.join("still-works", "C").await;
}

#[tokio::test]
async fn every_other_error_code() {
    let server = Server::start(&["--max-room-size", "2", "--max-rooms", "2"]).await;
    let mut a = server.client().await;

    a.send(json!({"type": "join", "room": "no spaces", "name": "A"}))
        .await;
    a.expect_error("bad-room").await;
    a.send(json!({"type": "join", "room": "x".repeat(65), "name": "A"}))
        .await;
    a.expect_error("bad-room").await;
    a.send(json!({"type": "join", "room": "r", "name": "   "}))
        .await;
    a.expect_error("bad-name").await;
    a.send(json!({"type": "join", "room": "r", "name": "é".repeat(65)}))
        .await;
    a.expect_error("bad-name").await;

    a.send(json!({"type": "signal", "to": "x", "data": 1}))
        .await;
    a.expect_error("not-joined").await;
    a.send(json!({"type": "broadcast", "data": 1})).await;
    a.expect_error("not-joined").await;
    a.send(json!({"type": "leave"})).await;
    a.expect_error("not-joined").await;

    let ida = id(&a.join("r", "A").await["id"]);
    a.send(json!({"type": "join", "room": "r2", "name": "A"}))
        .await;
    a.expect_error("already-joined").await;

    a.send(json!({"type": "signal", "to": "0123456789abcdef0123456789abcdef", "data": 1}))
        .await;
    a.expect_error("unknown-peer").await;
    a.send(json!({"type": "signal", "to": ida, "data": 1}))
        .await;
    a.expect_error("unknown-peer").await;

    // A peer in another room is unknown too: rooms do not leak into each other.
    let mut other = server.client().await;
    let idother = id(&other.join("elsewhere", "O").await["id"]);
    a.send(json!({"type": "signal", "to": idother, "data": 1}))
        .await;
    a.expect_error("unknown-peer").await;

    let mut b = server.client().await;
    b.join("r", "B").await;
    let mut c = server.client().await;
    c.send(json!({"type": "join", "room": "r", "name": "C"}))
        .await;
    c.expect_error("room-full").await;
    // Two rooms exist already (r, elsewhere): a third is refused.
    c.send(json!({"type": "join", "room": "third", "name": "C"}))
        .await;
    c.expect_error("server-full").await;
    c.ping().await;
    a.expect("peer-joined").await;
    a.ping().await;
}

#[tokio::test]
async fn too_large_closes_with_1009() {
    let server = Server::start(&["--max-message-bytes", "1024"]).await;
    let mut bystander = server.client().await;
    bystander.join("r", "Bystander").await;

    // Just over the limit: an error that says why, then the close.
    let mut c = server.client().await;
    c.join("r", "C").await;
    bystander.expect("peer-joined").await;
    c.send(json!({"type": "broadcast", "data": "x".repeat(1100)}))
        .await;
    c.expect_error("too-large").await;
    assert_eq!(c.ended().await, Ended::Close(1009, "too-large".into()));
    bystander.expect("peer-left").await;

    // Far over the limit: cut off without buffering it.
    let mut d = server.client().await;
    d.send_text(&"y".repeat(1_000_000)).await;
    match d.ended().await {
        Ended::Close(code, _) => assert_eq!(code, 1009),
        Ended::Gone => {}
    }
    bystander.ping().await;
}

#[tokio::test]
async fn flooding_is_rate_limited_then_closed() {
    let server =
        Server::start(&["--max-messages-per-second", "5", "--max-message-burst", "5"]).await;
    let mut c = server.client().await;
    for _ in 0..5 {
        c.ping().await;
    }
    c.send(json!({"type": "ping"})).await;
    c.expect_error("rate-limited").await;
    // Keep flooding: after 20 refusals the server gives up on the client.
    for _ in 0..40 {
        if c.ws
            .send(Message::text(r#"{"type":"ping"}"#))
            .await
            .is_err()
        {
            break;
        }
    }
    let mut saw = 0;
    let ended = loop {
        match tokio::time::timeout(common::TIMEOUT, futures_util::StreamExt::next(&mut c.ws))
            .await
            .unwrap()
        {
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                if v["type"] == "error" {
                    assert_eq!(v["code"], "rate-limited");
                    saw += 1;
                }
            }
            Some(Ok(Message::Close(Some(f)))) => break (u16::from(f.code), f.reason.to_string()),
            Some(Ok(_)) => {}
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    assert_eq!(ended, (1008, "rate-limited".into()));
    assert!(saw >= 10, "saw {saw} rate-limited errors before the close");

    // Others are unaffected.
    let mut other = server.client().await;
    other.ping().await;
}

#[tokio::test]
async fn fifty_concurrent_joins_agree_on_the_room() {
    let server = Server::start(&["--max-room-size", "64"]).await;
    let mut clients = Vec::new();
    for _ in 0..50 {
        clients.push(server.client().await);
    }
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| {
            tokio::spawn(async move {
                let welcome = c.join("big", &format!("P{i}")).await;
                let me = id(&welcome["id"]);
                let mut known: BTreeSet<String> = welcome["peers"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| id(&p["id"]))
                    .collect();
                while known.len() < 49 {
                    let v = c.expect("peer-joined").await;
                    assert!(known.insert(id(&v["peer"]["id"])), "duplicate peer-joined");
                }
                (me, known, c)
            })
        })
        .collect();
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    let all: BTreeSet<String> = results.iter().map(|(me, _, _)| me.clone()).collect();
    assert_eq!(all.len(), 50);
    for (me, known, _) in &results {
        let mut expected = all.clone();
        expected.remove(me);
        assert_eq!(known, &expected);
    }
    // Nobody received anything beyond that.
    for (_, _, c) in &mut results {
        c.ping().await;
    }
    assert_eq!(server.metric("callisto_clients").await, 50.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_clients_in_a_hundred_rooms() {
    // All from 127.0.0.1: past the 512 connections one address gets by
    // default.
    // Dropped below without close frames: no place is kept.
    let server = Server::start(&["--max-connections-per-ip", "2000", "--resume-grace", "0"]).await;
    let url = server.ws_url();
    let mut tasks = Vec::new();
    for i in 0..1000 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(&url).await;
            let room = format!("room-{}", i % 100);
            let welcome = c.join(&room, &format!("P{i}")).await;
            let mut known = welcome["peers"].as_array().unwrap().len();
            while known < 9 {
                c.expect("peer-joined").await;
                known += 1;
            }
            c
        }));
    }
    let mut clients = Vec::new();
    for t in tasks {
        clients.push(t.await.unwrap());
    }
    assert_eq!(server.metric("callisto_clients").await, 1000.0);
    assert_eq!(server.metric("callisto_rooms").await, 100.0);
    let (_, metrics) = server.get("/metrics").await;
    assert!(
        metrics.contains("callisto_room_size_bucket{le=\"8\"} 0\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("callisto_room_size_bucket{le=\"12\"} 100\n"),
        "{metrics}"
    );

    drop(clients);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while server.metric("callisto_rooms").await > 0.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "rooms were not cleaned up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(server.metric("callisto_clients").await, 0.0);
}

#[tokio::test]
async fn shutdown_sends_close_frames() {
    let server = Server::start(&[]).await;
    let mut a = server.client().await;
    let mut b = server.client().await;
    a.join("r", "A").await;
    b.join("r", "B").await;
    a.expect("peer-joined").await;
    server.shutdown.cancel();
    // Nobody is told that anyone left: the calls go on peer to peer, and
    // meet again on the restarted server.
    for c in [&mut a, &mut b] {
        let mut heard = Vec::new();
        let ended = loop {
            match tokio::time::timeout(Duration::from_secs(10), c.ws.next())
                .await
                .expect("close in time")
            {
                Some(Ok(Message::Text(t))) => heard.push(t.to_string()),
                Some(Ok(Message::Close(Some(f)))) => {
                    break Ended::Close(u16::from(f.code), f.reason.to_string());
                }
                Some(Ok(_)) => {}
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(ended, Ended::Close(1001, "server shutting down".into()));
        assert!(heard.is_empty(), "told before the close: {heard:?}");
    }
    tokio::time::timeout(Duration::from_secs(10), server.running.wait())
        .await
        .expect("server stops");
}

/// With a state file, a restart keeps the rooms: each client takes its
/// place back with its token, under the same id, the room still locked;
/// a newcomer knocks; and one who does not come back leaves after the
/// grace, as after a lost connection.
#[tokio::test]
async fn a_restart_with_a_state_file_gives_everyone_their_place_back() {
    let dir = TempDir::new("state-file");
    let file = dir.0.join("rooms.json");
    let flags = [
        "--state-file",
        file.to_str().unwrap(),
        "--resume-grace",
        "3",
    ];
    let server = Server::start(&flags).await;
    let (mut a, mut b) = (server.client().await, server.client().await);
    let wa = a.join("r", "Ada").await;
    let wb = b.join("r", "Bob").await;
    a.expect("peer-joined").await;
    a.send(json!({"type": "lock", "locked": true})).await;
    a.expect("locked").await;
    b.expect("locked").await;
    let mut knocker = server.client().await;
    knocker
        .send(json!({"type": "join", "room": "r", "name": "Kim"}))
        .await;
    knocker.expect("waiting").await;
    server.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), server.running.wait())
        .await
        .expect("server stops");
    let text = std::fs::read_to_string(&file).expect("the rooms were kept");
    for secret in [&wa["resume"], &wb["resume"]] {
        assert!(
            !text.contains(secret.as_str().unwrap()),
            "no token in the file"
        );
    }
    assert!(!text.contains("Kim"), "who knocked is not kept");

    let server = Server::start(&flags).await;
    assert!(!file.exists(), "read once");
    let mut a = server.client().await;
    a.send(json!({"type": "join", "room": "r", "name": "Ada", "resume": wa["resume"]}))
        .await;
    let back = a.expect("welcome").await;
    assert_eq!(
        (&back["id"], &back["resumed"], &back["locked"]),
        (&wa["id"], &json!(true), &json!(true))
    );
    assert_eq!(back["peers"], json!([{"id": wb["id"], "name": "Bob"}]));
    let mut kim = server.client().await;
    kim.send(json!({"type": "join", "room": "r", "name": "Kim"}))
        .await;
    kim.expect("waiting").await;
    assert_eq!(a.expect("knock").await["peer"]["name"], "Kim");
    // Bob does not come back: he leaves after the grace.
    let left = tokio::time::timeout(Duration::from_secs(10), a.expect("peer-left"))
        .await
        .expect("Bob leaves after the grace");
    assert_eq!(left["id"], wb["id"]);
}

#[tokio::test]
async fn subprotocol_v1_is_accepted() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let server = Server::start(&[]).await;
    let mut req = server.ws_url().into_client_request().unwrap();
    req.headers_mut()
        .insert("sec-websocket-protocol", "callisto.v1".parse().unwrap());
    let (ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(resp.headers()["sec-websocket-protocol"], "callisto.v1");
    let mut c = Client { ws };
    c.ping().await;
}

/// A client that reads nothing is evicted once what waits for it passes the
/// send queue's byte bound (1 MiB by default), long before its 1,024
/// frames: a room could otherwise park 64 MiB at each such client.
#[tokio::test]
async fn a_client_that_reads_nothing_is_evicted_by_the_bytes_waiting() {
    let server = Server::start(&[]).await;
    let (mut a, _b) = flood_a_client_that_reads_nothing(&server).await;
    assert!(server.metric("callisto_signaling_evictions_total").await >= 1.0);
    // Ada, who read what she was sent, is still served.
    a.send(json!({"type": "ping"})).await;
    assert_eq!(past_errors(&mut a).await["type"], "pong");
}

/// An evicted client that reads nothing is let go at once: its writes,
/// stalled on a full socket, do not hold the connection until the write
/// stall (two hours here, twice the heartbeat timeout). What was queued for
/// it is given back to the server-wide bound.
#[tokio::test]
async fn an_evicted_client_is_let_go_at_once() {
    // Two connections at most: Ada's and Bob's. Another is refused until
    // Bob's has ended.
    let server = Server::start(&["--heartbeat-timeout", "3600", "--max-connections", "2"]).await;
    let (mut a, _b) = flood_a_client_that_reads_nothing(&server).await;
    let mut answered = false;
    for _ in 0..100 {
        answered = healthz_answers(server.addr).await;
        if answered {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(answered, "the evicted connection still holds its place");
    a.send(json!({"type": "ping"})).await;
    assert_eq!(past_errors(&mut a).await["type"], "pong");
    assert_eq!(server.metric("callisto_signaling_queued_bytes").await, 0.0);
}

/// Whether a fresh connection gets `GET /healthz` answered (not reset).
async fn healthz_answers(addr: std::net::SocketAddr) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ask = async {
        let mut tcp = tokio::net::TcpStream::connect(addr).await?;
        tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .await?;
        let mut answer = Vec::new();
        tcp.read_to_end(&mut answer).await?;
        std::io::Result::Ok(answer.starts_with(b"HTTP/1.1 200"))
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), ask).await,
        Ok(Ok(true))
    )
}

/// The server-wide bound on bytes waiting (`--max-queued-bytes`) evicts a
/// client with a backlog though its own bound is far off: with 16 MiB
/// messages allowed, Bob could have 32 MiB waiting, and the 9 MB sent
/// would not evict him: run with `NO_SERVER_WIDE_BOUND=1` and the test
/// fails. Clients that read are still served.
#[tokio::test]
async fn the_server_wide_bound_on_bytes_waiting_evicts_a_client_with_a_backlog() {
    let mut flags = vec![
        "--max-message-bytes",
        "16777216",
        "--heartbeat-timeout",
        "3600",
    ];
    if std::env::var_os("NO_SERVER_WIDE_BOUND").is_none() {
        flags.extend(["--max-queued-bytes", "200000"]);
    }
    let server = Server::start(&flags).await;
    let (mut a, _b) = flood_a_client_that_reads_nothing(&server).await;
    a.send(json!({"type": "ping"})).await;
    assert_eq!(past_errors(&mut a).await["type"], "pong");
}

/// Ada joins a room, then Bob, who reads nothing after his welcome through a
/// small socket; Ada sends him 60 kB signals (9 MB, within the default burst
/// of 200), and then sees him evicted. Returns both, Bob still unread.
async fn flood_a_client_that_reads_nothing(server: &Server) -> (Client, Client) {
    let mut a = server.client().await;
    a.join("flood", "Ada").await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = socket.connect(server.addr).await.unwrap();
    let (ws, _) = tokio_tungstenite::client_async(
        server.ws_url(),
        tokio_tungstenite::MaybeTlsStream::Plain(tcp),
    )
    .await
    .unwrap();
    let mut b = Client { ws };
    let idb = id(&b.join("flood", "Bob").await["id"]);
    a.expect("peer-joined").await;

    let data = "x".repeat(60_000);
    for _ in 0..150 {
        a.send(json!({"type": "signal", "to": idb, "data": data}))
            .await;
        // Paced, so that Bob's connection task has written all it could
        // and waits on his full socket when his queue overflows.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Signals sent after the eviction are answered with errors: skipped.
    let left = past_errors(&mut a).await;
    assert_eq!(left["type"], "peer-left", "{left}");
    assert_eq!(left["id"], idb.as_str());
    (a, b)
}

/// The next message that is not an error.
async fn past_errors(c: &mut Client) -> Value {
    loop {
        let v = c.recv().await;
        if v["type"] != "error" {
            return v;
        }
    }
}

/// Many clients doing everything at once, well and badly: joining and
/// leaving, signaling and broadcasting, sending garbage, binary and
/// oversized frames, reading nothing, vanishing without a close. Every
/// message the server sends is well-formed; it keeps serving; and once the
/// crowd is gone it holds nothing: no peer, no room, no byte queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crowd_misbehaving_at_once_leaves_nothing_behind() {
    let server = Server::start(&[
        "--max-message-bytes",
        "4096",
        "--max-queued-bytes",
        "65536",
        "--heartbeat-timeout",
        "3600",
    ])
    .await;
    let tasks: Vec<_> = (1..=48u64)
        .map(|seed| tokio::spawn(chaotic_client(server.addr, server.ws_url(), seed)))
        .collect();
    for task in tasks {
        task.await.expect("a client's script ran to its end");
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let left = [
            server.metric("callisto_clients").await,
            server.metric("callisto_rooms").await,
            server.metric("callisto_signaling_queued_bytes").await,
        ];
        if left == [0.0; 3] {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "clients, rooms, queued bytes left: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut c = server.client().await;
    c.join("after-the-crowd", "Z").await;
    c.ping().await;
}

/// One member of the crowd: 60 random steps from `seed`. A third of the
/// clients never read (through a small socket); the others read what has
/// come between steps and learn peer ids from it.
async fn chaotic_client(addr: std::net::SocketAddr, url: String, seed: u64) {
    use futures_util::{FutureExt, StreamExt};
    let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let reads = seed % 3 != 0;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    if !reads {
        socket.set_recv_buffer_size(4096).unwrap();
    }
    let tcp = socket.connect(addr).await.unwrap();
    let (mut ws, _) =
        tokio_tungstenite::client_async(url, tokio_tungstenite::MaybeTlsStream::Plain(tcp))
            .await
            .unwrap();
    let mut peers: Vec<String> = Vec::new();
    for _ in 0..60 {
        let text = match next(10) {
            0 | 1 => json!({"type": "join", "room": format!("crowd-{}", next(4)), "name": format!("C{seed}")}).to_string(),
            2 | 3 => {
                let to = match peers.len() {
                    0 => "nobody".to_owned(),
                    n => peers[next(n as u64) as usize].clone(),
                };
                json!({"type": "signal", "to": to, "data": {"sdp": "x".repeat(next(3000) as usize)}}).to_string()
            }
            4 => json!({"type": "broadcast", "data": {"chat": "y".repeat(next(2000) as usize)}}).to_string(),
            5 => "{not json".to_owned(),
            6 => json!({"type": "leave"}).to_string(),
            7 => json!({"type": "ping"}).to_string(),
            8 => match next(4) {
                // Over --max-message-bytes: the server closes.
                0 => "z".repeat(5000),
                _ => json!({"type": "nonsense", "at": next(100)}).to_string(),
            },
            _ => {
                if ws.send(Message::binary(vec![0u8; 16])).await.is_err() {
                    return;
                }
                continue;
            }
        };
        if ws.send(Message::text(text)).await.is_err() {
            // Closed by the server (too large, evicted, rate-limited).
            return;
        }
        while let Some(Some(Ok(msg))) = reads.then(|| ws.next().now_or_never()).flatten() {
            let Message::Text(text) = msg else {
                continue;
            };
            let v: Value = serde_json::from_str(text.as_str()).expect("JSON from the server");
            match v["type"].as_str().expect("every message has a type") {
                "welcome" => {
                    peers = v["peers"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|p| p["id"].as_str().unwrap().to_owned())
                        .collect();
                }
                "peer-joined" => peers.push(v["peer"]["id"].as_str().unwrap().to_owned()),
                "error" => assert!(
                    v["message"].as_str().is_some_and(|m| !m.is_empty()),
                    "an error says why: {v}"
                ),
                _ => {}
            }
        }
        if next(8) == 0 {
            tokio::task::yield_now().await;
        }
    }
    // Half leave politely, half just vanish.
    if next(2) == 0 {
        let _ = ws.close(None).await;
    }
}

/// A joined client gets fresh `iceServers` every half of the credentials'
/// lifetime, so those it holds never expire while it stays; one that has
/// not joined gets none, nor does one knocking on a locked room.
#[tokio::test]
async fn a_joined_client_gets_fresh_credentials_before_its_own_expire() {
    let server = Server::start(&["--turn-credential-ttl", "10"]).await;
    let mut a = server.client().await;
    let mut idle = server.client().await;
    let mut knocking = server.client().await;
    let expiry = |servers: &Value| -> u64 {
        let username = servers[1]["username"].as_str().unwrap();
        username.split_once(':').unwrap().0.parse().unwrap()
    };
    let welcome = a.join("renewals", "Ada").await;
    let first = expiry(&welcome["iceServers"]);
    assert!(
        first >= unix_now() + 9 && first <= unix_now() + 10,
        "{first}"
    );
    a.send(json!({"type": "lock", "locked": true})).await;
    a.expect("locked").await;
    knocking
        .send(json!({"type": "join", "room": "renewals", "name": "Kim"}))
        .await;
    knocking.expect("waiting").await;
    a.expect("knock").await;
    let mut last = first;
    for _ in 0..2 {
        let renewed = a.expect("ice-servers").await;
        let ice = &renewed["iceServers"];
        assert_eq!(ice[0], welcome["iceServers"][0], "the same STUN URL");
        assert_eq!(ice[1]["urls"], welcome["iceServers"][1]["urls"]);
        assert_eq!(ice[1]["credential"].as_str().unwrap().len(), 28);
        let expires = expiry(ice);
        // Renewed with half the lifetime left (give or take a second).
        assert!(expires >= last + 4, "{expires} after {last}");
        assert!(expires >= unix_now() + 9, "{expires}");
        last = expires;
    }
    // The idle and the knocking connections were sent nothing meanwhile:
    // the next message of each is the answer to its ping.
    idle.ping().await;
    knocking.ping().await;
}

/// With `--ice-secret`, the TURN URLs of `--ice-server` come with
/// time-limited credentials signed with it (TURN REST, as coturn's
/// `use-auth-secret` takes them), fresh in each `welcome` and renewed while
/// the client stays; STUN URLs come as given.
#[tokio::test]
async fn an_external_turn_server_gets_time_limited_credentials() {
    let server = Server::start(&[
        "--no-turn",
        "--ice-server",
        "stun:stun.example.test:3478",
        "--ice-server",
        "turn:turn.example.test:3478?transport=udp",
        "--ice-server",
        "turns:turn.example.test:5349?transport=tcp",
        "--ice-secret",
        "coturn-secret",
        "--turn-credential-ttl",
        "10",
    ])
    .await;
    let signed = |servers: &Value| -> u64 {
        assert_eq!(servers.as_array().unwrap().len(), 2, "{servers}");
        assert_eq!(servers[0], json!({"urls": ["stun:stun.example.test:3478"]}));
        let turn = &servers[1];
        assert_eq!(
            turn["urls"],
            json!([
                "turn:turn.example.test:3478?transport=udp",
                "turns:turn.example.test:5349?transport=tcp"
            ])
        );
        let username = turn["username"].as_str().unwrap();
        assert_eq!(
            turn["credential"].as_str().unwrap(),
            callisto_turn::auth::rest_password(b"coturn-secret", username)
        );
        username.split_once(':').unwrap().0.parse().unwrap()
    };
    let mut a = server.client().await;
    let welcome = a.join("external", "Ada").await;
    let first = signed(&welcome["iceServers"]);
    assert!(
        first >= unix_now() + 9 && first <= unix_now() + 10,
        "{first}"
    );
    let renewed = a.expect("ice-servers").await;
    assert!(signed(&renewed["iceServers"]) >= first + 4);
}

/// With `--access-codes-file`, a join takes one of its codes: none, or a
/// wrong one, gets `access-denied` (no `welcome`, so no TURN credentials)
/// and the connection stays for another try. SIGHUP replaces the codes,
/// and whoever is in a room stays. No code reaches the log.
#[tokio::test]
async fn a_join_takes_an_access_code_when_the_server_has_them() {
    let (logs, _logging) = common::Logs::capture();
    let dir = common::TempDir::new("access-codes");
    let file = dir.0.join("codes");
    std::fs::write(&file, "# the team's\n  first-code-of-the-team \n").unwrap();
    let server = Server::start(&["--access-codes-file", file.to_str().unwrap()]).await;
    let join = |access: Option<&str>| {
        let mut msg = json!({"type": "join", "room": "r", "name": "A"});
        if let Some(code) = access {
            msg["access"] = json!(code);
        }
        msg
    };

    let mut a = server.client().await;
    a.send(join(None)).await;
    a.expect_error("access-denied").await;
    a.send(join(Some("first-code-of-the-tea"))).await;
    a.expect_error("access-denied").await;
    a.send(join(Some("first-code-of-the-team"))).await;
    let ida = id(&a.expect("welcome").await["id"]);

    // A new code in the file, and SIGHUP: the old one no longer opens.
    std::fs::write(&file, "second-code-of-the-team\n").unwrap();
    // SAFETY: kill has no preconditions; the server handles SIGHUP.
    assert_eq!(unsafe { libc::kill(libc::getpid(), libc::SIGHUP) }, 0);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !logs.text().contains("access codes replaced") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the file was not read again:\n{}",
            logs.text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut b = server.client().await;
    b.send(join(Some("first-code-of-the-team"))).await;
    b.expect_error("access-denied").await;
    b.send(join(Some("second-code-of-the-team"))).await;
    let welcome = b.expect("welcome").await;
    assert_eq!(
        welcome["peers"][0]["id"],
        json!(ida),
        "A stayed in the room"
    );
    assert_eq!(
        id(&a.expect("peer-joined").await["peer"]["id"]),
        id(&welcome["id"])
    );

    let logs = logs.text();
    assert!(logs.contains("join refused: no access code"), "{logs}");
    assert!(
        logs.contains("join refused: not an access code of this server"),
        "{logs}"
    );
    assert!(logs.contains("access codes replaced"), "{logs}");
    assert!(
        !logs.contains("code-of-the-te"),
        "a code in the log:\n{logs}"
    );
}

#[tokio::test]
async fn a_file_without_access_codes_stops_the_start_with_what_to_fix() {
    let dir = common::TempDir::new("no-access-codes");
    let file = dir.0.join("codes");
    std::fs::write(&file, "# nobody yet\n\n").unwrap();
    let argv = [
        "callisto",
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--no-turn",
        "--access-codes-file",
        file.to_str().unwrap(),
    ];
    let callisto::cli::Command::Serve(args) =
        <callisto::cli::Cli as clap::Parser>::try_parse_from(argv)
            .unwrap()
            .command
    else {
        unreachable!()
    };
    let err = callisto::serve::start(args, tokio_util::sync::CancellationToken::new())
        .await
        .err()
        .expect("refused");
    assert!(
        format!("{err:#}").contains("holds no access code"),
        "{err:#}"
    );
}

#[tokio::test]
async fn a_locked_room_takes_in_only_whom_someone_inside_lets_in() {
    let server = Server::start(&[]).await;
    let (mut ada, mut bob, mut cy) = (
        server.client().await,
        server.client().await,
        server.client().await,
    );
    let ida = id(&ada.join("board", "Ada").await["id"]);
    // Not in a room: no lock.
    bob.send(json!({"type": "lock", "locked": true})).await;
    bob.expect_error("not-joined").await;
    ada.send(json!({"type": "lock", "locked": true})).await;
    assert_eq!(
        ada.expect("locked").await,
        json!({"type": "locked", "locked": true, "by": ida})
    );

    // Bob knocks: he waits, with no TURN credentials, and may not signal.
    bob.send(json!({"type": "join", "room": "board", "name": "Bob"}))
        .await;
    let waiting = bob.expect("waiting").await;
    assert_eq!(waiting, json!({"type": "waiting", "room": "board"}));
    let knock = ada.expect("knock").await;
    assert_eq!(knock["peer"]["name"], "Bob");
    let idb = id(&knock["peer"]["id"]);
    bob.send(json!({"type": "signal", "to": ida, "data": 1}))
        .await;
    bob.expect_error("not-joined").await;
    ada.send(json!({"type": "signal", "to": idb, "data": 1}))
        .await;
    ada.expect_error("unknown-peer").await;

    // Ada lets him in.
    ada.send(json!({"type": "admit", "id": idb})).await;
    assert_eq!(
        ada.expect("knock-ended").await,
        json!({"type": "knock-ended", "id": idb, "admitted": true})
    );
    assert_eq!(ada.expect("peer-joined").await["peer"]["id"], idb.as_str());
    let welcome = bob.expect("welcome").await;
    assert_eq!(welcome["id"], idb.as_str());
    assert_eq!(welcome["locked"], true);
    assert!(
        welcome["iceServers"]
            .as_array()
            .is_some_and(|s| !s.is_empty())
    );
    bob.send(json!({"type": "signal", "to": ida, "data": 2}))
        .await;
    assert_eq!(ada.expect("signal").await["data"], 2);

    // Cy knocks; Bob turns him away; he knocks again, and Ada unlocks.
    cy.send(json!({"type": "join", "room": "board", "name": "Cy"}))
        .await;
    cy.expect("waiting").await;
    let idc = id(&ada.expect("knock").await["peer"]["id"]);
    bob.expect("knock").await;
    bob.send(json!({"type": "deny", "id": idc})).await;
    cy.expect_error("not-admitted").await;
    for c in [&mut ada, &mut bob] {
        assert_eq!(c.expect("knock-ended").await["admitted"], false);
    }
    ada.send(json!({"type": "admit", "id": idc})).await;
    ada.expect_error("unknown-peer").await;
    cy.send(json!({"type": "join", "room": "board", "name": "Cy"}))
        .await;
    cy.expect("waiting").await;
    ada.expect("knock").await;
    ada.send(json!({"type": "lock", "locked": false})).await;
    assert_eq!(ada.expect("locked").await["locked"], false);
    ada.expect("knock-ended").await;
    ada.expect("peer-joined").await;
    let welcome = cy.expect("welcome").await;
    assert!(welcome.get("locked").is_none());
    assert_eq!(welcome["peers"].as_array().unwrap().len(), 2);
    let (_, body) = server.get("/metrics").await;
    for result in ["knocked", "admitted", "denied"] {
        assert!(
            body.contains(&format!(
                "callisto_signaling_knocks_total{{result=\"{result}\"}}"
            )),
            "{result} in:\n{body}"
        );
    }
}
