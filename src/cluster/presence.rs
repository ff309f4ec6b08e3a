//! Which processes are alive (a sorted set by last heartbeat) and who holds
//! each fetch lock, for the status page; the heartbeat also probes for
//! Redis' return while it is away.

use std::time::SystemTime;

use tokio_util::sync::CancellationToken;

use super::{unix_ms, Cluster, HEARTBEAT, PROBE_EVERY, SEEN_WITHIN};

impl Cluster {
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
            "connection": self.primary_view(),
            "processes_seen": processes,
            "fetching_now": fetchers,
        })
    }
}

/// Says this process is alive every few seconds, and forgets processes
/// long gone. While Redis is away it is also the probe that notices its
/// return (every [`PROBE_EVERY`]), so the processes rejoin within seconds
/// even with no traffic.
pub(super) async fn heartbeat(cluster: std::sync::Weak<Cluster>, shutdown: CancellationToken) {
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
