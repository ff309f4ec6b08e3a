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

pub mod seal;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant as StdInstant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{FromRedisValue, IntoConnectionInfo};
use sha2::{Digest, Sha256};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config;
use seal::Sealer;

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

/// The keys of one deployment in front of one instance.
#[derive(Debug, Clone)]
pub struct Keys {
    base: String,
}

impl Keys {
    pub fn new(prefix: &str, base_url: &str) -> Self {
        Self {
            base: format!("{prefix}:{}", short_digest(&[base_url])),
        }
    }
    pub fn budget(&self) -> String {
        format!("{}:budget", self.base)
    }
    pub fn pause(&self) -> String {
        format!("{}:pause", self.base)
    }
    pub fn token(&self, credential: &str) -> String {
        format!("{}:token:{credential}", self.base)
    }
    pub fn consent(&self, credential: &str) -> String {
        format!("{}:consent:{credential}", self.base)
    }
    pub fn lock(&self, credential: &str) -> String {
        format!("{}:lock:{credential}", self.base)
    }
    /// A local token, by the hex SHA-256 of the token.
    pub fn local_token(&self, digest: &str) -> String {
        format!("{}:local_token:{digest}", self.base)
    }
    pub fn procs(&self) -> String {
        format!("{}:procs", self.base)
    }
    pub fn events(&self) -> String {
        format!("{}:events", self.base)
    }
}

/// 16 hex digits of SHA-256 over `parts`: a stable, opaque key segment.
pub fn short_digest(parts: &[&str]) -> String {
    let mut hash = Sha256::new();
    for part in parts {
        hash.update(part.as_bytes());
        hash.update([0]);
    }
    crate::encode::hex(&hash.finalize()[..8])
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
        shutdown: CancellationToken,
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
        tokio::spawn(heartbeat(Arc::downgrade(&cluster), shutdown.clone()));
        tokio::spawn(listen_for_tokens(Arc::downgrade(&cluster), shutdown));
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

    /// Woken when another process announces a new token for `credential`.
    pub fn announcements(&self, credential: &str) -> Arc<Notify> {
        let Ok(mut all) = self.announced.lock() else {
            return Arc::new(Notify::new());
        };
        all.entry(credential.to_owned()).or_default().clone()
    }

    fn announce_locally(&self, credential: &str) {
        if let Ok(all) = self.announced.lock() {
            if let Some(notify) = all.get(credential) {
                notify.notify_waiters();
            }
        }
    }

    /// The processes heard from recently, and who holds each fetch lock,
    /// for the status page.
    pub async fn view(&self, credentials: &[(String, String)]) -> serde_json::Value {
        let now = unix_ms(SystemTime::now());
        let since = now.saturating_sub(SEEN_WITHIN.as_millis() as u64);
        let processes: Vec<String> = self
            .query(
                redis::cmd("ZRANGEBYSCORE")
                    .arg(self.keys.procs())
                    .arg(since)
                    .arg("+inf"),
            )
            .await
            .unwrap_or_default();
        let mut fetchers = serde_json::Map::new();
        for (name, digest) in credentials {
            let holder: Option<String> = self
                .query(redis::cmd("GET").arg(self.keys.lock(digest)))
                .await
                .unwrap_or_default();
            fetchers.insert(name.clone(), holder.into());
        }
        serde_json::json!({
            "redis": match self.unavailable_since() {
                None => "available".to_owned(),
                Some(since) => format!(
                    "cluster state unavailable since {}",
                    humantime::format_rfc3339_seconds(since)
                ),
            },
            "this_process": self.process,
            "processes_seen": processes,
            "fetching_now": fetchers,
        })
    }
}

/// Deletes or extends a lock only while this process holds it.
const RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;
const EXTEND: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"#;

impl Cluster {
    /// Takes the lock at `key` for `ttl` (`SET NX PX`, holding the process
    /// name); false when another process holds it.
    pub async fn try_lock(&self, key: &str, ttl: Duration) -> Result<bool, ClusterError> {
        let taken: Option<String> = self
            .query(
                redis::cmd("SET")
                    .arg(key)
                    .arg(&self.process)
                    .arg("NX")
                    .arg("PX")
                    .arg(ttl.as_millis() as u64),
            )
            .await?;
        Ok(taken.is_some())
    }

    /// Extends the lock at `key` while this process holds it.
    pub async fn extend_lock(&self, key: &str, ttl: Duration) {
        let script = redis::Script::new(EXTEND);
        let mut invocation = script.prepare_invoke();
        invocation
            .key(key)
            .arg(&self.process)
            .arg(ttl.as_millis() as u64);
        let _: Result<i64, _> = self.script(&invocation).await;
    }

    /// Lets go of the lock at `key` if this process holds it.
    pub async fn unlock(&self, key: &str) {
        let script = redis::Script::new(RELEASE);
        let mut invocation = script.prepare_invoke();
        invocation.key(key).arg(&self.process);
        let _: Result<i64, _> = self.script(&invocation).await;
    }

    /// Runs `work` while holding the lock at `key`, extending it every
    /// third of `ttl` so a slow token endpoint does not lose it.
    pub async fn while_locked<T>(
        &self,
        key: &str,
        ttl: Duration,
        work: impl std::future::Future<Output = T>,
    ) -> T {
        tokio::pin!(work);
        let mut extend = tokio::time::interval(ttl / 3);
        extend.tick().await;
        loop {
            tokio::select! {
                done = &mut work => return done,
                _ = extend.tick() => self.extend_lock(key, ttl).await,
            }
        }
    }

    /// Announces that the entry of `credential` changed.
    pub async fn announce(&self, credential: &str) -> Result<(), ClusterError> {
        self.query::<i64>(
            redis::cmd("PUBLISH")
                .arg(self.keys.events())
                .arg(credential),
        )
        .await
        .map(|_| ())
    }

    /// Reads and opens the sealed entry at `key`. `Ok(None)`: no entry;
    /// an entry that does not open is an error (never its content).
    pub async fn read_sealed(&self, key: &str) -> Result<Option<Vec<u8>>, ReadError> {
        let sealed: Option<String> = self.query(redis::cmd("GET").arg(key)).await?;
        match sealed {
            None => Ok(None),
            Some(sealed) => self
                .sealer
                .open(key, &sealed)
                .map(Some)
                .map_err(ReadError::Sealed),
        }
    }

    /// Seals `plain` and stores it at `key` (expiring after `ttl` if given).
    pub async fn write_sealed(
        &self,
        key: &str,
        plain: &[u8],
        ttl: Option<Duration>,
    ) -> Result<(), ClusterError> {
        let sealed = self
            .sealer
            .seal(key, plain)
            .map_err(|e| ClusterError::Redis(e.to_string()))?;
        let mut cmd = redis::cmd("SET");
        cmd.arg(key).arg(sealed);
        if let Some(ttl) = ttl {
            cmd.arg("PX").arg(ttl.as_millis().max(1) as u64);
        }
        self.query::<()>(&cmd).await
    }
}

/// Why a sealed entry could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Sealed(seal::SealError),
}

pub fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Says this process is alive every few seconds, and forgets processes
/// long gone. While Redis is away it is also the probe that notices its
/// return (every [`PROBE_EVERY`]), so the processes rejoin within seconds
/// even with no traffic.
async fn heartbeat(cluster: std::sync::Weak<Cluster>, shutdown: CancellationToken) {
    loop {
        let Some(cluster) = cluster.upgrade() else {
            return;
        };
        let now = unix_ms(SystemTime::now());
        let procs = cluster.keys.procs();
        let _: Result<(), _> = cluster
            .query(
                redis::cmd("ZADD")
                    .arg(&procs)
                    .arg(now)
                    .arg(&cluster.process),
            )
            .await;
        let _: Result<(), _> = cluster
            .query(
                redis::cmd("ZREMRANGEBYSCORE")
                    .arg(&procs)
                    .arg(0)
                    .arg(now.saturating_sub(10 * SEEN_WITHIN.as_millis() as u64)),
            )
            .await;
        let every = if cluster.unavailable_since().is_some() {
            PROBE_EVERY
        } else {
            HEARTBEAT
        };
        let went_away = cluster.went_away.clone();
        drop(cluster);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
            _ = went_away.notified() => tokio::time::sleep(PROBE_EVERY).await,
        }
    }
}

/// Subscribes to token announcements and wakes the local waiters;
/// resubscribes after Redis comes back (waking everyone, in case an
/// announcement was missed meanwhile).
async fn listen_for_tokens(cluster: std::sync::Weak<Cluster>, shutdown: CancellationToken) {
    loop {
        let Some(strong) = cluster.upgrade() else {
            return;
        };
        let client = strong.client.clone();
        let channel = strong.keys.events();
        drop(strong);
        let subscribed = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            redis::RedisResult::Ok(pubsub)
        };
        let pubsub = tokio::select! {
            _ = shutdown.cancelled() => return,
            result = tokio::time::timeout(CALL_TIMEOUT * 4, subscribed) => result,
        };
        if let Ok(Ok(mut pubsub)) = pubsub {
            if let Some(cluster) = cluster.upgrade() {
                let all: Vec<Arc<Notify>> = cluster
                    .announced
                    .lock()
                    .map(|a| a.values().cloned().collect())
                    .unwrap_or_default();
                for notify in all {
                    notify.notify_waiters();
                }
            }
            let mut messages = pubsub.on_message();
            loop {
                let message = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    message = messages.next() => message,
                };
                let Some(message) = message else { break };
                let Ok(credential) = message.get_payload::<String>() else {
                    continue;
                };
                match cluster.upgrade() {
                    Some(cluster) => cluster.announce_locally(&credential),
                    None => return,
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}
