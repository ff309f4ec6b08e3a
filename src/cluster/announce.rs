//! Announcements over pub/sub: a process that stored a new token says so,
//! and the others' waiters wake at once instead of at their next poll.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{Cluster, ClusterError, CALL_TIMEOUT};

impl Cluster {
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
}

/// Subscribes to token announcements and wakes the local waiters;
/// resubscribes after Redis comes back (waking everyone, in case an
/// announcement was missed meanwhile).
pub(super) async fn listen_for_tokens(
    cluster: std::sync::Weak<Cluster>,
    shutdown: CancellationToken,
) {
    loop {
        let Some(strong) = cluster.upgrade() else {
            return;
        };
        let client = strong.primary().await.map(|primary| primary.client.clone());
        let channel = strong.keys.events();
        drop(strong);
        let subscribed = async {
            let mut pubsub = client?.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, ClusterError>(pubsub)
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
