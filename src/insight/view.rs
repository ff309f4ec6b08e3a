//! The view of the usage counts that `/status.json` and the status page
//! show: per integration, its resources, flags, last hour and time split,
//! and Coupa's budget over the last hour.

use std::sync::Arc;
use std::time::Duration;

use super::usage::{self, ANSWERS, FORMATS, METHODS};
use super::{refusals, Insight, Usage};

impl Insight {
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
