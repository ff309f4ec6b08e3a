//! Where an integration's forwarded requests spent their time in the last
//! hour: waiting in the proxy (rate-limit queue, connection slot, token,
//! re-sends after Coupa's 429), at Coupa, and in the proxy's own work. A
//! histogram per minute of the last hour, lock-free: each bucket is a
//! last-hour ring ([`super::ring`]), so a request costs three atomic adds.
//! Quantiles are read as bucket bounds ("at most 64 ms"), which is what an
//! operator asking "queue or Coupa?" needs.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use super::ring::{add_to_minute, last_hour, MINUTES};

/// Upper bounds of the buckets in milliseconds; one more bucket holds
/// what is above the last.
const BOUNDS_MS: [f64; 17] = [
    0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0,
    16384.0, 32768.0,
];
const BUCKETS: usize = BOUNDS_MS.len() + 1;

/// The last hour's split of one integration's time.
pub struct TimeSpent {
    waiting: HourHistogram,
    coupa: HourHistogram,
    proxy: HourHistogram,
}

/// One request's split, as the access line has it.
pub struct Split {
    /// Every wait: queue, slot, token, re-sends.
    pub waiting: Duration,
    /// Coupa's time to its response headers, all attempts.
    pub coupa: Duration,
    /// The proxy's own time.
    pub proxy: Duration,
}

impl TimeSpent {
    pub fn new() -> Self {
        Self {
            waiting: HourHistogram::new(),
            coupa: HourHistogram::new(),
            proxy: HourHistogram::new(),
        }
    }

    pub fn observe(&self, split: &Split, now: Duration) {
        self.waiting.observe(split.waiting, now);
        self.coupa.observe(split.coupa, now);
        self.proxy.observe(split.proxy, now);
    }

    /// The status view: requests observed in the last hour and, per part,
    /// p50 and p99 as bucket bounds in ms (`null`: above the last bound).
    pub fn view(&self, now: Duration) -> serde_json::Value {
        let part = |histogram: &HourHistogram| {
            let counts = histogram.last_hour(now);
            serde_json::json!({
                "p50": quantile(&counts, 0.5),
                "p99": quantile(&counts, 0.99),
            })
        };
        serde_json::json!({
            "requests": self.coupa.last_hour(now).iter().sum::<u64>(),
            "waiting_ms": part(&self.waiting),
            "coupa_ms": part(&self.coupa),
            "proxy_ms": part(&self.proxy),
        })
    }
}

impl Default for TimeSpent {
    fn default() -> Self {
        Self::new()
    }
}

struct HourHistogram {
    buckets: [[AtomicU64; MINUTES]; BUCKETS],
}

impl HourHistogram {
    fn new() -> Self {
        Self {
            buckets: std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0))),
        }
    }

    fn observe(&self, spent: Duration, now: Duration) {
        let ms = spent.as_secs_f64() * 1000.0;
        let bucket = BOUNDS_MS
            .iter()
            .position(|bound| ms <= *bound)
            .unwrap_or(BOUNDS_MS.len());
        add_to_minute(&self.buckets[bucket], now, 1);
    }

    /// Requests per bucket over the last hour.
    fn last_hour(&self, now: Duration) -> [u64; BUCKETS] {
        let mut counts = [0; BUCKETS];
        for (count, ring) in counts.iter_mut().zip(&self.buckets) {
            *count = last_hour(ring, now).iter().sum();
        }
        counts
    }
}

/// The bound of the bucket the `q` quantile falls in; `None` when no
/// request was observed or it falls above the last bound.
fn quantile(counts: &[u64; BUCKETS], q: f64) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    // The rank of the quantile, counted from 1.
    let rank = ((total as f64) * q).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (bucket, count) in counts.iter().enumerate() {
        seen += count;
        if seen >= rank {
            return BOUNDS_MS.get(bucket).copied();
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn quantiles_are_the_bounds_of_their_buckets_over_the_last_hour() {
        let spent = TimeSpent::new();
        let now = Duration::from_secs(7_200);
        // 98 quick waits and two long ones; Coupa steady at 100 ms.
        for i in 0..100 {
            let waiting = if i < 98 { Duration::ZERO } else { ms(3_000) };
            let split = Split {
                waiting,
                coupa: ms(100),
                proxy: Duration::from_micros(300),
            };
            spent.observe(&split, now);
        }
        let view = spent.view(now);
        assert_eq!(view["requests"], 100);
        assert_eq!(view["waiting_ms"]["p50"], 0.5);
        assert_eq!(view["waiting_ms"]["p99"], 4096.0);
        assert_eq!(view["coupa_ms"]["p50"], 128.0);
        assert_eq!(view["coupa_ms"]["p99"], 128.0);
        assert_eq!(view["proxy_ms"]["p99"], 0.5);
        // An hour later they have left the window.
        let later = spent.view(now + Duration::from_secs(3_600));
        assert_eq!(later["requests"], 0);
        assert!(later["coupa_ms"]["p50"].is_null());
    }

    #[test]
    fn a_wait_above_the_last_bound_has_no_bound() {
        let counts = {
            let histogram = HourHistogram::new();
            histogram.observe(Duration::from_secs(60), Duration::ZERO);
            histogram.last_hour(Duration::ZERO)
        };
        assert_eq!(quantile(&counts, 0.5), None);
        assert_eq!(counts[BUCKETS - 1], 1);
    }
}
