//! `callisto probe` (callisto_peer::probe) against the real server: its
//! STUN and its TURN over UDP, TCP and TLS, as handed out in `welcome`.

mod common;

use callisto_peer::probe::{ProbeConfig, probe};
use common::Server;

#[tokio::test]
async fn every_stun_and_turn_url_of_a_server_works_from_here() {
    let server = Server::start(&[
        "--tls-self-signed",
        "--ice-server",
        "stun:127.0.0.1:9",
        "--metrics-listen",
        "127.0.0.1:0",
    ])
    .await;
    let pin = server.running.fingerprint.clone().expect("a certificate");
    let config = ProbeConfig {
        server: format!("https://{}", server.addr),
        access: None,
        pin: Some(pin.parse().unwrap()),
    };
    let findings = probe(&config).await.expect("the server answers");
    let urls: Vec<&str> = findings.iter().map(|f| f.url.as_str()).collect();
    let scheme = |u: &&str| u.split(['?', ':']).next().unwrap_or("").to_owned();
    assert!(
        urls.iter()
            .any(|u| u.starts_with("stun:") && !u.ends_with(":9")),
        "{urls:?}"
    );
    assert!(
        urls.iter().any(|u| u.ends_with("?transport=udp")),
        "{urls:?}"
    );
    assert!(
        urls.iter()
            .any(|u| u.starts_with("turn:") && u.ends_with("?transport=tcp")),
        "{urls:?}"
    );
    assert!(
        urls.iter().any(|u| scheme(u) == "turns"),
        "TURN over TLS, on the HTTPS port: {urls:?}"
    );
    for finding in &findings {
        if finding.url == "stun:127.0.0.1:9" {
            // Nothing listens there: said, not hung on.
            let why = finding.outcome.as_ref().expect_err("nothing there");
            assert!(why.to_lowercase().contains("refused"), "{why}");
            continue;
        }
        let found = finding
            .outcome
            .as_ref()
            .unwrap_or_else(|e| panic!("{}: {e}", finding.url));
        assert!(!found.behind_nat(), "{}: {found:?}", finding.url);
        assert!(found.mapped.ip().is_loopback(), "{found:?}");
        match found.relayed {
            Some(relay) => {
                assert!(finding.url.starts_with("turn"), "{}", finding.url);
                assert!(relay.ip().is_loopback(), "{relay}");
            }
            None => assert!(finding.url.starts_with("stun:"), "{}", finding.url),
        }
    }
    // The allocations were given back at once.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    let metrics = server.running.metrics_addr.expect("metrics served");
    let allocations = || async {
        let (_, body) = common::get_at(metrics, "/metrics").await;
        body.lines()
            .find_map(|l| l.strip_prefix("callisto_turn_allocations "))
            .map(|v| v.trim().parse::<f64>().unwrap())
            .unwrap_or_else(|| panic!("no callisto_turn_allocations in {body}"))
    };
    while allocations().await > 0.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "allocations released"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_server_that_refuses_the_probe_says_why() {
    let dir = common::TempDir::new("probe-codes");
    let codes = dir.0.join("codes");
    std::fs::write(&codes, "open-sesame-1234\n").unwrap();
    // No TURN here: the other test counts the server's allocations, and
    // the metrics are the process's.
    let server = Server::start(&[
        "--access-codes-file",
        codes.to_str().unwrap(),
        "--no-turn",
        "--ice-server",
        "stun:127.0.0.1:9",
    ])
    .await;
    let config = ProbeConfig {
        server: format!("http://{}", server.addr),
        access: None,
        pin: None,
    };
    let error = probe(&config).await.expect_err("no access code");
    assert!(error.to_string().contains("access-denied"), "{error}");
    let config = ProbeConfig {
        access: Some("open-sesame-1234".into()),
        ..config
    };
    let findings = probe(&config).await.expect("with the code");
    assert_eq!(findings.len(), 1, "{findings:?}");
    assert_eq!(findings[0].url, "stun:127.0.0.1:9");
}
