//! One rate budget for the instance, across every process: the same GCRA
//! as the local limiter, its one timestamp kept in Redis and advanced by a
//! Lua script, so admission is one atomic round trip with no
//! read-modify-write race between processes. Redis' own clock is the only
//! clock, so processes on hosts with skewed clocks still agree.
//!
//! When Coupa answers 429 anyway, the hold-off (its `Retry-After`, or a
//! second) is written beside the timestamp and every process waits it out.
//! The request that saw the 429 only leaves the hold-off for a background
//! task ([`crate::background`]) that writes it, so its answer never waits
//! on Redis; 429s arriving while a write is under way fold into one.
//! While Redis is away each process shapes alone to `fallback_share` of
//! the budget.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::Script;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{QueueFull, RateLimiter};
use crate::background::Background;
use crate::cluster::Cluster;
use crate::config::RateLimit;

/// KEYS: timestamp, pause. ARGV: interval, tolerance, longest wait (ms).
/// Returns {1, wait_ms} when admitted (after waiting that long), {0,
/// wait_ms} when the wait would exceed the queue bound.
const ADMIT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local longest = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local allowed = tat - tolerance
local pause = tonumber(redis.call('GET', KEYS[2]))
if pause and pause > allowed then allowed = pause end
local wait = allowed - now
if wait < 0 then wait = 0 end
if wait > longest then return {0, math.ceil(wait)} end
local next_tat = tat + interval
if pause and pause + interval > next_tat then next_tat = pause + interval end
redis.call('SET', KEYS[1], tostring(next_tat), 'PX', math.ceil(next_tat - now + tolerance) + 1000)
return {1, math.ceil(wait)}
"#;

/// KEYS: pause. ARGV: hold-off (ms). Only ever extends the pause.
const PAUSE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local untl = now + tonumber(ARGV[1])
local current = tonumber(redis.call('GET', KEYS[1]))
if current and current >= untl then return 0 end
redis.call('SET', KEYS[1], tostring(untl), 'PX', tonumber(ARGV[1]) + 1000)
return 1
"#;

#[derive(Clone)]
pub struct SharedBudget {
    inner: Arc<Budget>,
}

struct Budget {
    cluster: Arc<Cluster>,
    interval_ms: f64,
    tolerance_ms: f64,
    longest_wait_ms: f64,
    admit: Script,
    /// The longest hold-off asked for since the last write, for the task
    /// that writes it.
    hold_off: Arc<HoldOff>,
    /// Used while Redis is away: `fallback_share` of the budget.
    alone: RateLimiter,
}

impl std::fmt::Debug for SharedBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedBudget")
            .field("interval_ms", &self.inner.interval_ms)
            .finish_non_exhaustive()
    }
}

impl SharedBudget {
    /// The budget, and its pause writer started in `background`.
    pub fn new(cluster: Arc<Cluster>, limit: RateLimit, background: &Background) -> Self {
        let interval_ms = 1000.0 / limit.per_second;
        let share = cluster.fallback_share;
        let alone = RateLimiter::new(RateLimit {
            per_second: limit.per_second * share,
            burst: ((f64::from(limit.burst) * share).round() as u32).max(1),
            max_queue: limit.max_queue,
        });
        let hold_off = Arc::new(HoldOff::default());
        let pauses = Pauses {
            cluster: cluster.clone(),
            script: Script::new(PAUSE),
            asked: hold_off.clone(),
        };
        background.spawn(|stop| pauses.run(stop));
        Self {
            inner: Arc::new(Budget {
                cluster,
                interval_ms,
                tolerance_ms: interval_ms * f64::from(limit.burst.saturating_sub(1)),
                // The local limiter's queue bound, as time: max_queue slots.
                longest_wait_ms: interval_ms * limit.max_queue as f64,
                admit: Script::new(ADMIT),
                hold_off,
                alone,
            }),
        }
    }

    /// Waits for this request's slot in the instance's budget, or says the
    /// queue is full; shapes alone while Redis is away.
    pub async fn acquire(&self) -> Result<(), QueueFull> {
        let budget = &*self.inner;
        let keys = &budget.cluster.keys;
        let mut invocation = budget.admit.prepare_invoke();
        invocation
            .key(keys.budget())
            .key(keys.pause())
            .arg(budget.interval_ms)
            .arg(budget.tolerance_ms)
            .arg(budget.longest_wait_ms);
        match budget.cluster.script::<(i64, u64)>(&invocation).await {
            Ok((1, 0)) => Ok(()),
            Ok((1, wait_ms)) => {
                budget.cluster.metrics.budget_waits.inc();
                tokio::time::sleep(Duration::from_millis(wait_ms)).await;
                Ok(())
            }
            Ok((_, wait_ms)) => Err(QueueFull {
                retry_after: Duration::from_millis(wait_ms).max(Duration::from_secs(1)),
            }),
            Err(_) => budget.alone.acquire().await,
        }
    }

    /// Coupa answered 429: every process holds off for `hold_off`. Returns
    /// at once; the background writer carries it to Redis.
    pub fn pause(&self, hold_off: Duration) {
        let budget = &*self.inner;
        budget.cluster.metrics.pauses.inc();
        if let Ok(mut asked) = budget.hold_off.longest.lock() {
            // A shorter hold-off is covered by a longer one waiting (the
            // script only ever extends the pause).
            *asked = hold_off.max(*asked);
        }
        budget.hold_off.asked.notify_one();
    }
}

/// The hold-off the request path asks for, not yet written.
#[derive(Default)]
struct HoldOff {
    longest: Mutex<Duration>,
    asked: Notify,
}

/// Writes the hold-offs the request path asks for.
struct Pauses {
    cluster: Arc<Cluster>,
    script: Script,
    asked: Arc<HoldOff>,
}

impl Pauses {
    async fn run(self, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = self.asked.asked.notified() => {}
            }
            let hold_off = match self.asked.longest.lock() {
                Ok(mut longest) => std::mem::take(&mut *longest),
                Err(_) => continue,
            };
            if hold_off.is_zero() {
                continue;
            }
            let mut invocation = self.script.prepare_invoke();
            invocation
                .key(self.cluster.keys.pause())
                .arg(hold_off.as_millis() as u64);
            let _: Result<i64, _> = self.cluster.script(&invocation).await;
        }
    }
}
