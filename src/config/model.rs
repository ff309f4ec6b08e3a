//! The validated runtime model: what the proxy runs on, every value known
//! good. Built only by [`super::validate`].
//!
//! Size: the types only, one per table with its field docs (the reference
//! a reader wants in one place); no logic beyond small accessors.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::HeaderValue;
use rustls::pki_types::CertificateDer;
use serde::Deserialize;

use super::DEFAULT_CREDENTIAL;
use crate::secret::Secret;

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
    /// Shared state in Redis; `None`: every process on its own.
    pub cluster: Option<Cluster>,
    pub insight: Insight,
    pub telemetry: Telemetry,
}

/// `[cluster]`, validated.
#[derive(Clone)]
pub struct Cluster {
    /// `redis://`, `rediss://`, `redis+sentinel://` or `rediss+sentinel://`,
    /// with any password taken out (it is in `password`).
    pub redis_url: String,
    /// The data nodes' password.
    pub password: Option<Secret>,
    /// With a `redis+sentinel://` URL: where to ask for the primary.
    pub sentinel: Option<Sentinel>,
    pub key_prefix: String,
    /// The 32-byte key that seals tokens stored in Redis.
    pub encryption_key: Secret,
    pub encryption_key_file: PathBuf,
    /// Share of the rate budget used alone while Redis is unreachable.
    pub fallback_share: f64,
}

impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cluster")
            .field("redis_url", &self.redis_url)
            .field("key_prefix", &self.key_prefix)
            .field("encryption_key_file", &self.encryption_key_file)
            .field("fallback_share", &self.fallback_share)
            .finish_non_exhaustive()
    }
}

/// `redis+sentinel://[USER:PASSWORD@]HOST:PORT[,HOST:PORT…]/MASTER_NAME[/DB]`,
/// parsed: the primary is whichever node the sentinels name.
#[derive(Clone, PartialEq, Eq)]
pub struct Sentinel {
    /// The sentinels' addresses, in the order given.
    pub nodes: Vec<(String, u16)>,
    /// The monitored master's name.
    pub master: String,
    pub db: i64,
    /// `rediss+sentinel://`: TLS to the sentinels and the data nodes.
    pub tls: bool,
    /// ACL user on the data nodes (the URL's user).
    pub username: Option<String>,
    /// The sentinels' own login (`cluster.sentinel_username`,
    /// `cluster.sentinel_password_file`).
    pub sentinel_username: Option<String>,
    pub sentinel_password: Option<Secret>,
}

impl fmt::Debug for Sentinel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sentinel")
            .field("nodes", &self.nodes)
            .field("master", &self.master)
            .field("db", &self.db)
            .field("tls", &self.tls)
            .field("username", &self.username)
            .field("sentinel_username", &self.sentinel_username)
            .finish_non_exhaustive()
    }
}

/// A named OAuth client with its own token and rotation.
#[derive(Debug, Clone)]
pub struct Credential {
    pub name: String,
    pub oauth: OAuth,
}

/// An integration: a legacy tool recognised by its old API key, or a tool
/// that fetches its own token from the proxy as a local OAuth client (or
/// both, during a migration). At least one of the two is set.
#[derive(Clone)]
pub struct Integration {
    pub name: String,
    /// SHA-256 of the integration's `X-COUPA-API-KEY`.
    pub api_key_sha256: Option<[u8; 32]>,
    /// The tool's client of the proxy's own `/oauth2/token`.
    pub local_client: Option<LocalClient>,
    /// Index into [`Config::credentials`].
    pub credential: usize,
    /// Requests of this integration at Coupa at once (`max_concurrent`,
    /// default: half of `coupa.max_connections`, all of them for a lone
    /// integration); past it its requests wait, not everyone's.
    pub max_concurrent: usize,
    /// `Accept` sent for its requests that state no preference; `None`:
    /// `coupa.accept`.
    pub accept: Option<HeaderValue>,
    /// Its place in the rate limit's queues.
    pub rate: RatePolicy,
}

/// How one integration waits for Coupa's budget (`[[integration]]`
/// `weight`, `max_queue`, `max_per_second`; defaults without them).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RatePolicy {
    /// Slots dealt to it per turn while others wait too.
    pub weight: u32,
    /// Its own queue bound; `None`: `coupa.rate_limit.max_queue`.
    pub max_queue: Option<usize>,
    /// Its ceiling, whatever the budget has free.
    pub max_per_second: Option<f64>,
}

impl Default for RatePolicy {
    fn default() -> Self {
        Self {
            weight: 1,
            max_queue: None,
            max_per_second: None,
        }
    }
}

/// A local OAuth client: known to the proxy only, never to Coupa.
#[derive(Clone)]
pub struct LocalClient {
    pub client_id: String,
    /// SHA-256 of the secret shared between the tool and the proxy.
    pub secret_sha256: [u8; 32],
}

/// `[telemetry]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Telemetry {
    /// Where spans are posted (`<otlp_endpoint>/v1/traces`); `None`: no
    /// traces are made.
    pub otlp_traces_url: Option<url::Url>,
    /// Access lines of requests the proxy refused, per second at most (a
    /// burst of as many); past it they are left out and counted. `None`:
    /// every line is written.
    pub refused_lines_per_second: Option<std::num::NonZeroU32>,
}

/// `[insight]`, validated.
#[derive(Debug, Clone)]
pub struct Insight {
    /// An integration not seen for this long is a candidate to retire.
    pub idle_warning: Duration,
}

impl fmt::Debug for Integration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The hash is not the key, but there is no reason to print it.
        f.debug_struct("Integration")
            .field("name", &self.name)
            .field(
                "oauth_client_id",
                &self.local_client.as_ref().map(|c| &c.client_id),
            )
            .field("credential", &self.credential)
            .field("max_concurrent", &self.max_concurrent)
            .field("accept", &self.accept)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone)]
pub struct Listen {
    pub address: SocketAddr,
    /// How long in-flight requests may run on after a shutdown signal.
    pub shutdown_grace: Duration,
    /// After a shutdown signal, how long the listener keeps accepting
    /// (while `/readyz` says draining) before the drain proper: load
    /// balancers still route to the process for a moment.
    pub drain_delay: Duration,
    /// A client must send a whole request head within this from its first
    /// byte (slowloris), and its first byte within this of connecting.
    pub header_read_timeout: Duration,
    /// An idle keep-alive connection is closed after this; advertised in
    /// every HTTP/1.1 answer as `Keep-Alive: timeout=N`.
    pub keepalive_timeout: Duration,
    /// Largest request head accepted; beyond it the client gets 431.
    pub max_header_bytes: usize,
    /// Open client connections beyond this get a 503 and are closed.
    pub max_connections: usize,
    /// With more client connections open than this, a plain (not TLS)
    /// HTTP/1.1 connection that goes idle gives hyper's buffers back until
    /// its next request (`server::park`); 0: always.
    pub release_idle_buffers_above: usize,
    /// A request body that sends no bytes for this long is abandoned: the
    /// client gets 408 and the upstream request is aborted.
    pub body_read_timeout: Duration,
    /// After `min_rate_grace`, a request body must average at least this
    /// many bytes a second (0: no minimum), else 408.
    pub min_body_rate: u64,
    pub min_rate_grace: Duration,
    /// A request body must be complete within this, else 408.
    pub max_body_time: Duration,
    /// After `min_rate_grace` of waiting on a client, it must take an
    /// answer at this many bytes a second on average (0: no minimum),
    /// else its connection is closed.
    pub min_response_rate: u64,
    /// Serve a non-loopback address without integrations (explicit opt-in).
    pub allow_unauthenticated: bool,
    /// Inbound TLS; plain HTTP when absent.
    pub tls: Option<ListenTls>,
    /// Forward-proxy mode for the instance (`CONNECT`); off when absent.
    pub intercept: Option<ListenIntercept>,
}

/// `[listen.intercept]`: the local CA the integration hosts trust.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenIntercept {
    pub ca_cert_file: PathBuf,
    /// Mode 0600; its contents are never held in the config.
    pub ca_key_file: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
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
    /// One connection kept open, so a call after start-up or an idle
    /// period does not pay the handshakes.
    pub keep_warm: bool,
    /// Coupa must start answering (status and headers) within this.
    pub response_header_timeout: Duration,
    /// A response body that stalls this long is aborted.
    pub idle_timeout: Duration,
    /// Request bodies up to this size are kept while they stream, so the
    /// request can be replayed after a 401 or a stale connection.
    pub replay_body_limit: usize,
    /// Of an answer the client has not taken yet, this much is held in
    /// memory (Coupa's connection is freed meanwhile).
    pub response_buffer: usize,
    /// Beyond `response_buffer`, this much more goes to an unlinked temp
    /// file in `spool_dir`; past it Coupa's answer waits for the client.
    pub response_spool_limit: u64,
    pub spool_dir: PathBuf,
    /// Which HTTP version requests to Coupa use.
    pub http_version: HttpVersion,
    /// HTTP/1.1 connections to the instance at most (idle and busy); past
    /// it requests wait for a free one.
    pub max_connections: usize,
    /// How long a request may wait for a free connection (or for its
    /// integration's `max_concurrent`) before it gets 503.
    pub connection_wait_timeout: Duration,
    /// How long a request may wait for a token when its credential holds
    /// none (start-up, or expired without renewal) before it gets 503;
    /// zero answers 503 at once.
    pub token_wait_timeout: Duration,
    /// How long in all a request Coupa answered 429 may wait to be sent
    /// again (its body kept for replay); zero passes the 429 on at once.
    pub resend_429_within: Duration,
    /// Outbound shaping to Coupa's rate limit; off when absent.
    pub rate_limit: Option<RateLimit>,
    /// The egress proxy both hops to Coupa are tunnelled through; none:
    /// direct (the environment's proxy variables are ignored either way).
    pub egress_proxy: Option<EgressProxy>,
}

/// `[coupa.egress_proxy]`, validated.
#[derive(Clone, PartialEq, Eq)]
pub struct EgressProxy {
    /// `http://host:port`, as configured (no credentials in it).
    pub url: String,
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    /// Read from `password_file`; never shown.
    pub password: Option<crate::secret::Secret>,
    pub password_file: Option<PathBuf>,
}

impl fmt::Debug for EgressProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EgressProxy")
            .field("url", &self.url)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// The HTTP version of the hop to Coupa (`coupa.http_version`).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum HttpVersion {
    /// HTTP/1.1 only (ALPN offers only `http/1.1`): what nginx, HAProxy and
    /// Envoy default to, and what Coupa's own clients use.
    #[default]
    Http1,
    /// HTTP/2 only: ALPN `h2` over TLS, prior knowledge (h2c) over plain
    /// loopback HTTP. Every request shares one connection while the server's
    /// stream limit allows.
    Http2,
    /// Whatever ALPN picks (HTTP/1.1 over plain HTTP).
    Auto,
}

impl HttpVersion {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http1 => "http1",
            Self::Http2 => "http2",
            Self::Auto => "auto",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: u32,
    pub max_queue: usize,
}

#[derive(Debug, Clone)]
pub struct OAuth {
    /// `coupa.egress_proxy`, copied: the token hop takes the same way as
    /// the API hop.
    pub egress_proxy: Option<EgressProxy>,
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

#[derive(Clone)]
pub struct Admin {
    pub address: SocketAddr,
    /// SHA-256 of the status page's password (HTTP Basic, any user name),
    /// asked for when the admin listener is not on loopback.
    pub status_password_sha256: Option<[u8; 32]>,
}

/// The password's digest stays out of `Debug`: a weak password can be
/// found from it.
impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin")
            .field("address", &self.address)
            .field(
                "status_password_sha256",
                &self.status_password_sha256.map(|_| "[redacted]"),
            )
            .finish()
    }
}

impl Config {
    /// The credential used when no integrations are configured.
    pub fn default_credential(&self) -> usize {
        self.credentials
            .iter()
            .position(|c| c.name == DEFAULT_CREDENTIAL)
            .unwrap_or(0)
    }
}

/// How the async runtime runs the proxy (`[runtime] flavor`).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize, schemars::JsonSchema,
)]
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

/// How the client id and secret reach the token endpoint. Coupa rejects a
/// request that carries them both ways ("provided multiple credentials").
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    /// `client_id` and `client_secret` as form fields.
    #[default]
    Body,
    /// HTTP Basic authentication.
    Basic,
}

/// How a credential obtains its tokens (`grant` in an `[oauth]` table).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize, schemars::JsonSchema,
)]
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

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

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
}
