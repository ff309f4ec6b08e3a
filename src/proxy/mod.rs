//! The request path: one client request in, one Coupa request out.
//!
//! A request goes through named phases, so a reader knows where a change
//! belongs:
//! 1. `request_filter`: a target this proxy serves, an integration known
//!    by its legacy key or local token ([`auth`]), and a valid token; if
//!    not, an error answer and nothing is forwarded. `POST /oauth2/token`
//!    is answered here by the proxy itself ([`local_token`]).
//! 2. `upstream_request`: target URI and header rewrite ([`headers`]); the
//!    body is wrapped so it can be replayed ([`body`]).
//! 3. `send`: rate limit ([`ratelimit`]), pooled client ([`upstream`]),
//!    response-header timeout. Sent again on another connection when the
//!    server provably did not process it (any method, a few times), or
//!    once after a connection failure (idempotent methods only).
//! 4. `on_rejected_token`: Coupa answered 401, so fetch a new token (once
//!    for a whole burst) and replay the request once.
//! 5. `response_filter`: hop-by-hop removal, stall guard on the body.
//! 6. `log`: one access line, and the request counted in the migration
//!    view ([`crate::insight`]).
//!
//! Phases 3 and 4 have files of their own ([`send`], [`rejected`]).
//! Failures become answers in one place ([`error`]).

pub mod auth;
pub mod body;
pub mod error;
pub mod headers;
mod local_token;
pub mod ratelimit;
mod rejected;
mod send;
mod stall;
pub mod upstream;

use std::sync::Arc;
use std::time::{Duration, Instant as StdInstant, SystemTime};

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use tracing::{debug, info, warn};

use crate::cluster::Cluster;
use crate::config::Config;
use crate::insight::{Insight, Via};
use crate::local_oauth::{self, LocalTokens};
use crate::metrics::Metrics;
use crate::token::TokenStore;
use arc_swap::ArcSwap;
use auth::{IntegrationKey, Integrations};
use body::UpstreamBody;
pub use error::ProxyError;
pub use headers::{ClientInfo, RewriteRules};
use ratelimit::{Limiter, RateLimiter, SharedBudget};
use upstream::ResponseBody;
pub use upstream::UpstreamClient;

/// Response body: Coupa's streamed through, or one the proxy wrote itself.
pub type ProxyBody = Either<ResponseBody, Full<Bytes>>;

/// Where requests go and how they are rewritten. Cheap to clone.
#[derive(Clone)]
pub struct Proxy {
    inner: Arc<Inner>,
}

/// One OAuth credential as the request path sees it.
pub struct CredentialSlot {
    pub name: String,
    /// The scopes configured (asked for); the token says which were granted.
    pub scopes: Vec<String>,
    pub store: Arc<TokenStore>,
    /// After a 401-triggered token fetch, no other one within this.
    pub rejected_token_cooldown: Duration,
    /// How long a request that got 401 waits for a fresh token.
    pub token_wait: Duration,
}

struct Inner {
    credentials: Vec<CredentialSlot>,
    /// Used when no integrations are configured.
    default_credential: usize,
    /// Swapped whole on reload; read lock-free per request.
    integrations: ArcSwap<Integrations>,
    client: UpstreamClient,
    rules: RewriteRules,
    scheme: Scheme,
    authority: Authority,
    /// Path the instance lives under; empty for a normal instance URL.
    path_prefix: String,
    response_header_timeout: Duration,
    idle_timeout: Duration,
    body_read_timeout: Duration,
    replay_body_limit: usize,
    rate_limiter: Option<Limiter>,
    metrics: Arc<Metrics>,
    insight: Arc<Insight>,
    local_tokens: LocalTokens,
    /// The instance URL, for hints in log lines.
    base_url: String,
}

/// What the request path learns about a request, for its log line and
/// metrics.
#[derive(Default)]
struct Trace {
    integration: Option<Arc<IntegrationKey>>,
    /// How the integration was identified.
    via: Via,
    /// Time spent waiting for Coupa's response headers (all attempts).
    upstream: Option<Duration>,
}

impl Proxy {
    /// `stores` holds one token store per entry of `config.credentials`;
    /// with `cluster`, `[coupa.rate_limit]` is the instance-wide budget.
    pub fn new(
        config: &Config,
        stores: &[Arc<TokenStore>],
        client: UpstreamClient,
        metrics: Arc<Metrics>,
        insight: Arc<Insight>,
        cluster: Option<Arc<Cluster>>,
    ) -> Self {
        let coupa = &config.coupa;
        let rules = RewriteRules {
            upstream_host: HeaderValue::from_str(coupa.authority.as_str())
                .unwrap_or_else(|_| HeaderValue::from_static("localhost")),
            default_accept: coupa.accept.clone(),
            forwarded_proto: HeaderValue::from_static(if config.listen.tls.is_some() {
                "https"
            } else {
                "http"
            }),
        };
        let credentials = config
            .credentials
            .iter()
            .zip(stores)
            .map(|(credential, store)| CredentialSlot {
                name: credential.name.clone(),
                scopes: credential.oauth.scopes.clone(),
                store: store.clone(),
                rejected_token_cooldown: credential.oauth.rejected_token_cooldown,
                token_wait: credential.oauth.request_timeout,
            })
            .collect();
        Self {
            inner: Arc::new(Inner {
                credentials,
                default_credential: config.default_credential(),
                integrations: ArcSwap::from_pointee(Integrations::from_config(
                    &config.integrations,
                    &insight,
                )),
                client,
                rules,
                scheme: coupa.scheme.clone(),
                authority: coupa.authority.clone(),
                path_prefix: coupa.path_prefix.clone(),
                response_header_timeout: coupa.response_header_timeout,
                idle_timeout: coupa.idle_timeout,
                body_read_timeout: config.listen.body_read_timeout,
                replay_body_limit: coupa.replay_body_limit,
                rate_limiter: coupa.rate_limit.map(|limit| match &cluster {
                    Some(cluster) => Limiter::Shared(SharedBudget::new(cluster.clone(), limit)),
                    None => Limiter::Local(RateLimiter::new(limit)),
                }),
                metrics,
                insight,
                local_tokens: LocalTokens::new(cluster),
                base_url: coupa.base_url.clone(),
            }),
        }
    }

    /// Takes the integrations of a reloaded config; requests already past
    /// identification keep the answer they got, and the migration view
    /// keeps the counts of integrations that stay.
    pub fn reconfigure(&self, config: &Config) {
        let inner = &*self.inner;
        inner.insight.configure(config);
        inner.integrations.store(Arc::new(Integrations::from_config(
            &config.integrations,
            &inner.insight,
        )));
    }

    /// Handles one client request; never fails (failures are responses).
    pub async fn handle(
        &self,
        mut request: Request<Incoming>,
        client: &ClientInfo,
    ) -> Response<ProxyBody> {
        let started = StdInstant::now();
        let _in_flight = self.inner.metrics.in_flight();
        let request_id = headers::request_id(request.headers_mut());
        let method = request.method().clone();
        let target = request.uri().path_and_query().cloned();
        let mut trace = Trace::default();
        let mut response = match self
            .forward(request, target.as_ref(), client, &mut trace)
            .await
        {
            Ok(response) => response,
            Err(err) => {
                if !matches!(err, ProxyError::NoToken { .. }) {
                    warn!(error = %err, "request not forwarded");
                }
                err.into_response()
            }
        };
        // The same id reaches Coupa and comes back, so one call can be
        // followed through the integration, the proxy and Coupa support.
        response
            .headers_mut()
            .insert(headers::X_REQUEST_ID, request_id.clone());
        // The query string can carry business data; only the path is logged.
        let path = target.as_ref().map(|t| t.path()).unwrap_or("");
        let status = response.status();
        info!(
            target: "coupa_auth_proxy::access",
            method = %method,
            path,
            integration = trace.integration.as_ref().map(|i| &*i.name).unwrap_or(""),
            request_id = request_id.to_str().unwrap_or(""),
            status = status.as_u16(),
            duration_ms = started.elapsed().as_secs_f64() * 1000.0,
            "request"
        );
        let inner = &*self.inner;
        inner.metrics.record(started.elapsed(), trace.upstream);
        let usage = match &trace.integration {
            Some(integration) => &integration.usage,
            None => inner.insight.unnamed(),
        };
        let refused =
            trace.upstream.is_none() && (status.is_client_error() || status.is_server_error());
        if inner
            .insight
            .record(usage, trace.via, &method, path, status, refused)
        {
            self.log_forbidden(&trace, &method, path);
        }
        response
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

    async fn forward(
        &self,
        request: Request<Incoming>,
        target: Option<&PathAndQuery>,
        client: &ClientInfo,
        trace: &mut Trace,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let inner = &*self.inner;

        // request_filter
        self.check_target(&request)?;
        if local_oauth::is_oauth_path(request.uri().path()) {
            if request.uri().path() == local_oauth::TOKEN_PATH {
                return self.answer_token_request(request, trace).await;
            }
            return Err(ProxyError::OAuthPathNotForwarded(
                request.uri().path().to_owned(),
            ));
        }
        let credential = match self.identify(request.headers(), trace).await? {
            Some(credential) => &inner.credentials[credential],
            None => &inner.credentials[inner.default_credential],
        };
        let bearer = credential
            .store
            .bearer(tokio::time::Instant::now())
            .ok_or_else(|| self.no_token(credential))?;

        // upstream_request
        let (mut parts, body) = request.into_parts();
        let target = target.ok_or(ProxyError::BadTarget)?;
        let uri = self.upstream_uri(target)?;
        let dropped = headers::rewrite_request(
            &mut parts.headers,
            parts.uri.authority(),
            &inner.rules,
            bearer.clone(),
            client,
        );
        if dropped > 0 {
            inner
                .metrics
                .dropped_underscore_fields
                .inc_by(dropped as u64);
            debug!(
                dropped,
                "dropped request header fields with '_' in their name"
            );
        }
        let (body, replay) =
            UpstreamBody::from_client(body, inner.replay_body_limit, inner.body_read_timeout)
                .await
                .map_err(|e| match e {
                    body::ClientBodyError::Stalled(after) => ProxyError::ClientBodyTimeout(after),
                    body::ClientBodyError::Malformed(e) => ProxyError::BadBody(e.to_string()),
                })?;
        let method = parts.method;
        let headers = parts.headers;

        // send
        let mut leased = self
            .send_with_retries(&method, &uri, &headers, body, &replay, trace)
            .await?;

        // on_rejected_token
        if leased.response.status() == StatusCode::UNAUTHORIZED {
            // Read the (small) 401 first: its connection goes back to the
            // pool instead of being held while a new token is fetched,
            // which under the connection cap would starve the replays.
            let rejected = self.buffer_rejection(leased).await?;
            match self
                .on_rejected_token(
                    credential,
                    &bearer,
                    &replay,
                    (&method, &uri, headers),
                    trace,
                )
                .await
            {
                Some(replayed) => leased = replayed?,
                None => return Ok(rejected),
            }
        }

        // response_filter
        if leased.response.status() == StatusCode::TOO_MANY_REQUESTS {
            if let Some(limiter) = &inner.rate_limiter {
                limiter
                    .coupa_rate_limited(leased.response.headers().get(http::header::RETRY_AFTER));
            }
        }
        let (mut parts, body) = leased.response.into_parts();
        headers::rewrite_response(&mut parts.headers);
        Ok(Response::from_parts(
            parts,
            Either::Left(ResponseBody::new(body, inner.idle_timeout, leased.lease)),
        ))
    }

    /// Which integration sent the request, by its legacy key or its local
    /// token, and so which credential's token it gets; `None`: no
    /// integrations are configured, everyone gets the default credential.
    async fn identify(
        &self,
        headers: &http::HeaderMap,
        trace: &mut Trace,
    ) -> Result<Option<usize>, ProxyError> {
        let inner = &*self.inner;
        let integrations = inner.integrations.load();
        if integrations.is_empty() {
            if headers.contains_key(headers::X_COUPA_API_KEY) {
                trace.via = Via::LegacyKey;
            }
            return Ok(None);
        }
        if let Some(key) = headers.get(headers::X_COUPA_API_KEY) {
            let found = integrations
                .identify(key)
                .ok_or(ProxyError::UnknownApiKey)?;
            trace.via = Via::LegacyKey;
            trace.integration = Some(found.clone());
            return Ok(Some(found.credential));
        }
        let token = match headers.get(http::header::AUTHORIZATION) {
            Some(value) if integrations.has_local_clients() => {
                local_oauth::bearer_of(value.as_bytes()).ok_or(ProxyError::UnknownApiKey)?
            }
            _ => return Err(ProxyError::UnknownApiKey),
        };
        drop(integrations);
        let grant = inner
            .local_tokens
            .lookup(token)
            .await
            .ok_or(ProxyError::InvalidLocalToken)?;
        // The integration may have gone, or changed its secret, on reload.
        let integrations = inner.integrations.load();
        let found = integrations
            .by_name(&grant.integration)
            .filter(|key| key.local_secret() == Some(&grant.secret_sha256))
            .ok_or(ProxyError::InvalidLocalToken)?;
        trace.via = Via::LocalToken;
        trace.integration = Some(found.clone());
        Ok(Some(found.credential))
    }

    /// The proxy is never an open proxy: no CONNECT tunnels, and an
    /// HTTP/1 absolute-form target must name the instance itself. (HTTP/2
    /// always carries an authority: the proxy's own address, like `Host`.)
    fn check_target<B>(&self, request: &Request<B>) -> Result<(), ProxyError> {
        if request.method() == Method::CONNECT {
            return Err(ProxyError::ConnectMethod);
        }
        if request.version() <= Version::HTTP_11 {
            if let Some(authority) = request.uri().authority() {
                let ours = &self.inner.authority;
                let default_port = |scheme: Option<&Scheme>| match scheme {
                    Some(s) if *s == Scheme::HTTPS => 443,
                    _ => 80,
                };
                let same_host = authority.host().eq_ignore_ascii_case(ours.host());
                let same_port = authority
                    .port_u16()
                    .unwrap_or_else(|| default_port(request.uri().scheme()))
                    == ours
                        .port_u16()
                        .unwrap_or_else(|| default_port(Some(&self.inner.scheme)));
                if !(same_host && same_port) {
                    return Err(ProxyError::ForeignTarget(authority.to_string()));
                }
            }
        }
        Ok(())
    }

    /// The 503 answer while no token is held, naming the cause.
    fn no_token(&self, credential: &CredentialSlot) -> ProxyError {
        let status = credential.store.status();
        let retry_after = status
            .next_attempt
            .and_then(|at| at.duration_since(SystemTime::now()).ok())
            .unwrap_or(Duration::from_secs(1));
        let cause = match status.last_error {
            Some(error) => format!("the last token request failed: {error}"),
            None if status.fetches_ok > 0 => "the token expired and no new one arrived".to_owned(),
            None => "the first token is still being fetched".to_owned(),
        };
        ProxyError::NoToken { cause, retry_after }
    }

    /// `base_url`'s path + the request's path and query, byte for byte, in
    /// origin form: the pool owns the scheme and authority and adds them
    /// where HTTP/2 needs them.
    fn upstream_uri(&self, target: &PathAndQuery) -> Result<Uri, ProxyError> {
        let inner = &*self.inner;
        let path_and_query = if inner.path_prefix.is_empty() {
            target.clone()
        } else {
            let joined = format!("{}{}", inner.path_prefix, target.as_str());
            PathAndQuery::from_maybe_shared(Bytes::from(joined))
                .map_err(|_| ProxyError::BadTarget)?
        };
        Ok(Uri::from(path_and_query))
    }
}
