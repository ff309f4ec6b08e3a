//! The subcommands' bodies: what `run`, `check`, `token`, `authorize`,
//! `hash-key`, `ca init` and `demo` do, their output and their exit codes. The binary
//! (`main.rs`) only parses arguments and dispatches here. This is the
//! program's edge, so errors are `anyhow` with context from here on out.

mod ca;
mod check;
mod consent;
mod run;

use crate::config::{Config, Credential};

pub use ca::ca_init;
pub use check::{check, config_reference, config_schema, hash_key};
pub use consent::{authorize, token};
pub use run::{demo, run};

/// Exit code for a configuration problem (EX_USAGE).
pub const EXIT_CONFIG: u8 = 64;

/// A failure with the exit code it maps to.
pub struct Failure {
    pub code: u8,
    pub error: anyhow::Error,
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(error: E) -> Self {
        Self {
            code: 1,
            error: error.into(),
        }
    }
}

pub(crate) fn config_failure(error: impl Into<anyhow::Error>) -> Failure {
    Failure {
        code: EXIT_CONFIG,
        error: error.into(),
    }
}

/// The credential `--credential` names, or the only (or default) one.
pub(crate) fn choose_credential<'c>(
    config: &'c Config,
    credential: Option<&str>,
) -> Result<&'c Credential, Failure> {
    Ok(match credential {
        Some(name) => config
            .credentials
            .iter()
            .find(|c| c.name == name)
            .ok_or_else(|| {
                let known: Vec<&str> = config.credentials.iter().map(|c| c.name.as_str()).collect();
                config_failure(anyhow::anyhow!(
                    "--credential {name}: no such credential (known: {})",
                    known.join(", ")
                ))
            })?,
        None if config.credentials.len() == 1 => &config.credentials[0],
        None => &config.credentials[config.default_credential()],
    })
}

pub(crate) fn current_thread_runtime() -> Result<tokio::runtime::Runtime, Failure> {
    run::built(tokio::runtime::Builder::new_current_thread())
}
