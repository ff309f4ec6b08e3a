//! Operating the proxy: Prometheus metrics that move with traffic and
//! token events, the status page and `/status.json`, all free of secrets.

use std::time::Duration;

use crate::support::*;
use coupa_auth_proxy::fake_coupa::TokenFailure;

/// Scrapes `/metrics` and parses it with a Prometheus text parser.
async fn scrape(proxy: &TestProxy) -> prometheus_parse::Scrape {
    let text = get(proxy.admin_url("/metrics")).await.text().await.unwrap();
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap()
}

fn value(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric_in(scrape, name, labels)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_with_traffic_and_token_events() {
    let (fake, proxy) = start_pair(Duration::from_secs(86_399)).await;
    let before = scrape(&proxy).await;
    assert_eq!(
        value(
            &before,
            "coupa_proxy_token_fetches_total",
            &[("outcome", "ok")]
        ),
        1.0
    );
    let expires = value(
        &before,
        "coupa_proxy_token_expires_in_seconds",
        &[("credential", "default")],
    );
    assert!(expires > 80_000.0, "{expires}");

    for _ in 0..3 {
        assert_eq!(get(proxy.url("/api/invoices")).await.status(), 200);
    }
    let _ = http_client()
        .post(proxy.url("/api/invoices"))
        .body("{}")
        .send()
        .await
        .unwrap();
    let after = scrape(&proxy).await;
    assert_eq!(
        value(
            &after,
            "coupa_proxy_requests_total",
            &[("method", "Read"), ("status", "2xx")]
        ),
        3.0
    );
    assert_eq!(
        value(
            &after,
            "coupa_proxy_requests_total",
            &[("method", "Write"), ("status", "2xx")]
        ),
        1.0
    );
    assert!(value(&after, "coupa_proxy_upstream_duration_seconds_count", &[]) >= 4.0);
    assert!(value(&after, "coupa_proxy_upstream_connections", &[]) >= 1.0);
    assert_eq!(value(&after, "coupa_proxy_in_flight_requests", &[]), 0.0);

    // A failed renewal shows up as its OAuth error code.
    fake.state()
        .set_token_failure(Some(TokenFailure::OAuth("invalid_client".into())));
    fake.state().revoke_all_tokens();
    let _ = get(proxy.url("/api/invoices")).await;
    eventually("the failure is counted", || {
        let proxy = &proxy;
        async move {
            value(
                &scrape(proxy).await,
                "coupa_proxy_token_fetches_total",
                &[("outcome", "invalid_client")],
            ) >= 1.0
        }
    })
    .await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_and_json_show_credentials_and_integrations_without_secrets() {
    let (_fake, proxy) = start_pair(Duration::from_secs(86_399)).await;
    let _ = get(proxy.url("/api/invoices")).await;
    let status = proxy.status_json().await;
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"));
    assert!(status["uptime_seconds"].is_u64());
    let credential = &status["credentials"][0];
    assert_eq!(credential["credential"], "default");
    assert_eq!(credential["grant"], "client_credentials");
    assert_eq!(credential["scopes"], "core.common.read core.invoice.read");
    assert_eq!(credential["last_refresh"], "ok");
    assert!(credential["token_expires_in_seconds"].as_u64().unwrap() > 80_000);
    assert!(credential["token_age_seconds"].is_u64());
    assert_eq!(status["integrations"][0]["requests"], 1);

    let page = get(proxy.admin_url("/")).await;
    assert_eq!(page.headers()["content-type"], "text/html; charset=utf-8");
    let html = page.text().await.unwrap();
    assert!(html.contains("<h2>Credentials</h2>") && html.contains("client_credentials"));
    assert!(
        !html.contains("src=") && !html.contains("stylesheet"),
        "no external assets"
    );

    let metrics = get(proxy.admin_url("/metrics")).await.text().await.unwrap();
    for body in [status.to_string(), html, metrics] {
        assert!(!body.contains(CLIENT_SECRET));
        assert!(!body.contains("fake."), "no token on admin pages");
    }
    proxy.stop().await;
}

/// A plain-HTTP listener reachable from other machines carries legacy keys
/// and Coupa's answers in cleartext: said at start, by `check`, and in
/// `/readyz`'s warnings, naming `[listen.tls]` as the fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleartext_listener_on_the_network_is_warned_about_everywhere() {
    let fake = start_fake(Duration::from_secs(86_399)).await;
    let text = config_text(&fake.base_url(), "", "").replace(
        "address = \"127.0.0.1:0\"\nshutdown_grace",
        "address = \"0.0.0.0:0\"\nshutdown_grace",
    ) + &format!(
        "\n[[integration]]\nname = \"erp\"\napi_key_sha256 = \"{}\"\n",
        "1".repeat(64)
    );
    let proxy = ProxyProcess::start(&text, &[], &[]);
    proxy.wait_ready().await;
    assert!(
        proxy.logs().contains("over plain HTTP") && proxy.logs().contains("[listen.tls]"),
        "{}",
        proxy.logs()
    );
    let ready: serde_json::Value = get(format!("http://{}/readyz", proxy.admin))
        .await
        .json()
        .await
        .unwrap();
    let warnings = ready["warnings"].as_array().unwrap();
    assert!(
        warnings
            .iter()
            .any(|w| w.as_str().unwrap().contains("legacy API keys")),
        "{ready}"
    );
    let (code, stdout, stderr) = run_binary(
        &["check", "--config", proxy.config_path().to_str().unwrap()],
        &[("TEST_CLIENT_SECRET", CLIENT_SECRET)],
    );
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stdout.contains("warning: listen.address 0.0.0.0:0"),
        "{stdout}"
    );
}
