//! The HTTP routes: the embedded web app, the `/ws` signaling endpoint,
//! `/healthz` and `/metrics`, with security headers on every response.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::Router;
use axum::extract::{ConnectInfo, Request, State, WebSocketUpgrade};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use callisto_signal::{ConnectionConfig, Remote, SharedHub, handle_socket};
use callisto_turn::net::admission::Admission;
use callisto_turn::server::FailureLog;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::origins::{ForeignOrigin, OriginPolicy};
use crate::trusted_proxies::{TrustedProxies, X_FORWARDED_FOR};

/// The client's address, for logs: put into each request by
/// [`crate::http_server::serve`], whatever the listener.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub SocketAddr);

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    pub hub: SharedHub,
    pub connection: Arc<ConnectionConfig>,
    pub metrics: PrometheusHandle,
    pub shutdown: CancellationToken,
    /// Tracks WebSocket tasks so shutdown can wait for their close frames.
    pub sockets: TaskTracker,
    /// Whose X-Forwarded-For names the client.
    pub proxies: TrustedProxies,
    /// The WebSockets that came through those proxies, by client: their
    /// connections were held to the total only when accepted, so each
    /// client is held to its share here.
    pub proxied_clients: Arc<Admission>,
    /// Which other sites' pages may open WebSockets.
    pub origins: Arc<OriginPolicy>,
    /// Bounds the log lines about refused origins.
    pub origin_log: Arc<Mutex<FailureLog>>,
    /// What `/healthz` checks.
    pub health: crate::health::Health,
}

/// The web port's routes; `/metrics` among them unless `metrics_here` is
/// false (they are served on a port of their own).
pub fn router(state: AppState, metrics_here: bool) -> Router {
    let routes = Router::new()
        .route("/", get(app_page))
        .route("/r/{room}", get(app_page))
        .route("/ws", get(websocket))
        .route("/healthz", get(healthz));
    let routes = if metrics_here {
        routes.route("/metrics", get(metrics))
    } else {
        routes
    };
    routes
        .fallback(get(static_asset))
        .layer(middleware::from_fn(security_headers))
        .with_state(state)
}

async fn app_page(headers: HeaderMap) -> Response {
    crate::revalidation::respond(callisto_web::index(), &headers)
}

async fn static_asset(uri: Uri, headers: HeaderMap) -> Response {
    match callisto_web::asset(uri.path()) {
        Some(asset) => crate::revalidation::respond(asset, &headers),
        None => (StatusCode::NOT_FOUND, "not found\n").into_response(),
    }
}

/// Each WebSocket connection's read buffer, and how much it writes at once.
const READ_BUFFER: usize = 2048;
const WRITE_BUFFER: usize = 16 * 1024;

async fn websocket(
    State(state): State<AppState>,
    ConnectInfo(ClientAddr(peer)): ConnectInfo<ClientAddr>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    if state.shutdown.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response();
    }
    let from_proxy = state.proxies.trusts(peer.ip());
    let forwarded_for = headers
        .get_all(X_FORWARDED_FOR)
        .iter()
        .map(|v| v.as_bytes());
    let remote = state.proxies.client(peer, forwarded_for);
    let origin = headers.get(header::ORIGIN).map(|v| v.as_bytes());
    let host = headers.get(header::HOST).map(|v| v.as_bytes());
    let forwarded_host = headers
        .get("x-forwarded-host")
        .filter(|_| from_proxy)
        .map(|v| v.as_bytes());
    if let Err(foreign) = state.origins.check(origin, host, forwarded_host) {
        return refuse_origin(&state, remote, foreign);
    }
    // A page holds one WebSocket for as long as it is open: the connection
    // worth holding a client to its share of.
    let place = if from_proxy {
        match state.proxied_clients.admit(remote.ip(), Instant::now()) {
            Ok(place) => Some(place),
            Err(refusal) => {
                state.proxied_clients.count(
                    refusal,
                    "callisto_http_connections_refused_total",
                    "proxied WebSocket",
                    "if they are legitimate, raise --max-connections-per-ip",
                );
                return (
                    StatusCode::TOO_MANY_REQUESTS,
                    "too many connections from your address\n",
                )
                    .into_response();
            }
        }
    } else {
        None
    };
    let limit = state.connection.max_message_bytes;
    upgrade
        .protocols([callisto_protocol::SUBPROTOCOL_V1])
        // A little above the protocol limit, so that a slightly-too-large
        // message reaches the connection task and gets a `too-large` error
        // before the close, while a huge one is cut off by tungstenite
        // without being buffered.
        .max_message_size(limit + 1024)
        .max_frame_size(limit + 1024)
        // tungstenite zero-fills its whole read buffer on the first read
        // (128 KiB by default: 10,000 clients would hold 1.3 GB). Signaling
        // messages are small, and the buffer grows for a large one.
        .read_buffer_size(READ_BUFFER)
        // Frames are written through once this much is waiting: small
        // ones (ICE candidates) are batched, and the buffer stays small.
        .write_buffer_size(WRITE_BUFFER)
        .on_failed_upgrade(|e| tracing::debug!(error = %e, "websocket upgrade failed"))
        .on_upgrade(move |socket| {
            state.sockets.track_future(async move {
                handle_socket(socket, state.hub, state.connection, state.shutdown, remote).await;
                drop(place);
            })
        })
}

/// Answers a WebSocket request from another site's page: 403, a count,
/// and a line in the log (at most [`FailureLog`]'s).
fn refuse_origin(state: &AppState, remote: Remote, foreign: ForeignOrigin) -> Response {
    metrics::counter!("callisto_http_websockets_refused_total", "reason" => "foreign_origin")
        .increment(1);
    let logged = state
        .origin_log
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .admit(Instant::now());
    if let Some(left_out) = logged {
        tracing::info!(
            %remote,
            origin = %foreign.origin,
            host = %foreign.host,
            left_out,
            "refused a WebSocket from another site's page; if that page is yours, add --allowed-origin, and behind a proxy, pass the Host header on"
        );
    }
    (
        StatusCode::FORBIDDEN,
        format!("{foreign}: pages of other sites need --allowed-origin\n"),
    )
        .into_response()
}

async fn healthz(State(state): State<AppState>) -> Response {
    state.health.response()
}

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, crate::telemetry::CONTENT_TYPE)],
        metrics_text(&state),
    )
        .into_response()
}

/// All of `/metrics`: what was recorded, and the hub's state now.
pub(crate) fn metrics_text(state: &AppState) -> String {
    let stats = state.hub.lock().unwrap_or_else(|p| p.into_inner()).stats();
    crate::telemetry::render(
        &state.metrics,
        &stats,
        state.connection.send_budget.queued(),
    )
}

/// The page loads only its own scripts and styles; media and WebSocket
/// connections stay same-origin.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; \
media-src 'self' blob: mediastream:; connect-src 'self'; object-src 'none'; base-uri 'none'; \
frame-ancestors 'none'; form-action 'self'";

async fn security_headers(req: Request, next: Next) -> Response {
    let mut res = next.run(req).await;
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        "permissions-policy",
        HeaderValue::from_static("camera=(self), microphone=(self), display-capture=(self)"),
    );
    h.insert(
        "cross-origin-opener-policy",
        HeaderValue::from_static("same-origin"),
    );
    res
}
