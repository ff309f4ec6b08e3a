//! The migration view after a scripted mix of calls through the real
//! binary: resources with ids collapsed, methods and answers counted, a 403
//! counted every time and logged once, the cardinality cap, and nothing of
//! queries, ids, keys or tokens kept anywhere.

use std::time::Duration;

use crate::support::*;
use coupa_auth_proxy::proxy::auth::hash_key;

const ERP_KEY: &str = "erp-legacy-key-6c1e9b0d4f2a4e7a9d3c5b8a1f0e2d4c";
const DAY: Duration = Duration::from_secs(86_400);

fn config(base_url: &str) -> String {
    config_text(base_url, "", "")
        + &format!(
            "\n[[integration]]\nname = \"erp\"\napi_key_sha256 = \"{}\"\n\n[[integration]]\nname = \"retired-flow\"\napi_key_sha256 = \"{}\"\n",
            hash_key(ERP_KEY),
            hash_key("a-key-nobody-sends-any-more")
        )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_view_counts_resources_methods_and_answers_and_keeps_no_ids_queries_or_keys() {
    let fake = start_fake(DAY).await;
    fake.state().set_scoped_api(true);
    let proxy = ProxyProcess::start(&config(&fake.base_url()), &[], &[]);
    proxy.wait_ready().await;
    let client = http_client();
    let send = |method: reqwest::Method, path: &str| {
        client
            .request(method, proxy.url(path))
            .header("x-coupa-api-key", ERP_KEY)
            .body("{\"po_number\":\"PO-SECRET-4711\"}")
    };
    // The credential reads invoices but may not change them, and has no
    // supplier scope: Coupa answers 403 to those.
    for (method, path, status) in [
        (
            reqwest::Method::GET,
            "/api/invoices/918273?filter=SECRET-QUERY",
            200,
        ),
        (reqwest::Method::GET, "/api/invoices", 200),
        (reqwest::Method::PUT, "/api/invoices/918273", 403),
        (reqwest::Method::PUT, "/api/invoices/555001/approve", 403),
        (reqwest::Method::PUT, "/api/invoices/555002", 403),
        (reqwest::Method::GET, "/api/suppliers/66", 403),
        (reqwest::Method::GET, "/api/5550123", 200),
    ] {
        let response = send(method.clone(), path).send().await.unwrap();
        assert_eq!(response.status(), status, "{method} {path}");
    }
    // Past 64 resources per integration, the rest is `other`.
    fake.state().set_scoped_api(false);
    for i in 0..70 {
        let response = send(reqwest::Method::GET, &format!("/api/resource_{i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    // An unknown key is refused, and counted without an integration.
    let refused = client
        .get(proxy.url("/api/invoices"))
        .header("x-coupa-api-key", "not-a-key-SECRET")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);

    let status_text = get(format!("http://{}/status.json", proxy.admin))
        .await
        .text()
        .await
        .unwrap();
    let status: serde_json::Value = serde_json::from_str(&status_text).unwrap();
    let integrations = status["integrations"].as_array().unwrap();
    let erp = &integrations[0];
    assert_eq!(erp["integration"], "erp");
    assert_eq!(erp["credential"], "default");
    assert_eq!(erp["requests"], 77);
    assert_eq!(erp["flags"][0]["flag"], "legacy_key", "{erp}");
    // Coupa's 403s are counted apart from errors: the proxy made none.
    assert_eq!(erp["refused_by_coupa"], 4, "{erp}");
    assert_eq!(erp["errors"], 0, "{erp}");
    assert!(erp["first_seen"].is_string() && erp["last_seen"].is_string());
    let resources = erp["resources"].as_array().unwrap();
    let resource = |name: &str| {
        resources
            .iter()
            .find(|r| r["resource"] == name)
            .unwrap_or_else(|| panic!("{name} in {resources:?}"))
            .clone()
    };
    let invoices = resource("invoices");
    assert_eq!(invoices["requests"], 5);
    assert_eq!(invoices["methods"], serde_json::json!({"GET": 2, "PUT": 3}));
    assert_eq!(invoices["answers"], serde_json::json!({"2xx": 2, "403": 3}));
    assert_eq!(invoices["forbidden"], 3);
    assert_eq!(resource("suppliers")["forbidden"], 1);
    // invoices, suppliers and 62 of the 70 made-up ones are named; the id
    // under /api/ and the other 8 are `other`.
    assert_eq!(resources.len(), 64 + 1, "{resources:?}");
    assert_eq!(resource("other")["requests"], 9);
    let per_minute: u64 = erp["requests_per_minute"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(per_minute, 77);
    let retired = &integrations[1];
    assert_eq!(retired["integration"], "retired-flow");
    assert_eq!(retired["requests"], 0);
    assert!(
        retired["flags"].as_array().unwrap().is_empty(),
        "not idle a week yet"
    );
    let unnamed = integrations
        .iter()
        .find(|i| i["integration"] == "(none)")
        .expect("the refused request is counted without an integration");
    assert_eq!(unnamed["resources"][0]["answers"]["401"], 1);

    let metrics = get(format!("http://{}/metrics", proxy.admin))
        .await
        .text()
        .await
        .unwrap();
    fn labels<'a>(resource: &'a str, method: &'a str, answer: &'a str) -> [(&'a str, &'a str); 4] {
        [
            ("integration", "erp"),
            ("resource", resource),
            ("method", method),
            ("answer", answer),
        ]
    }
    let series = "coupa_proxy_integration_requests_total";
    assert_eq!(
        metric(&metrics, series, &labels("invoices", "Write", "403")),
        3.0
    );
    assert_eq!(
        metric(&metrics, series, &labels("invoices", "Read", "2xx")),
        2.0
    );
    assert_eq!(
        metric(&metrics, series, &labels("other", "Read", "2xx")),
        9.0
    );
    let erp_series = metrics
        .lines()
        .filter(|l| l.starts_with(series) && l.contains("integration=\"erp\""))
        .count();
    assert!(erp_series <= 66 * 3 * 8, "bounded: {erp_series}");
    assert_eq!(
        metric(
            &metrics,
            "coupa_proxy_requests_total",
            &[
                ("integration", "erp"),
                ("method", "Write"),
                ("status", "4xx")
            ]
        ),
        3.0
    );

    // Three PUTs got 403, logged once; the GET on suppliers once more.
    let logs = proxy.logs();
    let forbidden: Vec<serde_json::Value> = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("Coupa answered 403"))
        })
        .collect();
    assert_eq!(forbidden.len(), 2, "{logs}");
    let put = &forbidden[0];
    assert_eq!(put["integration"], "erp");
    assert_eq!(put["credential"], "default");
    assert_eq!(put["method"], "PUT");
    assert_eq!(put["resource"], "invoices");
    assert_eq!(put["granted_scopes"], "core.common.read core.invoice.read");
    assert!(put["message"].as_str().unwrap().contains("/oauth2/scopes"));
    assert_eq!(forbidden[1]["resource"], "suppliers");

    let page = get(format!("http://{}/", proxy.admin))
        .await
        .text()
        .await
        .unwrap();
    assert!(
        page.contains("<h3>erp</h3>") && page.contains("<svg"),
        "{page}"
    );
    assert!(page.contains("invoices"));
    assert!(
        page.contains("77 requests, 0 errors (0.0 %), 4 refused by Coupa (4xx)"),
        "{page}"
    );
    let erp_section = page
        .split("<h3>erp</h3>")
        .nth(1)
        .and_then(|rest| rest.split("<h3>").next())
        .unwrap();
    assert_eq!(
        erp_section.matches("legacy key").count() + erp_section.matches("legacy_key").count(),
        1,
        "identified by a legacy key, said once: {erp_section}"
    );
    assert!(erp_section.contains("⚑ still sends X-COUPA-API-KEY: not on OAuth yet"));
    for (what, text) in [
        ("status.json", &status_text),
        ("metrics", &metrics),
        ("page", &page),
    ] {
        for secret in ["918273", "555001", "5550123", "SECRET", ERP_KEY] {
            assert!(!text.contains(secret), "{what} holds {secret:?}");
        }
    }
    // The access lines log paths (the operator's choice, documented); no
    // log line holds a query, a body or a key.
    for secret in ["SECRET", ERP_KEY] {
        assert!(!logs.contains(secret), "the logs hold {secret:?}");
    }
}

/// Without integrations a legacy key identifies nobody, but the view still
/// shows that one is sent — also by requests the proxy refuses before
/// forwarding (here: no token within the wait for one), which never reach
/// the header rewrite.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_legacy_key_is_seen_without_integrations_even_on_refused_requests() {
    let fake = start_fake(DAY).await;
    fake.state().set_token_failure(Some(
        coupa_auth_proxy::fake_coupa::TokenFailure::ServerError,
    ));
    let text = config_text(&fake.base_url(), "token_wait_timeout = \"200ms\"", "");
    let proxy = TestProxy::start(parse_config(&text)).await;
    let client = http_client();
    let refused = client
        .get(proxy.url("/api/invoices"))
        .header("x-coupa-api-key", "a-legacy-key-0123456789")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);
    let status = proxy.status_json().await;
    let unnamed = status["integrations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["integration"] == "(none)")
        .cloned()
        .unwrap_or_default();
    assert!(unnamed["last_legacy_key"].is_string(), "{status}");
    proxy.stop().await;
}
