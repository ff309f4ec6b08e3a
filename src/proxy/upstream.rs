//! The connections that carry requests to Coupa: keep-alive, HTTP/1.1 or
//! HTTP/2 as ALPN decides, certificate verification always on.
//!
//! The proxy talks to exactly one origin, so its pool is a stack of idle
//! HTTP/1.1 connections (most recently used first) plus at most one shared
//! HTTP/2 connection, over hyper's connection-level API. A general client
//! (hyper-util's) keys a hash map by origin, races a checkout against a
//! new connect, and spawns a task per request to put the connection back;
//! profiling showed that bookkeeping at about a fifth of the proxy's own
//! instructions per request. Here a connection goes back when its response
//! body ends ([`Lease`]), with no task and no lookup.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use prometheus_client::metrics::gauge::Gauge;
use tokio::time::Instant;
use tower_service::Service;
use tracing::debug;

use super::body::UpstreamBody;
use crate::config::Coupa;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Connector = Counting<HttpsConnector<HttpConnector>>;

/// Why a request could not be carried to Coupa.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No connection could be made (refused, DNS, TLS, connect timeout).
    #[error("{0}")]
    Connect(#[source] BoxError),
    /// A connection was made but the HTTP handshake failed.
    #[error("HTTP handshake failed: {0}")]
    Handshake(hyper::Error),
    /// The connection failed while the request was on it.
    #[error(transparent)]
    Send(hyper::Error),
}

impl UpstreamError {
    pub fn is_connect(&self) -> bool {
        matches!(self, UpstreamError::Connect(_))
    }
}

/// The pooled client. Cheap to clone; clones share the pool.
#[derive(Clone)]
pub struct UpstreamClient {
    pool: Arc<Pool>,
}

struct Pool {
    connector: Connector,
    scheme: Scheme,
    authority: Authority,
    /// Idle HTTP/1.1 connections, the most recently used last, so busy
    /// periods reuse warm connections and quiet ones let old ones expire.
    idle: Mutex<Vec<Idle>>,
    /// The HTTP/2 connection, when Coupa negotiated h2: one carries every
    /// request.
    shared: Mutex<Option<http2::SendRequest<UpstreamBody>>>,
    idle_timeout: Duration,
}

struct Idle {
    sender: http1::SendRequest<UpstreamBody>,
    since: Instant,
}

/// `connections` counts open upstream connections (for metrics). Must be
/// called inside the runtime: it starts the task that closes idle
/// connections after `coupa.pool_idle_timeout`.
pub fn build(coupa: &Coupa, tls: rustls::ClientConfig, connections: Gauge) -> UpstreamClient {
    let mut tcp = HttpConnector::new();
    tcp.enforce_http(false);
    tcp.set_nodelay(true);
    tcp.set_connect_timeout(Some(coupa.connect_timeout));
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(tcp);
    let pool = Arc::new(Pool {
        connector: Counting::new(connector, connections),
        scheme: coupa.scheme.clone(),
        authority: coupa.authority.clone(),
        idle: Mutex::new(Vec::new()),
        shared: Mutex::new(None),
        idle_timeout: coupa.pool_idle_timeout,
    });
    tokio::spawn(reap_idle(Arc::downgrade(&pool)));
    UpstreamClient { pool }
}

/// Closes connections idle for longer than the idle timeout; ends when the
/// pool is dropped.
async fn reap_idle(pool: Weak<Pool>) {
    let Some(every) = pool
        .upgrade()
        .map(|p| (p.idle_timeout / 2).max(Duration::from_millis(100)))
    else {
        return;
    };
    loop {
        tokio::time::sleep(every).await;
        let Some(pool) = pool.upgrade() else {
            return;
        };
        pool.prune(Instant::now());
    }
}

/// The response, and the connection it came on when that connection can
/// carry another request once this response's body has been read.
pub struct Leased {
    pub response: Response<Incoming>,
    pub lease: Option<Lease>,
}

/// An HTTP/1.1 connection lent to one response: back to the pool when the
/// body has been read to its end ([`Lease::finish`]); dropped with the
/// response otherwise, which closes it (a half-read response leaves the
/// connection unusable).
pub struct Lease {
    sender: Option<http1::SendRequest<UpstreamBody>>,
    pool: Weak<Pool>,
}

impl Lease {
    /// The response body was read to its end: the connection goes back.
    pub fn finish(&mut self) {
        if let (Some(sender), Some(pool)) = (self.sender.take(), self.pool.upgrade()) {
            pool.put(sender);
        }
    }
}

enum Checkout {
    H1(http1::SendRequest<UpstreamBody>),
    H2(http2::SendRequest<UpstreamBody>),
}

impl UpstreamClient {
    /// Sends `request` (its URI in origin form: the instance's path and
    /// query) on a pooled connection, or a new one. A request that a
    /// reused connection could not take (it closed meanwhile) moves on to
    /// another connection without being sent.
    pub async fn request(
        &self,
        mut request: Request<UpstreamBody>,
    ) -> Result<Leased, UpstreamError> {
        let pool = &self.pool;
        // Reused connections that could not take the request yet (their
        // previous response is still being wound up): back to the pool
        // afterwards, not retried in this loop.
        let mut parked = Vec::new();
        let outcome = loop {
            let (checkout, reused) = match pool.checkout() {
                Some(found) => (found, true),
                None => match pool.connect().await {
                    Ok(fresh) => (fresh, false),
                    Err(error) => break Err(error),
                },
            };
            match checkout {
                Checkout::H2(mut sender) => {
                    // HTTP/2 carries the scheme and authority as pseudo-headers.
                    let path = request
                        .uri()
                        .path_and_query()
                        .cloned()
                        .unwrap_or_else(|| PathAndQuery::from_static("/"));
                    *request.uri_mut() = pool.absolute(path);
                    *request.version_mut() = Version::HTTP_2;
                    break match sender.send_request(request).await {
                        Ok(response) => Ok(Leased {
                            response,
                            lease: None,
                        }),
                        Err(error) => Err(UpstreamError::Send(error)),
                    };
                }
                Checkout::H1(mut sender) => {
                    *request.version_mut() = Version::HTTP_11;
                    match sender.try_send_request(request).await {
                        Ok(response) => {
                            let lease = Lease {
                                sender: Some(sender),
                                pool: Arc::downgrade(pool),
                            };
                            break Ok(Leased {
                                response,
                                lease: Some(lease),
                            });
                        }
                        Err(mut failed) => match failed.take_message() {
                            // Never sent: a reused connection that closed,
                            // or one not yet ready. Try the next one.
                            Some(unsent) if reused => {
                                debug!(error = %failed.error(), "pooled connection unusable; trying another");
                                if !sender.is_closed() {
                                    parked.push(sender);
                                }
                                request = unsent;
                            }
                            _ => break Err(UpstreamError::Send(failed.into_error())),
                        },
                    }
                }
            }
        };
        for sender in parked {
            pool.put(sender);
        }
        outcome
    }
}

impl Pool {
    /// A connection to send on: the shared HTTP/2 one, else the most
    /// recently used idle HTTP/1.1 one that is still open.
    fn checkout(&self) -> Option<Checkout> {
        if let Ok(mut shared) = self.shared.lock() {
            match shared.as_ref() {
                Some(sender) if !sender.is_closed() => return Some(Checkout::H2(sender.clone())),
                Some(_) => *shared = None,
                None => {}
            }
        }
        let mut idle = self.idle.lock().ok()?;
        while let Some(entry) = idle.pop() {
            if entry.sender.is_closed() || entry.since.elapsed() >= self.idle_timeout {
                continue;
            }
            return Some(Checkout::H1(entry.sender));
        }
        None
    }

    fn put(&self, sender: http1::SendRequest<UpstreamBody>) {
        if sender.is_closed() {
            return;
        }
        if let Ok(mut idle) = self.idle.lock() {
            idle.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }

    /// Drops idle connections that expired or closed.
    fn prune(&self, now: Instant) {
        if let Ok(mut idle) = self.idle.lock() {
            idle.retain(|entry| {
                !entry.sender.is_closed()
                    && now.saturating_duration_since(entry.since) < self.idle_timeout
            });
        }
    }

    fn absolute(&self, path: PathAndQuery) -> Uri {
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(path);
        Uri::from_parts(parts).unwrap_or_default()
    }

    /// A new connection; HTTP/2 when ALPN chose it (then shared).
    async fn connect(&self) -> Result<Checkout, UpstreamError> {
        let origin = self.absolute(PathAndQuery::from_static("/"));
        let io = self
            .connector
            .clone()
            .call(origin)
            .await
            .map_err(UpstreamError::Connect)?;
        if io.connected().is_negotiated_h2() {
            let (sender, connection) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(io)
                .await
                .map_err(UpstreamError::Handshake)?;
            drive(connection, "HTTP/2");
            if let Ok(mut shared) = self.shared.lock() {
                *shared = Some(sender.clone());
            }
            return Ok(Checkout::H2(sender));
        }
        let (sender, connection) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(UpstreamError::Handshake)?;
        drive(connection, "HTTP/1.1");
        Ok(Checkout::H1(sender))
    }
}

/// Runs a connection's I/O in its own task until it closes.
fn drive<C>(connection: C, protocol: &'static str)
where
    C: Future<Output = Result<(), hyper::Error>> + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            debug!(%error, protocol, "upstream connection ended");
        }
    });
}

/// Counts open upstream connections in a gauge: +1 when one is
/// established, -1 when it closes (hyper drops it).
#[derive(Clone)]
pub struct Counting<C> {
    inner: C,
    gauge: Gauge,
}

impl<C> Counting<C> {
    pub fn new(inner: C, gauge: Gauge) -> Self {
        Self { inner, gauge }
    }
}

impl<C> Service<Uri> for Counting<C>
where
    C: Service<Uri>,
    C::Future: Send + 'static,
    C::Response: Send + 'static,
    C::Error: Into<BoxError>,
{
    type Response = Counted<C::Response>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.inner.call(uri);
        let gauge = self.gauge.clone();
        Box::pin(async move {
            let io = connecting.await.map_err(Into::into)?;
            gauge.inc();
            Ok(Counted { io, gauge })
        })
    }
}

/// An upstream connection that is counted while it lives.
pub struct Counted<T> {
    io: T,
    gauge: Gauge,
}

impl<T> Drop for Counted<T> {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

impl<T: Read + Unpin> Read for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: Write + Unpin> Write for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl<T: Connection> Connection for Counted<T> {
    fn connected(&self) -> Connected {
        self.io.connected()
    }
}
