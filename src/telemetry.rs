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
    let filter_text = with_quiet_peers(
        &filter
            .map(str::to_owned)
            .or_else(|| std::env::var("RUST_LOG").ok())
            .unwrap_or_else(|| "info".to_owned()),
    );
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

/// `filter` with the `h2` crate held to errors unless the filter names it
/// or asks for debug or trace anywhere: h2 logs an HTTP/2 client's
/// protocol faults (a PING ack never asked for) as warnings, which read as
/// the proxy's own. The connection's end is logged at debug by the server
/// with its cause.
fn with_quiet_peers(filter: &str) -> String {
    let names_h2 = filter
        .split(',')
        .any(|directive| directive.trim_start().starts_with("h2"));
    let verbose = filter.contains("debug") || filter.contains("trace");
    if names_h2 || verbose {
        filter.to_owned()
    } else {
        format!("{filter},h2=error")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn h2_warnings_about_peers_are_quiet_unless_asked_for() {
        assert_eq!(with_quiet_peers("info"), "info,h2=error");
        assert_eq!(
            with_quiet_peers("warn,coupa_auth_proxy=info"),
            "warn,coupa_auth_proxy=info,h2=error"
        );
        assert_eq!(with_quiet_peers("trace"), "trace", "asked for everything");
        assert_eq!(with_quiet_peers("info,h2=debug"), "info,h2=debug");
        assert_eq!(with_quiet_peers("h2::proto=trace"), "h2::proto=trace");
        assert!(EnvFilter::try_new(with_quiet_peers("info")).is_ok());
    }
}
