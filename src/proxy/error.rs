//! Why a request could not be forwarded, and the one place where each cause
//! becomes an HTTP status with a JSON body.

use std::time::Duration;

use bytes::Bytes;
use http::header::{ALLOW, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderValue, Response, StatusCode};
use http_body_util::{Either, Full};

use super::core::ProxyBody;
use super::stall::BodyTimeout;

/// nginx's status for a client that closed its connection before the
/// answer: logged, never sent.
pub(super) const CLIENT_CLOSED_REQUEST: StatusCode = match StatusCode::from_u16(499) {
    Ok(status) => status,
    Err(_) => StatusCode::BAD_REQUEST,
};

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no valid access token is held: {cause}")]
    NoToken {
        cause: String,
        retry_after: Duration,
    },
    #[error("the request target has no path")]
    BadTarget,
    #[error("an HTTP/1.1 request must carry a Host header (RFC 9112 §3.2)")]
    MissingHost,
    #[error(
        "missing or unknown X-COUPA-API-KEY (or local OAuth token): this proxy only serves its configured integrations"
    )]
    UnknownApiKey,
    #[error("unknown or expired token: fetch a new one from this proxy's /oauth2/token")]
    InvalidLocalToken,
    #[error("{0} is an OAuth endpoint: this proxy answers POST /oauth2/token itself and forwards no other OAuth path to Coupa")]
    OAuthPathNotForwarded(String),
    #[error("CONNECT is not supported here: this proxy only forwards to its Coupa instance (with [listen.intercept], a CONNECT to the instance must be the first request on its connection)")]
    ConnectMethod,
    #[error("absolute-form target for {0:?}: this proxy only forwards to its Coupa instance")]
    ForeignTarget(String),
    #[error("the request body is malformed: {0}")]
    BadBody(String),
    /// `sent`: the request had started on its way to Coupa.
    #[error("the request body fell behind: {why}; {}", if *.sent {
        "the request to Coupa was abandoned midway (Coupa got an incomplete request and gave no answer)"
    } else {
        "nothing was sent to Coupa"
    })]
    ClientBodyTimeout { why: BodyTimeout, sent: bool },
    /// The client closed its connection before its request was complete
    /// (nginx's 499): nothing was sent to Coupa, and nobody reads the
    /// answer; it is for the access line.
    #[error("the client closed the connection before its request body was complete; nothing was sent to Coupa")]
    ClientGone,
    #[error("too many requests queued for Coupa's rate limit")]
    RateLimited { retry_after: Duration },
    #[error("every connection to Coupa stayed busy for {0:?} (coupa.max_connections, coupa.connection_wait_timeout); try again shortly")]
    UpstreamBusy(Duration),
    #[error("integration {integration:?} has {cap} requests at Coupa (its max_concurrent) and none finished within {waited:?}; try again shortly")]
    IntegrationBusy {
        integration: String,
        cap: usize,
        waited: Duration,
    },
    #[error("could not connect to Coupa: {0}")]
    Unreachable(String),
    /// The egress proxy failed the tunnel (it names itself and the cause).
    #[error("{0}")]
    Egress(crate::egress::EgressError),
    #[error("Coupa did not answer in time: {0}")]
    Timeout(String),
    #[error("forwarding to Coupa failed: {0}")]
    Upstream(String),
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoToken { .. }
            | ProxyError::UpstreamBusy(_)
            | ProxyError::IntegrationBusy { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::BadTarget
            | ProxyError::MissingHost
            | ProxyError::ForeignTarget(_)
            | ProxyError::BadBody(_) => StatusCode::BAD_REQUEST,
            ProxyError::ConnectMethod => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::ClientBodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            ProxyError::ClientGone => CLIENT_CLOSED_REQUEST,
            ProxyError::UnknownApiKey | ProxyError::InvalidLocalToken => StatusCode::UNAUTHORIZED,
            ProxyError::OAuthPathNotForwarded(_) => StatusCode::NOT_FOUND,
            ProxyError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::Unreachable(_) | ProxyError::Upstream(_) => StatusCode::BAD_GATEWAY,
            ProxyError::Egress(e) if e.is_timeout() => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Egress(_) => StatusCode::BAD_GATEWAY,
            ProxyError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// A short machine-readable cause for the JSON body.
    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::NoToken { .. } => "no_token",
            ProxyError::BadTarget => "bad_request",
            ProxyError::MissingHost => "missing_host",
            ProxyError::ConnectMethod => "method_not_allowed",
            ProxyError::UnknownApiKey => "unknown_api_key",
            ProxyError::InvalidLocalToken => "invalid_token",
            ProxyError::OAuthPathNotForwarded(_) => "not_forwarded",
            ProxyError::ForeignTarget(_) => "foreign_target",
            ProxyError::BadBody(_) => "bad_request_body",
            ProxyError::ClientBodyTimeout { .. } => "request_body_timeout",
            ProxyError::ClientGone => "client_gone",
            ProxyError::RateLimited { .. } => "rate_limited",
            ProxyError::UpstreamBusy(_) => "upstream_busy",
            ProxyError::IntegrationBusy { .. } => "integration_busy",
            ProxyError::Unreachable(_) => "upstream_unreachable",
            ProxyError::Egress(_) => "egress_proxy_error",
            ProxyError::Timeout(_) => "upstream_timeout",
            ProxyError::Upstream(_) => "upstream_error",
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            ProxyError::NoToken { retry_after, .. } | ProxyError::RateLimited { retry_after } => {
                Some(*retry_after)
            }
            // A connection usually frees within a second.
            ProxyError::UpstreamBusy(_) | ProxyError::IntegrationBusy { .. } => {
                Some(Duration::from_secs(1))
            }
            _ => None,
        }
    }

    pub fn into_response(self) -> Response<ProxyBody> {
        let body = crate::encode::error_json(self.code(), &self.to_string());
        let mut response = Response::new(Either::Right(Full::new(Bytes::from(body))));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if matches!(self, ProxyError::ClientBodyTimeout { .. }) {
            // The rest of the body may still come: the connection cannot
            // carry another request, and the server closes it.
            headers.insert(http::header::CONNECTION, HeaderValue::from_static("close"));
        }
        if let Some(wait) = self.retry_after() {
            // Whole seconds, rounded up, at least one.
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            headers.insert(RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        if matches!(self, ProxyError::InvalidLocalToken) {
            // RFC 6750 §3: tells an OAuth client library to fetch anew.
            headers.insert(
                http::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer error=\"invalid_token\""),
            );
        }
        if matches!(self, ProxyError::ConnectMethod) {
            headers.insert(
                ALLOW,
                HeaderValue::from_static("GET, HEAD, OPTIONS, POST, PUT, PATCH, DELETE"),
            );
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        let r = ProxyError::RateLimited {
            retry_after: Duration::from_millis(1200),
        }
        .into_response();
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()[RETRY_AFTER], "2");
        let r = ProxyError::NoToken {
            cause: "x".into(),
            retry_after: Duration::ZERO,
        }
        .into_response();
        assert_eq!(r.headers()[RETRY_AFTER], "1");
    }
}
