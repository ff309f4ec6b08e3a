//! Outbound shaping to Coupa's rate limit (25 requests/s, burst 20 per
//! instance): requests over the rate wait for their slot instead of
//! provoking 429s from Coupa, each integration in its own queue, dealt
//! slots in turn by weight; past its queue an integration's request gets a
//! 429 from the proxy (never another integration's).
//!
//! - [`local`]: the budget of one process, a GCRA in memory (also each
//!   integration's own ceiling);
//! - [`shared`]: the instance's budget across processes, the same GCRA with
//!   its timestamp in Redis (`[cluster]`);
//! - [`fair`]: who gets the next slot — the per-integration queues and the
//!   dealer that serves them.

mod fair;
mod local;
mod shared;

use std::sync::Arc;
use std::time::Duration;

pub use fair::Lane;
pub use shared::SharedBudget;

use crate::background::Background;
use crate::config::{RateLimit, RatePolicy};
use crate::metrics::RateMetrics;
use fair::{Fair, Source};

/// The queue is full; retry after this long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueFull {
    pub retry_after: Duration,
}

/// The limiter a proxy uses: its own budget, or the instance-wide one
/// shared through the cluster state; fair among integrations either way.
#[derive(Clone)]
pub struct Limiter {
    fair: Arc<Fair>,
    shared: Option<SharedBudget>,
    /// The lane of requests of no integration.
    unnamed: Arc<Lane>,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter")
            .field("shared", &self.shared.is_some())
            .finish_non_exhaustive()
    }
}

/// The lane name of requests of no integration.
pub const UNNAMED: &str = "(none)";

impl Limiter {
    /// This process's own budget; its dealer runs in `background`.
    pub fn local(limit: &RateLimit, metrics: RateMetrics, background: &Background) -> Self {
        Self::with_source(limit, Source::Local, None, metrics, background)
    }

    /// The instance's budget in Redis; its dealer runs in `background`.
    pub fn shared(
        limit: &RateLimit,
        budget: SharedBudget,
        metrics: RateMetrics,
        background: &Background,
    ) -> Self {
        let source = Source::Shared(budget.clone());
        Self::with_source(limit, source, Some(budget), metrics, background)
    }

    fn with_source(
        limit: &RateLimit,
        source: Source,
        shared: Option<SharedBudget>,
        metrics: RateMetrics,
        background: &Background,
    ) -> Self {
        let fair = Fair::new(limit, source, metrics);
        let dealer = fair.clone();
        background.spawn(|stop| dealer.deal(stop));
        let unnamed = Arc::new(fair.lane(UNNAMED, &RatePolicy::default()));
        Self {
            fair,
            shared,
            unnamed,
        }
    }

    /// The lane of the integration `name`, with its policy as configured
    /// now (a reload keeps its queue and turn).
    pub fn lane(&self, name: &str, policy: &RatePolicy) -> Arc<Lane> {
        Arc::new(self.fair.lane(name, policy))
    }

    /// The lane of requests of no integration.
    pub fn unnamed(&self) -> &Arc<Lane> {
        &self.unnamed
    }

    /// Waits for this request's slot in `lane`, or says the lane is full.
    pub async fn acquire(&self, lane: &Lane) -> Result<(), QueueFull> {
        self.fair.acquire(lane).await
    }

    /// Coupa answered 429: with a shared budget, every process holds off.
    pub fn coupa_rate_limited(&self, retry_after: Option<&http::HeaderValue>) {
        if let Some(shared) = &self.shared {
            shared.pause(hold_off(retry_after));
        }
    }
}

/// How long Coupa's 429 asks to wait: its `Retry-After` in seconds (a
/// second without one), at most [`MAX_HOLD_OFF`].
pub fn hold_off(retry_after: Option<&http::HeaderValue>) -> Duration {
    retry_after
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_HOLD_OFF)
        .min(MAX_HOLD_OFF)
}

/// Coupa does not always send `Retry-After` with its 429.
const DEFAULT_HOLD_OFF: Duration = Duration::from_secs(1);
/// A hold-off longer than this is more likely a mistake than advice.
const MAX_HOLD_OFF: Duration = Duration::from_secs(60);
