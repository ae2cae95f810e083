//! `callisto load` against the real server: native peers in rooms of their
//! own, connected pairwise, chatting; and a server that turns some away.

mod common;

use std::time::Duration;

use callisto::load::{LoadPlan, load};
use callisto_peer::{RelayTransport, RelayUse};
use common::Server;

fn plan(server: &Server, rooms: u32, peers: u32) -> LoadPlan {
    LoadPlan {
        server: format!("http://{}", server.addr),
        rooms,
        peers,
        watching: 0,
        // Long enough that connecting (well under a second here) leaves
        // seconds of chat before the last quiet one.
        duration: Duration::from_secs(6),
        ramp: Duration::from_millis(500),
        chat_every: Some(Duration::from_millis(200)),
        access: None,
        pin: None,
        relay: RelayUse::Never,
        relay_over: RelayTransport::Udp,
        send_media: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_of_native_peers_connect_pairwise_and_every_message_arrives() {
    let server = Server::start(&[]).await;
    let report = load(&plan(&server, 2, 3)).await.unwrap();
    assert_eq!(report.peers, 6);
    assert_eq!(report.joined, 6, "{report:?}");
    assert_eq!(report.connections_expected, 12);
    assert_eq!(report.connections, 12, "{report:?}");
    assert!(report.chat_sent > 0, "{report:?}");
    // Each message to the two others of its room, none lost.
    assert_eq!(report.chat_expected, report.chat_sent * 2);
    assert_eq!(report.chat_received, report.chat_expected, "{report:?}");
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert!(report.all_well());
    let chat = report.chat.expect("delivery times");
    assert!(chat.p50 <= chat.p99 && chat.p99 <= chat.max);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_audience_meets_only_those_taking_part_and_hears_them() {
    let server = Server::start(&[]).await;
    let report = load(&LoadPlan {
        watching: 2,
        send_media: true,
        ..plan(&server, 1, 4)
    })
    .await
    .unwrap();
    assert_eq!(report.joined, 4, "{report:?}");
    // Two taking part meet everyone (3 each); two watching, only them (2
    // each), not each other.
    assert_eq!(report.connections_expected, 10);
    assert_eq!(report.connections, 10, "{report:?}");
    assert!(report.chat_sent > 0, "{report:?}");
    assert_eq!(report.chat_received, report.chat_expected, "{report:?}");
    assert!(report.all_well(), "{report:?}");
    // Pattern and tone from the two taking part, at each of the three
    // others, for seconds: 15 and 50 frames a second.
    assert!(report.media.video_frames > 3 * 2 * 15, "{report:?}");
    assert!(report.media.audio_frames > 3 * 2 * 50, "{report:?}");
}

/// Everyone through the server's TURN, reached over TCP: the stream
/// transport under load, every message delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_only_peers_over_turn_tcp_connect_and_every_message_arrives() {
    let server = Server::start(&[]).await;
    let report = load(&LoadPlan {
        relay: RelayUse::Only,
        relay_over: RelayTransport::Tcp,
        ..plan(&server, 1, 3)
    })
    .await
    .unwrap();
    assert_eq!(report.connections, 6, "{report:?}");
    assert!(report.chat_sent > 0, "{report:?}");
    assert_eq!(report.chat_received, report.chat_expected, "{report:?}");
    assert!(report.all_well(), "{report:?}");
    let (_, metrics) = server.get("/metrics").await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("callisto_turn_relayed_packets_total")
                && l.contains("transport=\"tcp\"")
                && !l.ends_with(" 0")),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_turned_away_are_reported_with_the_servers_reason() {
    let server = Server::start(&["--max-room-size", "2"]).await;
    let report = load(&plan(&server, 1, 3)).await.unwrap();
    assert_eq!(report.joined, 2, "{report:?}");
    assert_eq!(report.errors.len(), 1, "{:?}", report.errors);
    assert!(
        report.errors[0].contains("room-full"),
        "{:?}",
        report.errors
    );
    assert!(!report.all_well());
}
