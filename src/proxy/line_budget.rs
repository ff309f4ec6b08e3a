//! How many access lines of refused requests are written:
//! `telemetry.refused_lines_per_second`, a token bucket touched only by
//! refused requests.

use std::time::Instant;

/// A token bucket for refused requests' access lines: `rate` a second, a
/// burst of as many. Touched only by refused requests.
pub(super) struct LineBudget {
    rate: f64,
    /// Lines that may be written now, and when that was reckoned.
    left: std::sync::Mutex<(f64, Instant)>,
}

impl LineBudget {
    pub(super) fn new(rate: std::num::NonZeroU32) -> Self {
        let rate = f64::from(rate.get());
        Self {
            rate,
            left: std::sync::Mutex::new((rate, Instant::now())),
        }
    }

    pub(super) fn take(&self, now: Instant) -> bool {
        let mut left = self.left.lock().unwrap_or_else(|e| e.into_inner());
        let (tokens, at) = *left;
        let tokens =
            (tokens + now.saturating_duration_since(at).as_secs_f64() * self.rate).min(self.rate);
        if tokens >= 1.0 {
            *left = (tokens - 1.0, now);
            true
        } else {
            *left = (tokens, now);
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::LineBudget;

    #[test]
    fn refused_lines_past_the_rate_are_left_out_and_the_budget_refills() {
        let budget = LineBudget::new(std::num::NonZeroU32::new(5).unwrap());
        let start = Instant::now();
        let written = (0..20).filter(|_| budget.take(start)).count();
        assert_eq!(written, 5, "a burst of the rate");
        assert!(!budget.take(start + Duration::from_millis(100)));
        assert!(budget.take(start + Duration::from_millis(250)));
        let later = start + Duration::from_secs(60);
        assert_eq!((0..20).filter(|_| budget.take(later)).count(), 5);
    }
}
