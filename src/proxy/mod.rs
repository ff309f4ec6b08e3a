//! The request path: one client request in, one Coupa request out.
//!
//! A request goes through named phases, each a function over one
//! per-request [`Trace`], so a reader knows where a change belongs
//! (`Proxy::forward` calls them in order):
//! 1. `request_filter` ([`filter`]): a target this proxy serves, an
//!    integration known by its legacy key or local token ([`auth`]), and a
//!    valid token; if not, an error answer and nothing is forwarded.
//!    `POST /oauth2/token` is answered by the proxy itself ([`local_token`]).
//!    Its common case (`request_filter_now`) needs no await.
//! 2. `upstream_request` ([`rewrite`]): target URI and header rewrite
//!    ([`headers`]); then `client_body`: a body, if any, wrapped so it can
//!    be replayed ([`body`]).
//! 3. `send_with_retries` ([`send`]): rate limit ([`ratelimit`]), pooled
//!    client ([`upstream`]), response-header timeout. Sent again on another
//!    connection when the server provably did not process it (any method,
//!    a few times), or once after a connection failure (idempotent only).
//!    Then `resend_rate_limited` ([`resend`]): Coupa answered 429, so the
//!    request waits what Coupa asked and goes again, within
//!    `coupa.resend_429_within` (after a 401 replay too).
//! 4. `on_rejected_token` ([`rejected`]): Coupa answered 401, so fetch a
//!    new token (once for a whole burst) and replay the request once.
//! 5. `response_filter`: hop-by-hop removal, stall guard on the body, and
//!    the answer taken off Coupa's connection ahead of the client
//!    ([`spool`]).
//! 6. `log` ([`log`]): one access line, and the request counted in the
//!    migration view ([`crate::insight`]).
//!
//! Failures become answers in one place ([`error`]).

pub mod auth;
pub mod body;
pub mod error;
mod filter;
pub mod headers;
mod local_token;
mod log;
pub mod ratelimit;
mod rejected;
mod resend;
mod rewrite;
mod send;
mod share;
mod spool;
mod stall;
pub mod upstream;

use std::sync::Arc;
use std::time::{Duration, Instant as StdInstant};

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use tokio::sync::OwnedSemaphorePermit;
use tracing::{debug, warn};

use crate::config::Config;
use crate::guesses::{Guess, Guesses};
use crate::insight::{Insight, Via};
use crate::local_oauth::LocalTokens;
use crate::metrics::Metrics;
use crate::token::TokenStore;
use crate::traces::{Recording, Traces};
use arc_swap::ArcSwap;
use auth::{IntegrationKey, Integrations};
use body::{Replay, UpstreamBody};
pub use error::ProxyError;
use filter::Admitted;
pub use headers::{ClientInfo, RewriteRules};
use http_body::Body as _;
use log::{Handled, Record};
use ratelimit::Limiter;
use rewrite::Outgoing;
use spool::Answer;
pub use spool::SpoolSettings;
pub use stall::BodyTimeout;
pub use upstream::UpstreamClient;
use upstream::{Leased, ResponseBody};

/// Response body: Coupa's answer, or one the proxy wrote itself.
pub type ProxyBody = Either<Answer, Full<Bytes>>;

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
    /// `coupa.accept`, for requests of no integration.
    default_accept: HeaderValue,
    scheme: Scheme,
    authority: Authority,
    /// Path the instance lives under; empty for a normal instance URL.
    path_prefix: String,
    response_header_timeout: Duration,
    /// How long a request waits for its integration's share.
    connection_wait_timeout: Duration,
    /// How long a request waits for a token when none is held.
    token_wait_timeout: Duration,
    /// `coupa.resend_429_within`.
    resend_429_within: Duration,
    /// The grace period ran out: requests still in flight are cut by the
    /// process, not left by their clients.
    cut_at_shutdown: std::sync::atomic::AtomicBool,
    idle_timeout: Duration,
    body_read_timeout: Duration,
    /// What a whole request body must keep up.
    body_pace: stall::Pace,
    replay_body_limit: usize,
    /// How Coupa's answers are held for slow clients.
    spool: Arc<SpoolSettings>,
    rate_limiter: Option<Limiter>,
    metrics: Arc<Metrics>,
    insight: Arc<Insight>,
    /// Failed credentials per source, answered late past a budget.
    guesses: Arc<Guesses>,
    local_tokens: LocalTokens,
    traces: Option<Traces>,
    /// `telemetry.refused_lines_per_second`, when set.
    refused_lines: Option<log::LineBudget>,
    /// The instance URL, for hints in log lines.
    base_url: String,
    /// `Keep-Alive: timeout=N` for HTTP/1.1 answers.
    keep_alive: HeaderValue,
}

/// What the request path uses beside Coupa's client.
pub struct Services {
    /// Shapes to `[coupa.rate_limit]` (this process's budget or the
    /// instance's shared one).
    pub rate_limiter: Option<Limiter>,
    pub local_tokens: LocalTokens,
    /// With `[telemetry] otlp_endpoint`.
    pub traces: Option<Traces>,
}

/// What the request path shares with the admin listener.
pub struct Shared {
    /// The migration view.
    pub insight: Arc<Insight>,
    /// Failed credentials per source.
    pub guesses: Arc<Guesses>,
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
    /// Time spent waiting for a token (none held when the request came).
    token_wait: Option<Duration>,
    /// Time spent in the rate-limit queue for a slot of Coupa's budget
    /// (all attempts).
    queue_wait: Duration,
    /// Time spent waiting for a place under the integration's
    /// `max_concurrent` (its share of the connections to Coupa).
    slot_wait: Duration,
    /// Times Coupa's 429 was absorbed by sending the request again, and
    /// what those waits took in all.
    resends: u32,
    resend_wait: Duration,
    /// Why the proxy answered the request itself (an error's `code`), or
    /// `client_gone`; empty when Coupa's answer was passed on.
    reason: &'static str,
    /// The request carried a credential that failed (a guess, perhaps).
    failed_credential: Option<Guess>,
    /// How long its answer was held back for that.
    guess_delay: Duration,
    /// The W3C trace the request belongs to, for the access line.
    trace_id: Option<opentelemetry::trace::TraceId>,
    /// Its spans, when traces are exported and the client's trace (if
    /// any) is sampled.
    spans: Option<Box<Recording>>,
}

impl Trace {
    /// A wait from `start` until now, as a span when spans are recorded.
    fn note_wait(&mut self, name: &'static str, start: StdInstant) {
        if let Some(spans) = &mut self.spans {
            spans.wait(name, start, StdInstant::now());
        }
    }
}

impl Proxy {
    /// `stores` holds one token store per entry of `config.credentials`.
    pub fn new(
        config: &Config,
        stores: &[Arc<TokenStore>],
        client: UpstreamClient,
        metrics: Arc<Metrics>,
        Shared { insight, guesses }: Shared,
        Services {
            rate_limiter,
            local_tokens,
            traces,
        }: Services,
    ) -> Self {
        let coupa = &config.coupa;
        let rules = RewriteRules {
            upstream_host: HeaderValue::from_str(coupa.authority.as_str())
                .unwrap_or_else(|_| HeaderValue::from_static("localhost")),
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
                    &coupa.accept,
                    &insight,
                    rate_limiter.as_ref(),
                    None,
                )),
                client,
                rules,
                default_accept: coupa.accept.clone(),
                scheme: coupa.scheme.clone(),
                authority: coupa.authority.clone(),
                path_prefix: coupa.path_prefix.clone(),
                response_header_timeout: coupa.response_header_timeout,
                connection_wait_timeout: coupa.connection_wait_timeout,
                token_wait_timeout: coupa.token_wait_timeout,
                resend_429_within: coupa.resend_429_within,
                cut_at_shutdown: std::sync::atomic::AtomicBool::new(false),
                idle_timeout: coupa.idle_timeout,
                body_read_timeout: config.listen.body_read_timeout,
                body_pace: stall::Pace {
                    min_rate: config.listen.min_body_rate,
                    grace: config.listen.min_rate_grace,
                    total: config.listen.max_body_time,
                },
                replay_body_limit: coupa.replay_body_limit,
                spool: Arc::new(SpoolSettings {
                    memory: coupa.response_buffer,
                    file_limit: coupa.response_spool_limit,
                    dir: coupa.spool_dir.clone(),
                    metrics: metrics.spool.clone(),
                }),
                rate_limiter,
                metrics,
                insight,
                guesses,
                local_tokens,
                traces,
                refused_lines: config
                    .telemetry
                    .refused_lines_per_second
                    .map(log::LineBudget::new),
                base_url: coupa.base_url.clone(),
                keep_alive: crate::server::keep_alive_value(config.listen.keepalive_timeout),
            }),
        }
    }

    /// Whether the first warm connection to Coupa has been tried; see
    /// [`upstream::UpstreamClient::first_warm`].
    pub fn first_warm(&self) -> tokio::sync::watch::Receiver<bool> {
        self.inner.client.first_warm()
    }

    /// Takes the integrations of a reloaded config; requests already past
    /// identification keep the answer they got, and the migration view
    /// keeps the counts of integrations that stay.
    pub fn reconfigure(&self, config: &Config) {
        let inner = &*self.inner;
        inner.insight.configure(config);
        // Only the login can change without a restart (reload compares
        // the rest).
        inner.client.set_egress(config.coupa.egress_proxy.as_ref());
        let previous = inner.integrations.load();
        inner.integrations.store(Arc::new(Integrations::from_config(
            &config.integrations,
            &config.coupa.accept,
            &inner.insight,
            inner.rate_limiter.as_ref(),
            Some(&previous),
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
        let http11 = request.version() == http::Version::HTTP_11;
        let target = request.uri().path_and_query().cloned();
        let spans = match &self.inner.traces {
            Some(traces) => traces.begin(request.headers(), started),
            None => None,
        };
        let trace_id = match &spans {
            Some(spans) => Some(spans.trace_id()),
            None => crate::traces::client_trace_id(request.headers()),
        };
        // Writes the access line when dropped: at the end of this
        // function, or, if the server drops this future because the
        // client went away, as 499 `client_gone`.
        let mut record = Record {
            proxy: self,
            handled: Handled {
                method: &method,
                target: target.as_ref(),
                id: &request_id,
                started,
            },
            trace: Trace {
                trace_id,
                spans,
                ..Trace::default()
            },
            status: None,
        };
        let trace = &mut record.trace;
        let mut response = match self.forward(request, target.as_ref(), client, trace).await {
            Ok(response) => response,
            Err(err) => {
                trace.reason = err.code();
                if matches!(err, ProxyError::UnknownApiKey) && trace.via == Via::LegacyKey {
                    trace.failed_credential = Some(Guess::LegacyKey);
                }
                // A refusal of the client's request (4xx) is the access
                // line's `reason`, which says it all: a flood of bad
                // requests costs one line each. A failure on the way to
                // Coupa (5xx) is warned of with its cause.
                if err.status().is_client_error() || matches!(err, ProxyError::NoToken { .. }) {
                    debug!(error = %err, "request not forwarded");
                } else {
                    warn!(error = %err, "request not forwarded");
                }
                err.into_response()
            }
        };
        // A wrong legacy key (above) or local client secret (the token
        // endpoint's answer) is answered as late as its source's account
        // says ([`crate::guesses`]).
        if let Some(guess) = trace.failed_credential {
            trace.guess_delay = self.inner.guesses.failed(client.ip, guess).await;
        }
        if http11 && !trace.guess_delay.is_zero() {
            // Each further guess costs a new connection.
            response
                .headers_mut()
                .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
        }
        // The same id reaches Coupa and comes back, so one call can be
        // followed through the integration, the proxy and Coupa support.
        let answer = response.headers_mut();
        answer.insert(headers::X_REQUEST_ID, request_id.clone());
        if http11 && !answer.contains_key(http::header::CONNECTION) {
            // Coupa's own, hop-by-hop, was removed with the other ones.
            answer.insert(headers::KEEP_ALIVE, self.inner.keep_alive.clone());
        }
        record.status = Some(response.status());
        drop(record);
        response
    }

    /// The grace period ran out: the requests still in flight are about to
    /// be dropped, and their access lines say so (not `client_gone`).
    pub fn cut_remaining(&self) {
        self.inner
            .cut_at_shutdown
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether [`Self::cut_remaining`] was called.
    fn cut_at_shutdown(&self) -> bool {
        self.inner
            .cut_at_shutdown
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The migration view's record of the request's integration (or of
    /// requests of none).
    fn usage<'a>(&'a self, trace: &'a Trace) -> &'a crate::insight::Usage {
        match &trace.integration {
            Some(integration) => &integration.usage,
            None => self.inner.insight.unnamed(),
        }
    }

    /// The phases in order; each is a function of its own.
    async fn forward(
        &self,
        request: Request<Incoming>,
        target: Option<&PathAndQuery>,
        client: &ClientInfo,
        trace: &mut Trace,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let (request, admitted) = match self.request_filter_now(&request, trace) {
            Some(admitted) => (request, admitted?),
            None => {
                let mut request = Some(request);
                match self.request_filter(&mut request, trace).await? {
                    // The proxy's own token endpoint took the request.
                    Admitted::Answered(response) => return Ok(*response),
                    admitted => (request.ok_or(ProxyError::BadTarget)?, admitted),
                }
            }
        };
        let (credential, bearer) = match admitted {
            Admitted::Answered(response) => return Ok(*response),
            Admitted::Forward { credential, bearer } => (credential, bearer),
            Admitted::AwaitToken(credential) => match self.await_token(credential, trace).await {
                Ok(bearer) => (credential, bearer),
                Err(refused) => {
                    filter::note_legacy_key(request.headers(), trace);
                    return Err(refused);
                }
            },
        };
        let (
            Outgoing {
                method,
                uri,
                mut headers,
            },
            body,
        ) = self.upstream_request(request, target, &bearer, client, trace)?;
        let (body, replay) = if body.is_end_stream() {
            (UpstreamBody::Empty, Replay::Empty)
        } else {
            self.client_body(body).await?
        };
        let share = self.take_share(trace).await?;
        let leased = self
            .send_with_retries(&method, &uri, &headers, body, &replay, trace)
            .await?;
        let mut leased = self
            .resend_rate_limited(leased, &replay, (&method, &uri, &headers), trace)
            .await?;
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
                    (&method, &uri, &mut headers),
                    trace,
                )
                .await
            {
                Some(replayed) => {
                    leased = self
                        .resend_rate_limited(replayed?, &replay, (&method, &uri, &headers), trace)
                        .await?;
                }
                None => return Ok(rejected),
            }
        }
        self.response_filter(leased, share).await
    }

    /// Phase 5: Coupa's answer for the client, taken off its connection
    /// as far as `coupa.response_buffer` allows.
    async fn response_filter(
        &self,
        leased: Leased,
        share: Option<OwnedSemaphorePermit>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let inner = &*self.inner;
        let (mut parts, body) = leased.response.into_parts();
        headers::rewrite_response(&mut parts.headers);
        let body = ResponseBody::new(body, inner.idle_timeout, leased.lease, share);
        match Answer::take(body, &inner.spool).await {
            Ok(answer) => Ok(Response::from_parts(parts, Either::Left(answer))),
            Err(broken) if broken.is::<upstream::IdleTimeout>() => {
                Err(ProxyError::Timeout(broken.to_string()))
            }
            Err(broken) => Err(ProxyError::Upstream(format!(
                "Coupa's answer broke off: {}",
                crate::token::client::error_chain(&*broken)
            ))),
        }
    }
}
