//! Prometheus metrics (`/metrics` on the admin address), via
//! `prometheus-client`.
//!
//! Latency histograms are updated on the request path (atomics, no label
//! lookup); request counts are the migration view's ([`crate::insight`])
//! and token metrics the token stores', both read at scrape time, so
//! neither the request path nor the background path needs wiring.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::insight::Insight;
use crate::token::TokenStore;

/// The upstream pool's connections: open, opened and waited for. Made
/// here, updated by the pool.
#[derive(Debug, Clone, Default)]
pub struct UpstreamMetrics {
    /// Connections open now.
    pub open: Gauge,
    pub opened_http1: Counter,
    pub opened_http2: Counter,
    /// Requests that waited for an HTTP/1.1 connection (the cap was reached).
    pub queued: Counter,
    /// Requests that gave up waiting (`coupa.connection_wait_timeout`).
    pub wait_timeouts: Counter,
    /// Requests sent again after the server provably did not process them
    /// (GOAWAY, REFUSED_STREAM, a recycled keep-alive connection).
    pub retried_never_processed: Counter,
    /// Idempotent requests sent again after a connection failure.
    pub retried_connection_failure: Counter,
}

impl UpstreamMetrics {
    /// Made and registered (`upstream_*`); labelled handles are resolved
    /// once, so the pool counts without a label lookup.
    fn registered(registry: &mut Registry) -> Self {
        let open = Gauge::default();
        registry.register(
            "upstream_connections",
            "Open connections to Coupa (pooled and in use)",
            open.clone(),
        );
        let opened = CountersBy::default();
        registry.register(
            "upstream_connections_opened",
            "Connections opened to Coupa, by protocol (http1, http2)",
            opened.clone(),
        );
        let queued = Counter::default();
        registry.register(
            "upstream_connection_waits",
            "Requests that waited for an HTTP/1.1 connection because coupa.max_connections were open",
            queued.clone(),
        );
        let wait_timeouts = Counter::default();
        registry.register(
            "upstream_connection_wait_timeouts",
            "Requests answered 503 upstream_busy because no HTTP/1.1 connection came free within coupa.connection_wait_timeout",
            wait_timeouts.clone(),
        );
        let retries = CountersBy::default();
        registry.register(
            "upstream_retries",
            "Requests sent to Coupa again on another connection: never_processed (GOAWAY, REFUSED_STREAM, a keep-alive connection closed before any response byte; any method) or connection_failure (idempotent methods only)",
            retries.clone(),
        );
        // One statement each: a family's read guard must be gone before
        // the next label is created.
        let opened_http1 = opened.get_or_create(&[("protocol", "http1")]).clone();
        let opened_http2 = opened.get_or_create(&[("protocol", "http2")]).clone();
        let retried_never_processed = retries
            .get_or_create(&[("reason", "never_processed")])
            .clone();
        let retried_connection_failure = retries
            .get_or_create(&[("reason", "connection_failure")])
            .clone();
        Self {
            open,
            opened_http1,
            opened_http2,
            queued,
            wait_timeouts,
            retried_never_processed,
            retried_connection_failure,
        }
    }
}

/// Answers held for slow clients (`proxy::spool`). Made here, updated by
/// the request path.
#[derive(Debug, Clone, Default)]
pub struct SpoolMetrics {
    /// Bytes of answers held in memory now.
    pub memory_bytes: Gauge,
    /// Temp files open now.
    pub files: Gauge,
    /// Bytes written to temp files.
    pub spooled_bytes: Counter,
    /// Answers that outgrew memory and temp file and then went at their
    /// client's pace.
    pub overflowed: Counter,
}

impl SpoolMetrics {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "response_buffered_bytes",
            "Bytes of Coupa's answers held in memory for clients that have not taken them yet (coupa.response_buffer each)",
            self.memory_bytes.clone(),
        );
        registry.register(
            "response_spool_files",
            "Temp files holding answers for slow clients now (coupa.spool_dir)",
            self.files.clone(),
        );
        registry.register(
            "response_spooled_bytes",
            "Bytes of Coupa's answers written to temp files for slow clients",
            self.spooled_bytes.clone(),
        );
        registry.register(
            "response_spool_overflows",
            "Answers larger than coupa.response_buffer + coupa.response_spool_limit taken by a slow client, which then held their Coupa connection",
            self.overflowed.clone(),
        );
    }
}

/// The rate limit's queues, by integration (`proxy::ratelimit`): made
/// here, each integration's handles taken once by its lane.
#[derive(Debug, Clone)]
pub struct RateMetrics {
    depth: Family<ByIntegration, Gauge>,
    slots: Family<ByIntegration, Counter>,
    waits: Family<ByIntegration, Histogram, fn() -> Histogram>,
    refused: Family<ByIntegration, Counter>,
}

type ByIntegration = Vec<(String, String)>;

/// Counters by one label whose values are fixed in the code (`reason`,
/// `cause`, `kind`, …).
pub type CountersBy = Family<[(&'static str, &'static str); 1], Counter>;

impl Default for RateMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// One integration's handles in [`RateMetrics`].
#[derive(Debug, Clone)]
pub struct LaneMetrics {
    /// Its requests waiting for a slot now.
    pub depth: Gauge,
    /// Slots of Coupa's budget it was given.
    pub slots: Counter,
    /// How long its requests that waited waited.
    pub waits: Histogram,
    /// Its requests answered 429 because its queue was full.
    pub refused: Counter,
}

impl RateMetrics {
    pub fn new() -> Self {
        fn wait_buckets() -> Histogram {
            Histogram::new(exponential_buckets(0.005, 2.0, 14))
        }
        Self {
            depth: Family::default(),
            slots: Family::default(),
            waits: Family::new_with_constructor(wait_buckets),
            refused: Family::default(),
        }
    }

    fn register(&self, registry: &mut Registry) {
        registry.register(
            "rate_queue_depth",
            "Requests waiting for a slot of Coupa's budget ([coupa.rate_limit]), by integration",
            self.depth.clone(),
        );
        registry.register(
            "rate_slots",
            "Slots of Coupa's budget given to requests, by integration",
            self.slots.clone(),
        );
        registry.register(
            "rate_wait_seconds",
            "How long requests that had to wait for a slot of Coupa's budget waited, by integration",
            self.waits.clone(),
        );
        registry.register(
            "rate_limited",
            "Requests answered 429 rate_limited because their integration's queue was full, by integration",
            self.refused.clone(),
        );
    }

    /// An integration's handles (`"(none)"`: requests of no integration).
    pub fn lane(&self, integration: &str) -> LaneMetrics {
        let label = vec![("integration".to_owned(), integration.to_owned())];
        LaneMetrics {
            depth: self.depth.get_or_create(&label).clone(),
            slots: self.slots.get_or_create(&label).clone(),
            waits: self.waits.get_or_create(&label).clone(),
            refused: self.refused.get_or_create(&label).clone(),
        }
    }
}

/// Token stores by credential name.
pub type Stores = Arc<Vec<(String, Arc<TokenStore>)>>;

/// A request's waits, by phase, as the access line has them.
#[derive(Debug, Default)]
pub struct Waits {
    pub token: Duration,
    pub queue: Duration,
    pub slot: Duration,
    pub resend: Duration,
}

/// The `phase` labels of `coupa_proxy_wait_seconds`, in [`Waits`]' order.
const WAIT_PHASES: [&str; 4] = ["token", "queue", "slot", "resend"];

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    upstream_seconds: Histogram,
    overhead_seconds: Histogram,
    /// Per phase of [`WAIT_PHASES`]: the waits of requests that went
    /// through it.
    wait_seconds: [Histogram; 4],
    in_flight: Gauge,
    /// Handed to the upstream pool, which updates them.
    pub upstream: UpstreamMetrics,
    /// Handed to the proxy listener, which updates them.
    pub client_connections: crate::server::ConnectionGauges,
    /// Handed to the request path, which updates them.
    pub spool: SpoolMetrics,
    /// Request header fields with `_` in their name, dropped.
    pub dropped_underscore_fields: Counter,
    /// Handed to the cluster state, when `[cluster]` is set.
    pub cluster: crate::cluster::ClusterMetrics,
    /// Handed to the rate limit, when `[coupa.rate_limit]` is set.
    pub rate: RateMetrics,
    /// Handed to the guessing accounts ([`crate::guesses`]).
    pub guesses: crate::guesses::GuessMetrics,
    /// Handed to the trace exporter ([`crate::traces`]).
    pub traces: crate::traces::TraceMetrics,
    /// Answers of the proxy's own `/oauth2/token`, by outcome.
    local_token_requests: Vec<(&'static str, Counter)>,
    /// 503 integration_busy answers, by integration (rare: a lookup each).
    integration_busy: Family<Vec<(String, String)>, Counter>,
    /// 408 answers for request bodies, by reason (rare).
    client_body_timeouts: CountersBy,
    /// Tunnels through the egress proxy that failed, by cause (rare).
    egress_failures: CountersBy,
    /// Requests the proxy answered itself, by reason (rare).
    refused_requests: CountersBy,
    access_lines_left_out: Counter,
    started: SystemTime,
}

impl Metrics {
    /// `clustered`: `[cluster]` is set (its metrics are registered). The
    /// request counters are the migration view's, read at scrape time.
    pub fn new(stores: Stores, clustered: bool, insight: &Arc<Insight>) -> Arc<Self> {
        let mut registry = Registry::with_prefix("coupa_proxy");
        registry.register_collector(insight.collector());
        let buckets = || exponential_buckets(0.0005, 2.0, 16);
        let upstream_seconds = Histogram::new(buckets());
        registry.register(
            "upstream_duration_seconds",
            "Time from sending a request to Coupa to its response headers",
            upstream_seconds.clone(),
        );
        let overhead_seconds = Histogram::new(buckets());
        registry.register(
            "overhead_duration_seconds",
            "Time the proxy itself spent on a request (total minus upstream time)",
            overhead_seconds.clone(),
        );
        let waits =
            Family::<[(&'static str, &'static str); 1], Histogram>::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0005, 2.0, 16))
            });
        registry.register(
            "wait_seconds",
            "Requests' waits by phase, the access line's fields, observed for each request that went through the phase (microseconds when it did not have to wait): token (token_wait_ms, no token held yet), queue (queue_ms, the rate-limit queue), slot (slot_ms, a place under the integration's max_concurrent), resend (resend_wait_ms, re-sends after Coupa's 429)",
            waits.clone(),
        );
        let wait_seconds =
            WAIT_PHASES.map(|phase| waits.get_or_create(&[("phase", phase)]).clone());
        let in_flight = Gauge::default();
        registry.register(
            "in_flight_requests",
            "Requests being handled",
            in_flight.clone(),
        );
        let client_connections = crate::server::ConnectionGauges::default();
        client_connections.register(&mut registry);
        let spool = SpoolMetrics::default();
        spool.register(&mut registry);
        let upstream = UpstreamMetrics::registered(&mut registry);
        let dropped = CountersBy::default();
        registry.register(
            "request_fields_dropped",
            "Request header fields not forwarded, by reason (underscore: a name with '_', which a next hop may read as '-')",
            dropped.clone(),
        );
        let dropped_underscore_fields = dropped.get_or_create(&[("reason", "underscore")]).clone();
        let cluster = register_cluster(&mut registry, clustered);
        let local_token_requests = register_local_tokens(&mut registry);
        let client_body_timeouts = CountersBy::default();
        registry.register(
            "client_body_timeouts",
            "Request bodies given up on with 408, by reason: idle (listen.body_read_timeout), rate (below listen.min_body_rate after the grace), total (listen.max_body_time)",
            client_body_timeouts.clone(),
        );
        let egress_failures = CountersBy::default();
        registry.register(
            "egress_failures",
            "Connections to Coupa that the egress proxy ([coupa.egress_proxy]) failed, by cause: proxy_unreachable, login_required, login_rejected, refused, coupa_unreachable, coupa_timeout, broken",
            egress_failures.clone(),
        );
        let refused_requests = CountersBy::default();
        registry.register(
            "refused_requests",
            "Requests the proxy answered itself instead of passing Coupa's answer on, by reason (the access line's reason: ambiguous_framing, malformed_request_line, malformed_head, unknown_api_key, missing_host, rate_limited, no_token, client_gone, ...)",
            refused_requests.clone(),
        );
        let access_lines_left_out = Counter::default();
        registry.register(
            "access_lines_left_out",
            "Access lines of refused requests not written: more than telemetry.refused_lines_per_second (refused_requests still counts them)",
            access_lines_left_out.clone(),
        );
        let integration_busy = Family::<Vec<(String, String)>, Counter>::default();
        registry.register(
            "integration_busy",
            "Requests answered 503 integration_busy: the integration had [[integration]] max_concurrent requests at Coupa for all of coupa.connection_wait_timeout",
            integration_busy.clone(),
        );
        let rate = RateMetrics::new();
        rate.register(&mut registry);
        let guesses = crate::guesses::GuessMetrics::default();
        guesses.register(&mut registry);
        let traces = crate::traces::TraceMetrics::default();
        traces.register(&mut registry);
        registry.register_collector(Box::new(TokenCollector { stores }));
        Arc::new(Self {
            rate,
            guesses,
            traces,
            registry,
            upstream_seconds,
            overhead_seconds,
            wait_seconds,
            in_flight,
            upstream,
            client_connections,
            spool,
            dropped_underscore_fields,
            cluster,
            local_token_requests,
            integration_busy,
            client_body_timeouts,
            egress_failures,
            refused_requests,
            access_lines_left_out,
            started: SystemTime::now(),
        })
    }

    /// A client's request body was given up on (408), for `reason`
    /// (`idle`, `rate`, `total`).
    pub fn client_body_timeout(&self, reason: &'static str) {
        self.client_body_timeouts
            .get_or_create(&[("reason", reason)])
            .inc();
    }

    /// The proxy answered a request itself, for `reason`.
    /// A refused request's access line left out under
    /// `telemetry.refused_lines_per_second`.
    pub fn access_line_left_out(&self) {
        self.access_lines_left_out.inc();
    }

    pub fn refused_request(&self, reason: &'static str) {
        self.refused_requests
            .get_or_create(&[("reason", reason)])
            .inc();
    }

    /// A tunnel through the egress proxy failed, for `cause`.
    pub fn egress_failure(&self, cause: &'static str) {
        self.egress_failures
            .get_or_create(&[("cause", cause)])
            .inc();
    }

    /// An integration's request got 503 at its `max_concurrent`.
    pub fn integration_busy(&self, integration: &str) {
        self.integration_busy
            .get_or_create(&vec![("integration".to_owned(), integration.to_owned())])
            .inc();
    }

    /// Marks a request as being handled until the guard drops.
    pub fn in_flight(self: &Arc<Self>) -> InFlight {
        self.in_flight.inc();
        InFlight(self.clone())
    }

    /// Times of one answered request (the counts are the migration
    /// view's, [`crate::insight`]).
    /// A forwarded request's Coupa time and the proxy's `own` (every
    /// wait taken out: queue, connection share, token, re-sends).
    /// A request's time: its own and Coupa's when it was forwarded, and
    /// each wait it had, by phase.
    pub fn record(&self, own: Duration, upstream: Option<Duration>, waits: &Waits) {
        if let Some(upstream) = upstream {
            self.upstream_seconds.observe(upstream.as_secs_f64());
            self.overhead_seconds.observe(own.as_secs_f64());
        }
        let Waits {
            token,
            queue,
            slot,
            resend,
        } = waits;
        for (histogram, waited) in self.wait_seconds.iter().zip([token, queue, slot, resend]) {
            if !waited.is_zero() {
                histogram.observe(waited.as_secs_f64());
            }
        }
    }

    /// Counts one answer of the proxy's `/oauth2/token`.
    pub fn local_token_outcome(&self, outcome: &str) {
        if let Some((_, counter)) = self
            .local_token_requests
            .iter()
            .find(|(o, _)| *o == outcome)
        {
            counter.inc();
        }
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed().unwrap_or_default()
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Decrements the in-flight gauge when the request is done.
pub struct InFlight(Arc<Metrics>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.dec();
    }
}

/// Token metrics, read from the stores at scrape time.
#[derive(Debug)]
struct TokenCollector {
    stores: Stores,
}

impl Collector for TokenCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let now = tokio::time::Instant::now();
        {
            let mut family = encoder.encode_descriptor(
                "token_expires_in_seconds",
                "Seconds until the current token of a credential may no longer be sent (0: none held)",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for (name, store) in self.stores.iter() {
                let seconds = store
                    .current(now)
                    .map(|t| t.expires_at.saturating_duration_since(now).as_secs_f64())
                    .unwrap_or(0.0);
                let gauge = ConstGauge::new(seconds);
                gauge.encode(family.encode_family(&[("credential", name.as_str())])?)?;
            }
        }
        {
            let wall_now = std::time::SystemTime::now();
            let mut family = encoder.encode_descriptor(
                "refresh_token_expires_in_seconds",
                "Seconds until the refresh token of a user-consented credential ends (authorization_code and device_code grants only); alert well before 0",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for (name, store) in self.stores.iter() {
                if let Some(info) = store.status().refresh_token {
                    let gauge = ConstGauge::new(info.remaining(wall_now).as_secs_f64());
                    gauge.encode(family.encode_family(&[("credential", name.as_str())])?)?;
                }
            }
        }
        let mut family = encoder.encode_descriptor(
            "token_fetches",
            "Token requests by credential and outcome (ok, network, http_error, bad_response, or the OAuth error code)",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (name, store) in self.stores.iter() {
            for (outcome, count) in store.fetch_outcomes() {
                let counter = ConstCounter::new(count);
                counter.encode(family.encode_family(&[
                    ("credential", name.as_str()),
                    ("outcome", outcome.as_str()),
                ])?)?;
            }
        }
        Ok(())
    }
}

/// Only a process with `[cluster]` shows cluster metrics: a 0 in
/// `cluster_up` must mean "Redis is away", never "not configured".
fn register_cluster(registry: &mut Registry, clustered: bool) -> crate::cluster::ClusterMetrics {
    let cluster = crate::cluster::ClusterMetrics {
        round_trip: Some(Histogram::new(exponential_buckets(0.0001, 2.0, 14))),
        ..Default::default()
    };
    if clustered {
        registry.register(
            "cluster_up",
            "1 while the cluster state (Redis) answers, 0 while this process works alone (only with [cluster])",
            cluster.up.clone(),
        );
        if let Some(round_trip) = &cluster.round_trip {
            registry.register(
                "cluster_redis_duration_seconds",
                "Round-trip time of calls to Redis",
                round_trip.clone(),
            );
        }
        registry.register(
            "cluster_redis_errors",
            "Calls to Redis that failed or timed out",
            cluster.errors.clone(),
        );
        registry.register(
            "cluster_budget_waits",
            "Slots of the instance-wide rate budget this process had to wait for",
            cluster.budget_waits.clone(),
        );
        registry.register(
            "cluster_budget_pauses",
            "Coupa answered 429 and every process was told to hold off",
            cluster.pauses.clone(),
        );
        registry.register(
            "cluster_primary_changes",
            "Times the Redis primary moved and this process followed it (a Sentinel failover; only with redis+sentinel://)",
            cluster.primary_changes.clone(),
        );
        registry.register(
            "cluster_fetching",
            "1 while this process holds the credential's token fetch lock",
            cluster.fetching.clone(),
        );
    }
    cluster
}

/// The local token endpoint's outcomes, each counter resolved once.
fn register_local_tokens(registry: &mut Registry) -> Vec<(&'static str, Counter)> {
    let local_tokens = CountersBy::default();
    registry.register(
        "local_token_requests",
        "Requests to the proxy's own /oauth2/token, by outcome (issued, or the RFC 6749 error code)",
        local_tokens.clone(),
    );
    [
        "issued",
        "invalid_request",
        "invalid_client",
        "unsupported_grant_type",
        "invalid_scope",
    ]
    .into_iter()
    .map(|outcome| {
        let counter = local_tokens.get_or_create(&[("outcome", outcome)]).clone();
        (outcome, counter)
    })
    .collect()
}
