//! Where one attempt goes: the version decision (`auto` learns it from the
//! first connection's ALPN), connecting, the HTTP handshakes, and the shape
//! each version wants the request in.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use http::header::HOST;
use http::uri::{PathAndQuery, Scheme};
use http::{Request, Uri, Version};
use hyper::client::conn::{http1, http2};
use hyper_util::client::legacy::connect::Connection;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tower_service::Service;
use tracing::debug;

use super::super::body::UpstreamBody;
use super::{h1, h2, Io, Pool, Route, UpstreamError, SPEAKS_H1, SPEAKS_H2};
use crate::config::HttpVersion;

impl Pool {
    /// A connection for one attempt, by the configured version. Connects
    /// and handshakes (the cold path) are boxed: every request's future,
    /// and the slot hyper keeps for it on each client connection, would
    /// otherwise be sized for a TLS connect.
    pub(super) async fn route(&self) -> Result<Route, UpstreamError> {
        let use_h2 = match self.version {
            HttpVersion::Http1 => false,
            HttpVersion::Http2 => true,
            HttpVersion::Auto => self.learned.load(Ordering::Acquire) != SPEAKS_H1,
        };
        if !use_h2 {
            return self.route_h1().await;
        }
        let connecting = match self.h2.checkout().await {
            Ok(h2::Checkout::Stream(stream)) => return Ok(Route::H2(stream)),
            Ok(h2::Checkout::Connect(connecting)) => connecting,
            Err(why) => return Err(UpstreamError::SharedConnect(why)),
        };
        // `auto` on a cold pool: this connect tells what the server speaks;
        // it takes an HTTP/1.1 slot in case the answer is HTTP/1.1.
        let slot = match self.version {
            HttpVersion::Auto => self.h1.try_reserve(),
            _ => None,
        };
        match Box::pin(self.connect()).await {
            Ok((io, negotiated_h2)) => {
                if negotiated_h2 || self.version == HttpVersion::Http2 {
                    if self.scheme == Scheme::HTTPS && !negotiated_h2 {
                        connecting.failed(&UpstreamError::NoHttp2.to_string());
                        return Err(UpstreamError::NoHttp2);
                    }
                    self.learned.store(SPEAKS_H2, Ordering::Release);
                    match Box::pin(self.handshake_h2(io)).await {
                        Ok((sender, max_streams)) => {
                            Ok(Route::H2(connecting.succeeded(sender, max_streams)))
                        }
                        Err(error) => {
                            connecting.failed(&error.to_string());
                            Err(error)
                        }
                    }
                } else {
                    self.learned.store(SPEAKS_H1, Ordering::Release);
                    drop(connecting);
                    let slot = match slot {
                        Some(slot) => slot,
                        None => match self
                            .h1
                            .checkout(|| {
                                self.metrics.queued.inc();
                            })
                            .await
                            .map_err(|busy| self.busy(busy))?
                        {
                            h1::Checkout::Connect(slot) => slot,
                            h1::Checkout::Reused(conn) => {
                                return Ok(Route::H1 { conn, reused: true })
                            }
                        },
                    };
                    let sender = Box::pin(self.handshake_h1(io)).await?;
                    Ok(Route::H1 {
                        conn: slot.with(sender),
                        reused: false,
                    })
                }
            }
            Err(error) => {
                connecting.failed(&error.to_string());
                Err(error)
            }
        }
    }

    fn busy(&self, h1::Busy(waited): h1::Busy) -> UpstreamError {
        self.metrics.wait_timeouts.inc();
        UpstreamError::Busy(waited)
    }

    async fn route_h1(&self) -> Result<Route, UpstreamError> {
        match self
            .h1
            .checkout(|| {
                self.metrics.queued.inc();
            })
            .await
            .map_err(|busy| self.busy(busy))?
        {
            h1::Checkout::Reused(conn) => Ok(Route::H1 { conn, reused: true }),
            h1::Checkout::Connect(slot) => {
                let (io, _) = Box::pin(self.connect()).await?;
                let sender = Box::pin(self.handshake_h1(io)).await?;
                Ok(Route::H1 {
                    conn: slot.with(sender),
                    reused: false,
                })
            }
        }
    }

    /// HTTP/1.1 carries the authority in `Host` (the rewrite set it).
    pub(super) fn for_h1(&self, mut request: Request<UpstreamBody>) -> Request<UpstreamBody> {
        if request.uri().scheme().is_some() {
            let origin = request.uri().path_and_query().cloned();
            *request.uri_mut() =
                Uri::from(origin.unwrap_or_else(|| PathAndQuery::from_static("/")));
        }
        *request.version_mut() = Version::HTTP_11;
        request
    }

    /// HTTP/2 carries scheme and authority as pseudo-headers, and a `Host`
    /// beside `:authority` is refused by strict servers (nginx: "duplicate
    /// host header"; RFC 9113 §8.3.1).
    pub(super) fn for_h2(&self, mut request: Request<UpstreamBody>) -> Request<UpstreamBody> {
        if request.uri().scheme().is_none() {
            let path = request
                .uri()
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/"));
            *request.uri_mut() = self.absolute(path);
        }
        request.headers_mut().remove(HOST);
        *request.version_mut() = Version::HTTP_2;
        request
    }

    fn absolute(&self, path: PathAndQuery) -> Uri {
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(path);
        Uri::from_parts(parts).unwrap_or_default()
    }

    /// A new transport connection, and whether ALPN chose h2.
    async fn connect(&self) -> Result<(Io, bool), UpstreamError> {
        let origin = self.absolute(PathAndQuery::from_static("/"));
        let io = self
            .connector
            .clone()
            .call(origin)
            .await
            .map_err(UpstreamError::Connect)?;
        let negotiated_h2 = io.connected().is_negotiated_h2();
        Ok((io, negotiated_h2))
    }

    async fn handshake_h1(
        &self,
        io: Io,
    ) -> Result<http1::SendRequest<UpstreamBody>, UpstreamError> {
        let (sender, connection) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(UpstreamError::Handshake)?;
        self.metrics.opened_http1.inc();
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                debug!(%error, "upstream HTTP/1.1 connection ended");
            }
        });
        Ok(sender)
    }

    /// The sender, and the server's stream limit as the connection's task
    /// keeps learning it (SETTINGS may change it at any time). A new
    /// connection starts from the limit the last one learned (one instance,
    /// one setting), so a burst does not overfill it before its SETTINGS
    /// arrive; the very first starts from hyper's default of 100.
    async fn handshake_h2(
        &self,
        io: Io,
    ) -> Result<(http2::SendRequest<UpstreamBody>, Arc<AtomicUsize>), UpstreamError> {
        let mut builder = http2::Builder::new(TokioExecutor::new());
        builder.timer(TokioTimer::new());
        let hint = self.h2_streams_hint.load(Ordering::Acquire);
        if hint > 0 {
            builder.initial_max_send_streams(hint);
        }
        let (sender, connection) = builder
            .handshake(io)
            .await
            .map_err(UpstreamError::Handshake)?;
        self.metrics.opened_http2.inc();
        let max_streams = Arc::new(AtomicUsize::new(connection.current_max_send_streams()));
        let learned = max_streams.clone();
        let hint = self.h2_streams_hint.clone();
        tokio::spawn(async move {
            let mut connection = Box::pin(connection);
            let ended = std::future::poll_fn(|cx| {
                let polled = connection.as_mut().poll(cx);
                let max = connection.current_max_send_streams();
                if learned.swap(max, Ordering::AcqRel) != max {
                    hint.store(max, Ordering::Release);
                }
                polled
            })
            .await;
            if let Err(error) = ended {
                debug!(%error, "upstream HTTP/2 connection ended");
            }
        });
        Ok((sender, max_streams))
    }
}
