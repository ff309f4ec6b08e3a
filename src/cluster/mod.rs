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
//!
//! The server is one fixed address, or the primary the sentinels name,
//! followed through failovers ([`primary`]).

mod announce;
mod keys;
mod locks;
mod presence;
mod primary;
pub mod seal;
mod sealed;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant as StdInstant, SystemTime, UNIX_EPOCH};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use redis::{FromRedisValue, IntoConnectionInfo};
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::background::Background;
use crate::config;
pub use keys::{short_digest, Keys};
use primary::Link;
use seal::Sealer;
pub use sealed::ReadError;

/// Longest any one Redis call may take before the caller works alone.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(1);
/// Opening a connection may take longer than one call (TLS, a loaded host).
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a write that must survive a failover waits for a replica.
const REPLICA_WAIT: Duration = Duration::from_millis(250);
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
    #[error("no Redis primary known yet: the sentinels ({0}) have not named one")]
    NoPrimary(String),
}

impl From<redis::RedisError> for ClusterError {
    fn from(error: redis::RedisError) -> Self {
        ClusterError::Redis(error.to_string())
    }
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
    /// With Sentinel: times the primary moved (a failover followed).
    pub primary_changes: Counter,
    /// 1 while this process holds a credential's fetch lock.
    pub fetching: prometheus_client::metrics::family::Family<[(&'static str, String); 1], Gauge>,
}

pub struct Cluster {
    /// The primary, fixed or followed through Sentinel.
    link: Link,
    /// With Sentinel: when the primary last moved, and to where.
    primary_moved: Mutex<Option<(SystemTime, String)>>,
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
        let _ = rustls::crypto::CryptoProvider::install_default(
            crate::tls::crypto_provider().as_ref().clone(),
        );
        let link = match &config.sentinel {
            Some(sentinel) => Link::sentinel(sentinel, config.password.as_ref())?,
            None => {
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
                Link::fixed(
                    redis::Client::open(info).map_err(|e| ClusterError::Url(e.to_string()))?,
                )?
            }
        };
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "host".to_owned());
        let process = format!(
            "{host}-{}-{:04x}",
            std::process::id(),
            rand::random::<u16>()
        );
        let cluster = Arc::new(Self {
            link,
            primary_moved: Mutex::new(None),
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
        if cluster.link.follows_failovers() {
            let weak = Arc::downgrade(&cluster);
            background.spawn(|stop| primary::follow(weak, stop));
            let weak = Arc::downgrade(&cluster);
            background.spawn(|stop| primary::watch_sentinels(weak, stop));
        }
        Ok(cluster)
    }

    /// Runs one Redis command, bounded in time, keeping the health current.
    pub async fn query<T: FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, ClusterError> {
        self.observe(async move {
            let mut connection = self.primary().await?.connection.clone();
            Ok(cmd.query_async(&mut connection).await?)
        })
        .await
    }

    /// Runs a Lua script (EVALSHA, loading it on first use).
    pub async fn script<T: FromRedisValue>(
        &self,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<T, ClusterError> {
        self.observe(async move {
            let mut connection = self.primary().await?.connection.clone();
            Ok(invocation.invoke_async(&mut connection).await?)
        })
        .await
    }

    async fn observe<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, ClusterError>>,
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
            Ok(Err(error)) => Err(error),
            Err(_) => Err(ClusterError::Timeout(CALL_TIMEOUT)),
        };
        if let Some(histogram) = &self.metrics.round_trip {
            histogram.observe(started.elapsed().as_secs_f64());
        }
        match &result {
            Ok(_) => self.mark_available(),
            Err(error) => {
                self.link.suspect();
                self.mark_unavailable(error);
            }
        }
        result
    }

    /// The primary; with Sentinel and none known yet (at start), asks the
    /// sentinels first, so the first calls do not fail for want of a
    /// look-up the follower has not made yet.
    async fn primary(&self) -> Result<Arc<primary::Primary>, ClusterError> {
        if let Ok(primary) = self.link.primary() {
            return Ok(primary);
        }
        if self.link.follows_failovers() {
            self.locate().await?;
        }
        self.link.primary()
    }

    /// Asks the sentinels where the primary is, and follows it there.
    async fn locate(&self) -> Result<(), ClusterError> {
        if let Some(address) = self.link.locate().await? {
            self.primary_moved(&address);
        }
        Ok(())
    }

    /// With Sentinel: waits (up to [`REPLICA_WAIT`]) until a replica has
    /// every write so far (`WAIT 1`), so a failover cannot lose them.
    /// Without Sentinel there is no replica to wait for.
    pub async fn wait_for_replica(&self) {
        if self.link.follows_failovers() {
            let _: Result<i64, _> = self
                .query(
                    redis::cmd("WAIT")
                        .arg(1)
                        .arg(REPLICA_WAIT.as_millis() as u64),
                )
                .await;
        }
    }

    /// The sentinels named a new primary (or the first one).
    fn primary_moved(&self, address: &str) {
        let Ok(mut moved) = self.primary_moved.lock() else {
            return;
        };
        if let Some((_, previous)) = moved.as_ref() {
            self.metrics.primary_changes.inc();
            warn!(
                from = %previous,
                to = %address,
                "the Redis primary moved (a Sentinel failover); following it"
            );
        } else {
            info!(primary = %address, "the Redis sentinels named the primary");
        }
        *moved = Some((SystemTime::now(), address.to_owned()));
        // The new primary may answer at once: let the next call try it.
        if let Ok(mut next_probe) = self.next_probe.lock() {
            if next_probe.is_some() {
                *next_probe = Some(StdInstant::now());
            }
        }
    }

    /// The primary in use and, with Sentinel, when it last moved.
    pub fn primary_view(&self) -> serde_json::Value {
        let moved = self.primary_moved.lock().ok().and_then(|m| m.clone());
        serde_json::json!({
            "primary": self.link.address(),
            "sentinel": self.link.follows_failovers(),
            "primary_since": moved.map(|(at, _)| humantime::format_rfc3339_seconds(at).to_string()),
            "failovers_followed": self.metrics.primary_changes.get(),
        })
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
