//! The config file's shape: what users write, as serde structs with their
//! defaults. Every table rejects keys it does not know; [`deserialize`]
//! reports every unknown key of a table in one pass instead of only the first.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Deserialize;

use super::{ClientAuth, ConfigError, GrantKind, HttpVersion, RuntimeFlavor, DEFAULT_CREDENTIAL};

/// The config file as written. Every table rejects keys it does not know.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileConfig {
    #[serde(default)]
    pub(super) listen: ListenFile,
    pub(super) coupa: CoupaFile,
    /// One credential (`[oauth]` with `client_id`, named `default`) or
    /// several (`[oauth.NAME]` tables); told apart in `validate`.
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

/// `[telemetry]`: where traces go.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TelemetryFile {
    /// An OpenTelemetry collector's OTLP/HTTP base URL; unset: no traces.
    #[serde(default)]
    pub(super) otlp_endpoint: Option<String>,
    /// Access lines of refused requests written per second at most
    /// (burst as many); 0: every one.
    #[serde(default)]
    pub(super) refused_lines_per_second: u32,
}

/// `[cluster]`: state shared with other processes in Redis/Valkey.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ClusterFile {
    pub(super) redis_url: String,
    #[serde(default = "default_key_prefix")]
    pub(super) key_prefix: String,
    pub(super) password_file: Option<PathBuf>,
    /// With a `redis+sentinel://` URL: the sentinels' own login.
    pub(super) sentinel_username: Option<String>,
    pub(super) sentinel_password_file: Option<PathBuf>,
    pub(super) encryption_key_file: Option<PathBuf>,
    #[serde(default = "default_fallback_share")]
    pub(super) fallback_share: f64,
}

fn default_key_prefix() -> String {
    "coupa-auth-proxy".to_owned()
}
fn default_fallback_share() -> f64 {
    0.5
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RuntimeFile {
    #[serde(default)]
    pub(super) flavor: RuntimeFlavor,
    pub(super) worker_threads: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ReloadFile {
    #[serde(default = "default_watch_interval", with = "humantime_serde")]
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct IntegrationFile {
    pub(super) name: String,
    /// How a tool that sends a legacy key is recognised.
    pub(super) api_key_sha256: Option<String>,
    /// How a tool that fetches its own token is recognised: a client of
    /// the proxy's own `/oauth2/token`, not of Coupa's.
    pub(super) oauth_client_id: Option<String>,
    pub(super) oauth_client_secret_sha256: Option<String>,
    #[serde(default = "default_credential_name")]
    pub(super) credential: String,
    /// Requests of this integration at Coupa at once; past it they wait.
    pub(super) max_concurrent: Option<usize>,
    /// `Accept` for its requests that state no preference (else
    /// `coupa.accept`).
    pub(super) accept: Option<String>,
    /// Its part of Coupa's budget against other waiting integrations.
    pub(super) weight: Option<u32>,
    /// Its own bound on requests waiting for a slot (else the global one).
    pub(super) max_queue: Option<usize>,
    /// A hard ceiling on its requests per second.
    pub(super) max_per_second: Option<f64>,
}

/// `[insight]`: what the migration view flags.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct InsightFile {
    #[serde(default = "default_idle_warning", with = "humantime_serde")]
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ListenFile {
    #[serde(default = "default_listen_address")]
    pub(super) address: SocketAddr,
    #[serde(default = "default_shutdown_grace", with = "humantime_serde")]
    pub(super) shutdown_grace: Duration,
    #[serde(default, with = "humantime_serde")]
    pub(super) drain_delay: Duration,
    #[serde(default = "default_header_read_timeout", with = "humantime_serde")]
    pub(super) header_read_timeout: Duration,
    #[serde(default = "default_keepalive_timeout", with = "humantime_serde")]
    pub(super) keepalive_timeout: Duration,
    #[serde(default = "default_max_header_bytes")]
    pub(super) max_header_bytes: usize,
    #[serde(default = "default_max_connections")]
    pub(super) max_connections: usize,
    #[serde(default = "default_release_idle_buffers_above")]
    pub(super) release_idle_buffers_above: usize,
    #[serde(default = "default_body_read_timeout", with = "humantime_serde")]
    pub(super) body_read_timeout: Duration,
    #[serde(default = "default_min_body_rate")]
    pub(super) min_body_rate: u64,
    #[serde(default = "default_min_rate_grace", with = "humantime_serde")]
    pub(super) min_rate_grace: Duration,
    #[serde(default = "default_max_body_time", with = "humantime_serde")]
    pub(super) max_body_time: Duration,
    #[serde(default = "default_min_response_rate")]
    pub(super) min_response_rate: u64,
    #[serde(default)]
    pub(super) allow_unauthenticated: bool,
    pub(super) tls: Option<ListenTlsFile>,
    pub(super) intercept: Option<InterceptFile>,
}

/// `[listen.intercept]`: forward-proxy mode for the instance.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct InterceptFile {
    pub(super) ca_cert_file: PathBuf,
    pub(super) ca_key_file: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ListenTlsFile {
    pub(super) cert_file: PathBuf,
    pub(super) key_file: PathBuf,
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CoupaFile {
    pub(super) base_url: String,
    pub(super) ca_file: Option<PathBuf>,
    #[serde(default = "default_accept")]
    pub(super) accept: String,
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub(super) connect_timeout: Duration,
    #[serde(default = "default_pool_idle_timeout", with = "humantime_serde")]
    pub(super) pool_idle_timeout: Duration,
    /// Keep one connection to the instance open (opened at start, again
    /// when the last one closed).
    #[serde(default = "default_true")]
    pub(super) keep_warm: bool,
    #[serde(default = "default_response_header_timeout", with = "humantime_serde")]
    pub(super) response_header_timeout: Duration,
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    pub(super) idle_timeout: Duration,
    #[serde(default = "default_replay_body_limit")]
    pub(super) replay_body_limit: usize,
    #[serde(default = "default_response_buffer")]
    pub(super) response_buffer: usize,
    #[serde(default = "default_response_spool_limit")]
    pub(super) response_spool_limit: u64,
    pub(super) spool_dir: Option<PathBuf>,
    #[serde(default)]
    pub(super) http_version: HttpVersion,
    #[serde(default = "default_upstream_max_connections")]
    pub(super) max_connections: usize,
    #[serde(default = "default_connection_wait_timeout", with = "humantime_serde")]
    pub(super) connection_wait_timeout: Duration,
    #[serde(default = "default_token_wait_timeout", with = "humantime_serde")]
    pub(super) token_wait_timeout: Duration,
    #[serde(default = "default_resend_429_within", with = "humantime_serde")]
    pub(super) resend_429_within: Duration,
    pub(super) rate_limit: Option<RateLimitFile>,
    pub(super) egress_proxy: Option<EgressProxyFile>,
}

/// `[coupa.egress_proxy]`: the corporate proxy every hop to Coupa takes.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct EgressProxyFile {
    pub(super) url: String,
    pub(super) username: Option<String>,
    pub(super) password_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RateLimitFile {
    #[serde(default = "default_rate_per_second")]
    pub(super) per_second: f64,
    #[serde(default = "default_rate_burst")]
    pub(super) burst: u32,
    #[serde(default = "default_rate_max_queue")]
    pub(super) max_queue: usize,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct OAuthFile {
    pub(super) client_id: String,
    pub(super) client_secret: Option<String>,
    pub(super) client_secret_file: Option<PathBuf>,
    pub(super) scopes: Vec<String>,
    pub(super) token_url: Option<String>,
    #[serde(default)]
    pub(super) client_auth: ClientAuth,
    #[serde(default = "default_refresh_fraction")]
    pub(super) refresh_fraction: f64,
    #[serde(default = "default_activation_delay", with = "humantime_serde")]
    pub(super) activation_delay: Duration,
    #[serde(default = "default_retry_initial", with = "humantime_serde")]
    pub(super) retry_initial: Duration,
    #[serde(default = "default_retry_max", with = "humantime_serde")]
    pub(super) retry_max: Duration,
    #[serde(default = "default_token_timeout", with = "humantime_serde")]
    pub(super) request_timeout: Duration,
    #[serde(default = "default_rejected_token_cooldown", with = "humantime_serde")]
    pub(super) rejected_token_cooldown: Duration,
    #[serde(default)]
    pub(super) grant: GrantKind,
    pub(super) state_file: Option<PathBuf>,
    pub(super) redirect_uri: Option<String>,
    pub(super) authorize_url: Option<String>,
    pub(super) device_authorization_url: Option<String>,
    #[serde(default, with = "humantime_serde")]
    pub(super) refresh_token_lifetime: Option<Duration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AdminFile {
    #[serde(default = "default_admin_address")]
    pub(super) address: SocketAddr,
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
        #[derive(Debug, Deserialize)]
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
