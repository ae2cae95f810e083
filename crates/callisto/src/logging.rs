//! Structured logging with `tracing`: text or JSON lines on stderr, panics
//! among them.

use std::io::IsTerminal;

use anyhow::Context;
use tracing_subscriber::EnvFilter;

use crate::cli::LogFormat;

/// Installs the global subscriber. `filter` uses RUST_LOG syntax.
pub fn init(filter: &str, format: LogFormat) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(filter)
        .with_context(|| format!("--log {filter:?} is not a valid filter (try \"info\" or \"callisto_signal=debug,info\")"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    result.map_err(|e| anyhow::anyhow!("installing the logger: {e}"))?;
    log_panics();
    Ok(())
}

/// Sends panics to the log as errors, and counts them in
/// `callisto_panics_total`. Nothing from outside should panic the server,
/// and a panic costs only the connection, or the TURN worker's
/// allocations, it happened in, so the server goes on, short of what it
/// took (see docs/architecture.md): the default hook's plain text
/// on stderr would be all anyone learned of it, and a JSON log reader
/// would skip it.
pub fn log_panics() {
    std::panic::set_hook(Box::new(|info| {
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| info.payload().downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(no message)");
        let location = info.location().map(ToString::to_string).unwrap_or_default();
        let thread = std::thread::current();
        let thread = thread.name().unwrap_or("unnamed");
        metrics::counter!("callisto_panics_total").increment(1);
        // Captured only when RUST_BACKTRACE asks for it.
        let backtrace = std::backtrace::Backtrace::capture();
        if backtrace.status() == std::backtrace::BacktraceStatus::Captured {
            tracing::error!(
                thread,
                %location,
                %backtrace,
                "panicked: {message}. This is a bug in Callisto: please report it with this line"
            );
        } else {
            tracing::error!(
                thread,
                %location,
                "panicked: {message}. This is a bug in Callisto: please report it with this line"
            );
        }
    }));
}
