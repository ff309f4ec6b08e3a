//! The I/O half of the guard: sits between the socket and hyper, hands
//! bytes through as read while [`super::scan`] reads along, holds a head
//! split across reads back until it is whole, makes the scan's edits to a
//! head (an encoded target, a refused head's stand-in); also notes what
//! the server needs to see that a connection is idle.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::scan::{scan, Edit, Phase, STAND_IN};
use super::target;
use super::ConnectionGuard;
use crate::server::send_pace::{SendPace, SendWatch};

pin_project_lite::pin_project! {
    /// Wraps a connection's transport; see the module docs.
    pub struct FramingGuard<IO> {
        #[pin]
        inner: IO,
        phase: Phase,
        // A copy of the start of a head that is split across reads.
        partial_head: Vec<u8>,
        // Until the first byte arrives: hyper's header-read timeout only
        // starts once it knows the protocol, so a client that connects and
        // sends nothing would otherwise hold its connection forever.
        first_byte: Option<Pin<Box<tokio::time::Sleep>>>,
        // HTTP/1: a head must be complete within this of its first byte.
        // hyper's own header timer also counts the idle time before it, so
        // it bounds keep-alive instead.
        head_timeout: Option<std::time::Duration>,
        // Armed while a head is incomplete.
        head_deadline: Option<Pin<Box<tokio::time::Sleep>>>,
        head_started: bool,
        // A head larger than this is left for hyper to refuse (431).
        max_head: usize,
        verdicts: Arc<ConnectionGuard>,
        // Bytes already read (and scanned) that a new hyper session must
        // see first.
        replay: Bytes,
        // The client must take answers at its minimum rate.
        send_watch: Option<SendWatch>,
    }
}

impl<IO> FramingGuard<IO> {
    /// Closes the connection if its first byte takes longer than `timeout`.
    pub fn with_first_byte_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.first_byte = Some(Box::pin(tokio::time::sleep(timeout)));
        self
    }

    /// Closes an HTTP/1 connection whose request head is not complete
    /// within `timeout` of its first byte.
    pub fn with_head_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.head_timeout = Some(timeout);
        self
    }

    /// Closes the connection when the client takes what is written to it
    /// slower than `pace` (none: no minimum).
    pub fn with_send_pace(mut self, pace: Option<&Arc<SendPace>>) -> Self {
        self.send_watch = pace.map(|pace| SendWatch::new(pace.clone()));
        self
    }

    pub fn new(inner: IO, max_head: usize, verdicts: Arc<ConnectionGuard>) -> Self {
        Self {
            inner,
            phase: Phase::Head,
            partial_head: Vec::new(),
            first_byte: None,
            head_timeout: None,
            head_deadline: None,
            head_started: false,
            max_head,
            verdicts,
            replay: Bytes::new(),
            send_watch: None,
        }
    }

    /// The transport underneath.
    pub fn get_ref(&self) -> &IO {
        &self.inner
    }

    /// Serves `bytes` before anything new from the transport, without
    /// scanning them again (they were scanned when first read).
    pub fn replay(&mut self, bytes: Bytes) {
        self.replay = if self.replay.is_empty() {
            bytes
        } else {
            [bytes, std::mem::take(&mut self.replay)].concat().into()
        };
    }
}

impl<IO: AsyncRead> AsyncRead for FramingGuard<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut this = self.project();
        if !this.replay.is_empty() {
            let n = this.replay.len().min(buf.remaining());
            buf.put_slice(&this.replay.split_to(n));
            return Poll::Ready(Ok(()));
        }
        if *this.phase == Phase::Refused {
            return discard(this.inner, cx, buf);
        }
        if *this.phase == Phase::Head
            && this.partial_head.is_empty()
            && this.verdicts.end_session.load(Ordering::Relaxed)
        {
            // End-of-stream between requests: hyper ends its session as if
            // the client had closed, and the server keeps the socket.
            return Poll::Ready(Ok(()));
        }
        let start = buf.filled().len();
        // Loops only when a read brought nothing but the held-back part of
        // a head: hyper must not take an empty read for the end.
        loop {
            if this.inner.as_mut().poll_read(cx, buf)?.is_pending() {
                if let Some(deadline) = this.first_byte.as_mut() {
                    ready!(deadline.as_mut().poll(cx));
                    this.verdicts.note_head_timeout();
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        crate::server::HeadTimeout("client sent nothing"),
                    )));
                }
                if *this.head_started {
                    if let Some(deadline) = this.head_deadline.as_mut() {
                        ready!(deadline.as_mut().poll(cx));
                        this.verdicts.note_head_timeout();
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            crate::server::HeadTimeout("request head not complete"),
                        )));
                    }
                }
                return Poll::Pending;
            }
            let end = buf.filled().len();
            if end == start {
                // The client closed: what it sent of a head goes to hyper,
                // which tells the client's error from a clean close.
                if !this.partial_head.is_empty() {
                    *this.phase = Phase::Passthrough;
                    let held = std::mem::take(this.partial_head);
                    emit(&held, buf, this.replay);
                }
                return Poll::Ready(Ok(()));
            }
            *this.first_byte = None;
            if *this.phase == Phase::Passthrough {
                return Poll::Ready(Ok(()));
            }
            let mut heads = this.verdicts.heads.load(Ordering::Relaxed);
            let mut edits = Vec::new();
            if this.partial_head.is_empty() {
                let fresh = &buf.filled()[start..];
                let scanned = scan(
                    fresh,
                    this.phase,
                    *this.max_head,
                    &mut heads,
                    this.verdicts,
                    &mut edits,
                );
                // Held back until whole: a head is changed (or refused)
                // only once all of it is known.
                this.partial_head.extend_from_slice(&fresh[scanned..]);
                buf.set_filled(start + scanned);
                if !edits.is_empty() {
                    let edited = apply(&buf.filled()[start..], &edits);
                    buf.set_filled(start);
                    emit(&edited, buf, this.replay);
                }
            } else {
                this.partial_head.extend_from_slice(&buf.filled()[start..]);
                buf.set_filled(start);
                let scanned = scan(
                    this.partial_head,
                    this.phase,
                    *this.max_head,
                    &mut heads,
                    this.verdicts,
                    &mut edits,
                );
                let released: Vec<u8> = this.partial_head.drain(..scanned).collect();
                if edits.is_empty() {
                    emit(&released, buf, this.replay);
                } else {
                    emit(&apply(&released, &edits), buf, this.replay);
                }
            }
            this.verdicts.heads.store(heads, Ordering::Relaxed);
            let in_head = *this.phase == Phase::Head && !this.partial_head.is_empty();
            this.verdicts
                .between_requests
                .store(*this.phase == Phase::Head && !in_head, Ordering::Relaxed);
            if in_head != *this.head_started {
                *this.head_started = in_head;
                if let (true, Some(timeout)) = (in_head, *this.head_timeout) {
                    // Only a head split across reads gets here: a timer per
                    // slow head, none on the common path.
                    let deadline = tokio::time::Instant::now() + timeout;
                    match this.head_deadline.as_mut() {
                        Some(sleep) => sleep.as_mut().reset(deadline),
                        None => {
                            *this.head_deadline = Some(Box::pin(tokio::time::sleep_until(deadline)))
                        }
                    }
                }
            }
            if buf.filled().len() > start {
                return Poll::Ready(Ok(()));
            }
        }
    }
}

/// After a refused head nothing more is handed to hyper (its answer closes
/// the connection), but an end of the stream still is: hyper gives up an
/// answer it is writing only when the client has gone.
fn discard<IO: AsyncRead>(
    mut inner: Pin<&mut IO>,
    cx: &mut Context<'_>,
    buf: &mut ReadBuf<'_>,
) -> Poll<io::Result<()>> {
    let start = buf.filled().len();
    loop {
        ready!(inner.as_mut().poll_read(cx, buf))?;
        if buf.filled().len() == start {
            return Poll::Ready(Ok(()));
        }
        buf.set_filled(start);
    }
}

/// Hands `bytes` to hyper: what fits now, the rest on its next read.
fn emit(bytes: &[u8], buf: &mut ReadBuf<'_>, replay: &mut Bytes) {
    let n = bytes.len().min(buf.remaining());
    buf.put_slice(&bytes[..n]);
    if n < bytes.len() {
        *replay = Bytes::copy_from_slice(&bytes[n..]);
    }
}

/// `data` with `edits` (in order, ranges into `data`) made.
fn apply(data: &[u8], edits: &[Edit]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 64);
    let mut copied = 0;
    for edit in edits {
        match edit {
            Edit::EncodeTarget(range) => {
                out.extend_from_slice(&data[copied..range.start]);
                target::encode_into(&data[range.clone()], &mut out);
                copied = range.end;
            }
            Edit::Refuse(at) => {
                out.extend_from_slice(&data[copied..*at]);
                out.extend_from_slice(STAND_IN);
                return out;
            }
        }
    }
    out.extend_from_slice(&data[copied..]);
    out
}

/// Notes whether a write left bytes waiting for the socket.
fn note_write<T>(verdicts: &ConnectionGuard, written: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
    verdicts
        .unflushed
        .store(written.is_pending(), Ordering::Relaxed);
    written
}

/// Holds a write that found the socket full to the client's pace.
fn pace_write(
    watch: &mut Option<SendWatch>,
    cx: &mut Context<'_>,
    written: Poll<io::Result<usize>>,
) -> Poll<io::Result<usize>> {
    if let Some(watch) = watch {
        match &written {
            Poll::Ready(Ok(bytes)) => watch.written(*bytes),
            Poll::Pending => return watch.waiting(cx).map(Err),
            Poll::Ready(Err(_)) => {}
        }
    }
    written
}

impl<IO: AsyncWrite> AsyncWrite for FramingGuard<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let written = this.inner.poll_write(cx, data);
        note_write(this.verdicts, pace_write(this.send_watch, cx, written))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let written = this.inner.poll_write_vectored(cx, bufs);
        note_write(this.verdicts, pace_write(this.send_watch, cx, written))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        let flushed = this.inner.poll_flush(cx);
        if let Some(watch) = this.send_watch {
            match &flushed {
                Poll::Ready(Ok(())) => watch.flushed(),
                Poll::Pending => {
                    if let Poll::Ready(error) = watch.waiting(cx) {
                        return Poll::Ready(Err(error));
                    }
                }
                Poll::Ready(Err(_)) => {}
            }
        }
        note_write(this.verdicts, flushed)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        if this.verdicts.end_session.load(Ordering::Relaxed) {
            // hyper ends a session the server keeps the socket of.
            return Poll::Ready(Ok(()));
        }
        this.inner.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::framing::Refusal;

    #[tokio::test]
    async fn idle_only_between_answered_requests_and_the_session_ends_there() {
        use futures_util::FutureExt;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client, server) = tokio::io::duplex(256);
        let verdicts = Arc::new(ConnectionGuard::default());
        let mut guard = FramingGuard::new(server, 64 * 1024, verdicts.clone());
        let mut buf = [0u8; 256];
        assert!(verdicts.is_idle(), "a fresh connection holds nothing");

        // Half a head: held back, not idle, and no end-of-stream in the
        // middle of it.
        client
            .write_all(b"POST / HTTP/1.1\r\nContent-")
            .await
            .unwrap();
        assert!(
            guard.read(&mut buf).now_or_never().is_none(),
            "half a head is held back"
        );
        verdicts.end_session(true);
        assert!(!verdicts.is_idle());
        client.write_all(b"Length: 2\r\n\r\nab").await.unwrap();
        let n = guard.read(&mut buf).await.unwrap();
        assert_eq!(
            &buf[..n],
            b"POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\nab",
            "the head once whole, and what followed it"
        );
        verdicts.end_session(false);

        // The whole request read, not yet answered: not idle.
        assert!(!verdicts.is_idle());
        verdicts.answered();
        assert!(verdicts.is_idle());

        // A write waiting for the socket: not idle until flushed.
        let _ = note_write::<()>(&verdicts, Poll::Pending);
        assert!(!verdicts.is_idle());
        let _ = note_write(&verdicts, Poll::Ready(Ok(())));
        assert!(verdicts.is_idle());

        // Between requests an end is an end-of-stream, and bytes already
        // sent stay unread for the next session.
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        verdicts.end_session(true);
        assert_eq!(guard.read(&mut buf).await.unwrap(), 0);
        verdicts.end_session(false);
        let n = guard.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"GET / HTTP/1.1\r\n\r\n");
        assert!(!verdicts.is_idle(), "a second head, unanswered");

        // What a session read but did not use is served first, and not
        // counted a second time.
        guard.replay(Bytes::from_static(b"\r\n"));
        client.write_all(b"more").await.unwrap();
        assert_eq!(guard.read(&mut buf).await.unwrap(), 2);
        assert_eq!(&buf[..2], b"\r\n");
        assert_eq!(verdicts.heads.load(Ordering::Relaxed), 2);
        assert!(
            guard.read(&mut buf).now_or_never().is_none(),
            "the start of a third head is held back"
        );
    }

    /// Writes `pieces` one at a time, reading what the guard releases
    /// after each (into a buffer of `room` bytes), then closes and reads
    /// to the end. Returns what came out before the close, and in all.
    async fn through_guard(
        pieces: &[&[u8]],
        room: usize,
    ) -> (Vec<u8>, Vec<u8>, Arc<ConnectionGuard>) {
        use futures_util::FutureExt;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let verdicts = Arc::new(ConnectionGuard::default());
        let mut guard = FramingGuard::new(server, 64 * 1024, verdicts.clone());
        let mut got = Vec::new();
        let mut buf = vec![0u8; room];
        for piece in pieces {
            client.write_all(piece).await.unwrap();
            while let Some(read) = guard.read(&mut buf).now_or_never() {
                let n = read.unwrap();
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
        }
        let before_close = got.clone();
        drop(client);
        loop {
            let n = guard.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        (before_close, got, verdicts)
    }

    #[tokio::test]
    async fn the_verdict_is_set_before_any_byte_of_a_split_head_is_released() {
        let head: &[u8] =
            b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let pieces: Vec<&[u8]> = head.chunks(10).collect();
        let (before_close, _, verdicts) = through_guard(&pieces[..pieces.len() - 1], 128).await;
        assert!(
            before_close.is_empty(),
            "nothing of an incomplete head is released"
        );
        assert_eq!(verdicts.refused_from.load(Ordering::Acquire), u64::MAX);
        let (_, got, verdicts) = through_guard(&pieces, 128).await;
        assert_eq!(got, head, "bytes pass through unchanged");
        assert!(matches!(
            verdicts.refusal(),
            Some((Refusal::AmbiguousFraming, _))
        ));
    }

    #[tokio::test]
    async fn targets_are_encoded_whole_or_split_and_however_small_the_reads() {
        let stream: &[u8] = b"GET /api/invoices?fields=[\"id\"] HTTP/1.1\r\nHost: x\r\n\r\n\
            POST /api/a<b> HTTP/1.1\r\nContent-Length: 4\r\n\r\n\"<>\"";
        let want: &[u8] = b"GET /api/invoices?fields=[%22id%22] HTTP/1.1\r\nHost: x\r\n\r\n\
            POST /api/a%3Cb%3E HTTP/1.1\r\nContent-Length: 4\r\n\r\n\"<>\"";
        for step in [1, 5, 30, stream.len()] {
            for room in [7, 4096] {
                let pieces: Vec<&[u8]> = stream.chunks(step).collect();
                let (_, got, verdicts) = through_guard(&pieces, room).await;
                assert_eq!(
                    String::from_utf8_lossy(&got),
                    String::from_utf8_lossy(want),
                    "step {step}, room {room}: bodies are never touched"
                );
                assert!(verdicts.refusal().is_none());
            }
        }
    }

    #[tokio::test]
    async fn a_malformed_head_becomes_the_stand_in_and_nothing_after_it_is_read() {
        let stream: &[u8] =
            b"GET /ok HTTP/1.1\r\n\r\nGET /a\x01b HTTP/1.1\r\n\r\nGET /never HTTP/1.1\r\n\r\n";
        for step in [1, stream.len()] {
            let pieces: Vec<&[u8]> = stream.chunks(step).collect();
            let (_, got, verdicts) = through_guard(&pieces, 4096).await;
            assert_eq!(
                got,
                [b"GET /ok HTTP/1.1\r\n\r\n".as_slice(), STAND_IN].concat()
            );
            assert!(verdicts.refusal().is_none(), "the first request is served");
            assert!(matches!(
                verdicts.refusal(),
                Some((Refusal::MalformedRequestLine, _))
            ));
        }
    }

    #[tokio::test]
    async fn a_client_that_leaves_mid_head_hands_hyper_what_it_sent() {
        let (before_close, got, _) = through_guard(&[b"GET /a HTTP/1.1\r\nHo"], 4096).await;
        assert!(before_close.is_empty());
        assert_eq!(got, b"GET /a HTTP/1.1\r\nHo");
    }
}
