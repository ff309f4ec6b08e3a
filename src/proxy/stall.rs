//! The timer that ends a body which makes no progress: a client that stops
//! sending its request body, or Coupa going silent mid-response. Armed only
//! the first time the body has to wait (a body already buffered, as most
//! are, never touches the timer wheel), pushed back after each progress.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

#[derive(Debug)]
pub struct StallTimer {
    limit: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
    /// Data arrived since the timer was (re)armed.
    progressed: bool,
}

impl StallTimer {
    pub fn new(limit: Duration) -> Self {
        Self {
            limit,
            sleep: None,
            progressed: false,
        }
    }

    pub fn limit(&self) -> Duration {
        self.limit
    }

    /// The body yielded something.
    pub fn progressed(&mut self) {
        self.progressed = true;
    }

    /// The body is waiting: ready once it has waited `limit` since its
    /// last progress.
    pub fn poll_stalled(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let deadline = Instant::now() + self.limit;
        let progressed = std::mem::take(&mut self.progressed);
        let sleep = match &mut self.sleep {
            Some(sleep) => {
                if progressed {
                    sleep.as_mut().reset(deadline);
                }
                sleep
            }
            None => self
                .sleep
                .insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        sleep.as_mut().poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn fires_after_the_limit_without_progress_and_is_pushed_back_by_progress() {
        let mut timer = StallTimer::new(Duration::from_secs(10));
        let start = Instant::now();
        std::future::poll_fn(|cx| {
            assert!(timer.poll_stalled(cx).is_pending());
            Poll::Ready(())
        })
        .await;
        tokio::time::advance(Duration::from_secs(6)).await;
        timer.progressed();
        std::future::poll_fn(|cx| timer.poll_stalled(cx)).await;
        assert_eq!(Instant::now() - start, Duration::from_secs(16));
    }
}
