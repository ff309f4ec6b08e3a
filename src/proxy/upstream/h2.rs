//! HTTP/2 connections to the instance, shared by every request.
//!
//! One connection carries requests while it has room under the server's
//! `SETTINGS_MAX_CONCURRENT_STREAMS`; another is opened only when every open
//! one is full. Connecting is a latch: while one connect is in flight, the
//! requests that also found no room wait for its outcome instead of each
//! opening their own, so a cold burst makes one connection, and a failed
//! connect fails its waiters with the same cause instead of repeating it.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::client::conn::http2;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::super::body::UpstreamBody;

pub struct H2Conn {
    pub sender: http2::SendRequest<UpstreamBody>,
    /// Requests on it whose response has not ended.
    streams: AtomicUsize,
    /// The server's stream limit, kept current by the connection's task.
    max_streams: Arc<AtomicUsize>,
    /// No new requests: the server sent GOAWAY or refused a stream.
    retired: AtomicBool,
    /// When its last stream ended (for the idle timeout).
    idle_since: Mutex<Instant>,
}

impl H2Conn {
    fn usable(&self, now: Instant, idle_timeout: Duration) -> bool {
        if self.retired.load(Ordering::Acquire) || self.sender.is_closed() {
            return false;
        }
        let idle_for = self
            .idle_since
            .lock()
            .map(|since| now.saturating_duration_since(*since))
            .unwrap_or_default();
        self.streams.load(Ordering::Acquire) > 0 || idle_for < idle_timeout
    }

    fn has_room(&self) -> bool {
        self.streams.load(Ordering::Acquire) < self.max_streams.load(Ordering::Acquire).max(1)
    }
}

/// One request's stream on a connection; frees its place when dropped
/// (when the response body ends or is abandoned).
pub struct Stream {
    pub conn: Arc<H2Conn>,
}

impl Stream {
    fn open(conn: Arc<H2Conn>) -> Self {
        conn.streams.fetch_add(1, Ordering::AcqRel);
        Self { conn }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if self.conn.streams.fetch_sub(1, Ordering::AcqRel) == 1 {
            if let Ok(mut since) = self.conn.idle_since.lock() {
                *since = Instant::now();
            }
        }
    }
}

#[derive(Default)]
struct State {
    conns: Vec<Arc<H2Conn>>,
    connecting: bool,
    /// Connect attempts finished, so a waiter can tell a failure that
    /// happened while it waited from an older one.
    attempts: u64,
    last_failure: Option<(u64, Arc<str>)>,
}

pub struct Shared {
    state: Mutex<State>,
    /// A connect finished (either way).
    changed: Notify,
    idle_timeout: Duration,
}

/// What a request gets.
pub enum Checkout {
    /// A stream on an open connection with room.
    Stream(Stream),
    /// The latch: this request connects, the others wait for it.
    Connect(Connecting),
}

impl Shared {
    pub fn new(idle_timeout: Duration) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State::default()),
            changed: Notify::new(),
            idle_timeout,
        })
    }

    /// A stream on a connection with room, else the connect latch, else
    /// waits for the connect in flight. `Err` carries the cause when that
    /// connect failed.
    pub async fn checkout(self: &Arc<Self>) -> Result<Checkout, Arc<str>> {
        let mut waiting_since: Option<u64> = None;
        // The common case first, without registering as a waiter.
        if let Some(stream) = self.stream_with_room() {
            return Ok(Checkout::Stream(stream));
        }
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let Ok(mut state) = self.state.lock() else {
                    return Err(Arc::from("upstream pool state is unavailable"));
                };
                let now = Instant::now();
                state
                    .conns
                    .retain(|conn| conn.usable(now, self.idle_timeout));
                if let Some(conn) = state.conns.iter().find(|conn| conn.has_room()) {
                    return Ok(Checkout::Stream(Stream::open(conn.clone())));
                }
                if let (Some(since), Some((at, why))) = (waiting_since, &state.last_failure) {
                    if *at > since {
                        return Err(why.clone());
                    }
                }
                if !state.connecting {
                    state.connecting = true;
                    return Ok(Checkout::Connect(Connecting {
                        shared: self.clone(),
                        finished: false,
                    }));
                }
                waiting_since.get_or_insert(state.attempts);
            }
            notified.await;
        }
    }

    /// A stream on an open connection with room, if there is one.
    fn stream_with_room(&self) -> Option<Stream> {
        let state = self.state.lock().ok()?;
        let now = Instant::now();
        state
            .conns
            .iter()
            .find(|conn| conn.usable(now, self.idle_timeout) && conn.has_room())
            .map(|conn| Stream::open(conn.clone()))
    }

    /// Takes `conn` out of rotation: requests already on it finish there.
    pub fn retire(&self, conn: &H2Conn) {
        conn.retired.store(true, Ordering::Release);
    }

    /// Forgets connections that closed, retired, or sat idle too long;
    /// dropping the last sender closes a connection.
    pub fn prune(&self, now: Instant) {
        let gone: Vec<Arc<H2Conn>> = match self.state.lock() {
            Ok(mut state) => {
                let (keep, gone) = std::mem::take(&mut state.conns)
                    .into_iter()
                    .partition(|conn| conn.usable(now, self.idle_timeout));
                state.conns = keep;
                gone
            }
            Err(_) => Vec::new(),
        };
        drop(gone);
    }

    fn finish(&self, outcome: Result<Option<Arc<H2Conn>>, &str>) {
        if let Ok(mut state) = self.state.lock() {
            state.connecting = false;
            state.attempts += 1;
            match outcome {
                Ok(Some(conn)) => state.conns.push(conn),
                Ok(None) => {}
                Err(why) => state.last_failure = Some((state.attempts, Arc::from(why))),
            }
        }
        self.changed.notify_waiters();
    }
}

/// Held by the one request that connects; its waiters are woken when it
/// is used up or dropped (a cancelled request must not leave them waiting).
pub struct Connecting {
    shared: Arc<Shared>,
    finished: bool,
}

impl Connecting {
    /// The new connection joins the pool with this request's stream on it.
    pub fn succeeded(
        mut self,
        sender: http2::SendRequest<UpstreamBody>,
        max_streams: Arc<AtomicUsize>,
    ) -> Stream {
        let conn = Arc::new(H2Conn {
            sender,
            streams: AtomicUsize::new(0),
            max_streams,
            retired: AtomicBool::new(false),
            idle_since: Mutex::new(Instant::now()),
        });
        let stream = Stream::open(conn.clone());
        self.finished = true;
        self.shared.finish(Ok(Some(conn)));
        stream
    }

    /// The connect failed; the waiters fail with `why` too.
    pub fn failed(mut self, why: &str) {
        self.finished = true;
        self.shared.finish(Err(why));
    }
}

impl Drop for Connecting {
    fn drop(&mut self) {
        if !self.finished {
            self.shared.finish(Ok(None));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waiters_share_the_connect_in_flight_and_its_failure() {
        let shared = Shared::new(Duration::from_secs(60));
        let Ok(Checkout::Connect(latch)) = shared.checkout().await else {
            panic!("the first request connects");
        };
        let waiters: Vec<_> = (0..5)
            .map(|_| {
                let shared = shared.clone();
                tokio::spawn(async move { shared.checkout().await.err() })
            })
            .collect();
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(
            waiters.iter().all(|w| !w.is_finished()),
            "they wait for the latch"
        );
        latch.failed("connection refused");
        for waiter in waiters {
            assert_eq!(waiter.await.unwrap().as_deref(), Some("connection refused"));
        }
        // A later request tries again rather than inheriting an old failure.
        assert!(matches!(shared.checkout().await, Ok(Checkout::Connect(_))));
    }

    #[tokio::test]
    async fn an_abandoned_connect_releases_the_latch() {
        let shared = Shared::new(Duration::from_secs(60));
        let Ok(Checkout::Connect(latch)) = shared.checkout().await else {
            panic!("the first request connects");
        };
        let waiter = tokio::spawn({
            let shared = shared.clone();
            async move { matches!(shared.checkout().await, Ok(Checkout::Connect(_))) }
        });
        tokio::task::yield_now().await;
        drop(latch);
        assert!(waiter.await.unwrap(), "the waiter takes over the connect");
    }
}
