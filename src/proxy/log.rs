//! Phase 6, `log`: one access line per request, its latency in the
//! metrics, and the request counted in the migration view
//! ([`crate::insight`]).

use std::time::{Duration, Instant};

use http::uri::PathAndQuery;
use http::{HeaderValue, Method, StatusCode};
use tracing::{info, warn};

use super::core::{Proxy, Trace};
use super::error::CLIENT_CLOSED_REQUEST;
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
        if !trace.reason.is_empty() {
            inner.metrics.refused_request(trace.reason);
        }
        if trace.reason.is_empty() || self.refused_line_due() {
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
        }
        inner.metrics.record(
            own,
            trace.upstream,
            &crate::metrics::Waits {
                token: trace.token_wait.unwrap_or_default(),
                queue: trace.queue_wait,
                slot: trace.slot_wait,
                resend: trace.resend_wait,
            },
        );
        let usage = self.usage(trace);
        if let Some(coupa) = trace.upstream {
            inner.insight.spent(
                usage,
                &crate::insight::Split {
                    waiting: trace.token_wait.unwrap_or_default()
                        + trace.queue_wait
                        + trace.slot_wait
                        + trace.resend_wait,
                    coupa,
                    proxy: own,
                },
            );
        }
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
        self.inner.metrics.refused_request(reason);
        if self.refused_line_due() {
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
        }
    }

    /// Whether a refused request's access line is written, under
    /// `telemetry.refused_lines_per_second`; one left out is counted, and
    /// said once a minute.
    fn refused_line_due(&self) -> bool {
        let Some(budget) = &self.inner.refused_lines else {
            return true;
        };
        if budget.take(Instant::now()) {
            return true;
        }
        self.inner.metrics.access_line_left_out();
        static LEFT_OUT: crate::telemetry::Repeated = crate::telemetry::Repeated::new();
        if let Some(earlier) = LEFT_OUT.due() {
            warn!(
                left_out = earlier + 1,
                "access lines of refused requests left out: more than telemetry.refused_lines_per_second; \
                 coupa_proxy_refused_requests_total still counts every one"
            );
        }
        false
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
