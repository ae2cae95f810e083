//! The native peer through the server's TURN: two peers that offer only
//! relayed candidates reach each other relay to relay, and chat. (A file of
//! its own: it reads the TURN metrics, which are the whole process's.)

mod common;

use std::time::Duration;

use callisto_peer::{Command, PeerConfig, PeerEvent, RelayTransport, RelayUse};
use common::Server;
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(20);

async fn next_matching(
    events: &mut mpsc::UnboundedReceiver<PeerEvent>,
    what: &str,
    want: impl Fn(&PeerEvent) -> bool,
) -> PeerEvent {
    loop {
        let event = tokio::time::timeout(WAIT, events.recv())
            .await
            .unwrap_or_else(|_| panic!("no {what} within {WAIT:?}"))
            .unwrap_or_else(|| panic!("the peer ended before {what}"));
        if want(&event) {
            return event;
        }
    }
}

/// Over UDP; over TCP, as from a network that lets no UDP out; and over
/// TLS on the web port (a self-signed certificate, trusted by its
/// fingerprint as the signaling is). The relayed address is UDP each time.
/// One after the other: the metrics are the whole process's.
#[tokio::test]
async fn two_relay_only_native_peers_talk_through_turn_over_udp_tcp_and_tls() {
    let plain = Server::start(&[]).await;
    let tls = Server::start(&["--tls-self-signed"]).await;
    for (server, over) in [
        (&plain, RelayTransport::Udp),
        (&plain, RelayTransport::Tcp),
        (&tls, RelayTransport::Tls),
    ] {
        relay_only_peers_talk(server, over, &plain).await;
    }
}

/// Two relay-only peers on `server`, through its TURN over `over`; the
/// process's metrics read on `metrics` (served plain).
async fn relay_only_peers_talk(server: &Server, over: RelayTransport, metrics: &Server) {
    let relayed_over = |text: &str, transport: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with("callisto_turn_relayed_packets_total"))
            .filter(|l| l.contains(&format!("transport=\"{transport}\"")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let transport = match over {
        RelayTransport::Udp => "udp",
        RelayTransport::Tcp => "tcp",
        RelayTransport::Tls => "tls",
    };
    let before = relayed_over(&metrics.get("/metrics").await.1, transport);
    let (scheme, pin) = match &server.running.fingerprint {
        Some(fp) => ("https", Some(fp.parse().expect("the server's fingerprint"))),
        None => ("http", None),
    };
    let start = |name: &str| {
        let config = PeerConfig {
            server: format!("{scheme}://{}", server.addr),
            room: "relayed".into(),
            name: name.into(),
            watching: false,
            access: None,
            bind: None,
            pin,
            relay: RelayUse::Only,
            send_media: false,
            save_files: None,
            relay_over: over,
        };
        let running = callisto_peer::spawn(config);
        (running.commands, running.events, running.task)
    };
    let (ada_commands, mut ada, ada_task) = start("Ada");
    next_matching(&mut ada, "Ada's join", |e| {
        matches!(e, PeerEvent::Joined { .. })
    })
    .await;
    let (bob_commands, mut bob, bob_task) = start("Bob");
    next_matching(&mut bob, "Bob's connection", |e| {
        matches!(e, PeerEvent::Connected { .. })
    })
    .await;
    next_matching(&mut ada, "Ada's connection", |e| {
        matches!(e, PeerEvent::Connected { .. })
    })
    .await;
    assert_eq!(metrics.metric("callisto_turn_allocations").await, 2.0);
    bob_commands
        .send(Command::Chat {
            text: "via the relay".into(),
            to: None,
        })
        .unwrap();
    next_matching(
        &mut ada,
        "the message",
        |e| matches!(e, PeerEvent::Chat { text, .. } if text == "via the relay"),
    )
    .await;
    // Everything went through the server, over the transport asked for:
    // its relay counted it.
    let text = metrics.get("/metrics").await.1;
    assert!(
        relayed_over(&text, transport) > before,
        "nothing relayed over {transport}: {text}"
    );

    for commands in [ada_commands, bob_commands] {
        commands.send(Command::Leave).unwrap();
    }
    for task in [ada_task, bob_task] {
        let summary = tokio::time::timeout(WAIT, task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(summary.peers.iter().all(|p| p.connected), "{summary:?}");
    }
    // Both let their allocations go on leaving.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while metrics.metric("callisto_turn_allocations").await > 0.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "allocations released"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
