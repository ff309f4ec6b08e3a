//! The config file's shape: what users write, as serde structs with their
//! defaults. Every table rejects keys it does not know; [`deserialize`]
//! reports every unknown key of a table in one pass instead of only the first.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde::Deserialize;

use super::{ClientAuth, ConfigError, GrantKind, HttpVersion, RuntimeFlavor, DEFAULT_CREDENTIAL};

/// The config file as written. Every table rejects keys it does not know.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct FileConfig {
    #[serde(default)]
    pub(super) listen: ListenFile,
    pub(super) coupa: CoupaFile,
    /// One credential (`[oauth]` with `client_id`, named `default`) or
    /// several (`[oauth.NAME]` tables); told apart in `validate`.
    #[schemars(schema_with = "oauth_schema")]
    pub(super) oauth: toml::Table,
    #[serde(default)]
    pub(super) integration: Vec<IntegrationFile>,
    #[serde(default)]
    pub(super) admin: AdminFile,
    #[serde(default)]
    pub(super) reload: ReloadFile,
    #[serde(default)]
    pub(super) runtime: RuntimeFile,
    pub(super) cluster: Option<ClusterFile>,
    #[serde(default)]
    pub(super) insight: InsightFile,
    #[serde(default)]
    pub(super) telemetry: TelemetryFile,
}

/// `[telemetry]`: where traces go, and how many access lines of refused
/// requests are written.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct TelemetryFile {
    /// an OpenTelemetry collector's OTLP/HTTP base URL (such as
    /// `http://127.0.0.1:4318`): each request and each token fetch becomes spans
    /// posted as protobuf to `<otlp_endpoint>/v1/traces` (see *Traces*). Plain
    /// `http://` is allowed to any host. Restart to change
    #[serde(default)]
    pub(super) otlp_endpoint: Option<String>,
    /// at most this many access lines a second (a burst of as many) for requests
    /// the proxy refused (`reason` not empty); past it their lines are left out,
    /// counted in `coupa_proxy_access_lines_left_out_total` and said once a minute,
    /// while `coupa_proxy_refused_requests_total` still counts every refusal.
    /// Forwarded requests' lines are never left out. Restart to change
    #[serde(default)]
    pub(super) refused_lines_per_second: u32,
}

/// `[cluster]`: state shared with other processes in Redis/Valkey.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct ClusterFile {
    /// with a `[cluster]` table: the Redis/Valkey every proxy of this instance
    /// shares (`redis://HOST:PORT/DB`, `rediss://` for TLS with public roots), or
    /// its sentinels:
    /// `redis+sentinel://[USER:PASSWORD@]HOST:PORT[,HOST:PORT…]/MASTER_NAME[/DB]`
    /// (`rediss+sentinel://` for TLS to sentinels and data nodes; `USER` is an ACL
    /// user on the data nodes) — the proxy connects to whichever node the sentinels
    /// name primary and follows failovers; see *Running several proxies*
    pub(super) redis_url: String,
    /// prefix of every key, so several deployments can share one server
    #[serde(default = "default_key_prefix")]
    pub(super) key_prefix: String,
    /// the Redis password (the data nodes' with Sentinel), from a file (or put it
    /// in `redis_url`, not both)
    pub(super) password_file: Option<PathBuf>,
    /// with `redis+sentinel://`: ACL user for the sentinels themselves (when they
    /// require a login)
    pub(super) sentinel_username: Option<String>,
    /// with `redis+sentinel://`: file holding the sentinels' password (their
    /// `requirepass`); the data nodes' password is `password_file` or the URL's
    pub(super) sentinel_password_file: Option<PathBuf>,
    /// 32 random bytes, base64 (`head -c 32 /dev/urandom \| base64`): seals every
    /// token stored in Redis
    ///
    /// Required with `[cluster]`.
    pub(super) encryption_key_file: Option<PathBuf>,
    /// share of `[coupa.rate_limit]` one process uses alone while Redis is
    /// unreachable
    #[serde(default = "default_fallback_share")]
    pub(super) fallback_share: f64,
}

fn default_key_prefix() -> String {
    "coupa-auth-proxy".to_owned()
}
fn default_fallback_share() -> f64 {
    0.5
}

/// `[runtime]`: how the async runtime runs the proxy.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct RuntimeFile {
    /// the async runtime: `current_thread` (one thread does everything: the least
    /// CPU per request), `multi_thread` (a worker per CPU: scales across cores), or
    /// `auto`: `current_thread` when the process may use one CPU (pinned with
    /// `taskset` or a cpuset, or a CPU quota of one or less, as in a container
    /// limited to `1` CPU), else `multi_thread`. Restart to change
    #[serde(default)]
    pub(super) flavor: RuntimeFlavor,
    /// `multi_thread` only: how many workers
    ///
    /// Default: one per usable CPU.
    pub(super) worker_threads: Option<usize>,
}

/// `[reload]`: how changes to this file and its secret files are noticed.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct ReloadFile {
    /// how often the config file, `client_secret_file`s,
    /// `coupa.egress_proxy.password_file` and `listen.tls` files are checked for
    /// changes; `"0s"`: only on SIGHUP
    #[serde(default = "default_watch_interval", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub(super) watch_interval: Duration,
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

/// `[[integration]]`: one legacy integration, how it is recognised, which
/// credential it gets and its share of the way to Coupa.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct IntegrationFile {
    /// with `[[integration]]` tables: a name for logs, metrics and the status page
    pub(super) name: String,
    /// hex SHA-256 of the integration's legacy key (`hash-key` prints it). Each
    /// table needs this, or a local OAuth client, or both
    pub(super) api_key_sha256: Option<String>,
    /// a local OAuth client of the proxy's own `POST /oauth2/token`, for tools that
    /// fetch their own token (see *Tools that fetch their own token*); unique, no
    /// spaces
    pub(super) oauth_client_id: Option<String>,
    /// with `oauth_client_id`: hex SHA-256 of the local client secret (`hash-key`
    /// prints it)
    pub(super) oauth_client_secret_sha256: Option<String>,
    /// the `[oauth.NAME]` credential whose token the integration gets
    #[serde(default = "default_credential_name")]
    pub(super) credential: String,
    /// requests of this integration at Coupa at once (from when its body has been
    /// read until Coupa's answer has been read). Past it the integration's requests
    /// wait, up to `coupa.connection_wait_timeout`, then get `503
    /// {"error":"integration_busy"}` with `Retry-After: 1`; the other integrations
    /// are not held up. The default leaves half of the connections to the others
    /// whatever one integration sends
    ///
    /// Default: half of `coupa.max_connections` (16); all of them when only one
    /// integration is configured.
    pub(super) max_concurrent: Option<usize>,
    /// the `Accept` for this integration's requests that state none (or only
    /// `*/*`), e.g. `"application/xml"` for an XML flow behind a proxy whose
    /// `coupa.accept` is JSON. The status page counts, per integration, the
    /// requests that relied on it and the format given
    ///
    /// Default: `coupa.accept`.
    pub(super) accept: Option<String>,
    /// with `[coupa.rate_limit]`: this integration's part of Coupa's budget while
    /// other integrations wait too — free slots are dealt to the waiting
    /// integrations in turn, `weight` slots to it per turn (see *Sharing Coupa's
    /// budget*). An idle integration costs the others nothing; a lone one gets the
    /// whole budget
    ///
    /// Default: `1`.
    pub(super) weight: Option<u32>,
    /// with `[coupa.rate_limit]`: its own bound on requests waiting for a slot;
    /// past it its requests get `429 {"error":"rate_limited"}` with `Retry-After`
    /// (never another integration's)
    ///
    /// Default: `coupa.rate_limit.max_queue`.
    pub(super) max_queue: Option<usize>,
    /// with `[coupa.rate_limit]`: a hard ceiling on this integration's requests per
    /// second (e.g. a batch job held to `10`), whatever the budget has free; spaced
    /// evenly (no burst)
    pub(super) max_per_second: Option<f64>,
}

/// `[insight]`: what the migration view flags.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct InsightFile {
    /// an integration not seen for this long is flagged on the status page as a
    /// candidate to retire (see *Seeing what integrations use*)
    #[serde(default = "default_idle_warning", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub(super) idle_warning: Duration,
}

impl Default for InsightFile {
    fn default() -> Self {
        Self {
            idle_warning: default_idle_warning(),
        }
    }
}

fn default_idle_warning() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}

fn default_credential_name() -> String {
    DEFAULT_CREDENTIAL.to_owned()
}

/// `[listen]`: where integrations connect, and how the proxy guards that
/// side (timeouts, sizes, slow clients, shutdown).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct ListenFile {
    /// where integrations connect (HTTP/1.1 and HTTP/2 cleartext by prior
    /// knowledge)
    #[serde(default = "default_listen_address")]
    pub(super) address: SocketAddr,
    /// after SIGTERM/SIGINT, how long in-flight requests may run on
    #[serde(default = "default_shutdown_grace", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub(super) shutdown_grace: Duration,
    /// after SIGTERM/SIGINT, how long the listener keeps accepting and serving
    /// (while `/readyz` already answers `503`) before the drain begins: load
    /// balancers and kube-proxy still route to the process for a moment (see
    /// *Restarts and upgrades*)
    #[serde(default, with = "humantime_serde")]
    #[schemars(with = "String")]
    pub(super) drain_delay: Duration,
    /// a request head must be complete within this of its first byte (slowloris); a
    /// new connection that sends nothing (or does not finish its TLS handshake)
    /// within this is closed
    #[serde(default = "default_header_read_timeout", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub(super) header_read_timeout: Duration,
    /// an idle keep-alive connection is closed after this, and every HTTP/1.1
    /// answer says so: `Keep-Alive: timeout=120`. Longer than the longest common
    /// client pool (.NET Framework 100 s), so clients give up an idle connection
    /// before the proxy does and never send a `POST` into a closing socket; nginx
    /// keeps 75 s, IIS 120 s. An idle connection costs about 6 KiB once parked (see
    /// `release_idle_buffers_above`), so 1,000 idle clients hold about 6 MiB
    #[serde(default = "default_keepalive_timeout", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub(super) keepalive_timeout: Duration,
    /// largest request head accepted (at least 8192); beyond it the client gets
    /// `431`
    #[serde(default = "default_max_header_bytes")]
    pub(super) max_header_bytes: usize,
    /// open client connections beyond this get a `503` JSON answer and are closed
    #[serde(default = "default_max_connections")]
    pub(super) max_connections: usize,
    /// with more client connections open than this, a plain HTTP/1.1 keep-alive
    /// connection that goes idle gives hyper's buffers back (about 27 KiB) until
    /// its next request: an idle connection then holds about 6 KiB instead of about
    /// 33. `0` does it always; below the threshold it is not done, because starting
    /// hyper's connection state again costs a few large allocations per request.
    /// Idle connections still close after `keepalive_timeout`
    #[serde(default = "default_release_idle_buffers_above")]
    pub(super) release_idle_buffers_above: usize,
    /// a client that sends no request body bytes for this long gets `408
    /// {"error":"request_body_timeout"}`, and an upstream request it started is
    /// aborted
    #[serde(default = "default_body_read_timeout", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub(super) body_read_timeout: Duration,
    /// bytes per second a request body must average once `min_rate_grace` has
    /// passed (Kestrel's default), else `408`: a trickle of a byte every few
    /// seconds is progress, but not a request. `0` turns it off
    #[serde(default = "default_min_body_rate")]
    pub(super) min_body_rate: u64,
    /// how long a body may start slowly before `min_body_rate` applies, and how
    /// long a client may stall an answer before `min_response_rate` applies
    #[serde(default = "default_min_rate_grace", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub(super) min_rate_grace: Duration,
    /// a request body must be complete within this, else `408` (a body kept just
    /// above the minimum rate is still bounded)
    #[serde(default = "default_max_body_time", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub(super) max_body_time: Duration,
    /// bytes per second a client must take an answer at, on average, once the proxy
    /// has waited on it for `min_rate_grace` (Kestrel's default); else its
    /// connection is closed (`coupa_proxy_client_response_timeouts_total`). The
    /// clock runs only while the client's socket is full, so idle time between
    /// requests does not count. `0` turns it off. See *Slow and misbehaving
    /// clients*
    #[serde(default = "default_min_response_rate")]
    pub(super) min_response_rate: u64,
    /// allow a non-loopback `listen.address` without `[[integration]]` tables (logs
    /// a warning at start)
    #[serde(default)]
    pub(super) allow_unauthenticated: bool,
    pub(super) tls: Option<ListenTlsFile>,
    pub(super) intercept: Option<InterceptFile>,
}

/// `[listen.intercept]`: forward-proxy mode for the instance.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct InterceptFile {
    /// with a `[listen.intercept]` table: the local CA (PEM) the integration hosts
    /// trust; `CONNECT` to the instance's host and port is then tunnelled and
    /// served like a direct connection, anything else gets `403` (see *Integrations
    /// that cannot change their base URL*). Without the table `CONNECT` is `405`.
    /// `coupa-auth-proxy ca init` makes one
    pub(super) ca_cert_file: PathBuf,
    /// the CA's private key (PEM, PKCS#8); must be mode 0600 (refused otherwise);
    /// read at start, never logged or shown
    pub(super) ca_key_file: PathBuf,
}

/// `[listen.tls]`: HTTPS on the listener, and mutual TLS with a client CA.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct ListenTlsFile {
    /// with a `[listen.tls]` table: PEM certificate chain of the listener (HTTPS,
    /// ALPN h2 and http/1.1; a connection speaks exactly what ALPN agreed); re-read
    /// when it changes. Without `[listen.tls]` on a non-loopback address, legacy
    /// keys and Coupa's answers cross the network in cleartext: the proxy says so
    /// at start, in `check` and in `/readyz` warnings
    pub(super) cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1); re-read when it changes
    pub(super) key_file: PathBuf,
    /// require client certificates chaining to these PEM CAs (mTLS); counts as
    /// authentication for the open-listener rule
    pub(super) client_ca_file: Option<PathBuf>,
}

impl Default for ListenFile {
    fn default() -> Self {
        Self {
            address: default_listen_address(),
            shutdown_grace: default_shutdown_grace(),
            drain_delay: Duration::ZERO,
            header_read_timeout: default_header_read_timeout(),
            keepalive_timeout: default_keepalive_timeout(),
            max_header_bytes: default_max_header_bytes(),
            max_connections: default_max_connections(),
            release_idle_buffers_above: default_release_idle_buffers_above(),
            body_read_timeout: default_body_read_timeout(),
            min_body_rate: default_min_body_rate(),
            min_rate_grace: default_min_rate_grace(),
            max_body_time: default_max_body_time(),
            min_response_rate: default_min_response_rate(),
            allow_unauthenticated: false,
            tls: None,
            intercept: None,
        }
    }
}

/// `[coupa]`: the instance, and how requests to it are sent, retried,
/// paced and buffered.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct CoupaFile {
    /// the instance, e.g. `https://acme.coupahost.com`; `http://` only for loopback
    /// hosts; a path (e.g. `https://host/coupa`) is prepended to every request
    pub(super) base_url: String,
    /// extra PEM trust roots for the instance and the token endpoint; public
    /// (webpki) roots are always trusted; verification cannot be turned off
    pub(super) ca_file: Option<PathBuf>,
    /// `Accept` sent when the client sent none or only `*/*` and its `Content-Type`
    /// is neither JSON nor XML. The default is Coupa's own answer to such requests
    /// (XML), so a legacy integration that relied on it keeps getting XML; a
    /// client's own `Accept` is always kept. Any media type (`type/subtype`)
    #[serde(default = "default_accept")]
    pub(super) accept: String,
    /// TCP connect limit towards the instance (then 502/504)
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub(super) connect_timeout: Duration,
    /// idle upstream connections are closed after this
    #[serde(default = "default_pool_idle_timeout", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub(super) pool_idle_timeout: Duration,
    /// keep one connection to the instance open: it is opened at start, while the
    /// first token is fetched, and again whenever the last one has closed (after
    /// `pool_idle_timeout` idle, or closed by Coupa), so a call after start-up or
    /// after an idle period does not pay the TCP and TLS handshakes (two round
    /// trips to a distant instance). Costs one connection, re-made every
    /// `pool_idle_timeout` while idle. `false`: connections are opened by requests
    /// only
    #[serde(default = "default_true")]
    pub(super) keep_warm: bool,
    /// Coupa must send status and headers within this, else `504`
    #[serde(default = "default_response_header_timeout", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub(super) response_header_timeout: Duration,
    /// a response body that sends nothing for this long is aborted
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub(super) idle_timeout: Duration,
    /// request bodies up to this many bytes are read whole before the request goes
    /// to Coupa (a slow uploader holds only its own connection, never one to Coupa,
    /// and Coupa gets the body in one piece) and kept so the request can be
    /// replayed (after a 401 or a dropped connection). A larger body streams on
    /// after its first `replay_body_limit` bytes and is not replayed
    #[serde(default = "default_replay_body_limit")]
    pub(super) replay_body_limit: usize,
    /// Coupa's answer is taken off its connection ahead of the client, so a slow
    /// reader holds only its own connection: an answer of known length up to this
    /// is read whole before its head goes to the client; of a larger or chunked
    /// one, this much is held in memory while the client drains it. `0`: answers
    /// stream at the client's pace, holding their Coupa connection until read (the
    /// behaviour before this setting)
    #[serde(default = "default_response_buffer")]
    pub(super) response_buffer: usize,
    /// beyond `response_buffer`, up to this many bytes of one answer go to an
    /// unlinked temp file in `spool_dir` (gone when the answer is, even after a
    /// crash). An answer larger than both streams at its client's pace from there,
    /// as without a spool (`coupa_proxy_response_spool_overflows_total`). `0`: no
    /// temp files
    #[serde(default = "default_response_spool_limit")]
    pub(super) response_spool_limit: u64,
    /// where those temp files are made; must exist
    ///
    /// Default: the system temp dir (`$TMPDIR`, else `/tmp`).
    pub(super) spool_dir: Option<PathBuf>,
    /// the upstream hop: `"http1"` (ALPN offers only `http/1.1`), `"http2"` (ALPN
    /// `h2` only; prior knowledge over loopback `http://`), or `"auto"` (what ALPN
    /// picks). See *Upstream HTTP version, retries and connections*
    #[serde(default)]
    pub(super) http_version: HttpVersion,
    /// HTTP/1.1 connections to the instance at most, idle and busy; past it
    /// requests wait for a free one (bounded by `connection_wait_timeout`). HTTP/2
    /// shares one connection instead
    #[serde(default = "default_upstream_max_connections")]
    pub(super) max_connections: usize,
    /// how long a request waits for a free connection before it gets `503
    /// {"error":"upstream_busy"}` with `Retry-After: 1` (counted in
    /// `coupa_proxy_upstream_connection_wait_timeouts_total`); nothing is sent to
    /// Coupa
    #[serde(default = "default_connection_wait_timeout", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub(super) connection_wait_timeout: Duration,
    /// how long a request waits for a token when its credential holds none (at
    /// start-up, or after a token expired without renewal) before it gets `503
    /// {"error":"no_token"}` with the reason; `0s` answers 503 at once. Waiting
    /// requests hold their connection like any other
    #[serde(default = "default_token_wait_timeout", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub(super) token_wait_timeout: Duration,
    /// Coupa's own `429` (its budget is per instance, shared with clients outside
    /// the proxy) is not passed on while this allows: the request waits Coupa's
    /// `Retry-After` (a second without one, at least a second) and is sent again
    /// through its integration's place in the rate limit, up to this long in all, a
    /// `POST` too (a 429 is an answer to a request Coupa did not process, RFC 6585
    /// §4). Needs the body kept (`replay_body_limit`); past the bound, or with a
    /// larger body, Coupa's 429 goes to the client unchanged. `0s`: always pass it
    /// on
    #[serde(default = "default_resend_429_within", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub(super) resend_429_within: Duration,
    pub(super) rate_limit: Option<RateLimitFile>,
    pub(super) egress_proxy: Option<EgressProxyFile>,
}

/// `[coupa.egress_proxy]`: the corporate proxy every hop to Coupa takes.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct EgressProxyFile {
    /// with a `[coupa.egress_proxy]` table: the `http://host:port` of the company's
    /// egress proxy; every connection to the instance and the token endpoint is
    /// tunnelled through it with `CONNECT` (see *Behind a corporate proxy*).
    /// Without it every hop goes direct;
    /// `HTTP_PROXY`/`HTTPS_PROXY`/`ALL_PROXY`/`NO_PROXY` are never used
    pub(super) url: String,
    /// login for the egress proxy (`Proxy-Authorization: Basic`); needs
    /// `password_file`
    pub(super) username: Option<String>,
    /// file holding the egress proxy's password (trailing newline ignored); re-read
    /// on reload; never logged or shown
    pub(super) password_file: Option<PathBuf>,
}

/// `[coupa.rate_limit]`: Coupa's per-instance budget, shaped by the proxy
/// (per process, or for all of them with `[cluster]`).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct RateLimitFile {
    /// with a `[coupa.rate_limit]` table: sustained requests per second to Coupa
    /// (no table: no shaping)
    #[serde(default = "default_rate_per_second")]
    pub(super) per_second: f64,
    /// requests that may go at once above the rate: four under Coupa's own 20, the
    /// slack that keeps requests the network bunches on their way out of Coupa's
    /// 429 (see *What integrations feel*)
    #[serde(default = "default_rate_burst")]
    pub(super) burst: u32,
    /// requests that may wait for their slot, per integration (each waits in its
    /// own queue; requests of no integration share one); beyond it `429` with
    /// `Retry-After`. An integration's own `max_queue` overrides it
    #[serde(default = "default_rate_max_queue")]
    pub(super) max_queue: usize,
}

/// `[oauth]` (or `[oauth.NAME]`): an OAuth client of the instance and how
/// its tokens are fetched and renewed.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct OAuthFile {
    /// the OAuth client's id. Every `oauth.*` key also exists per named credential:
    /// `[oauth.NAME]` tables instead of one `[oauth]` table (which is the
    /// credential `default`)
    pub(super) client_id: String,
    /// the secret (normally `"${COUPA_CLIENT_SECRET}"`); exactly one of this and
    /// `client_secret_file`. Required for `client_credentials`; optional for the
    /// user-consented grants (a public client authenticates with PKCE alone)
    pub(super) client_secret: Option<String>,
    /// file holding the secret (trailing newline ignored), e.g. a mounted
    /// Kubernetes/Docker secret
    pub(super) client_secret_file: Option<PathBuf>,
    /// list of scopes (`service.object.right`), each assigned to the client in
    /// Coupa; sent space-separated
    pub(super) scopes: Vec<String>,
    /// token endpoint; same `https`/loopback rule
    ///
    /// Default: `base_url` + `/oauth2/token`.
    pub(super) token_url: Option<String>,
    /// `body`: id and secret as form fields; `basic`: HTTP Basic, id and secret
    /// form-urlencoded first as RFC 6749 §2.3.1 says (servers that do not decode,
    /// such as Doorkeeper, then see another secret when it holds anything but `A-Z
    /// a-z 0-9 - . _ *`: `check` and `/readyz` warn, and `body` is unambiguous).
    /// Never both (Coupa rejects "multiple credentials")
    #[serde(default)]
    pub(super) client_auth: ClientAuth,
    /// renew once this share of the lifetime has passed (20 h of Coupa's 24 h)
    #[serde(default = "default_refresh_fraction")]
    pub(super) refresh_fraction: f64,
    /// wait between receiving a new token and using it, as Coupa advises; the old
    /// token serves meanwhile. Skipped when no valid token is held, and when Coupa
    /// rejected the current one (a 401)
    #[serde(default = "default_activation_delay", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub(super) activation_delay: Duration,
    /// first retry delay after a failed token request
    #[serde(default = "default_retry_initial", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub(super) retry_initial: Duration,
    /// cap of the exponential backoff (with jitter); configuration errors are
    /// retried every `retry_max/2`..`retry_max`
    #[serde(default = "default_retry_max", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub(super) retry_max: Duration,
    /// limit for one token request; also how long a request that got 401 waits for
    /// the fresh token
    #[serde(default = "default_token_timeout", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub(super) request_timeout: Duration,
    /// after a 401-triggered token fetch, no other one starts within this (no loops
    /// when Coupa keeps rejecting). A 401 for a token already superseded by one
    /// waiting out its activation delay installs that one instead and does not
    /// start the cooldown
    #[serde(default = "default_rejected_token_cooldown", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub(super) rejected_token_cooldown: Duration,
    /// `client_credentials`, `authorization_code` or `device_code` (see
    /// *User-consented grants*)
    #[serde(default)]
    pub(super) grant: GrantKind,
    /// where the refresh token, access token, expiries and scopes are kept (JSON,
    /// mode 0600, replaced atomically; relative paths are from the config file's
    /// directory). Only for `authorization_code` / `device_code`, which also need
    /// `offline_access` in `scopes`
    ///
    /// Required for the user grants.
    pub(super) state_file: Option<PathBuf>,
    /// `authorization_code` only: where `authorize` listens for Coupa's redirect;
    /// must be `http://` on a loopback host with a port, and registered on the
    /// client in Coupa. Port `0` takes any free port (only if your Coupa accepts
    /// any loopback port)
    ///
    /// Default: `http://127.0.0.1:8765/callback`.
    pub(super) redirect_uri: Option<String>,
    /// `authorization_code` only
    ///
    /// Default: `base_url` + `/oauth2/authorizations/new`.
    pub(super) authorize_url: Option<String>,
    /// `device_code` only
    ///
    /// Default: `base_url` + `/oauth2/device_authorizations`.
    pub(super) device_authorization_url: Option<String>,
    /// user grants only: how long a refresh token lasts from its issue (Coupa: 90
    /// days); warnings start 14 days before the end
    ///
    /// Default: `90d`.
    #[serde(default, with = "humantime_serde")]
    #[schemars(with = "Option<String>")]
    pub(super) refresh_token_lifetime: Option<Duration>,
}

/// `[admin]`: the admin listener (`/healthz`, `/readyz`, `/metrics`, the
/// status page).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct AdminFile {
    /// the admin endpoints (`/healthz`, `/readyz`, `/metrics`, the status page)
    #[serde(default = "default_admin_address")]
    pub(super) address: SocketAddr,
    /// the SHA-256 (`coupa-auth-proxy hash-key` prints it) of the password the
    /// status page and `/status.json` ask for when the admin listener is not on
    /// loopback: HTTP Basic, any user name (a browser prompts for it). Off loopback
    /// without it they answer `401 {"error":"status_page_closed"}` and the start-up
    /// log and `check` warn. Restart to change
    #[serde(default)]
    pub(super) status_password_sha256: Option<String>,
}

impl Default for AdminFile {
    fn default() -> Self {
        Self {
            address: default_admin_address(),
            status_password_sha256: None,
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
fn default_keepalive_timeout() -> Duration {
    // Longer than the longest common client pool (.NET Framework keeps an
    // idle connection 100 s), so the client gives up its connection first.
    Duration::from_secs(120)
}

fn default_release_idle_buffers_above() -> usize {
    128
}

fn default_max_header_bytes() -> usize {
    64 * 1024
}
fn default_max_connections() -> usize {
    4096
}
fn default_body_read_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_min_body_rate() -> u64 {
    // Kestrel's MinRequestBodyDataRate: any real client on any real network
    // is far above it; a trickle meant to hold a connection is not.
    240
}
fn default_min_response_rate() -> u64 {
    // Kestrel's MinResponseDataRate, for the same reason.
    240
}
fn default_min_rate_grace() -> Duration {
    Duration::from_secs(5)
}
fn default_max_body_time() -> Duration {
    Duration::from_secs(600)
}
fn default_upstream_max_connections() -> usize {
    // Coupa takes 25 requests/s per instance: more connections than this
    // would only carry requests it answers 429.
    32
}
fn default_resend_429_within() -> Duration {
    // Long enough to ride out a busy minute's bursts of other clients
    // (Coupa's Retry-After is a second or two), well under the 60-120 s
    // timeouts legacy integrations use.
    Duration::from_secs(30)
}
fn default_token_wait_timeout() -> Duration {
    // A first token takes one round trip to the token endpoint; a retry
    // after a failed one comes within seconds. Well under the 30-60 s
    // timeouts integrations use, so a client still gets the 503's reason.
    Duration::from_secs(10)
}
fn default_connection_wait_timeout() -> Duration {
    // Coupa answers most calls within a second or two: a request that has
    // waited this long for one of max_connections is better told to retry.
    Duration::from_secs(10)
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
fn default_response_buffer() -> usize {
    // Most Coupa answers (a page of 50 records) fit, so they cost no file.
    256 * 1024
}
fn default_response_spool_limit() -> u64 {
    64 * 1024 * 1024
}
fn default_rate_per_second() -> f64 {
    // Coupa's documented limit per instance.
    25.0
}
fn default_rate_burst() -> u32 {
    // Four under Coupa's own 20: the proxy's slots reach Coupa a little
    // bunched by the network (and, with replicas, by Redis), and a bucket
    // spent to its last token answers such a pair with a 429. The rate is
    // Coupa's, so the slack costs only those four at the start of a burst
    // (the `coupa-budget` bench row: 11 of Coupa's 429s in 400 at 20, none
    // at 16, same goodput).
    16
}
fn default_rate_max_queue() -> usize {
    100
}
fn default_rejected_token_cooldown() -> Duration {
    Duration::from_secs(10)
}
fn default_accept() -> String {
    "application/xml".to_owned()
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_true() -> bool {
    true
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

/// More unknown keys than this in one table is not a typo but the wrong
/// file; stop listing there.
const MAX_REPORTED_PER_TABLE: usize = 32;

/// Deserializes `value` as `T`, adding every problem to `problems` (`prefix`
/// names where `value` sits in the file, "" for the whole file). An unknown
/// key is reported, dropped and the parse tried again, so all of a file's
/// typos show at once; any other shape error ends the attempt.
pub(super) fn deserialize<T: DeserializeOwned>(
    mut value: toml::Value,
    prefix: &str,
    problems: &mut Vec<ConfigError>,
) -> Option<T> {
    for _ in 0..MAX_REPORTED_PER_TABLE {
        let error = match serde_path_to_error::deserialize::<_, T>(value.clone()) {
            Ok(parsed) => return Some(parsed),
            Err(error) => error,
        };
        let path = error.path().clone();
        let message = error.into_inner().message().to_owned();
        let unknown = unknown_field(&message).map(str::to_owned);
        problems.push(ConfigError::Shape {
            key: shape_key(prefix, &path.to_string()),
            message,
        });
        match unknown {
            Some(field) if remove_key(&mut value, &path, &field) => continue,
            _ => return None,
        }
    }
    None
}

/// The key an error at `path` below `prefix` is about.
fn shape_key(prefix: &str, path: &str) -> String {
    match (prefix, path) {
        ("", ".") => "config".to_owned(),
        ("", path) => path.to_owned(),
        (prefix, ".") => prefix.to_owned(),
        (prefix, path) => format!("{prefix}.{path}"),
    }
}

/// The field serde's `deny_unknown_fields` complained about.
fn unknown_field(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("unknown field `")?;
    rest.split('`').next()
}

/// Removes the unknown `field` that `path` ends at; false when it is not
/// there to remove (and retrying would find the same error).
fn remove_key(value: &mut toml::Value, path: &serde_path_to_error::Path, field: &str) -> bool {
    use serde_path_to_error::Segment;
    let segments: Vec<&Segment> = path.iter().collect();
    let Some((Segment::Map { key }, parents)) = segments.split_last() else {
        return false;
    };
    if key != field {
        return false;
    }
    let mut here = value;
    for segment in parents {
        let next = match (segment, here) {
            (Segment::Map { key }, toml::Value::Table(table)) => table.get_mut(key),
            (Segment::Seq { index }, toml::Value::Array(items)) => items.get_mut(*index),
            _ => None,
        };
        match next {
            Some(next) => here = next,
            None => return false,
        }
    }
    match here {
        toml::Value::Table(table) => table.remove(field).is_some(),
        _ => false,
    }
}

/// `[oauth]`: one credential's table, or tables of credentials by name.
fn oauth_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let credential = generator.subschema_for::<OAuthFile>();
    schemars::json_schema!({
        "description": "The OAuth client: one credential's keys (named `default`), or one [oauth.NAME] table per credential",
        "anyOf": [
            credential,
            {
                "type": "object",
                "minProperties": 1,
                "additionalProperties": credential,
            },
        ],
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http::uri::Scheme;

    use super::super::test_support::*;
    use super::*;

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

    #[test]
    fn unknown_keys_in_arrays_of_tables_are_all_found() {
        let value: toml::Value = toml::from_str(
            "[[integration]]\nname = \"a\"\napi_key_sha256 = \"x\"\nkye = 1\n\
             [[integration]]\nname = \"b\"\napi_key_sha256 = \"y\"\ncredentail = \"z\"\n",
        )
        .unwrap();
        #[derive(Debug, Deserialize, JsonSchema)]
        #[serde(deny_unknown_fields)]
        struct Only {
            #[allow(dead_code)]
            integration: Vec<IntegrationFile>,
        }
        let mut problems = Vec::new();
        let parsed: Option<Only> = deserialize(value, "", &mut problems);
        assert!(parsed.is_some());
        let shown: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        assert_eq!(shown.len(), 2, "{shown:?}");
        assert!(
            shown[0].starts_with("integration[0].kye: unknown field `kye`"),
            "{shown:?}"
        );
        assert!(
            shown[1].starts_with("integration[1].credentail: unknown field `credentail`"),
            "{shown:?}"
        );
    }
}
