//! The native peer (crate `callisto-peer`) against the real server: peers
//! meet each other over real sockets on loopback, chat, knock on a locked
//! room, and shrug off garbage from a peer that does not follow the rules.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use callisto_peer::{Command, PeerConfig, PeerEvent, RelayUse, Summary};
use common::Server;
use serde_json::json;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

const WAIT: Duration = Duration::from_secs(20);

/// Joining `room` as `name` on the server (or proxy) at `addr`, directly.
fn config_for(addr: SocketAddr, room: &str, name: &str) -> PeerConfig {
    PeerConfig {
        server: format!("http://{addr}"),
        room: room.into(),
        name: name.into(),
        watching: false,
        access: None,
        bind: None,
        pin: None,
        relay: RelayUse::Never,
        send_media: false,
        save_files: None,
        relay_over: callisto_peer::RelayTransport::Udp,
    }
}

struct Peer {
    commands: mpsc::UnboundedSender<Command>,
    events: mpsc::UnboundedReceiver<PeerEvent>,
    task: JoinHandle<Result<Summary, callisto_peer::PeerError>>,
    seen: Vec<PeerEvent>,
}

impl Peer {
    fn start(server: &Server, room: &str, name: &str) -> Peer {
        Peer::start_via(server.addr, room, name)
    }

    /// Joins through `addr`: the server's, or a proxy's in front of it.
    fn start_via(addr: SocketAddr, room: &str, name: &str) -> Peer {
        Peer::start_with(config_for(addr, room, name))
    }

    fn start_with(config: PeerConfig) -> Peer {
        let callisto_peer::Running {
            commands,
            events,
            task,
        } = callisto_peer::spawn(config);
        Peer {
            commands,
            events,
            task,
            seen: Vec::new(),
        }
    }

    /// Waits for an event that `want` picks, and returns it.
    async fn wait_for(&mut self, what: &str, want: impl Fn(&PeerEvent) -> bool) -> PeerEvent {
        if let Some(e) = self.seen.iter().find(|e| want(e)) {
            return e.clone();
        }
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let event = tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .unwrap_or_else(|_| panic!("no {what} within {WAIT:?}; saw {:?}", self.seen))
                .unwrap_or_else(|| panic!("the peer ended before {what}; saw {:?}", self.seen));
            self.seen.push(event.clone());
            if want(&event) {
                return event;
            }
        }
    }

    async fn id(&mut self) -> String {
        match self
            .wait_for("joined", |e| matches!(e, PeerEvent::Joined { .. }))
            .await
        {
            PeerEvent::Joined { id, .. } => id,
            _ => unreachable!(),
        }
    }

    async fn connected_to(&mut self, id: &str) {
        self.wait_for(
            &format!("a connection to {id}"),
            |e| matches!(e, PeerEvent::Connected { id: i, .. } if i == id),
        )
        .await;
    }

    async fn heard(&mut self, text: &str) -> PeerEvent {
        self.wait_for(
            &format!("chat {text:?}"),
            |e| matches!(e, PeerEvent::Chat { text: t, .. } if t == text),
        )
        .await
    }

    fn say(&self, text: &str, to: Option<&str>) {
        self.commands
            .send(Command::Chat {
                text: text.into(),
                to: to.map(str::to_owned),
            })
            .unwrap();
    }

    async fn leave(self) -> Summary {
        self.commands.send(Command::Leave).unwrap();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("leaves in time")
            .expect("no panic")
            .expect("leaves cleanly")
    }
}

#[tokio::test]
async fn three_native_peers_meet_and_chat_privately_too() {
    let server = Server::start(&[]).await;
    let mut ada = Peer::start(&server, "native", "Ada");
    let ada_id = ada.id().await;
    let mut bob = Peer::start(&server, "native", "Bob");
    let bob_id = bob.id().await;
    let mut cy = Peer::start(&server, "native", "Cy");
    let cy_id = cy.id().await;
    for (peer, others) in [
        (&mut ada, [&bob_id, &cy_id]),
        (&mut bob, [&ada_id, &cy_id]),
        (&mut cy, [&ada_id, &bob_id]),
    ] {
        for id in others {
            peer.connected_to(id).await;
        }
    }

    cy.say("hello all", None);
    for peer in [&mut ada, &mut bob] {
        let heard = peer.heard("hello all").await;
        assert_eq!(
            heard,
            PeerEvent::Chat {
                from: cy_id.clone(),
                name: "Cy".into(),
                text: "hello all".into(),
                private: false
            }
        );
    }
    ada.say("only for Cy", Some(&cy_id));
    ada.say("to everyone again", None);
    let private = cy.heard("only for Cy").await;
    assert!(matches!(private, PeerEvent::Chat { private: true, .. }));
    // Bob gets the message after it, and not the private one.
    bob.heard("to everyone again").await;
    assert!(
        !bob.seen
            .iter()
            .any(|e| matches!(e, PeerEvent::Chat { text, .. } if text == "only for Cy"))
    );

    // To nobody in the room: said so, and nothing goes.
    ada.say("hello?", Some("0123456789abcdef"));
    ada.wait_for("not-sent", |e| matches!(e, PeerEvent::NotSent { .. }))
        .await;

    let summary = cy.leave().await;
    let mut names: Vec<_> = summary
        .peers
        .iter()
        .map(|p| (p.name.as_str(), p.connected))
        .collect();
    names.sort();
    assert_eq!(names, [("Ada", true), ("Bob", true)]);
    ada.wait_for(
        "Cy left",
        |e| matches!(e, PeerEvent::PeerLeft { name, .. } if name == "Cy"),
    )
    .await;
    ada.leave().await;
    bob.leave().await;
}

#[tokio::test]
async fn a_native_peer_knocks_on_a_locked_room_and_is_let_in() {
    let server = Server::start(&[]).await;
    let mut host = server.client().await;
    host.join("locked", "Host").await;
    host.send(json!({"type": "lock", "locked": true})).await;
    host.expect("locked").await;

    let mut robot = Peer::start(&server, "locked", "Robot");
    robot
        .wait_for("knocking", |e| *e == PeerEvent::Knocking)
        .await;
    let knock = host.expect("knock").await;
    host.send(json!({"type": "admit", "id": knock["peer"]["id"]}))
        .await;
    robot.id().await;
    robot.leave().await;
}

#[tokio::test]
async fn garbage_from_another_peer_does_not_stop_the_native_peer() {
    let server = Server::start(&[]).await;
    let mut robot = Peer::start(&server, "garbage", "Robot");
    let robot_id = robot.id().await;
    let mut rogue = server.client().await;
    rogue.join("garbage", "Rogue").await;
    for data in [
        json!(null),
        json!("text"),
        json!({"description": {"type": "offer", "sdp": "v=0\r\nnot really"}}),
        json!({"description": {"type": "answer", "sdp": "v=0"}}),
        json!({"description": {"type": "offer", "sdp": "x".repeat(60_000)}}),
        json!({"candidate": {"candidate": "candidate:garbage"}}),
        json!({"candidate": {"candidate": "candidate:1 1 udp 1 127.0.0.1 99999 typ host"}}),
        json!({"restart": true}),
        json!({"resend": true}),
        json!({"state": {"audio": "loud"}}),
    ] {
        rogue
            .send(json!({"type": "signal", "to": robot_id, "data": data}))
            .await;
    }
    // Still in the room, and still meeting people.
    let mut ada = Peer::start(&server, "garbage", "Ada");
    let ada_id = ada.id().await;
    robot.connected_to(&ada_id).await;
    ada.say("still there?", None);
    robot.heard("still there?").await;
    // The robot answered none of it (it has read it all: Ada came after):
    // its state, said on meeting the rogue, is all that came back.
    rogue.send(json!({"type": "ping"})).await;
    loop {
        let message = rogue.recv().await;
        match message["type"].as_str() {
            Some("pong") => break,
            Some("signal") if message["from"] == robot_id.as_str() => {
                assert!(message["data"].get("state").is_some(), "{message}")
            }
            // Ada meeting the rogue.
            _ => {}
        }
    }

    robot.leave().await;
    ada.leave().await;
}

/// A TCP proxy in front of the server that can cut every connection
/// through it at once (no close frame: a lost connection, as a network
/// change makes), and takes new ones at once.
struct CuttableProxy {
    addr: SocketAddr,
    connections: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl CuttableProxy {
    async fn start(target: SocketAddr) -> CuttableProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(Mutex::new(Vec::new()));
        let held = connections.clone();
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let task = tokio::spawn(async move {
                    let mut server = tokio::net::TcpStream::connect(target).await.unwrap();
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                });
                held.lock().unwrap().push(task.abort_handle());
            }
        });
        CuttableProxy { addr, connections }
    }

    fn cut(&self) {
        for task in self.connections.lock().unwrap().drain(..) {
            task.abort();
        }
    }
}

fn id_of(event: PeerEvent) -> String {
    match event {
        PeerEvent::Rejoined { id, .. } | PeerEvent::Joined { id, .. } => id,
        other => panic!("not a join: {other:?}"),
    }
}

#[tokio::test]
async fn a_lost_signaling_connection_takes_its_place_back_and_the_call_goes_on() {
    let server = Server::start(&[]).await;
    let proxy = CuttableProxy::start(server.addr).await;
    let mut ada = Peer::start(&server, "lost", "Ada");
    let ada_id = ada.id().await;
    let mut robot = Peer::start_via(proxy.addr, "lost", "Robot");
    let robot_id = robot.id().await;
    robot.connected_to(&ada_id).await;

    proxy.cut();
    robot
        .wait_for("the loss", |e| matches!(e, PeerEvent::SignalingLost { .. }))
        .await;
    let back = robot
        .wait_for("rejoined", |e| matches!(e, PeerEvent::Rejoined { .. }))
        .await;
    assert_eq!(
        back,
        PeerEvent::Rejoined {
            id: robot_id.clone(),
            resumed: true
        }
    );
    // The same connection: chat goes on it, and Ada saw nobody leave.
    robot.say("still here", None);
    ada.heard("still here").await;
    ada.say("welcome back", None);
    robot.heard("welcome back").await;
    assert!(
        !ada.seen
            .iter()
            .any(|e| matches!(e, PeerEvent::PeerLeft { .. }))
    );
    assert_eq!(
        robot
            .seen
            .iter()
            .filter(|e| matches!(e, PeerEvent::Connected { .. }))
            .count(),
        1,
        "one connection, never made again: {:?}",
        robot.seen
    );
    robot.leave().await;
    ada.leave().await;
}

#[tokio::test]
async fn native_peers_keep_their_connection_through_a_restart_of_the_server() {
    meet_again_after_a_restart(RelayUse::Never).await;
}

#[tokio::test]
async fn relayed_native_peers_meet_again_after_a_restart_through_new_allocations() {
    meet_again_after_a_restart(RelayUse::Only).await;
}

async fn meet_again_after_a_restart(relay: RelayUse) {
    let server = Server::start(&[]).await;
    let addr = server.addr;
    let start = |name: &str| {
        Peer::start_with(PeerConfig {
            relay,
            ..config_for(addr, "restart", name)
        })
    };
    let mut ada = start("Ada");
    ada.id().await;
    let mut bob = start("Bob");
    let bob_id = bob.id().await;
    ada.connected_to(&bob_id).await;

    server.shutdown.cancel();
    tokio::time::timeout(WAIT, server.running.wait())
        .await
        .expect("the server stops");
    let _server = Server::start_at(&addr.to_string(), &[]).await;

    // Both come back under new ids, and meet again: directly, on the
    // same connection, each telling the other its new id over it
    // (`moved`); relayed, on new ones through new allocations.
    let rejoined = |e: &PeerEvent| matches!(e, PeerEvent::Rejoined { resumed: false, .. });
    let ada_id = id_of(ada.wait_for("Ada rejoined", rejoined).await);
    let bob_id = id_of(bob.wait_for("Bob rejoined", rejoined).await);
    if relay != RelayUse::Never {
        ada.connected_to(&bob_id).await;
        bob.connected_to(&ada_id).await;
    }
    bob.say("hello again", None);
    let heard = ada.heard("hello again").await;
    assert!(matches!(heard, PeerEvent::Chat { from, .. } if from == bob_id));
    ada.say("to you alone", Some(&bob_id));
    let heard = bob.heard("to you alone").await;
    assert!(matches!(heard, PeerEvent::Chat { from, private: true, .. } if from == ada_id));
    let connections = |p: &Peer| {
        p.seen
            .iter()
            .filter(|e| matches!(e, PeerEvent::Connected { .. }))
            .count()
    };
    let expected = if relay == RelayUse::Never { 1 } else { 2 };
    assert_eq!(connections(&ada), expected, "{:?}", ada.seen);
    assert_eq!(connections(&bob), expected, "{:?}", bob.seen);
    let (ada, bob) = (ada.leave().await, bob.leave().await);
    // Each closed one connection, to the other under the new id.
    for (summary, other) in [(&ada, &bob_id), (&bob, &ada_id)] {
        let last = summary.peers.last().expect("a connection");
        assert_eq!(&last.id, other);
        assert!(last.connected);
    }
    if relay == RelayUse::Never {
        assert_eq!(ada.peers.len(), 1, "{:?}", ada.peers);
        assert_eq!(bob.peers.len(), 1, "{:?}", bob.peers);
    }
}

#[tokio::test]
async fn over_tls_a_self_signed_server_is_trusted_by_its_fingerprint_only() {
    let server = Server::start(&["--tls-self-signed"]).await;
    let fingerprint = server.running.fingerprint.clone().expect("a certificate");
    let config = |name: &str, pin: Option<&str>| PeerConfig {
        server: format!("https://{}", server.addr),
        room: "tls".into(),
        name: name.into(),
        watching: false,
        access: None,
        bind: None,
        pin: pin.map(|p| p.parse().expect("the server's fingerprint")),
        relay: RelayUse::Never,
        send_media: false,
        save_files: None,
        relay_over: callisto_peer::RelayTransport::Udp,
    };

    let mut ada = Peer::start_with(config("Ada", Some(&fingerprint)));
    let ada_id = ada.id().await;
    let mut bob = Peer::start_with(config(
        "Bob",
        Some(&fingerprint.to_lowercase().replace(':', "")),
    ));
    bob.id().await;
    bob.connected_to(&ada_id).await;
    bob.say("over wss", None);
    ada.heard("over wss").await;

    // Not by the system's roots, and not by another fingerprint.
    let refused = |peer: Peer| async move {
        let error = tokio::time::timeout(WAIT, peer.task)
            .await
            .expect("gives up in time")
            .expect("no panic")
            .expect_err("refused");
        error.to_string()
    };
    let unknown = refused(Peer::start_with(config("Eve", None))).await;
    assert!(unknown.contains("not trusted (UnknownIssuer)"), "{unknown}");
    assert!(
        unknown.contains("--tls-fingerprint"),
        "says what to do: {unknown}"
    );
    let other = "00:".repeat(31) + "00";
    let wrong = refused(Peer::start_with(config("Eve", Some(&other)))).await;
    assert!(
        wrong.contains(&fingerprint),
        "names the certificate it got: {wrong}"
    );
    ada.leave().await;
    bob.leave().await;
}
