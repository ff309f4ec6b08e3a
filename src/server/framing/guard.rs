//! The I/O half of the guard: sits between the socket and hyper, hands
//! every byte through unchanged and lets [`super::scan`] read along; also
//! notes what the server needs to see that a connection is idle.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::scan::{scan, Phase};
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
        self.replay = bytes;
    }
}

impl<IO: AsyncRead> AsyncRead for FramingGuard<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        if !this.replay.is_empty() {
            let n = this.replay.len().min(buf.remaining());
            buf.put_slice(&this.replay.split_to(n));
            return Poll::Ready(Ok(()));
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
        if this.inner.poll_read(cx, buf)?.is_pending() {
            if let Some(deadline) = this.first_byte.as_mut() {
                ready!(deadline.as_mut().poll(cx));
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "client sent nothing within the header-read timeout",
                )));
            }
            if *this.head_started {
                if let Some(deadline) = this.head_deadline.as_mut() {
                    ready!(deadline.as_mut().poll(cx));
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "request head not complete within the header-read timeout",
                    )));
                }
            }
            return Poll::Pending;
        }
        let fresh = &buf.filled()[start..];
        if !fresh.is_empty() {
            *this.first_byte = None;
        }
        if *this.phase == Phase::Passthrough || fresh.is_empty() {
            return Poll::Ready(Ok(()));
        }
        // Bytes pass through at once (hyper's own timers and its HTTP/2
        // sniffing must see them); a head split across reads is copied
        // aside until complete. hyper cannot act on a head before its last
        // byte, and the verdict is in place before that byte is returned.
        let mut heads = this.verdicts.heads.load(Ordering::Relaxed);
        if this.partial_head.is_empty() {
            let scanned = scan(fresh, this.phase, *this.max_head, &mut heads, this.verdicts);
            this.partial_head.extend_from_slice(&fresh[scanned..]);
        } else {
            this.partial_head.extend_from_slice(fresh);
            let scanned = scan(
                this.partial_head,
                this.phase,
                *this.max_head,
                &mut heads,
                this.verdicts,
            );
            this.partial_head.drain(..scanned);
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
        Poll::Ready(Ok(()))
    }
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

    #[tokio::test]
    async fn idle_only_between_answered_requests_and_the_session_ends_there() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client, server) = tokio::io::duplex(256);
        let verdicts = Arc::new(ConnectionGuard::default());
        let mut guard = FramingGuard::new(server, 64 * 1024, verdicts.clone());
        let mut buf = [0u8; 256];
        assert!(verdicts.is_idle(), "a fresh connection holds nothing");

        // Half a head: not idle, and no end-of-stream in the middle of it.
        client
            .write_all(b"POST / HTTP/1.1\r\nContent-")
            .await
            .unwrap();
        assert_eq!(guard.read(&mut buf).await.unwrap(), 25);
        verdicts.end_session(true);
        assert!(!verdicts.is_idle());
        client.write_all(b"Length: 2\r\n\r\nab").await.unwrap();
        assert!(
            guard.read(&mut buf).await.unwrap() > 0,
            "the rest of the head is read"
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
        assert_eq!(guard.read(&mut buf).await.unwrap(), 4);
    }

    #[tokio::test]
    async fn the_verdict_is_set_before_the_last_byte_of_a_split_head_is_read() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client, server) = tokio::io::duplex(64);
        let verdicts = Arc::new(ConnectionGuard::default());
        let mut guard = FramingGuard::new(server, 64 * 1024, verdicts.clone());
        let head: &[u8] =
            b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let mut got = Vec::new();
        let mut buf = [0u8; 128];
        for piece in head.chunks(10) {
            client.write_all(piece).await.unwrap();
            let n = guard.read(&mut buf).await.unwrap();
            got.extend_from_slice(&buf[..n]);
            if got.len() < head.len() {
                assert_eq!(verdicts.ambiguous.load(Ordering::Acquire), u64::MAX);
            }
        }
        assert_eq!(got, head, "bytes pass through unchanged");
        assert!(verdicts.refusal().is_some());
    }
}
