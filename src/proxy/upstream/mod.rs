//! The connections that carry requests to Coupa: keep-alive, the HTTP
//! version `coupa.http_version` asks for, certificate verification always on.
//!
//! The proxy talks to exactly one origin, so its pool is two small parts
//! over hyper's connection-level API instead of a general client (which
//! keys a hash map by origin, races a checkout against a new connect and
//! spawns a task per request to return the connection; profiling put that
//! bookkeeping at a fifth of the proxy's instructions per request):
//! - [`h1`]: a stack of idle HTTP/1.1 connections under a cap; a connection
//!   goes back when its response body ends ([`Lease`]), with no task and no
//!   lookup;
//! - [`h2`]: shared HTTP/2 connections, a new one only when the open ones
//!   are at the server's stream limit, and one connect for a cold burst;
//! - `route`: which of the two an attempt takes, connecting and handshakes.
//!
//! A request the server provably never processed is reported as such
//! ([`UpstreamError::never_processed`]) so the caller may send it again on
//! another connection, whatever its method: an HTTP/2 stream refused
//! (`REFUSED_STREAM`) or above a GOAWAY's last stream id, or a reused
//! HTTP/1.1 connection that closed before any byte of the response (the
//! server's keep-alive ended as the request left). Servers recycle
//! connections all the time (nginx after `keepalive_requests`), so these
//! must never reach the client.

mod counting;
pub mod h1;
pub mod h2;
mod response;
mod route;

use std::sync::atomic::{AtomicU8, AtomicUsize};
use std::sync::{Arc, Weak};
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use tracing::debug;

use super::body::UpstreamBody;
use crate::background::Background;
use crate::config::{Coupa, HttpVersion};
pub use counting::{Counted, Counting};
pub use response::{IdleTimeout, ResponseBody};

use crate::metrics::UpstreamMetrics;

use crate::BoxError;
type Connector = Counting<HttpsConnector<crate::egress::EgressConnector>>;
type Io = Counted<hyper_rustls::MaybeHttpsStream<hyper_util::rt::TokioIo<tokio::net::TcpStream>>>;

/// Why a request could not be carried to Coupa.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No connection could be made (refused, DNS, TLS, connect timeout).
    #[error("{0}")]
    Connect(#[source] BoxError),
    /// Another request's connect, which this one waited for, failed.
    #[error("{0}")]
    SharedConnect(Arc<str>),
    /// Every `coupa.max_connections` connection stayed busy for the whole
    /// `coupa.connection_wait_timeout`; nothing was sent.
    #[error("all coupa.max_connections connections to Coupa stayed busy for {0:?} (coupa.connection_wait_timeout)")]
    Busy(Duration),
    /// A connection was made but the HTTP handshake failed.
    #[error("HTTP handshake failed: {0}")]
    Handshake(hyper::Error),
    /// `coupa.http_version = "http2"` but the server did not pick h2.
    #[error(
        "Coupa did not negotiate HTTP/2 (ALPN); set coupa.http_version = \"auto\" or \"http1\""
    )]
    NoHttp2,
    /// The connection failed while the request was on it.
    #[error("{error}")]
    Send {
        #[source]
        error: hyper::Error,
        /// The server provably did not process the request.
        never_processed: bool,
    },
}

impl UpstreamError {
    pub fn is_connect(&self) -> bool {
        matches!(
            self,
            UpstreamError::Connect(_) | UpstreamError::SharedConnect(_)
        )
    }

    /// Safe to send again on another connection, whatever the method.
    pub fn never_processed(&self) -> bool {
        matches!(
            self,
            UpstreamError::Send {
                never_processed: true,
                ..
            }
        )
    }
}

/// The pooled client. Cheap to clone; clones share the pool.
#[derive(Clone)]
pub struct UpstreamClient {
    pool: Arc<Pool>,
}

/// HTTP/2 connections one request tries when each turns out unable to take
/// it before it is sent.
const MAX_UNSENT_TRIES: u32 = 3;

/// What the pool has learned the server speaks (`auto` decides on the
/// first connection).
const UNKNOWN: u8 = 0;
const SPEAKS_H1: u8 = 1;
const SPEAKS_H2: u8 = 2;

struct Pool {
    connector: Connector,
    /// The same connector's egress route, swapped on reload.
    egress: crate::egress::EgressConnector,
    scheme: Scheme,
    authority: Authority,
    version: HttpVersion,
    /// For `auto`: what ALPN chose last.
    learned: AtomicU8,
    /// The HTTP/2 stream limit the last connection learned (0: none yet).
    h2_streams_hint: Arc<AtomicUsize>,
    h1: Arc<h1::Stack>,
    h2: Arc<h2::Shared>,
    metrics: UpstreamMetrics,
    /// `true` once the first warm connection was tried (opened or failed),
    /// or at once without `keep_warm`: readiness waits for it, so the
    /// first calls after a start or an upgrade find the connection open.
    first_warm: tokio::sync::watch::Sender<bool>,
}

/// Builds the client. Must be called inside the runtime: it starts the
/// task that closes idle connections after `coupa.pool_idle_timeout`.
pub fn build(
    coupa: &Coupa,
    tls: rustls::ClientConfig,
    metrics: UpstreamMetrics,
    background: &Background,
) -> UpstreamClient {
    let mut tcp = HttpConnector::new();
    tcp.enforce_http(false);
    tcp.set_nodelay(true);
    tcp.set_connect_timeout(Some(coupa.connect_timeout));
    let egress = crate::egress::EgressConnector::new(tcp, coupa.egress_proxy.as_ref());
    let tcp = egress.clone();
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http();
    // ALPN offers exactly what the configuration allows.
    let connector = match coupa.http_version {
        HttpVersion::Http1 => builder.enable_http1().wrap_connector(tcp),
        HttpVersion::Http2 => builder.enable_http2().wrap_connector(tcp),
        HttpVersion::Auto => builder.enable_http1().enable_http2().wrap_connector(tcp),
    };
    let pool = Arc::new(Pool {
        connector: Counting::new(connector, metrics.open.clone()),
        egress,
        scheme: coupa.scheme.clone(),
        authority: coupa.authority.clone(),
        version: coupa.http_version,
        learned: AtomicU8::new(UNKNOWN),
        h2_streams_hint: Arc::new(AtomicUsize::new(0)),
        h1: h1::Stack::new(
            coupa.max_connections,
            coupa.pool_idle_timeout,
            coupa.connection_wait_timeout,
        ),
        h2: h2::Shared::new(coupa.pool_idle_timeout),
        metrics,
        first_warm: tokio::sync::watch::Sender::new(!coupa.keep_warm),
    });
    let weak = Arc::downgrade(&pool);
    let keep_warm = coupa.keep_warm;
    background.spawn(|stop| reap_idle(weak, coupa.pool_idle_timeout, keep_warm, stop));
    let client = UpstreamClient { pool };
    if keep_warm {
        // Opened while the first token is fetched (same host), so the
        // first call after start-up finds a connection.
        let warming = client.clone();
        background.spawn(|stop| async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = warming.warm() => {}
            }
            warming.pool.first_warm.send_replace(true);
        });
    }
    client
}

/// Closes connections idle for longer than the idle timeout; with
/// `keep_warm`, opens one again when none is left. Ends when the pool is
/// dropped or the proxy stops.
async fn reap_idle(
    pool: Weak<Pool>,
    idle_timeout: Duration,
    keep_warm: bool,
    stop: CancellationToken,
) {
    let every = (idle_timeout / 2).max(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let Some(pool) = pool.upgrade() else {
            return;
        };
        let now = Instant::now();
        pool.h1.prune(now);
        pool.h2.prune(now);
        if keep_warm && pool.metrics.open.get() == 0 {
            let client = UpstreamClient { pool };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = client.warm() => {}
            }
        }
    }
}

/// The response, and what must be released when its body ends.
pub struct Leased {
    pub response: Response<Incoming>,
    pub lease: Lease,
}

/// The connection a response came on, lent to it. [`Lease::finish`] (the
/// body was read to its end) puts an HTTP/1.1 connection back in the pool;
/// dropped unfinished, the connection closes (a half-read response leaves
/// it unusable). For HTTP/2 it frees the stream's place.
pub struct Lease(Leg);

enum Leg {
    H1 {
        conn: Option<h1::H1Conn>,
        stack: Weak<h1::Stack>,
    },
    H2(Option<h2::Stream>),
}

impl Lease {
    /// The response body was read to its end.
    pub fn finish(&mut self) {
        match &mut self.0 {
            Leg::H1 { conn, stack } => {
                if let (Some(conn), Some(stack)) = (conn.take(), stack.upgrade()) {
                    stack.put(conn);
                }
            }
            Leg::H2(stream) => drop(stream.take()),
        }
    }
}

/// Where one attempt goes.
enum Route {
    H1 { conn: h1::H1Conn, reused: bool },
    H2(h2::Stream),
}

impl UpstreamClient {
    /// Opens a connection now unless the pool has one, and leaves it idle
    /// in the pool: the next request skips the TCP and TLS handshakes (two
    /// round trips to a distant instance). A failure is only logged: the
    /// next request connects as usual and reports it.
    pub async fn warm(&self) {
        match self.pool.route().await {
            Ok(Route::H1 { conn, reused }) => {
                self.pool.h1.put(conn);
                if !reused {
                    debug!("a warm connection to Coupa is open (HTTP/1.1)");
                }
            }
            // The connection stays shared; the stream's place is freed.
            Ok(Route::H2(stream)) => {
                drop(stream);
                debug!("a warm connection to Coupa is open (HTTP/2)");
            }
            Err(error) => debug!(%error, "could not open a warm connection to Coupa"),
        }
    }

    /// Whether the first warm connection has been tried (always, without
    /// `coupa.keep_warm`); readiness waits for it.
    pub fn first_warm(&self) -> tokio::sync::watch::Receiver<bool> {
        self.pool.first_warm.subscribe()
    }

    /// The egress proxy new connections take (a reload's new login).
    pub fn set_egress(&self, egress: Option<&crate::config::EgressProxy>) {
        self.pool.egress.set(egress);
    }

    /// Sends `request` (its URI in origin form: the instance's path and
    /// query) on a pooled connection, or a new one. A request a connection
    /// could not take before sending anything moves on to another.
    pub async fn request(
        &self,
        mut request: Request<UpstreamBody>,
    ) -> Result<Leased, UpstreamError> {
        let pool = &self.pool;
        // Reused connections that could not take the request yet (their
        // previous response is still being wound up): back to the pool
        // afterwards, not retried in this loop.
        let mut parked = Vec::new();
        // HTTP/2 connections that could not take the request before it was
        // sent; a few, then the error stands (a server that keeps refusing
        // new connections must not make this loop until the timeout).
        let mut h2_unsent = 0;
        let outcome = loop {
            let route = match pool.route().await {
                Ok(route) => route,
                Err(error) => break Err(error),
            };
            match route {
                Route::H2(stream) => {
                    let mut sender = stream.conn.sender.clone();
                    match sender.try_send_request(pool.for_h2(request)).await {
                        Ok(response) => {
                            break Ok(Leased {
                                response,
                                lease: Lease(Leg::H2(Some(stream))),
                            })
                        }
                        Err(mut failed) => {
                            let unsent = failed.take_message();
                            let never_processed =
                                unsent.is_some() || h2_never_processed(failed.error());
                            if never_processed {
                                pool.h2.retire(&stream.conn);
                            }
                            match unsent {
                                Some(unsent) if h2_unsent < MAX_UNSENT_TRIES => {
                                    debug!(error = %failed.error(), "HTTP/2 connection could not take the request; trying another");
                                    h2_unsent += 1;
                                    request = unsent;
                                }
                                _ => {
                                    break Err(UpstreamError::Send {
                                        error: failed.into_error(),
                                        never_processed,
                                    })
                                }
                            }
                        }
                    }
                }
                Route::H1 { mut conn, reused } => {
                    match conn.sender.try_send_request(pool.for_h1(request)).await {
                        Ok(response) => {
                            break Ok(Leased {
                                response,
                                lease: Lease(Leg::H1 {
                                    conn: Some(conn),
                                    stack: Arc::downgrade(&pool.h1),
                                }),
                            })
                        }
                        Err(mut failed) => match failed.take_message() {
                            // Never sent: a reused connection that closed,
                            // or one not yet ready. Try the next one.
                            Some(unsent) if reused => {
                                debug!(error = %failed.error(), "pooled connection unusable; trying another");
                                if !conn.sender.is_closed() {
                                    parked.push(conn);
                                }
                                request = unsent;
                            }
                            unsent => {
                                let error = failed.into_error();
                                let never_processed = unsent.is_some()
                                    || (reused
                                        && (error.is_incomplete_message() || error.is_canceled()));
                                break Err(UpstreamError::Send {
                                    error,
                                    never_processed,
                                });
                            }
                        },
                    }
                }
            }
        };
        for conn in parked {
            pool.h1.put(conn);
        }
        outcome
    }
}

/// HTTP/2 failures that RFC 9113 says the server did not act on: a stream
/// refused (§8.7), one above the last stream id of a GOAWAY (§6.8), and a
/// request hyper never handed to the connection: still in its queue
/// (canceled) or waiting to open under the stream limit when the
/// connection ended ("dispatch task is gone"; hyper has no accessor for
/// that kind, so its fixed text is matched).
fn h2_never_processed(error: &hyper::Error) -> bool {
    if error.is_canceled() {
        return true;
    }
    if error.is_user() && error.to_string().starts_with("dispatch task is gone") {
        return true;
    }
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = cause {
        if let Some(h2) = e.downcast_ref::<::h2::Error>() {
            let refused = h2.is_reset() && h2.reason() == Some(::h2::Reason::REFUSED_STREAM);
            return h2.is_remote() && (refused || h2.is_go_away());
        }
        cause = e.source();
    }
    false
}
