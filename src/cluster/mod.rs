//! State shared by every proxy in front of one Coupa instance, kept in a
//! Redis-protocol server (Redis 7, Valkey), sealed at rest ([`seal`]). A
//! leaf: it knows connections, keys, locks, sealed values, presence and
//! announcements, nothing of budgets or tokens. The policies that use it
//! live beside their local twins: the shared rate budget in
//! `proxy::ratelimit::shared`, the one token fetch per credential in
//! `token::shared`, the shared consent in `token::consent::shared`.
//!
//! A narrow interface: those callers use [`Cluster`]; a process without
//! `[cluster]` never builds one. Redis being
//! down is not an outage: every call is bounded by [`CALL_TIMEOUT`], fails
//! fast while the server is away, and the callers fall back to working
//! alone (their own token fetch, a share of the budget). The health is
//! logged once per change, counted in metrics and shown in `/status.json`;
//! the connection comes back by itself.
//!
//! Keys, all under `{key_prefix}:{instance}` where `instance` is a digest
//! of `coupa.base_url` (so deployments and instances never mix, and no key
//! name carries a secret):
//! - `:budget`, `:pause`: the GCRA timestamp and a shared hold-off after
//!   Coupa's own 429;
//! - `:token:{credential}`, `:lock:{credential}`: the sealed token and the
//!   fetch lock, `credential` a digest of client id, token URL and scopes;
//! - `:consent:{credential}`: a user-consented grant's sealed state (its
//!   refresh token), renewed under the same lock;
//! - `:procs`: processes seen recently (a sorted set by last heartbeat);
//! - `:events`: pub/sub channel announcing new tokens.

mod announce;
mod keys;
mod locks;
mod presence;
pub mod seal;
mod sealed;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant as StdInstant, SystemTime, UNIX_EPOCH};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{FromRedisValue, IntoConnectionInfo};
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::background::Background;
use crate::config;
pub use keys::{short_digest, Keys};
use seal::Sealer;
pub use sealed::ReadError;

/// Longest any one Redis call may take before the caller works alone.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(1);
/// Opening a connection may take longer than one call (TLS, a loaded host).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How often a process says it is alive.
const HEARTBEAT: Duration = Duration::from_secs(5);
/// Processes not heard from for this long are no longer listed.
const SEEN_WITHIN: Duration = Duration::from_secs(30);
/// While Redis is away, one call in this long goes to it (the probe); the
/// others fail at once, so requests do not each wait for a reconnect.
const PROBE_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cluster.redis_url: {0}")]
    Url(String),
    #[error("cluster.encryption_key_file: {0}")]
    Key(#[from] seal::SealError),
    #[error("Redis: {0}")]
    Redis(String),
    #[error("Redis did not answer within {0:?}")]
    Timeout(Duration),
    /// Not tried: Redis was away at the last probe.
    #[error("Redis is unavailable (next probe within a second)")]
    Away,
}

/// What `/metrics` shows of the cluster.
#[derive(Debug, Clone, Default)]
pub struct ClusterMetrics {
    /// 1 while Redis answers, 0 while this process works alone.
    pub up: Gauge,
    pub round_trip: Option<Histogram>,
    pub errors: Counter,
    /// Requests that waited for their slot in the shared budget.
    pub budget_waits: Counter,
    /// Coupa answered 429 and every process was told to hold off.
    pub pauses: Counter,
    /// 1 while this process holds a credential's fetch lock.
    pub fetching: prometheus_client::metrics::family::Family<[(&'static str, String); 1], Gauge>,
}

pub struct Cluster {
    connection: ConnectionManager,
    client: redis::Client,
    pub keys: Keys,
    pub sealer: Sealer,
    /// This process in the cluster view: host, pid and a random suffix.
    pub process: String,
    /// Share of the budget used alone while Redis is away.
    pub fallback_share: f64,
    unavailable_since: Mutex<Option<SystemTime>>,
    /// While unavailable: when the next call may try Redis again.
    next_probe: Mutex<Option<StdInstant>>,
    /// Redis just went away: the heartbeat starts probing.
    went_away: Arc<Notify>,
    /// Woken when a new token is announced, by credential digest.
    announced: Mutex<HashMap<String, Arc<Notify>>>,
    pub metrics: ClusterMetrics,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("keys", &self.keys)
            .field("process", &self.process)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// Builds the handle and starts its background tasks (heartbeat, token
    /// announcements). Never waits for Redis: it may come later.
    pub fn start(
        config: &config::Cluster,
        base_url: &str,
        metrics: ClusterMetrics,
        background: &Background,
    ) -> Result<Arc<Self>, ClusterError> {
        // redis' TLS set-up uses the process-wide rustls provider.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut info = config
            .redis_url
            .as_str()
            .into_connection_info()
            .map_err(|e| ClusterError::Url(e.to_string()))?;
        if let Some(password) = &config.password {
            let settings = info
                .redis_settings()
                .clone()
                .set_password(password.expose());
            info = info.set_redis_settings(settings);
        }
        let client = redis::Client::open(info).map_err(|e| ClusterError::Url(e.to_string()))?;
        let connection = ConnectionManager::new_lazy_with_config(
            client.clone(),
            ConnectionManagerConfig::new()
                .set_connection_timeout(Some(CONNECT_TIMEOUT))
                .set_response_timeout(Some(CALL_TIMEOUT))
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_secs(1)),
        )
        .map_err(|e| ClusterError::Redis(e.to_string()))?;
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "host".to_owned());
        let process = format!(
            "{host}-{}-{:04x}",
            std::process::id(),
            rand::random::<u16>()
        );
        let cluster = Arc::new(Self {
            connection,
            client,
            keys: Keys::new(&config.key_prefix, base_url),
            sealer: Sealer::new(&config.encryption_key)?,
            process,
            fallback_share: config.fallback_share,
            unavailable_since: Mutex::new(None),
            next_probe: Mutex::new(None),
            went_away: Arc::new(Notify::new()),
            announced: Mutex::new(HashMap::new()),
            metrics,
        });
        cluster.metrics.up.set(1);
        let weak = Arc::downgrade(&cluster);
        background.spawn(|stop| presence::heartbeat(weak, stop));
        let weak = Arc::downgrade(&cluster);
        background.spawn(|stop| announce::listen_for_tokens(weak, stop));
        Ok(cluster)
    }

    /// Runs one Redis command, bounded in time, keeping the health current.
    pub async fn query<T: FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, ClusterError> {
        let mut connection = self.connection.clone();
        self.observe(async move { cmd.query_async(&mut connection).await })
            .await
    }

    /// Runs a Lua script (EVALSHA, loading it on first use).
    pub async fn script<T: FromRedisValue>(
        &self,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<T, ClusterError> {
        let mut connection = self.connection.clone();
        self.observe(async move { invocation.invoke_async(&mut connection).await })
            .await
    }

    async fn observe<T>(
        &self,
        call: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, ClusterError> {
        let started = StdInstant::now();
        if let Ok(mut next_probe) = self.next_probe.lock() {
            match *next_probe {
                Some(at) if started < at => return Err(ClusterError::Away),
                Some(_) => *next_probe = Some(started + PROBE_EVERY),
                None => {}
            }
        }
        let result = match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => Err(ClusterError::Redis(error.to_string())),
            Err(_) => Err(ClusterError::Timeout(CALL_TIMEOUT)),
        };
        if let Some(histogram) = &self.metrics.round_trip {
            histogram.observe(started.elapsed().as_secs_f64());
        }
        match &result {
            Ok(_) => self.mark_available(),
            Err(error) => self.mark_unavailable(error),
        }
        result
    }

    fn mark_available(&self) {
        let Ok(mut since) = self.unavailable_since.lock() else {
            return;
        };
        if let Some(was) = since.take() {
            if let Ok(mut next_probe) = self.next_probe.lock() {
                *next_probe = None;
            }
            self.metrics.up.set(1);
            info!(
                down_for = ?was.elapsed().unwrap_or_default(),
                "cluster state available again; sharing the rate budget and tokens with the other processes"
            );
        }
    }

    fn mark_unavailable(&self, error: &ClusterError) {
        self.metrics.errors.inc();
        let Ok(mut since) = self.unavailable_since.lock() else {
            return;
        };
        if since.is_none() {
            let now = SystemTime::now();
            *since = Some(now);
            if let Ok(mut next_probe) = self.next_probe.lock() {
                *next_probe = Some(StdInstant::now() + PROBE_EVERY);
            }
            self.went_away.notify_one();
            self.metrics.up.set(0);
            warn!(
                %error,
                since = %humantime::format_rfc3339_seconds(now),
                "cluster state unavailable; this process fetches its own tokens and uses its fallback share of the rate budget until Redis is back"
            );
        }
    }

    /// `None` while Redis answers; else since when it has not.
    pub fn unavailable_since(&self) -> Option<SystemTime> {
        self.unavailable_since.lock().ok().and_then(|s| *s)
    }
}

pub fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
