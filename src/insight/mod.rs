//! The migration view: what each integration actually calls. Per
//! integration (and the unauthenticated default): first and last seen,
//! requests by resource ([`resource`]), method and answer, the last hour
//! minute by minute ([`usage`]), and flags — a candidate to retire, still
//! on a legacy key. Shown on the status page ([`chart`] draws the hour) and
//! exported to Prometheus with bounded labels.
//!
//! Only the resource name is kept of a request: never its query string,
//! ids, body or key. The view lives in this process's memory from its
//! start; each replica shows its own traffic.
//!
//! Hot path: [`Insight::record`] is atomics plus one lock-free table read;
//! each integration's [`Usage`] is resolved when the config is loaded, not
//! looked up per request.

pub mod chart;
pub mod refusals;
pub mod resource;
pub mod ring;
pub mod time_spent;
pub mod usage;

use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use http::{Method, StatusCode};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

use crate::config::Config;
pub use resource::{resource_of, Resource};
pub use time_spent::Split;
pub use usage::{Usage, Via};
use usage::{ANSWERS, FORMATS, METHODS};

/// What the view knows of a configured integration.
struct Configured {
    usage: Arc<Usage>,
    credential: String,
    legacy_key: bool,
    oauth_client_id: Option<String>,
    /// What its requests without an `Accept` are given.
    default_accept: String,
}

/// Every integration's usage, and the clock they are kept on.
pub struct Insight {
    /// The view's clock starts here (tokio's, so tests can pause it).
    epoch: tokio::time::Instant,
    epoch_wall: SystemTime,
    idle_warning: RwLock<Duration>,
    /// Every usage ever made, by name, so a reload keeps the counts.
    usages: RwLock<Vec<Arc<Usage>>>,
    configured: ArcSwap<Vec<Configured>>,
    unnamed: Arc<Usage>,
    /// Slots of Coupa's budget in an hour (`[coupa.rate_limit]`), if shaped.
    budget_per_hour: RwLock<Option<f64>>,
}

impl Insight {
    pub fn new(config: &Config) -> Arc<Self> {
        let unnamed = Arc::new(Usage::new(Arc::from("")));
        let insight = Arc::new(Self {
            epoch: tokio::time::Instant::now(),
            epoch_wall: SystemTime::now(),
            idle_warning: RwLock::new(config.insight.idle_warning),
            usages: RwLock::new(vec![unnamed.clone()]),
            configured: ArcSwap::from_pointee(Vec::new()),
            unnamed,
            budget_per_hour: RwLock::new(None),
        });
        insight.configure(config);
        insight
    }

    /// Takes the integrations and settings of a (re)loaded config; the
    /// counts of integrations that stay are kept.
    pub fn configure(&self, config: &Config) {
        if let Ok(mut idle) = self.idle_warning.write() {
            *idle = config.insight.idle_warning;
        }
        if let Ok(mut budget) = self.budget_per_hour.write() {
            *budget = config.coupa.rate_limit.map(|r| r.per_second * 3600.0);
        }
        let configured = config
            .integrations
            .iter()
            .map(|i| Configured {
                usage: self.usage(&i.name),
                credential: config.credentials[i.credential].name.clone(),
                legacy_key: i.api_key_sha256.is_some(),
                oauth_client_id: i.local_client.as_ref().map(|c| c.client_id.clone()),
                default_accept: i
                    .accept
                    .as_ref()
                    .unwrap_or(&config.coupa.accept)
                    .to_str()
                    .unwrap_or("?")
                    .to_owned(),
            })
            .collect();
        self.configured.store(Arc::new(configured));
    }

    /// The usage of the integration `name`, made on first use.
    pub fn usage(&self, name: &str) -> Arc<Usage> {
        if let Ok(all) = self.usages.read() {
            if let Some(found) = all.iter().find(|u| &*u.name == name) {
                return found.clone();
            }
        }
        let Ok(mut all) = self.usages.write() else {
            return Arc::new(Usage::new(Arc::from(name)));
        };
        if let Some(found) = all.iter().find(|u| &*u.name == name) {
            return found.clone();
        }
        let made = Arc::new(Usage::new(Arc::from(name)));
        all.push(made.clone());
        made
    }

    /// The usage of requests that name no integration.
    pub fn unnamed(&self) -> &Arc<Usage> {
        &self.unnamed
    }

    /// Now on the view's clock.
    pub fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    /// Counts one answered request (see [`Usage::record`]): true when it
    /// is a 403 the caller should log.
    pub fn record(
        &self,
        usage: &Usage,
        via: Via,
        method: &Method,
        path: &str,
        status: StatusCode,
        refused: bool,
    ) -> bool {
        usage.record(self.now(), via, method, resource_of(path), status, refused)
    }

    /// Where a forwarded request of `usage`'s spent its time.
    pub fn spent(&self, usage: &Usage, split: &Split) {
        usage.time_spent.observe(split, self.now());
    }

    /// Counts a slot of Coupa's budget given to `usage`'s integration.
    pub fn count_slot(&self, usage: &Usage) {
        usage.count_slot(self.now());
    }

    /// Coupa answered one of `usage`'s requests 429.
    pub fn coupa_refused(&self, usage: &Usage) {
        usage.coupa_refusals.refused(self.now());
    }

    /// One of `usage`'s requests was sent again after `waited`.
    pub fn resent(&self, usage: &Usage, waited: Duration) {
        usage.coupa_refusals.resent(self.now(), waited);
    }

    fn wall(&self, at: Duration) -> SystemTime {
        self.epoch_wall + at
    }

    fn idle_warning(&self) -> Duration {
        self.idle_warning
            .read()
            .map(|d| *d)
            .unwrap_or(Duration::from_secs(7 * 86_400))
    }

    /// Coupa's budget as the proxy sees it over the last hour: the
    /// configured rate, the minutes Coupa refused it, and an estimate of
    /// the share clients outside the proxy took then. `None` without
    /// `[coupa.rate_limit]` (no slots are counted).
    pub fn budget_view(&self) -> Option<serde_json::Value> {
        let per_hour = self.budget_per_hour.read().ok().and_then(|b| *b)?;
        let per_second = per_hour / 3600.0;
        let now = self.now();
        let usages: Vec<Arc<Usage>> = self.usages.read().map(|u| u.clone()).unwrap_or_default();
        let mut slots = [0u64; usage::MINUTES];
        let mut refused = [0u64; usage::MINUTES];
        for usage in &usages {
            let (s, r) = (
                usage.slots_per_minute(now),
                usage.coupa_refusals.refused_per_minute(now),
            );
            for m in 0..usage::MINUTES {
                slots[m] += s[m];
                refused[m] += r[m];
            }
        }
        let estimate = refusals::outside_share(&slots, &refused, per_second);
        let (minutes, share) = estimate.unwrap_or((0, 0.0));
        let hint = (share >= 0.05).then(|| {
            format!(
                "clients outside the proxy took about {:.0} % of Coupa's budget while it refused the proxy; \
                 lower coupa.rate_limit.per_second to about {:.0} to leave them room (the proxy sends refused \
                 requests again meanwhile: coupa.resend_429_within)",
                share * 100.0,
                per_second * (1.0 - share)
            )
        });
        Some(serde_json::json!({
            "per_second": per_second,
            "refused_minutes_last_hour": minutes,
            "outside_share_estimate": estimate.map(|(_, share)| share),
            "hint": hint,
        }))
    }

    /// The view for `/status.json`: configured integrations in config
    /// order, then any other usage with traffic (the unauthenticated
    /// default, integrations removed by a reload).
    pub fn snapshot(&self) -> Vec<serde_json::Value> {
        let now = self.now();
        let idle_warning = self.idle_warning();
        let configured = self.configured.load();
        let mut out: Vec<serde_json::Value> = configured
            .iter()
            .map(|c| {
                let mut view = self.view(&c.usage, now, idle_warning, true);
                view["credential"] = c.credential.clone().into();
                view["identified_by"] = serde_json::json!({
                    "legacy_key": c.legacy_key,
                    "oauth_client_id": c.oauth_client_id,
                });
                view["default_accept"]["given"] = c.default_accept.clone().into();
                accept_flag(&mut view, &c.default_accept);
                view
            })
            .collect();
        let others: Vec<Arc<Usage>> = self
            .usages
            .read()
            .map(|all| {
                all.iter()
                    .filter(|u| u.last_seen().is_some())
                    .filter(|u| !configured.iter().any(|c| Arc::ptr_eq(&c.usage, u)))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        out.extend(
            others
                .iter()
                .map(|usage| self.view(usage, now, idle_warning, false)),
        );
        out
    }

    fn view(
        &self,
        usage: &Usage,
        now: Duration,
        idle_warning: Duration,
        configured: bool,
    ) -> serde_json::Value {
        let time = |at: Option<Duration>| {
            at.map(|at| humantime::format_rfc3339_seconds(self.wall(at)).to_string())
        };
        let mut flags = Vec::new();
        let last_seen = usage.last_seen();
        let silent_for = now.saturating_sub(last_seen.unwrap_or(Duration::ZERO));
        if configured && silent_for >= idle_warning {
            flags.push(serde_json::json!({
                "flag": "idle",
                "message": format!(
                    "{} for {}: a candidate to retire",
                    if last_seen.is_some() { "not seen" } else { "never seen since start" },
                    humantime::format_duration(Duration::from_secs(silent_for.as_secs())),
                ),
            }));
        }
        if usage
            .last_legacy_key()
            .is_some_and(|at| now.saturating_sub(at) < idle_warning)
        {
            flags.push(serde_json::json!({
                "flag": "legacy_key",
                "message": "still sends X-COUPA-API-KEY: not on OAuth yet",
            }));
        }
        let mut requests = 0;
        let mut resources = Vec::new();
        usage.for_each_resource(|r| {
            let mut methods = serde_json::Map::new();
            let mut answers = [0u64; ANSWERS.len()];
            let mut total = 0;
            for (m, method) in METHODS.iter().enumerate() {
                let by_method: u64 = (0..ANSWERS.len()).map(|a| r.count(m, a)).sum();
                for (a, answer) in answers.iter_mut().enumerate() {
                    *answer += r.count(m, a);
                }
                if by_method > 0 {
                    methods.insert((*method).to_owned(), by_method.into());
                }
                total += by_method;
            }
            if total == 0 {
                return;
            }
            requests += total;
            let answers: serde_json::Map<String, serde_json::Value> = ANSWERS
                .iter()
                .zip(answers)
                .filter(|(_, n)| *n > 0)
                .map(|(name, n)| ((*name).to_owned(), n.into()))
                .collect();
            resources.push(serde_json::json!({
                "resource": &*r.name,
                "requests": total,
                "forbidden": answers.get("403").cloned().unwrap_or(0.into()),
                "methods": methods,
                "answers": answers,
            }));
        });
        let errors = usage.errors();
        let budget = self
            .budget_per_hour
            .read()
            .ok()
            .and_then(|b| *b)
            .map(|per_hour| {
                let slots = usage.slots_last_hour(now);
                serde_json::json!({
                    "slots_last_hour": slots,
                    "share_last_hour": slots as f64 / per_hour,
                })
            });
        let coupa_429 = usage.coupa_refusals.last_hour(now);
        serde_json::json!({
            "budget": budget,
            "coupa_429_last_hour": {
                "refused": coupa_429.refused,
                "resent": coupa_429.resent,
                "resend_wait_seconds": coupa_429.waited.as_secs_f64(),
            },
            "integration": if usage.name.is_empty() { "(none)" } else { &usage.name },
            "requests": requests,
            "errors": errors,
            "refused_by_coupa": usage.refused_by_coupa(),
            "error_rate": if requests == 0 { 0.0 } else { errors as f64 / requests as f64 },
            "first_seen": time(usage.first_seen()),
            "last_seen": time(last_seen),
            "last_seen_seconds_ago": last_seen.map(|at| now.saturating_sub(at).as_secs()),
            "last_legacy_key": time(usage.last_legacy_key()),
            "last_local_token": time(usage.last_local_token()),
            "flags": flags,
            "resources": resources,
            "requests_per_minute": usage.per_minute(now).to_vec(),
            "time_last_hour": usage.time_spent.view(now),
            "default_accept": {
                "relied_on": FORMATS
                    .iter()
                    .zip(usage.defaulted_accepts())
                    .map(|(format, n)| ((*format).to_owned(), n.into()))
                    .collect::<serde_json::Map<String, serde_json::Value>>(),
            },
        })
    }

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

impl std::fmt::Debug for Insight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Insight").finish_non_exhaustive()
    }
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

/// Flags an integration whose requests without `Accept` were given JSON:
/// Coupa answers those XML, so a legacy integration written against that
/// default breaks on JSON unless it is given `accept = "application/xml"`.
fn accept_flag(view: &mut serde_json::Value, given: &str) {
    let json = view["default_accept"]["relied_on"]["json"]
        .as_u64()
        .unwrap_or(0);
    if json == 0 {
        return;
    }
    let message = format!(
        "{json} requests sent no Accept and were given {given}; Coupa itself answers those in XML: \
         if this integration was written for that, set accept = \"application/xml\" in its [[integration]] table"
    );
    if let Some(flags) = view["flags"].as_array_mut() {
        flags.push(serde_json::json!({"flag": "default_accept", "message": message}));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_support::{load, MINIMAL};

    fn flags(view: &serde_json::Value) -> Vec<String> {
        view["flags"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["flag"].as_str().unwrap().to_owned())
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn silent_integrations_become_candidates_to_retire_and_key_users_are_flagged() {
        let config = load(&format!(
            "{MINIMAL}\n[[integration]]\nname = \"erp\"\napi_key_sha256 = \"{}\"\n\
             [[integration]]\nname = \"snap\"\noauth_client_id = \"snap\"\noauth_client_secret_sha256 = \"{}\"\n\
             [insight]\nidle_warning = \"7d\"\n",
            "1".repeat(64),
            "2".repeat(64)
        ))
        .unwrap();
        let insight = Insight::new(&config);
        let erp = insight.usage("erp");
        let get = |usage: &Usage, via, path| {
            insight.record(usage, via, &Method::GET, path, StatusCode::OK, false)
        };
        get(&erp, Via::LegacyKey, "/api/invoices/12");
        let view = insight.snapshot();
        assert_eq!(view.len(), 2, "both configured integrations, in order");
        assert_eq!(view[0]["integration"], "erp");
        assert_eq!(view[0]["identified_by"]["legacy_key"], true);
        assert_eq!(view[1]["identified_by"]["oauth_client_id"], "snap");
        assert_eq!(flags(&view[0]), ["legacy_key"]);
        assert!(
            flags(&view[1]).is_empty(),
            "a fresh process flags nobody idle"
        );

        tokio::time::advance(Duration::from_secs(7 * 86_400)).await;
        let view = insight.snapshot();
        assert_eq!(
            flags(&view[0]),
            ["idle"],
            "a week silent; no longer calling with a key"
        );
        assert!(view[0]["flags"][0]["message"]
            .as_str()
            .unwrap()
            .contains("not seen for 7days"));
        assert_eq!(flags(&view[1]), ["idle"]);
        assert!(view[1]["flags"][0]["message"]
            .as_str()
            .unwrap()
            .contains("never seen since start"));

        get(&insight.usage("snap"), Via::LocalToken, "/api/suppliers");
        let view = insight.snapshot();
        assert!(
            flags(&view[1]).is_empty(),
            "a local token is not a legacy key"
        );
        assert!(view[1]["last_local_token"].is_string());
        assert_eq!(view[1]["resources"][0]["resource"], "suppliers");
        assert_eq!(view[1]["requests_per_minute"][59], 1);
    }

    #[test]
    fn a_reload_keeps_the_counts_of_integrations_that_stay() {
        let one = format!(
            "{MINIMAL}\n[[integration]]\nname = \"erp\"\napi_key_sha256 = \"{}\"\n",
            "1".repeat(64)
        );
        let insight = Insight::new(&load(&one).unwrap());
        let erp = insight.usage("erp");
        insight.record(
            &erp,
            Via::LegacyKey,
            &Method::GET,
            "/api/x",
            StatusCode::OK,
            false,
        );
        let two = format!(
            "{one}[[integration]]\nname = \"new\"\napi_key_sha256 = \"{}\"\n",
            "3".repeat(64)
        );
        insight.configure(&load(&two).unwrap());
        assert!(Arc::ptr_eq(&insight.usage("erp"), &erp));
        let view = insight.snapshot();
        assert_eq!(view[0]["requests"], 1);
        assert_eq!(view[1]["integration"], "new");
        // Traffic of an integration removed by a reload stays visible.
        insight.configure(&load(MINIMAL).unwrap());
        let view = insight.snapshot();
        assert_eq!(view.len(), 1);
        assert_eq!(view[0]["integration"], "erp");
        assert!(view[0]["credential"].is_null());
    }

    #[tokio::test(start_paused = true)]
    async fn each_integration_shows_its_share_of_the_budget_over_the_last_hour() {
        let shaped = format!(
            "{MINIMAL}\n[coupa.rate_limit]\nper_second = 10.0\n\n[[integration]]\nname = \"erp\"\napi_key_sha256 = \"{}\"\n",
            "1".repeat(64)
        );
        let insight = Insight::new(&load(&shaped).unwrap());
        let erp = insight.usage("erp");
        for _ in 0..360 {
            insight.count_slot(&erp);
        }
        let view = insight.snapshot();
        assert_eq!(view[0]["budget"]["slots_last_hour"], 360);
        // 10/s is 36,000 slots an hour.
        assert_eq!(view[0]["budget"]["share_last_hour"], 0.01);
        tokio::time::advance(Duration::from_secs(3601)).await;
        assert_eq!(insight.snapshot()[0]["budget"]["slots_last_hour"], 0);
        // Without a rate limit there is no budget to share.
        let unshaped = shaped.replace("[coupa.rate_limit]\nper_second = 10.0\n", "");
        insight.configure(&load(&unshaped).unwrap());
        assert!(insight.snapshot()[0]["budget"].is_null());
    }
}
