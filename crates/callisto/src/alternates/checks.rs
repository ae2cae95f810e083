//! Whether each alternate TURN server answers, so that clients are sent
//! only to those that do. Without this, an alternate that has died (or not
//! started yet) still gets its share of clients, and each of them fails:
//! Chromium does not come back to the server that sent it away.
//!
//! Every `--turn-alternate-check` seconds each alternate gets one probe: a
//! STUN Binding request over UDP for a UDP/TCP alternate, which only a
//! serving STUN/TURN server answers; a TCP connection for a TLS one (a
//! handshake would need a certificate check, and there is no name here to
//! check it against). An alternate is used from its first answer on, and
//! no longer once [`MISSES_FOR_DOWN`] probes in a row go unanswered: one
//! lost datagram must not take a server out of use.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use callisto_turn::server::{Alternates, Shared};
use callisto_turn::stun::{Class, Message, MessageBuilder, method};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::watch;
use tokio::task::JoinSet;

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
) {
    tokio::spawn(async move {
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
                    for (target, answered) in probe_all(targets, every.min(PROBE_TIMEOUT)).await {
                        if let Some(change) = seen.entry(target).or_default().record(answered) {
                            changes.push((target, change));
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
            for (target, change) in changes {
                log(target, change);
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

/// Probes every target at once; each outcome, in no particular order.
async fn probe_all(
    targets: Vec<(Kind, SocketAddr)>,
    timeout: Duration,
) -> Vec<((Kind, SocketAddr), bool)> {
    let mut probes = JoinSet::new();
    for target in targets {
        probes.spawn(async move {
            let answered = tokio::time::timeout(timeout, probe(target))
                .await
                .unwrap_or(false);
            (target, answered)
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

async fn probe((kind, to): (Kind, SocketAddr)) -> bool {
    match kind {
        Kind::UdpTcp => binding(to).await,
        Kind::Tls => TcpStream::connect(to).await.is_ok(),
    }
}

/// Whether `to` answers a STUN Binding request: any response to this
/// transaction, success or error, comes from a STUN server that serves.
async fn binding(to: SocketAddr) -> bool {
    let local: SocketAddr = if to.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let Ok(socket) = UdpSocket::bind(local).await else {
        return false;
    };
    if socket.connect(to).await.is_err() {
        return false;
    }
    let mut tid = [0u8; 12];
    if getrandom::fill(&mut tid).is_err() {
        return false;
    }
    let mut request = MessageBuilder::new(method::BINDING, Class::Request, &tid);
    request.fingerprint();
    if socket.send(&request.finish()).await.is_err() {
        return false;
    }
    let mut buf = [0u8; 1500];
    // Until the caller's timeout: a stray datagram is not the answer.
    loop {
        let Ok(n) = socket.recv(&mut buf).await else {
            // ICMP port unreachable: nothing listens there.
            return false;
        };
        if let Ok(answer) = Message::parse(&buf[..n])
            && answer.transaction_id() == &tid
            && matches!(answer.class(), Class::Success | Class::Error)
        {
            return true;
        }
    }
}

fn log((kind, addr): (Kind, SocketAddr), change: Change) {
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
        assert!(probe((Kind::UdpTcp, addr)).await);

        let closed = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let closed_addr = closed.local_addr().unwrap();
        drop(closed);
        assert!(!probe((Kind::UdpTcp, closed_addr)).await);

        let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let silent_addr = silent.local_addr().unwrap();
        let outcomes = probe_all(
            vec![(Kind::UdpTcp, silent_addr), (Kind::UdpTcp, addr)],
            Duration::from_millis(300),
        )
        .await;
        assert_eq!(outcomes.len(), 2);
        for (target, answered) in outcomes {
            assert_eq!(answered, target.1 == addr, "{target:?}");
        }
        drop(silent);

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        assert!(probe((Kind::Tls, listener.local_addr().unwrap())).await);
        let gone = listener.local_addr().unwrap();
        drop(listener);
        assert!(!probe((Kind::Tls, gone)).await);
    }
}
