//! Configuration: the TOML file, `${ENV}` expansion, and validation into the
//! typed [`Config`] the rest of the crate runs on.
//!
//! Loading happens in passes so that nothing half-checked reaches the proxy,
//! and a user meets every cheap-to-find mistake in one run:
//! 1. [`env`]: `${NAME}` expanded in every string;
//! 2. [`file`]: the serde shape, rejecting unknown keys;
//! 3. [`validate`] (and [`credentials`] for `[oauth]`): file shape → the
//!    runtime [`model`], values known good (URLs parsed and policy-checked,
//!    secrets read, CA file parsed), with the values tables share parsed
//!    in [`values`].
//!
//! Passes 1 and 2 report all their problems together (an unset variable and
//! a typo'd key in one message); pass 3 stops at the first, since later
//! checks often depend on earlier values. Every error names its key.
//! [`summary`] renders the redacted view `check` prints.

mod credentials;
mod env;
mod file;
mod model;
mod reference;
mod summary;
mod validate;
mod values;
mod warnings;

use std::path::{Path, PathBuf};

pub use env::expand_str;
pub use model::*;
pub use reference::reference_markdown;

/// The environment variable that may hold the config file's path.
pub const CONFIG_ENV: &str = "COUPA_PROXY_CONFIG";

/// The name of the credential a single `[oauth]` table defines, and the one
/// used when no integrations are configured.
pub const DEFAULT_CREDENTIAL: &str = "default";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config is not valid TOML: {0}")]
    Syntax(String),
    #[error("{key}: environment variable `{var}` is not set (or not valid UTF-8)")]
    MissingEnv { key: String, var: String },
    #[error("{key}: unterminated `${{` (write `$${{` for a literal `${{`)")]
    BadExpansion { key: String },
    #[error("{key}: {message}")]
    Shape { key: String, message: String },
    #[error("{key}: {reason}")]
    Invalid { key: String, reason: String },
    /// More than one problem found in one pass, in file order.
    #[error("{} problems:{}", .0.len(), several(.0))]
    Several(Vec<ConfigError>),
}

fn several(problems: &[ConfigError]) -> String {
    problems.iter().map(|p| format!("\n  - {p}")).collect()
}

impl ConfigError {
    /// One problem as itself, several as [`ConfigError::Several`]; `None`
    /// when there are none.
    fn from_problems(mut problems: Vec<ConfigError>) -> Option<Self> {
        match problems.len() {
            0 => None,
            1 => problems.pop(),
            _ => Some(Self::Several(problems)),
        }
    }
}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}

/// The configuration file's JSON Schema (draft 2020-12), from the same
/// types serde reads the file with, so it cannot drift from what `check`
/// accepts; each key's description is its doc comment. Pretty-printed, as
/// `docs/proxy.schema.json` holds it.
pub fn schema_text() -> String {
    let mut schema = schemars::schema_for!(file::FileConfig);
    schema.insert(
        "title".into(),
        "coupa-auth-proxy configuration (proxy.toml)".into(),
    );
    serde_json::to_string_pretty(&schema).unwrap_or_default()
}

impl Config {
    /// Reads, expands and validates the file at `path` using the process
    /// environment. Relative paths inside it resolve against its directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let base_dir = path.parent().unwrap_or_else(|| Path::new("."));
        Self::from_toml(&text, base_dir, |var| std::env::var(var).ok())
    }

    /// Parses `text`, expanding `${NAME}` through `env`.
    pub fn from_toml(
        text: &str,
        base_dir: &Path,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let mut table: toml::Table =
            toml::from_str(text).map_err(|e| ConfigError::Syntax(e.to_string()))?;
        let mut problems = Vec::new();
        for (key, value) in table.iter_mut() {
            env::expand_value(value, key, &env, &mut problems);
        }
        let file: Option<file::FileConfig> =
            file::deserialize(toml::Value::Table(table), "", &mut problems);
        if let Some(file) = &file {
            credentials::check_shapes(&file.oauth, &mut problems);
        }
        if let Some(error) = ConfigError::from_problems(problems) {
            return Err(error);
        }
        // A shape error always leaves a problem behind, so `file` is set.
        let file = file.ok_or_else(|| invalid("config", "could not be read"))?;
        file.validate(base_dir)
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    use super::*;

    pub const MINIMAL: &str = r#"
[listen]
address = "127.0.0.1:8080"

[coupa]
base_url = "https://acme.coupahost.com"
accept = "application/json"

[oauth]
client_id = "integration-proxy"
client_secret = "${COUPA_CLIENT_SECRET}"
scopes = ["core.common.read", "core.invoice.read"]

[admin]
address = "127.0.0.1:9090"
"#;

    pub fn env(var: &str) -> Option<String> {
        (var == "COUPA_CLIENT_SECRET").then(|| "s3cr3t-value".to_owned())
    }

    pub fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, Path::new("."), env)
    }

    /// MINIMAL turned into a user-consented credential: no secret,
    /// `offline_access`, a state file, plus `extra` oauth keys.
    pub fn user_grant(grant: &str, extra: &str) -> String {
        MINIMAL
            .replace("client_secret = \"${COUPA_CLIENT_SECRET}\"\n", "")
            .replace(
                "scopes = [\"core.common.read\", \"core.invoice.read\"]",
                &format!(
                    "scopes = [\"core.invoice.read\", \"offline_access\"]\ngrant = \"{grant}\"\n\
                     state_file = \"state/invoices.json\"\n{extra}"
                ),
            )
    }

    pub fn error_of(text: &str) -> String {
        load(text).unwrap_err().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::*;
    use super::*;

    #[test]
    fn unknown_keys_and_unset_variables_are_reported_together() {
        let text = MINIMAL
            .replace("COUPA_CLIENT_SECRET", "NOPE_NOT_SET")
            .replace("[admin]", "[admin]\nadress = \"x\"")
            .replace("[coupa]", "[coupa]\nbase_ulr = \"x\"\naccpet = \"x\"")
            .replace("client_id", "client_idd = \"x\"\nclient_id");
        let err = load(&text).unwrap_err();
        let ConfigError::Several(problems) = &err else {
            panic!("one problem only: {err}");
        };
        let shown = err.to_string();
        assert!(shown.starts_with("5 problems:"), "{shown}");
        for fragment in [
            "oauth.client_secret: environment variable `NOPE_NOT_SET`",
            "admin.adress: unknown field `adress`",
            "coupa.base_ulr: unknown field `base_ulr`",
            "coupa.accpet: unknown field `accpet`",
            "oauth.client_idd: unknown field `client_idd`",
        ] {
            assert!(shown.contains(fragment), "{fragment:?} missing in {shown}");
        }
        assert_eq!(problems.len(), 5);
    }

    #[test]
    fn one_problem_is_reported_as_itself() {
        let err = load(&MINIMAL.replace("[admin]", "[admin]\nadress = \"x\"")).unwrap_err();
        assert!(matches!(err, ConfigError::Shape { .. }), "{err}");
    }

    #[test]
    fn shipped_example_config_is_valid() {
        let text = include_str!("../../proxy.toml.example");
        load(text).unwrap();
    }

    /// The commented `[oauth.NAME]` grant examples in proxy.toml.example
    /// are valid as written, once uncommented.
    #[test]
    fn commented_grant_examples_are_valid() {
        let text = include_str!("../../proxy.toml.example");
        for (name, grant) in [
            ("buyer", GrantKind::AuthorizationCode),
            ("approver", GrantKind::DeviceCode),
        ] {
            let header = format!("#   [oauth.{name}]");
            let block: String = text
                .lines()
                .skip_while(|l| *l != header)
                .take_while(|l| l.starts_with("#   "))
                .map(|l| format!("{}\n", &l[4..]))
                .collect();
            assert!(block.contains("grant"), "example {name} not found");
            let config = format!("[coupa]\nbase_url = \"https://acme.coupahost.com\"\n{block}");
            let config = load(&config).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(config.credentials[0].oauth.grant.kind(), grant);
        }
    }

    #[test]
    fn two_integration_example_is_valid() {
        let text = include_str!("../../examples/two-integrations.toml");
        let config = Config::from_toml(text, Path::new("."), |var| {
            var.starts_with("COUPA_")
                .then(|| format!("secret-of-{var}"))
        })
        .unwrap();
        assert_eq!(config.credentials.len(), 2);
        assert_eq!(config.integrations.len(), 2);
        let invoices = &config.credentials[config.integrations[0].credential];
        assert_eq!(invoices.name, "invoices");
        assert_eq!(
            invoices.oauth.scopes,
            ["core.invoice.read", "core.invoice.write"]
        );
    }
}
