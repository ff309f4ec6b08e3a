//! The request path's shared types: the [`Proxy`] handle and what it holds
//! ([`Inner`]), a credential as requests see it, and the per-request
//! [`Trace`] every phase takes. The phases (the sibling files) import
//! these; this file imports no phase.

use std::sync::Arc;
use std::time::{Duration, Instant as StdInstant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::uri::{Authority, Scheme};
use http::HeaderValue;
use http_body_util::{Either, Full};

use super::auth::{IntegrationKey, Integrations};
use super::headers::RewriteRules;
use super::line_budget::LineBudget;
use super::ratelimit::Limiter;
use super::spool::{Answer, SpoolSettings};
use super::stall;
use super::upstream::UpstreamClient;
use crate::config::Config;
use crate::guesses::{Guess, Guesses};
use crate::insight::{Insight, Via};
use crate::local_oauth::LocalTokens;
use crate::metrics::Metrics;
use crate::token::TokenStore;
use crate::traces::{Recording, Traces};

/// Response body: Coupa's answer, or one the proxy wrote itself.
pub type ProxyBody = Either<Answer, Full<Bytes>>;

/// Where requests go and how they are rewritten. Cheap to clone.
#[derive(Clone)]
pub struct Proxy {
    pub(super) inner: Arc<Inner>,
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

pub(super) struct Inner {
    pub(super) credentials: Vec<CredentialSlot>,
    /// Used when no integrations are configured.
    pub(super) default_credential: usize,
    /// Swapped whole on reload; read lock-free per request.
    pub(super) integrations: ArcSwap<Integrations>,
    pub(super) client: UpstreamClient,
    pub(super) rules: RewriteRules,
    /// `coupa.accept`, for requests of no integration.
    pub(super) default_accept: HeaderValue,
    pub(super) scheme: Scheme,
    pub(super) authority: Authority,
    /// Path the instance lives under; empty for a normal instance URL.
    pub(super) path_prefix: String,
    pub(super) response_header_timeout: Duration,
    /// How long a request waits for its integration's share.
    pub(super) connection_wait_timeout: Duration,
    /// How long a request waits for a token when none is held.
    pub(super) token_wait_timeout: Duration,
    /// `coupa.resend_429_within`.
    pub(super) resend_429_within: Duration,
    /// The grace period ran out: requests still in flight are cut by the
    /// process, not left by their clients.
    pub(super) cut_at_shutdown: std::sync::atomic::AtomicBool,
    pub(super) idle_timeout: Duration,
    pub(super) body_read_timeout: Duration,
    /// What a whole request body must keep up.
    pub(super) body_pace: stall::Pace,
    pub(super) replay_body_limit: usize,
    /// How Coupa's answers are held for slow clients.
    pub(super) spool: Arc<SpoolSettings>,
    pub(super) rate_limiter: Option<Limiter>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) insight: Arc<Insight>,
    /// Failed credentials per source, answered late past a budget.
    pub(super) guesses: Arc<Guesses>,
    pub(super) local_tokens: LocalTokens,
    pub(super) traces: Option<Traces>,
    /// `telemetry.refused_lines_per_second`, when set.
    pub(super) refused_lines: Option<LineBudget>,
    /// The instance URL, for hints in log lines.
    pub(super) base_url: String,
    /// `Keep-Alive: timeout=N` for HTTP/1.1 answers.
    pub(super) keep_alive: HeaderValue,
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
pub(super) struct Trace {
    pub(super) integration: Option<Arc<IntegrationKey>>,
    /// How the integration was identified.
    pub(super) via: Via,
    /// Time spent waiting for Coupa's response headers (all attempts).
    pub(super) upstream: Option<Duration>,
    /// Time spent waiting for a token (none held when the request came).
    pub(super) token_wait: Option<Duration>,
    /// Time spent in the rate-limit queue for a slot of Coupa's budget
    /// (all attempts).
    pub(super) queue_wait: Duration,
    /// Time spent waiting for a place under the integration's
    /// `max_concurrent` (its share of the connections to Coupa).
    pub(super) slot_wait: Duration,
    /// Times Coupa's 429 was absorbed by sending the request again, and
    /// what those waits took in all.
    pub(super) resends: u32,
    pub(super) resend_wait: Duration,
    /// Why the proxy answered the request itself (an error's `code`), or
    /// `client_gone`; empty when Coupa's answer was passed on.
    pub(super) reason: &'static str,
    /// The request carried a credential that failed (a guess, perhaps).
    pub(super) failed_credential: Option<Guess>,
    /// How long its answer was held back for that.
    pub(super) guess_delay: Duration,
    /// The W3C trace the request belongs to, for the access line.
    pub(super) trace_id: Option<opentelemetry::trace::TraceId>,
    /// Its spans, when traces are exported and the client's trace (if
    /// any) is sampled.
    pub(super) spans: Option<Box<Recording>>,
}

impl Trace {
    /// A wait from `start` until now, as a span when spans are recorded.
    pub(super) fn note_wait(&mut self, name: &'static str, start: StdInstant) {
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
                    .map(LineBudget::new),
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

    /// The grace period ran out: the requests still in flight are about to
    /// be dropped, and their access lines say so (not `client_gone`).
    pub fn cut_remaining(&self) {
        self.inner
            .cut_at_shutdown
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether [`Self::cut_remaining`] was called.
    pub(super) fn cut_at_shutdown(&self) -> bool {
        self.inner
            .cut_at_shutdown
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The migration view's record of the request's integration (or of
    /// requests of none).
    pub(super) fn usage<'a>(&'a self, trace: &'a Trace) -> &'a crate::insight::Usage {
        match &trace.integration {
            Some(integration) => &integration.usage,
            None => self.inner.insight.unnamed(),
        }
    }
}
