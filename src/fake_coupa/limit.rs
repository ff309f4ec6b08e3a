//! Coupa's own rate limit, as the fake plays it for the load bench: a
//! token bucket per instance (25 requests/s, burst 20 as Coupa documents),
//! 429 beyond. Written here apart from the proxy's limiter, on purpose: a
//! fake must not share the code it checks.

use std::time::Instant;

#[derive(Debug)]
pub struct Bucket {
    per_second: f64,
    burst: f64,
    tokens: f64,
    refilled: Instant,
}

impl Bucket {
    pub fn new(per_second: f64, burst: u32) -> Self {
        Self {
            per_second,
            burst: f64::from(burst),
            tokens: f64::from(burst),
            refilled: Instant::now(),
        }
    }

    /// Takes a token if there is one at `now`.
    pub fn admit(&mut self, now: Instant) -> bool {
        let earned = now.saturating_duration_since(self.refilled).as_secs_f64() * self.per_second;
        self.tokens = (self.tokens + earned).min(self.burst);
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_burst_then_the_rate_then_429() {
        let start = Instant::now();
        let mut coupa = Bucket::new(25.0, 20);
        assert_eq!((0..30).filter(|_| coupa.admit(start)).count(), 20);
        // A second later: 25 more, not 45.
        let later = start + Duration::from_secs(1);
        assert_eq!((0..50).filter(|_| coupa.admit(later)).count(), 20);
    }
}
