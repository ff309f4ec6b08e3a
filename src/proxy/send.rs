//! Phase 3, `send`: one attempt is the rate limit, then the pooled client,
//! bounded by the response-header timeout; a failed attempt is sent again
//! on another connection only when that is safe.

use std::time::{Duration, Instant as StdInstant};

use http::{HeaderMap, Method, Request, Uri};
use tracing::debug;

use super::body::{Replay, UpstreamBody};
use super::core::{Proxy, Trace};
use super::upstream::{self, Leased};
use super::{ratelimit, ProxyError};
use crate::token::client::error_chain;

/// Why one attempt to reach Coupa failed.
pub(super) enum SendFailure {
    RateLimited(ratelimit::QueueFull),
    Timeout(Duration),
    /// No connection came free in time; nothing was sent.
    Busy(Duration),
    Client(upstream::UpstreamError),
}

/// How often a request the server provably did not process is sent again.
/// More than one: under load a retry can meet the next recycled connection.
const MAX_UNPROCESSED_RETRIES: u32 = 3;

impl SendFailure {
    /// A dropped or refused connection: safe to try once more for an
    /// idempotent request. A timeout is not: Coupa may still be working.
    fn is_connection_failure(&self) -> bool {
        matches!(self, SendFailure::Client(_))
    }

    /// The server did not act on the request: safe for every method.
    fn never_processed(&self) -> bool {
        matches!(self, SendFailure::Client(error) if error.never_processed())
    }
}

impl From<SendFailure> for ProxyError {
    fn from(failure: SendFailure) -> Self {
        match failure {
            SendFailure::RateLimited(full) => ProxyError::RateLimited {
                retry_after: full.retry_after,
            },
            SendFailure::Timeout(after) => {
                ProxyError::Timeout(format!("no response headers within {after:?}"))
            }
            SendFailure::Busy(waited) => ProxyError::UpstreamBusy(waited),
            SendFailure::Client(error) => {
                if let Some(egress) = crate::egress::EgressError::find(&error) {
                    return ProxyError::Egress(egress.clone());
                }
                let message = error_chain(&error);
                if timed_out(&error) {
                    ProxyError::Timeout(message)
                } else if error.is_connect() {
                    ProxyError::Unreachable(message)
                } else {
                    ProxyError::Upstream(message)
                }
            }
        }
    }
}

/// A connect timeout, or any I/O timeout along the error's causes (the
/// connector reports its timeout as `ErrorKind::TimedOut`).
fn timed_out(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(error) = cause {
        if let Some(io) = error.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::TimedOut {
                return true;
            }
        }
        cause = error.source();
    }
    false
}

fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE
    )
}

impl Proxy {
    /// Sends the request, again on another connection when that is safe:
    /// any method when the server provably did not process it, idempotent
    /// ones once after a connection failure. Each retry needs the body
    /// again, so only a body kept whole for replay is retried.
    pub(super) async fn send_with_retries(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        body: UpstreamBody,
        replay: &Replay,
        trace: &mut Trace,
    ) -> Result<Leased, ProxyError> {
        let metrics = &self.inner.metrics;
        let mut unprocessed_retries = 0;
        let mut retried_failure = false;
        let mut attempt = body;
        loop {
            let failure = match self
                .send(
                    attempt_request(method, uri, headers.clone(), attempt),
                    trace,
                )
                .await
            {
                Ok(leased) => return Ok(leased),
                Err(failure) => failure,
            };
            if let SendFailure::Client(error) = &failure {
                if let Some(egress) = crate::egress::EgressError::find(error) {
                    metrics.egress_failure(egress.cause());
                }
            }
            if let Some(why) = replay.client_stalled() {
                metrics.client_body_timeout(why.reason());
                return Err(ProxyError::ClientBodyTimeout { why, sent: true });
            }
            let retry = if failure.never_processed() {
                unprocessed_retries += 1;
                unprocessed_retries <= MAX_UNPROCESSED_RETRIES
            } else if failure.is_connection_failure() && is_idempotent(method) && !retried_failure {
                retried_failure = true;
                true
            } else {
                false
            };
            if !retry {
                return Err(failure.into());
            }
            // The body again, if it was kept whole.
            let Some(again) = replay.body() else {
                return Err(failure.into());
            };
            attempt = again;
            if failure.never_processed() {
                metrics.upstream.retried_never_processed.inc();
            } else {
                metrics.upstream.retried_connection_failure.inc();
            }
            debug!(error = %ProxyError::from(failure), "sending the request again on another connection");
        }
    }

    /// One attempt: rate limit, then the pooled client, bounded by the
    /// response-header timeout.
    pub(super) async fn send(
        &self,
        mut request: Request<UpstreamBody>,
        trace: &mut Trace,
    ) -> Result<Leased, SendFailure> {
        let inner = &*self.inner;
        if let Some(limiter) = &inner.rate_limiter {
            let lane = trace
                .integration
                .as_ref()
                .and_then(|i| i.lane.as_ref())
                .unwrap_or(limiter.unnamed());
            let queued = StdInstant::now();
            let slot = limiter.acquire(lane).await;
            trace.queue_wait += queued.elapsed();
            trace.note_wait("rate-limit queue", queued);
            slot.map_err(SendFailure::RateLimited)?;
            inner.insight.count_slot(self.usage(trace));
        }
        let attempt = trace
            .spans
            .as_mut()
            .map(|spans| spans.attempt(request.headers_mut()));
        let sent = StdInstant::now();
        let result =
            tokio::time::timeout(inner.response_header_timeout, inner.client.request(request))
                .await;
        *trace.upstream.get_or_insert(Duration::ZERO) += sent.elapsed();
        if let (Some(spans), Some(attempt)) = (&mut trace.spans, attempt) {
            let outcome = match &result {
                Ok(Ok(leased)) => Ok(leased.response.status().as_u16()),
                Ok(Err(error)) => Err(error.to_string()),
                Err(_) => Err("no answer within coupa.response_header_timeout".to_owned()),
            };
            spans.attempt_done(attempt, outcome);
        }
        match result {
            Ok(Err(upstream::UpstreamError::Busy(waited))) => Err(SendFailure::Busy(waited)),
            Ok(result) => result.map_err(SendFailure::Client),
            Err(_) => Err(SendFailure::Timeout(inner.response_header_timeout)),
        }
    }
}

/// One attempt's request to Coupa, built again for each try from the
/// rewritten parts (phase 2's `upstream_request` made them once).
pub(super) fn attempt_request(
    method: &Method,
    uri: &Uri,
    headers: HeaderMap,
    body: UpstreamBody,
) -> Request<UpstreamBody> {
    let mut request = Request::new(body);
    *request.method_mut() = method.clone();
    *request.uri_mut() = uri.clone();
    // The version is the pool's to set, per connection: the client's says
    // nothing about the upstream hop.
    *request.headers_mut() = headers;
    request
}

#[cfg(test)]
mod tests {
    use http::StatusCode;

    use super::*;

    fn connect_failure(kind: std::io::ErrorKind, text: &str) -> ProxyError {
        let io = std::io::Error::new(kind, text.to_owned());
        let boxed: Box<dyn std::error::Error + Send + Sync> = Box::new(io);
        SendFailure::Client(upstream::UpstreamError::Connect(boxed)).into()
    }

    #[test]
    fn connect_timeouts_are_504_and_refusals_502() {
        let timeout = connect_failure(std::io::ErrorKind::TimedOut, "deadline has elapsed");
        assert!(matches!(timeout, ProxyError::Timeout(_)), "{timeout:?}");
        assert_eq!(timeout.status(), StatusCode::GATEWAY_TIMEOUT);

        // Decided by the kind, not by words in the message.
        let worded = connect_failure(std::io::ErrorKind::ConnectionRefused, "timed out?");
        assert!(matches!(worded, ProxyError::Unreachable(_)), "{worded:?}");

        let refused = connect_failure(std::io::ErrorKind::ConnectionRefused, "refused");
        assert!(matches!(refused, ProxyError::Unreachable(_)), "{refused:?}");
        assert_eq!(refused.status(), StatusCode::BAD_GATEWAY);
    }
}
