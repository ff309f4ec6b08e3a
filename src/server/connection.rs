//! One accepted connection, from its first bytes to its end: which
//! protocol it speaks, TLS, and which hyper connection serves it.
//!
//! A plain connection is HTTP/1.1 unless its first bytes are HTTP/2's
//! preface (prior knowledge), told by peeking, so no byte is read before
//! the framing guard sees it. HTTP/1.1 goes to [`super::park`]; HTTP/2 to
//! hyper's HTTP/2 server; bytes that start as the preface's request line
//! (`PRI * HTTP/2.0`) and then go wrong are a broken HTTP/2 attempt and get
//! the same SETTINGS + GOAWAY as on TLS, not an HTTP/1.1 400. A TLS
//! connection speaks exactly what ALPN agreed: `h2` is HTTP/2 only (a bad
//! preface gets a GOAWAY, as RFC 9113 §3.4 asks, not an HTTP/1.1 400),
//! anything else HTTP/1.1 only.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::Watcher;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use super::framing::{ConnectionGuard, FramingGuard};
use super::negotiated::{check_h2_preface, serve_negotiated, Rewind, H2_PREFACE};
use super::park;
use super::{tunnel, BoxError, ConnectionService, HeadTimeout, Listener, ResponseBody};

/// What a plain connection's first bytes say.
enum Sniffed {
    Http1,
    Http2,
    /// The preface's request line, then something else.
    BrokenHttp2,
    /// A `CONNECT` (only looked for with `[listen.intercept]`).
    Connect,
    Closed,
}

/// No HTTP/1 request starts with the preface's request line.
const H2_REQUEST_LINE: usize = b"PRI * HTTP/2.0".len();

/// How a tunnel request starts.
pub(super) const CONNECT: &[u8] = b"CONNECT ";

/// What `first` (all a client has sent so far) says, or `None` while it
/// could still be either.
fn decide(first: &[u8], connect: bool) -> Option<Sniffed> {
    if first.is_empty() {
        return Some(Sniffed::Closed);
    }
    if connect {
        let n = first.len().min(CONNECT.len());
        if first[..n] == CONNECT[..n] {
            return (n == CONNECT.len()).then_some(Sniffed::Connect);
        }
    }
    let matched = first
        .iter()
        .zip(H2_PREFACE)
        .take_while(|(a, b)| a == b)
        .count();
    match first.len() {
        n if matched < n && matched >= H2_REQUEST_LINE => Some(Sniffed::BrokenHttp2),
        n if matched < n => Some(Sniffed::Http1),
        24 => Some(Sniffed::Http2),
        _ => None,
    }
}

/// Peeks until the first bytes decide. Only a client that sent a start of
/// the preface (or of `CONNECT`) and paused is peeked again, a few
/// milliseconds apart.
async fn sniff(stream: &TcpStream, timeout: Duration, connect: bool) -> Result<Sniffed, BoxError> {
    tokio::time::timeout(timeout, async {
        let mut first = [0u8; 24];
        loop {
            let n = stream.peek(&mut first).await?;
            if let Some(sniffed) = decide(&first[..n], connect) {
                return Ok(sniffed);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .map_err(|_| HeadTimeout("client sent neither a request nor an HTTP/2 preface"))?
}

/// Serves one accepted connection with what its listener shares.
pub(super) async fn serve_connection<S, B>(
    stream: TcpStream,
    listener: &Listener,
    watcher: Watcher,
    verdicts: Arc<ConnectionGuard>,
    service: S,
) -> Result<(), BoxError>
where
    S: ConnectionService<B>,
    B: ResponseBody,
{
    // Small request/response exchanges: do not let Nagle hold them back.
    let _ = stream.set_nodelay(true);
    let Listener {
        tls,
        builders,
        max_head,
        first_byte_timeout,
        send_pace,
        intercept,
        policy,
        shutdown,
    } = listener;
    let Some(acceptor) = tls else {
        // The other ways are boxed: a connection's task is sized for its
        // largest state, and a parked HTTP/1.1 connection should be small.
        let sniffed = sniff(&stream, *first_byte_timeout, intercept.is_some()).await?;
        if let Sniffed::Connect = sniffed {
            return Box::pin(tunnel::serve_connect(
                stream, listener, watcher, verdicts, service,
            ))
            .await;
        }
        let io = FramingGuard::new(stream, *max_head, verdicts.clone())
            .with_send_pace(send_pace.as_ref());
        return match sniffed {
            Sniffed::Closed | Sniffed::Connect => Ok(()),
            Sniffed::Http1 => {
                let io = io.with_head_timeout(*first_byte_timeout);
                park::serve_http1(io, verdicts, service, &builders.http1, policy, shutdown).await
            }
            Sniffed::Http2 => {
                let conn = builders.h2_only.serve_connection(TokioIo::new(io), service);
                Box::pin(watcher.watch(conn.into_owned())).await
            }
            Sniffed::BrokenHttp2 => Box::pin(check_h2_preface(io)).await.map(drop),
        };
    };
    Box::pin(serve_tls(
        stream, acceptor, listener, watcher, verdicts, service,
    ))
    .await
}

async fn serve_tls<S, B>(
    stream: TcpStream,
    acceptor: &TlsAcceptor,
    listener: &Listener,
    watcher: Watcher,
    verdicts: Arc<ConnectionGuard>,
    service: S,
) -> Result<(), BoxError>
where
    S: ConnectionService<B>,
    B: ResponseBody,
{
    let first_byte_timeout = listener.first_byte_timeout;
    let mut stream = tokio::time::timeout(first_byte_timeout, acceptor.accept(stream))
        .await
        .map_err(|_| HeadTimeout("TLS handshake not completed"))?
        .map_err(super::HandshakeFailed)?;
    let mut prefix = Vec::new();
    if listener.intercept.is_some() && stream.get_ref().1.alpn_protocol() != Some(b"h2") {
        // A proxy reached over HTTPS: the session may start with CONNECT.
        // A TLS stream cannot be peeked: read until the start decides.
        let mut byte = [0u8; 1];
        while prefix.len() < CONNECT.len() && CONNECT.starts_with(&prefix) {
            let read = tokio::time::timeout(first_byte_timeout, stream.read(&mut byte))
                .await
                .map_err(|_| HeadTimeout("client sent no request"))??;
            if read == 0 {
                return Ok(());
            }
            prefix.push(byte[0]);
        }
        if prefix == CONNECT {
            let stream = Rewind::new(Bytes::from(prefix), stream);
            return Box::pin(tunnel::serve_connect(
                stream, listener, watcher, verdicts, service,
            ))
            .await;
        }
    }
    serve_negotiated(
        stream,
        Bytes::from(prefix),
        listener,
        watcher,
        verdicts,
        service,
    )
    .await
}
