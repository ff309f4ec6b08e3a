//! Accept loop and graceful drain, shared by the proxy listener, the admin
//! listener and the fake Coupa.
//!
//! A plain connection is served by hyper's auto builder (HTTP/1.1, or HTTP/2
//! by prior knowledge). A TLS connection speaks exactly what ALPN agreed:
//! `h2` is HTTP/2 only (a bad preface gets a GOAWAY, as RFC 9113 §3.4 asks,
//! not an HTTP/1.1 400), anything else HTTP/1.1 only. On shutdown the listener is dropped at once,
//! so new connections are refused, and in-flight requests get up to the
//! grace period to finish.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use hyper::service::Service;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

use crate::framing::{ConnectionGuard, FramingGuard};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Per-listener protection against misbehaving clients.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// A request head must arrive within this (slowloris).
    pub header_read_timeout: Duration,
    /// Largest request head; HTTP/1 answers 431 beyond it.
    pub max_header_bytes: usize,
    /// Open connections beyond this get a 503 and are closed.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 64 * 1024,
            max_connections: 1024,
        }
    }
}

/// Body of the answer to a connection over `max_connections`.
const TOO_MANY_CONNECTIONS: &str = r#"{"error":"too_many_connections","message":"the proxy's connection limit (listen.max_connections) is reached","source":"coupa-auth-proxy"}"#;

/// How a server stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drain {
    /// Every connection finished within the grace period.
    Complete,
    /// The grace period ran out with connections still open.
    TimedOut { open_connections: usize },
}

/// Serves connections from `listener` until `shutdown` is cancelled, then
/// drains. `make_service` is called once per connection with the peer
/// address. With `tls`, connections are TLS first.
pub async fn serve<M, S, B>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    make_service: M,
    limits: Limits,
    shutdown: CancellationToken,
    grace: Duration,
) -> Drain
where
    M: Fn(SocketAddr, Arc<ConnectionGuard>) -> S,
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        // Without a timer hyper silently ignores header_read_timeout.
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    let builders = Arc::new(Builders {
        h1_only: builder.clone().http1_only(),
        h2_only: builder.clone().http2_only(),
        sniffing: builder,
    });
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections));

    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(err) => {
                    // Usually EMFILE: pause so the loop does not spin while
                    // descriptors are exhausted.
                    warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            warn!(%peer, max_connections = limits.max_connections, "connection limit reached; refusing a connection");
            tokio::spawn(refuse(stream));
            continue;
        };
        let verdicts = Arc::new(ConnectionGuard::default());
        let service = make_service(peer, verdicts.clone());
        let watcher = graceful.watcher();
        let builders = builders.clone();
        let tls = tls.clone();
        let max_head = limits.max_header_bytes;
        tokio::spawn(async move {
            let guarded = Guarded {
                verdicts,
                max_head,
                first_byte_timeout: limits.header_read_timeout,
            };
            if let Err(err) =
                serve_connection(stream, tls, guarded, &builders, service, watcher).await
            {
                debug!(%peer, error = %err, "connection ended with an error");
            }
            drop(slot);
        });
    }
    drop(listener);

    let open = graceful.count();
    if open > 0 {
        info!(open_connections = open, grace = ?grace, "draining connections");
    }
    tokio::select! {
        _ = graceful.shutdown() => Drain::Complete,
        _ = tokio::time::sleep(grace) => Drain::TimedOut { open_connections: open },
    }
}

/// Answers a connection over the limit with a 503 and closes it.
async fn refuse(mut stream: TcpStream) {
    use tokio::io::AsyncWriteExt;
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let response = format!(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
             retry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{}",
            TOO_MANY_CONNECTIONS.len(),
            TOO_MANY_CONNECTIONS
        );
        let _ = stream.write_all(response.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// One connection builder per way a connection can start.
struct Builders {
    /// Plain connections: HTTP/1.1, or HTTP/2 by prior knowledge.
    sniffing: auto::Builder<TokioExecutor>,
    /// TLS without ALPN `h2`.
    h1_only: auto::Builder<TokioExecutor>,
    /// TLS with ALPN `h2`.
    h2_only: auto::Builder<TokioExecutor>,
}

/// What the framing guard of one connection needs.
struct Guarded {
    verdicts: Arc<ConnectionGuard>,
    max_head: usize,
    first_byte_timeout: Duration,
}

async fn serve_connection<S, B>(
    stream: TcpStream,
    tls: Option<TlsAcceptor>,
    guarded: Guarded,
    builders: &Builders,
    service: S,
    watcher: hyper_util::server::graceful::Watcher,
) -> Result<(), BoxError>
where
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    // Small request/response exchanges: do not let Nagle hold them back.
    let _ = stream.set_nodelay(true);
    let Guarded {
        verdicts,
        max_head,
        first_byte_timeout,
    } = guarded;
    match tls {
        None => {
            let io = FramingGuard::new(stream, max_head, verdicts)
                .with_first_byte_timeout(first_byte_timeout);
            let conn = builders
                .sniffing
                .serve_connection(TokioIo::new(io), service);
            watcher.watch(conn.into_owned()).await
        }
        Some(acceptor) => {
            let stream = tokio::time::timeout(first_byte_timeout, acceptor.accept(stream))
                .await
                .map_err(|_| "TLS handshake not completed within the header-read timeout")??;
            if stream.get_ref().1.alpn_protocol() != Some(b"h2") {
                let io = FramingGuard::new(stream, max_head, verdicts)
                    .with_first_byte_timeout(first_byte_timeout);
                let conn = builders.h1_only.serve_connection(TokioIo::new(io), service);
                return watcher.watch(conn.into_owned()).await;
            }
            let stream = tokio::time::timeout(first_byte_timeout, check_h2_preface(stream))
                .await
                .map_err(|_| "no HTTP/2 connection preface within the header-read timeout")??;
            let io = FramingGuard::new(stream, max_head, verdicts);
            let conn = builders.h2_only.serve_connection(TokioIo::new(io), service);
            watcher.watch(conn.into_owned()).await
        }
    }
}

/// What every HTTP/2 client sends first (RFC 9113 §3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Reads the connection preface of a client that agreed on `h2`. A wrong
/// one is a connection error: the client gets SETTINGS and a GOAWAY with
/// PROTOCOL_ERROR (RFC 9113 §3.4, §5.4.1) and the connection closes;
/// hyper's HTTP/2 server would close it without a word.
async fn check_h2_preface<S>(mut stream: S) -> Result<Rewind<S>, BoxError>
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
    Ok(Rewind {
        prefix: Some(Bytes::from_static(H2_PREFACE)),
        inner: stream,
    })
}

pin_project_lite::pin_project! {
    /// A stream whose first bytes, already read, are served again.
    struct Rewind<S> {
        prefix: Option<Bytes>,
        #[pin]
        inner: S,
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
