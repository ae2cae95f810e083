//! Whether each alternate TURN server answers, so that clients are sent
//! only to those that do. Without this, an alternate that has died (or not
//! started yet) still gets its share of clients, and each of them fails:
//! Chromium does not come back to the server that sent it away.
//!
//! Every `--turn-alternate-check` seconds each alternate gets one probe: a
//! STUN Binding request, which only a serving STUN/TURN server answers.
//! Over UDP for a UDP/TCP alternate; for a TLS one, over TLS after a
//! handshake in which the alternate proves it holds the key of a
//! certificate in its validity period (an expired one, every client
//! refuses). Its name and issuer are not checked: an alternate is an
//! address, and clients check those against the name they were given. An
//! alternate is used from its first answer on, and no longer once
//! [`MISSES_FOR_DOWN`] probes in a row go unanswered: one lost datagram
//! must not take a server out of use.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use callisto_turn::server::{Alternates, Shared};
use callisto_turn::stun::{Class, HEADER_LEN, Message, MessageBuilder, method};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::tls::validity::Standing;

/// Probes in a row without an answer that take an alternate in use out.
pub const MISSES_FOR_DOWN: u32 = 3;

/// The longest a probe waits for its answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Which clients an alternate is for, and so how it is probed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    UdpTcp,
    Tls,
}

impl Kind {
    fn transport(self) -> &'static str {
        match self {
            Kind::UdpTcp => "udp_tcp",
            Kind::Tls => "tls",
        }
    }
}

/// What the probes of one alternate have shown so far. The decision lives
/// here, apart from the sockets, so that it is tested without them.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Liveness {
    state: State,
    misses: u32,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Not probed yet: not used until it answers.
    #[default]
    Unknown,
    Up,
    Down,
}

/// A change worth a log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// It answered, and clients may be sent there.
    Up,
    /// It does not answer: its first probe, or [`MISSES_FOR_DOWN`] in a
    /// row once it had.
    Down,
}

impl Liveness {
    /// Takes one probe's outcome.
    pub fn record(&mut self, answered: bool) -> Option<Change> {
        if answered {
            self.misses = 0;
            let change = (self.state != State::Up).then_some(Change::Up);
            self.state = State::Up;
            return change;
        }
        self.misses = self.misses.saturating_add(1);
        let down = match self.state {
            State::Unknown => true,
            State::Up => self.misses >= MISSES_FOR_DOWN,
            State::Down => false,
        };
        down.then(|| {
            self.state = State::Down;
            Change::Down
        })
    }

    /// Whether clients may be sent there.
    pub fn is_up(&self) -> bool {
        self.state == State::Up
    }
}

/// Keeps the server's alternates in force: those `configured` says (it
/// changes on SIGHUP), less those that do not answer, checked every
/// `every`; with `None`, all of them, unchecked.
pub fn spawn(
    shared: Arc<Shared>,
    mut configured: watch::Receiver<Alternates>,
    every: Option<Duration>,
    health: &crate::health::Health,
) {
    health.spawn_vital("the alternate TURN server checks", async move {
        let mut seen: HashMap<(Kind, SocketAddr), Liveness> = HashMap::new();
        let mut in_force: Option<Alternates> = None;
        let mut more_changes = true;
        loop {
            let current = configured.borrow_and_update().clone();
            let mut changes = Vec::new();
            let effective = match every {
                None => current.clone(),
                Some(every) => {
                    let targets = targets(&current);
                    seen.retain(|t, _| targets.contains(t));
                    for (target, outcome) in probe_all(targets, every.min(PROBE_TIMEOUT)).await {
                        let liveness = seen.entry(target).or_default();
                        if let Some(change) = liveness.record(outcome.is_ok()) {
                            changes.push((target, change, outcome.err()));
                        }
                    }
                    let up =
                        |kind, a: &SocketAddr| seen.get(&(kind, *a)).is_some_and(Liveness::is_up);
                    Alternates {
                        udp_tcp: keep(&current.udp_tcp, |a| up(Kind::UdpTcp, a)),
                        tls: keep(&current.tls, |a| up(Kind::Tls, a)),
                    }
                }
            };
            count_unreachable(&current, &effective);
            if in_force.as_ref() != Some(&effective) {
                shared.set_alternates(effective.clone());
                in_force = Some(effective);
            }
            // Once in force, so that what the log says already holds.
            for (target, change, why) in changes {
                log(target, change, why);
            }
            let wait = async {
                match every {
                    Some(every) => tokio::time::sleep(every).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                changed = configured.changed(), if more_changes => {
                    more_changes = changed.is_ok();
                    if !more_changes && every.is_none() {
                        return;
                    }
                }
                () = wait => {}
            }
        }
    });
}

fn targets(alternates: &Alternates) -> Vec<(Kind, SocketAddr)> {
    let udp_tcp = alternates.udp_tcp.iter().map(|a| (Kind::UdpTcp, *a));
    let tls = alternates.tls.iter().map(|a| (Kind::Tls, *a));
    udp_tcp.chain(tls).collect()
}

fn keep(list: &[SocketAddr], up: impl Fn(&SocketAddr) -> bool) -> Vec<SocketAddr> {
    list.iter().copied().filter(|a| up(a)).collect()
}

/// Why a probe went unanswered, for the log.
#[derive(Debug, thiserror::Error)]
pub enum Miss {
    #[error("no answer within {0:?}")]
    Silent(Duration),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("the TLS handshake failed: {0}")]
    Handshake(std::io::Error),
    #[error("what came back is not a STUN answer")]
    NotStun,
    #[error("cannot probe: {0}")]
    Local(&'static str),
}

/// What one probe showed.
pub type Outcome = Result<(), Miss>;

/// Probes every target at once; each outcome, in no particular order.
async fn probe_all(
    targets: Vec<(Kind, SocketAddr)>,
    timeout: Duration,
) -> Vec<((Kind, SocketAddr), Outcome)> {
    let mut probes = JoinSet::new();
    for target in targets {
        probes.spawn(async move {
            let outcome = tokio::time::timeout(timeout, probe(target))
                .await
                .unwrap_or(Err(Miss::Silent(timeout)));
            (target, outcome)
        });
    }
    let mut outcomes = Vec::new();
    while let Some(done) = probes.join_next().await {
        if let Ok(outcome) = done {
            outcomes.push(outcome);
        }
    }
    outcomes
}

async fn probe((kind, to): (Kind, SocketAddr)) -> Outcome {
    match kind {
        Kind::UdpTcp => binding(to).await,
        Kind::Tls => binding_over_tls(to).await,
    }
}

/// A Binding request with a fresh transaction id: (the id, the message).
fn binding_request() -> Result<([u8; 12], Vec<u8>), Miss> {
    let mut tid = [0u8; 12];
    getrandom::fill(&mut tid).map_err(|_| Miss::Local("the random source failed"))?;
    let mut request = MessageBuilder::new(method::BINDING, Class::Request, &tid);
    request.fingerprint();
    Ok((tid, request.finish()))
}

/// Whether `message` answers transaction `tid`: any response, success or
/// error, comes from a STUN server that serves.
fn answers(message: &[u8], tid: &[u8; 12]) -> bool {
    Message::parse(message).is_ok_and(|answer| {
        answer.transaction_id() == tid && matches!(answer.class(), Class::Success | Class::Error)
    })
}

/// Whether `to` answers a STUN Binding request over UDP.
async fn binding(to: SocketAddr) -> Outcome {
    let local: SocketAddr = if to.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(local).await?;
    socket.connect(to).await?;
    let (tid, request) = binding_request()?;
    socket.send(&request).await?;
    let mut buf = [0u8; 1500];
    // Until the caller's timeout: a stray datagram is not the answer. An
    // error is ICMP's port unreachable: nothing listens there.
    loop {
        let n = socket.recv(&mut buf).await?;
        if answers(&buf[..n], &tid) {
            return Ok(());
        }
    }
}

/// Whether `to` completes a TLS handshake (see [`DatesOnly`]) and then
/// answers a STUN Binding request over it (RFC 8656 framing: one message
/// after another on the stream).
async fn binding_over_tls(to: SocketAddr) -> Outcome {
    let tcp = TcpStream::connect(to).await?;
    let config = probe_client_config().ok_or(Miss::Local("no TLS client configuration"))?;
    let connector = tokio_rustls::TlsConnector::from(config);
    let mut tls = connector
        .connect(ServerName::IpAddress(to.ip().into()), tcp)
        .await
        .map_err(Miss::Handshake)?;
    let (tid, request) = binding_request()?;
    tls.write_all(&request).await?;
    tls.flush().await?;
    let mut answer = vec![0u8; HEADER_LEN];
    tls.read_exact(&mut answer).await?;
    let len = usize::from(u16::from_be_bytes([answer[2], answer[3]]));
    answer.resize(HEADER_LEN + len, 0);
    tls.read_exact(&mut answer[HEADER_LEN..]).await?;
    if answers(&answer, &tid) {
        Ok(())
    } else {
        Err(Miss::NotStun)
    }
}

/// How TLS alternates are probed: offering TURN's ALPN (RFC 7443),
/// checking certificates with [`DatesOnly`]. Built once; `None` (logged)
/// if it cannot be, and then no TLS alternate is taken for up.
fn probe_client_config() -> Option<Arc<rustls::ClientConfig>> {
    static CONFIG: std::sync::OnceLock<Option<Arc<rustls::ClientConfig>>> =
        std::sync::OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let algorithms = provider.signature_verification_algorithms;
            let built = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions();
            let mut config = match built {
                Ok(b) => b
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(DatesOnly { algorithms }))
                    .with_no_client_auth(),
                Err(e) => {
                    tracing::error!("cannot probe TLS alternates, so none is used: {e}");
                    return None;
                }
            };
            config.alpn_protocols = vec![b"stun.turn".to_vec()];
            Some(Arc::new(config))
        })
        .clone()
}

/// Takes a certificate in its validity period, from a server that proves
/// it holds its key. Its name and issuer are left to the clients.
#[derive(Debug)]
struct DatesOnly {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for DatesOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let validity = crate::tls::validity::Validity::of_der(end_entity.as_ref())
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        let now = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
        match validity.standing(now) {
            Standing::Expired => Err(CertificateError::Expired.into()),
            Standing::NotYetValid => Err(CertificateError::NotValidYet.into()),
            Standing::Valid | Standing::RenewalOverdue => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// `why`: what the probe that made the change met, if it missed.
fn log((kind, addr): (Kind, SocketAddr), change: Change, why: Option<Miss>) {
    let transport = kind.transport();
    match change {
        Change::Up => tracing::info!(
            %addr,
            transport,
            "alternate TURN server answers: clients may be sent there"
        ),
        Change::Down => tracing::warn!(
            %addr,
            transport,
            why = %why.map(|w| w.to_string()).unwrap_or_default(),
            "alternate TURN server does not answer: no client is sent there until it does"
        ),
    }
}

fn count_unreachable(configured: &Alternates, effective: &Alternates) {
    let udp_tcp = configured.udp_tcp.len() - effective.udp_tcp.len();
    let tls = configured.tls.len() - effective.tls.len();
    metrics::gauge!("callisto_turn_alternate_servers_unreachable", "transport" => "udp_tcp")
        .set(udp_tcp as f64);
    metrics::gauge!("callisto_turn_alternate_servers_unreachable", "transport" => "tls")
        .set(tls as f64);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_alternate_is_used_from_its_first_answer_until_three_misses_in_a_row() {
        let mut l = Liveness::default();
        assert!(!l.is_up(), "not used before it answers");
        assert_eq!(l.record(true), Some(Change::Up));
        assert!(l.is_up());
        assert_eq!(l.record(true), None);
        for _ in 1..MISSES_FOR_DOWN {
            assert_eq!(l.record(false), None);
            assert!(l.is_up(), "a lost probe or two keep it in use");
        }
        assert_eq!(l.record(true), None, "an answer starts the count again");
        for _ in 1..MISSES_FOR_DOWN {
            assert_eq!(l.record(false), None);
        }
        assert_eq!(l.record(false), Some(Change::Down));
        assert!(!l.is_up());
        assert_eq!(l.record(false), None, "said once");
        assert_eq!(l.record(true), Some(Change::Up), "back at its first answer");
    }

    #[test]
    fn an_alternate_that_never_answered_is_reported_at_its_first_miss() {
        let mut l = Liveness::default();
        assert_eq!(l.record(false), Some(Change::Down));
        assert_eq!(l.record(false), None);
        assert!(!l.is_up());
        assert_eq!(l.record(true), Some(Change::Up));
    }

    /// A real socket: a Binding request to a STUN server that answers, to
    /// a port where nothing listens, and to one that never answers.
    #[tokio::test]
    async fn a_binding_request_tells_a_stun_server_from_silence() {
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = server.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            while let Ok((n, from)) = server.recv_from(&mut buf).await {
                let Ok(request) = Message::parse(&buf[..n]) else {
                    continue;
                };
                let tid = *request.transaction_id();
                let mut answer = MessageBuilder::new(method::BINDING, Class::Success, &tid);
                answer.xor_address(callisto_turn::stun::attr::XOR_MAPPED_ADDRESS, from);
                // A stray datagram first, then the answer.
                let _ = server.send_to(b"not stun", from).await;
                let _ = server.send_to(&answer.finish(), from).await;
            }
        });
        assert!(probe((Kind::UdpTcp, addr)).await.is_ok());

        let closed = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let closed_addr = closed.local_addr().unwrap();
        drop(closed);
        let miss = probe((Kind::UdpTcp, closed_addr)).await.unwrap_err();
        assert!(miss.to_string().contains("refused"), "{miss}");

        let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let silent_addr = silent.local_addr().unwrap();
        let outcomes = probe_all(
            vec![(Kind::UdpTcp, silent_addr), (Kind::UdpTcp, addr)],
            Duration::from_millis(300),
        )
        .await;
        assert_eq!(outcomes.len(), 2);
        for (target, outcome) in outcomes {
            match outcome {
                Ok(()) => assert_eq!(target.1, addr),
                Err(miss) => {
                    assert_eq!(target.1, silent_addr);
                    assert!(matches!(miss, Miss::Silent(_)), "{miss}");
                }
            }
        }
        drop(silent);
    }

    /// A TLS server that answers every STUN message with a Binding success,
    /// serving a certificate valid over `[from, until]` (Unix seconds).
    async fn stun_over_tls(from: i64, until: i64) -> SocketAddr {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = crate::tls::validity::test_certificate(&key, from, until)
            .der()
            .clone();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, from)) = listener.accept().await {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    continue;
                };
                let mut request = [0u8; HEADER_LEN + 8];
                if tls.read_exact(&mut request).await.is_err() {
                    continue;
                }
                let tid: [u8; 12] = request[8..20].try_into().unwrap();
                let mut answer = MessageBuilder::new(method::BINDING, Class::Success, &tid);
                answer.xor_address(callisto_turn::stun::attr::XOR_MAPPED_ADDRESS, from);
                let _ = tls.write_all(&answer.finish()).await;
            }
        });
        addr
    }

    /// A TLS alternate is up when it completes a handshake with a
    /// certificate in date and answers a Binding over it; not when its
    /// certificate has expired or is not valid yet, when it does not speak
    /// TLS, or when nothing listens.
    #[tokio::test]
    async fn a_tls_alternate_answers_over_tls_with_a_certificate_in_date() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        const DAY: i64 = 86_400;
        let serving = stun_over_tls(now - DAY, now + 89 * DAY).await;
        assert!(probe((Kind::Tls, serving)).await.is_ok());
        // Overdue for renewal, but clients still take it.
        let overdue = stun_over_tls(now - 89 * DAY, now + DAY).await;
        assert!(probe((Kind::Tls, overdue)).await.is_ok());
        // The log says why the others are not used.
        for (from, until, why) in [
            (now - 90 * DAY, now - DAY, "Expired"),
            (now + DAY, now + 90 * DAY, "NotValidYet"),
        ] {
            let out_of_date = stun_over_tls(from, until).await;
            let miss = probe((Kind::Tls, out_of_date)).await.unwrap_err();
            assert!(matches!(miss, Miss::Handshake(_)), "{miss}");
            assert!(miss.to_string().contains(why), "{miss}");
        }

        // Accepts connections, never says a word: the probe's time runs out.
        let mute = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let outcomes = probe_all(
            vec![
                (Kind::Tls, mute.local_addr().unwrap()),
                (Kind::Tls, serving),
            ],
            Duration::from_millis(500),
        )
        .await;
        for (target, outcome) in outcomes {
            assert_eq!(outcome.is_ok(), target.1 == serving, "{target:?}");
        }
        let gone = mute.local_addr().unwrap();
        drop(mute);
        let miss = probe((Kind::Tls, gone)).await.unwrap_err();
        assert!(miss.to_string().contains("refused"), "{miss}");
    }
}
