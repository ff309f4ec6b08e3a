//! The usage counts as Prometheus metrics, read at scrape time: labels
//! bounded by the configured integrations, resources, method classes and
//! answers.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

use super::usage::{self, ANSWERS, METHODS};
use super::{Insight, Usage};

impl Insight {
    /// Exports the view's counters to Prometheus, read at scrape time.
    pub fn collector(self: &Arc<Self>) -> Box<dyn Collector> {
        Box::new(InsightCollector(self.clone()))
    }
}

/// Method class (index into [`CLASSES`]) of each entry of [`METHODS`].
const CLASS_OF_METHOD: [usize; METHODS.len()] = [0, 0, 1, 1, 1, 1, 2];
const CLASSES: [&str; 3] = ["Read", "Write", "Other"];
/// Status class (index into [`STATUSES`]) of each entry of [`ANSWERS`].
const STATUS_OF_ANSWER: [usize; ANSWERS.len()] = [0, 1, 2, 2, 2, 2, 2, 3];
const STATUSES: [&str; 4] = ["2xx", "3xx", "4xx", "5xx"];

/// A resource's counts by method class and answer.
fn by_class(resource: &usage::ResourceUsage) -> [[u64; ANSWERS.len()]; CLASSES.len()] {
    let mut counts = [[0; ANSWERS.len()]; CLASSES.len()];
    for (m, class) in CLASS_OF_METHOD.iter().enumerate() {
        for (a, count) in counts[*class].iter_mut().enumerate() {
            *count += resource.count(m, a);
        }
    }
    counts
}

#[derive(Debug)]
struct InsightCollector(Arc<Insight>);

impl Collector for InsightCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let usages: Vec<Arc<Usage>> = self.0.usages.read().map(|u| u.clone()).unwrap_or_default();
        // (integration, resource, counts by class and answer), read once so
        // both families agree.
        let mut rows = Vec::new();
        for usage in &usages {
            usage.for_each_resource(|r| {
                let counts = by_class(r);
                if counts.iter().flatten().any(|c| *c > 0) {
                    rows.push((usage.name.clone(), r.name.clone(), counts));
                }
            });
        }
        {
            let mut family = encoder.encode_descriptor(
                "integration_requests",
                "Requests by integration, resource (the path segment after /api/; `other` past 64 per integration), method class and answer (2xx, 3xx, 401, 403, 404, 429, 4xx, 5xx)",
                None,
                MetricType::Counter,
            )?;
            for (integration, resource, counts) in &rows {
                for (class, by_answer) in counts.iter().enumerate() {
                    for (answer, count) in by_answer.iter().enumerate() {
                        if *count == 0 {
                            continue;
                        }
                        ConstCounter::new(*count).encode(family.encode_family(&[
                            ("integration", &**integration),
                            ("resource", &**resource),
                            ("method", CLASSES[class]),
                            ("answer", ANSWERS[answer]),
                        ])?)?;
                    }
                }
            }
        }
        let refusals: Vec<_> = usages
            .iter()
            .map(|usage| (&*usage.name, usage.coupa_refusals.totals()))
            .filter(|(_, counts)| counts.refused > 0)
            .collect();
        for (name, help) in [
            ("coupa_rate_limited", "Coupa's own 429 answers, by integration"),
            (
                "coupa_rate_limited_resends",
                "Requests sent to Coupa again after its 429 (coupa.resend_429_within), by integration",
            ),
        ] {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (integration, counts) in &refusals {
                let count = if name == "coupa_rate_limited" {
                    counts.refused
                } else {
                    counts.resent
                };
                ConstCounter::new(count)
                    .encode(family.encode_family(&[("integration", *integration)])?)?;
            }
        }
        {
            let mut family = encoder.encode_descriptor(
                "coupa_rate_limited_wait_seconds",
                "What the re-sends after Coupa's 429 waited in all, by integration",
                None,
                MetricType::Counter,
            )?;
            for (integration, counts) in &refusals {
                ConstCounter::new(counts.waited.as_secs_f64())
                    .encode(family.encode_family(&[("integration", *integration)])?)?;
            }
        }
        if let Some(share) = self
            .0
            .budget_view()
            .and_then(|view| view["outside_share_estimate"].as_f64())
        {
            let gauge = encoder.encode_descriptor(
                "coupa_outside_share_estimate",
                "Share of Coupa's budget that clients outside the proxy seem to take, from the minutes of the last hour in which Coupa answered the proxy 429",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(share).encode(gauge)?;
        }
        let mut family = encoder.encode_descriptor(
            "requests",
            "Requests answered, by method class (Read, Write, Other), status class and integration",
            None,
            MetricType::Counter,
        )?;
        for usage in &usages {
            let mut totals = [[0u64; STATUSES.len()]; CLASSES.len()];
            for (_, _, counts) in rows.iter().filter(|(name, _, _)| *name == usage.name) {
                for (class, by_answer) in counts.iter().enumerate() {
                    for (answer, count) in by_answer.iter().enumerate() {
                        totals[class][STATUS_OF_ANSWER[answer]] += count;
                    }
                }
            }
            for (class, by_status) in totals.iter().enumerate() {
                for (status, count) in by_status.iter().enumerate() {
                    if *count == 0 {
                        continue;
                    }
                    ConstCounter::new(*count).encode(family.encode_family(&[
                        ("method", CLASSES[class]),
                        ("status", STATUSES[status]),
                        ("integration", &*usage.name),
                    ])?)?;
                }
            }
        }
        Ok(())
    }
}
