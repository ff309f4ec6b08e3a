//! Accept loop and graceful drain, shared by the proxy listener, the admin
//! listener and the fake Coupa.
//!
//! Each connection is one task ([`connection`]: protocol and TLS); plain
//! HTTP/1.1 connections give their buffers back while idle when many are
//! open ([`park`]). On shutdown the listener is dropped at once, so new
//! connections are refused, idle connections close, and in-flight requests
//! get up to the grace period to finish (their responses say
//! `Connection: close` where hyper can still add it).

mod connection;
mod negotiated;
mod park;
mod send_pace;
mod tunnel;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::Service;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

pub mod framing;

use framing::ConnectionGuard;
use park::ParkPolicy;
pub use park::{answered, AnsweredBody};

pub(crate) use crate::BoxError;

/// What a listener serves each connection with (hyper's bounds, in one
/// place): a service of its own per connection, `Unpin` so a parked
/// connection can take it back from hyper.
pub trait ConnectionService<B>:
    Service<
        Request<Incoming>,
        Response = Response<B>,
        Error: Into<BoxError>,
        Future: Send + 'static,
    > + Send
    + Unpin
    + 'static
{
}

impl<S, B> ConnectionService<B> for S where
    S: Service<
            Request<Incoming>,
            Response = Response<B>,
            Error: Into<BoxError>,
            Future: Send + 'static,
        > + Send
        + Unpin
        + 'static
{
}

/// A response body hyper can write from a connection's task.
pub trait ResponseBody: Body<Data: Send, Error: Into<BoxError>> + Send + 'static {}

impl<B> ResponseBody for B where B: Body<Data: Send, Error: Into<BoxError>> + Send + 'static {}

/// Per-listener protection against misbehaving clients, and what a
/// connection may hold while idle.
#[derive(Debug, Clone)]
pub struct Limits {
    /// A request head must arrive within this from its first byte
    /// (slowloris), and a new connection's first byte within this.
    pub header_read_timeout: Duration,
    /// How long an idle keep-alive connection stays open.
    pub keepalive_timeout: Duration,
    /// Once the server has waited this long on a client taking an answer,
    /// the client must average `min_response_rate` bytes/s (0: no minimum).
    pub min_response_rate: u64,
    pub min_rate_grace: Duration,
    /// Largest request head; HTTP/1 answers 431 beyond it.
    pub max_header_bytes: usize,
    /// Open connections beyond this get a 503 and are closed.
    pub max_connections: usize,
    /// With more connections open than this, an idle plain HTTP/1.1
    /// connection gives hyper's buffers back until its next request.
    pub release_idle_buffers_above: usize,
    /// Open and parked connections, for `/metrics`.
    pub gauges: ConnectionGauges,
    /// `CONNECT` to the instance is tunnelled (`[listen.intercept]`);
    /// without it hyper answers `CONNECT` like any other request.
    pub intercept: Option<Arc<crate::intercept::Intercept>>,
}

/// Client connections, as `/metrics` shows them.
#[derive(Debug, Clone, Default)]
pub struct ConnectionGauges {
    /// Connections open now.
    pub open: Gauge,
    /// Idle connections holding no HTTP buffers now ([`park`]).
    pub parked: Gauge,
    /// Connections closed for taking an answer too slowly.
    pub send_timeouts: Counter,
    /// Connections cut for not finishing a request head (or the TLS
    /// handshake, or sending anything) within the header-read timeout.
    pub head_timeouts: Counter,
    /// TLS handshakes with clients that failed (a client that does not
    /// trust the certificate, speaks plain HTTP to the TLS port, or offers
    /// nothing in common).
    pub tls_handshake_failures: Counter,
    /// Connections the client closed in the middle of a request head: no
    /// request began, so there is no access line.
    pub incomplete_heads: Counter,
}

impl ConnectionGauges {
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "client_connections",
            "Open client connections",
            self.open.clone(),
        );
        registry.register(
            "client_connections_parked",
            "Idle HTTP/1.1 client connections that gave their buffers back until their next request (listen.release_idle_buffers_above)",
            self.parked.clone(),
        );
        registry.register(
            "client_response_timeouts",
            "Client connections closed because the client took an answer slower than listen.min_response_rate",
            self.send_timeouts.clone(),
        );
        registry.register(
            "client_head_timeouts",
            "Client connections cut for not sending a whole request head (or the TLS handshake, or anything) within listen.header_read_timeout",
            self.head_timeouts.clone(),
        );
        registry.register(
            "client_tls_handshake_failures",
            "TLS handshakes with clients that failed ([listen.tls]): a client that does not trust the certificate, sends plain HTTP to the TLS port, or shares no protocol version or cipher",
            self.tls_handshake_failures.clone(),
        );
        registry.register(
            "client_incomplete_heads",
            "Client connections closed by the client in the middle of a request head (no request began, so no access line)",
            self.incomplete_heads.clone(),
        );
    }
}

/// A client's TLS handshake failed: counted
/// ([`ConnectionGauges::tls_handshake_failures`]) and summarised in the
/// log, since a client that keeps retrying would otherwise leave no trace
/// (its requests never begin, so it has no access line).
#[derive(Debug, thiserror::Error)]
#[error("TLS handshake failed: {0}")]
pub(crate) struct HandshakeFailed(pub std::io::Error);

/// A client that did not finish what starts a request in time: the
/// connection is cut and counted ([`ConnectionGauges::head_timeouts`]).
#[derive(Debug, thiserror::Error)]
#[error("{0} within the header-read timeout")]
pub(crate) struct HeadTimeout(pub &'static str);

/// Whether the client closed the connection in the middle of a request
/// head (hyper's "connection closed before message completed" while it
/// read one; a close mid-body ends that request as `client_gone`).
fn is_incomplete_head(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(err);
    while let Some(error) = next {
        if error
            .downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_incomplete_message)
        {
            return true;
        }
        next = error.source();
    }
    false
}

/// Whether a connection ended on the header-read timeout: ours anywhere in
/// the chain (an I/O error may carry it), or hyper's own header timer.
fn is_head_timeout(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(err);
    while let Some(error) = next {
        if error.is::<HeadTimeout>()
            || error
                .downcast_ref::<hyper::Error>()
                .is_some_and(hyper::Error::is_timeout)
            || error
                .downcast_ref::<std::io::Error>()
                .and_then(std::io::Error::get_ref)
                .is_some_and(|inner| inner.is::<HeadTimeout>())
        {
            return true;
        }
        next = error.source();
    }
    false
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(120),
            min_response_rate: 0,
            min_rate_grace: Duration::from_secs(5),
            max_header_bytes: 64 * 1024,
            max_connections: 1024,
            release_idle_buffers_above: 128,
            gauges: ConnectionGauges::default(),
            intercept: None,
        }
    }
}

/// `Keep-Alive: timeout=N` for HTTP/1.1 answers: clients that read it
/// (Apache HttpClient, Python's urllib3 does not) drop a pooled connection
/// before the server closes it, instead of sending a request into a
/// closing socket.
pub fn keep_alive_value(timeout: Duration) -> http::HeaderValue {
    let text = format!("timeout={}", timeout.as_secs().max(1));
    http::HeaderValue::try_from(text)
        .unwrap_or_else(|_| http::HeaderValue::from_static("timeout=1"))
}

/// Body of the answer to a connection over `max_connections`.
const TOO_MANY_CONNECTIONS: &str = crate::encode::error_json_static!(
    "too_many_connections",
    "the proxy's connection limit (listen.max_connections) is reached"
);

/// How a server stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drain {
    /// Every connection finished within the grace period.
    Complete,
    /// The grace period ran out with connections still open.
    TimedOut { open_connections: usize },
}

/// One connection builder per way a connection can start.
struct Builders {
    /// Plain HTTP/1.1 ([`park`]).
    http1: http1::Builder,
    /// TLS without ALPN `h2`.
    h1_only: auto::Builder<TokioExecutor>,
    /// TLS with ALPN `h2`, and plain HTTP/2 by prior knowledge.
    h2_only: auto::Builder<TokioExecutor>,
}

impl Builders {
    fn new(limits: &Limits) -> Self {
        // hyper's header-read timer runs from the end of one answer to the
        // end of the next head, idle time included: it is the keep-alive
        // bound here. The head's own bound, from its first byte, is the
        // framing guard's. (Without a timer hyper ignores the setting.)
        let mut http1 = http1::Builder::new();
        http1
            .timer(TokioTimer::new())
            .header_read_timeout(limits.keepalive_timeout)
            .max_buf_size(limits.max_header_bytes.max(8192));
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.keepalive_timeout)
            .max_buf_size(limits.max_header_bytes.max(8192));
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
        Self {
            http1,
            h1_only: builder.clone().http1_only(),
            h2_only: builder.http2_only(),
        }
    }
}

/// What every connection of one listener shares, made once.
struct Listener {
    tls: Option<TlsAcceptor>,
    builders: Builders,
    max_head: usize,
    /// A client must start (send a byte, finish the TLS handshake) within this.
    first_byte_timeout: Duration,
    /// What a client must keep up taking answers; none: no minimum.
    send_pace: Option<Arc<send_pace::SendPace>>,
    intercept: Option<Arc<crate::intercept::Intercept>>,
    policy: ParkPolicy,
    shutdown: CancellationToken,
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
    S: ConnectionService<B>,
    B: ResponseBody,
{
    let shared = Arc::new(Listener {
        tls,
        builders: Builders::new(&limits),
        max_head: limits.max_header_bytes,
        first_byte_timeout: limits.header_read_timeout,
        send_pace: (limits.min_response_rate > 0).then(|| {
            Arc::new(send_pace::SendPace {
                min_rate: limits.min_response_rate,
                grace: limits.min_rate_grace,
                timeouts: limits.gauges.send_timeouts.clone(),
            })
        }),
        intercept: limits.intercept.clone(),
        policy: ParkPolicy {
            above: i64::try_from(limits.release_idle_buffers_above).unwrap_or(i64::MAX),
            keep_alive: limits.keepalive_timeout,
            gauges: limits.gauges.clone(),
        },
        shutdown: shutdown.clone(),
    });
    let graceful = GracefulShutdown::new();
    let connections = TaskTracker::new();
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
            static AT_LIMIT: crate::telemetry::Repeated = crate::telemetry::Repeated::new();
            if let Some(left_out) = AT_LIMIT.due() {
                warn!(%peer, max_connections = limits.max_connections, left_out, "connection limit reached; refusing a connection");
            }
            tokio::spawn(refuse(stream));
            continue;
        };
        let verdicts = Arc::new(ConnectionGuard::default());
        let service = make_service(peer, verdicts.clone());
        let watcher = graceful.watcher();
        let shared = shared.clone();
        shared.policy.gauges.open.inc();
        connections.spawn(async move {
            let served =
                connection::serve_connection(stream, &shared, watcher, verdicts.clone(), service)
                    .await;
            let timed_out = match &served {
                Err(err) => is_head_timeout(err.as_ref()),
                Ok(()) => false,
            };
            if timed_out || verdicts.head_timed_out() {
                shared.policy.gauges.head_timeouts.inc();
            } else if served.as_ref().is_err_and(|err| is_incomplete_head(err.as_ref())) {
                shared.policy.gauges.incomplete_heads.inc();
            }
            if let Err(err) = served {
                if let Some(HandshakeFailed(cause)) = err.downcast_ref::<HandshakeFailed>() {
                    shared.policy.gauges.tls_handshake_failures.inc();
                    static FAILED: crate::telemetry::Repeated = crate::telemetry::Repeated::new();
                    if let Some(left_out) = FAILED.due() {
                        warn!(%peer, error = %cause, left_out,
                            "TLS handshake with a client failed (its certificate trust, or plain HTTP sent to the TLS port?)");
                    }
                }
                debug!(%peer, error = %err, "connection ended with an error");
            }
            shared.policy.gauges.open.dec();
            drop(slot);
        });
    }
    drop(listener);
    connections.close();

    let open = connections.len();
    if open > 0 {
        info!(open_connections = open, grace = ?grace, "draining connections");
    }
    // Connections served by hyper-util are told by `graceful`, the others
    // watch `shutdown`; the tracker sees them all end.
    tokio::select! {
        _ = async { graceful.shutdown().await; connections.wait().await } => Drain::Complete,
        _ = tokio::time::sleep(grace) => Drain::TimedOut { open_connections: connections.len() },
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
