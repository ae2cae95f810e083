//! The HTTP/1.1 server under the web app and `/metrics`: hyper on every
//! connection a listener admits, with a deadline for each request head.
//!
//! Not `axum::serve`, which gives hyper no timer: without one, hyper waits
//! for a request head as long as bytes trickle in, so a client sending one
//! byte a minute held its connection for good, idle limit or not. Here the
//! head of every request, and the wait for the next one on a kept-alive
//! connection, must be done within `head_timeout`.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::Request;
use axum::serve::Listener;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_service::Service;

use crate::http::ClientAddr;

/// Serves `app` on `listener`'s connections until `stop`; then stops
/// accepting, lets each connection finish the request it is serving, and
/// returns once all have closed. Handlers find the client's address as
/// `ConnectInfo<ClientAddr>`.
pub async fn serve<L>(mut listener: L, app: Router, head_timeout: Duration, stop: CancellationToken)
where
    L: Listener<Addr = SocketAddr>,
{
    let connections = TaskTracker::new();
    loop {
        let (io, addr) = tokio::select! {
            conn = listener.accept() => conn,
            () = stop.cancelled() => break,
        };
        let app = app.clone();
        let stop = stop.clone();
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
                request
                    .extensions_mut()
                    .insert(ConnectInfo(ClientAddr(addr)));
                // A Router is always ready: no need to poll it first.
                app.clone().call(request.map(Body::new))
            });
            let mut http = http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(head_timeout);
            let conn = http
                .serve_connection(TokioIo::new(io), service)
                .with_upgrades();
            tokio::pin!(conn);
            let served = tokio::select! {
                served = conn.as_mut() => served,
                () = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = served {
                // Timeouts, resets and malformed requests: the client's
                // doing, and hyper has answered what it could.
                tracing::debug!(client = %addr, error = %e, "HTTP connection ended");
            }
        });
    }
    connections.close();
    connections.wait().await;
}
