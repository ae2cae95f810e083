//! `callisto`: the binary's entry point. Parses the command line, starts
//! logging, and runs the chosen subcommand until SIGINT or SIGTERM.

use anyhow::Context;
use callisto::cli::{Cli, Command};
use clap::Parser;
use tokio_util::sync::CancellationToken;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            callisto::logging::init(&args.log, args.log_format)?;
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            runtime.block_on(async move {
                let shutdown = CancellationToken::new();
                let server = callisto::serve::start(args, shutdown.clone()).await?;
                wait_for_signal().await;
                tracing::info!("shutting down");
                shutdown.cancel();
                server.wait().await;
                Ok(())
            })
        }
    }
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(
            tokio::signal::unix::SignalKind::terminate(),
        ) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the server");
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
