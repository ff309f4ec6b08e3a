//! The budget of one process: GCRA (the "virtual scheduling" form of a
//! token bucket). One timestamp, the theoretical arrival time, says when
//! the next request may go, so admission is O(1) with no background refill
//! task. The same shape serves an integration's own ceiling
//! (`max_per_second`, burst 1).

use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug, Clone)]
pub struct Gcra {
    /// Time between requests at the sustained rate.
    interval: Duration,
    /// How far ahead of schedule a request may run: the burst.
    tolerance: Duration,
    /// Theoretical arrival time of the next request at the sustained rate.
    tat: Instant,
}

impl Gcra {
    pub fn new(per_second: f64, burst: u32) -> Self {
        let interval = Duration::from_secs_f64(1.0 / per_second);
        Self {
            interval,
            tolerance: interval * burst.saturating_sub(1),
            tat: Instant::now(),
        }
    }

    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// When the next request may go: `now` or later.
    pub fn ready_at(&self, now: Instant) -> Instant {
        let tat = self.tat.max(now);
        tat.checked_sub(self.tolerance).unwrap_or(now).max(now)
    }

    /// Takes a slot if one is free at `now`.
    pub fn try_take(&mut self, now: Instant) -> bool {
        if self.ready_at(now) > now {
            return false;
        }
        self.tat = self.tat.max(now) + self.interval;
        true
    }

    /// Takes the next slot, whenever it is: the instant it may be used.
    pub fn reserve(&mut self, now: Instant) -> Instant {
        let at = self.ready_at(now);
        self.tat = self.tat.max(now) + self.interval;
        at
    }

    /// Gives back the slot taken last (a request that did not go after
    /// all), so it is not counted against the rate.
    pub fn give_back(&mut self) {
        self.tat = self.tat.checked_sub(self.interval).unwrap_or(self.tat);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn burst_then_the_rate() {
        let mut coupa = Gcra::new(25.0, 20);
        let start = Instant::now();
        for _ in 0..20 {
            assert!(coupa.try_take(start), "the burst must not wait");
        }
        assert!(!coupa.try_take(start));
        // Ten more, reserved, come 40 ms apart after the burst.
        let slots: Vec<_> = (0..10).map(|_| coupa.reserve(start)).collect();
        assert_eq!(slots[0], start + Duration::from_millis(40));
        assert_eq!(slots[9], start + Duration::from_millis(400));
        // Given back, the last slot is free again.
        coupa.give_back();
        assert_eq!(coupa.reserve(start), start + Duration::from_millis(400));
    }

    #[tokio::test(start_paused = true)]
    async fn a_ceiling_of_burst_one_spaces_every_request() {
        let mut ceiling = Gcra::new(10.0, 1);
        let start = Instant::now();
        assert!(ceiling.try_take(start));
        assert_eq!(ceiling.ready_at(start), start + Duration::from_millis(100));
        assert!(!ceiling.try_take(start + Duration::from_millis(99)));
        assert!(ceiling.try_take(start + Duration::from_millis(100)));
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_budget_does_not_bank_more_than_its_burst() {
        let mut coupa = Gcra::new(25.0, 20);
        let later = Instant::now() + Duration::from_secs(60);
        let taken = (0..100).take_while(|_| coupa.try_take(later)).count();
        assert_eq!(taken, 20);
    }
}
