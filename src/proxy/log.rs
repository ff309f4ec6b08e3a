//! Phase 6, `log`: one access line per request, its latency in the
//! metrics, and the request counted in the migration view
//! ([`crate::insight`]).

use std::time::{Duration, Instant};

use http::uri::PathAndQuery;
use http::{HeaderValue, Method, StatusCode};
use tracing::{info, warn};

use super::error::CLIENT_CLOSED_REQUEST;
use super::{Proxy, Trace};
use crate::traces::Finished;

/// A W3C trace id in the access line: 32 hex digits, or empty.
struct TraceIdField(Option<opentelemetry::trace::TraceId>);

impl std::fmt::Display for TraceIdField {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(id) => write!(f, "{id}"),
            None => Ok(()),
        }
    }
}

/// The request as the log line names it.
pub(super) struct Handled<'a> {
    pub method: &'a Method,
    pub target: Option<&'a PathAndQuery>,
    pub id: &'a HeaderValue,
    pub started: Instant,
}

/// One request's access line, written when this is dropped: with the
/// answer's `status` once it is known, or as 499 `client_gone` when the
/// server dropped the request's future because its client went away (503
/// `cut_at_shutdown` when the grace period ran out on it).
pub(super) struct Record<'a> {
    pub proxy: &'a Proxy,
    pub handled: Handled<'a>,
    pub trace: Trace,
    pub status: Option<StatusCode>,
}

impl Drop for Record<'_> {
    fn drop(&mut self) {
        let status = match self.status {
            Some(status) => status,
            None if self.proxy.cut_at_shutdown() => {
                self.trace.reason = "cut_at_shutdown";
                StatusCode::SERVICE_UNAVAILABLE
            }
            None => {
                self.trace.reason = "client_gone";
                CLIENT_CLOSED_REQUEST
            }
        };
        self.proxy.log(&self.handled, &self.trace, status);
        if let (Some(traces), Some(spans)) = (&self.proxy.inner.traces, self.trace.spans.take()) {
            let path = self.handled.target.map(|t| t.path()).unwrap_or("");
            traces.finish(
                *spans,
                Finished {
                    method: self.handled.method.as_str(),
                    path,
                    route: crate::insight::resource_of(path).label(),
                    status: status.as_u16(),
                    integration: self
                        .trace
                        .integration
                        .as_ref()
                        .map(|i| &*i.name)
                        .unwrap_or(""),
                    reason: self.trace.reason,
                },
            );
        }
    }
}

impl Proxy {
    pub(super) fn log(&self, handled: &Handled<'_>, trace: &Trace, status: StatusCode) {
        let inner = &*self.inner;
        let total = handled.started.elapsed();
        // What is left once every wait is taken out: the proxy's own time.
        let own = total.saturating_sub(
            trace.upstream.unwrap_or_default()
                + trace.token_wait.unwrap_or_default()
                + trace.queue_wait
                + trace.slot_wait
                + trace.resend_wait
                + trace.guess_delay,
        );
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        // The query string can carry business data; only the path is logged.
        let path = handled.target.map(|t| t.path()).unwrap_or("");
        info!(
            target: "coupa_auth_proxy::access",
            method = %handled.method,
            path,
            integration = trace.integration.as_ref().map(|i| &*i.name).unwrap_or(""),
            request_id = handled.id.to_str().unwrap_or(""),
            status = status.as_u16(),
            duration_ms = ms(total),
            upstream_ms = trace.upstream.map(ms),
            token_wait_ms = trace.token_wait.map_or(0.0, ms),
            queue_ms = ms(trace.queue_wait),
            slot_ms = ms(trace.slot_wait),
            guess_delay_ms = ms(trace.guess_delay),
            resends = trace.resends,
            resend_wait_ms = ms(trace.resend_wait),
            proxy_ms = ms(own),
            reason = trace.reason,
            trace_id = %TraceIdField(trace.trace_id),
            "request"
        );
        if !trace.reason.is_empty() {
            inner.metrics.refused_request(trace.reason);
        }
        inner.metrics.record(own, trace.upstream);
        let usage = self.usage(trace);
        let refused =
            trace.upstream.is_none() && (status.is_client_error() || status.is_server_error());
        if inner
            .insight
            .record(usage, trace.via, handled.method, path, status, refused)
        {
            self.log_forbidden(trace, handled.method, path);
        }
    }

    /// A request the server refused before any phase ran (the framing
    /// guard's verdict): its access line, with the refusal's `reason`, and
    /// its count. A malformed head was never parsed: it has no method or
    /// path to name.
    pub fn log_refused(
        &self,
        request: &http::Request<hyper::body::Incoming>,
        reason: &'static str,
        parsed: bool,
        status: StatusCode,
    ) {
        let (method, path) = if parsed {
            (request.method().as_str(), request.uri().path())
        } else {
            ("", "")
        };
        info!(
            target: "coupa_auth_proxy::access",
            method,
            path,
            integration = "",
            request_id = "",
            status = status.as_u16(),
            duration_ms = 0.0,
            reason,
            trace_id = "",
            "request"
        );
        self.inner.metrics.refused_request(reason);
    }

    /// Coupa's 403, once per (integration, method, resource) an hour: the
    /// credential most likely lacks a scope for the resource.
    fn log_forbidden(&self, trace: &Trace, method: &Method, path: &str) {
        let inner = &*self.inner;
        let credential = &inner.credentials[trace
            .integration
            .as_ref()
            .map(|i| i.credential)
            .unwrap_or(inner.default_credential)];
        let granted = credential
            .store
            .current(tokio::time::Instant::now())
            .and_then(|t| t.scope.clone())
            .unwrap_or_else(|| credential.scopes.join(" "));
        warn!(
            integration = trace.integration.as_ref().map(|i| &*i.name).unwrap_or("(none)"),
            credential = credential.name,
            granted_scopes = granted,
            method = %method,
            resource = crate::insight::resource_of(path).label(),
            "Coupa answered 403: the credential probably lacks a scope for this resource; \
             {}/oauth2/scopes on the instance lists each scope's API permissions \
             (logged once an hour per integration, method and resource)",
            inner.base_url.trim_end_matches('/'),
        );
    }
}
