//! `POST /oauth2/token`, answered by the proxy for tools that fetch their
//! own token ([`crate::local_oauth`]): the tool's local client is checked
//! against the integrations, and the answer is a local token standing for
//! the integration, with the expiry and scopes of its Coupa credential.
//! Nothing of this request reaches Coupa.

use super::stall::BodyTimeout;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, PRAGMA, WWW_AUTHENTICATE};
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::Incoming;
use tracing::info;

use super::core::{Proxy, ProxyBody, Trace};
use super::ProxyError;
use crate::insight::Via;
use crate::local_oauth::endpoint::{self, OAuthError};

/// Lifetime of a local token while the credential holds no Coupa token
/// to take it from: Coupa's own.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(86_400);

impl Proxy {
    pub(super) async fn answer_token_request(
        &self,
        request: Request<Incoming>,
        trace: &mut Trace,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let inner = &*self.inner;
        let (parts, body) = request.into_parts();
        let read = tokio::time::timeout(
            inner.body_read_timeout,
            Limited::new(body, endpoint::MAX_BODY).collect(),
        )
        .await
        .map_err(|_| ProxyError::ClientBodyTimeout {
            why: BodyTimeout::Idle(inner.body_read_timeout),
            sent: false,
        })?;
        let outcome = match read {
            Ok(body) => {
                let body = body.to_bytes();
                self.grant(&parts, &body, trace).await
            }
            Err(_) => Err(OAuthError::InvalidRequest(format!(
                "the body is unreadable or larger than {} bytes",
                endpoint::MAX_BODY
            ))),
        };
        let integration = trace.integration.as_ref().map(|i| &*i.name).unwrap_or("");
        let (status, body) = match outcome {
            Ok(answer) => {
                inner.metrics.local_token_outcome("issued");
                info!(integration, "local token issued");
                (StatusCode::OK, answer)
            }
            Err(error) => {
                trace.reason = error.code();
                if error == OAuthError::InvalidClient {
                    trace.failed_credential = Some(crate::guesses::Guess::LocalClientSecret);
                }
                inner.metrics.local_token_outcome(error.code());
                info!(integration, error = %error, "local token refused");
                (error.status(), error.body())
            }
        };
        let mut response = Response::new(Either::Right(Full::new(Bytes::from(body.to_string()))));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        // RFC 6749 §5.1: token answers are never cached.
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        headers.insert(PRAGMA, HeaderValue::from_static("no-cache"));
        if status == StatusCode::UNAUTHORIZED {
            headers.insert(
                WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"coupa-auth-proxy\""),
            );
        }
        Ok(response)
    }

    /// Authenticates the local client, then checks grant type and scopes;
    /// the client is checked first so that a stranger learns nothing else.
    async fn grant(
        &self,
        parts: &http::request::Parts,
        body: &[u8],
        trace: &mut Trace,
    ) -> Result<serde_json::Value, OAuthError> {
        let inner = &*self.inner;
        let request = endpoint::parse(&parts.method, &parts.headers, body)?;
        let integration = {
            let integrations = inner.integrations.load();
            integrations
                .local_client(&request.client_id, &request.client_secret)
                .cloned()
                .ok_or(OAuthError::InvalidClient)?
        };
        trace.via = Via::LocalToken;
        trace.integration = Some(integration.clone());
        if request.grant_type != "client_credentials" {
            return Err(OAuthError::UnsupportedGrantType(format!(
                "{:?} is not issued here: the proxy's token endpoint takes client_credentials",
                request.grant_type
            )));
        }
        let credential = &inner.credentials[integration.credential];
        let current = credential.store.current(tokio::time::Instant::now());
        let granted: Vec<String> = match current.as_ref().and_then(|t| t.scope.as_deref()) {
            Some(scope) => scope.split_whitespace().map(str::to_owned).collect(),
            None => credential.scopes.clone(),
        };
        let beyond: Vec<&str> = request
            .scopes
            .iter()
            .filter(|s| !granted.contains(s))
            .map(String::as_str)
            .collect();
        if !beyond.is_empty() {
            return Err(OAuthError::InvalidScope(format!(
                "not granted to this client: {} (it has: {})",
                beyond.join(" "),
                granted.join(" ")
            )));
        }
        let lifetime = current
            .as_ref()
            .map(|t| t.expires_at.saturating_duration_since(t.issued_at))
            .filter(|d| !d.is_zero())
            .unwrap_or(DEFAULT_LIFETIME);
        let secret = integration.local_secret().copied().unwrap_or_default();
        let token = inner
            .local_tokens
            .issue(integration.name.clone(), secret, lifetime)
            .await;
        Ok(serde_json::json!({
            "access_token": token.expose(),
            "token_type": "bearer",
            "expires_in": lifetime.as_secs(),
            "scope": granted.join(" "),
        }))
    }
}
