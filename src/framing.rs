//! A guard on inbound HTTP/1 connections against request smuggling by
//! ambiguous framing.
//!
//! hyper rejects most smuggling shapes itself (duplicate differing
//! `Content-Length`, obs-fold, a `Transfer-Encoding` other than chunked,
//! bad chunk sizes). One it accepts: a request with *both*
//! `Content-Length` and `Transfer-Encoding`, which RFC 9112 lets a server
//! read as chunked — and then hyper drops the `Content-Length` before the
//! proxy sees the request, so the ambiguity is invisible from inside.
//!
//! [`FramingGuard`] sits between the socket and hyper and follows the
//! request stream's framing just far enough to find each request head
//! (heads parsed with `httparse`, as hyper does; bodies skipped by length
//! or by chunk size lines). It never delays or changes a byte: it only
//! reads along. A head with both fields
//! marks that request in the connection's [`ConnectionGuard`]; the proxy
//! answers it 400 without forwarding, and hyper closes the connection after
//! it. Anything the guard does not understand it leaves to hyper, which is
//! stricter than the guard, and stops inspecting that connection.
//!
//! Following the framing also tells when an HTTP/1 connection rests between
//! requests, which the server uses to give an idle connection's buffers
//! back ([`ConnectionGuard::is_idle`], `server::park`).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Per-connection verdicts, shared by the guard (writer) and the service
/// (reader). Requests on one HTTP/1 connection are handled in order, so
/// the n-th head the guard sees is the n-th request the service gets.
///
/// Also what the server needs to see that the connection is idle. The
/// guard, the service and the server's driver all run in the connection's
/// task, so relaxed atomics suffice for those fields.
#[derive(Debug)]
pub struct ConnectionGuard {
    next_request: AtomicU64,
    /// Index of the first request with ambiguous framing; `u64::MAX` for none.
    ambiguous: AtomicU64,
    /// Request heads the guard has read whole.
    heads: AtomicU64,
    /// Responses written to their end (hyper dropped their body).
    answered: AtomicU64,
    /// The guard is between requests: expecting a head, none of it read.
    between_requests: AtomicBool,
    /// A write waits for the socket: a response is not flushed yet.
    unflushed: AtomicBool,
    /// Asked by the server: answer the next read between requests with
    /// end-of-stream, so hyper ends its session and hands the socket back.
    end_session: AtomicBool,
}

impl Default for ConnectionGuard {
    fn default() -> Self {
        Self {
            next_request: AtomicU64::new(0),
            ambiguous: AtomicU64::new(u64::MAX),
            heads: AtomicU64::new(0),
            answered: AtomicU64::new(0),
            between_requests: AtomicBool::new(true),
            unflushed: AtomicBool::new(false),
            end_session: AtomicBool::new(false),
        }
    }
}

impl ConnectionGuard {
    /// Called once per request, in order: is this one to refuse?
    pub fn next_request_is_ambiguous(&self) -> bool {
        let index = self.next_request.fetch_add(1, Ordering::Relaxed);
        index >= self.ambiguous.load(Ordering::Acquire)
    }

    fn mark_ambiguous(&self, index: u64) {
        self.ambiguous.fetch_min(index, Ordering::AcqRel);
    }

    /// A response was written to its end.
    pub fn answered(&self) {
        self.answered.fetch_add(1, Ordering::Relaxed);
    }

    /// Every request read has been answered and flushed, and nothing of
    /// the next one has arrived: hyper waits for a head and holds nothing
    /// of the client's. A connection that stopped being followed (HTTP/2,
    /// a head the guard left to hyper) is never idle.
    pub fn is_idle(&self) -> bool {
        self.between_requests.load(Ordering::Relaxed)
            && !self.unflushed.load(Ordering::Relaxed)
            && self.heads.load(Ordering::Relaxed) == self.answered.load(Ordering::Relaxed)
    }

    /// Asks the guard to end hyper's session at the next read between
    /// requests (`true`), or to stop doing so.
    pub fn end_session(&self, end: bool) {
        self.end_session.store(end, Ordering::Relaxed);
    }
}

/// Where in the request stream the guard is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Expecting a request head.
    Head,
    /// Inside a body of known length.
    Length(u64),
    /// Inside a chunked body.
    Chunk(Chunk),
    /// Not inspecting (HTTP/2, or something hyper will reject anyway).
    Passthrough,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// In a chunk-size line; `size` so far, `in_extension` after `;`.
    Size {
        size: u64,
        digits: u8,
        in_extension: bool,
    },
    /// Size line read up to its CR.
    SizeLf {
        size: u64,
    },
    Data(u64),
    /// The CRLF after chunk data.
    DataCr,
    DataLf,
    /// After the last chunk: trailer lines until an empty one.
    Trailer {
        line_len: u64,
        saw_cr: bool,
    },
}

const MAX_HEADERS: usize = 128;

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
        // A head larger than this is left for hyper to refuse (431).
        max_head: usize,
        verdicts: Arc<ConnectionGuard>,
        // Bytes already read (and scanned) that a new hyper session must
        // see first.
        replay: Bytes,
    }
}

impl<IO> FramingGuard<IO> {
    /// Closes the connection if its first byte takes longer than `timeout`.
    pub fn with_first_byte_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.first_byte = Some(Box::pin(tokio::time::sleep(timeout)));
        self
    }

    pub fn new(inner: IO, max_head: usize, verdicts: Arc<ConnectionGuard>) -> Self {
        Self {
            inner,
            phase: Phase::Head,
            partial_head: Vec::new(),
            first_byte: None,
            max_head,
            verdicts,
            replay: Bytes::new(),
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

/// Scans `data` from `phase`, returning how many bytes it is done with:
/// all of them, unless `data` ends inside a request head.
fn scan(
    data: &[u8],
    phase: &mut Phase,
    max_head: usize,
    heads_seen: &mut u64,
    verdicts: &ConnectionGuard,
) -> usize {
    let mut pos = 0;
    while pos < data.len() {
        match *phase {
            Phase::Passthrough => return data.len(),
            Phase::Head => {
                let rest = &data[pos..];
                // hyper ignores empty lines before a request line.
                if rest.starts_with(b"\r\n") {
                    pos += 2;
                    continue;
                }
                if rest == b"\r" {
                    return pos;
                }
                // Left uninitialised, as hyper does: filling 128 empty
                // headers cost more than parsing a typical head.
                let mut headers = [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() };
                    MAX_HEADERS];
                let mut request = httparse::Request::new(&mut []);
                match request.parse_with_uninit_headers(rest, &mut headers) {
                    Ok(httparse::Status::Complete(len)) => {
                        let index = *heads_seen;
                        *heads_seen += 1;
                        *phase = framing_of(request.headers, index, verdicts);
                        pos += len;
                    }
                    Ok(httparse::Status::Partial) if rest.len() <= max_head => return pos,
                    // Malformed, HTTP/2's preface, too large: hyper decides.
                    _ => *phase = Phase::Passthrough,
                }
            }
            Phase::Length(remaining) => {
                let take = remaining.min((data.len() - pos) as u64);
                pos += take as usize;
                *phase = if remaining == take {
                    Phase::Head
                } else {
                    Phase::Length(remaining - take)
                };
            }
            Phase::Chunk(Chunk::Data(remaining)) => {
                let take = remaining.min((data.len() - pos) as u64);
                pos += take as usize;
                *phase = Phase::Chunk(if remaining == take {
                    Chunk::DataCr
                } else {
                    Chunk::Data(remaining - take)
                });
            }
            Phase::Chunk(chunk) => {
                *phase = step_chunk(chunk, data[pos]);
                pos += 1;
            }
        }
    }
    pos
}

/// How the body after a head is framed, as hyper reads it; flags a head
/// with both `Content-Length` and `Transfer-Encoding`.
fn framing_of(headers: &[httparse::Header<'_>], index: u64, verdicts: &ConnectionGuard) -> Phase {
    let mut length: Option<u64> = None;
    let mut transfer_encoding = false;
    let mut chunked_last = false;
    for header in headers {
        if header.name.eq_ignore_ascii_case("content-length") {
            let parsed = std::str::from_utf8(header.value)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok());
            match (parsed, length) {
                (Some(v), None) => length = Some(v),
                (Some(v), Some(prior)) if v == prior => {}
                // Unparsable or conflicting: hyper answers 400.
                _ => return Phase::Passthrough,
            }
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            transfer_encoding = true;
            chunked_last = std::str::from_utf8(header.value)
                .ok()
                .and_then(|v| v.rsplit(',').next())
                .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
        }
    }
    match (transfer_encoding, length) {
        (true, Some(_)) => {
            verdicts.mark_ambiguous(index);
            // hyper closes the connection after this request.
            Phase::Passthrough
        }
        (true, None) if chunked_last => Phase::Chunk(Chunk::Size {
            size: 0,
            digits: 0,
            in_extension: false,
        }),
        (true, None) => Phase::Passthrough,
        (false, Some(0)) | (false, None) => Phase::Head,
        (false, Some(n)) => Phase::Length(n),
    }
}

fn step_chunk(chunk: Chunk, byte: u8) -> Phase {
    let next = match chunk {
        Chunk::Size {
            size,
            digits,
            in_extension,
        } => match byte {
            b'\r' => Chunk::SizeLf { size },
            _ if in_extension => chunk,
            b';' | b' ' | b'\t' => Chunk::Size {
                size,
                digits,
                in_extension: true,
            },
            _ => match (byte as char).to_digit(16) {
                // 16 hex digits overflow u64: hyper refuses those too.
                Some(d) if digits < 15 => Chunk::Size {
                    size: size * 16 + u64::from(d),
                    digits: digits + 1,
                    in_extension,
                },
                _ => return Phase::Passthrough,
            },
        },
        Chunk::SizeLf { size } => match byte {
            b'\n' if size == 0 => Chunk::Trailer {
                line_len: 0,
                saw_cr: false,
            },
            b'\n' => Chunk::Data(size),
            _ => return Phase::Passthrough,
        },
        Chunk::DataCr => match byte {
            b'\r' => Chunk::DataLf,
            _ => return Phase::Passthrough,
        },
        Chunk::DataLf => match byte {
            b'\n' => Chunk::Size {
                size: 0,
                digits: 0,
                in_extension: false,
            },
            _ => return Phase::Passthrough,
        },
        Chunk::Trailer { line_len, saw_cr } => match byte {
            b'\r' => Chunk::Trailer {
                line_len,
                saw_cr: true,
            },
            b'\n' if saw_cr && line_len == 0 => return Phase::Head,
            b'\n' => Chunk::Trailer {
                line_len: 0,
                saw_cr: false,
            },
            _ => Chunk::Trailer {
                line_len: line_len + 1,
                saw_cr: false,
            },
        },
        Chunk::Data(_) => chunk,
    };
    Phase::Chunk(next)
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
        this.verdicts.between_requests.store(
            *this.phase == Phase::Head && this.partial_head.is_empty(),
            Ordering::Relaxed,
        );
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

impl<IO: AsyncWrite> AsyncWrite for FramingGuard<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        note_write(this.verdicts, this.inner.poll_write(cx, data))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        note_write(this.verdicts, this.inner.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        note_write(this.verdicts, this.inner.poll_flush(cx))
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

    /// Feeds `stream` in pieces of `step` bytes, holding back what the
    /// scan does not release, as the guard does; returns the index of the
    /// first ambiguous request, if any, and the final phase.
    fn run(stream: &[u8], step: usize) -> (Option<u64>, Phase) {
        let verdicts = ConnectionGuard::default();
        let (mut phase, mut heads) = (Phase::Head, 0);
        let mut pending: Vec<u8> = Vec::new();
        for piece in stream.chunks(step) {
            pending.extend_from_slice(piece);
            let released = scan(&pending, &mut phase, 64 * 1024, &mut heads, &verdicts);
            pending.drain(..released);
        }
        let first = verdicts.ambiguous.load(Ordering::Acquire);
        ((first != u64::MAX).then_some(first), phase)
    }

    #[test]
    fn pipelined_requests_are_followed_through_bodies_in_any_split() {
        let stream = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n\
            POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
            POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
            5;ext=1\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\n\
            POST /d HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        for step in [1, 2, 3, 7, 64, stream.len()] {
            let (flagged, _) = run(stream, step);
            assert_eq!(flagged, Some(3), "step {step}");
        }
    }

    #[test]
    fn unambiguous_streams_are_not_flagged() {
        let stream = b"POST /b HTTP/1.1\r\nContent-Length: 4\r\n\r\nabcd\
            GET /c HTTP/1.1\r\n\r\n";
        let (flagged, phase) = run(stream, 5);
        assert_eq!(flagged, None);
        assert_eq!(phase, Phase::Head);
    }

    #[test]
    fn smuggled_head_hidden_in_a_body_is_not_taken_for_a_head() {
        // The body of a well-framed request looks like a request with both
        // fields; it is body data, not a head.
        let inner = b"POST /x HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let mut stream = format!(
            "POST /a HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            inner.len()
        )
        .into_bytes();
        stream.extend_from_slice(inner);
        let (flagged, phase) = run(&stream, 3);
        assert_eq!(flagged, None);
        assert_eq!(phase, Phase::Head);
    }

    #[test]
    fn http2_preface_and_garbage_switch_to_passthrough() {
        let (_, phase) = run(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 4);
        assert_eq!(phase, Phase::Passthrough);
        let (_, phase) = run(b"GET / HTTP/1.1\r\nBad Header\r\n\r\n", 4);
        assert_eq!(phase, Phase::Passthrough);
    }

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
        assert!(verdicts.next_request_is_ambiguous());
    }
}
