//! Each integration's share of the way to Coupa (`[[integration]]
//! max_concurrent`): a burst from one integration waits behind its own
//! cap, so the other integrations still find free connections.
//!
//! A permit is taken (the `take_share` phase, [`super::slot`]) after the
//! request body has been read and before a connection is looked for, and
//! travels with Coupa's answer until its body has been read to the end, as
//! the connection does.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// One integration's cap on requests at Coupa at once.
pub struct Share {
    permits: Arc<Semaphore>,
    cap: usize,
}

/// The integration stayed at its cap for the whole wait.
#[derive(Debug, Clone, Copy)]
pub struct AtCap {
    pub cap: usize,
    pub waited: Duration,
}

impl Share {
    pub fn new(cap: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(cap.max(1))),
            cap: cap.max(1),
        }
    }

    pub fn cap(&self) -> usize {
        self.cap
    }

    /// A place under the cap, waiting up to `wait` for one.
    pub async fn acquire(&self, wait: Duration) -> Result<OwnedSemaphorePermit, AtCap> {
        if let Ok(permit) = self.permits.clone().try_acquire_owned() {
            return Ok(permit);
        }
        match tokio::time::timeout(wait, self.permits.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            // The semaphore is never closed; a timeout is the only way out.
            _ => Err(AtCap {
                cap: self.cap,
                waited: wait,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn past_its_cap_an_integration_waits_then_gives_up() {
        let share = Share::new(2);
        let first = share.acquire(Duration::from_secs(5)).await.unwrap();
        let _second = share.acquire(Duration::from_secs(5)).await.unwrap();
        let started = tokio::time::Instant::now();
        let refused = share.acquire(Duration::from_secs(5)).await.unwrap_err();
        assert_eq!(refused.cap, 2);
        assert_eq!(started.elapsed(), Duration::from_secs(5));

        // A place given back goes to the next request.
        drop(first);
        assert!(share.acquire(Duration::from_secs(5)).await.is_ok());
    }
}
