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

    /// Coupa's 429s per minute over the last hour, oldest first.
    pub fn refused_per_minute(&self, now: Duration) -> [u64; MINUTES] {
        last_hour(&self.refused_per_minute, now)
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

/// How much of the instance's budget clients outside the proxy seem to
/// take, from the minutes of the last hour in which Coupa refused the
/// proxy (its budget was spent then): in such a minute the proxy's
/// accepted requests (its slots less Coupa's 429s) fell short of
/// `per_second` by what others used. `slots` and `refused` are per minute,
/// oldest first, summed over integrations; the current minute, still
/// running, is left out. `None` without such a minute.
pub fn outside_share(
    slots: &[u64; MINUTES],
    refused: &[u64; MINUTES],
    per_second: f64,
) -> Option<(usize, f64)> {
    let complete = MINUTES - 1;
    let shares: Vec<f64> = (0..complete)
        .filter(|&m| refused[m] > 0)
        .map(|m| {
            let accepted = slots[m].saturating_sub(refused[m]) as f64 / 60.0;
            (1.0 - accepted / per_second).clamp(0.0, 1.0)
        })
        .collect();
    if shares.is_empty() || per_second <= 0.0 {
        return None;
    }
    Some((
        shares.len(),
        shares.iter().sum::<f64>() / shares.len() as f64,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_outside_share_comes_from_the_minutes_coupa_refused() {
        let mut slots = [0u64; MINUTES];
        let mut refused = [0u64; MINUTES];
        // Two saturated minutes: the proxy got 15/s and 10/s of 25/s.
        slots[10] = 15 * 60 + 30;
        refused[10] = 30;
        slots[11] = 10 * 60 + 100;
        refused[11] = 100;
        // A quiet minute with no refusal says nothing of others.
        slots[12] = 60;
        // The running minute is left out.
        slots[MINUTES - 1] = 100;
        refused[MINUTES - 1] = 100;
        let (minutes, share) = outside_share(&slots, &refused, 25.0).unwrap();
        assert_eq!(minutes, 2);
        assert!((share - 0.5).abs() < 1e-9, "(0.4 + 0.6) / 2: {share}");
        assert_eq!(outside_share(&[0; MINUTES], &[0; MINUTES], 25.0), None);
    }

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
