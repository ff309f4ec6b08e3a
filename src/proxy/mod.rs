//! The request path: one client request in, one Coupa request out.
//!
//! A request goes through named phases, so a reader knows where a change
//! belongs:
//! 1. `request_filter`: is there a valid token? If not, 503 and stop.
//! 2. `upstream_request`: target URI and header rewrite ([`headers`]).
//! 3. send over the pooled client ([`upstream`]), bodies streaming.
//! 4. `response_filter`: hop-by-hop removal on the way back.
//! 5. `log`: one access line.
//!
//! Failures become responses in one place ([`error`]).

pub mod error;
pub mod headers;
pub mod upstream;

use std::sync::Arc;
use std::time::Instant as StdInstant;

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, Uri, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use tracing::info;

use crate::config::Config;
use crate::token::TokenStore;
pub use error::ProxyError;
pub use headers::{ClientInfo, RewriteRules};
pub use upstream::UpstreamClient;

/// Response body: Coupa's streamed through, or one the proxy wrote itself.
pub type ProxyBody = Either<Incoming, Full<Bytes>>;

/// Where requests go and how they are rewritten. Cheap to clone.
#[derive(Clone)]
pub struct Proxy {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<TokenStore>,
    client: UpstreamClient,
    rules: RewriteRules,
    scheme: Scheme,
    authority: Authority,
    /// Path the instance lives under; empty for a normal instance URL.
    path_prefix: String,
}

impl Proxy {
    pub fn new(config: &Config, store: Arc<TokenStore>, client: UpstreamClient) -> Self {
        let coupa = &config.coupa;
        let rules = RewriteRules {
            upstream_host: HeaderValue::from_str(coupa.authority.as_str())
                .unwrap_or_else(|_| HeaderValue::from_static("localhost")),
            default_accept: coupa.accept.clone(),
            forwarded_proto: HeaderValue::from_static("http"),
        };
        Self {
            inner: Arc::new(Inner {
                store,
                client,
                rules,
                scheme: coupa.scheme.clone(),
                authority: coupa.authority.clone(),
                path_prefix: coupa.path_prefix.clone(),
            }),
        }
    }

    /// Handles one client request; never fails (failures are responses).
    pub async fn handle(
        &self,
        request: Request<Incoming>,
        client: &ClientInfo,
    ) -> Response<ProxyBody> {
        let started = StdInstant::now();
        let method = request.method().clone();
        let target = request.uri().path_and_query().cloned();
        let response = match self.forward(request, target.as_ref(), client).await {
            Ok(response) => response,
            Err(err) => {
                if !matches!(err, ProxyError::NoToken) {
                    tracing::warn!(error = %err, "request failed");
                }
                err.into_response()
            }
        };
        // The query string can carry business data; only the path is logged.
        info!(
            target: "coupa_auth_proxy::access",
            method = %method,
            path = target.as_ref().map(|t| t.path()).unwrap_or(""),
            status = response.status().as_u16(),
            duration_ms = started.elapsed().as_secs_f64() * 1000.0,
            "request"
        );
        response
    }

    async fn forward(
        &self,
        request: Request<Incoming>,
        target: Option<&PathAndQuery>,
        client: &ClientInfo,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let inner = &*self.inner;

        // request_filter
        let bearer = inner
            .store
            .bearer(tokio::time::Instant::now())
            .ok_or(ProxyError::NoToken)?;

        // upstream_request
        let (mut parts, body) = request.into_parts();
        let target = target.ok_or(ProxyError::BadTarget)?;
        let upstream_uri = self.upstream_uri(target)?;
        headers::rewrite_request(
            &mut parts.headers,
            parts.uri.authority(),
            &inner.rules,
            bearer,
            client,
        );
        parts.uri = upstream_uri;
        // The pool picks HTTP/1.1 or HTTP/2 per connection; the client's
        // version says nothing about the upstream hop.
        parts.version = Version::HTTP_11;

        // send
        let response = inner
            .client
            .request(Request::from_parts(parts, body))
            .await
            .map_err(ProxyError::from_client)?;

        // response_filter
        let (mut parts, body) = response.into_parts();
        headers::rewrite_response(&mut parts.headers);
        Ok(Response::from_parts(parts, Either::Left(body)))
    }

    /// `base_url` + the request's path and query, byte for byte.
    fn upstream_uri(&self, target: &PathAndQuery) -> Result<Uri, ProxyError> {
        let inner = &*self.inner;
        let path_and_query = if inner.path_prefix.is_empty() {
            target.clone()
        } else {
            let joined = format!("{}{}", inner.path_prefix, target.as_str());
            PathAndQuery::from_maybe_shared(Bytes::from(joined))
                .map_err(|_| ProxyError::BadTarget)?
        };
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(inner.scheme.clone());
        parts.authority = Some(inner.authority.clone());
        parts.path_and_query = Some(path_and_query);
        Uri::from_parts(parts).map_err(|_| ProxyError::BadTarget)
    }
}
