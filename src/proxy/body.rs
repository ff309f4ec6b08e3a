//! Body wrappers of the request path.
//!
//! - [`UpstreamBody`]: what is sent to Coupa. A body up to
//!   `replay_body_limit` is read whole before the request goes anywhere,
//!   so a slow uploader holds only its own connection, never one to
//!   Coupa, and the copy serves a replay after a 401 or a dropped
//!   connection. A larger body streams on after its first
//!   `replay_body_limit` bytes. Either way the client must keep its pace
//!   ([`super::stall`]): a body that sends nothing for
//!   `listen.body_read_timeout`, falls below `listen.min_body_rate` after
//!   the grace, or is not complete within `listen.max_body_time` ends in
//!   an error, which aborts the upstream request, and the client gets 408.
//!
//! Coupa's answer on its way back is the upstream module's
//! ([`super::upstream::ResponseBody`]): it holds the connection's lease.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::stall::{BodyTimeout, Pace, StallTimer};
use crate::BoxError;

/// The copy of a streamed request body (fields private to this module).
#[derive(Debug, Default)]
pub struct Capture {
    chunks: Vec<Bytes>,
    size: usize,
    complete: bool,
    overflowed: bool,
    /// The client fell behind (silent, too slow, too long).
    stalled: Option<BodyTimeout>,
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
    /// Why the client's body was given up on, if it was (the upstream
    /// request was aborted because of it).
    pub fn client_stalled(&self) -> Option<BodyTimeout> {
        match self {
            Replay::Captured(capture) => capture.lock().ok().and_then(|c| c.stalled),
            _ => None,
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
                Some(UpstreamBody::Buffered(Some(join(
                    &capture.chunks,
                    capture.size,
                ))))
            }
        }
    }
}

/// One buffer of `chunks` (`size` bytes in all), copied only if there are
/// several.
fn join(chunks: &[Bytes], size: usize) -> Bytes {
    match chunks {
        [] => Bytes::new(),
        [one] => one.clone(),
        many => {
            let mut joined = BytesMut::with_capacity(size);
            for chunk in many {
                joined.extend_from_slice(chunk);
            }
            joined.freeze()
        }
    }
}

/// The request body sent to Coupa.
pub enum UpstreamBody {
    Empty,
    /// The client's body, streaming, with its first frames already read.
    Streaming(TeeBody),
    /// A body held in memory: read whole, or a replay.
    Buffered(Option<Bytes>),
}

/// Why the client's body could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum ClientBodyError {
    #[error("{0}")]
    Malformed(hyper::Error),
    #[error("request body: {0}")]
    Stalled(BodyTimeout),
}

impl UpstreamBody {
    /// Takes the client's body: read whole when it fits in `replay_limit`
    /// (nothing is sent upstream before its last byte), else its first
    /// `replay_limit` bytes and the rest streamed. A body that is broken
    /// from the start (e.g. a bad chunk size) or falls behind its pace
    /// before the request leaves is rejected without a byte reaching Coupa.
    pub async fn from_client(
        body: Incoming,
        replay_limit: usize,
        read_timeout: Duration,
        pace: Pace,
    ) -> Result<(Self, Replay), ClientBodyError> {
        if body.is_end_stream() {
            return Ok((UpstreamBody::Empty, Replay::Empty));
        }
        let capture = Arc::new(Mutex::new(Capture::default()));
        let mut tee = TeeBody {
            pending: VecDeque::new(),
            inner: body,
            capture: capture.clone(),
            limit: replay_limit,
            stall: StallTimer::paced(read_timeout, pace),
        };
        let mut read: Vec<Frame<Bytes>> = Vec::new();
        let mut size = 0;
        while let Some(frame) = std::future::poll_fn(|cx| tee.poll_client(cx)).await {
            let frame = frame?;
            let data_len = frame.data_ref().map(Bytes::len);
            size += data_len.unwrap_or(0);
            read.push(frame);
            if data_len.is_none() || size > replay_limit {
                // Too big to hold (or trailers): what was read goes first,
                // the rest streams.
                tee.pending = read.into();
                return Ok((UpstreamBody::Streaming(tee), Replay::Captured(capture)));
            }
            if tee.inner.is_end_stream() {
                break;
            }
        }
        let chunks: Vec<Bytes> = read
            .into_iter()
            .filter_map(|f| f.into_data().ok())
            .collect();
        let whole = join(&chunks, size);
        Ok((
            UpstreamBody::Buffered(Some(whole.clone())),
            Replay::Buffered(whole),
        ))
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
            UpstreamBody::Streaming(tee) => Body::is_end_stream(tee),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Empty => SizeHint::with_exact(0),
            UpstreamBody::Buffered(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            UpstreamBody::Streaming(tee) => {
                let pending: u64 = tee
                    .pending
                    .iter()
                    .filter_map(Frame::data_ref)
                    .map(|d| d.len() as u64)
                    .sum();
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
    /// Frames read before streaming began, sent first.
    pending: VecDeque<Frame<Bytes>>,
    inner: Incoming,
    capture: Arc<Mutex<Capture>>,
    limit: usize,
    /// Ends the body when the client falls behind its pace.
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

    fn mark_stalled(&self, why: BodyTimeout) {
        if let Ok(mut capture) = self.capture.lock() {
            capture.stalled = Some(why);
        }
    }

    /// The next frame from the client, recorded, under the pace.
    fn poll_client(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ClientBodyError>>> {
        let polled = match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(polled) => {
                let bytes = match &polled {
                    Some(Ok(frame)) => frame.data_ref().map_or(0, Bytes::len),
                    _ => 0,
                };
                self.stall.progressed(bytes);
                polled
            }
            Poll::Pending => {
                let why = ready!(self.stall.poll_stalled(cx));
                self.mark_stalled(why);
                tracing::warn!(cause = %why, "client fell behind sending the request body; aborting the request");
                return Poll::Ready(Some(Err(ClientBodyError::Stalled(why))));
            }
        };
        match polled {
            Some(Ok(frame)) => {
                self.record(&frame);
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(err)) => Poll::Ready(Some(Err(ClientBodyError::Malformed(err)))),
            None => {
                self.mark_complete();
                Poll::Ready(None)
            }
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
        if let Some(first) = this.pending.pop_front() {
            return Poll::Ready(Some(Ok(first)));
        }
        this.poll_client(cx).map_err(Into::into)
    }

    fn is_end_stream(&self) -> bool {
        self.pending.is_empty() && self.inner.is_end_stream()
    }
}
