//! Outbound shaping to Coupa's rate limit (25 requests/s, burst 20 per
//! instance): requests over the rate wait in a bounded queue instead of
//! provoking 429s from Coupa; past the queue they get a 429 from the proxy.
//!
//! - [`local`]: the budget of one process, a GCRA in memory;
//! - [`shared`]: the instance's budget across processes, the same GCRA with
//!   its timestamp in Redis (`[cluster]`).

mod local;
mod shared;

use std::time::Duration;

pub use local::RateLimiter;
pub use shared::SharedBudget;

/// The queue is full; retry after this long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueFull {
    pub retry_after: Duration,
}

/// The limiter a proxy uses: its own, or the instance-wide one shared
/// through the cluster state.
#[derive(Debug)]
pub enum Limiter {
    Local(RateLimiter),
    Shared(SharedBudget),
}

impl Limiter {
    pub async fn acquire(&self) -> Result<(), QueueFull> {
        match self {
            Limiter::Local(local) => local.acquire().await,
            Limiter::Shared(shared) => shared.acquire().await,
        }
    }

    /// Coupa answered 429: with a shared budget, every process holds off.
    pub fn coupa_rate_limited(&self, retry_after: Option<&http::HeaderValue>) {
        if let Limiter::Shared(shared) = self {
            let hold_off = retry_after
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs)
                .unwrap_or(DEFAULT_HOLD_OFF)
                .min(MAX_HOLD_OFF);
            shared.pause(hold_off);
        }
    }
}

/// Coupa does not always send `Retry-After` with its 429.
const DEFAULT_HOLD_OFF: Duration = Duration::from_secs(1);
/// A hold-off longer than this is more likely a mistake than advice.
const MAX_HOLD_OFF: Duration = Duration::from_secs(60);
