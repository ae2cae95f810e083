//! Prometheus metrics. Counters are recorded where things happen (through the
//! `metrics` facade, so library crates need no exporter); gauges and the
//! room-size histogram are computed from a hub snapshot at scrape time, so
//! they are exact rather than sampled.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::http::header;
use axum::routing::get;

use callisto_signal::HubStats;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

use crate::health::Health;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder on first call; later calls (a second
/// server in the same test process) share it.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!(
                    "a metrics recorder was already installed; /metrics will be incomplete"
                );
            }
            describe();
            // Which build is running, in the form dashboards join on.
            metrics::gauge!("callisto_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
            handle
        })
        .clone()
}

fn describe() {
    metrics::describe_gauge!(
        "callisto_build_info",
        "1, labelled with the version of Callisto running."
    );
    metrics::describe_counter!(
        "callisto_panics_total",
        "Panics (bugs), each logged at error with its thread and place."
    );
    metrics::describe_counter!(
        "callisto_signaling_messages_received_total",
        "Valid signaling messages received, by type."
    );
    metrics::describe_counter!(
        "callisto_signaling_messages_sent_total",
        "Signaling messages sent, by type (a broadcast counts once)."
    );
    metrics::describe_counter!(
        "callisto_signaling_errors_total",
        "Error messages sent to clients, by code."
    );
    metrics::describe_counter!(
        "callisto_signaling_evictions_total",
        "Peers dropped because they did not read their messages."
    );
    metrics::describe_counter!(
        "callisto_tls_certificate_reloads_total",
        "Times the TLS certificate files were read again (SIGHUP, or seen to change), by result: replaced, unchanged, failed (the served certificate stays)."
    );
    metrics::describe_counter!(
        "callisto_turn_secret_reloads_total",
        "Times --turn-secrets-file was read again on SIGHUP, by result: replaced, failed (the secrets stay)."
    );
    metrics::describe_gauge!(
        "callisto_signaling_connections",
        "Open signaling WebSocket connections, joined or not."
    );
}

/// Upper bounds of the room-size histogram's buckets.
const ROOM_SIZE_BUCKETS: [usize; 9] = [1, 2, 3, 4, 6, 8, 12, 16, 32];

/// The full `/metrics` text: recorded counters, the hub snapshot and the
/// bytes waiting in the signaling clients' send queues.
pub fn render(handle: &PrometheusHandle, stats: &HubStats, queued_bytes: usize) -> String {
    let mut out = handle.render();
    let _ = writeln!(
        out,
        "# HELP callisto_signaling_queued_bytes Bytes waiting in all signaling clients' send queues (bounded by --max-queued-bytes).\n# TYPE callisto_signaling_queued_bytes gauge\ncallisto_signaling_queued_bytes {queued_bytes}"
    );
    let _ = writeln!(
        out,
        "# HELP callisto_clients Peers currently joined to a room.\n# TYPE callisto_clients gauge\ncallisto_clients {}",
        stats.peers
    );
    let _ = writeln!(
        out,
        "# HELP callisto_clients_away Joined peers whose connection was lost, their place kept for a resume (--resume-grace).\n# TYPE callisto_clients_away gauge\ncallisto_clients_away {}",
        stats.away
    );
    let _ = writeln!(
        out,
        "# HELP callisto_clients_watching Joined peers who only watch (join.watching).\n# TYPE callisto_clients_watching gauge\ncallisto_clients_watching {}",
        stats.watching
    );
    let _ = writeln!(
        out,
        "# HELP callisto_rooms Rooms currently open.\n# TYPE callisto_rooms gauge\ncallisto_rooms {}",
        stats.rooms
    );
    let _ = writeln!(
        out,
        "# HELP callisto_room_size Current rooms by number of peers.\n# TYPE callisto_room_size histogram"
    );
    for le in ROOM_SIZE_BUCKETS {
        let n = stats.room_sizes.iter().filter(|&&s| s <= le).count();
        let _ = writeln!(out, "callisto_room_size_bucket{{le=\"{le}\"}} {n}");
    }
    let sum: usize = stats.room_sizes.iter().sum();
    let _ = writeln!(
        out,
        "callisto_room_size_bucket{{le=\"+Inf\"}} {}\ncallisto_room_size_sum {sum}\ncallisto_room_size_count {}",
        stats.room_sizes.len(),
        stats.room_sizes.len()
    );
    out
}

/// Content type of the Prometheus text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// `/metrics` and `/healthz` for `callisto turn`, which has no web
/// server: bound before TURN starts, so that a taken port stops it first
/// and the recorder is in place before anything records; served once
/// TURN runs, for its health.
pub struct StandaloneMetrics {
    handle: PrometheusHandle,
    listener: tokio::net::TcpListener,
}

impl StandaloneMetrics {
    pub async fn bind(listen: SocketAddr) -> anyhow::Result<Self> {
        let handle = install();
        let listener = bind_own_port(listen).await?;
        Ok(StandaloneMetrics { handle, listener })
    }

    /// Serves until the process ends; returns the bound address.
    pub fn serve(self, health: Health) -> anyhow::Result<SocketAddr> {
        let handle = self.handle;
        serve_on_own_port(
            self.listener,
            Arc::new(move || handle.render()),
            health,
            CancellationToken::new(),
        )
    }
}

/// The text `/metrics` answers with, made at each scrape.
pub type MetricsText = Arc<dyn Fn() -> String + Send + Sync>;

/// Binds `--metrics-listen`.
pub async fn bind_own_port(listen: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(listen).await.with_context(|| {
        format!(
            "cannot listen on {listen}: is another program using that port? Choose another with --metrics-listen"
        )
    })
}

/// Serves `/metrics` (with `text`) and `/healthz` (with `health`) over
/// plain HTTP on `listener` until `stop`; returns its address.
pub fn serve_on_own_port(
    listener: tokio::net::TcpListener,
    text: MetricsText,
    health: Health,
    stop: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let bound = listener.local_addr()?;
    // Scrapers hold a connection or two; the limits keep a mistakenly
    // public port from taking the TURN server's file descriptors.
    let listener = crate::connections::LimitedListener::new(
        listener,
        callisto_turn::net::ConnectionLimits {
            total: 64,
            per_source: 16,
        },
        Duration::from_secs(60),
        "the metrics listener takes 64, 16 from one address, which is plenty for scrapers: keep it off the public internet",
    );
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let text = text();
                async move { ([(header::CONTENT_TYPE, CONTENT_TYPE)], text) }
            }),
        )
        .route("/healthz", get(move || async move { health.response() }));
    tokio::spawn(crate::http_server::serve(
        listener,
        app,
        Duration::from_secs(10),
        stop,
    ));
    tracing::info!(metrics = %bound, "metrics are served at /metrics");
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let handle = PrometheusBuilder::new().build_recorder().handle();
        let stats = HubStats {
            peers: 7,
            away: 2,
            watching: 4,
            rooms: 3,
            room_sizes: vec![1, 2, 4],
        };
        let text = render(&handle, &stats, 0);
        assert!(text.contains("callisto_clients 7\n"));
        assert!(text.contains("callisto_clients_away 2\n"));
        assert!(text.contains("callisto_clients_watching 4\n"));
        assert!(text.contains("callisto_rooms 3\n"));
        assert!(text.contains("callisto_room_size_bucket{le=\"1\"} 1\n"));
        assert!(text.contains("callisto_room_size_bucket{le=\"3\"} 2\n"));
        assert!(text.contains("callisto_room_size_bucket{le=\"4\"} 3\n"));
        assert!(text.contains("callisto_room_size_bucket{le=\"+Inf\"} 3\n"));
        assert!(text.contains("callisto_room_size_sum 7\n"));
    }
}
