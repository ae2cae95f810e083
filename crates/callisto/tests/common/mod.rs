//! Test harness: a real server on an ephemeral loopback port and real
//! WebSocket clients.

#![allow(dead_code)]

use std::time::Duration;

use callisto::cli::{Cli, Command};
use callisto::serve::{Running, start};
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

pub const TIMEOUT: Duration = Duration::from_secs(10);

/// A fresh directory under the system's temporary one, removed when
/// dropped.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    /// `callisto-<what>-<pid>`, emptied first.
    pub fn new(what: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("callisto-{what}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Seconds since the Unix epoch, as TURN credentials and certificates count.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

pub struct Server {
    pub running: Running,
    pub shutdown: CancellationToken,
    pub addr: std::net::SocketAddr,
}

impl Server {
    /// Starts `callisto serve --listen 127.0.0.1:0 EXTRA...`.
    pub async fn start(extra: &[&str]) -> Server {
        Server::start_at("127.0.0.1:0", extra).await
    }

    /// Starts `callisto serve --listen LISTEN EXTRA...`.
    pub async fn start_at(listen: &str, extra: &[&str]) -> Server {
        let mut argv = vec![
            "callisto",
            "serve",
            "--listen",
            listen,
            "--turn-listen",
            "127.0.0.1:0",
            "--turn-threads",
            "1",
        ];
        argv.extend_from_slice(extra);
        let Command::Serve(args) = Cli::try_parse_from(argv).expect("valid test flags").command
        else {
            unreachable!("serve was asked for")
        };
        let shutdown = CancellationToken::new();
        let running = start(args, shutdown.clone()).await.expect("server starts");
        let addr = running.local_addr;
        Server {
            running,
            shutdown,
            addr,
        }
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    pub async fn client(&self) -> Client {
        Client::connect(&self.ws_url()).await
    }

    /// A plain HTTP/1.1 GET; returns (status line + headers, body).
    pub async fn get(&self, path: &str) -> (String, String) {
        get_at(self.addr, path).await
    }

    /// The value of one unlabelled metric line, e.g. `callisto_rooms`.
    pub async fn metric(&self, name: &str) -> f64 {
        let (_, body) = self.get("/metrics").await;
        body.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("metric {name} missing from:\n{body}"))
            .trim()
            .parse()
            .unwrap()
    }
}

/// A plain HTTP/1.1 GET to `addr`; returns (status line + headers, body).
pub async fn get_at(addr: std::net::SocketAddr, path: &str) -> (String, String) {
    get_with(addr, path, "").await
}

/// [`get_at`], with `headers` (whole lines, each ending in CRLF) added.
pub async fn get_with(addr: std::net::SocketAddr, path: &str, headers: &str) -> (String, String) {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let req =
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{headers}\r\n");
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(TIMEOUT, tcp.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (head.to_owned(), body.to_owned())
}

pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

/// How a connection ended, as far as the client saw.
#[derive(Debug, PartialEq)]
pub enum Ended {
    Close(u16, String),
    Gone,
}

impl Client {
    /// A WebSocket handshake for `url` over `tcp`, with these headers
    /// added; the HTTP status if the server refuses.
    pub async fn handshake(
        tcp: TcpStream,
        url: &str,
        headers: &[(&str, &str)],
    ) -> Result<Client, u16> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
        let mut request = url.into_client_request().unwrap();
        for (name, value) in headers {
            request.headers_mut().insert(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        let handshake = tokio_tungstenite::client_async(request, MaybeTlsStream::Plain(tcp));
        match tokio::time::timeout(TIMEOUT, handshake)
            .await
            .expect("handshake in time")
        {
            Ok((ws, _)) => Ok(Client { ws }),
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                Err(response.status().as_u16())
            }
            Err(e) => panic!("websocket handshake for {url}: {e}"),
        }
    }

    pub async fn connect(url: &str) -> Client {
        let (ws, _) = tokio::time::timeout(TIMEOUT, tokio_tungstenite::connect_async(url))
            .await
            .expect("connect in time")
            .expect("websocket handshake");
        Client { ws }
    }

    pub async fn send(&mut self, v: Value) {
        self.send_text(&v.to_string()).await;
    }

    pub async fn send_text(&mut self, s: &str) {
        self.ws.send(Message::text(s)).await.expect("send");
    }

    /// The next JSON message; panics on timeout or close.
    pub async fn recv(&mut self) -> Value {
        loop {
            let msg = tokio::time::timeout(TIMEOUT, self.ws.next())
                .await
                .expect("a message in time")
                .expect("stream open")
                .expect("no websocket error");
            match msg {
                Message::Text(t) => {
                    return serde_json::from_str(t.as_str()).expect("JSON from server");
                }
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("unexpected frame {other:?}"),
            }
        }
    }

    /// The next message, which must have this `type`.
    pub async fn expect(&mut self, kind: &str) -> Value {
        let v = self.recv().await;
        assert_eq!(v["type"], kind, "expected {kind}, got {v}");
        v
    }

    /// The next message must be an error with this code.
    pub async fn expect_error(&mut self, code: &str) -> Value {
        let v = self.expect("error").await;
        assert_eq!(v["code"], code, "{v}");
        assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        v
    }

    /// Proves the connection still works.
    pub async fn ping(&mut self) {
        self.send(json!({"type": "ping"})).await;
        self.expect("pong").await;
    }

    /// Joins and returns the welcome.
    pub async fn join(&mut self, room: &str, name: &str) -> Value {
        self.send(json!({"type": "join", "room": room, "name": name}))
            .await;
        self.expect("welcome").await
    }

    /// Reads until the server closes; returns the close code and reason.
    pub async fn ended(&mut self) -> Ended {
        loop {
            match tokio::time::timeout(TIMEOUT, self.ws.next())
                .await
                .expect("close in time")
            {
                Some(Ok(Message::Close(Some(f)))) => {
                    return Ended::Close(u16::from(f.code), f.reason.to_string());
                }
                Some(Ok(Message::Close(None))) => return Ended::Close(1005, String::new()),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return Ended::Gone,
            }
        }
    }
}

/// Log lines, captured from the current thread: a `#[tokio::test]`'s
/// runtime has only that one, so the server's tasks log there too.
#[derive(Clone, Default)]
pub struct Logs(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    /// Captures what this thread logs until the guard is dropped.
    pub fn capture() -> (Logs, tracing::subscriber::DefaultGuard) {
        let logs = Logs::default();
        let guard = tracing::subscriber::set_default(logs.subscriber());
        (logs, guard)
    }

    /// A subscriber that writes here, as text.
    pub fn subscriber(&self) -> impl tracing::Subscriber + Send + Sync + 'static {
        let sink = self.clone();
        tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || sink.clone())
            .finish()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}
