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
}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
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
    /// One credential (`[oauth]` with `client_id`, named `default`) or
    /// several (`[oauth.NAME]` tables); told apart in `validate`.
    oauth: toml::Table,
    #[serde(default)]
    integration: Vec<IntegrationFile>,
    #[serde(default)]
    admin: AdminFile,
    #[serde(default)]
    reload: ReloadFile,
    #[serde(default)]
    runtime: RuntimeFile,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuntimeFile {
    #[serde(default)]
    flavor: RuntimeFlavor,
    worker_threads: Option<usize>,
}

/// How the async runtime runs the proxy (`[runtime] flavor`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuntimeFlavor {
    /// `current_thread` when the process may use one CPU (a pinned or
    /// CPU-limited container), `multi_thread` otherwise.
    #[default]
    Auto,
    /// One thread does everything: the least CPU per request.
    CurrentThread,
    /// A worker per core (or `worker_threads`): scales across cores.
    MultiThread,
}

/// The async runtime the binary builds for `run`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Runtime {
    pub flavor: RuntimeFlavor,
    pub worker_threads: Option<usize>,
}

impl Runtime {
    /// The flavor after `auto` is decided for `cores` usable CPUs, and the
    /// worker count for multi_thread.
    pub fn resolve(&self, cores: usize) -> (RuntimeFlavor, usize) {
        match self.flavor {
            RuntimeFlavor::Auto if cores <= 1 => (RuntimeFlavor::CurrentThread, 1),
            RuntimeFlavor::CurrentThread => (RuntimeFlavor::CurrentThread, 1),
            _ => (
                RuntimeFlavor::MultiThread,
                self.worker_threads.unwrap_or(cores).max(1),
            ),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReloadFile {
    #[serde(default = "default_watch_interval", with = "humantime_serde")]
    watch_interval: Duration,
}

impl Default for ReloadFile {
    fn default() -> Self {
        Self {
            watch_interval: default_watch_interval(),
        }
    }
}

fn default_watch_interval() -> Duration {
    Duration::from_secs(5)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct IntegrationFile {
    name: String,
    api_key_sha256: String,
    #[serde(default = "default_credential_name")]
    credential: String,
}

fn default_credential_name() -> String {
    DEFAULT_CREDENTIAL.to_owned()
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
    #[serde(default)]
    allow_unauthenticated: bool,
    tls: Option<ListenTlsFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListenTlsFile {
    cert_file: PathBuf,
    key_file: PathBuf,
    client_ca_file: Option<PathBuf>,
}

impl Default for ListenFile {
    fn default() -> Self {
        Self {
            address: default_listen_address(),
            shutdown_grace: default_shutdown_grace(),
            header_read_timeout: default_header_read_timeout(),
            max_header_bytes: default_max_header_bytes(),
            max_connections: default_max_connections(),
            allow_unauthenticated: false,
            tls: None,
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
    #[serde(default)]
    grant: GrantKind,
    state_file: Option<PathBuf>,
    redirect_uri: Option<String>,
    authorize_url: Option<String>,
    device_authorization_url: Option<String>,
    #[serde(default, with = "humantime_serde")]
    refresh_token_lifetime: Option<Duration>,
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

/// How a credential obtains its tokens (`grant` in an `[oauth]` table).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrantKind {
    /// System-to-system: the client's own id and secret, no user.
    #[default]
    ClientCredentials,
    /// A user consents once in a browser (PKCE); refresh tokens after that.
    AuthorizationCode,
    /// A user consents once on another device with a short code.
    DeviceCode,
}

impl GrantKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClientCredentials => "client_credentials",
            Self::AuthorizationCode => "authorization_code",
            Self::DeviceCode => "device_code",
        }
    }
}

/// Coupa's refresh tokens last 90 days.
pub const DEFAULT_REFRESH_TOKEN_LIFETIME: Duration = Duration::from_secs(90 * 86_400);
/// The authorization code grant's default redirect URI: a loopback
/// listener `authorize` starts for the length of the consent.
pub const DEFAULT_REDIRECT_URI: &str = "http://127.0.0.1:8765/callback";

// ---------------------------------------------------------------------------
// Validated model (what the proxy runs on)
// ---------------------------------------------------------------------------

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: Listen,
    pub coupa: Coupa,
    /// At least one; sorted by name.
    pub credentials: Vec<Credential>,
    /// Empty: every request uses the default credential, unauthenticated.
    pub integrations: Vec<Integration>,
    pub admin: Admin,
    /// How often the config file and secret files are checked for changes;
    /// `None`: only on SIGHUP.
    pub watch_interval: Option<Duration>,
    pub runtime: Runtime,
}

/// A named OAuth client with its own token and rotation.
#[derive(Debug, Clone)]
pub struct Credential {
    pub name: String,
    pub oauth: OAuth,
}

/// A legacy integration, recognised by its old API key.
#[derive(Clone)]
pub struct Integration {
    pub name: String,
    /// SHA-256 of the integration's `X-COUPA-API-KEY`.
    pub api_key_sha256: [u8; 32],
    /// Index into [`Config::credentials`].
    pub credential: usize,
}

impl fmt::Debug for Integration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The hash is not the key, but there is no reason to print it.
        f.debug_struct("Integration")
            .field("name", &self.name)
            .field("credential", &self.credential)
            .finish_non_exhaustive()
    }
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
    /// Serve a non-loopback address without integrations (explicit opt-in).
    pub allow_unauthenticated: bool,
    /// Inbound TLS; plain HTTP when absent.
    pub tls: Option<ListenTls>,
}

#[derive(Debug, Clone)]
pub struct ListenTls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// Client certificates must chain to these (mTLS) when set.
    pub client_ca_file: Option<PathBuf>,
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
    /// `None` for a public client (PKCE alone; user grants only).
    pub client_secret: Option<Secret>,
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
    pub grant: Grant,
}

/// The grant with what it needs.
#[derive(Debug, Clone, PartialEq)]
pub enum Grant {
    ClientCredentials,
    AuthorizationCode {
        authorize_url: String,
        /// Loopback `http://` URI; port 0 means any free port.
        redirect_uri: url::Url,
        consent: Consent,
    },
    DeviceCode {
        device_authorization_url: String,
        consent: Consent,
    },
}

impl Grant {
    pub fn kind(&self) -> GrantKind {
        match self {
            Self::ClientCredentials => GrantKind::ClientCredentials,
            Self::AuthorizationCode { .. } => GrantKind::AuthorizationCode,
            Self::DeviceCode { .. } => GrantKind::DeviceCode,
        }
    }

    /// Where a user-consented grant keeps its tokens; `None` for client
    /// credentials.
    pub fn consent(&self) -> Option<&Consent> {
        match self {
            Self::ClientCredentials => None,
            Self::AuthorizationCode { consent, .. } | Self::DeviceCode { consent, .. } => {
                Some(consent)
            }
        }
    }
}

/// Settings shared by the user-consented grants.
#[derive(Debug, Clone, PartialEq)]
pub struct Consent {
    /// Refresh and access token, written by `authorize` and by every refresh.
    pub state_file: PathBuf,
    /// How long a refresh token lasts from its issue (Coupa: 90 days).
    pub refresh_token_lifetime: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    Inline,
    File(PathBuf),
    /// A public client: no secret at all.
    None,
}

impl fmt::Display for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Inline => f.write_str("client_secret"),
            Self::File(path) => write!(f, "client_secret_file {}", path.display()),
            Self::None => f.write_str("none: public client"),
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
        self.summary_rows()
            .iter()
            .map(|(key, value)| format!("{key:<31}{value}\n"))
            .collect()
    }

    /// The summary as (key, value) rows; reload compares them to name what
    /// changed.
    pub fn summary_rows(&self) -> Vec<(String, String)> {
        let (l, c) = (&self.listen, &self.coupa);
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
        let mut rows: Vec<(String, String)> = vec![
            ("listen.address".into(), l.address.to_string()),
            ("listen.shutdown_grace".into(), d(l.shutdown_grace)),
            (
                "listen.header_read_timeout".into(),
                d(l.header_read_timeout),
            ),
            (
                "listen.max_header_bytes".into(),
                l.max_header_bytes.to_string(),
            ),
            (
                "listen.max_connections".into(),
                l.max_connections.to_string(),
            ),
            (
                "listen.allow_unauthenticated".into(),
                l.allow_unauthenticated.to_string(),
            ),
            (
                "listen.tls".into(),
                match &l.tls {
                    None => "off (plain HTTP)".into(),
                    Some(t) => format!(
                        "cert {}, key {}, client certificates {}",
                        t.cert_file.display(),
                        t.key_file.display(),
                        t.client_ca_file
                            .as_ref()
                            .map(|p| format!("required ({})", p.display()))
                            .unwrap_or_else(|| "not required".into())
                    ),
                },
            ),
            ("coupa.base_url".into(), c.base_url.clone()),
            ("coupa.ca_file".into(), ca),
            (
                "coupa.accept".into(),
                c.accept.to_str().unwrap_or("?").to_owned(),
            ),
            ("coupa.connect_timeout".into(), d(c.connect_timeout)),
            (
                "coupa.response_header_timeout".into(),
                d(c.response_header_timeout),
            ),
            ("coupa.idle_timeout".into(), d(c.idle_timeout)),
            ("coupa.pool_idle_timeout".into(), d(c.pool_idle_timeout)),
            (
                "coupa.replay_body_limit".into(),
                format!("{} bytes", c.replay_body_limit),
            ),
            ("coupa.rate_limit".into(), rate),
        ];
        let single = self.credentials.len() == 1 && self.credentials[0].name == DEFAULT_CREDENTIAL;
        for credential in &self.credentials {
            let o = &credential.oauth;
            let prefix = if single {
                "oauth".to_owned()
            } else {
                format!("oauth.{}", credential.name)
            };
            let renew_after =
                Duration::from_secs((86_400.0_f64 * o.refresh_fraction).round() as u64);
            rows.extend([
                (format!("{prefix}.client_id"), o.client_id.clone()),
                (
                    format!("{prefix}.client_secret"),
                    match o.secret_source {
                        SecretSource::None => "(none: public client, PKCE only)".to_owned(),
                        ref source => format!("<redacted> (from {source})"),
                    },
                ),
                (
                    format!("{prefix}.grant"),
                    o.grant.kind().as_str().to_owned(),
                ),
                (format!("{prefix}.scopes"), o.scopes.join(" ")),
                (format!("{prefix}.token_url"), o.token_url.clone()),
                (
                    format!("{prefix}.client_auth"),
                    match o.client_auth {
                        ClientAuth::Body => "body",
                        ClientAuth::Basic => "basic",
                    }
                    .to_owned(),
                ),
                (
                    format!("{prefix}.refresh_fraction"),
                    format!(
                        "{} (renew after {} of a 24 h token)",
                        o.refresh_fraction,
                        d(renew_after)
                    ),
                ),
                (format!("{prefix}.activation_delay"), d(o.activation_delay)),
                (
                    format!("{prefix}.retry"),
                    format!("{} .. {}", d(o.retry_initial), d(o.retry_max)),
                ),
                (
                    format!("{prefix}.rejected_token_cooldown"),
                    d(o.rejected_token_cooldown),
                ),
            ]);
            match &o.grant {
                Grant::ClientCredentials => {}
                Grant::AuthorizationCode {
                    authorize_url,
                    redirect_uri,
                    ..
                } => rows.extend([
                    (format!("{prefix}.authorize_url"), authorize_url.clone()),
                    (format!("{prefix}.redirect_uri"), redirect_uri.to_string()),
                ]),
                Grant::DeviceCode {
                    device_authorization_url,
                    ..
                } => rows.push((
                    format!("{prefix}.device_authorization_url"),
                    device_authorization_url.clone(),
                )),
            }
            if let Some(consent) = o.grant.consent() {
                rows.extend([
                    (
                        format!("{prefix}.state_file"),
                        consent.state_file.display().to_string(),
                    ),
                    (
                        format!("{prefix}.refresh_token_lifetime"),
                        d(consent.refresh_token_lifetime),
                    ),
                ]);
            }
        }
        if self.integrations.is_empty() {
            rows.push((
                "integration".into(),
                "none: every client gets the default credential's token".into(),
            ));
        }
        for integration in &self.integrations {
            rows.push((
                format!("integration {:?}", integration.name),
                format!(
                    "credential {} (key hash <redacted>)",
                    self.credentials[integration.credential].name
                ),
            ));
        }
        rows.push(("admin.address".into(), self.admin.address.to_string()));
        rows.push((
            "reload.watch_interval".into(),
            self.watch_interval
                .map(d)
                .unwrap_or_else(|| "off (SIGHUP only)".into()),
        ));
        let runtime = &self.runtime;
        rows.push((
            "runtime.flavor".into(),
            match (runtime.flavor, runtime.worker_threads) {
                (RuntimeFlavor::Auto, _) => {
                    "auto (current_thread on one usable CPU, else multi_thread)".into()
                }
                (RuntimeFlavor::CurrentThread, _) => "current_thread".into(),
                (RuntimeFlavor::MultiThread, Some(n)) => format!("multi_thread, {n} workers"),
                (RuntimeFlavor::MultiThread, None) => "multi_thread, a worker per CPU".into(),
            },
        ));
        rows
    }

    /// The credential used when no integrations are configured.
    pub fn default_credential(&self) -> usize {
        self.credentials
            .iter()
            .position(|c| c.name == DEFAULT_CREDENTIAL)
            .unwrap_or(0)
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
            integration,
            admin,
            reload,
            runtime,
        } = self;
        let ReloadFile { watch_interval } = reload;
        let RuntimeFile {
            flavor,
            worker_threads,
        } = runtime;
        if worker_threads == Some(0) {
            return Err(invalid("runtime.worker_threads", "must be at least 1"));
        }
        if worker_threads.is_some() && flavor != RuntimeFlavor::MultiThread {
            return Err(invalid(
                "runtime.worker_threads",
                "only applies to flavor = \"multi_thread\"",
            ));
        }
        let ListenFile {
            address: listen_address,
            shutdown_grace,
            header_read_timeout,
            max_header_bytes,
            max_connections,
            allow_unauthenticated,
            tls,
        } = listen;
        let tls = tls.map(|t| {
            let ListenTlsFile {
                cert_file,
                key_file,
                client_ca_file,
            } = t;
            ListenTls {
                cert_file: base_dir.join(cert_file),
                key_file: base_dir.join(key_file),
                client_ca_file: client_ca_file.map(|p| base_dir.join(p)),
            }
        });
        if let Some(t) = &tls {
            crate::tls::load_certified_key(&t.cert_file, &t.key_file)
                .map_err(|e| invalid("listen.tls", e.to_string()))?;
        }
        // Client certificates authenticate clients as well as legacy keys do.
        let mutual_tls = tls.as_ref().is_some_and(|t| t.client_ca_file.is_some());
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

        let credentials = validate_credentials(oauth, base_dir, &base_url)?;
        let integrations = validate_integrations(integration, &credentials)?;
        if integrations.is_empty() {
            if !credentials.iter().any(|c| c.name == DEFAULT_CREDENTIAL) && credentials.len() > 1 {
                return Err(invalid(
                    "integration",
                    "several credentials but no [[integration]] to choose between them: add integrations, or name one credential \"default\"",
                ));
            }
            if !listen_address.ip().is_loopback() && !allow_unauthenticated && !mutual_tls {
                return Err(invalid(
                    "listen.address",
                    format!(
                        "{listen_address} is reachable from other machines, and with no [[integration]] anyone who can connect gets a Coupa token; \
                         add [[integration]] tables (coupa-auth-proxy hash-key), bind 127.0.0.1, or set listen.allow_unauthenticated = true"
                    ),
                ));
            }
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
                allow_unauthenticated,
                tls,
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
            credentials,
            integrations,
            admin: Admin {
                address: admin_address,
            },
            watch_interval: (!watch_interval.is_zero()).then_some(watch_interval),
            runtime: Runtime {
                flavor,
                worker_threads,
            },
        })
    }
}

/// `[oauth]` as one credential named `default`, or `[oauth.NAME]` tables.
fn validate_credentials(
    oauth: toml::Table,
    base_dir: &Path,
    base_url: &str,
) -> Result<Vec<Credential>, ConfigError> {
    let single = oauth.is_empty() || oauth.values().any(|v| !v.is_table());
    let named: Vec<(String, toml::Value)> = if single {
        vec![(DEFAULT_CREDENTIAL.to_owned(), toml::Value::Table(oauth))]
    } else {
        oauth.into_iter().collect()
    };
    let mut credentials = Vec::with_capacity(named.len());
    for (name, table) in named {
        let prefix = if single {
            "oauth".to_owned()
        } else {
            format!("oauth.{name}")
        };
        if !single && !is_identifier(&name) {
            return Err(invalid(
                prefix,
                "credential names use letters, digits, '-' and '_'",
            ));
        }
        let file: OAuthFile = serde_path_to_error::deserialize(table).map_err(|e| {
            let path = e.path().to_string();
            ConfigError::Shape {
                key: if path == "." {
                    prefix.clone()
                } else {
                    format!("{prefix}.{path}")
                },
                message: e.into_inner().message().to_owned(),
            }
        })?;
        let oauth = validate_oauth(&prefix, file, base_dir, base_url)?;
        credentials.push(Credential { name, oauth });
    }
    credentials.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(credentials)
}

fn is_identifier(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

fn validate_oauth(
    prefix: &str,
    oauth: OAuthFile,
    base_dir: &Path,
    base_url: &str,
) -> Result<OAuth, ConfigError> {
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
        grant,
        state_file,
        redirect_uri,
        authorize_url,
        device_authorization_url,
        refresh_token_lifetime,
    } = oauth;
    let token_url = match token_url {
        Some(url) => parse_endpoint(&format!("{prefix}.token_url"), &url)?.to_string(),
        None => format!("{base_url}/oauth2/token"),
    };
    if client_id.trim().is_empty() {
        return Err(invalid(format!("{prefix}.client_id"), "must not be empty"));
    }
    let (client_secret, secret_source) = match (client_secret, client_secret_file) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                format!("{prefix}.client_secret"),
                "set either client_secret or client_secret_file, not both",
            ))
        }
        (None, None) if grant != GrantKind::ClientCredentials => (None, SecretSource::None),
        (None, None) => return Err(invalid(
            format!("{prefix}.client_secret"),
            "missing: set client_secret (e.g. \"${COUPA_CLIENT_SECRET}\") or client_secret_file",
        )),
        (Some(secret), None) => (Some(Secret::new(secret)), SecretSource::Inline),
        (None, Some(path)) => {
            let path = base_dir.join(path);
            let text = std::fs::read_to_string(&path).map_err(|e| {
                invalid(
                    format!("{prefix}.client_secret_file"),
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            // Secret files are usually written with a trailing newline.
            let secret = Secret::new(text.trim_end_matches(['\r', '\n']));
            (Some(secret), SecretSource::File(path))
        }
    };
    if client_secret
        .as_ref()
        .is_some_and(|s| s.expose().trim().is_empty())
    {
        return Err(invalid(format!("{prefix}.client_secret"), "is empty"));
    }

    if scopes.is_empty() {
        return Err(invalid(
            format!("{prefix}.scopes"),
            "list at least one scope, e.g. [\"core.common.read\"]",
        ));
    }
    for scope in &scopes {
        if scope.is_empty() || scope.contains([' ', ',', '\t']) {
            return Err(invalid(
                    format!("{prefix}.scopes"),
                    format!("{scope:?} is not one scope: give each scope as its own list item (service.object.right)"),
                ));
        }
    }

    if !(refresh_fraction > 0.0 && refresh_fraction < 1.0) {
        return Err(invalid(
            format!("{prefix}.refresh_fraction"),
            format!("must be between 0 and 1 (exclusive), got {refresh_fraction}"),
        ));
    }
    if retry_initial.is_zero() || retry_max < retry_initial {
        return Err(invalid(
            format!("{prefix}.retry_max"),
            "retry_initial must be positive and retry_max at least retry_initial",
        ));
    }
    if request_timeout.is_zero() {
        return Err(invalid(
            format!("{prefix}.request_timeout"),
            "must be positive",
        ));
    }
    let grant = validate_grant(
        prefix,
        GrantFile {
            kind: grant,
            state_file,
            redirect_uri,
            authorize_url,
            device_authorization_url,
            refresh_token_lifetime,
        },
        &scopes,
        base_dir,
        base_url,
    )?;
    Ok(OAuth {
        grant,
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
    })
}

/// The grant-specific keys of an `[oauth]` table.
struct GrantFile {
    kind: GrantKind,
    state_file: Option<PathBuf>,
    redirect_uri: Option<String>,
    authorize_url: Option<String>,
    device_authorization_url: Option<String>,
    refresh_token_lifetime: Option<Duration>,
}

fn validate_grant(
    prefix: &str,
    file: GrantFile,
    scopes: &[String],
    base_dir: &Path,
    base_url: &str,
) -> Result<Grant, ConfigError> {
    let key = |name: &str| format!("{prefix}.{name}");
    let only_for = |name: &str, grants: &str| {
        invalid(
            key(name),
            format!(
                "only applies to grant = {grants} (this credential's grant is {})",
                file.kind.as_str()
            ),
        )
    };
    let user_grants = "\"authorization_code\" or \"device_code\"";
    if file.kind == GrantKind::ClientCredentials {
        if file.state_file.is_some() {
            return Err(only_for("state_file", user_grants));
        }
        if file.refresh_token_lifetime.is_some() {
            return Err(only_for("refresh_token_lifetime", user_grants));
        }
    }
    if file.kind != GrantKind::AuthorizationCode {
        if file.redirect_uri.is_some() {
            return Err(only_for("redirect_uri", "\"authorization_code\""));
        }
        if file.authorize_url.is_some() {
            return Err(only_for("authorize_url", "\"authorization_code\""));
        }
    }
    if file.kind != GrantKind::DeviceCode && file.device_authorization_url.is_some() {
        return Err(only_for("device_authorization_url", "\"device_code\""));
    }
    if file.kind == GrantKind::ClientCredentials {
        return Ok(Grant::ClientCredentials);
    }
    if !scopes.iter().any(|s| s == "offline_access") {
        return Err(invalid(
            key("scopes"),
            "add \"offline_access\": without it Coupa issues no refresh token, and the proxy would \
             need a new consent every day",
        ));
    }
    let state_file = file.state_file.ok_or_else(|| {
        invalid(
            key("state_file"),
            "missing: user-consented grants keep their tokens in a file, e.g. \
             state_file = \"/var/lib/coupa-auth-proxy/NAME.json\"",
        )
    })?;
    let refresh_token_lifetime = file
        .refresh_token_lifetime
        .unwrap_or(DEFAULT_REFRESH_TOKEN_LIFETIME);
    if refresh_token_lifetime.is_zero() {
        return Err(invalid(key("refresh_token_lifetime"), "must be positive"));
    }
    let consent = Consent {
        state_file: base_dir.join(state_file),
        refresh_token_lifetime,
    };
    let endpoint = |name: &str, given: Option<String>, default_path: &str| match given {
        Some(url) => parse_endpoint(&key(name), &url).map(|u| u.to_string()),
        None => Ok(format!("{base_url}{default_path}")),
    };
    Ok(match file.kind {
        GrantKind::AuthorizationCode => {
            let text = file
                .redirect_uri
                .unwrap_or_else(|| DEFAULT_REDIRECT_URI.to_owned());
            let redirect_uri = url::Url::parse(&text)
                .map_err(|e| invalid(key("redirect_uri"), format!("{text:?} is not a URL: {e}")))?;
            let loopback = redirect_uri.host().is_some_and(|h| is_loopback(&h));
            if redirect_uri.scheme() != "http" || !loopback || redirect_uri.port().is_none() {
                return Err(invalid(
                    key("redirect_uri"),
                    format!(
                        "{text:?} must be http://127.0.0.1:PORT/PATH (or localhost): `authorize` \
                         listens there for Coupa's redirect; register the same URI on the client in Coupa"
                    ),
                ));
            }
            Grant::AuthorizationCode {
                authorize_url: endpoint(
                    "authorize_url",
                    file.authorize_url,
                    "/oauth2/authorizations/new",
                )?,
                redirect_uri,
                consent,
            }
        }
        GrantKind::DeviceCode => Grant::DeviceCode {
            device_authorization_url: endpoint(
                "device_authorization_url",
                file.device_authorization_url,
                "/oauth2/device_authorizations",
            )?,
            consent,
        },
        GrantKind::ClientCredentials => Grant::ClientCredentials,
    })
}

fn validate_integrations(
    files: Vec<IntegrationFile>,
    credentials: &[Credential],
) -> Result<Vec<Integration>, ConfigError> {
    let mut integrations: Vec<Integration> = Vec::with_capacity(files.len());
    for (i, file) in files.into_iter().enumerate() {
        let IntegrationFile {
            name,
            api_key_sha256,
            credential,
        } = file;
        let key = format!("integration[{i}]");
        if name.trim().is_empty() {
            return Err(invalid(format!("{key}.name"), "must not be empty"));
        }
        let hash = parse_sha256(&api_key_sha256).ok_or_else(|| {
            invalid(
                format!("{key}.api_key_sha256"),
                "must be 64 hex digits: the SHA-256 of the legacy key (coupa-auth-proxy hash-key prints it)",
            )
        })?;
        let credential_index = credentials
            .iter()
            .position(|c| c.name == credential)
            .ok_or_else(|| {
                let known: Vec<&str> = credentials.iter().map(|c| c.name.as_str()).collect();
                invalid(
                    format!("{key}.credential"),
                    format!(
                        "no credential named {credential:?} (known: {})",
                        known.join(", ")
                    ),
                )
            })?;
        if let Some(other) = integrations.iter().find(|o| o.name == name) {
            return Err(invalid(
                format!("{key}.name"),
                format!("{:?} is used twice", other.name),
            ));
        }
        if let Some(other) = integrations.iter().find(|o| o.api_key_sha256 == hash) {
            return Err(invalid(
                format!("{key}.api_key_sha256"),
                format!(
                    "same key as integration {:?}: each integration needs its own key",
                    other.name
                ),
            ));
        }
        integrations.push(Integration {
            name,
            api_key_sha256: hash,
            credential: credential_index,
        });
    }
    Ok(integrations)
}

fn parse_sha256(text: &str) -> Option<[u8; 32]> {
    let text = text.trim();
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Parses an upstream URL and applies the transport policy: HTTPS always,
/// plain HTTP only to this machine (tests, a local TLS-terminating sidecar).
fn parse_endpoint(key: &str, text: &str) -> Result<reqwest::Url, ConfigError> {
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

    /// MINIMAL turned into a user-consented credential: no secret,
    /// `offline_access`, a state file, plus `extra` oauth keys.
    fn user_grant(grant: &str, extra: &str) -> String {
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

    fn error_of(text: &str) -> String {
        load(text).unwrap_err().to_string()
    }

    #[test]
    fn user_grants_get_coupa_endpoints_and_may_be_public_clients() {
        let config = load(&user_grant("authorization_code", "")).unwrap();
        let oauth = &config.credentials[0].oauth;
        assert!(oauth.client_secret.is_none());
        match &oauth.grant {
            Grant::AuthorizationCode {
                authorize_url,
                redirect_uri,
                consent,
            } => {
                assert_eq!(
                    authorize_url,
                    "https://acme.coupahost.com/oauth2/authorizations/new"
                );
                assert_eq!(redirect_uri.as_str(), DEFAULT_REDIRECT_URI);
                assert_eq!(consent.state_file, Path::new("./state/invoices.json"));
                assert_eq!(
                    consent.refresh_token_lifetime,
                    DEFAULT_REFRESH_TOKEN_LIFETIME
                );
            }
            other => panic!("{other:?}"),
        }
        let config = load(&user_grant(
            "device_code",
            "refresh_token_lifetime = \"30d\"",
        ))
        .unwrap();
        match &config.credentials[0].oauth.grant {
            Grant::DeviceCode {
                device_authorization_url,
                consent,
            } => {
                assert_eq!(
                    device_authorization_url,
                    "https://acme.coupahost.com/oauth2/device_authorizations"
                );
                assert_eq!(
                    consent.refresh_token_lifetime,
                    Duration::from_secs(30 * 86_400)
                );
            }
            other => panic!("{other:?}"),
        }
        let summary = config.summary();
        assert!(
            summary.contains("device_code") && summary.contains("public client"),
            "{summary}"
        );
    }

    #[test]
    fn user_grant_mistakes_name_the_key() {
        let without_offline = user_grant("device_code", "").replace(", \"offline_access\"", "");
        assert!(error_of(&without_offline).starts_with("oauth.scopes: add \"offline_access\""));
        let without_state =
            user_grant("device_code", "").replace("state_file = \"state/invoices.json\"\n", "");
        assert!(error_of(&without_state).starts_with("oauth.state_file: missing"));
        let remote_redirect = user_grant(
            "authorization_code",
            "redirect_uri = \"https://example.com/callback\"",
        );
        assert!(error_of(&remote_redirect).starts_with("oauth.redirect_uri:"));
        let portless = user_grant(
            "authorization_code",
            "redirect_uri = \"http://127.0.0.1/cb\"",
        );
        assert!(error_of(&portless).starts_with("oauth.redirect_uri:"));
        let misplaced = user_grant("device_code", "redirect_uri = \"http://127.0.0.1:8765/cb\"");
        assert!(
            error_of(&misplaced)
                .starts_with("oauth.redirect_uri: only applies to grant = \"authorization_code\""),
            "{}",
            error_of(&misplaced)
        );
        let state_on_cc = MINIMAL.replace("scopes = [", "state_file = \"x.json\"\nscopes = [");
        assert!(error_of(&state_on_cc).starts_with("oauth.state_file: only applies"));
        let secretless_cc = MINIMAL.replace("client_secret = \"${COUPA_CLIENT_SECRET}\"\n", "");
        assert!(error_of(&secretless_cc).starts_with("oauth.client_secret: missing"));
        let unknown = user_grant("password", "");
        assert!(
            error_of(&unknown).starts_with("oauth.grant:"),
            "{}",
            error_of(&unknown)
        );
    }

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let config = load(MINIMAL).unwrap();
        assert_eq!(
            config.credentials[0]
                .oauth
                .client_secret
                .as_ref()
                .unwrap()
                .expose(),
            "s3cr3t-value"
        );
        assert_eq!(
            config.credentials[0].oauth.token_url,
            "https://acme.coupahost.com/oauth2/token"
        );
        assert_eq!(config.credentials[0].oauth.refresh_fraction, 0.8333);
        assert_eq!(
            config.credentials[0].oauth.activation_delay,
            Duration::from_secs(5)
        );
        assert_eq!(config.credentials[0].oauth.client_auth, ClientAuth::Body);
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
    fn runtime_flavor_follows_the_usable_cpus_unless_set() {
        let config = load(MINIMAL).unwrap();
        assert_eq!(config.runtime.flavor, RuntimeFlavor::Auto);
        assert_eq!(config.runtime.resolve(1), (RuntimeFlavor::CurrentThread, 1));
        assert_eq!(config.runtime.resolve(4), (RuntimeFlavor::MultiThread, 4));

        let pinned = load(&format!(
            "{MINIMAL}\n[runtime]\nflavor = \"current_thread\"\n"
        ))
        .unwrap();
        assert_eq!(pinned.runtime.resolve(8), (RuntimeFlavor::CurrentThread, 1));
        let sized = load(&format!(
            "{MINIMAL}\n[runtime]\nflavor = \"multi_thread\"\nworker_threads = 2\n"
        ))
        .unwrap();
        assert_eq!(sized.runtime.resolve(1), (RuntimeFlavor::MultiThread, 2));
        assert!(sized.summary().contains("multi_thread, 2 workers"));

        let zero = format!("{MINIMAL}\n[runtime]\nflavor = \"multi_thread\"\nworker_threads = 0\n");
        assert!(error_of(&zero).starts_with("runtime.worker_threads: must be at least 1"));
        let misplaced = format!("{MINIMAL}\n[runtime]\nworker_threads = 2\n");
        assert!(error_of(&misplaced).starts_with("runtime.worker_threads: only applies"));
        let unknown = format!("{MINIMAL}\n[runtime]\nflavor = \"green_threads\"\n");
        assert!(
            error_of(&unknown).contains("runtime.flavor"),
            "{}",
            error_of(&unknown)
        );
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

    /// The commented `[oauth.NAME]` grant examples in proxy.toml.example
    /// are valid as written, once uncommented.
    #[test]
    fn commented_grant_examples_are_valid() {
        let text = include_str!("../proxy.toml.example");
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
        let text = include_str!("../examples/two-integrations.toml");
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

    #[test]
    fn named_credentials_and_integrations_are_checked() {
        let named = MINIMAL.replace("[oauth]", "[oauth.main]");
        let cases: [(String, &[&str]); 4] = [
            (
                format!("{named}\n[[integration]]\nname = \"a\"\napi_key_sha256 = \"abc\"\ncredential = \"main\"\n"),
                &["integration[0].api_key_sha256", "64 hex"],
            ),
            (
                format!("{named}\n[[integration]]\nname = \"a\"\napi_key_sha256 = \"{}\"\ncredential = \"other\"\n", "0".repeat(64)),
                &["integration[0].credential", "main"],
            ),
            (
                format!("{named}\n[[integration]]\nname = \"a\"\napi_key_sha256 = \"{h}\"\ncredential = \"main\"\n[[integration]]\nname = \"b\"\napi_key_sha256 = \"{h}\"\ncredential = \"main\"\n", h = "1".repeat(64)),
                &["integration[1].api_key_sha256", "same key"],
            ),
            (
                named.replace("client_id", "client_idd"),
                &["oauth.main", "client_idd"],
            ),
        ];
        for (text, fragments) in cases {
            let err = load(&text).unwrap_err().to_string();
            for fragment in fragments {
                assert!(err.contains(fragment), "{err}");
            }
        }
        // A single named credential without integrations serves everyone.
        let config = load(&named).unwrap();
        assert_eq!(config.credentials[config.default_credential()].name, "main");
    }
}
