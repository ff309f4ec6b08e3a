//! Why a request could not be forwarded, and the one place where each cause
//! becomes an HTTP status with a JSON body.

use bytes::Bytes;
use http::header::{CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderValue, Response, StatusCode};
use http_body_util::{Either, Full};

use super::ProxyBody;
use crate::token::client::error_chain;

/// Seconds a client should wait before retrying while no token is held.
/// Renewal retries start at one second, so a few seconds is honest.
const NO_TOKEN_RETRY_AFTER: HeaderValue = HeaderValue::from_static("5");

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no valid access token is held yet; the proxy is fetching one")]
    NoToken,
    #[error("the request target has no path")]
    BadTarget,
    #[error("could not connect to Coupa: {0}")]
    Connect(String),
    #[error("Coupa did not answer in time: {0}")]
    Timeout(String),
    #[error("forwarding to Coupa failed: {0}")]
    Upstream(String),
}

impl ProxyError {
    pub fn from_client(error: hyper_util::client::legacy::Error) -> Self {
        let message = error_chain(&error);
        let timed_out = message.contains("timed out") || message.contains("deadline");
        if timed_out {
            ProxyError::Timeout(message)
        } else if error.is_connect() {
            ProxyError::Connect(message)
        } else {
            ProxyError::Upstream(message)
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoToken => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::BadTarget => StatusCode::BAD_REQUEST,
            ProxyError::Connect(_) | ProxyError::Upstream(_) => StatusCode::BAD_GATEWAY,
            ProxyError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// A short machine-readable cause for the JSON body.
    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::NoToken => "no_token",
            ProxyError::BadTarget => "bad_request",
            ProxyError::Connect(_) => "upstream_unreachable",
            ProxyError::Timeout(_) => "upstream_timeout",
            ProxyError::Upstream(_) => "upstream_error",
        }
    }

    pub fn into_response(self) -> Response<ProxyBody> {
        let body = serde_json::json!({
            "error": self.code(),
            "message": self.to_string(),
            "source": "coupa-auth-proxy",
        });
        let mut response = Response::new(Either::Right(Full::new(Bytes::from(body.to_string()))));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if matches!(self, ProxyError::NoToken) {
            headers.insert(RETRY_AFTER, NO_TOKEN_RETRY_AFTER);
        }
        response
    }
}
