//! Prometheus metrics (`/metrics` on the admin address), via
//! `prometheus-client`.
//!
//! Request counters and latency histograms are updated on the request path
//! (atomics, one label-set lookup); token metrics are read from the token
//! stores at scrape time, so the background path needs no wiring.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use http::{Method, StatusCode};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder,
};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::token::TokenStore;

/// Token stores by credential name.
pub type Stores = Arc<Vec<(String, Arc<TokenStore>)>>;

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum MethodClass {
    Read,
    Write,
    Other,
}

impl MethodClass {
    pub fn of(method: &Method) -> Self {
        match *method {
            Method::GET | Method::HEAD | Method::OPTIONS => MethodClass::Read,
            Method::POST | Method::PUT | Method::PATCH | Method::DELETE => MethodClass::Write,
            _ => MethodClass::Other,
        }
    }
}

/// An integration name as a label value without copying it per request.
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
pub struct Name(pub Arc<str>);

impl EncodeLabelValue for Name {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        encoder.write_str(&self.0)
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: MethodClass,
    status: &'static str,
    integration: Name,
}

/// Per-integration totals for the status page.
#[derive(Debug, Default)]
pub struct IntegrationCounts {
    pub requests: AtomicU64,
    /// Answers with status 5xx, or refused by the proxy (4xx of its own).
    pub errors: AtomicU64,
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    upstream_seconds: Histogram,
    overhead_seconds: Histogram,
    in_flight: Gauge,
    /// Handed to the upstream pool, which updates them.
    pub upstream: crate::proxy::upstream::UpstreamMetrics,
    /// Requests sent again after the server provably did not process them
    /// (GOAWAY, REFUSED_STREAM, a recycled keep-alive connection).
    pub retried_never_processed: Counter,
    /// Idempotent requests sent again after a connection failure.
    pub retried_connection_failure: Counter,
    /// Request header fields with `_` in their name, dropped.
    pub dropped_underscore_fields: Counter,
    /// Handed to the cluster state, when `[cluster]` is set.
    pub cluster: crate::cluster::ClusterMetrics,
    by_integration: RwLock<Vec<(Arc<str>, Arc<IntegrationCounts>)>>,
    /// The label of traffic without integrations, made once rather than
    /// allocated per request.
    unnamed: Arc<str>,
    started: SystemTime,
}

fn status_class(status: StatusCode) -> &'static str {
    match status.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

impl Metrics {
    /// `clustered`: `[cluster]` is set (its metrics are registered).
    pub fn new(stores: Stores, clustered: bool) -> Arc<Self> {
        let mut registry = Registry::with_prefix("coupa_proxy");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests answered, by method class (read, write, other), status class and integration",
            requests.clone(),
        );
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
        let in_flight = Gauge::default();
        registry.register(
            "in_flight_requests",
            "Requests being handled",
            in_flight.clone(),
        );
        let open = Gauge::default();
        registry.register(
            "upstream_connections",
            "Open connections to Coupa (pooled and in use)",
            open.clone(),
        );
        let opened = Family::<[(&'static str, &'static str); 1], Counter>::default();
        registry.register(
            "upstream_connections_opened",
            "Connections opened to Coupa, by protocol (http1, http2)",
            opened.clone(),
        );
        // Handles resolved once: the pool counts without a label lookup.
        // One statement each: a family's read guard must be gone before
        // the next label is created.
        let opened_http1 = opened.get_or_create(&[("protocol", "http1")]).clone();
        let opened_http2 = opened.get_or_create(&[("protocol", "http2")]).clone();
        let upstream = crate::proxy::upstream::UpstreamMetrics {
            open,
            opened_http1,
            opened_http2,
            queued: Counter::default(),
        };
        let retries = Family::<[(&'static str, &'static str); 1], Counter>::default();
        registry.register(
            "upstream_retries",
            "Requests sent to Coupa again on another connection: never_processed (GOAWAY, REFUSED_STREAM, a keep-alive connection closed before any response byte; any method) or connection_failure (idempotent methods only)",
            retries.clone(),
        );
        let dropped = Family::<[(&'static str, &'static str); 1], Counter>::default();
        registry.register(
            "request_fields_dropped",
            "Request header fields not forwarded, by reason (underscore: a name with '_', which a next hop may read as '-')",
            dropped.clone(),
        );
        let cluster = crate::cluster::ClusterMetrics {
            round_trip: Some(Histogram::new(exponential_buckets(0.0001, 2.0, 14))),
            ..Default::default()
        };
        // Only a process with `[cluster]` shows cluster metrics: a 0 in
        // `cluster_up` must mean "Redis is away", never "not configured".
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
                "Requests that waited for their slot in the instance-wide rate budget",
                cluster.budget_waits.clone(),
            );
            registry.register(
                "cluster_budget_pauses",
                "Coupa answered 429 and every process was told to hold off",
                cluster.pauses.clone(),
            );
            registry.register(
                "cluster_fetching",
                "1 while this process holds the credential's token fetch lock",
                cluster.fetching.clone(),
            );
        }
        let retried_never_processed = retries
            .get_or_create(&[("reason", "never_processed")])
            .clone();
        let retried_connection_failure = retries
            .get_or_create(&[("reason", "connection_failure")])
            .clone();
        let dropped_underscore_fields = dropped.get_or_create(&[("reason", "underscore")]).clone();
        registry.register(
            "upstream_connection_waits",
            "Requests that waited for an HTTP/1.1 connection because coupa.max_connections were open",
            upstream.queued.clone(),
        );
        registry.register_collector(Box::new(TokenCollector { stores }));
        Arc::new(Self {
            registry,
            requests,
            upstream_seconds,
            overhead_seconds,
            in_flight,
            upstream,
            retried_never_processed,
            retried_connection_failure,
            dropped_underscore_fields,
            cluster,
            by_integration: RwLock::new(Vec::new()),
            unnamed: Arc::from(""),
            started: SystemTime::now(),
        })
    }

    /// Marks a request as being handled until the guard drops.
    pub fn in_flight(self: &Arc<Self>) -> InFlight {
        self.in_flight.inc();
        InFlight(self.clone())
    }

    pub fn record(
        &self,
        method: &Method,
        status: StatusCode,
        integration: Option<&Arc<str>>,
        total: Duration,
        upstream: Option<Duration>,
    ) {
        let name = integration.unwrap_or(&self.unnamed).clone();
        self.requests
            .get_or_create(&RequestLabels {
                method: MethodClass::of(method),
                status: status_class(status),
                integration: Name(name.clone()),
            })
            .inc();
        if let Some(upstream) = upstream {
            self.upstream_seconds.observe(upstream.as_secs_f64());
            self.overhead_seconds
                .observe(total.saturating_sub(upstream).as_secs_f64());
        }
        let counts = self.counts_for(&name);
        counts.requests.fetch_add(1, Ordering::Relaxed);
        if status.is_server_error() || (status.is_client_error() && upstream.is_none()) {
            counts.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn counts_for(&self, name: &Arc<str>) -> Arc<IntegrationCounts> {
        if let Ok(all) = self.by_integration.read() {
            if let Some((_, counts)) = all.iter().find(|(n, _)| n == name) {
                return counts.clone();
            }
        }
        let Ok(mut all) = self.by_integration.write() else {
            return Arc::default();
        };
        if let Some((_, counts)) = all.iter().find(|(n, _)| n == name) {
            return counts.clone();
        }
        let counts = Arc::new(IntegrationCounts::default());
        all.push((name.clone(), counts.clone()));
        counts
    }

    /// (integration, requests, errors); "" is traffic without integrations.
    pub fn integration_counts(&self) -> Vec<(String, u64, u64)> {
        self.by_integration
            .read()
            .map(|all| {
                all.iter()
                    .map(|(name, c)| {
                        (
                            name.to_string(),
                            c.requests.load(Ordering::Relaxed),
                            c.errors.load(Ordering::Relaxed),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
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
