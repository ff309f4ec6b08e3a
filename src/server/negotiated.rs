//! A connection whose protocol is settled by TLS: it speaks exactly what
//! ALPN agreed (`h2` is HTTP/2 only, a bad preface getting a GOAWAY as RFC
//! 9113 §3.4 asks; anything else HTTP/1.1 only), with the bytes already
//! read of it served again first ([`Rewind`]). Both a connection to the
//! listener's own TLS ([`super::connection`]) and a tunnel to the instance
//! ([`super::tunnel`]) end here; it knows neither.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::Watcher;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_rustls::server::TlsStream;

use super::framing::{ConnectionGuard, FramingGuard};
use super::{BoxError, ConnectionService, HeadTimeout, Listener, ResponseBody};

/// What every HTTP/2 client sends first (RFC 9113 §3.4).
pub(super) const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Serves a connection whose TLS handshake is done, in exactly what ALPN
/// agreed; `prefix` is what was already read of an HTTP/1.1 session.
pub(super) async fn serve_negotiated<IO, S, B>(
    stream: TlsStream<IO>,
    prefix: Bytes,
    listener: &Listener,
    watcher: Watcher,
    verdicts: Arc<ConnectionGuard>,
    service: S,
) -> Result<(), BoxError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: ConnectionService<B>,
    B: ResponseBody,
{
    let Listener {
        builders,
        max_head,
        first_byte_timeout,
        send_pace,
        ..
    } = listener;
    let (max_head, first_byte_timeout) = (*max_head, *first_byte_timeout);
    if stream.get_ref().1.alpn_protocol() != Some(b"h2") {
        let io = FramingGuard::new(Rewind::new(prefix, stream), max_head, verdicts)
            .with_send_pace(send_pace.as_ref())
            .with_first_byte_timeout(first_byte_timeout)
            .with_head_timeout(first_byte_timeout);
        let conn = builders.h1_only.serve_connection(TokioIo::new(io), service);
        return watcher.watch(conn.into_owned()).await;
    }
    let stream = tokio::time::timeout(first_byte_timeout, check_h2_preface(stream))
        .await
        .map_err(|_| HeadTimeout("no HTTP/2 connection preface"))??;
    let io = FramingGuard::new(stream, max_head, verdicts).with_send_pace(send_pace.as_ref());
    let conn = builders.h2_only.serve_connection(TokioIo::new(io), service);
    watcher.watch(conn.into_owned()).await
}

/// Reads the connection preface of a client that agreed on `h2`. A wrong
/// one is a connection error: the client gets SETTINGS and a GOAWAY with
/// PROTOCOL_ERROR (RFC 9113 §3.4, §5.4.1) and the connection closes;
/// hyper's HTTP/2 server would close it without a word.
pub(super) async fn check_h2_preface<S>(mut stream: S) -> Result<Rewind<S>, BoxError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut preface = [0u8; 24];
    let mut read = 0;
    while read < preface.len() {
        let n = stream.read(&mut preface[read..]).await?;
        if n == 0 {
            return Err("connection closed before the HTTP/2 preface".into());
        }
        if preface[read..read + n] != H2_PREFACE[read..read + n] {
            let mut reply = Vec::with_capacity(9 + 9 + 8 + 27);
            // An empty SETTINGS frame: the server's own preface.
            reply.extend_from_slice(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0]);
            let debug = b"invalid connection preface";
            let length = (8 + debug.len()) as u8;
            reply.extend_from_slice(&[0, 0, length, 0x7, 0, 0, 0, 0, 0]);
            reply.extend_from_slice(&[0, 0, 0, 0]); // last stream id
            reply.extend_from_slice(&[0, 0, 0, 0x1]); // PROTOCOL_ERROR
            reply.extend_from_slice(debug);
            let _ = stream.write_all(&reply).await;
            let _ = stream.shutdown().await;
            return Err("invalid HTTP/2 connection preface; sent GOAWAY PROTOCOL_ERROR".into());
        }
        read += n;
    }
    Ok(Rewind::new(Bytes::from_static(H2_PREFACE), stream))
}

pin_project_lite::pin_project! {
    /// A stream whose first bytes, already read, are served again.
    pub(super) struct Rewind<S> {
        prefix: Option<Bytes>,
        #[pin]
        inner: S,
    }
}

impl<S> Rewind<S> {
    pub(super) fn new(prefix: Bytes, inner: S) -> Self {
        Self {
            prefix: (!prefix.is_empty()).then_some(prefix),
            inner,
        }
    }
}

impl<S: AsyncRead> AsyncRead for Rewind<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.project();
        if let Some(prefix) = this.prefix {
            let n = prefix.len().min(buf.remaining());
            buf.put_slice(&prefix.split_to(n));
            if prefix.is_empty() {
                *this.prefix = None;
            }
            return Poll::Ready(Ok(()));
        }
        this.inner.poll_read(cx, buf)
    }
}

impl<S: AsyncWrite> AsyncWrite for Rewind<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}
