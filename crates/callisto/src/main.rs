//! `callisto`: the binary's entry point. Parses the command line, starts
//! logging, and runs the chosen subcommand until SIGINT or SIGTERM.

use anyhow::Context;
use callisto::cli::{BenchCommand, Cli, Command};
use callisto::health::Health;
use callisto::systemd;
use callisto::telemetry::StandaloneMetrics;
use clap::Parser;
use tokio_util::sync::CancellationToken;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Bench(BenchCommand::Turn(args)) => callisto::bench::turn::run(args),
        Command::Bench(BenchCommand::Forwarder { listen }) => {
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let (tx, _rx) = std::sync::mpsc::channel();
            callisto::bench::forwarder::run(listen, stop, tx).context("running the forwarder")
        }
        Command::Peer(args) => {
            callisto::logging::init(&args.logging.log, args.logging.log_format)?;
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            runtime.block_on(async move {
                let signals = StopSignals::install()?;
                callisto::peer::run(args, signals.wait()).await
            })
        }
        Command::Load(args) => {
            callisto::logging::init(&args.logging.log, args.logging.log_format)?;
            raise_open_file_limit();
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            let all_well = runtime.block_on(callisto::load::run(args))?;
            if !all_well {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Probe(args) => {
            callisto::logging::init(&args.logging.log, args.logging.log_format)?;
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            let all_worked = runtime.block_on(callisto::probe::run(args))?;
            if !all_worked {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Turn(args) => {
            callisto::logging::init(&args.logging.log, args.logging.log_format)?;
            raise_open_file_limit();
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            runtime.block_on(async move {
                let signals = StopSignals::install()?;
                let metrics = match args.metrics_listen {
                    Some(listen) => Some(StandaloneMetrics::bind(listen).await?),
                    None => None,
                };
                let health = Health::default();
                let tls = callisto::tls::from_args(&args.tls)?;
                if let Some(setup) = &tls {
                    callisto::tls::keep_fresh(
                        setup.certificate.clone(),
                        args.tls.recheck(),
                        CancellationToken::new(),
                        &health,
                    )?;
                }
                let host = args.tls.tls_names.first().cloned();
                let turn = callisto::turn::start(
                    &args.turn,
                    tls.map(|t| t.config),
                    host.as_deref(),
                    false,
                    std::time::Duration::from_secs(86_400),
                    // Nobody to tell: `turn` hands out no credentials.
                    || {},
                    &health,
                )
                .await?;
                let health = health.with_turn(turn.service.health());
                if let Some(metrics) = metrics {
                    metrics.serve(health.clone())?;
                }
                let stop = CancellationToken::new();
                systemd::ready();
                systemd::feed_watchdog(health, stop.clone());
                signals.wait().await;
                tracing::info!("shutting down");
                systemd::stopping();
                stop.cancel();
                turn.service.stop().await;
                Ok(())
            })
        }
        Command::Serve(args) => {
            callisto::logging::init(&args.logging.log, args.logging.log_format)?;
            raise_open_file_limit();
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            runtime.block_on(async move {
                let signals = StopSignals::install()?;
                let shutdown = CancellationToken::new();
                let server = callisto::serve::start(args, shutdown.clone()).await?;
                systemd::ready();
                systemd::feed_watchdog(server.health.clone(), shutdown.clone());
                signals.wait().await;
                tracing::info!("shutting down");
                systemd::stopping();
                shutdown.cancel();
                server.wait().await;
                Ok(())
            })
        }
    }
}

/// Every connection and relay socket is a descriptor: take all the
/// kernel lets this process have (see `callisto::open_files`).
fn raise_open_file_limit() {
    match callisto::open_files::raise_to_hard_limit() {
        Ok(limit) => tracing::debug!(limit, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit"),
    }
}

/// SIGINT and SIGTERM handlers, installed before the server announces itself
/// so that a signal sent right after start-up is never missed; and SIGHUP's,
/// which never stops the server: it asks it to re-read its files (the TLS
/// certificate, the TURN secrets and the alternate TURN servers, whose own
/// handlers do that).
struct StopSignals {
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    hup: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn install() -> anyhow::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(StopSignals {
                int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
                term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
                hup: signal(SignalKind::hangup()).context("installing the SIGHUP handler")?,
            })
        }
        #[cfg(not(unix))]
        Ok(StopSignals {})
    }

    async fn wait(mut self) {
        #[cfg(unix)]
        loop {
            tokio::select! {
                _ = self.int.recv() => return,
                _ = self.term.recv() => return,
                _ = self.hup.recv() => tracing::info!(
                    "SIGHUP: re-reading the files given: TLS certificate, TURN secrets, alternate TURN servers"
                ),
            }
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }
}
