//! The status page: the `/status.json` view rendered as plain HTML,
//! server-side, with no external assets (charts are inline SVG).

use std::fmt::Write as _;
use std::time::Duration;

use crate::insight::chart;

fn cell(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::Null => "—".to_owned(),
        serde_json::Value::String(s) => crate::encode::html(s),
        other => crate::encode::html(&other.to_string()),
    }
}

fn seconds(value: &serde_json::Value) -> String {
    value
        .as_u64()
        .map(|s| humantime::format_duration(Duration::from_secs(s)).to_string())
        .unwrap_or_else(|| "—".to_owned())
}

/// The status page: one self-contained HTML document.
pub(super) fn status_page(status: &serde_json::Value) -> String {
    let mut html = String::from(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"10\"><title>coupa-auth-proxy</title>\
         <style>body{font:14px system-ui,sans-serif;margin:2em;color:#222}\
         table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}\
         .ok{color:#060}.bad{color:#a00}h3{margin:1.5em 0 .3em}.chart{display:block}</style></head><body>",
    );
    let _ = write!(
        html,
        "<h1>coupa-auth-proxy {}</h1><p>Upstream {} · up {}</p><h2>Credentials</h2>\
         <table><tr><th>credential</th><th>client id</th><th>grant</th><th>scopes</th>\
         <th>token age</th><th>expires in</th><th>last refresh</th><th>last error</th>\
         <th>refresh token ends in</th></tr>",
        cell(&status["version"]),
        cell(&status["upstream"]),
        seconds(&status["uptime_seconds"]),
    );
    for c in status["credentials"].as_array().into_iter().flatten() {
        let class = if c["ready"] == true { "ok" } else { "bad" };
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
             <td class=\"{class}\">{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            cell(&c["credential"]),
            cell(&c["client_id"]),
            cell(&c["grant"]),
            cell(&c["scopes"]),
            seconds(&c["token_age_seconds"]),
            seconds(&c["token_expires_in_seconds"]),
            cell(&c["last_refresh"]),
            cell(&c["last_token_error"]),
            match c["warning"].as_str() {
                Some(warning) => format!(
                    "<span class=\"bad\">{}</span>",
                    crate::encode::html(warning)
                ),
                None => seconds(&c["refresh_token_expires_in_seconds"]),
            },
        );
    }
    html.push_str("</table>");
    budget_section(&mut html, &status["coupa_budget"]);
    html.push_str("<h2>Integrations</h2>");
    let integrations = status["integrations"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if integrations.is_empty() {
        html.push_str("<p>No traffic yet.</p>");
    }
    for i in &integrations {
        integration_section(&mut html, i);
    }
    if let Some(cluster) = status["cluster"].as_object() {
        let _ = write!(
            html,
            "<h2>Cluster</h2><p>{} · this process {}</p><table><tr><th>processes seen \
             in the last 30 s</th></tr>",
            cell(&cluster["redis"]),
            cell(&cluster["this_process"]),
        );
        let connection = cluster
            .get("connection")
            .unwrap_or(&serde_json::Value::Null);
        if connection["sentinel"] == true {
            let _ = write!(
                html,
                "<p>primary {} (named by Sentinel) since {} · failovers followed: {}</p>",
                cell(&connection["primary"]),
                cell(&connection["primary_since"]),
                cell(&connection["failovers_followed"]),
            );
        }
        for process in cluster["processes_seen"].as_array().into_iter().flatten() {
            let _ = write!(html, "<tr><td>{}</td></tr>", cell(process));
        }
        html.push_str("</table><table><tr><th>credential</th><th>fetching a token now</th></tr>");
        for (name, holder) in cluster["fetching_now"].as_object().into_iter().flatten() {
            let holder = holder
                .as_str()
                .map(crate::encode::html)
                .unwrap_or_else(|| "nobody".into());
            let _ = write!(
                html,
                "<tr><td>{}</td><td>{holder}</td></tr>",
                crate::encode::html(name)
            );
        }
        html.push_str("</table>");
    }
    html.push_str(
        "<p><a href=\"/status.json\">status.json</a> · <a href=\"/metrics\">metrics</a></p>\
         </body></html>",
    );
    html
}

/// Coupa's budget over the last hour: how often Coupa refused the proxy,
/// and what clients outside it seem to take.
fn budget_section(html: &mut String, budget: &serde_json::Value) {
    let Some(per_second) = budget["per_second"].as_f64() else {
        return;
    };
    let minutes = budget["refused_minutes_last_hour"].as_u64().unwrap_or(0);
    let _ = write!(
        html,
        "<h2>Coupa's budget</h2><p>{per_second:.0} requests/s configured; in the last hour Coupa refused the proxy (429) in {minutes} minutes"
    );
    if let Some(share) = budget["outside_share_estimate"].as_f64() {
        let _ = write!(
            html,
            "; clients outside the proxy took about {:.0} % of the budget then",
            share * 100.0
        );
    }
    html.push_str(".</p>");
    if let Some(hint) = budget["hint"].as_str() {
        let _ = write!(
            html,
            "<p class=\"flag bad\">⚑ {}</p>",
            crate::encode::html(hint)
        );
    }
}

/// Where an integration's requests spent their time in the last hour:
/// p50 and p99 of the proxy's waits, Coupa and the proxy's own work, as
/// bucket bounds.
fn time_spent(html: &mut String, spent: &serde_json::Value) {
    let requests = spent["requests"].as_u64().unwrap_or(0);
    if requests == 0 {
        return;
    }
    let bound = |value: &serde_json::Value| match value.as_f64() {
        Some(ms) if ms < 1000.0 => format!("≤ {ms} ms"),
        Some(ms) => format!("≤ {} s", ms / 1000.0),
        None => "> 32.8 s".to_owned(),
    };
    let part = |name: &str, key: &str| {
        format!(
            "{name} p50 {}, p99 {}",
            bound(&spent[key]["p50"]),
            bound(&spent[key]["p99"])
        )
    };
    let _ = write!(
        html,
        "<p>where the time went in the last hour ({requests} requests sent to Coupa): {} · {} · {}</p>",
        part("waiting in the proxy (queue, connection slot, token, 429 re-sends)", "waiting_ms"),
        part("at Coupa", "coupa_ms"),
        part("the proxy's own work", "proxy_ms"),
    );
}

/// One integration of the migration view: what identifies it, when it was
/// seen, its flags, the last hour, and its resources.
fn integration_section(html: &mut String, i: &serde_json::Value) {
    let rate = i["error_rate"].as_f64().unwrap_or(0.0) * 100.0;
    let identified = &i["identified_by"];
    let mut by = Vec::new();
    if identified["legacy_key"] == true {
        by.push("legacy key".to_owned());
    }
    if let Some(id) = identified["oauth_client_id"].as_str() {
        by.push(format!("local OAuth client {}", crate::encode::html(id)));
    }
    let _ =
        write!(
        html,
        "<h3>{}</h3><p>credential {} · identified by {} · {} requests, {} errors ({rate:.1} %), \
         {} refused by Coupa (4xx) · first seen {} · last seen {}</p>",
        cell(&i["integration"]),
        cell(&i["credential"]),
        if by.is_empty() { "—".to_owned() } else { by.join(", ") },
        cell(&i["requests"]),
        cell(&i["errors"]),
        cell(&i["refused_by_coupa"]),
        cell(&i["first_seen"]),
        cell(&i["last_seen"]),
    );
    let relied: Vec<String> = i["default_accept"]["relied_on"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(_, n)| n.as_u64().unwrap_or(0) > 0)
        .map(|(format, n)| format!("{n} {}", crate::encode::html(format)))
        .collect();
    if let Some(given) = i["default_accept"]["given"].as_str() {
        let _ = write!(
            html,
            "<p>requests without Accept are given {}; sent without Accept: {}</p>",
            crate::encode::html(given),
            if relied.is_empty() {
                "none".to_owned()
            } else {
                relied.join(", ")
            },
        );
    }
    time_spent(html, &i["time_last_hour"]);
    if let Some(slots) = i["budget"]["slots_last_hour"].as_u64() {
        let share = i["budget"]["share_last_hour"].as_f64().unwrap_or(0.0) * 100.0;
        let _ = write!(
            html,
            "<p>Coupa's budget in the last hour: {slots} slots, {share:.1} % of it</p>"
        );
    }
    let coupa_429 = &i["coupa_429_last_hour"];
    if let Some(refused) = coupa_429["refused"].as_u64().filter(|n| *n > 0) {
        let resent = coupa_429["resent"].as_u64().unwrap_or(0);
        let waited = coupa_429["resend_wait_seconds"].as_f64().unwrap_or(0.0);
        let _ = write!(
            html,
            "<p>Coupa's own 429s in the last hour: {refused}, sent again {resent} times after {waited:.0} s of waiting in all \
             (other clients share the instance's budget)</p>"
        );
    }
    for flag in i["flags"].as_array().into_iter().flatten() {
        let _ = write!(
            html,
            "<p class=\"flag bad\">⚑ {}</p>",
            cell(&flag["message"])
        );
    }
    let series: Vec<u64> = i["requests_per_minute"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_u64())
        .collect();
    html.push_str(&chart::requests_per_minute(&series));
    html.push_str(
        "<table><tr><th>resource</th><th>requests</th><th>methods</th><th>answers</th>\
         <th>403</th></tr>",
    );
    let pairs = |value: &serde_json::Value| -> String {
        value
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, v)| format!("{} {}", crate::encode::html(k), cell(v)))
            .collect::<Vec<_>>()
            .join(" · ")
    };
    for r in i["resources"].as_array().into_iter().flatten() {
        let forbidden = r["forbidden"].as_u64().unwrap_or(0);
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td{}>{forbidden}</td></tr>",
            cell(&r["resource"]),
            cell(&r["requests"]),
            pairs(&r["methods"]),
            pairs(&r["answers"]),
            if forbidden > 0 { " class=\"bad\"" } else { "" },
        );
    }
    html.push_str("</table>");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_table_on_the_page_is_closed_and_none_is_empty() {
        for cluster in [
            serde_json::Value::Null,
            serde_json::json!({"redis": "up", "this_process": "p", "processes_seen": ["p"], "fetching_now": {"default": null}}),
        ] {
            let status = serde_json::json!({
                "credentials": [{"credential": "default", "ready": true}],
                "integrations": [{"integration": "erp", "identified_by": {"legacy_key": true},
                    "flags": [], "requests_per_minute": [0, 1],
                    "resources": [{"resource": "invoices", "requests": 1, "forbidden": 0,
                        "methods": {"GET": 1}, "answers": {"2xx": 1}}]}],
                "cluster": cluster,
            });
            let html = status_page(&status);
            assert_eq!(
                html.matches("<table").count(),
                html.matches("</table>").count(),
                "{html}"
            );
            assert!(!html.contains("<table></table>"), "{html}");
            assert!(html.ends_with("</body></html>"));
        }
    }
}
