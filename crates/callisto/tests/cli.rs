//! The real binary: help text, environment variables, bad flags, TLS
//! fingerprint, a clean exit on SIGTERM and SIGINT, and a short run of
//! the TURN benchmark.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_callisto");

fn callisto(args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args);
    // Parallel tests must not fight over the default TURN port.
    cmd.env("CALLISTO_TURN_LISTEN", "127.0.0.1:0");
    // Keep the developer's own CALLISTO_* settings out of the tests.
    for (key, _) in std::env::vars() {
        if key.starts_with("CALLISTO_") && key != "CALLISTO_TURN_LISTEN" {
            cmd.env_remove(key);
        }
    }
    cmd
}

#[test]
fn help_lists_every_flag_with_its_environment_variable() {
    let out = callisto(&["serve", "--help"]).output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for (flag, env) in [
        ("--listen", "CALLISTO_LISTEN"),
        ("--tls-cert", "CALLISTO_TLS_CERT"),
        ("--tls-key", "CALLISTO_TLS_KEY"),
        ("--tls-self-signed", "CALLISTO_TLS_SELF_SIGNED"),
        ("--tls-name", "CALLISTO_TLS_NAME"),
        ("--tls-recheck", "CALLISTO_TLS_RECHECK"),
        ("--max-room-size", "CALLISTO_MAX_ROOM_SIZE"),
        ("--max-message-bytes", "CALLISTO_MAX_MESSAGE_BYTES"),
        ("--heartbeat-timeout", "CALLISTO_HEARTBEAT_TIMEOUT"),
        ("--log-format", "CALLISTO_LOG_FORMAT"),
        ("--log", "CALLISTO_LOG"),
        ("--ice-server", "CALLISTO_ICE_SERVERS"),
        ("--max-queued-bytes", "CALLISTO_MAX_QUEUED_BYTES"),
        ("--metrics-listen", "CALLISTO_METRICS_LISTEN"),
        ("--turn-alternate-server", "CALLISTO_TURN_ALTERNATE_SERVERS"),
        (
            "--turn-tls-alternate-server",
            "CALLISTO_TURN_TLS_ALTERNATE_SERVERS",
        ),
        ("--turn-alternate-check", "CALLISTO_TURN_ALTERNATE_CHECK"),
        ("--turn-secrets-file", "CALLISTO_TURN_SECRETS_FILE"),
        ("--ice-secrets-file", "CALLISTO_ICE_SECRETS_FILE"),
        ("--trusted-proxy", "CALLISTO_TRUSTED_PROXIES"),
        ("--allowed-origin", "CALLISTO_ALLOWED_ORIGINS"),
    ] {
        assert!(help.contains(flag), "{flag} missing from help:\n{help}");
        assert!(help.contains(env), "{env} missing from help:\n{help}");
    }
}

#[test]
fn bad_flags_say_what_to_fix() {
    let out = callisto(&["serve", "--max-room-size", "many"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--max-room-size"), "{err}");

    let out = callisto(&[
        "serve",
        "--tls-cert",
        "/nonexistent/cert.pem",
        "--tls-key",
        "/nonexistent/key.pem",
    ])
    .output()
    .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/cert.pem"), "{err}");

    let out = callisto(&["serve", "--log", "info,[[["]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--log"));

    // A secret with nothing to sign, or beside a fixed password.
    for (extra, says) in [
        (
            &["--ice-server", "stun:stun.example.test:3478"][..],
            "add --ice-server turn:HOST:PORT",
        ),
        (
            &[
                "--ice-server",
                "turn:turn.example.test:3478",
                "--ice-username",
                "u",
                "--ice-credential",
                "p",
            ][..],
            "cannot be used with",
        ),
    ] {
        let mut args = vec!["serve", "--listen", "127.0.0.1:0", "--ice-secret", "s"];
        args.extend_from_slice(extra);
        let out = callisto(&args).output().unwrap();
        assert!(!out.status.success(), "{extra:?} was taken");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{extra:?}: {err}");
        assert!(!err.contains("serving"), "started before failing:\n{err}");
    }

    // A secrets file that cannot be read: named, with its flag.
    let out = callisto(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--ice-server",
        "turn:turn.example.test:3478",
        "--ice-secrets-file",
        "/nonexistent/ice-secrets",
    ])
    .output()
    .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--ice-secrets-file") && err.contains("/nonexistent/ice-secrets"),
        "{err}"
    );

    // Alternate TURN servers a client could not go to, or this one.
    for (alternate, says) in [
        ("0.0.0.0:3478", "clients need an address and a port"),
        ("192.0.2.10:0", "clients need an address and a port"),
        ("127.0.0.1:34781", "this server's own listening address"),
        ("turn.example.org", "--turn-alternate-server"),
    ] {
        let out = callisto(&[
            "turn",
            "--turn-listen",
            "127.0.0.1:34781",
            "--turn-secret",
            "s",
            "--turn-alternate-server",
            alternate,
        ])
        .output()
        .unwrap();
        assert!(!out.status.success(), "{alternate} was taken");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{alternate}: {err}");
        assert!(
            !err.contains("is serving"),
            "started before failing:\n{err}"
        );
    }
    // A file of alternates that is missing, or wrong, or given with the flags.
    let wrong =
        std::env::temp_dir().join(format!("callisto-cli-alternates-{}", std::process::id()));
    std::fs::write(&wrong, "192.0.2.10:3478\ntls nowhere\n").unwrap();
    for (file, also, says) in [
        ("/nonexistent/alternates", None, "create it"),
        (wrong.to_str().unwrap(), None, "line 2: \"tls nowhere\""),
        (
            wrong.to_str().unwrap(),
            Some("192.0.2.10:3478"),
            "cannot be used with",
        ),
    ] {
        let mut args = vec![
            "turn",
            "--turn-listen",
            "127.0.0.1:0",
            "--turn-secret",
            "s",
            "--turn-alternate-servers-file",
            file,
        ];
        if let Some(a) = also {
            args.extend(["--turn-alternate-server", a]);
        }
        let out = callisto(&args).output().unwrap();
        assert!(!out.status.success(), "{file} was taken");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{file}: {err}");
    }
    let _ = std::fs::remove_file(&wrong);

    // A port in use: which flag to change, and nothing started before.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().to_string();
    for (flag, args) in [
        ("--listen", vec!["serve", "--listen", &port]),
        (
            "--metrics-listen",
            vec![
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                &port,
            ],
        ),
    ] {
        let out = callisto(&args).output().unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!("Choose another with {flag}\n")),
            "{err}"
        );
        assert!(
            !err.contains("is serving"),
            "started before failing:\n{err}"
        );
    }
}

/// Starts the binary with JSON logs and waits for its "serving" line.
fn spawn_server(cmd: &mut Command) -> (Child, serde_json::Value, Vec<String>) {
    let mut child = cmd
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        let Some(Ok(line)) = lines.next() else { break };
        seen.push(line.clone());
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
            && v["url"].is_string()
        {
            std::thread::spawn(move || for _ in lines {});
            return (child, v, seen);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("server did not start:\n{}", seen.join("\n"));
}

fn stop(mut child: Child, signal: &str) {
    let status = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "exit status after {signal}: {status}");
            return;
        }
        assert!(Instant::now() < deadline, "no exit after {signal}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn environment_variables_configure_serve_and_sigterm_exits_cleanly() {
    let (child, line, _) = spawn_server(
        callisto(&["serve"])
            .env("CALLISTO_LISTEN", "127.0.0.1:0")
            .env("CALLISTO_LOG_FORMAT", "json"),
    );
    assert!(
        line["url"]
            .as_str()
            .unwrap()
            .starts_with("http://127.0.0.1:"),
        "{line}"
    );
    hang_up_goes_on_serving(child, "-TERM");
}

/// SIGHUP asks the server to re-read its files (here there are none): it
/// goes on serving, and then `signal` stops it.
fn hang_up_goes_on_serving(mut child: Child, signal: &str) {
    let status = Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        child.try_wait().unwrap().is_none(),
        "SIGHUP ended the server"
    );
    stop(child, signal);
}

#[test]
fn self_signed_tls_prints_the_fingerprint_and_sigint_exits_cleanly() {
    let (child, line, seen) = spawn_server(&mut callisto(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--log-format",
        "json",
        "--tls-self-signed",
        "--tls-name",
        "callisto.test",
    ]));
    assert!(
        line["url"].as_str().unwrap().starts_with("https://"),
        "{line}"
    );
    let fingerprint = seen
        .iter()
        .find_map(|l| l.strip_prefix("Self-signed certificate SHA-256 fingerprint: "))
        .expect("the fingerprint is printed before serving starts");
    assert_eq!(fingerprint.len(), 95, "{fingerprint}");
    hang_up_goes_on_serving(child, "-INT");
}

/// The benchmark still runs, over both families and with marked
/// datagrams: a short run against our own server, no figures judged
/// (those are for docs/benchmarks.md), only that each pattern reports.
#[test]
fn the_turn_benchmark_runs_over_both_families() {
    for extra in [&[][..], &["--ipv6", "--tos", "0xb9"][..]] {
        let out = callisto(&[
            "bench",
            "turn",
            "--servers",
            "callisto",
            "--allocations",
            "1",
        ])
        .args([
            "--payloads",
            "100",
            "--duration",
            "0.2",
            "--repeat",
            "1",
            "--rate",
            "1000",
        ])
        .args(extra)
        .output()
        .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{extra:?}: {text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for pattern in ["a: client↔peer", "b: client↔client"] {
            assert!(
                text.lines()
                    .any(|l| l.starts_with("| callisto |") && l.contains(pattern)),
                "{extra:?}: no row for {pattern}\n{text}"
            );
        }
    }
}
