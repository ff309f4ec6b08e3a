//! Plain HTTP/1.1 connections, served so that an idle one can give its
//! memory back.
//!
//! hyper keeps a connection's buffers for as long as the connection lives,
//! idle or not, and cannot shrink them: a read buffer regrown to 16 KiB,
//! 8 KiB for response heads and a slot the size of the request future,
//! about 27 KiB in all. A shared service holds many integrations'
//! keep-alive connections, most of them idle most of the time (Coupa
//! allows an instance 25 requests a second). So when more than
//! `listen.release_idle_buffers_above` client connections are open, a
//! connection that goes idle ends its hyper session without closing the
//! socket: it is *parked*, holding only the socket, the framing guard and
//! the service, until the client sends again; then a new session starts.
//!
//! Below that many connections nothing changes, because a new session per
//! request costs a few large allocations, which a busy proxy with a few
//! connections should not pay.
//!
//! Idle means every request read has been answered to its end and flushed
//! and nothing of the next one has arrived ([`ConnectionGuard::is_idle`]).
//! hyper then waits for a head; the framing guard answers its next read
//! with end-of-stream, which hyper takes as the client closing between
//! requests; the guard skips the shutdown hyper then asks for, and
//! `into_parts` hands the socket back unclosed. No
//! byte is lost: the guard only does this between requests, and whatever
//! hyper read but did not use is served again to the next session.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Response;
use http_body::{Body, Frame, SizeHint};
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::framing::{ConnectionGuard, FramingGuard};
use super::{BoxError, ConnectionGauges, ConnectionService, ResponseBody};

/// When an idle connection parks, and where that is counted.
pub(super) struct ParkPolicy {
    /// Park only while more client connections than this are open.
    pub above: i64,
    /// A parked connection that stays silent this long is closed, as hyper
    /// closes an idle keep-alive connection (`listen.keepalive_timeout`).
    pub keep_alive: Duration,
    /// The listener's open and parked connections.
    pub gauges: ConnectionGauges,
}

impl ParkPolicy {
    fn crowded(&self) -> bool {
        self.gauges.open.get() > self.above
    }
}

/// Serves one plain HTTP/1.1 connection through as many hyper sessions as
/// parking needs, until the client closes, hyper ends it, or shutdown.
pub(super) async fn serve_http1<S, B>(
    mut io: FramingGuard<TcpStream>,
    verdicts: Arc<ConnectionGuard>,
    mut service: S,
    builder: &http1::Builder,
    policy: &ParkPolicy,
    shutdown: &CancellationToken,
) -> Result<(), BoxError>
where
    S: ConnectionService<B>,
    B: ResponseBody,
{
    loop {
        // Boxed: a connection's task is sized for its largest state, and a
        // parked connection should keep none of a session's.
        let session = Box::pin(session(io, service, &verdicts, builder, policy, shutdown));
        let Some((returned, unread, kept)) = session.await? else {
            return Ok(());
        };
        (io, service) = (returned, kept);
        if shutdown.is_cancelled() {
            let _ = tokio::time::timeout(Duration::from_secs(1), io.shutdown()).await;
            return Ok(());
        }
        if !unread.is_empty() {
            io.replay(unread);
            continue;
        }
        policy.gauges.parked.inc();
        let woken = tokio::select! {
            readable = tokio::time::timeout(policy.keep_alive, io.get_ref().readable()) => {
                matches!(readable, Ok(Ok(())))
            }
            _ = shutdown.cancelled() => false,
        };
        policy.gauges.parked.dec();
        if !woken {
            let _ = tokio::time::timeout(Duration::from_secs(1), io.shutdown()).await;
            return Ok(());
        }
    }
}

/// How long an idle HTTP/1.1 connection is still served after shutdown
/// began, so requests already on their way are answered, not cut off.
pub const SHUTDOWN_LINGER: Duration = Duration::from_secs(1);

/// The socket, what hyper read but did not use, and the service, handed
/// back by a session that ended between requests.
type Returned<S> = (FramingGuard<TcpStream>, bytes::Bytes, S);

/// One hyper session on the connection. `None`: hyper ended the connection
/// itself and closed its sending side (the client closed, or a response
/// said `Connection: close`).
async fn session<S, B>(
    io: FramingGuard<TcpStream>,
    service: S,
    verdicts: &ConnectionGuard,
    builder: &http1::Builder,
    policy: &ParkPolicy,
    shutdown: &CancellationToken,
) -> Result<Option<Returned<S>>, BoxError>
where
    S: ConnectionService<B>,
    B: ResponseBody,
{
    let mut session = builder.serve_connection(TokioIo::new(io), service);
    let mut ending = false;
    let mut stopping = false;
    let cancelled = shutdown.cancelled();
    tokio::pin!(cancelled);
    // At shutdown an idle connection is not closed at once: a request may
    // be on its way (a client that just connected, a keep-alive client
    // between calls), and closing under it fails the call. For
    // `SHUTDOWN_LINGER` its requests are served, each answer saying
    // `Connection: close` (the service adds it while draining), then it
    // closes.
    let mut linger: Option<Pin<Box<tokio::time::Sleep>>> = None;
    std::future::poll_fn(|cx| {
        if !stopping && linger.is_none() && cancelled.as_mut().poll(cx).is_ready() {
            linger = Some(Box::pin(tokio::time::sleep(SHUTDOWN_LINGER)));
        }
        if let Some(waited) = linger.as_mut() {
            if !stopping && waited.as_mut().poll(cx).is_ready() {
                // hyper closes an idle connection now, a busy one after
                // its response.
                stopping = true;
                Pin::new(&mut session).graceful_shutdown();
            }
        }
        if let Poll::Ready(done) = Pin::new(&mut session).poll(cx) {
            return Poll::Ready(done);
        }
        // hyper waits (for the client, the service or Coupa's body).
        if !ending && !stopping && linger.is_none() && verdicts.is_idle() && policy.crowded() {
            ending = true;
            verdicts.end_session(true);
            return Pin::new(&mut session).poll(cx);
        }
        Poll::Pending
    })
    .await?;
    if !ending {
        return Ok(None);
    }
    verdicts.end_session(false);
    let parts = session.into_parts();
    Ok(Some((parts.io.into_inner(), parts.read_buf, parts.service)))
}

/// The service's answer, made to count itself answered when hyper is done
/// with its body. A service whose answers are not passed through this
/// never parks. (Wrapped inside the service's own future: wrapping that
/// future from outside would copy it, several KiB, once more per request.)
pub fn answered<B>(
    response: Response<B>,
    verdicts: &Arc<ConnectionGuard>,
) -> Response<AnsweredBody<B>> {
    let mark = AnswerMark(verdicts.clone());
    response.map(|inner| AnsweredBody {
        inner,
        _answered: mark,
    })
}

/// Counts the response as answered when hyper drops its body, which it
/// does once the body has been written to its end (or the write failed).
struct AnswerMark(Arc<ConnectionGuard>);

impl Drop for AnswerMark {
    fn drop(&mut self) {
        self.0.answered();
    }
}

pin_project_lite::pin_project! {
    /// A response body that counts itself answered when dropped.
    pub struct AnsweredBody<B> {
        #[pin]
        inner: B,
        _answered: AnswerMark,
    }
}

impl<B: Body> Body for AnsweredBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
