//! Which connections the web server takes, and when it lets a stuck one
//! go. Each connection is a file descriptor and a task, and without bounds
//! one host opening connections and sending nothing held them all, for
//! good. Bounded here as the TURN listeners are ([`Admission`]): in total
//! and per address, with the connection reset at once when over. And a
//! connection is closed when it sends nothing for `idle` (a WebSocket
//! client answers the server's pings, so a live one is never silent that
//! long), or takes nothing of what it is sent for as long: a client that
//! asks and never reads would otherwise hold its place for good.
//! (How long a request's head may take is hyper's to enforce: see
//! [`crate::http_server`].) A trusted reverse proxy's connections carry
//! many clients, so they are held to the total only; [`crate::http`]
//! holds each client behind it to its share of WebSockets.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use callisto_turn::net::admission::{Admission, Admitted, ConnectionLimits};
use socket2::SockRef;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Sleep;

use crate::trusted_proxies::TrustedProxies;

/// A TCP listener that admits connections within `limits`.
pub struct LimitedListener {
    tcp: TcpListener,
    admission: Arc<Admission>,
    idle: Duration,
    /// What the log tells an operator when it refuses.
    advice: &'static str,
    /// Sources held to the total only: each carries many clients, whose
    /// WebSockets [`crate::http`] holds to their share instead.
    proxies: TrustedProxies,
}

impl LimitedListener {
    /// `advice`: what to do if refusals are legitimate, for the log.
    pub fn new(
        tcp: TcpListener,
        limits: ConnectionLimits,
        idle: Duration,
        advice: &'static str,
    ) -> Self {
        LimitedListener {
            tcp,
            admission: Admission::new(limits),
            idle,
            advice,
            proxies: TrustedProxies::default(),
        }
    }

    /// Holds connections from `proxies` to the total only.
    pub fn with_proxies(mut self, proxies: TrustedProxies) -> Self {
        self.proxies = proxies;
        self
    }

    /// The next connection within the limits; those over them are reset.
    pub async fn accept(&mut self) -> (Guarded<TcpStream>, SocketAddr) {
        loop {
            let (tcp, from) = match self.tcp.accept().await {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors and the like: back off rather than spin.
                    tracing::warn!(error = %e, "accepting a TCP connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let now = Instant::now();
            let admitted = if self.proxies.trusts(from.ip()) {
                self.admission.admit_in_total(from.ip(), now)
            } else {
                self.admission.admit(from.ip(), now)
            };
            match admitted {
                Ok(admitted) => return (Guarded::new(tcp, admitted, self.idle), from),
                Err(refusal) => {
                    self.admission.count(
                        refusal,
                        "callisto_http_connections_refused_total",
                        "web",
                        self.advice,
                    );
                    // A reset: nothing is left behind, not even TIME_WAIT.
                    let _ = SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
                }
            }
        }
    }
}

impl axum::serve::Listener for LimitedListener {
    type Io = Guarded<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        LimitedListener::accept(self).await
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

/// An admitted connection: holds its place until dropped, and fails a read
/// that has waited `idle` for the client, or a write that has waited as
/// long for it to take something.
pub struct Guarded<S> {
    io: S,
    /// None: reads wait as long as they must.
    idle: Option<Duration>,
    deadline: Pin<Box<Sleep>>,
    /// Armed when a write finds the client's window full; disarmed when
    /// one makes progress.
    stalled: Option<Pin<Box<Sleep>>>,
    _admitted: Admitted,
}

impl<S> Guarded<S> {
    fn new(io: S, admitted: Admitted, idle: Duration) -> Self {
        Guarded {
            io,
            idle: Some(idle),
            deadline: Box::pin(tokio::time::sleep(idle)),
            stalled: None,
            _admitted: admitted,
        }
    }

    /// Passes on a write's (or flush's) progress; once writes have made
    /// none for `idle`, fails them.
    fn bound_write<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        let (Poll::Pending, Some(idle)) = (&polled, self.idle) else {
            self.stalled = None;
            return polled;
        };
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
        match stalled.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(timed_out(
                "not_reading",
                "the client took nothing it was sent for too long",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }

    /// Lets reads wait as long as they must, for a connection that keeps
    /// its own time (a TURN client's, whose allocation expires).
    pub fn wait_for_the_client(&mut self) {
        self.idle = None;
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let Some(idle) = this.idle else {
            return Pin::new(&mut this.io).poll_read(cx, buf);
        };
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(read) => {
                let next = tokio::time::Instant::now() + idle;
                this.deadline.as_mut().reset(next);
                Poll::Ready(read)
            }
            Poll::Pending => match this.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(timed_out(
                    "silent",
                    "the client sent nothing for too long",
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

/// Counts a web connection closed for taking too long, by `reason`.
pub fn count_timeout(reason: &'static str) {
    metrics::counter!("callisto_http_connections_timed_out_total", "reason" => reason).increment(1);
}

/// Counts a timeout and gives the error that closes the connection.
fn timed_out(reason: &'static str, why: &'static str) -> io::Error {
    count_timeout(reason);
    io::Error::new(io::ErrorKind::TimedOut, why)
}

/// A stream whose first byte was read to tell what it carries, and is
/// given back to whoever reads it next.
pub struct FirstByteBack<S> {
    first: Option<u8>,
    io: S,
}

impl<S: AsyncRead + Unpin> FirstByteBack<S> {
    /// Reads the first byte of `io`; None if it ends (or fails) first.
    pub async fn read(mut io: S) -> Option<(u8, FirstByteBack<S>)> {
        let mut first = [0u8; 1];
        match tokio::io::AsyncReadExt::read(&mut io, &mut first).await {
            Ok(1) => Some((
                first[0],
                FirstByteBack {
                    first: Some(first[0]),
                    io,
                },
            )),
            _ => None,
        }
    }
}

impl<S> FirstByteBack<S> {
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.io
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for FirstByteBack<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() > 0
            && let Some(b) = this.first.take()
        {
            buf.put_slice(&[b]);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

/// Implements `AsyncWrite` for a wrapper `$wrapper<S>` whose stream is its
/// field `io`: each call goes to `io`, and what it returns through the
/// function `$hook(&mut wrapper, cx, polled)` for writes, `$flush_hook` for
/// flushes and shutdowns.
macro_rules! write_through {
    ($wrapper:ident, $hook:path, $flush_hook:path) => {
        impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for $wrapper<S> {
            fn poll_write(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                data: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                let this = self.get_mut();
                let polled = std::pin::Pin::new(&mut this.io).poll_write(cx, data);
                $hook(this, cx, polled)
            }

            fn poll_write_vectored(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                data: &[std::io::IoSlice<'_>],
            ) -> std::task::Poll<std::io::Result<usize>> {
                let this = self.get_mut();
                let polled = std::pin::Pin::new(&mut this.io).poll_write_vectored(cx, data);
                $hook(this, cx, polled)
            }

            fn is_write_vectored(&self) -> bool {
                self.io.is_write_vectored()
            }

            fn poll_flush(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                let this = self.get_mut();
                let polled = std::pin::Pin::new(&mut this.io).poll_flush(cx);
                $flush_hook(this, cx, polled)
            }

            fn poll_shutdown(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                let this = self.get_mut();
                let polled = std::pin::Pin::new(&mut this.io).poll_shutdown(cx);
                $flush_hook(this, cx, polled)
            }
        }
    };
}
pub(crate) use write_through;

/// A hook for [`write_through!`] that passes what it is given: for writes
/// a wrapper lets through untouched.
pub(crate) fn passed<W, T>(
    _: &mut W,
    _: &mut Context<'_>,
    polled: Poll<io::Result<T>>,
) -> Poll<io::Result<T>> {
    polled
}

// FirstByteBack only changes how its stream is read.
write_through!(FirstByteBack, passed, passed);
write_through!(Guarded, Guarded::bound_write, Guarded::bound_write);

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn the_first_byte_is_read_again() {
        let (mut near, far) = tokio::io::duplex(64);
        near.write_all(b"GET / HTTP/1.1").await.unwrap();
        let (first, mut back) = FirstByteBack::read(far).await.unwrap();
        assert_eq!(first, b'G');
        let mut text = [0u8; 14];
        back.read_exact(&mut text).await.unwrap();
        assert_eq!(&text, b"GET / HTTP/1.1");
        // Writes go through untouched.
        back.write_all(b"ok").await.unwrap();
        let mut reply = [0u8; 2];
        near.read_exact(&mut reply).await.unwrap();
        assert_eq!(&reply, b"ok");
        // A stream that ends before its first byte gives nothing.
        let (near, far) = tokio::io::duplex(64);
        drop(near);
        assert!(FirstByteBack::read(far).await.is_none());
    }
}
