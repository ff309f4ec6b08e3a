//! Spans to the collector: batches off the queue, posted as OTLP/HTTP
//! protobuf by `opentelemetry-otlp` over this crate's own HTTP client,
//! counted as exported or dropped.

use std::time::Duration;

use bytes::Bytes;
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::trace::{SpanData, SpanExporter as _};
use opentelemetry_sdk::Resource;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;
use tracing::{debug, info};

use crate::telemetry::Repeated;

/// Spans in one export at most.
const BATCH: usize = 512;
/// How long spans wait to fill a batch.
const LINGER: Duration = Duration::from_secs(1);
/// One export's deadline (connect, send, answer).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// What is still queued at shutdown gets this long.
const FINAL_FLUSH: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
#[error("telemetry.otlp_endpoint: cannot set up the trace exporter: {0}")]
pub struct TracesError(String);

/// Spans exported and dropped.
#[derive(Debug, Clone, Default)]
pub struct TraceMetrics {
    exported: Counter,
    dropped: Family<[(&'static str, &'static str); 1], Counter>,
}

impl TraceMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "trace_spans_exported",
            "Spans the OTLP collector ([telemetry] otlp_endpoint) accepted",
            self.exported.clone(),
        );
        registry.register(
            "trace_spans_dropped",
            "Spans not exported, by reason: queue_full (the collector is slower than the spans come), export_failed (the collector refused or could not be reached)",
            self.dropped.clone(),
        );
    }

    pub(super) fn dropped_queue_full(&self) {
        self.dropped
            .get_or_create(&[("reason", "queue_full")])
            .inc();
    }

    #[cfg(test)]
    pub(super) fn dropped_count(&self, reason: &'static str) -> u64 {
        self.dropped.get_or_create(&[("reason", reason)]).get()
    }
}

/// Starts the export task on `background`.
pub(super) fn spawn(
    url: &url::Url,
    queued: mpsc::Receiver<SpanData>,
    metrics: TraceMetrics,
    background: &crate::background::Background,
) -> Result<(), TracesError> {
    let client = reqwest::Client::builder()
        .timeout(EXPORT_TIMEOUT)
        // A collector is spoken to directly, not through an HTTP_PROXY
        // meant for Coupa.
        .no_proxy()
        .build()
        .map_err(|e| TracesError(e.to_string()))?;
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(Collector(client))
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(url.as_str())
        .with_timeout(EXPORT_TIMEOUT)
        .build()
        .map_err(|e| TracesError(e.to_string()))?;
    exporter.set_resource(
        &Resource::builder()
            .with_service_name("coupa-auth-proxy")
            .build(),
    );
    info!(collector = %url, "exporting traces");
    background.spawn(move |stop| run(queued, exporter, metrics, stop));
    Ok(())
}

async fn run(
    mut queued: mpsc::Receiver<SpanData>,
    exporter: opentelemetry_otlp::SpanExporter,
    metrics: TraceMetrics,
    stop: tokio_util::sync::CancellationToken,
) {
    let failures = Repeated::new();
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        tokio::select! {
            got = queued.recv_many(&mut batch, BATCH) => if got == 0 { return },
            _ = stop.cancelled() => break,
        }
        // Let a batch fill, unless it is full or the process stops.
        let linger = tokio::time::sleep(LINGER);
        tokio::pin!(linger);
        while batch.len() < BATCH {
            let room = BATCH - batch.len();
            tokio::select! {
                got = queued.recv_many(&mut batch, room) => if got == 0 { break },
                _ = &mut linger => break,
                _ = stop.cancelled() => break,
            }
        }
        export(&exporter, &mut batch, &metrics, &failures).await;
    }
    // Stopping: what the request path queued before the drain ended.
    queued.close();
    let flush = async {
        while let Some(span) = queued.recv().await {
            batch.push(span);
            if batch.len() == BATCH {
                export(&exporter, &mut batch, &metrics, &failures).await;
            }
        }
        export(&exporter, &mut batch, &metrics, &failures).await;
    };
    if tokio::time::timeout(FINAL_FLUSH, flush).await.is_err() {
        debug!("the collector did not take the last spans in time");
    }
}

async fn export(
    exporter: &opentelemetry_otlp::SpanExporter,
    batch: &mut Vec<SpanData>,
    metrics: &TraceMetrics,
    failures: &Repeated,
) {
    if batch.is_empty() {
        return;
    }
    let spans = batch.len() as u64;
    match exporter.export(std::mem::take(batch)).await {
        Ok(()) => {
            metrics.exported.inc_by(spans);
        }
        Err(error) => {
            metrics
                .dropped
                .get_or_create(&[("reason", "export_failed")])
                .inc_by(spans);
            if let Some(left_out) = failures.due() {
                tracing::warn!(
                    error = %error,
                    spans,
                    left_out,
                    "could not export spans to the collector (telemetry.otlp_endpoint); requests are not affected"
                );
            }
        }
    }
}

/// `opentelemetry-otlp`'s HTTP transport, over the reqwest client this
/// crate already has (its own built-in client would bring a second
/// version of reqwest).
#[derive(Debug)]
struct Collector(reqwest::Client);

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for Collector {
    async fn send_bytes(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, opentelemetry_http::HttpError> {
        let (parts, body) = request.into_parts();
        let answer = self
            .0
            .request(parts.method, parts.uri.to_string())
            .headers(parts.headers)
            .body(body)
            .send()
            .await?;
        let mut response = http::Response::new(Bytes::new());
        *response.status_mut() = answer.status();
        *response.headers_mut() = answer.headers().clone();
        *response.body_mut() = answer.bytes().await?;
        Ok(response)
    }
}
