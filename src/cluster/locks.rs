//! Locks held by one process at a time (`SET NX PX` with the process name),
//! extended while their holder works and released only by it.

use std::time::Duration;

use super::{Cluster, ClusterError};

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
}
