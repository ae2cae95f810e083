//! Socket drivers for the sans-IO server: [`udp`] worker threads and
//! [`stream`] (TCP/TLS) tasks, and [`TurnService`] which starts them all.

pub mod admission;
pub mod batch;
pub mod cmsg;
pub mod icmp;
pub mod kernel;
pub mod offload;
pub mod stream;
pub mod udp;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::server::Shared;
pub use admission::{Admission, ConnectionLimits};
pub use kernel::{KernelRelay, KernelRelayConfig, interface_holding};
pub use stream::StreamConnections;
pub use udp::RelayConfig;

/// What to listen on.
#[derive(Debug, Clone)]
pub struct Listen {
    /// UDP and TCP.
    pub addr: SocketAddr,
    /// TLS over TCP, if any.
    pub tls_addr: Option<SocketAddr>,
    pub threads: usize,
    /// TCP and TLS connections, together.
    pub connections: ConnectionLimits,
}

/// A running STUN/TURN service.
pub struct TurnService {
    pub udp_addr: SocketAddr,
    pub tcp_addr: SocketAddr,
    pub tls_addr: Option<SocketAddr>,
    udp: udp::UdpWorkers,
    connections: stream::StreamConnections,
    stop: CancellationToken,
    health: TurnHealth,
}

/// Whether the parts of a [`TurnService`] that should be running are: its
/// UDP workers, its TCP and TLS listeners, and the kernel relay's
/// reporter. Cheap to clone and to ask,
/// for `/healthz`.
#[derive(Clone)]
pub struct TurnHealth {
    workers: Arc<[AtomicBool]>,
    /// Tasks that run until the service stops.
    listeners: Arc<[(String, JoinHandle<()>)]>,
    stop: CancellationToken,
}

impl TurnHealth {
    /// What has stopped while it should not have, a line each; none when
    /// all is well, or when the service is stopping.
    pub fn problems(&self) -> Vec<String> {
        if self.stop.is_cancelled() {
            return Vec::new();
        }
        let workers = self.workers.len();
        let mut problems: Vec<String> = (self.workers.iter().enumerate())
            .filter(|(_, down)| down.load(Ordering::SeqCst))
            .map(|(i, _)| format!("TURN UDP worker {i} (of {workers}) has stopped"))
            .collect();
        problems.extend(
            (self.listeners.iter())
                .filter(|(_, task)| task.is_finished())
                .map(|(what, _)| format!("{what} has stopped")),
        );
        problems
    }
}

impl TurnService {
    /// Binds everything, then serves until [`TurnService::stop`]. Must be
    /// called inside a tokio runtime (the stream listeners are tasks).
    /// `kernel`: the kernel relay, for UDP clients' channels (its routes
    /// come from `shared`'s servers only with `Config::kernel_routes`).
    pub async fn start(
        listen: Listen,
        relay: RelayConfig,
        shared: Arc<Shared>,
        tls: Option<Arc<rustls::ServerConfig>>,
        kernel: Option<Arc<KernelRelay>>,
    ) -> io::Result<TurnService> {
        // TCP on the same port as UDP, as clients expect. With port 0 the
        // kernel picks a port free for UDP, which a TCP socket may hold
        // (seen in CI, with tests starting servers side by side): pick again.
        let attempts = if listen.addr.port() == 0 { 8 } else { 1 };
        let mut tried = 0;
        let (udp, tcp_listener) = loop {
            tried += 1;
            let udp = udp::UdpWorkers::start(
                listen.addr,
                listen.threads,
                relay.clone(),
                shared.clone(),
                kernel.clone(),
            )?;
            let tcp = SocketAddr::new(listen.addr.ip(), udp.local_addr.port());
            match TcpListener::bind(tcp).await {
                Ok(l) => break (udp, l),
                Err(e) => {
                    udp.stop();
                    if e.kind() != io::ErrorKind::AddrInUse || tried >= attempts {
                        return Err(e);
                    }
                }
            }
        };
        let tcp_addr = tcp_listener.local_addr()?;
        let stop = CancellationToken::new();
        let reporter = kernel.map(|kernel| {
            (
                "the kernel relay's reporter (its counts in the metrics)".to_owned(),
                tokio::spawn(report_kernel_relay(kernel, stop.clone())),
            )
        });
        let admission = Admission::new(listen.connections);
        let connections =
            stream::StreamConnections::new(relay, shared, udp.sender.clone(), stop.clone());
        let mut listeners = vec![(
            format!("the TURN TCP listener on {tcp_addr}"),
            tokio::spawn(stream::serve(
                tcp_listener,
                None,
                admission.clone(),
                connections.clone(),
            )),
        )];
        let mut tls_addr = None;
        if let (Some(addr), Some(cfg)) = (listen.tls_addr, tls) {
            let l = TcpListener::bind(addr).await?;
            let bound = l.local_addr()?;
            tls_addr = Some(bound);
            listeners.push((
                format!("the TURN TLS listener on {bound}"),
                tokio::spawn(stream::serve(
                    l,
                    Some(TlsAcceptor::from(cfg)),
                    admission,
                    connections.clone(),
                )),
            ));
        }
        listeners.extend(reporter);
        let health = TurnHealth {
            workers: udp.down.clone(),
            listeners: listeners.into(),
            stop: stop.clone(),
        };
        Ok(TurnService {
            udp_addr: udp.local_addr,
            tcp_addr,
            tls_addr,
            udp,
            connections,
            stop,
            health,
        })
    }

    /// For `/healthz`.
    pub fn health(&self) -> TurnHealth {
        self.health.clone()
    }

    /// For a listener elsewhere that serves TURN over TLS on some of its
    /// connections (the web server's, on its HTTPS port).
    pub fn stream_connections(&self) -> stream::StreamConnections {
        self.connections.clone()
    }

    /// Stops accepting, closes every connection and joins the UDP workers;
    /// each ends its allocations, logging them, as it goes.
    pub async fn stop(self) {
        self.stop.cancel();
        if !self.connections.ended_within(STOP_GRACE).await {
            tracing::warn!("some TURN connections did not end in time");
        }
        let udp = self.udp;
        if tokio::task::spawn_blocking(move || udp.stop())
            .await
            .is_err()
        {
            tracing::warn!("a TURN UDP worker did not stop cleanly");
        }
    }
}

/// How long stopping waits for stream connections to end their
/// allocations: each does so at once, unless its runtime is starved.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// Adds what the kernel relay relayed to the metrics, every second.
async fn report_kernel_relay(kernel: Arc<KernelRelay>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => kernel.report(),
            () = stop.cancelled() => break,
        }
    }
    kernel.report();
}

/// For tests that need root (XDP, network namespaces): true as root;
/// without root, false (the test skips, saying why), unless
/// `CALLISTO_REQUIRE_ROOT_TESTS` is set (scripts/test.sh sets it), which
/// makes a skip a failure.
#[cfg(test)]
fn root_or_skip(what: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(
        std::env::var_os("CALLISTO_REQUIRE_ROOT_TESTS").is_none(),
        "{what} need root"
    );
    eprintln!("skipped: {what} need root");
    false
}

/// For the drivers' tests: a server's shared state with the user `u:p`,
/// relaying on loopback, to loopback peers too.
#[cfg(test)]
pub(crate) fn loopback_test_server() -> (Arc<crate::server::Shared>, udp::RelayConfig) {
    let loopback = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
    let mut credentials = crate::auth::Credentials::new("turns");
    credentials.add_user("u", "p");
    let config = crate::server::Config {
        credentials,
        policy: crate::policy::PeerPolicy::new(vec!["127.0.0.1/32".parse().unwrap()], vec![]),
        relay_ips: vec![loopback],
        relay_ports: 20000..=60999,
        ..crate::server::Config::default()
    };
    let shared = crate::server::Shared::with_system_clock(config, b"turns nonce key");
    let relay = udp::RelayConfig {
        ipv4: Some(loopback),
        ipv6: None,
        ports: 20000..=60999,
    };
    (Arc::new(shared), relay)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The health names a worker that stopped, and says nothing once the
    /// service is stopping.
    #[tokio::test]
    async fn health_names_a_stopped_worker() {
        let (shared, relay) = loopback_test_server();
        let listen = Listen {
            addr: "127.0.0.1:0".parse().unwrap(),
            tls_addr: None,
            threads: 2,
            connections: ConnectionLimits::default(),
        };
        let service = TurnService::start(listen, relay, shared, None, None)
            .await
            .unwrap();
        let health = service.health();
        assert!(health.problems().is_empty());
        // What the worker's thread does as it ends unasked.
        service.udp.down[1].store(true, Ordering::SeqCst);
        assert_eq!(
            health.problems(),
            vec!["TURN UDP worker 1 (of 2) has stopped".to_string()]
        );
        service.stop().await;
        assert!(health.problems().is_empty());
    }
}
