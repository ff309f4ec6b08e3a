//! HTTP/1.1 connections to the instance: a stack of idle ones (most
//! recently used on top, so busy periods reuse warm connections and quiet
//! ones let old ones expire) under a cap on how many are open at once.
//!
//! The cap is what keeps a cold burst from opening one connection per
//! concurrent request: past it a request waits until a connection comes
//! back to the stack or one closes, for `coupa.connection_wait_timeout` at
//! most.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use hyper::client::conn::http1;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::super::body::UpstreamBody;

/// An open HTTP/1.1 connection, holding its place under the cap.
pub struct H1Conn {
    pub sender: http1::SendRequest<UpstreamBody>,
    _slot: Slot,
}

/// One place under the cap; freed (and a waiter woken) when dropped.
pub struct Slot {
    stack: Weak<Stack>,
}

impl Slot {
    pub fn with(self, sender: http1::SendRequest<UpstreamBody>) -> H1Conn {
        H1Conn {
            sender,
            _slot: self,
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(stack) = self.stack.upgrade() {
            stack.open.fetch_sub(1, Ordering::AcqRel);
            stack.available.notify_one();
        }
    }
}

struct Idle {
    conn: H1Conn,
    since: Instant,
}

pub struct Stack {
    idle: Mutex<Vec<Idle>>,
    /// Connections open or being opened; at most `cap`.
    open: AtomicUsize,
    cap: usize,
    idle_timeout: Duration,
    /// How long a request waits for a connection at most.
    wait_timeout: Duration,
    /// A connection came back or a slot was freed.
    available: Notify,
}

/// Every connection stayed busy for the whole wait.
#[derive(Debug, Clone, Copy)]
pub struct Busy(pub Duration);

/// What a request gets from the stack.
pub enum Checkout {
    /// An idle connection, used before.
    Reused(H1Conn),
    /// Room for a new connection.
    Connect(Slot),
}

impl Stack {
    pub fn new(cap: usize, idle_timeout: Duration, wait_timeout: Duration) -> Arc<Self> {
        Arc::new(Self {
            idle: Mutex::new(Vec::new()),
            open: AtomicUsize::new(0),
            cap: cap.max(1),
            idle_timeout,
            wait_timeout,
            available: Notify::new(),
        })
    }

    /// An idle connection, else room for a new one, else waits for either
    /// up to the wait timeout. `on_wait` runs once if the request has to
    /// queue.
    pub async fn checkout(self: &Arc<Self>, on_wait: impl FnOnce()) -> Result<Checkout, Busy> {
        // The common case first, without registering as a waiter or a timer.
        if let Some(found) = self.take() {
            return Ok(found);
        }
        let deadline = Instant::now() + self.wait_timeout;
        let mut on_wait = Some(on_wait);
        loop {
            // Registered before looking again, so a connection returned
            // between the look and the wait still wakes this request.
            let notified = self.available.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(found) = self.take() {
                return Ok(found);
            }
            if let Some(on_wait) = on_wait.take() {
                on_wait();
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(Busy(self.wait_timeout));
            }
        }
    }

    /// An idle connection, else room for a new one.
    fn take(self: &Arc<Self>) -> Option<Checkout> {
        if let Some(conn) = self.pop_idle() {
            return Some(Checkout::Reused(conn));
        }
        self.try_reserve().map(Checkout::Connect)
    }

    /// Room for one more connection, if the cap allows.
    pub fn try_reserve(self: &Arc<Self>) -> Option<Slot> {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                (open < self.cap).then_some(open + 1)
            })
            .ok()
            .map(|_| Slot {
                stack: Arc::downgrade(self),
            })
    }

    fn pop_idle(&self) -> Option<H1Conn> {
        // Closed or expired ones are dropped outside the lock: dropping
        // frees their slot, which wakes a waiter.
        let mut dead = Vec::new();
        let found = {
            let mut idle = self.idle.lock().ok()?;
            loop {
                match idle.pop() {
                    Some(entry)
                        if entry.conn.sender.is_closed()
                            || entry.since.elapsed() >= self.idle_timeout =>
                    {
                        dead.push(entry)
                    }
                    Some(entry) => break Some(entry.conn),
                    None => break None,
                }
            }
        };
        drop(dead);
        found
    }

    /// A connection whose response was read to its end goes back on top.
    pub fn put(&self, conn: H1Conn) {
        if conn.sender.is_closed() {
            return;
        }
        if let Ok(mut idle) = self.idle.lock() {
            idle.push(Idle {
                conn,
                since: Instant::now(),
            });
        }
        self.available.notify_one();
    }

    /// Drops idle connections that expired or closed.
    pub fn prune(&self, now: Instant) {
        let expired: Vec<Idle> = match self.idle.lock() {
            Ok(mut idle) => {
                let (keep, expired) = std::mem::take(&mut *idle).into_iter().partition(|entry| {
                    !entry.conn.sender.is_closed()
                        && now.saturating_duration_since(entry.since) < self.idle_timeout
                });
                *idle = keep;
                expired
            }
            Err(_) => Vec::new(),
        };
        drop(expired);
    }

    /// Connections open or being opened.
    #[cfg(test)]
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn past_the_cap_a_request_waits_for_a_freed_slot() {
        let stack = Stack::new(2, Duration::from_secs(60), Duration::from_secs(60));
        let Ok(Checkout::Connect(first)) = stack.checkout(|| {}).await else {
            panic!("an empty stack has room");
        };
        let Ok(Checkout::Connect(_second)) = stack.checkout(|| {}).await else {
            panic!("the cap is two");
        };
        assert_eq!(stack.open(), 2);
        let waited = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let third = tokio::spawn({
            let stack = stack.clone();
            let waited = waited.clone();
            async move {
                matches!(
                    stack
                        .checkout(|| waited.store(true, Ordering::SeqCst))
                        .await,
                    Ok(Checkout::Connect(_))
                )
            }
        });
        // The third request queues (it says so) until a slot is freed.
        while !waited.load(Ordering::SeqCst) {
            tokio::task::yield_now().await;
        }
        assert!(!third.is_finished());
        drop(first);
        assert!(third.await.unwrap(), "the freed slot goes to the waiter");
        assert_eq!(stack.open(), 1, "only the second slot is still held");
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_past_the_timeout_gives_up_and_holds_nothing() {
        let stack = Stack::new(1, Duration::from_secs(60), Duration::from_secs(10));
        let Ok(Checkout::Connect(_held)) = stack.checkout(|| {}).await else {
            panic!("an empty stack has room");
        };
        let started = Instant::now();
        let Err(Busy(waited)) = stack.checkout(|| {}).await else {
            panic!("the only slot is held");
        };
        assert_eq!(waited, Duration::from_secs(10));
        assert_eq!(started.elapsed(), Duration::from_secs(10));
        assert_eq!(stack.open(), 1, "the give-up reserved nothing");
    }
}
