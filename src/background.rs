//! One shape for the work that runs beside the request path: the token
//! refreshers, the config reloader, the cluster's heartbeat and token
//! announcements, the upstream pool's reaper and the shared budget's
//! pauses. Each is spawned here with the one shutdown token, tracked, and
//! awaited by [`Background::stop`] once the proxy has drained, so nothing
//! outlives the proxy and nothing is cut off mid-write. The request path
//! spawns no task of its own; it hands work to one of these.
//!
//! (Upstream connection drivers are not background work: each is the
//! connection itself, spawned when it opens and ended when it closes.)

use std::future::Future;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The background tasks of one running proxy (or one CLI command).
#[derive(Clone, Debug, Default)]
pub struct Background {
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl Background {
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs `work` until it ends. It gets the shutdown token and must end
    /// soon after the token fires.
    pub fn spawn<F>(&self, work: impl FnOnce(CancellationToken) -> F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tasks.spawn(work(self.shutdown.clone()));
    }

    /// Fired when the proxy stops.
    pub fn shutdown(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// Fires the shutdown token and waits until every task has ended.
    pub async fn stop(&self) {
        self.shutdown.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[tokio::test]
    async fn stop_waits_for_every_task_to_finish_its_last_step() {
        let background = Background::new();
        let finished = Arc::new(AtomicBool::new(false));
        let seen = finished.clone();
        background.spawn(|stop| async move {
            stop.cancelled().await;
            // The last step after the signal (a final write, say) still runs.
            tokio::task::yield_now().await;
            seen.store(true, Ordering::SeqCst);
        });
        background.stop().await;
        assert!(finished.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn a_task_that_ended_early_does_not_hold_up_stop() {
        let background = Background::new();
        background.spawn(|_| async {});
        tokio::time::timeout(std::time::Duration::from_secs(10), background.stop())
            .await
            .expect("stop returns");
    }
}
