//! The timer that ends a body which makes no progress: a client that stops
//! sending its request body, or Coupa going silent mid-response. Armed only
//! the first time the body has to wait (a body already buffered, as most
//! are, never touches the timer wheel), pushed back after each progress.
//!
//! A request body also has a [`Pace`]: after a grace period it must keep
//! an average rate (a trickle of one byte every few seconds is progress,
//! but not a request), and it must be complete within a total time.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// Why a body was given up on, naming the setting that decided it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BodyTimeout {
    #[error("no data for {0:?} (listen.body_read_timeout)")]
    Idle(Duration),
    #[error("data arrived slower than {0} bytes/s on average (listen.min_body_rate)")]
    BelowRate(u64),
    #[error("not complete within {0:?} (listen.max_body_time)")]
    Total(Duration),
}

impl BodyTimeout {
    /// A label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            BodyTimeout::Idle(_) => "idle",
            BodyTimeout::BelowRate(_) => "rate",
            BodyTimeout::Total(_) => "total",
        }
    }
}

/// What a whole request body must keep up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pace {
    /// Bytes per second on average once `grace` has passed; 0: no minimum.
    pub min_rate: u64,
    pub grace: Duration,
    /// The whole body within this.
    pub total: Duration,
}

#[derive(Debug)]
struct Paced {
    pace: Pace,
    started: Instant,
    bytes: u64,
}

impl Paced {
    /// When the body falls below its minimum rate if nothing more comes.
    fn rate_deadline(&self) -> Option<Instant> {
        (self.pace.min_rate > 0).then(|| {
            let owed = Duration::from_secs_f64(self.bytes as f64 / self.pace.min_rate as f64);
            self.started + self.pace.grace + owed
        })
    }

    fn total_deadline(&self) -> Instant {
        self.started + self.pace.total
    }
}

#[derive(Debug)]
pub struct StallTimer {
    limit: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
    /// Data arrived since the timer was (re)armed.
    progressed: bool,
    paced: Option<Paced>,
}

impl StallTimer {
    pub fn new(limit: Duration) -> Self {
        Self {
            limit,
            sleep: None,
            progressed: false,
            paced: None,
        }
    }

    /// A timer that also holds the body to `pace`, from now.
    pub fn paced(limit: Duration, pace: Pace) -> Self {
        Self {
            paced: Some(Paced {
                pace,
                started: Instant::now(),
                bytes: 0,
            }),
            ..Self::new(limit)
        }
    }

    pub fn limit(&self) -> Duration {
        self.limit
    }

    /// The body yielded something, `bytes` of data.
    pub fn progressed(&mut self, bytes: usize) {
        self.progressed = true;
        if let Some(paced) = &mut self.paced {
            paced.bytes += bytes as u64;
        }
    }

    fn deadline(&self, now: Instant) -> Instant {
        let idle = now + self.limit;
        match &self.paced {
            None => idle,
            Some(paced) => {
                let mut deadline = idle.min(paced.total_deadline());
                if let Some(rate) = paced.rate_deadline() {
                    deadline = deadline.min(rate);
                }
                deadline
            }
        }
    }

    /// The body is waiting: ready, with the reason, once it has waited
    /// `limit` since its last progress or fallen behind its pace.
    pub fn poll_stalled(&mut self, cx: &mut Context<'_>) -> Poll<BodyTimeout> {
        let progressed = std::mem::take(&mut self.progressed);
        if self.sleep.is_none() || progressed {
            let deadline = self.deadline(Instant::now());
            match &mut self.sleep {
                Some(sleep) => sleep.as_mut().reset(deadline),
                None => self.sleep = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
        }
        if let Some(sleep) = &mut self.sleep {
            ready!(sleep.as_mut().poll(cx));
        }
        let now = Instant::now();
        Poll::Ready(match &self.paced {
            Some(paced) if now >= paced.total_deadline() => BodyTimeout::Total(paced.pace.total),
            Some(paced) if paced.rate_deadline().is_some_and(|at| now >= at) => {
                BodyTimeout::BelowRate(paced.pace.min_rate)
            }
            _ => BodyTimeout::Idle(self.limit),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Polls the timer every 100 ms of paused time, feeding `bytes` once a
    /// second, until it fires; returns why and after how long.
    async fn run(timer: &mut StallTimer, bytes: usize) -> (BodyTimeout, Duration) {
        let start = Instant::now();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        for step in 1.. {
            if let Poll::Ready(why) = timer.poll_stalled(&mut cx) {
                return (why, Instant::now() - start);
            }
            tokio::time::advance(Duration::from_millis(100)).await;
            if bytes > 0 && step % 10 == 0 {
                timer.progressed(bytes);
            }
        }
        unreachable!()
    }

    #[tokio::test(start_paused = true)]
    async fn fires_after_the_limit_without_progress() {
        let mut timer = StallTimer::new(Duration::from_secs(10));
        let (why, after) = run(&mut timer, 0).await;
        assert_eq!(why, BodyTimeout::Idle(Duration::from_secs(10)));
        assert_eq!(after, Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn progress_pushes_the_idle_limit_back() {
        // Without a pace, a byte a second never ends the body.
        let mut timer = StallTimer::new(Duration::from_secs(2));
        let mut cx = Context::from_waker(std::task::Waker::noop());
        for _ in 0..100 {
            assert!(timer.poll_stalled(&mut cx).is_pending());
            tokio::time::advance(Duration::from_secs(1)).await;
            timer.progressed(1);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_trickle_below_the_minimum_rate_ends_after_the_grace() {
        let pace = Pace {
            min_rate: 240,
            grace: Duration::from_secs(5),
            total: Duration::from_secs(600),
        };
        let mut timer = StallTimer::paced(Duration::from_secs(30), pace);
        // One byte a second: progress every time, never idle for 30 s, but
        // after the 5 s grace 240 bytes a second are owed.
        let (why, after) = run(&mut timer, 1).await;
        assert_eq!(why, BodyTimeout::BelowRate(240));
        assert!(
            after >= Duration::from_secs(5) && after <= Duration::from_millis(5200),
            "{after:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_at_the_minimum_rate_is_still_bounded_in_total() {
        let pace = Pace {
            min_rate: 10,
            grace: Duration::from_secs(1),
            total: Duration::from_secs(60),
        };
        let mut timer = StallTimer::paced(Duration::from_secs(30), pace);
        let (why, after) = run(&mut timer, 100).await;
        assert_eq!(why, BodyTimeout::Total(Duration::from_secs(60)));
        assert_eq!(after, Duration::from_secs(60));
    }
}
