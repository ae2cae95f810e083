//! `callisto serve`: builds the hub and the router from the flags, binds the
//! listener (plain or TLS), and runs until the shutdown token is cancelled.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use callisto_protocol::IceServer;
use callisto_signal::{ConnectionConfig, Hub, HubLimits, SendBudget, SharedHub, random_peer_id};
use callisto_turn::auth::Secrets;
use callisto_turn::net::ConnectionLimits;
use callisto_turn::net::admission::Admission;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cli::ServeArgs;
use crate::connections::LimitedListener;
use crate::health::Health;
use crate::http::{AppState, router};
use crate::origins::OriginPolicy;
use crate::secrets::SecretsFile;
use crate::trusted_proxies::TrustedProxies;
use crate::{http_server, tls};

/// How long shutdown waits for WebSocket close handshakes.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// A started server.
pub struct Running {
    /// Where it actually listens (useful with port 0).
    pub local_addr: SocketAddr,
    /// "http" or "https".
    pub scheme: &'static str,
    /// The certificate fingerprint, when serving HTTPS.
    pub fingerprint: Option<String>,
    /// The built-in STUN/TURN server's addresses, unless --no-turn.
    pub turn: Option<crate::turn::TurnAddrs>,
    /// Where `/metrics` is served, with --metrics-listen (otherwise on the
    /// web port).
    pub metrics_addr: Option<SocketAddr>,
    /// What `/healthz` checks.
    pub health: Health,
    task: JoinHandle<()>,
}

impl Running {
    /// Waits until the server has stopped after the shutdown token was
    /// cancelled, including the close handshakes of open WebSockets.
    pub async fn wait(self) {
        if let Err(e) = self.task.await {
            tracing::error!(error = %e, "server task failed");
        }
    }

    /// The base URL, e.g. `http://127.0.0.1:8080`.
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.local_addr)
    }
}

/// Binds and starts serving; returns once the listener is bound.
pub async fn start(args: ServeArgs, shutdown: CancellationToken) -> anyhow::Result<Running> {
    // Before anything that records metrics: handles taken earlier are no-ops.
    let metrics = crate::telemetry::install();
    // What /healthz checks; background tasks are spawned through it.
    let health = Health::default();
    // Changes when credentials handed out before may soon be refused (the
    // built-in TURN server's secret, or --ice-secrets-file's, changed):
    // browsers in rooms then get new ones at once.
    let (ice_changed, ice_changes) = tokio::sync::watch::channel(());
    let new_signer = {
        let ice_changed = Arc::new(ice_changed);
        move || {
            ice_changed.send_replace(());
        }
    };
    let external = external_turn(&args, new_signer.clone(), &health)?;
    let tls = tls::from_args(&args.tls)?;
    if let Some(setup) = &tls {
        tls::keep_fresh(
            setup.certificate.clone(),
            args.tls.recheck(),
            shutdown.clone(),
            &health,
        )?;
    }
    // The web and metrics ports first: if one is taken, nothing else has
    // started.
    let tcp = TcpListener::bind(args.listen).await.with_context(|| {
        format!(
            "cannot listen on {}: is another program using that port? Choose another with --listen",
            args.listen
        )
    })?;
    let metrics_listener = match args.metrics_listen {
        Some(listen) => Some(crate::telemetry::bind_own_port(listen).await?),
        None => None,
    };
    let mut turn = if args.no_turn {
        None
    } else {
        let tls_host = args.tls.tls_names.first().map(String::as_str);
        Some(
            crate::turn::start(
                &args.turn,
                tls.as_ref().map(|t| t.config.clone()),
                tls_host.filter(|_| tls.is_some()),
                true,
                Duration::from_secs(args.turn_credential_ttl),
                new_signer,
                &health,
            )
            .await?,
        )
    };

    let local_addr = tcp.local_addr()?;
    let proxies = TrustedProxies::new(args.trusted_proxies.iter().flatten().copied().collect());
    let web_limits = ConnectionLimits {
        total: crate::open_files::connections_within_limit(
            args.max_connections as usize,
            "--max-connections",
        ),
        per_source: args.max_connections_per_ip as usize,
    };
    let tcp = LimitedListener::new(
        tcp,
        web_limits,
        // Past the heartbeat timeout, so that the hub closes a silent
        // WebSocket client itself, with a close frame.
        2 * Duration::from_secs(u64::from(args.heartbeat_timeout)),
        "if they are legitimate, raise --max-connections or --max-connections-per-ip",
    )
    .with_proxies(proxies.clone());
    // With TLS and no TURN listener of its own for it, TURN over TLS
    // shares the HTTPS port: a browser that may reach only that port
    // (behind a firewall that lets nothing else out) still gets a relay.
    let turn_on_web_port = match turn.as_mut() {
        Some(t) if tls.is_some() && args.turn.turn_tls_listen.is_none() => t
            .offer_tls_on_web_port(local_addr)
            .then(|| t.service.stream_connections()),
        _ => None,
    };

    let hub = Arc::new(Mutex::new(Hub::new(
        HubLimits {
            resume_grace: Duration::from_secs(u64::from(args.resume_grace)),
            ..HubLimits::new(args.max_room_size as usize, args.max_rooms as usize)
        },
        random_peer_id,
    )));
    let rooms_file = crate::rooms_file::path(
        args.state_file.as_deref(),
        std::env::var_os("STATE_DIRECTORY"),
    );
    if let Some(path) = &rooms_file
        && let Some((kept, age)) =
            crate::rooms_file::take(path, Duration::from_secs(u64::from(args.resume_grace)))
    {
        // The grace counts from the last server's shutdown.
        let since = std::time::Instant::now()
            .checked_sub(age)
            .unwrap_or_else(std::time::Instant::now);
        let restored = hub
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .restore(kept, since);
        tracing::info!(
            rooms = restored.rooms,
            places = restored.places,
            skipped = restored.skipped,
            "took back the rooms kept by the last run: their clients resume their places"
        );
    }
    health.spawn_vital(
        "the expiry of lost connections' places",
        callisto_signal::connection::expire_lost_places(hub.clone()),
    );
    let access = match &args.access_codes_file {
        Some(path) => Some(crate::access::load(path.clone(), &health)?.check()),
        None => None,
    };
    let configured = ice_servers(&args);
    let turn_ice = turn.as_ref().map(|t| t.ice.clone());
    let ttl = Duration::from_secs(args.turn_credential_ttl);
    // Credentials of the built-in TURN server expire, and so do those
    // signed with --ice-secret; --ice-credential never changes.
    let ice_renewal = (turn.is_some() || external.is_some()).then_some(ttl / 2);
    let ice_changes = (args.turn.turn_secrets_file.is_some() && turn_ice.is_some()
        || args.ice_secrets_file.is_some())
    .then_some(ice_changes);
    let connection = Arc::new(ConnectionConfig {
        max_message_bytes: args.max_message_bytes as usize,
        heartbeat_timeout: Duration::from_secs(u64::from(args.heartbeat_timeout)),
        rate_per_sec: args.max_messages_per_second,
        rate_burst: args.max_message_burst,
        rate_strikes: 20,
        send_queue: 1024,
        // Signaling is small (an offer is a few KiB): 1 MiB is many
        // offers, and a client that lets more pile up is not reading.
        send_queue_bytes: (2 * args.max_message_bytes as usize).max(1 << 20),
        send_budget: SendBudget::new(usize::try_from(args.max_queued_bytes).unwrap_or(usize::MAX)),
        ice_servers: Arc::new(move || {
            let mut all = turn_ice
                .as_ref()
                .map(|t| t.ice_servers())
                .unwrap_or_default();
            all.extend(configured.iter().cloned());
            if let Some(ExternalTurn { urls, secrets }) = &external
                && let Some(secret) = secrets.signing()
            {
                all.push(crate::turn::minted_ice_server(urls.clone(), &secret, ttl));
            }
            all
        }),
        ice_renewal,
        ice_changes,
        access,
    });
    let sockets = TaskTracker::new();
    let hub_for_keeping = hub.clone();
    let state = AppState {
        hub,
        connection,
        metrics,
        shutdown: shutdown.clone(),
        sockets: sockets.clone(),
        proxies,
        proxied_clients: Admission::new(web_limits),
        origins: Arc::new(OriginPolicy::new(args.allowed_origins.clone())),
        origin_log: Arc::default(),
        health: match &turn {
            Some(t) => health.with_turn(t.service.health()),
            None => health,
        },
    };
    let metrics_addr = match metrics_listener {
        Some(listener) => {
            let health = state.health.clone();
            let state = state.clone();
            let text = Arc::new(move || crate::http::metrics_text(&state));
            Some(crate::telemetry::serve_on_own_port(
                listener,
                text,
                health,
                shutdown.clone(),
            )?)
        }
        None => None,
    };
    let health = state.health.clone();
    let app = router(state, metrics_addr.is_none());
    let head_timeout = Duration::from_secs(u64::from(args.request_header_timeout));

    let scheme = if tls.is_some() { "https" } else { "http" };
    let fingerprint = tls.as_ref().map(|t| t.certificate.fingerprint());

    let stop = shutdown.clone();
    let keep = rooms_file.map(|path| (path, hub_for_keeping));
    let turn_addrs = turn.as_ref().map(|t| t.addrs());
    let turn_service = turn.map(|t| t.service);
    let task = match tls {
        Some(setup) => {
            let listener =
                tls::TlsListener::new(tcp, setup.config, head_timeout, turn_on_web_port)?;
            tokio::spawn(async move {
                http_server::serve(listener, app, head_timeout, stop).await;
                finish(sockets, turn_service, keep).await;
            })
        }
        None => tokio::spawn(async move {
            http_server::serve(tcp, app, head_timeout, stop).await;
            finish(sockets, turn_service, keep).await;
        }),
    };

    let running = Running {
        local_addr,
        scheme,
        fingerprint,
        turn: turn_addrs,
        metrics_addr,
        health,
        task,
    };
    announce(&running, &args);
    Ok(running)
}

async fn finish(
    sockets: TaskTracker,
    turn: Option<callisto_turn::net::TurnService>,
    keep: Option<(PathBuf, SharedHub)>,
) {
    sockets.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, sockets.wait())
        .await
        .is_err()
    {
        tracing::warn!("some WebSocket connections did not close in time");
    }
    // Nobody left as the connections closed: the hub still holds every
    // place, for the next server.
    if let Some((path, hub)) = keep {
        let kept = hub.lock().unwrap_or_else(|p| p.into_inner()).keep();
        let places: usize = kept.rooms.iter().map(|r| r.places.len()).sum();
        let rooms = kept.rooms.len();
        match crate::rooms_file::save(&path, kept) {
            Ok(()) => {
                tracing::info!(rooms, places, path = %path.display(), "kept the rooms for the next run")
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), "could not keep the rooms for the next run: {e:#}")
            }
        }
    }
    if let Some(turn) = turn {
        turn.stop().await;
    }
}

fn announce(running: &Running, args: &ServeArgs) {
    // The certificate's fingerprint and dates are logged as it is loaded
    // (tls::keep_fresh); a generated one's is also printed plainly, for
    // people to compare with what their browser shows.
    if let Some(fp) = &running.fingerprint
        && args.tls.tls_self_signed
    {
        eprintln!("Self-signed certificate SHA-256 fingerprint: {fp}");
    }
    let url = running.url();
    tracing::info!(
        %url,
        version = env!("CARGO_PKG_VERSION"),
        "Callisto is serving; open it in a browser"
    );
    if running.scheme == "http" && !running.local_addr.ip().is_loopback() {
        tracing::warn!(
            "serving plain HTTP beyond this machine: browsers allow camera and microphone only on https:// or localhost; add --tls-self-signed or --tls-cert/--tls-key"
        );
    }
}

/// The `--ice-server` entries that never change: STUN URLs, and TURN ones
/// with `--ice-username` and `--ice-credential` (or none). With
/// `--ice-secret`, the TURN URLs are left to [`external_turn`].
fn ice_servers(args: &ServeArgs) -> Vec<IceServer> {
    args.ice_servers
        .iter()
        .filter(|url| {
            (args.ice_secret.is_none() && args.ice_secrets_file.is_none()) || !is_turn(url)
        })
        .map(|url| IceServer {
            urls: vec![url.clone()],
            username: args.ice_username.clone().filter(|_| is_turn(url)),
            credential: args.ice_credential.clone().filter(|_| is_turn(url)),
        })
        .collect()
}

fn is_turn(url: &str) -> bool {
    url.starts_with("turn:") || url.starts_with("turns:")
}

/// A TURN server of the operator's own (coturn) whose credentials `serve`
/// signs: the TURN URLs of `--ice-server`, and the secret that signs, from
/// `--ice-secret` or `--ice-secrets-file` (re-read on SIGHUP).
struct ExternalTurn {
    urls: Vec<String>,
    secrets: Secrets,
}

/// With `--ice-secret` or `--ice-secrets-file`: the TURN URLs of
/// `--ice-server`, which get credentials signed with it in every
/// `welcome` and renewal. `new_signer` is called when the file's first
/// secret changes.
fn external_turn(
    args: &ServeArgs,
    new_signer: impl Fn() + Send + 'static,
    health: &Health,
) -> anyhow::Result<Option<ExternalTurn>> {
    let secrets = Secrets::default();
    match (&args.ice_secret, &args.ice_secrets_file) {
        (Some(secret), _) => secrets.set(vec![secret.as_bytes().to_vec()]),
        (None, Some(path)) => {
            secrets.set(crate::secrets::read(path, SecretsFile::Ice)?);
            crate::secrets::reload_on_hangup(
                path.clone(),
                SecretsFile::Ice,
                secrets.clone(),
                new_signer,
                health,
            )?;
        }
        (None, None) => return Ok(None),
    }
    let urls: Vec<String> = args
        .ice_servers
        .iter()
        .filter(|url| is_turn(url))
        .cloned()
        .collect();
    if urls.is_empty() {
        anyhow::bail!(
            "--ice-secret and --ice-secrets-file sign credentials for the turn: and turns: URLs of --ice-server, and there are none: add --ice-server turn:HOST:PORT"
        );
    }
    Ok(Some(ExternalTurn { urls, secrets }))
}
