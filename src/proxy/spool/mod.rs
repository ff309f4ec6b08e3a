//! Coupa's answer taken off its connection ahead of the client, so a
//! client that reads slowly holds only its own connection, never one to
//! Coupa (nginx's `proxy_buffering`).
//!
//! - An answer of known length up to `coupa.response_buffer` is read whole
//!   before its headers go to the client: no task, no lock, and the
//!   connection is back in the pool before the client sees a byte.
//! - A larger (or chunked) answer gets a task of its own that reads it
//!   into memory up to `coupa.response_buffer`, then into an unlinked temp
//!   file in `coupa.spool_dir` up to `coupa.response_spool_limit`, while
//!   the client drains it. Past both, the task waits for the client:
//!   Coupa's answer then streams at the client's pace, as without a spool.
//! - `coupa.response_buffer = 0` streams every answer at the client's pace.
//!
//! Coupa's connection (and the integration's place under its
//! `max_concurrent`) is released by [`ResponseBody`] when its last byte is
//! read, which is now when Coupa has sent it, not when the client has
//! taken it. The client must still take it: `listen.min_response_rate` is
//! enforced on its socket by the server.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};

mod held;
mod reader;

pub use held::Held;
pub use reader::SpoolReader;

use super::upstream::ResponseBody;
use crate::metrics::SpoolMetrics;
use crate::BoxError;

/// How much of an answer may be held, and where.
#[derive(Debug, Clone)]
pub struct SpoolSettings {
    /// Bytes held in memory per answer; 0: no read-ahead at all.
    pub memory: usize,
    /// Bytes per answer in a temp file beyond `memory`; 0: no temp file.
    pub file_limit: u64,
    pub dir: PathBuf,
    pub metrics: SpoolMetrics,
}

/// Largest piece read back from a temp file at once.
const FILE_READ_CHUNK: usize = 64 * 1024;

/// Coupa's answer as the client reads it.
pub enum Answer {
    /// Read whole before the headers went out.
    Held(Held),
    /// Read ahead by a task of its own.
    Spooled(SpoolReader),
    /// At the client's pace (`coupa.response_buffer = 0`); boxed, so the
    /// common variants, moved with every response, stay small.
    Streamed(Box<ResponseBody>),
}

impl Answer {
    /// Takes Coupa's answer off its connection as the settings allow. An
    /// answer read whole that broke off is an error: nothing of it has
    /// gone to the client yet, so the client can be told plainly.
    pub async fn take(
        body: ResponseBody,
        settings: &Arc<SpoolSettings>,
    ) -> Result<Answer, BoxError> {
        if settings.memory == 0 {
            return Ok(Answer::Streamed(Box::new(body)));
        }
        Ok(match body.size_hint().exact() {
            Some(size) if size <= settings.memory as u64 => {
                Answer::Held(Held::read_whole(body, size).await?)
            }
            _ => Answer::Spooled(SpoolReader::spawn(body, settings.clone())),
        })
    }
}

impl Body for Answer {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Answer::Held(held) => Poll::Ready(held.next_frame()),
            Answer::Spooled(reader) => reader.poll_next(cx),
            Answer::Streamed(body) => Pin::new(body.as_mut()).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Answer::Held(held) => held.is_empty(),
            Answer::Spooled(reader) => reader.done,
            Answer::Streamed(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Answer::Held(held) => SizeHint::with_exact(held.remaining),
            Answer::Spooled(reader) => match reader.remaining {
                Some(exact) => SizeHint::with_exact(exact),
                None => SizeHint::new(),
            },
            Answer::Streamed(body) => body.size_hint(),
        }
    }
}

/// How Coupa's answer ended (trailers are rare: boxed).
enum End {
    Complete(Option<Box<HeaderMap>>),
    Failed(BoxError),
}

impl End {
    fn into_frame(self) -> Option<Result<Frame<Bytes>, BoxError>> {
        match self {
            End::Complete(trailers) => trailers.map(|t| Ok(Frame::trailers(*t))),
            End::Failed(error) => Some(Err(error)),
        }
    }
}

/// The next frame of Coupa's answer, or how it ended.
async fn next_frame(body: &mut ResponseBody) -> Result<Bytes, End> {
    loop {
        let frame = std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await;
        match frame {
            None => return Err(End::Complete(None)),
            Some(Err(error)) => return Err(End::Failed(error)),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) if data.is_empty() => continue,
                Ok(data) => return Ok(data),
                Err(frame) => return Err(End::Complete(frame.into_trailers().ok().map(Box::new))),
            },
        }
    }
}
