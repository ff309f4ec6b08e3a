//! The migration view: what each integration actually calls. Per
//! integration (and the unauthenticated default): first and last seen,
//! requests by resource ([`resource`]), method and answer, the last hour
//! minute by minute ([`usage`]), and flags — a candidate to retire, still
//! on a legacy key. Shown on the status page (`view.rs` builds what it
//! shows, [`chart`] draws the hour) and exported to Prometheus with bounded
//! labels (`collector.rs`).
//!
//! Only the resource name is kept of a request: never its query string,
//! ids, body or key. The view lives in this process's memory from its
//! start; each replica shows its own traffic.
//!
//! Hot path: [`Insight::record`] is atomics plus one lock-free table read;
//! each integration's [`Usage`] is resolved when the config is loaded, not
//! looked up per request.

pub mod chart;
mod collector;
pub mod refusals;
pub mod resource;
pub mod ring;
pub mod time_spent;
pub mod usage;
mod view;

use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use http::{Method, StatusCode};

use crate::config::Config;
pub use resource::{resource_of, Resource};
pub use time_spent::Split;
pub use usage::{Usage, Via};

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
}

impl std::fmt::Debug for Insight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Insight").finish_non_exhaustive()
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
