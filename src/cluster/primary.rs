//! Where the primary is: one fixed server (`redis://`, `rediss://`), or
//! whichever node the sentinels name (`redis+sentinel://`), followed
//! through failovers. With Sentinel the primary is looked up again when a
//! call fails in a way a failover explains (the connection lost, a
//! timeout, `READONLY` from a demoted primary), when a sentinel announces
//! `+switch-master`, and every few seconds; the connection to the old
//! primary is then replaced, not retried.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{ConnectionAddr, TlsMode};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{Cluster, ClusterError, CALL_TIMEOUT, CONNECT_TIMEOUT};
use crate::config;

/// How often the sentinels are asked while all is well.
const RECHECK: Duration = Duration::from_secs(5);
/// How often while no primary answers.
const RECHECK_AWAY: Duration = Duration::from_secs(1);
/// Failing calls ask for a look-up; at most one per this long.
const LOOKUP_SPACING: Duration = Duration::from_millis(250);

/// The current primary: its client (for pub/sub) and its multiplexed
/// connection (for everything else).
pub(super) struct Primary {
    pub client: redis::Client,
    pub connection: ConnectionManager,
    /// `host:port`, for logs and the status page.
    pub address: String,
}

pub(super) struct Link {
    current: ArcSwapOption<Primary>,
    sentinel: Option<Sentinels>,
    /// A call failed in a way a failover explains: look again. Shared with
    /// the follower, which must not hold the cluster while it waits.
    suspect: Arc<Notify>,
}

struct Sentinels {
    client: tokio::sync::Mutex<SentinelClient>,
    master: String,
    /// For errors: `master at host:port,host:port`.
    described: String,
}

fn connection_config() -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(CALL_TIMEOUT))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_secs(1))
}

impl Primary {
    fn open(client: redis::Client) -> Result<Self, ClusterError> {
        let address = client.get_connection_info().addr().to_string();
        let connection =
            ConnectionManager::new_lazy_with_config(client.clone(), connection_config())
                .map_err(|e| ClusterError::Redis(e.to_string()))?;
        Ok(Self {
            client,
            connection,
            address,
        })
    }
}

impl Link {
    /// One server, as `redis_url` names it.
    pub fn fixed(client: redis::Client) -> Result<Self, ClusterError> {
        Ok(Self {
            current: ArcSwapOption::from_pointee(Primary::open(client)?),
            sentinel: None,
            suspect: Arc::new(Notify::new()),
        })
    }

    /// The primary the sentinels name; none until [`Link::locate`] found it.
    pub fn sentinel(
        sentinel: &config::Sentinel,
        password: Option<&crate::secret::Secret>,
    ) -> Result<Self, ClusterError> {
        let nodes = sentinel.nodes.iter().map(|(host, port)| {
            if sentinel.tls {
                ConnectionAddr::TcpTls {
                    host: host.clone(),
                    port: *port,
                    insecure: false,
                    tls_params: None,
                }
            } else {
                ConnectionAddr::Tcp(host.clone(), *port)
            }
        });
        let url_error = |e: redis::RedisError| ClusterError::Url(e.to_string());
        let mut builder =
            SentinelClientBuilder::new(nodes, &sentinel.master, SentinelServerType::Master)
                .map_err(url_error)?
                .set_client_to_redis_db(sentinel.db);
        if sentinel.tls {
            builder = builder
                .set_client_to_redis_tls_mode(TlsMode::Secure)
                .set_client_to_sentinel_tls_mode(TlsMode::Secure);
        }
        if let Some(user) = &sentinel.username {
            builder = builder.set_client_to_redis_username(user);
        }
        if let Some(password) = password {
            builder = builder.set_client_to_redis_password(password.expose());
        }
        if let Some(user) = &sentinel.sentinel_username {
            builder = builder.set_client_to_sentinel_username(user);
        }
        if let Some(password) = &sentinel.sentinel_password {
            builder = builder.set_client_to_sentinel_password(password.expose());
        }
        let described = format!(
            "{} at {}",
            sentinel.master,
            sentinel
                .nodes
                .iter()
                .map(|(host, port)| format!("{host}:{port}"))
                .collect::<Vec<_>>()
                .join(",")
        );
        Ok(Self {
            current: ArcSwapOption::empty(),
            sentinel: Some(Sentinels {
                client: tokio::sync::Mutex::new(builder.build().map_err(url_error)?),
                master: sentinel.master.clone(),
                described,
            }),
            suspect: Arc::new(Notify::new()),
        })
    }

    pub fn primary(&self) -> Result<Arc<Primary>, ClusterError> {
        self.current.load_full().ok_or_else(|| {
            ClusterError::NoPrimary(
                self.sentinel
                    .as_ref()
                    .map(|s| s.described.clone())
                    .unwrap_or_default(),
            )
        })
    }

    /// The primary's address, if one is known.
    pub fn address(&self) -> Option<String> {
        self.current.load().as_ref().map(|p| p.address.clone())
    }

    /// Whether the primary can move (Sentinel).
    pub fn follows_failovers(&self) -> bool {
        self.sentinel.is_some()
    }

    /// A call failed: with Sentinel, the follower looks again.
    pub fn suspect(&self) {
        if self.sentinel.is_some() {
            self.suspect.notify_one();
        }
    }

    /// Asks the sentinels for the primary; `Some(address)` when it moved
    /// (or was found for the first time).
    pub async fn locate(&self) -> Result<Option<String>, ClusterError> {
        let Some(sentinels) = &self.sentinel else {
            return Ok(None);
        };
        let asked = async {
            let mut client = sentinels.client.lock().await;
            client.async_get_client().await
        };
        let client = match tokio::time::timeout(CONNECT_TIMEOUT * 2, asked).await {
            Ok(Ok(client)) => client,
            Ok(Err(error)) => return Err(ClusterError::Redis(error.to_string())),
            Err(_) => return Err(ClusterError::Timeout(CONNECT_TIMEOUT * 2)),
        };
        let address = client.get_connection_info().addr().to_string();
        if self.address().as_deref() == Some(address.as_str()) {
            return Ok(None);
        }
        self.current.store(Some(Arc::new(Primary::open(client)?)));
        Ok(Some(address))
    }
}

/// With Sentinel: finds the primary at start and follows it through
/// failovers, until `shutdown`.
pub(super) async fn follow(cluster: std::sync::Weak<Cluster>, shutdown: CancellationToken) {
    let mut reported_error = false;
    loop {
        let Some(strong) = cluster.upgrade() else {
            return;
        };
        let looked = Instant::now();
        match strong.locate().await {
            Ok(()) => reported_error = false,
            Err(error) if !reported_error => {
                reported_error = true;
                warn!(%error, "cannot ask the Redis sentinels for the primary; retrying every second");
            }
            Err(_) => {}
        }
        let every = if strong.unavailable_since().is_some() || strong.link.address().is_none() {
            RECHECK_AWAY
        } else {
            RECHECK
        };
        let suspect = strong.link.suspect.clone();
        drop(strong);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
            _ = suspect.notified() => {
                // Many failing calls ask at once: one look-up answers them.
                let spacing = LOOKUP_SPACING.saturating_sub(looked.elapsed());
                tokio::time::sleep(spacing).await;
            }
        }
    }
}

/// With Sentinel: listens for `+switch-master` on a sentinel, so a
/// failover is followed as soon as it is decided, not at the next check.
pub(super) async fn watch_sentinels(
    cluster: std::sync::Weak<Cluster>,
    shutdown: CancellationToken,
) {
    loop {
        let Some(strong) = cluster.upgrade() else {
            return;
        };
        let Some(sentinels) = &strong.link.sentinel else {
            return;
        };
        let master = sentinels.master.clone();
        let subscribed = async {
            let client = sentinels
                .client
                .lock()
                .await
                .async_get_sentinel_client()
                .await?;
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe("+switch-master").await?;
            redis::RedisResult::Ok(pubsub)
        };
        let subscribed = tokio::select! {
            _ = shutdown.cancelled() => return,
            result = tokio::time::timeout(CONNECT_TIMEOUT * 2, subscribed) => result,
        };
        drop(strong);
        if let Ok(Ok(mut pubsub)) = subscribed {
            let mut messages = pubsub.on_message();
            loop {
                let message = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    message = messages.next() => message,
                };
                let Some(message) = message else { break };
                // "<master name> <old ip> <old port> <new ip> <new port>"
                let payload: String = message.get_payload().unwrap_or_default();
                if payload.split(' ').next() == Some(master.as_str()) {
                    match cluster.upgrade() {
                        Some(cluster) => {
                            info!(switch = %payload, "a Redis sentinel announced a failover");
                            cluster.link.suspect();
                        }
                        None => return,
                    }
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(RECHECK_AWAY) => {}
        }
    }
}
