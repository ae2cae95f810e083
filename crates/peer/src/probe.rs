//! The NAT probe: what a Callisto server's STUN and TURN look like from
//! this machine. It asks the server for the `iceServers` a browser would
//! get (by joining a room of its own, at random, and leaving at once),
//! then tries each URL as a browser would: a STUN Binding (the address
//! the server sees us from), and a TURN allocation over UDP, TCP or TLS
//! with the credentials handed out (the relay address), released at once.
//! So an operator sees from any machine whether calls from there can
//! connect, and a person whether they are behind a NAT.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use callisto_protocol::{ReceivedIceServer, decode_server};
use callisto_turn::client::Client;
use callisto_turn::stun::{Class, Message, MessageBuilder, attr, method};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::peer::{PeerError, open, websocket_url};
use crate::relay::{Local, ToServer, allocate_over_stream, allocate_udp, bound_udp, tid_seed};
use crate::tls::{Fingerprint, client_config};

/// How long one URL is given to answer.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
// The longest STUN or TURN message read.
const MAX_MESSAGE: usize = crate::relay::MAX_DATAGRAM;

/// Which server to probe, and how to get in.
#[derive(Debug, Clone)]
pub struct ProbeConfig {
    pub server: String,
    pub access: Option<String>,
    pub pin: Option<Fingerprint>,
}

/// One `iceServers` URL, as far as the probe reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IceUrl {
    pub kind: IceKind,
    pub host: String,
    pub port: u16,
}

/// A STUN server, or a TURN server over UDP, TCP or TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IceKind {
    Stun,
    TurnUdp,
    TurnTcp,
    TurnTls,
}

impl std::str::FromStr for IceUrl {
    type Err = String;

    /// `stun:HOST[:PORT]`, `turn:HOST[:PORT][?transport=udp|tcp]` and
    /// `turns:HOST[:PORT][?transport=tcp]` (RFC 7064, RFC 7065); HOST may
    /// be an IPv6 address in brackets.
    fn from_str(url: &str) -> Result<IceUrl, String> {
        let bad = |why: &str| format!("{url:?}: {why}");
        let (scheme, rest) = url.split_once(':').ok_or_else(|| bad("no scheme"))?;
        let (address, query) = match rest.split_once('?') {
            Some((address, query)) => (address, Some(query)),
            None => (rest, None),
        };
        let transport = match query {
            None => None,
            Some(q) => Some(
                q.strip_prefix("transport=")
                    .ok_or_else(|| bad("the only parameter read is transport"))?,
            ),
        };
        let kind = match (scheme, transport) {
            ("stun", None) => IceKind::Stun,
            ("turn", None | Some("udp")) => IceKind::TurnUdp,
            ("turn", Some("tcp")) => IceKind::TurnTcp,
            ("turns", None | Some("tcp")) => IceKind::TurnTls,
            _ => return Err(bad("not stun:, turn: (udp or tcp) or turns: (tcp)")),
        };
        let default_port = if kind == IceKind::TurnTls { 5349 } else { 3478 };
        let (host, port) = if let Some(v6) = address.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| bad("no ] after the IPv6 address"))?;
            match after {
                "" => (host, default_port),
                port => (
                    host,
                    parse_port(port.strip_prefix(':').ok_or_else(|| bad("junk after ]"))?)
                        .ok_or_else(|| bad("bad port"))?,
                ),
            }
        } else {
            match address.rsplit_once(':') {
                Some((host, port)) => (host, parse_port(port).ok_or_else(|| bad("bad port"))?),
                None => (address, default_port),
            }
        };
        if host.is_empty() || host.contains(['/', '@', ' ', '[', ']']) {
            return Err(bad("bad host"));
        }
        Ok(IceUrl {
            kind,
            host: host.to_owned(),
            port,
        })
    }
}

fn parse_port(text: &str) -> Option<u16> {
    text.parse().ok().filter(|&p| p != 0)
}

/// What one URL showed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub url: String,
    pub outcome: Result<Found, String>,
    /// From the first request to the answer that settled it.
    pub took: Duration,
}

/// What worked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// Our address on this machine.
    pub local: SocketAddr,
    /// Our address as the server saw it.
    pub mapped: SocketAddr,
    /// The relay address the TURN server gave us.
    pub relayed: Option<SocketAddr>,
}

impl Found {
    /// Whether an address translation stands between here and the server.
    pub fn behind_nat(&self) -> bool {
        self.local != self.mapped
    }
}

/// Probes every URL of the server's `iceServers`, in order.
pub async fn probe(config: &ProbeConfig) -> Result<Vec<Finding>, PeerError> {
    let servers = ice_servers(config).await?;
    // Needed for turns: URLs only; without it, only they fail.
    let tls = client_config(config.pin).map_err(|e| e.to_string());
    let mut findings = Vec::new();
    for server in &servers {
        for url in &server.urls {
            let started = Instant::now();
            let outcome = match url.parse::<IceUrl>() {
                Ok(target) => tokio::time::timeout(PROBE_TIMEOUT, probe_one(&target, server, &tls))
                    .await
                    .unwrap_or_else(|_| Err(format!("no answer within {PROBE_TIMEOUT:?}"))),
                Err(e) => Err(format!("not probed: {e}")),
            };
            findings.push(Finding {
                url: url.clone(),
                outcome,
                took: started.elapsed(),
            });
        }
    }
    Ok(findings)
}

/// The `iceServers` a browser joining a room would get: from a join of a
/// room nobody else knows, left at once.
async fn ice_servers(config: &ProbeConfig) -> Result<Vec<ReceivedIceServer>, PeerError> {
    let (mut ws, _) = open(&websocket_url(&config.server)?, config.pin).await?;
    let mut room = [0u8; 8];
    getrandom::fill(&mut room).map_err(|e| PeerError::Random(e.to_string()))?;
    let room: String = room.iter().map(|b| format!("{b:02x}")).collect();
    let mut join =
        json!({"type": "join", "room": format!("probe-{room}"), "name": "callisto probe"});
    if let Some(access) = &config.access {
        join["access"] = json!(access);
    }
    ws.send(WsMessage::text(join.to_string())).await?;
    let deadline = tokio::time::Instant::now() + PROBE_TIMEOUT;
    let servers = loop {
        let frame = tokio::time::timeout_at(deadline, ws.next())
            .await
            .map_err(|_| PeerError::JoinTimeout(PROBE_TIMEOUT))?;
        match frame {
            Some(Ok(WsMessage::Text(text))) => match decode_server(&text) {
                Ok(callisto_protocol::Received::Welcome { ice_servers, .. }) => break ice_servers,
                Ok(callisto_protocol::Received::Error { code, message }) => {
                    return Err(PeerError::Refused { code, message });
                }
                _ => {}
            },
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.into()),
            None => {
                return Err(PeerError::Closed {
                    code: 1006,
                    reason: "before the welcome".into(),
                });
            }
        }
    };
    let _ = ws
        .send(WsMessage::text(json!({"type": "leave"}).to_string()))
        .await;
    let _ = ws.close(None).await;
    Ok(servers)
}

async fn probe_one(
    target: &IceUrl,
    server: &ReceivedIceServer,
    tls: &Result<Arc<rustls::ClientConfig>, String>,
) -> Result<Found, String> {
    let address = tokio::net::lookup_host((target.host.as_str(), target.port))
        .await
        .map_err(|e| format!("cannot resolve {}: {e}", target.host))?
        .next()
        .ok_or_else(|| format!("{} has no address", target.host))?;
    let turn_client = || match (&server.username, &server.credential) {
        (Some(user), Some(password)) => Ok(Client::new(
            user,
            password,
            target.kind != IceKind::TurnUdp,
            tid_seed(),
        )),
        _ => Err("a TURN URL without credentials".to_owned()),
    };
    let io = |e: std::io::Error| e.to_string();
    match target.kind {
        IceKind::Stun => binding(address).await,
        IceKind::TurnUdp => {
            let (mut client, socket, found) = allocate_udp(address, turn_client()?).await?;
            for out in release(&mut client) {
                let _ = socket.send(&out).await;
            }
            Ok(found)
        }
        IceKind::TurnTcp => {
            let tcp = TcpStream::connect(address).await.map_err(io)?;
            allocated_and_released(allocate_over_stream(tcp, turn_client()?).await?).await
        }
        IceKind::TurnTls => {
            let tcp = TcpStream::connect(address).await.map_err(io)?;
            let local = tcp.local_addr().map_err(io)?;
            let name = rustls::pki_types::ServerName::try_from(target.host.clone())
                .map_err(|e| format!("{}: {e}", target.host))?;
            let stream = tokio_rustls::TlsConnector::from(tls.clone()?)
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS: {e}"))?;
            allocated_and_released(
                allocate_over_stream(Local(stream, local), turn_client()?).await?,
            )
            .await
        }
    }
}

/// A STUN Binding over UDP, sent again after 0.5, 1 and 2 s of silence.
async fn binding(server: SocketAddr) -> Result<Found, String> {
    let socket = bound_udp(server).await?;
    let local = socket.local_addr().map_err(|e| e.to_string())?;
    let mut tid = [0u8; 12];
    getrandom::fill(&mut tid).map_err(|e| e.to_string())?;
    let mut request = MessageBuilder::new(method::BINDING, Class::Request, &tid);
    request.fingerprint();
    let request = request.finish();
    let mut buf = [0u8; MAX_MESSAGE];
    let mut wait = Duration::from_millis(500);
    loop {
        socket.send(&request).await.map_err(|e| e.to_string())?;
        let Ok(received) = tokio::time::timeout(wait, socket.recv(&mut buf)).await else {
            wait *= 2;
            continue;
        };
        let len = received.map_err(|e| e.to_string())?;
        let Ok(message) = Message::parse(&buf[..len]) else {
            continue;
        };
        if message.transaction_id() != &tid {
            continue;
        }
        if message.class() != Class::Success {
            return Err(error_of(&message));
        }
        let mapped = message
            .get(attr::XOR_MAPPED_ADDRESS)
            .and_then(|v| attr::decode_xor_address(attr::XOR_MAPPED_ADDRESS, v, &tid).ok())
            .ok_or("a Binding answer without XOR-MAPPED-ADDRESS")?;
        return Ok(Found {
            local,
            mapped,
            relayed: None,
        });
    }
}

fn error_of(message: &Message<'_>) -> String {
    match message.get(attr::ERROR_CODE).map(attr::decode_error) {
        Some(Ok((code, reason))) => format!("{code} {reason}"),
        _ => "an error answer without a code".into(),
    }
}

/// Lets the allocation go (a Refresh of lifetime 0), without waiting
/// for the answer: the probe needs nothing more from it.
fn release(client: &mut Client) -> Vec<Vec<u8>> {
    client.refresh(Instant::now(), 0);
    std::iter::from_fn(|| client.poll_transmit()).collect()
}

/// What the allocation over a stream found, once it is let go (the
/// stream closes as it is dropped).
async fn allocated_and_released(
    (mut client, mut socket, found): (Client, ToServer, Found),
) -> Result<Found, String> {
    for out in release(&mut client) {
        let _ = socket.send(&out).await;
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn url(kind: IceKind, host: &str, port: u16) -> IceUrl {
        IceUrl {
            kind,
            host: host.into(),
            port,
        }
    }

    #[test]
    fn reads_the_urls_the_server_hands_out() {
        let cases = [
            (
                "stun:203.0.113.10:3478",
                url(IceKind::Stun, "203.0.113.10", 3478),
            ),
            ("stun:example.org", url(IceKind::Stun, "example.org", 3478)),
            (
                "turn:127.0.0.1:3478?transport=udp",
                url(IceKind::TurnUdp, "127.0.0.1", 3478),
            ),
            (
                "turn:[::1]:3479?transport=tcp",
                url(IceKind::TurnTcp, "::1", 3479),
            ),
            ("turn:[::1]", url(IceKind::TurnUdp, "::1", 3478)),
            (
                "turns:call.example.org:443?transport=tcp",
                url(IceKind::TurnTls, "call.example.org", 443),
            ),
            (
                "turns:call.example.org",
                url(IceKind::TurnTls, "call.example.org", 5349),
            ),
        ];
        for (text, want) in cases {
            assert_eq!(text.parse::<IceUrl>(), Ok(want), "{text}");
        }
        for bad in [
            "",
            "stun",
            "http://example.org",
            "stun:",
            "stun:host:0",
            "stun:host:99999",
            "stun:host?transport=udp",
            "turns:host?transport=udp",
            "turn:host?foo=bar",
            "turn:[::1",
            "turn:[::1]x",
            "turn:user@host",
        ] {
            assert!(bad.parse::<IceUrl>().is_err(), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn any_text_is_a_url_or_an_error(text in "\\PC{0,80}") {
            let _ = text.parse::<IceUrl>();
        }
    }
}
