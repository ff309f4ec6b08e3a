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
//! the budget (the caller's [`Admission::Away`]).
//!
//! Which of a process's waiting requests gets a slot is not decided here
//! but by [`super::fair`]: this is only the source of slots.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::Script;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

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

/// What the shared budget said to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// A slot, usable after this long (zero: at once).
    After(Duration),
    /// No slot within the longest wait asked for; the next is this far off.
    Full(Duration),
    /// Redis did not answer: shape alone (`cluster.fallback_share`).
    Away,
}

#[derive(Clone)]
pub struct SharedBudget {
    inner: Arc<Budget>,
}

struct Budget {
    cluster: Arc<Cluster>,
    interval_ms: f64,
    tolerance_ms: f64,
    admit: Script,
    /// The longest hold-off asked for since the last write, for the task
    /// that writes it.
    hold_off: Arc<HoldOff>,
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
                admit: Script::new(ADMIT),
                hold_off,
            }),
        }
    }

    /// The share of the budget one process uses while Redis is away.
    pub fn fallback_share(&self) -> f64 {
        self.inner.cluster.fallback_share
    }

    /// Takes the next slot in the instance's budget if it comes within
    /// `longest`: one atomic round trip to Redis.
    pub async fn admit(&self, longest: Duration) -> Admission {
        let budget = &*self.inner;
        let keys = &budget.cluster.keys;
        let mut invocation = budget.admit.prepare_invoke();
        invocation
            .key(keys.budget())
            .key(keys.pause())
            .arg(budget.interval_ms)
            .arg(budget.tolerance_ms)
            .arg(longest.as_secs_f64() * 1000.0);
        match budget.cluster.script::<(i64, u64)>(&invocation).await {
            Ok((1, wait_ms)) => {
                if wait_ms > 0 {
                    budget.cluster.metrics.budget_waits.inc();
                }
                Admission::After(Duration::from_millis(wait_ms))
            }
            Ok((_, wait_ms)) => Admission::Full(Duration::from_millis(wait_ms)),
            Err(_) => Admission::Away,
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
