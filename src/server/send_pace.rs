//! The write side's watchdog: a client must take what the server sends it
//! at `listen.min_response_rate` on average, once `listen.min_rate_grace`
//! has passed (Kestrel's minimum response data rate). A client that reads
//! a byte now and then would otherwise keep its connection, and whatever
//! its answer holds, for as long as it likes.
//!
//! The clock runs only while the server waits on the client: a period
//! starts when a write finds the socket full and ends when everything
//! buffered has gone out. Within a period the client owes `grace +
//! written / min_rate`; past that the connection is closed and counted.
//! A write that goes straight through, as on every healthy connection,
//! costs one branch.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::time::{Instant, Sleep};

/// What a client must keep up while taking an answer.
#[derive(Debug)]
pub struct SendPace {
    /// Bytes per second on average; never 0 (no pace is no watch).
    pub min_rate: u64,
    pub grace: Duration,
    /// Connections closed for falling behind.
    pub timeouts: Counter,
}

/// One connection's watch over its writes.
#[derive(Debug)]
pub struct SendWatch {
    pace: std::sync::Arc<SendPace>,
    /// Since when the server waits on the client, and what the client has
    /// taken since.
    period: Option<(Instant, u64)>,
    deadline: Option<Pin<Box<Sleep>>>,
}

impl SendWatch {
    pub fn new(pace: std::sync::Arc<SendPace>) -> Self {
        Self {
            pace,
            period: None,
            deadline: None,
        }
    }

    /// The client took `bytes`.
    pub fn written(&mut self, bytes: usize) {
        if let Some((_, written)) = &mut self.period {
            *written += bytes as u64;
        }
    }

    /// Everything buffered went out: the server no longer waits.
    pub fn flushed(&mut self) {
        self.period = None;
    }

    /// A write found the socket full. `Ready` with the error to end the
    /// connection with once the client is behind its pace; else the timer
    /// is set to wake the connection when it would be.
    pub fn waiting(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let now = Instant::now();
        let (started, written) = *self.period.get_or_insert((now, 0));
        let owed = Duration::from_secs_f64(written as f64 / self.pace.min_rate as f64);
        let due = started + self.pace.grace + owed;
        let sleep = match &mut self.deadline {
            Some(sleep) => {
                if sleep.deadline() != due {
                    sleep.as_mut().reset(due);
                }
                sleep
            }
            None => self
                .deadline
                .insert(Box::pin(tokio::time::sleep_until(due))),
        };
        if sleep.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        self.period = None;
        self.pace.timeouts.inc();
        static SLOW: crate::telemetry::Repeated = crate::telemetry::Repeated::new();
        if let Some(left_out) = SLOW.due() {
            tracing::warn!(
                left_out,
                min_rate = self.pace.min_rate,
                taken = written,
                waited = ?now.duration_since(started),
                "client took its answer slower than listen.min_response_rate; closing the connection"
            );
        }
        Poll::Ready(io::Error::new(
            io::ErrorKind::TimedOut,
            "client took the answer slower than listen.min_response_rate",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn watch() -> SendWatch {
        SendWatch::new(Arc::new(SendPace {
            min_rate: 100,
            grace: Duration::from_secs(5),
            timeouts: Counter::default(),
        }))
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_behind_its_pace_is_cut_off_when_it_owes_more_than_it_took() {
        let mut watch = watch();
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(watch.waiting(&mut cx).is_pending(), "the grace runs first");
        tokio::time::advance(Duration::from_millis(4900)).await;
        assert!(watch.waiting(&mut cx).is_pending());
        // 200 bytes taken buy two more seconds.
        watch.written(200);
        tokio::time::advance(Duration::from_millis(1900)).await;
        assert!(watch.waiting(&mut cx).is_pending());
        tokio::time::advance(Duration::from_millis(200)).await;
        assert!(
            watch.waiting(&mut cx).is_ready(),
            "7.1 s with 200 bytes taken"
        );
        assert_eq!(watch.pace.timeouts.get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_clock_runs_only_while_the_server_waits() {
        let mut watch = watch();
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(watch.waiting(&mut cx).is_pending());
        tokio::time::advance(Duration::from_secs(4)).await;
        watch.flushed();
        // Idle time between answers does not count.
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(watch.waiting(&mut cx).is_pending(), "a new period");
        tokio::time::advance(Duration::from_secs(4)).await;
        assert!(watch.waiting(&mut cx).is_pending());
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(watch.waiting(&mut cx).is_ready());
    }
}
