//! The HTTP side: the embedded app, health, metrics and security headers.

mod common;

use common::Server;
use serde_json::json;

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
    ] {
        assert!(body.contains(needle), "missing {needle} in\n{body}");
    }
    assert!(server.metric("callisto_rooms").await >= 1.0);
}
