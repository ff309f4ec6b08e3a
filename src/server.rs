//! Accept loop and graceful drain, shared by the proxy listener, the admin
//! listener and the fake Coupa.
//!
//! Each connection is served by hyper's auto builder (HTTP/1.1, and HTTP/2
//! by prior knowledge or ALPN). On shutdown the listener is dropped at once,
//! so new connections are refused, and in-flight requests get up to the
//! grace period to finish.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use hyper::service::Service;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

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
    shutdown: CancellationToken,
    grace: Duration,
) -> Drain
where
    M: Fn(SocketAddr) -> S,
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new());
    builder.http2().timer(TokioTimer::new());
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();

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
        let service = make_service(peer);
        let watcher = graceful.watcher();
        let builder = builder.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            if let Err(err) = serve_connection(stream, tls, &builder, service, watcher).await {
                debug!(%peer, error = %err, "connection ended with an error");
            }
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

async fn serve_connection<S, B>(
    stream: TcpStream,
    tls: Option<TlsAcceptor>,
    builder: &auto::Builder<TokioExecutor>,
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
    match tls {
        None => {
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            watcher.watch(conn.into_owned()).await
        }
        Some(acceptor) => {
            let stream = acceptor.accept(stream).await?;
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            watcher.watch(conn.into_owned()).await
        }
    }
}
