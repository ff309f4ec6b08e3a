//! Configuration: the TOML file's shape, `${ENV}` expansion, and validation
//! into the typed [`Config`] the rest of the crate runs on.
//!
//! Loading happens in two steps so that nothing half-checked reaches the
//! proxy: the file is parsed into serde structs that reject unknown keys,
//! then [`FileConfig::validate`] turns them into a [`Config`] whose values are
//! known good (URLs parsed and policy-checked, secret read, CA file parsed).
//! Every error names the key it is about.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::HeaderValue;
use rustls::pki_types::CertificateDer;
use serde::Deserialize;

use crate::secret::Secret;

/// The environment variable that may hold the config file's path.
pub const CONFIG_ENV: &str = "COUPA_PROXY_CONFIG";

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
    Invalid { key: &'static str, reason: String },
}

fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        reason: reason.into(),
    }
}

// ---------------------------------------------------------------------------
// File shape (what users write)
// ---------------------------------------------------------------------------

/// The config file as written. Every table rejects keys it does not know.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    listen: ListenFile,
    coupa: CoupaFile,
    oauth: OAuthFile,
    #[serde(default)]
    admin: AdminFile,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListenFile {
    #[serde(default = "default_listen_address")]
    address: SocketAddr,
    #[serde(default = "default_shutdown_grace", with = "humantime_serde")]
    shutdown_grace: Duration,
    #[serde(default = "default_header_read_timeout", with = "humantime_serde")]
    header_read_timeout: Duration,
    #[serde(default = "default_max_header_bytes")]
    max_header_bytes: usize,
    #[serde(default = "default_max_connections")]
    max_connections: usize,
}

impl Default for ListenFile {
    fn default() -> Self {
        Self {
            address: default_listen_address(),
            shutdown_grace: default_shutdown_grace(),
            header_read_timeout: default_header_read_timeout(),
            max_header_bytes: default_max_header_bytes(),
            max_connections: default_max_connections(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CoupaFile {
    base_url: String,
    ca_file: Option<PathBuf>,
    #[serde(default = "default_accept")]
    accept: String,
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    connect_timeout: Duration,
    #[serde(default = "default_pool_idle_timeout", with = "humantime_serde")]
    pool_idle_timeout: Duration,
    #[serde(default = "default_response_header_timeout", with = "humantime_serde")]
    response_header_timeout: Duration,
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    idle_timeout: Duration,
    #[serde(default = "default_replay_body_limit")]
    replay_body_limit: usize,
    rate_limit: Option<RateLimitFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RateLimitFile {
    #[serde(default = "default_rate_per_second")]
    per_second: f64,
    #[serde(default = "default_rate_burst")]
    burst: u32,
    #[serde(default = "default_rate_max_queue")]
    max_queue: usize,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OAuthFile {
    client_id: String,
    client_secret: Option<String>,
    client_secret_file: Option<PathBuf>,
    scopes: Vec<String>,
    token_url: Option<String>,
    #[serde(default)]
    client_auth: ClientAuth,
    #[serde(default = "default_refresh_fraction")]
    refresh_fraction: f64,
    #[serde(default = "default_activation_delay", with = "humantime_serde")]
    activation_delay: Duration,
    #[serde(default = "default_retry_initial", with = "humantime_serde")]
    retry_initial: Duration,
    #[serde(default = "default_retry_max", with = "humantime_serde")]
    retry_max: Duration,
    #[serde(default = "default_token_timeout", with = "humantime_serde")]
    request_timeout: Duration,
    #[serde(default = "default_rejected_token_cooldown", with = "humantime_serde")]
    rejected_token_cooldown: Duration,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AdminFile {
    #[serde(default = "default_admin_address")]
    address: SocketAddr,
}

impl Default for AdminFile {
    fn default() -> Self {
        Self {
            address: default_admin_address(),
        }
    }
}

fn default_listen_address() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}
fn default_admin_address() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9090))
}
fn default_shutdown_grace() -> Duration {
    Duration::from_secs(30)
}
fn default_header_read_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_max_header_bytes() -> usize {
    64 * 1024
}
fn default_max_connections() -> usize {
    4096
}
fn default_response_header_timeout() -> Duration {
    Duration::from_secs(120)
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_replay_body_limit() -> usize {
    1024 * 1024
}
fn default_rate_per_second() -> f64 {
    // Coupa's documented limit per instance.
    25.0
}
fn default_rate_burst() -> u32 {
    20
}
fn default_rate_max_queue() -> usize {
    100
}
fn default_rejected_token_cooldown() -> Duration {
    Duration::from_secs(10)
}
fn default_accept() -> String {
    "application/json".to_owned()
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_pool_idle_timeout() -> Duration {
    Duration::from_secs(90)
}
fn default_refresh_fraction() -> f64 {
    // 20 h of Coupa's 24 h token lifetime, as Coupa advises.
    0.8333
}
fn default_activation_delay() -> Duration {
    Duration::from_secs(5)
}
fn default_retry_initial() -> Duration {
    Duration::from_secs(1)
}
fn default_retry_max() -> Duration {
    Duration::from_secs(300)
}
fn default_token_timeout() -> Duration {
    Duration::from_secs(30)
}

/// How the client id and secret reach the token endpoint. Coupa rejects a
/// request that carries them both ways ("provided multiple credentials").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    /// `client_id` and `client_secret` as form fields.
    #[default]
    Body,
    /// HTTP Basic authentication.
    Basic,
}

// ---------------------------------------------------------------------------
// Validated model (what the proxy runs on)
// ---------------------------------------------------------------------------

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: Listen,
    pub coupa: Coupa,
    pub oauth: OAuth,
    pub admin: Admin,
}

#[derive(Debug, Clone)]
pub struct Listen {
    pub address: SocketAddr,
    /// How long in-flight requests may run on after a shutdown signal.
    pub shutdown_grace: Duration,
    /// A client must send a whole request head within this (slowloris).
    pub header_read_timeout: Duration,
    /// Largest request head accepted; beyond it the client gets 431.
    pub max_header_bytes: usize,
    /// Open client connections beyond this get a 503 and are closed.
    pub max_connections: usize,
}

#[derive(Debug, Clone)]
pub struct Coupa {
    /// The instance URL as configured, for summaries and logs.
    pub base_url: String,
    pub scheme: Scheme,
    pub authority: Authority,
    /// Path the instance is mounted under, without a trailing slash; usually
    /// empty. Prepended to every forwarded request's path.
    pub path_prefix: String,
    /// Extra trust roots for the upstream and the token endpoint.
    pub ca_file: Option<PathBuf>,
    pub extra_roots: Vec<CertificateDer<'static>>,
    /// `Accept` sent when the client gave none (or only `*/*`) and its
    /// `Content-Type` does not say JSON or XML.
    pub accept: HeaderValue,
    pub connect_timeout: Duration,
    pub pool_idle_timeout: Duration,
    /// Coupa must start answering (status and headers) within this.
    pub response_header_timeout: Duration,
    /// A response body that stalls this long is aborted.
    pub idle_timeout: Duration,
    /// Request bodies up to this size are kept while they stream, so the
    /// request can be replayed after a 401 or a stale connection.
    pub replay_body_limit: usize,
    /// Outbound shaping to Coupa's rate limit; off when absent.
    pub rate_limit: Option<RateLimit>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: u32,
    pub max_queue: usize,
}

#[derive(Debug, Clone)]
pub struct OAuth {
    pub client_id: String,
    pub client_secret: Secret,
    /// Where the secret came from, for the summary (never the value).
    pub secret_source: SecretSource,
    pub scopes: Vec<String>,
    pub token_url: String,
    pub client_auth: ClientAuth,
    pub refresh_fraction: f64,
    pub activation_delay: Duration,
    pub retry_initial: Duration,
    pub retry_max: Duration,
    pub request_timeout: Duration,
    /// After a 401-triggered token fetch, no other one starts within this.
    pub rejected_token_cooldown: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    Inline,
    File(PathBuf),
}

impl fmt::Display for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Inline => f.write_str("client_secret"),
            Self::File(path) => write!(f, "client_secret_file {}", path.display()),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Admin {
    pub address: SocketAddr,
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
        for (key, value) in table.iter_mut() {
            expand_value(value, key, &env)?;
        }
        let file: FileConfig = serde_path_to_error::deserialize(toml::Value::Table(table))
            .map_err(|e| {
                let key = e.path().to_string();
                ConfigError::Shape {
                    key: if key == "." { "config".to_owned() } else { key },
                    message: e.into_inner().message().to_owned(),
                }
            })?;
        file.validate(base_dir)
    }

    /// A human-readable summary with every secret redacted, for `check`.
    pub fn summary(&self) -> String {
        let (l, c, o) = (&self.listen, &self.coupa, &self.oauth);
        let d = |v: Duration| humantime::format_duration(v).to_string();
        let ca = c
            .ca_file
            .as_ref()
            .map(|p| format!("{} ({} certificates)", p.display(), c.extra_roots.len()))
            .unwrap_or_else(|| "none (public roots only)".to_owned());
        let rate = c
            .rate_limit
            .map(|r| {
                format!(
                    "{}/s, burst {}, queue {}",
                    r.per_second, r.burst, r.max_queue
                )
            })
            .unwrap_or_else(|| "off".to_owned());
        let renew_after = Duration::from_secs((86_400.0 * o.refresh_fraction).round() as u64);
        let rows: [(&str, String); 24] = [
            ("listen.address", l.address.to_string()),
            ("listen.shutdown_grace", d(l.shutdown_grace)),
            ("listen.header_read_timeout", d(l.header_read_timeout)),
            ("listen.max_header_bytes", l.max_header_bytes.to_string()),
            ("listen.max_connections", l.max_connections.to_string()),
            ("coupa.base_url", c.base_url.clone()),
            ("coupa.ca_file", ca),
            ("coupa.accept", c.accept.to_str().unwrap_or("?").to_owned()),
            ("coupa.connect_timeout", d(c.connect_timeout)),
            (
                "coupa.response_header_timeout",
                d(c.response_header_timeout),
            ),
            ("coupa.idle_timeout", d(c.idle_timeout)),
            ("coupa.pool_idle_timeout", d(c.pool_idle_timeout)),
            (
                "coupa.replay_body_limit",
                format!("{} bytes", c.replay_body_limit),
            ),
            ("coupa.rate_limit", rate),
            ("oauth.client_id", o.client_id.clone()),
            (
                "oauth.client_secret",
                format!("<redacted> (from {})", o.secret_source),
            ),
            ("oauth.scopes", o.scopes.join(" ")),
            ("oauth.token_url", o.token_url.clone()),
            (
                "oauth.client_auth",
                match o.client_auth {
                    ClientAuth::Body => "body",
                    ClientAuth::Basic => "basic",
                }
                .to_owned(),
            ),
            (
                "oauth.refresh_fraction",
                format!(
                    "{} (renew after {} of a 24 h token)",
                    o.refresh_fraction,
                    d(renew_after)
                ),
            ),
            ("oauth.activation_delay", d(o.activation_delay)),
            (
                "oauth.retry",
                format!("{} .. {}", d(o.retry_initial), d(o.retry_max)),
            ),
            (
                "oauth.rejected_token_cooldown",
                d(o.rejected_token_cooldown),
            ),
            ("admin.address", self.admin.address.to_string()),
        ];
        rows.iter()
            .map(|(key, value)| format!("{key:<31}{value}\n"))
            .collect()
    }
}

impl FileConfig {
    /// Checks every value and builds the runtime model. Destructures each
    /// table completely so that a new key cannot be silently ignored.
    pub fn validate(self, base_dir: &Path) -> Result<Config, ConfigError> {
        let FileConfig {
            listen,
            coupa,
            oauth,
            admin,
        } = self;
        let ListenFile {
            address: listen_address,
            shutdown_grace,
            header_read_timeout,
            max_header_bytes,
            max_connections,
        } = listen;
        let CoupaFile {
            base_url,
            ca_file,
            accept,
            connect_timeout,
            pool_idle_timeout,
            response_header_timeout,
            idle_timeout,
            replay_body_limit,
            rate_limit,
        } = coupa;
        let OAuthFile {
            client_id,
            client_secret,
            client_secret_file,
            scopes,
            token_url,
            client_auth,
            refresh_fraction,
            activation_delay,
            retry_initial,
            retry_max,
            request_timeout,
            rejected_token_cooldown,
        } = oauth;
        let AdminFile {
            address: admin_address,
        } = admin;

        let base = parse_endpoint("coupa.base_url", &base_url)?;
        if base.query().is_some() || base.fragment().is_some() {
            return Err(invalid(
                "coupa.base_url",
                "must not have a query or fragment; give the instance URL, e.g. https://acme.coupahost.com",
            ));
        }
        let scheme = if base.scheme() == "https" {
            Scheme::HTTPS
        } else {
            Scheme::HTTP
        };
        let host = base.host_str().unwrap_or_default();
        let authority_text = match base.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_owned(),
        };
        let authority: Authority = authority_text
            .parse()
            .map_err(|e| invalid("coupa.base_url", format!("bad host: {e}")))?;
        let path_prefix = base.path().trim_end_matches('/').to_owned();
        let base_url = base_url.trim_end_matches('/').to_owned();

        let token_url = match token_url {
            Some(url) => parse_endpoint("oauth.token_url", &url)?.to_string(),
            None => format!("{base_url}/oauth2/token"),
        };

        let (ca_file, extra_roots) = match ca_file {
            None => (None, Vec::new()),
            Some(path) => {
                let path = base_dir.join(path);
                let roots = read_ca_file(&path)?;
                (Some(path), roots)
            }
        };

        let accept = HeaderValue::from_str(accept.trim())
            .ok()
            .filter(|v| !v.is_empty())
            .ok_or_else(|| invalid("coupa.accept", "must be a non-empty header value"))?;

        if client_id.trim().is_empty() {
            return Err(invalid("oauth.client_id", "must not be empty"));
        }
        let (client_secret, secret_source) = match (client_secret, client_secret_file) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "oauth.client_secret",
                    "set either client_secret or client_secret_file, not both",
                ))
            }
            (None, None) => {
                return Err(invalid(
                    "oauth.client_secret",
                    "missing: set client_secret (e.g. \"${COUPA_CLIENT_SECRET}\") or client_secret_file",
                ))
            }
            (Some(secret), None) => (Secret::new(secret), SecretSource::Inline),
            (None, Some(path)) => {
                let path = base_dir.join(path);
                let text = std::fs::read_to_string(&path).map_err(|e| {
                    invalid(
                        "oauth.client_secret_file",
                        format!("cannot read {}: {e}", path.display()),
                    )
                })?;
                // Secret files are usually written with a trailing newline.
                let secret = Secret::new(text.trim_end_matches(['\r', '\n']));
                (secret, SecretSource::File(path))
            }
        };
        if client_secret.expose().trim().is_empty() {
            return Err(invalid("oauth.client_secret", "is empty"));
        }

        if scopes.is_empty() {
            return Err(invalid(
                "oauth.scopes",
                "list at least one scope, e.g. [\"core.common.read\"]",
            ));
        }
        for scope in &scopes {
            if scope.is_empty() || scope.contains([' ', ',', '\t']) {
                return Err(invalid(
                    "oauth.scopes",
                    format!("{scope:?} is not one scope: give each scope as its own list item (service.object.right)"),
                ));
            }
        }

        if !(refresh_fraction > 0.0 && refresh_fraction < 1.0) {
            return Err(invalid(
                "oauth.refresh_fraction",
                format!("must be between 0 and 1 (exclusive), got {refresh_fraction}"),
            ));
        }
        if retry_initial.is_zero() || retry_max < retry_initial {
            return Err(invalid(
                "oauth.retry_max",
                "retry_initial must be positive and retry_max at least retry_initial",
            ));
        }
        if request_timeout.is_zero() {
            return Err(invalid("oauth.request_timeout", "must be positive"));
        }
        for (key, value) in [
            ("coupa.connect_timeout", connect_timeout),
            ("coupa.response_header_timeout", response_header_timeout),
            ("coupa.idle_timeout", idle_timeout),
            ("listen.header_read_timeout", header_read_timeout),
        ] {
            if value.is_zero() {
                return Err(invalid(key, "must be positive"));
            }
        }
        // hyper cannot read a request head into less than 8 KiB.
        if max_header_bytes < 8192 {
            return Err(invalid(
                "listen.max_header_bytes",
                format!("must be at least 8192, got {max_header_bytes}"),
            ));
        }
        if max_connections == 0 {
            return Err(invalid("listen.max_connections", "must be positive"));
        }
        let rate_limit = match rate_limit {
            None => None,
            Some(RateLimitFile {
                per_second,
                burst,
                max_queue,
            }) => {
                if !(per_second.is_finite() && per_second > 0.0) {
                    return Err(invalid(
                        "coupa.rate_limit.per_second",
                        format!("must be a positive number, got {per_second}"),
                    ));
                }
                if burst == 0 {
                    return Err(invalid("coupa.rate_limit.burst", "must be at least 1"));
                }
                Some(RateLimit {
                    per_second,
                    burst,
                    max_queue,
                })
            }
        };

        Ok(Config {
            listen: Listen {
                address: listen_address,
                shutdown_grace,
                header_read_timeout,
                max_header_bytes,
                max_connections,
            },
            coupa: Coupa {
                base_url,
                scheme,
                authority,
                path_prefix,
                ca_file,
                extra_roots,
                accept,
                connect_timeout,
                pool_idle_timeout,
                response_header_timeout,
                idle_timeout,
                replay_body_limit,
                rate_limit,
            },
            oauth: OAuth {
                client_id,
                client_secret,
                secret_source,
                scopes,
                token_url,
                client_auth,
                refresh_fraction,
                activation_delay,
                retry_initial,
                retry_max,
                request_timeout,
                rejected_token_cooldown,
            },
            admin: Admin {
                address: admin_address,
            },
        })
    }
}

/// Parses an upstream URL and applies the transport policy: HTTPS always,
/// plain HTTP only to this machine (tests, a local TLS-terminating sidecar).
fn parse_endpoint(key: &'static str, text: &str) -> Result<reqwest::Url, ConfigError> {
    let url = reqwest::Url::parse(text.trim())
        .map_err(|e| invalid(key, format!("{text:?} is not a URL: {e}")))?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(invalid(key, "must not contain credentials"));
    }
    let host = url
        .host()
        .ok_or_else(|| invalid(key, format!("{text:?} has no host")))?;
    match url.scheme() {
        "https" => Ok(url),
        "http" if is_loopback(&host) => Ok(url),
        "http" => Err(invalid(
            key,
            format!("plain http:// is only allowed for loopback hosts; use https:// for {host}"),
        )),
        other => Err(invalid(
            key,
            format!("unsupported scheme {other:?}; use https://"),
        )),
    }
}

fn is_loopback(host: &url::Host<&str>) -> bool {
    match host {
        url::Host::Domain(name) => name.eq_ignore_ascii_case("localhost"),
        url::Host::Ipv4(ip) => IpAddr::V4(*ip).is_loopback(),
        url::Host::Ipv6(ip) => IpAddr::V6(*ip).is_loopback(),
    }
}

fn read_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let data = std::fs::read(path).map_err(|e| {
        invalid(
            "coupa.ca_file",
            format!("cannot read {}: {e}", path.display()),
        )
    })?;
    let certs = rustls_pemfile::certs(&mut data.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid("coupa.ca_file", format!("{}: bad PEM: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(invalid(
            "coupa.ca_file",
            format!("{} holds no PEM certificates", path.display()),
        ));
    }
    Ok(certs)
}

/// Expands `${NAME}` in every string below `value`; `key` is the dotted path
/// used in error messages.
fn expand_value(
    value: &mut toml::Value,
    key: &str,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<(), ConfigError> {
    match value {
        toml::Value::String(s) if s.contains('$') => {
            *s = expand_str(s, key, env)?;
        }
        toml::Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                expand_value(item, &format!("{key}[{i}]"), env)?;
            }
        }
        toml::Value::Table(table) => {
            for (k, v) in table.iter_mut() {
                expand_value(v, &format!("{key}.{k}"), env)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// `${NAME}` becomes the variable's value; `$${` is a literal `${`; any
/// other `$` stays as it is (secrets often contain one).
pub fn expand_str(
    input: &str,
    key: &str,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<String, ConfigError> {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos..];
        if let Some(tail) = after.strip_prefix("$${") {
            out.push_str("${");
            rest = tail;
        } else if let Some(tail) = after.strip_prefix("${") {
            let end = tail.find('}').ok_or_else(|| ConfigError::BadExpansion {
                key: key.to_owned(),
            })?;
            let var = &tail[..end];
            let value = env(var).ok_or_else(|| ConfigError::MissingEnv {
                key: key.to_owned(),
                var: var.to_owned(),
            })?;
            out.push_str(&value);
            rest = &tail[end + 1..];
        } else {
            out.push('$');
            rest = &after[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
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

    fn env(var: &str) -> Option<String> {
        (var == "COUPA_CLIENT_SECRET").then(|| "s3cr3t-value".to_owned())
    }

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, Path::new("."), env)
    }

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let config = load(MINIMAL).unwrap();
        assert_eq!(config.oauth.client_secret.expose(), "s3cr3t-value");
        assert_eq!(
            config.oauth.token_url,
            "https://acme.coupahost.com/oauth2/token"
        );
        assert_eq!(config.oauth.refresh_fraction, 0.8333);
        assert_eq!(config.oauth.activation_delay, Duration::from_secs(5));
        assert_eq!(config.oauth.client_auth, ClientAuth::Body);
        assert_eq!(config.listen.shutdown_grace, Duration::from_secs(30));
        assert_eq!(config.coupa.scheme, Scheme::HTTPS);
        assert_eq!(config.coupa.authority.as_str(), "acme.coupahost.com");
        assert_eq!(config.coupa.path_prefix, "");
    }

    /// Each (change to MINIMAL) gives an error naming all the fragments.
    #[test]
    fn errors_name_the_key_and_the_cause() {
        let cases: [(&str, &str, &[&str]); 4] = [
            ("[admin]", "[admin]\nadress = \"x\"", &["admin", "adress"]),
            (
                "COUPA_CLIENT_SECRET",
                "NOPE_NOT_SET",
                &["oauth.client_secret", "NOPE_NOT_SET"],
            ),
            (
                "client_secret = \"${COUPA_CLIENT_SECRET}\"\n",
                "",
                &["oauth.client_secret", "missing"],
            ),
            (
                "https://acme.coupahost.com",
                "http://acme.coupahost.com",
                &["coupa.base_url", "loopback"],
            ),
        ];
        for (from, to, fragments) in cases {
            let err = load(&MINIMAL.replace(from, to)).unwrap_err().to_string();
            for fragment in fragments {
                assert!(err.contains(fragment), "{from:?} -> {to:?}: {err}");
            }
        }
    }

    #[test]
    fn plain_http_only_for_loopback() {
        for ok in [
            "http://127.0.0.1:1234",
            "http://localhost:9",
            "http://[::1]:80",
        ] {
            let text = MINIMAL.replace("https://acme.coupahost.com", ok);
            let config = load(&text).unwrap();
            assert_eq!(config.coupa.scheme, Scheme::HTTP, "{ok}");
        }
        let text = MINIMAL.replace(
            "scopes = [",
            "token_url = \"http://10.0.0.1/oauth2/token\"\nscopes = [",
        );
        let err = load(&text).unwrap_err().to_string();
        assert!(err.contains("oauth.token_url"), "{err}");
    }

    #[test]
    fn expansion_rules() {
        let e = |v: &str| (v == "A").then(|| "x".to_owned());
        assert_eq!(expand_str("a${A}b", "k", &e).unwrap(), "axb");
        assert_eq!(expand_str("p$ss$${A}", "k", &e).unwrap(), "p$ss${A}");
        assert!(matches!(
            expand_str("${A", "k", &e),
            Err(ConfigError::BadExpansion { .. })
        ));
    }

    #[test]
    fn comma_separated_scopes_are_rejected() {
        let text = MINIMAL.replace(
            r#"["core.common.read", "core.invoice.read"]"#,
            r#"["core.common.read,core.invoice.read"]"#,
        );
        let err = load(&text).unwrap_err().to_string();
        assert!(err.contains("oauth.scopes"), "{err}");
    }

    #[test]
    fn summary_redacts_secret() {
        let config = load(MINIMAL).unwrap();
        let summary = config.summary();
        assert!(!summary.contains("s3cr3t-value"));
        assert!(summary.contains("redacted"));
        assert!(!format!("{config:?}").contains("s3cr3t-value"));
    }

    #[test]
    fn shipped_example_config_is_valid() {
        let text = include_str!("../proxy.toml.example");
        load(text).unwrap();
    }
}
