//! The budget of one process: GCRA (the "virtual scheduling" form of a
//! token bucket). One timestamp, the theoretical arrival time, says when
//! the next request may go, so admission is O(1) with no background refill
//! task.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::QueueFull;
use crate::config::RateLimit;

#[derive(Debug)]
pub struct RateLimiter {
    /// Time between requests at the sustained rate.
    interval: Duration,
    /// How far ahead of schedule a request may run: the burst.
    tolerance: Duration,
    max_queue: usize,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// Theoretical arrival time of the next request at the sustained rate.
    tat: Instant,
    /// Requests admitted but waiting for their slot.
    queued: usize,
}

/// Holds a queue place while a request waits; gives it back when dropped,
/// including when the client goes away while waiting.
struct QueuePlace<'a>(&'a RateLimiter);

impl Drop for QueuePlace<'_> {
    fn drop(&mut self) {
        if let Ok(mut state) = self.0.state.lock() {
            state.queued = state.queued.saturating_sub(1);
        }
    }
}

impl RateLimiter {
    pub fn new(limit: RateLimit) -> Self {
        let interval = Duration::from_secs_f64(1.0 / limit.per_second);
        Self {
            interval,
            tolerance: interval * limit.burst.saturating_sub(1),
            max_queue: limit.max_queue,
            state: Mutex::new(State {
                tat: Instant::now(),
                queued: 0,
            }),
        }
    }

    /// Waits for this request's slot, or says the queue is full.
    pub async fn acquire(&self) -> Result<(), QueueFull> {
        let now = Instant::now();
        let slot = {
            let Ok(mut state) = self.state.lock() else {
                return Ok(());
            };
            let tat = state.tat.max(now);
            let allowed_at = tat.checked_sub(self.tolerance).unwrap_or(now);
            if allowed_at <= now {
                state.tat = tat + self.interval;
                return Ok(());
            }
            if state.queued >= self.max_queue {
                let wait = allowed_at - now;
                return Err(QueueFull {
                    retry_after: wait.max(Duration::from_secs(1)),
                });
            }
            state.tat = tat + self.interval;
            state.queued += 1;
            allowed_at
        };
        let _place = QueuePlace(self);
        tokio::time::sleep_until(slot).await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn coupa() -> RateLimiter {
        RateLimiter::new(RateLimit {
            per_second: 25.0,
            burst: 20,
            max_queue: 10,
        })
    }

    #[tokio::test(start_paused = true)]
    async fn burst_passes_then_requests_queue_at_the_rate_then_overflow() {
        let limiter = std::sync::Arc::new(coupa());
        let start = Instant::now();
        for _ in 0..20 {
            limiter.acquire().await.unwrap();
        }
        assert_eq!(Instant::now(), start, "the burst must not wait");

        // The next ten queue; the eleventh finds the queue full.
        let mut waiting = Vec::new();
        for _ in 0..10 {
            let l = limiter.clone();
            waiting.push(tokio::spawn(async move { l.acquire().await }));
        }
        tokio::task::yield_now().await;
        let full = limiter.acquire().await.unwrap_err();
        assert!(full.retry_after >= Duration::from_secs(1));

        for w in waiting {
            w.await.unwrap().unwrap();
        }
        // Ten more requests at 25/s take 400 ms.
        let waited = Instant::now() - start;
        assert!(
            waited >= Duration::from_millis(399) && waited <= Duration::from_millis(401),
            "{waited:?}"
        );
        // The queue emptied: a request is admitted again.
        limiter.acquire().await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_gives_up_frees_its_queue_place() {
        let limiter = RateLimiter::new(RateLimit {
            per_second: 1.0,
            burst: 1,
            max_queue: 1,
        });
        limiter.acquire().await.unwrap();
        {
            let waiting = limiter.acquire();
            tokio::pin!(waiting);
            assert!(futures_util::poll!(waiting.as_mut()).is_pending());
            // Dropped here, like a request whose client disconnected.
        }
        let again = limiter.acquire();
        tokio::pin!(again);
        assert!(futures_util::poll!(again.as_mut()).is_pending());
    }
}
