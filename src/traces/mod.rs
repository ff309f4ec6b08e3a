//! OpenTelemetry traces, when `[telemetry] otlp_endpoint` names a collector.
//!
//! Each request is a server span, continuing the client's W3C
//! `traceparent` (a client that says "not sampled" is not recorded), with
//! a child span per wait (rate-limit queue, connection slot, token) and per
//! attempt at Coupa; the attempt's own span id is the `traceparent` Coupa
//! receives. Each token fetch is a span of a trace of its own.
//!
//! The request path only notes instants in a [`Recording`]; the spans are
//! built once the access line is written and handed to a bounded queue.
//! Exporting them ([`export`]) runs in the background: a dead or slow
//! collector costs requests nothing, and what the queue cannot take is
//! counted as dropped. Attributes name methods, paths, statuses and
//! integrations, never a header's value, a query string or a secret.

mod export;

use std::borrow::Cow;
use std::time::{Instant, SystemTime};

use http::HeaderMap;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{Context, InstrumentationScope, KeyValue};
use opentelemetry_http::{HeaderExtractor, HeaderInjector};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator, SpanData, SpanEvents, SpanLinks};
use tokio::sync::mpsc;

pub use export::{TraceMetrics, TracesError};

/// Spans waiting for the exporter at most; a request makes about five.
const QUEUE_SPANS: usize = 8192;

/// Where spans go. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Traces {
    queue: mpsc::Sender<SpanData>,
    scope: InstrumentationScope,
    metrics: TraceMetrics,
}

/// The W3C trace id a client's `traceparent` carries, for the access line
/// when this process does not record traces itself.
pub fn client_trace_id(headers: &HeaderMap) -> Option<TraceId> {
    if !headers.contains_key("traceparent") {
        return None;
    }
    let context = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    let span = context.span();
    let parent = span.span_context();
    parent.is_valid().then(|| parent.trace_id())
}

impl Traces {
    /// Spans of this process from now on, exported to `url` by a task of
    /// `background` (which flushes what is queued when it stops).
    pub fn start(
        url: &url::Url,
        metrics: TraceMetrics,
        background: &crate::background::Background,
    ) -> Result<Self, TracesError> {
        let (queue, queued) = mpsc::channel(QUEUE_SPANS);
        export::spawn(url, queued, metrics.clone(), background)?;
        Ok(Self {
            queue,
            scope: InstrumentationScope::builder("coupa-auth-proxy")
                .with_version(env!("CARGO_PKG_VERSION"))
                .build(),
            metrics,
        })
    }

    /// A request's recording, continuing the client's trace if it sent one;
    /// `None` when the client's trace is not sampled.
    pub fn begin(&self, headers: &HeaderMap, started: Instant) -> Option<Box<Recording>> {
        let parent = if headers.contains_key("traceparent") {
            let context = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
            let span = context.span();
            let parent = span.span_context().clone();
            parent.is_valid().then_some(parent)
        } else {
            None
        };
        if parent.as_ref().is_some_and(|p| !p.is_sampled()) {
            return None;
        }
        let ids = RandomIdGenerator::default();
        let trace_id = parent
            .as_ref()
            .map(|p| p.trace_id())
            .unwrap_or_else(|| ids.new_trace_id());
        let state = parent
            .as_ref()
            .map(|p| p.trace_state().clone())
            .unwrap_or_default();
        Some(Box::new(Recording {
            context: SpanContext::new(
                trace_id,
                ids.new_span_id(),
                TraceFlags::SAMPLED,
                false,
                state,
            ),
            parent,
            started_at: SystemTime::now(),
            started,
            phases: Vec::new(),
        }))
    }

    /// The request's spans, for export.
    pub fn finish(&self, recording: Recording, request: Finished<'_>) {
        let Recording {
            context,
            parent,
            started_at,
            started,
            phases,
        } = recording;
        let wall = |at: Instant| started_at + at.saturating_duration_since(started);
        let mut attributes = vec![
            KeyValue::new("http.request.method", request.method.to_owned()),
            KeyValue::new("url.path", request.path.to_owned()),
            KeyValue::new("http.response.status_code", i64::from(request.status)),
        ];
        if !request.integration.is_empty() {
            attributes.push(KeyValue::new(
                "coupa.integration",
                request.integration.to_owned(),
            ));
        }
        if !request.reason.is_empty() {
            attributes.push(KeyValue::new("coupa.proxy.reason", request.reason));
        }
        let status = if request.status >= 500 || !request.reason.is_empty() {
            Status::error(request.reason)
        } else {
            Status::Unset
        };
        for phase in phases {
            let Phase {
                name,
                kind,
                span_id,
                start,
                end,
                attributes,
                status,
            } = phase;
            self.submit(SpanData {
                span_context: SpanContext::new(
                    context.trace_id(),
                    span_id,
                    TraceFlags::SAMPLED,
                    false,
                    context.trace_state().clone(),
                ),
                parent_span_id: context.span_id(),
                parent_span_is_remote: false,
                span_kind: kind,
                name: Cow::Borrowed(name),
                start_time: wall(start),
                end_time: wall(end),
                attributes,
                status,
                ..self.empty_span()
            });
        }
        self.submit(SpanData {
            parent_span_id: parent.as_ref().map_or(SpanId::INVALID, |p| p.span_id()),
            parent_span_is_remote: parent.is_some(),
            span_context: context,
            span_kind: SpanKind::Server,
            name: Cow::Owned(format!("{} {}", request.method, request.route)),
            start_time: started_at,
            end_time: wall(Instant::now()),
            attributes,
            status,
            ..self.empty_span()
        });
    }

    /// One token fetch, a trace of its own.
    pub fn token_fetch(&self, fetch: TokenFetch<'_>) {
        let ids = RandomIdGenerator::default();
        let mut attributes = vec![
            KeyValue::new("coupa.credential", fetch.credential.to_owned()),
            KeyValue::new("coupa.token.trigger", fetch.trigger),
        ];
        let status = match fetch.failure {
            None => Status::Unset,
            Some(outcome) => {
                attributes.push(KeyValue::new("coupa.token.outcome", outcome.to_owned()));
                Status::error(outcome.to_owned())
            }
        };
        self.submit(SpanData {
            span_context: SpanContext::new(
                ids.new_trace_id(),
                ids.new_span_id(),
                TraceFlags::SAMPLED,
                false,
                TraceState::default(),
            ),
            span_kind: SpanKind::Client,
            name: Cow::Borrowed("token fetch"),
            start_time: fetch.started_at,
            end_time: fetch.ended_at,
            attributes,
            status,
            ..self.empty_span()
        });
    }

    fn empty_span(&self) -> SpanData {
        SpanData {
            span_context: SpanContext::empty_context(),
            parent_span_id: SpanId::INVALID,
            parent_span_is_remote: false,
            span_kind: SpanKind::Internal,
            name: Cow::Borrowed(""),
            start_time: SystemTime::UNIX_EPOCH,
            end_time: SystemTime::UNIX_EPOCH,
            attributes: Vec::new(),
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: Status::Unset,
            instrumentation_scope: self.scope.clone(),
        }
    }

    /// Never waits: a full queue (the collector is down or slow) drops the
    /// span and counts it.
    fn submit(&self, span: SpanData) {
        if self.queue.try_send(span).is_err() {
            self.metrics.dropped_queue_full();
        }
    }
}

/// A finished request, as its server span names it.
pub struct Finished<'a> {
    pub method: &'a str,
    pub path: &'a str,
    /// The span's name after the method: the resource, not the full path
    /// (ids in paths would make every name unique).
    pub route: &'a str,
    pub status: u16,
    pub integration: &'a str,
    pub reason: &'static str,
}

/// A token fetch, as its span names it.
pub struct TokenFetch<'a> {
    pub credential: &'a str,
    /// Why it ran: `start`, `renewal`, `retry`, `rejected_token`, `reload`.
    pub trigger: &'static str,
    pub started_at: SystemTime,
    pub ended_at: SystemTime,
    /// The failure's outcome label; `None`: a token came.
    pub failure: Option<&'a str>,
}

/// What one request's spans will say, noted as it goes.
pub struct Recording {
    /// The request span's own context.
    context: SpanContext,
    /// The client's span, when it sent a `traceparent`.
    parent: Option<SpanContext>,
    started_at: SystemTime,
    started: Instant,
    phases: Vec<Phase>,
}

struct Phase {
    name: &'static str,
    kind: SpanKind,
    span_id: SpanId,
    start: Instant,
    end: Instant,
    attributes: Vec<KeyValue>,
    status: Status,
}

/// An attempt at Coupa under way: its span id is in the `traceparent` it
/// carries.
pub struct Attempt {
    span_id: SpanId,
    start: Instant,
}

impl Recording {
    pub fn trace_id(&self) -> TraceId {
        self.context.trace_id()
    }

    /// A wait of the request (`rate-limit queue`, `connection slot`,
    /// `token wait`, `429 wait`), as a child span.
    pub fn wait(&mut self, name: &'static str, start: Instant, end: Instant) {
        self.phases.push(Phase {
            name,
            kind: SpanKind::Internal,
            span_id: RandomIdGenerator::default().new_span_id(),
            start,
            end,
            attributes: Vec::new(),
            status: Status::Unset,
        });
    }

    /// Starts an attempt at Coupa: `headers` (the attempt's) get its
    /// `traceparent`, replacing the client's.
    pub fn attempt(&mut self, headers: &mut HeaderMap) -> Attempt {
        let span_id = RandomIdGenerator::default().new_span_id();
        let context = SpanContext::new(
            self.context.trace_id(),
            span_id,
            TraceFlags::SAMPLED,
            false,
            self.context.trace_state().clone(),
        );
        TraceContextPropagator::new().inject_context(
            &Context::new().with_remote_span_context(context),
            &mut HeaderInjector(headers),
        );
        Attempt {
            span_id,
            start: Instant::now(),
        }
    }

    /// The attempt ended: Coupa's status, or why there was none.
    pub fn attempt_done(&mut self, attempt: Attempt, outcome: Result<u16, String>) {
        let (attributes, status) = match outcome {
            Ok(code) => (
                vec![KeyValue::new("http.response.status_code", i64::from(code))],
                if code >= 500 {
                    Status::error("")
                } else {
                    Status::Unset
                },
            ),
            Err(why) => (Vec::new(), Status::error(why)),
        };
        self.phases.push(Phase {
            name: "coupa request",
            kind: SpanKind::Client,
            span_id: attempt.span_id,
            start: attempt.start,
            end: Instant::now(),
            attributes,
            status,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(traceparent: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("traceparent", traceparent.parse().unwrap());
        headers
    }

    fn traces_with_room_for(spans: usize) -> (Traces, mpsc::Receiver<SpanData>) {
        let (queue, queued) = mpsc::channel(spans);
        let traces = Traces {
            queue,
            scope: InstrumentationScope::builder("test").build(),
            metrics: TraceMetrics::default(),
        };
        (traces, queued)
    }

    fn finished() -> Finished<'static> {
        Finished {
            method: "GET",
            path: "/api/invoices",
            route: "invoices",
            status: 200,
            integration: "erp",
            reason: "",
        }
    }

    #[test]
    fn spans_the_queue_cannot_take_are_dropped_and_counted() {
        let (traces, mut queued) = traces_with_room_for(2);
        let started = Instant::now();
        let mut recording = traces.begin(&HeaderMap::new(), started).unwrap();
        recording.wait("connection slot", started, Instant::now());
        let mut headers = HeaderMap::new();
        let attempt = recording.attempt(&mut headers);
        recording.attempt_done(attempt, Ok(200));
        traces.finish(*recording, finished());
        // Two phases and the request span: the last did not fit.
        assert_eq!(traces.metrics.dropped_count("queue_full"), 1);
        let names: Vec<_> = std::iter::from_fn(|| queued.try_recv().ok())
            .map(|span| span.name)
            .collect();
        assert_eq!(names, ["connection slot", "coupa request"]);
    }

    #[test]
    fn an_unsampled_clients_trace_is_not_recorded_and_a_sampled_one_continues() {
        let (traces, _queued) = traces_with_room_for(8);
        let trace = "0af7651916cd43dd8448eb211c80319c";
        let unsampled = headers(&format!("00-{trace}-b7ad6b7169203331-00"));
        assert!(traces.begin(&unsampled, Instant::now()).is_none());
        let sampled = headers(&format!("00-{trace}-b7ad6b7169203331-01"));
        let mut recording = traces.begin(&sampled, Instant::now()).unwrap();
        assert_eq!(recording.trace_id(), TraceId::from_hex(trace).unwrap());
        // The attempt's own span goes to Coupa, the client's is replaced.
        let mut outgoing = sampled.clone();
        let attempt = recording.attempt(&mut outgoing);
        assert_eq!(
            outgoing["traceparent"],
            format!("00-{trace}-{}-01", attempt.span_id).as_str()
        );
    }

    #[test]
    fn a_clients_trace_id_is_read_and_garbage_is_none() {
        let trace = "0af7651916cd43dd8448eb211c80319c";
        assert_eq!(
            client_trace_id(&headers(&format!("00-{trace}-b7ad6b7169203331-01"))),
            Some(TraceId::from_hex(trace).unwrap())
        );
        assert_eq!(client_trace_id(&headers("00-zz-b7ad6b7169203331-01")), None);
        assert_eq!(
            client_trace_id(&headers(
                "00-00000000000000000000000000000000-b7ad6b7169203331-01"
            )),
            None
        );
        assert_eq!(client_trace_id(&HeaderMap::new()), None);
    }
}
