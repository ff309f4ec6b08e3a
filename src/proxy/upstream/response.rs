//! Coupa's response body on its way to the client: it holds the lease of
//! the connection it came on (an HTTP/1.1 connection goes back to the
//! pool, an HTTP/2 stream frees its place, once the body has been read to
//! its end), and it is aborted if it stalls for longer than `idle_timeout`,
//! so a hung upstream can never hang the client.

use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::sync::OwnedSemaphorePermit;

use super::Lease;
use crate::proxy::stall::StallTimer;
use crate::BoxError;

pin_project_lite::pin_project! {
    /// Coupa's response body, aborted when no data arrives for `idle`.
    pub struct ResponseBody {
        #[pin]
        inner: Incoming,
        // Ends the response when Coupa goes silent for `idle_timeout`.
        stall: StallTimer,
        // The connection this came on: an HTTP/1.1 one goes back to the
        // pool, an HTTP/2 stream frees its place, once the body has been
        // read to its end.
        lease: Lease,
        // The integration's place under its max_concurrent, given back
        // with the connection.
        share: Option<OwnedSemaphorePermit>,
    }
}

impl ResponseBody {
    pub fn new(
        inner: Incoming,
        idle: Duration,
        mut lease: Lease,
        mut share: Option<OwnedSemaphorePermit>,
    ) -> Self {
        if inner.is_end_stream() {
            lease.finish();
            share = None;
        }
        Self {
            inner,
            stall: StallTimer::new(idle),
            lease,
            share,
        }
    }
}

/// The upstream body went silent for longer than `coupa.idle_timeout`.
#[derive(Debug, thiserror::Error)]
#[error("Coupa sent no response data for {0:?}; response aborted")]
pub struct IdleTimeout(Duration);

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        match this.inner.as_mut().poll_frame(cx) {
            Poll::Ready(frame) => {
                this.stall.progressed(0);
                let ended = match &frame {
                    None => true,
                    Some(Ok(_)) => this.inner.is_end_stream(),
                    Some(Err(_)) => false,
                };
                if ended {
                    this.lease.finish();
                    *this.share = None;
                }
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                ready!(this.stall.poll_stalled(cx));
                let idle = this.stall.limit();
                tracing::warn!(idle = ?idle, "upstream response stalled; aborting it");
                Poll::Ready(Some(Err(IdleTimeout(idle).into())))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
