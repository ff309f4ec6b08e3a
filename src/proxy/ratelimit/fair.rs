//! Fair shares of one budget. Each integration (and the `(none)` caller)
//! waits in a lane of its own; a dealer task hands each free slot to the
//! waiting lane whose turn it is — stride scheduling: a lane's pass grows
//! by `1 / weight` per slot and the lowest pass goes next — so a flood
//! fills only its own lane and everyone else keeps their turn.
//!
//! A lane that starts waiting joins at the pass of the lane served last:
//! idleness banks nothing, and costs nothing. While no one waits, a
//! request takes a free slot itself without a hand-off (the common case).
//! A lane's `max_per_second` is a ceiling of its own, checked before a
//! slot is spent on it.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::local::Gcra;
use super::shared::{Admission, SharedBudget};
use super::QueueFull;
use crate::config::{RateLimit, RatePolicy};
use crate::metrics::{LaneMetrics, RateMetrics};

/// How far ahead the dealer reserves a shared slot: past any hold-off
/// after Coupa's 429 ([`super::MAX_HOLD_OFF`]).
const LONGEST_RESERVATION: Duration = Duration::from_secs(90);
/// How long the dealer waits before asking again for a budget that had
/// no slot within [`LONGEST_RESERVATION`].
const FULL_RETRY: Duration = Duration::from_secs(1);

/// Where slots come from.
pub enum Source {
    /// This process's own budget (the GCRA in [`Queues::budget`]).
    Local,
    /// The instance's budget in Redis; the GCRA is the fallback share.
    Shared(SharedBudget),
}

pub struct Fair {
    state: Mutex<Queues>,
    /// A request started waiting: the dealer looks again.
    arrived: Notify,
    source: Source,
    /// `coupa.rate_limit.max_queue`: a lane's bound unless it has its own.
    default_max_queue: usize,
    metrics: RateMetrics,
}

struct Queues {
    /// The local budget, or with [`Source::Shared`] the share used while
    /// Redis is away.
    budget: Gcra,
    lanes: Vec<LaneState>,
    /// Requests waiting, over all lanes.
    waiting: usize,
    /// The pass of the lane served last.
    virtual_time: f64,
    /// The dealer stopped (shutdown): requests go without waiting.
    closed: bool,
}

struct LaneState {
    name: Arc<str>,
    weight: u32,
    max_queue: Option<usize>,
    ceiling: Option<Gcra>,
    pass: f64,
    /// Waiting requests in arrival order; a sender whose request gave up
    /// stays until it comes to the front (its count is gone already).
    waiters: VecDeque<oneshot::Sender<()>>,
    /// Requests of this lane still waiting.
    queued: usize,
    metrics: LaneMetrics,
}

/// What a request found on arrival.
enum AtOnce {
    /// A free slot, taken.
    Taken,
    /// None free: wait in its lane.
    Wait,
    /// None for longer than its lane may wait.
    Refused(QueueFull),
}

/// One integration's place in the budget, as the request path holds it.
#[derive(Debug)]
pub struct Lane {
    id: usize,
    metrics: LaneMetrics,
}

impl LaneState {
    fn ceiling_ready_at(&self, now: Instant) -> Instant {
        self.ceiling.as_ref().map_or(now, |c| c.ready_at(now))
    }

    fn set_policy(&mut self, policy: &RatePolicy) {
        self.weight = policy.weight.max(1);
        self.max_queue = policy.max_queue;
        let same = match (&self.ceiling, policy.max_per_second) {
            (Some(c), Some(rate)) => c.interval() == Duration::from_secs_f64(1.0 / rate),
            (None, None) => true,
            _ => false,
        };
        if !same {
            self.ceiling = policy.max_per_second.map(|rate| Gcra::new(rate, 1));
        }
    }
}

impl Fair {
    pub fn new(limit: &RateLimit, source: Source, metrics: RateMetrics) -> Arc<Self> {
        let budget = match &source {
            Source::Local => Gcra::new(limit.per_second, limit.burst),
            Source::Shared(shared) => {
                let share = shared.fallback_share();
                Gcra::new(
                    limit.per_second * share,
                    ((f64::from(limit.burst) * share).round() as u32).max(1),
                )
            }
        };
        Arc::new(Self {
            state: Mutex::new(Queues {
                budget,
                lanes: Vec::new(),
                waiting: 0,
                virtual_time: 0.0,
                closed: false,
            }),
            arrived: Notify::new(),
            source,
            default_max_queue: limit.max_queue,
            metrics,
        })
    }

    fn queues(&self) -> MutexGuard<'_, Queues> {
        // The state stays consistent at every await-free step, so a panic
        // elsewhere while holding the lock leaves nothing half-done.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The lane named `name`, made on first use; its policy is updated to
    /// `policy` (a reload), its queue and turn kept.
    pub fn lane(&self, name: &str, policy: &RatePolicy) -> Lane {
        let mut queues = self.queues();
        let id = match queues.lanes.iter().position(|l| &*l.name == name) {
            Some(id) => id,
            None => {
                queues.lanes.push(LaneState {
                    name: Arc::from(name),
                    weight: 1,
                    max_queue: None,
                    ceiling: None,
                    pass: 0.0,
                    waiters: VecDeque::new(),
                    queued: 0,
                    metrics: self.metrics.lane(name),
                });
                queues.lanes.len() - 1
            }
        };
        let lane = &mut queues.lanes[id];
        lane.set_policy(policy);
        Lane {
            id,
            metrics: lane.metrics.clone(),
        }
    }

    /// Waits for this request's slot, or says its lane is full.
    pub async fn acquire(&self, lane: &Lane) -> Result<(), QueueFull> {
        let refused = match self.at_once(lane.id).await {
            AtOnce::Taken => {
                lane.metrics.slots.inc();
                return Ok(());
            }
            AtOnce::Refused(full) => Err(full),
            AtOnce::Wait => self.enqueue(lane.id),
        };
        let receiver = match refused {
            Ok(receiver) => receiver,
            Err(full) => {
                lane.metrics.refused.inc();
                return Err(full);
            }
        };
        let started = Instant::now();
        let mut waiting = Waiting {
            fair: self,
            lane: lane.id,
            receiver,
            granted: false,
        };
        // An error means the dealer stopped (shutdown): the request goes.
        let _ = (&mut waiting.receiver).await;
        waiting.granted = true;
        lane.metrics.slots.inc();
        lane.metrics.waits.observe(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// A free slot taken without waiting, if no one waits before us.
    async fn at_once(&self, lane: usize) -> AtOnce {
        let now = Instant::now();
        let longest = {
            let mut queues = self.queues();
            if queues.closed {
                return AtOnce::Taken;
            }
            if queues.waiting > 0 {
                return AtOnce::Wait;
            }
            let queues = &mut *queues;
            let state = &mut queues.lanes[lane];
            if let Some(ceiling) = &mut state.ceiling {
                if !ceiling.try_take(now) {
                    return AtOnce::Wait;
                }
            }
            if let Source::Local = self.source {
                if queues.budget.try_take(now) {
                    return AtOnce::Taken;
                }
                give_back_ceiling(state);
                return AtOnce::Wait;
            }
            // The lane's bound as time, as the shared budget counts it.
            let bound = state.max_queue.unwrap_or(self.default_max_queue);
            queues.budget.interval() * u32::try_from(bound).unwrap_or(u32::MAX)
        };
        let Source::Shared(shared) = &self.source else {
            return AtOnce::Wait;
        };
        let outcome = match shared.admit(Duration::ZERO).await {
            Admission::After(wait) => {
                tokio::time::sleep(wait).await;
                return AtOnce::Taken;
            }
            // Every process holds off (Coupa's 429) or the budget is
            // booked past this lane's bound: refused now, as a full queue.
            Admission::Full(next) if next > longest => AtOnce::Refused(QueueFull {
                retry_after: next.max(Duration::from_secs(1)),
            }),
            Admission::Full(_) => AtOnce::Wait,
            Admission::Away => {
                if self.queues().budget.try_take(Instant::now()) {
                    return AtOnce::Taken;
                }
                AtOnce::Wait
            }
        };
        give_back_ceiling(&mut self.queues().lanes[lane]);
        outcome
    }

    fn enqueue(&self, lane: usize) -> Result<oneshot::Receiver<()>, QueueFull> {
        let mut queues = self.queues();
        let queues = &mut *queues;
        let active_weight: u32 = queues
            .lanes
            .iter()
            .filter(|l| l.queued > 0)
            .map(|l| l.weight)
            .sum();
        let interval = queues.budget.interval();
        let state = &mut queues.lanes[lane];
        if state.queued >= state.max_queue.unwrap_or(self.default_max_queue) {
            return Err(QueueFull {
                retry_after: drain_time(state, active_weight, interval),
            });
        }
        if state.queued == 0 {
            state.pass = state.pass.max(queues.virtual_time);
        }
        let (sender, receiver) = oneshot::channel();
        state.waiters.push_back(sender);
        state.queued += 1;
        state.metrics.depth.inc();
        queues.waiting += 1;
        self.arrived.notify_one();
        Ok(receiver)
    }

    /// The dealer: runs until `stop`, then lets every waiting request go.
    pub async fn deal(self: Arc<Self>, stop: CancellationToken) {
        loop {
            let dealt = tokio::select! {
                _ = stop.cancelled() => break,
                dealt = self.deal_one() => dealt,
            };
            if !dealt {
                // Everyone waiting gave up while the slot came: give it
                // back, as far as this process can.
                if let Source::Local = self.source {
                    self.queues().budget.give_back();
                }
            }
        }
        let mut queues = self.queues();
        queues.closed = true;
        for lane in &mut queues.lanes {
            for sender in lane.waiters.drain(..) {
                let _ = sender.send(());
            }
            lane.queued = 0;
            lane.metrics.depth.set(0);
        }
        queues.waiting = 0;
    }

    /// Waits for a waiting request that may go, then a slot, and hands it
    /// to the lane whose turn it is; false if no one was left to take it.
    async fn deal_one(&self) -> bool {
        loop {
            let eligible_at = self.queues().eligible_at(Instant::now());
            match eligible_at {
                Some(at) if at <= Instant::now() => break,
                Some(at) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(at) => {}
                        _ = self.arrived.notified() => {}
                    }
                }
                None => self.arrived.notified().await,
            }
        }
        let slot = self.reserve().await;
        tokio::time::sleep_until(slot).await;
        self.queues().hand_out(Instant::now())
    }

    /// The next slot of the budget: the instant it may be used.
    async fn reserve(&self) -> Instant {
        let Source::Shared(shared) = &self.source else {
            return self.queues().budget.reserve(Instant::now());
        };
        loop {
            let asked = Instant::now();
            match shared.admit(LONGEST_RESERVATION).await {
                Admission::After(wait) => return asked + wait,
                Admission::Full(next) => tokio::time::sleep(next.min(FULL_RETRY)).await,
                Admission::Away => return self.queues().budget.reserve(Instant::now()),
            }
        }
    }

    /// Requests waiting in `lane` now (tests).
    #[cfg(test)]
    fn queued(&self, lane: &Lane) -> usize {
        self.queues().lanes[lane.id].queued
    }
}

impl Queues {
    /// When the first waiting request may go by its lane's ceiling; `None`
    /// if no one waits.
    fn eligible_at(&self, now: Instant) -> Option<Instant> {
        self.lanes
            .iter()
            .filter(|l| l.queued > 0)
            .map(|l| l.ceiling_ready_at(now))
            .min()
    }

    /// Gives a slot to the eligible lane with the lowest pass.
    fn hand_out(&mut self, now: Instant) -> bool {
        loop {
            let Some(id) = self
                .lanes
                .iter()
                .enumerate()
                .filter(|(_, l)| l.queued > 0 && l.ceiling_ready_at(now) <= now)
                .min_by(|(_, a), (_, b)| a.pass.total_cmp(&b.pass))
                .map(|(id, _)| id)
            else {
                return false;
            };
            let lane = &mut self.lanes[id];
            while let Some(sender) = lane.waiters.pop_front() {
                // A closed sender's request gave up and took its count.
                if sender.send(()).is_ok() {
                    lane.queued -= 1;
                    lane.metrics.depth.dec();
                    self.waiting -= 1;
                    self.virtual_time = lane.pass;
                    lane.pass += 1.0 / f64::from(lane.weight);
                    if let Some(ceiling) = &mut lane.ceiling {
                        ceiling.reserve(now);
                    }
                    return true;
                }
            }
            // Unreachable while the counts hold; if not, mend them rather
            // than deal to no one forever.
            self.waiting -= lane.queued;
            lane.queued = 0;
            lane.metrics.depth.set(0);
        }
    }
}

fn give_back_ceiling(state: &mut LaneState) {
    if let Some(ceiling) = &mut state.ceiling {
        ceiling.give_back();
    }
}

/// A full lane's `Retry-After`: about when its queue will have drained at
/// its share of the budget (or its ceiling), at least a second.
fn drain_time(state: &LaneState, active_weight: u32, interval: Duration) -> Duration {
    let share = f64::from(active_weight.max(state.weight)) / f64::from(state.weight);
    let mut per_request = interval.mul_f64(share);
    if let Some(ceiling) = &state.ceiling {
        per_request = per_request.max(ceiling.interval());
    }
    let drain = per_request * u32::try_from(state.queued).unwrap_or(u32::MAX);
    drain.max(Duration::from_secs(1))
}

/// A request's place in its lane; dropped before its slot came (the
/// client went away), it gives the place back.
struct Waiting<'a> {
    fair: &'a Fair,
    lane: usize,
    receiver: oneshot::Receiver<()>,
    granted: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.granted {
            return;
        }
        let mut queues = self.fair.queues();
        // Closed under the lock: the dealer either handed the slot over
        // already (counted there) or never will.
        self.receiver.close();
        if self.receiver.try_recv().is_ok() {
            return;
        }
        let lane = &mut queues.lanes[self.lane];
        lane.queued = lane.queued.saturating_sub(1);
        lane.metrics.depth.dec();
        if lane.queued == 0 {
            lane.waiters.clear();
        }
        queues.waiting = queues.waiting.saturating_sub(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(per_second: f64, burst: u32, max_queue: usize) -> (Arc<Fair>, CancellationToken) {
        let limit = RateLimit {
            per_second,
            burst,
            max_queue,
        };
        let fair = Fair::new(&limit, Source::Local, RateMetrics::new());
        let stop = CancellationToken::new();
        tokio::spawn(fair.clone().deal(stop.clone()));
        (fair, stop)
    }

    fn policy(weight: u32, max_queue: Option<usize>, max_per_second: Option<f64>) -> RatePolicy {
        RatePolicy {
            weight,
            max_queue,
            max_per_second,
        }
    }

    /// `count` requests of `lane` at once; the instants their slots came.
    fn flood(
        fair: &Arc<Fair>,
        lane: &Arc<Lane>,
        count: usize,
    ) -> tokio::task::JoinHandle<Vec<Instant>> {
        let (fair, lane) = (fair.clone(), lane.clone());
        tokio::spawn(async move {
            let waits = (0..count).map(|_| {
                let (fair, lane) = (fair.clone(), lane.clone());
                tokio::spawn(async move { fair.acquire(&lane).await.map(|()| Instant::now()) })
            });
            let mut granted = Vec::new();
            for wait in waits.collect::<Vec<_>>() {
                if let Ok(at) = wait.await.unwrap() {
                    granted.push(at);
                }
            }
            granted
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_steady_integration_keeps_its_turn_while_another_floods() {
        let (fair, _stop) = budget(10.0, 1, 1000);
        let batch = Arc::new(fair.lane("batch", &policy(1, None, None)));
        let steady = Arc::new(fair.lane("approvals", &policy(1, None, None)));
        let start = Instant::now();
        let flooding = flood(&fair, &batch, 500);
        tokio::task::yield_now().await;

        // The steady one calls twice a second for 20 s.
        let mut waits = Vec::new();
        let mut next = start;
        for _ in 0..40 {
            next += Duration::from_millis(500);
            tokio::time::sleep_until(next).await;
            let asked = Instant::now();
            fair.acquire(&steady)
                .await
                .expect("the steady integration never gets a 429");
            waits.push(asked.elapsed());
        }
        let worst = waits.iter().max().unwrap();
        assert!(
            *worst <= Duration::from_millis(200),
            "the steady one waited {worst:?} (2 slot intervals: 200 ms)"
        );
        let end = Instant::now();
        assert!(fair.queued(&batch) > 0, "the flood still waits");
        // Meanwhile the flood used the rest: every slot in [start, end]
        // went to one of them.
        let batch_done = flooding;
        let slots = (end - start).as_secs_f64() * 10.0;
        tokio::time::sleep(Duration::from_secs(60)).await;
        let granted = batch_done.await.unwrap();
        let in_window = granted.iter().filter(|at| **at <= end).count() + waits.len();
        assert!(
            in_window as f64 >= 0.95 * slots,
            "{in_window} of {slots} slots used while the flood waited"
        );
        assert_eq!(granted.len(), 500, "the whole flood got through");
    }

    #[tokio::test(start_paused = true)]
    async fn weights_share_the_slots() {
        let (fair, _stop) = budget(10.0, 1, 1000);
        let heavy = Arc::new(fair.lane("heavy", &policy(3, None, None)));
        let light = Arc::new(fair.lane("light", &policy(1, None, None)));
        let start = Instant::now();
        let heavy_flood = flood(&fair, &heavy, 400);
        let light_flood = flood(&fair, &light, 400);
        let window_end = start + Duration::from_secs(20);
        tokio::time::sleep(Duration::from_secs(120)).await;
        let count = |granted: Vec<Instant>| granted.iter().filter(|at| **at <= window_end).count();
        let heavy = count(heavy_flood.await.unwrap()) as f64;
        let light = count(light_flood.await.unwrap()) as f64;
        let ratio = heavy / light;
        assert!((2.8..=3.2).contains(&ratio), "{heavy} : {light} = {ratio}");
        assert!(
            heavy + light >= 0.95 * 200.0,
            "{heavy} + {light} of 200 slots"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_capped_integration_never_exceeds_its_ceiling() {
        let (fair, _stop) = budget(25.0, 20, 1000);
        let capped = Arc::new(fair.lane("batch", &policy(1, None, Some(4.0))));
        let granted = flood(&fair, &capped, 40);
        tokio::time::sleep(Duration::from_secs(30)).await;
        let mut granted = granted.await.unwrap();
        granted.sort();
        assert_eq!(granted.len(), 40);
        // Any second holds at most 4 of them: the 5th after any grant is
        // at least a second later.
        for pair in granted.windows(5) {
            assert!(pair[4] - pair[0] >= Duration::from_secs(1), "{pair:?}");
        }
        // And it is not held back more than its ceiling asks.
        let span = *granted.last().unwrap() - granted[0];
        assert!(span <= Duration::from_millis(9_800), "{span:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_lone_integration_gets_the_whole_budget() {
        let (fair, _stop) = budget(10.0, 5, 1000);
        let lone = Arc::new(fair.lane("lone", &policy(1, None, None)));
        let start = Instant::now();
        let granted = flood(&fair, &lone, 105);
        tokio::time::sleep(Duration::from_secs(60)).await;
        let granted = granted.await.unwrap();
        let last = *granted.iter().max().unwrap();
        // 5 at once, then 100 at 10/s.
        assert_eq!(last - start, Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_refuses_only_its_own_integration() {
        let (fair, _stop) = budget(1.0, 1, 100);
        let batch = Arc::new(fair.lane("batch", &policy(1, Some(3), None)));
        let other = Arc::new(fair.lane("other", &policy(1, None, None)));
        fair.acquire(&batch).await.unwrap();
        let _waiting = flood(&fair, &batch, 3);
        tokio::task::yield_now().await;
        tokio::task::yield_now().await;
        assert_eq!(fair.queued(&batch), 3);
        let full = fair.acquire(&batch).await.unwrap_err();
        assert!(full.retry_after >= Duration::from_secs(3), "{full:?}");
        assert_eq!(batch.metrics.refused.get(), 1, "counted as its 429");
        // The other integration still waits its turn, not a 429.
        let asked = Instant::now();
        fair.acquire(&other).await.unwrap();
        assert!(
            asked.elapsed() <= Duration::from_secs(2),
            "{:?}",
            asked.elapsed()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_gives_up_frees_its_place() {
        let (fair, _stop) = budget(1.0, 1, 1);
        let lane = fair.lane("one", &policy(1, None, None));
        fair.acquire(&lane).await.unwrap();
        {
            let waiting = fair.acquire(&lane);
            tokio::pin!(waiting);
            assert!(futures_util::poll!(waiting.as_mut()).is_pending());
            assert_eq!(fair.queued(&lane), 1);
            // Dropped here, like a request whose client disconnected.
        }
        assert_eq!(fair.queued(&lane), 0);
        let again = fair.acquire(&lane);
        tokio::pin!(again);
        assert!(futures_util::poll!(again.as_mut()).is_pending());
        again.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_reload_changes_a_lanes_policy_and_keeps_its_queue() {
        let (fair, _stop) = budget(1.0, 1, 100);
        let before = Arc::new(fair.lane("batch", &policy(1, None, None)));
        fair.acquire(&before).await.unwrap();
        let _waiting = flood(&fair, &before, 2);
        tokio::task::yield_now().await;
        tokio::task::yield_now().await;
        assert_eq!(fair.queued(&before), 2);
        // The reloaded config gives it weight 3 and a queue bound of 2.
        let after = fair.lane("batch", &policy(3, Some(2), Some(0.5)));
        assert_eq!(fair.queued(&after), 2, "the same lane, its queue kept");
        {
            let queues = fair.queues();
            let lane = &queues.lanes[after.id];
            assert_eq!((lane.weight, lane.max_queue), (3, Some(2)));
            assert!(lane.ceiling.is_some());
        }
        assert!(fair.acquire(&after).await.is_err(), "its new bound holds");
    }

    #[tokio::test(start_paused = true)]
    async fn stopping_lets_every_waiting_request_go() {
        let (fair, stop) = budget(1.0, 1, 100);
        let lane = Arc::new(fair.lane("one", &policy(1, None, None)));
        fair.acquire(&lane).await.unwrap();
        let waiting = flood(&fair, &lane, 10);
        tokio::task::yield_now().await;
        stop.cancel();
        let started = Instant::now();
        assert_eq!(waiting.await.unwrap().len(), 10);
        assert!(started.elapsed() < Duration::from_secs(1));
        // And later ones do not wait for a dealer that is gone.
        fair.acquire(&lane).await.unwrap();
    }
}
