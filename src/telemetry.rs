//! Log output: text for people, JSON for collectors, filtered like
//! `RUST_LOG`. Nothing here ever sees a secret: fields are chosen at the
//! call sites, and secret types redact themselves.

use std::io::IsTerminal;

use clap::ValueEnum;
use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, thiserror::Error)]
#[error("invalid log filter {filter:?}: {reason}")]
pub struct LogFilterError {
    filter: String,
    reason: String,
}

/// Installs the global subscriber, writing to stderr. `filter` wins over
/// `RUST_LOG`; with neither, `info`.
pub fn init(format: LogFormat, filter: Option<&str>) -> Result<(), LogFilterError> {
    let filter_text = filter
        .map(str::to_owned)
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| "info".to_owned());
    let filter = EnvFilter::try_new(&filter_text).map_err(|e| LogFilterError {
        filter: filter_text.clone(),
        reason: e.to_string(),
    })?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        // A line that cannot be written (stderr's reader has gone) is lost
        // quietly: reporting it would `eprintln!` to the same dead stderr,
        // which panics the task that logged — such as the one that turns
        // SIGTERM into the drain, leaving the process unable to stop.
        .log_internal_errors(false);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    Ok(())
}
