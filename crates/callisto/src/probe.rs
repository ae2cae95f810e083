//! `callisto probe`: the native peer's NAT probe (`callisto_peer::probe`)
//! on the command line. One line per URL of the server's `iceServers`:
//! what worked and what the server saw, or why not.

use std::io::Write;

use anyhow::Context;
use callisto_peer::probe::{Finding, ProbeConfig, probe};
use serde_json::json;

use crate::cli::ProbeArgs;

/// Probes and prints; whether every URL worked.
pub async fn run(args: ProbeArgs) -> anyhow::Result<bool> {
    let config = ProbeConfig {
        server: args.target.server.clone(),
        access: args.target.access.clone(),
        pin: args.target.tls_fingerprint,
    };
    let findings = probe(&config).await.with_context(|| {
        format!(
            "asking {} for its STUN and TURN servers",
            args.target.server
        )
    })?;
    let mut out = std::io::stdout().lock();
    if findings.is_empty() {
        writeln!(
            out,
            "the server hands out no STUN or TURN server (--no-turn, and no --ice-server)"
        )?;
    }
    for finding in &findings {
        if args.json {
            writeln!(out, "{}", as_json(finding))?;
        } else {
            writeln!(out, "{}", as_text(finding))?;
        }
    }
    Ok(!findings.is_empty() && findings.iter().all(|f| f.outcome.is_ok()))
}

fn as_text(finding: &Finding) -> String {
    let took = finding.took.as_millis();
    match &finding.outcome {
        Ok(found) => {
            let seen = if found.behind_nat() {
                format!(
                    "seen as {} (from {} here: behind a NAT)",
                    found.mapped, found.local
                )
            } else {
                format!("seen as {} (no NAT between)", found.mapped)
            };
            match found.relayed {
                Some(relay) => format!("{}: ok in {took} ms, relay {relay}, {seen}", finding.url),
                None => format!("{}: ok in {took} ms, {seen}", finding.url),
            }
        }
        Err(why) => format!("{}: FAILED after {took} ms: {why}", finding.url),
    }
}

fn as_json(finding: &Finding) -> serde_json::Value {
    let took = finding.took.as_secs_f64() * 1000.0;
    match &finding.outcome {
        Ok(found) => json!({"url": finding.url, "ok": true, "ms": took,
            "local": found.local.to_string(), "mapped": found.mapped.to_string(),
            "behindNat": found.behind_nat(), "relayed": found.relayed.map(|r| r.to_string())}),
        Err(why) => json!({"url": finding.url, "ok": false, "ms": took, "error": why}),
    }
}
