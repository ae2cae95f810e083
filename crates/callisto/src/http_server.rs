//! The HTTP/1.1 server under the web app and `/metrics`: hyper on every
//! connection a listener admits, with a deadline for each request head.
//!
//! Not `axum::serve`, which gives hyper no timer: without one, hyper waits
//! for a request head as long as bytes trickle in, so a client sending one
//! byte a minute held its connection for good, idle limit or not. Here the
//! head of every request, and the wait for the next one on a kept-alive
//! connection, must be done within `head_timeout`.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::Request;
use axum::serve::Listener;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, ReadBuf};
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
            let io = Asking::new(io);
            let asking = io.asking.clone();
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
                if e.is_timeout() {
                    // hyper's own, the head's deadline: a request trickled
                    // in, or none came (a kept-alive connection left idle).
                    crate::connections::count_timeout(if asking.load(Ordering::Relaxed) {
                        "request_head"
                    } else {
                        "idle"
                    });
                }
                // Timeouts, resets and malformed requests: the client's
                // doing, and hyper has answered what it could.
                tracing::debug!(client = %addr, error = %e, "HTTP connection ended");
            }
        });
    }
    connections.close();
    connections.wait().await;
}

/// A connection that tells whether its client is in the middle of asking:
/// it has sent something since it was last answered.
struct Asking<S> {
    io: S,
    asking: Arc<AtomicBool>,
}

impl<S> Asking<S> {
    fn new(io: S) -> Self {
        Asking {
            io,
            asking: Arc::default(),
        }
    }

    /// Whatever it was, the server has written: the client is answered.
    fn answered<T>(
        &mut self,
        _: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.asking.store(false, Ordering::Relaxed);
        }
        polled
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Asking<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.asking.store(true, Ordering::Relaxed);
        }
        polled
    }
}

// A flush says nothing of an answer: hyper flushes whether it has
// written or not.
crate::connections::write_through!(Asking, Asking::answered, crate::connections::passed);
