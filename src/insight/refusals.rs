//! Coupa's own 429s per integration, and the re-sends that absorbed them
//! ([`crate::proxy`]'s `resend`): totals for `/metrics`, the last hour for
//! the status page.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::ring::{add_to_minute, count_minute, last_hour, MINUTES};

#[derive(Debug)]
pub struct CoupaRefusals {
    refused: AtomicU64,
    resent: AtomicU64,
    waited_ms: AtomicU64,
    refused_per_minute: [AtomicU64; MINUTES],
    resent_per_minute: [AtomicU64; MINUTES],
    waited_ms_per_minute: [AtomicU64; MINUTES],
}

impl Default for CoupaRefusals {
    fn default() -> Self {
        let ring = || std::array::from_fn(|_| AtomicU64::new(0));
        Self {
            refused: AtomicU64::new(0),
            resent: AtomicU64::new(0),
            waited_ms: AtomicU64::new(0),
            refused_per_minute: ring(),
            resent_per_minute: ring(),
            waited_ms_per_minute: ring(),
        }
    }
}

/// The three counts, as totals or over the last hour.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RefusalCounts {
    /// Coupa's 429 answers.
    pub refused: u64,
    /// Requests sent again after one.
    pub resent: u64,
    /// What those re-sends waited, in all.
    pub waited: Duration,
}

impl CoupaRefusals {
    /// Coupa answered 429 at `now` (on the view's clock).
    pub fn refused(&self, now: Duration) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        count_minute(&self.refused_per_minute, now);
    }

    /// A request was sent again after waiting `waited`.
    pub fn resent(&self, now: Duration, waited: Duration) {
        let millis = u64::try_from(waited.as_millis()).unwrap_or(u64::MAX);
        self.resent.fetch_add(1, Ordering::Relaxed);
        self.waited_ms.fetch_add(millis, Ordering::Relaxed);
        count_minute(&self.resent_per_minute, now);
        add_to_minute(&self.waited_ms_per_minute, now, millis);
    }

    pub fn totals(&self) -> RefusalCounts {
        RefusalCounts {
            refused: self.refused.load(Ordering::Relaxed),
            resent: self.resent.load(Ordering::Relaxed),
            waited: Duration::from_millis(self.waited_ms.load(Ordering::Relaxed)),
        }
    }

    pub fn last_hour(&self, now: Duration) -> RefusalCounts {
        let sum = |ring| last_hour(ring, now).iter().sum::<u64>();
        RefusalCounts {
            refused: sum(&self.refused_per_minute),
            resent: sum(&self.resent_per_minute),
            waited: Duration::from_millis(sum(&self.waited_ms_per_minute)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_hour_forgets_what_is_older_and_totals_do_not() {
        let refusals = CoupaRefusals::default();
        let start = Duration::from_secs(600);
        refusals.refused(start);
        refusals.resent(start, Duration::from_millis(1500));
        refusals.refused(start + Duration::from_secs(30));
        let hour = refusals.last_hour(start + Duration::from_secs(60));
        assert_eq!(
            hour,
            RefusalCounts {
                refused: 2,
                resent: 1,
                waited: Duration::from_millis(1500)
            }
        );
        let later = refusals.last_hour(start + Duration::from_secs(2 * 3600));
        assert_eq!(later, RefusalCounts::default());
        assert_eq!(refusals.totals().refused, 2);
    }
}
