//! Body wrappers of the request path.
//!
//! - [`UpstreamBody`]: what is sent to Coupa. A streamed client body is
//!   copied aside while it streams (up to `replay_body_limit`), so the
//!   request can be sent again after a 401 or a dropped connection; a
//!   replay sends the copy. A client that stops sending its body for
//!   `listen.body_read_timeout` is given up on: the body ends in an error,
//!   which aborts the upstream request, and the client gets 408 — a slow
//!   client must not hold an upstream connection indefinitely.
//!
//! Coupa's answer on its way back is the upstream module's
//! ([`super::upstream::ResponseBody`]): it holds the connection's lease.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::stall::StallTimer;
use crate::BoxError;

/// The copy of a streamed request body (fields private to this module).
#[derive(Debug, Default)]
pub struct Capture {
    chunks: Vec<Bytes>,
    size: usize,
    complete: bool,
    overflowed: bool,
    /// The client went silent for longer than the body read timeout.
    stalled: bool,
}

/// Handle to a request body's copy, kept by the request path.
#[derive(Debug, Clone)]
pub enum Replay {
    /// The request had no body.
    Empty,
    /// The body was copied while it streamed (or not, if it was too big).
    Captured(Arc<Mutex<Capture>>),
    /// The body came from a previous copy.
    Buffered(Bytes),
}

impl Replay {
    /// The client stopped sending the body (the upstream request was
    /// aborted because of it).
    pub fn client_stalled(&self) -> bool {
        match self {
            Replay::Captured(capture) => capture.lock().map(|c| c.stalled).unwrap_or(false),
            _ => false,
        }
    }

    /// A body to send the request again with, if the whole original body
    /// is known.
    pub fn body(&self) -> Option<UpstreamBody> {
        match self {
            Replay::Empty => Some(UpstreamBody::Empty),
            Replay::Buffered(bytes) => Some(UpstreamBody::Buffered(Some(bytes.clone()))),
            Replay::Captured(capture) => {
                let capture = capture.lock().ok()?;
                if !capture.complete || capture.overflowed {
                    return None;
                }
                let bytes = match capture.chunks.as_slice() {
                    [] => Bytes::new(),
                    [one] => one.clone(),
                    many => {
                        let mut joined = BytesMut::with_capacity(capture.size);
                        for chunk in many {
                            joined.extend_from_slice(chunk);
                        }
                        joined.freeze()
                    }
                };
                Some(UpstreamBody::Buffered(Some(bytes)))
            }
        }
    }
}

/// The request body sent to Coupa.
pub enum UpstreamBody {
    Empty,
    /// The client's body, streaming, with its first frame already read.
    Streaming(TeeBody),
    /// A body held in memory (a replay).
    Buffered(Option<Bytes>),
}

/// Why the client's body could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum ClientBodyError {
    #[error("{0}")]
    Malformed(hyper::Error),
    #[error("the client sent no request body data for {0:?}")]
    Stalled(Duration),
}

impl UpstreamBody {
    /// Wraps the client's body. Reads the first frame before anything is
    /// sent upstream, so a body that is broken from the start (e.g. a bad
    /// chunk size) is rejected without a byte reaching Coupa.
    pub async fn from_client(
        mut body: Incoming,
        replay_limit: usize,
        read_timeout: Duration,
    ) -> Result<(Self, Replay), ClientBodyError> {
        use http_body_util::BodyExt;
        if body.is_end_stream() {
            return Ok((UpstreamBody::Empty, Replay::Empty));
        }
        let first = match tokio::time::timeout(read_timeout, body.frame()).await {
            Err(_) => return Err(ClientBodyError::Stalled(read_timeout)),
            Ok(None) => return Ok((UpstreamBody::Empty, Replay::Empty)),
            Ok(Some(frame)) => frame.map_err(ClientBodyError::Malformed)?,
        };
        let capture = Arc::new(Mutex::new(Capture::default()));
        let mut tee = TeeBody {
            first: None,
            inner: body,
            capture: capture.clone(),
            limit: replay_limit,
            stall: StallTimer::new(read_timeout),
        };
        tee.record(&first);
        tee.first = Some(first);
        Ok((UpstreamBody::Streaming(tee), Replay::Captured(capture)))
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            UpstreamBody::Empty => Poll::Ready(None),
            UpstreamBody::Buffered(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            UpstreamBody::Streaming(tee) => Pin::new(tee).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Empty => true,
            UpstreamBody::Buffered(bytes) => bytes.is_none(),
            UpstreamBody::Streaming(tee) => tee.first.is_none() && tee.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Empty => SizeHint::with_exact(0),
            UpstreamBody::Buffered(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            UpstreamBody::Streaming(tee) => {
                let pending = tee
                    .first
                    .as_ref()
                    .and_then(Frame::data_ref)
                    .map_or(0, |d| d.len() as u64);
                let inner = tee.inner.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(inner.lower() + pending);
                if let Some(upper) = inner.upper() {
                    hint.set_upper(upper + pending);
                }
                hint
            }
        }
    }
}

/// Streams the client's body and keeps a copy of it up to a limit.
pub struct TeeBody {
    first: Option<Frame<Bytes>>,
    inner: Incoming,
    capture: Arc<Mutex<Capture>>,
    limit: usize,
    /// Ends the body when the client keeps it waiting `body_read_timeout`.
    stall: StallTimer,
}

impl TeeBody {
    fn record(&self, frame: &Frame<Bytes>) {
        let Ok(mut capture) = self.capture.lock() else {
            return;
        };
        if let Some(data) = frame.data_ref() {
            if !capture.overflowed {
                if capture.size + data.len() > self.limit {
                    capture.overflowed = true;
                    capture.chunks = Vec::new();
                } else {
                    capture.size += data.len();
                    capture.chunks.push(data.clone());
                }
            }
        }
        if self.inner.is_end_stream() {
            capture.complete = true;
        }
    }

    fn mark_complete(&self) {
        if let Ok(mut capture) = self.capture.lock() {
            capture.complete = true;
        }
    }

    fn mark_stalled(&self) {
        if let Ok(mut capture) = self.capture.lock() {
            capture.stalled = true;
        }
    }
}

impl Body for TeeBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(first) = this.first.take() {
            return Poll::Ready(Some(Ok(first)));
        }
        let polled = match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(polled) => {
                this.stall.progressed();
                polled
            }
            Poll::Pending => {
                ready!(this.stall.poll_stalled(cx));
                let timeout = this.stall.limit();
                this.mark_stalled();
                tracing::warn!(timeout = ?timeout, "client stopped sending the request body; aborting the request");
                return Poll::Ready(Some(Err(ClientBodyError::Stalled(timeout).into())));
            }
        };
        match polled {
            Some(Ok(frame)) => {
                this.record(&frame);
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(err)) => Poll::Ready(Some(Err(err.into()))),
            None => {
                this.mark_complete();
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.inner.is_end_stream()
    }
}
