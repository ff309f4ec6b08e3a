//! An answer larger than `coupa.response_buffer` (or of unknown length):
//! a task of its own reads it ahead into memory, then into an unlinked
//! temp file, while the client drains it ([`SpoolReader`]).

use std::collections::VecDeque;
use std::fs::File;
use std::future::Future;
use std::io;
use std::os::unix::fs::FileExt;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll, Waker};

use bytes::Bytes;
use http_body::{Body, Frame};
use tokio::task::{AbortHandle, JoinHandle};

use super::{next_frame, End, SpoolSettings, FILE_READ_CHUNK};
use crate::proxy::upstream::ResponseBody;
use crate::BoxError;

/// A piece of a spooled answer, in order.
enum Segment {
    Memory(Bytes),
    File { offset: u64, len: usize },
}

/// What the task and the client's body share.
struct Spool {
    state: Mutex<State>,
    settings: Arc<SpoolSettings>,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Segment>,
    in_memory: usize,
    file: Option<Arc<File>>,
    /// Bytes written to the temp file (it only grows).
    spilled: u64,
    /// The temp file could not be made or written: memory only from then.
    file_failed: bool,
    end: Option<End>,
    /// The client's body waits for a segment.
    reader: Option<Waker>,
    /// The task waits for room.
    writer: Option<Waker>,
    /// The answer outgrew memory and file once (counted once).
    overflowed: bool,
}

impl State {
    /// Queues `segment` and wakes the client's body.
    fn push(&mut self, segment: Segment) {
        // The file only grows, so a file piece after a file piece is its
        // continuation.
        match (self.queue.back_mut(), segment) {
            (Some(Segment::File { len, .. }), Segment::File { len: more, .. }) => {
                *len += more;
            }
            (_, segment) => self.queue.push_back(segment),
        }
        if let Some(reader) = self.reader.take() {
            reader.wake();
        }
    }
}

impl Spool {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while the lock was held leaves nothing half-done that
        // matters here: the queue is consistent after every statement.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn push(&self, segment: Segment) {
        self.state().push(segment);
    }

    fn end(&self, end: End) {
        let mut state = self.state();
        state.end = Some(end);
        if let Some(reader) = state.reader.take() {
            reader.wake();
        }
    }

    /// Keeps `data` in memory if there is room, else says where it goes.
    fn place(&self, data: &Bytes, cx: &mut Context<'_>) -> Poll<Placed> {
        let settings = &self.settings;
        let mut state = self.state();
        let len = data.len();
        if state.in_memory == 0 || state.in_memory + len <= settings.memory {
            state.in_memory += len;
            settings.metrics.memory_bytes.inc_by(len as i64);
            state.push(Segment::Memory(data.clone()));
            return Poll::Ready(Placed::Memory);
        }
        if !state.file_failed && state.spilled + len as u64 <= settings.file_limit {
            return Poll::Ready(Placed::File {
                file: state.file.clone(),
                offset: state.spilled,
            });
        }
        if !state.overflowed {
            state.overflowed = true;
            settings.metrics.overflowed.inc();
        }
        state.writer = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Writes `batch` at the end of the temp file, making it first if need
    /// be; false if that failed (the answer then stays in memory).
    async fn spill(&self, batch: Vec<Bytes>, file: Option<Arc<File>>, offset: u64) -> bool {
        let dir = self.settings.dir.clone();
        let len: u64 = batch.iter().map(|b| b.len() as u64).sum();
        let written = tokio::task::spawn_blocking(move || -> io::Result<Arc<File>> {
            let file = match file {
                Some(file) => file,
                None => Arc::new(tempfile::tempfile_in(&dir)?),
            };
            let mut at = offset;
            for data in &batch {
                file.write_all_at(data, at)?;
                at += data.len() as u64;
            }
            Ok(file)
        })
        .await
        .map_err(io::Error::other)
        .and_then(|written| written);
        let metrics = &self.settings.metrics;
        let mut state = self.state();
        match written {
            Ok(file) => {
                if state.file.is_none() {
                    metrics.files.inc();
                    state.file = Some(file);
                }
                state.spilled = offset + len;
                true
            }
            Err(error) => {
                state.file_failed = true;
                tracing::warn!(
                    dir = %self.settings.dir.display(),
                    %error,
                    "cannot spool an answer to a temp file (coupa.spool_dir); it waits for its client instead"
                );
                false
            }
        }
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        let mut state = self.state();
        let metrics = &self.settings.metrics;
        metrics.memory_bytes.dec_by(state.in_memory as i64);
        if let Some(file) = state.file.take() {
            metrics.files.dec();
            // Closing the last handle frees the file's blocks: a journal
            // write that can take milliseconds, which must not stall the
            // worker serving everyone else.
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn_blocking(move || drop(file));
            }
        }
    }
}

/// Where the task put a piece of the answer.
enum Placed {
    Memory,
    File {
        file: Option<Arc<File>>,
        offset: u64,
    },
}

/// Bytes gathered for one write to the temp file, so a large answer costs
/// a few blocking writes, not one per frame.
const SPILL_BATCH: usize = 256 * 1024;

/// Reads Coupa's answer into the spool until it ends or the client is gone.
async fn pump(mut body: ResponseBody, spool: Arc<Spool>) {
    use futures_util::FutureExt;
    // A frame read while gathering that did not fit the batch.
    let mut carried: Option<Bytes> = None;
    let mut ended: Option<End> = None;
    loop {
        let data = match carried.take() {
            Some(data) => data,
            None => match ended.take() {
                Some(end) => return spool.end(end),
                None => match next_frame(&mut body).await {
                    Ok(data) => data,
                    Err(end) => return spool.end(end),
                },
            },
        };
        let (file, offset) = match std::future::poll_fn(|cx| spool.place(&data, cx)).await {
            Placed::Memory => continue,
            Placed::File { file, offset } => (file, offset),
        };
        // Bound for the file: what arrives at once joins this write.
        let mut batch = vec![data];
        let mut len = batch[0].len();
        while len < SPILL_BATCH {
            match next_frame(&mut body).now_or_never() {
                None => break,
                Some(Err(end)) => {
                    ended = Some(end);
                    break;
                }
                Some(Ok(more)) => {
                    if offset + (len + more.len()) as u64 > spool.settings.file_limit {
                        carried = Some(more);
                        break;
                    }
                    len += more.len();
                    batch.push(more);
                }
            }
        }
        if spool.spill(batch.clone(), file, offset).await {
            spool.settings.metrics.spooled_bytes.inc_by(len as u64);
            spool.push(Segment::File { offset, len });
            continue;
        }
        // No temp file from now on (`place` knows): the batch waits for
        // room in memory, in order, and Coupa's answer goes at the
        // client's pace.
        for data in batch {
            std::future::poll_fn(|cx| spool.place(&data, cx)).await;
        }
    }
}

/// The client's side of a spooled answer.
pub struct SpoolReader {
    spool: Arc<Spool>,
    /// A piece being read back from the temp file.
    reading: Option<JoinHandle<io::Result<Bytes>>>,
    pump: AbortHandle,
    /// What is left to send, when Coupa said its length.
    pub(super) remaining: Option<u64>,
    pub(super) done: bool,
}

impl SpoolReader {
    pub(super) fn spawn(body: ResponseBody, settings: Arc<SpoolSettings>) -> Self {
        let remaining = body.size_hint().exact();
        let spool = Arc::new(Spool {
            state: Mutex::new(State::default()),
            settings,
        });
        let pump = tokio::spawn(pump(body, spool.clone())).abort_handle();
        SpoolReader {
            spool,
            reading: None,
            pump,
            remaining,
            done: false,
        }
    }

    fn data(&mut self, data: Bytes) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(remaining) = &mut self.remaining {
            *remaining = remaining.saturating_sub(data.len() as u64);
        }
        Poll::Ready(Some(Ok(Frame::data(data))))
    }

    pub(super) fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        loop {
            if let Some(reading) = &mut self.reading {
                let read = ready!(Pin::new(reading).poll(cx));
                self.reading = None;
                return match read.map_err(io::Error::other).and_then(|read| read) {
                    Ok(data) => self.data(data),
                    Err(error) => {
                        self.done = true;
                        Poll::Ready(Some(Err(error.into())))
                    }
                };
            }
            if self.done {
                return Poll::Ready(None);
            }
            let mut state = self.spool.state();
            match state.queue.pop_front() {
                Some(Segment::Memory(data)) => {
                    state.in_memory -= data.len();
                    self.spool
                        .settings
                        .metrics
                        .memory_bytes
                        .dec_by(data.len() as i64);
                    if let Some(writer) = state.writer.take() {
                        writer.wake();
                    }
                    drop(state);
                    return self.data(data);
                }
                Some(Segment::File { offset, len }) => {
                    let piece = len.min(FILE_READ_CHUNK);
                    if piece < len {
                        state.queue.push_front(Segment::File {
                            offset: offset + piece as u64,
                            len: len - piece,
                        });
                    }
                    let Some(file) = state.file.clone() else {
                        self.done = true;
                        return Poll::Ready(Some(Err("spooled answer lost its temp file".into())));
                    };
                    drop(state);
                    self.reading = Some(tokio::task::spawn_blocking(move || {
                        let mut buf = vec![0u8; piece];
                        file.read_exact_at(&mut buf, offset)?;
                        Ok(Bytes::from(buf))
                    }));
                }
                None => match state.end.take() {
                    Some(end) => {
                        self.done = true;
                        return Poll::Ready(end.into_frame());
                    }
                    None => {
                        state.reader = Some(cx.waker().clone());
                        return Poll::Pending;
                    }
                },
            }
        }
    }
}

impl Drop for SpoolReader {
    fn drop(&mut self) {
        // The client is gone: stop reading Coupa's answer (its connection
        // closes unless the answer was complete already).
        self.pump.abort();
    }
}
