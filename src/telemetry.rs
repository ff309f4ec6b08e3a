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

/// A warning that an attack or a looping client can repeat without end:
/// written the first time, then at most once per [`Repeated::EVERY`] with
/// the number left out since, so a flood cannot fill a disk. Each kind of
/// warning has its own (a `static` at its call site); what every request
/// leaves is its access line and its counter.
pub struct Repeated {
    last: std::sync::Mutex<Option<std::time::Instant>>,
    left_out: std::sync::atomic::AtomicU64,
}

impl Repeated {
    pub const EVERY: std::time::Duration = std::time::Duration::from_secs(60);

    pub const fn new() -> Self {
        Self {
            last: std::sync::Mutex::new(None),
            left_out: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// `Some(n)` when the warning is to be written now (`n` left out since
    /// the last one), `None` when it is left out.
    pub fn due(&self) -> Option<u64> {
        self.due_at(std::time::Instant::now())
    }

    fn due_at(&self, now: std::time::Instant) -> Option<u64> {
        use std::sync::atomic::Ordering;
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        match *last {
            Some(at) if now.saturating_duration_since(at) < Self::EVERY => {
                self.left_out.fetch_add(1, Ordering::Relaxed);
                None
            }
            _ => {
                *last = Some(now);
                Some(self.left_out.swap(0, Ordering::Relaxed))
            }
        }
    }
}

impl Default for Repeated {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_warning_is_written_once_a_minute_with_the_count_left_out() {
        let warning = Repeated::new();
        let start = std::time::Instant::now();
        assert_eq!(warning.due_at(start), Some(0));
        for n in 1..=500 {
            let at = start + std::time::Duration::from_millis(n * 100);
            assert_eq!(warning.due_at(at), None);
        }
        assert_eq!(warning.due_at(start + Repeated::EVERY), Some(500));
        assert_eq!(warning.due_at(start + Repeated::EVERY * 3), Some(0));
    }

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
