//! The proxy against a real nginx as the Coupa instance (TLS, HTTP/1.1 and
//! HTTP/2 by `coupa.http_version`), not only against our own fake: strict
//! header checks, connections recycled every few requests, stream limits,
//! cold bursts, and nginx killed under load. The token endpoint stays the
//! fake (`oauth.token_url`).

use std::time::Duration;

use crate::support::real::{Nginx, NginxOptions};
use crate::support::*;
use coupa_auth_proxy::fake_coupa::FakeCoupa;

const DAY: Duration = Duration::from_secs(86_400);

/// The proxy in front of `nginx`, fetching tokens from `fake`.
async fn proxy_for(nginx: &Nginx, fake: &FakeCoupa, version: &str, coupa_extra: &str) -> TestProxy {
    let text = config_text(
        &nginx.base_url(),
        &format!(
            "ca_file = \"{}\"\nhttp_version = \"{version}\"\n{coupa_extra}",
            nginx.ca_file.display()
        ),
        &format!("token_url = \"{}/oauth2/token\"", fake.base_url()),
    );
    let proxy = TestProxy::start(parse_config(&text)).await;
    proxy.wait_ready().await;
    proxy
}

async fn metrics(proxy: &TestProxy) -> String {
    get(proxy.admin_url("/metrics")).await.text().await.unwrap()
}

fn opened(text: &str, protocol: &str) -> f64 {
    metric(
        text,
        "coupa_proxy_upstream_connections_opened_total",
        &[("protocol", protocol)],
    )
}

/// `workers` clients each send `per_worker` requests one after another,
/// cycling through the methods; returns every (status, body) seen.
async fn load(proxy: &TestProxy, workers: usize, per_worker: usize) -> Vec<(u16, String)> {
    let client = http_client();
    let tasks: Vec<_> = (0..workers)
        .map(|w| {
            let client = client.clone();
            let base = proxy.url("/api/invoices");
            tokio::spawn(async move {
                let mut seen = Vec::new();
                for i in 0..per_worker {
                    let url = format!("{base}?w={w}&i={i}");
                    let request = match i % 4 {
                        0 => client.get(&url),
                        1 => client.post(&url).body("{\"n\":1}"),
                        2 => client.put(&url).body("{\"n\":2}"),
                        _ => client.get(&url),
                    };
                    let response = request
                        .header("x-coupa-api-key", LEGACY_KEY)
                        .header("content-type", "application/json")
                        .send()
                        .await
                        .unwrap();
                    let status = response.status().as_u16();
                    seen.push((status, response.text().await.unwrap()));
                }
                seen
            })
        })
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    all
}

fn assert_all_ok(seen: &[(u16, String)]) {
    let failed: Vec<_> = seen.iter().filter(|(status, _)| *status != 200).collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed, e.g. {:?}",
        failed.len(),
        seen.len(),
        failed.first()
    );
}

/// RFC 9113 §8.3.1: the authority travels in `:authority`; nginx refuses
/// a request that also carries `host` ("client sent duplicate host header").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_to_nginx_carries_the_authority_without_a_duplicate_host() {
    let Some(nginx) = Nginx::start(NginxOptions::default()) else {
        return;
    };
    let fake = start_fake(DAY).await;
    let proxy = proxy_for(&nginx, &fake, "http2", "").await;
    for method in [reqwest::Method::GET, reqwest::Method::POST] {
        let response = http_client()
            .request(method.clone(), proxy.url("/api/invoices?limit=1"))
            .header("x-coupa-api-key", LEGACY_KEY)
            .body("{}")
            .send()
            .await
            .unwrap();
        let status = response.status();
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(status, 200, "{method}: {body}");
        assert_eq!(body["protocol"], "HTTP/2.0");
        assert_eq!(body["uri"], "/api/invoices?limit=1");
        assert_eq!(body["accept"], "application/json");
    }
    assert!(
        nginx.malformed_request_lines().is_empty(),
        "{:?}",
        nginx.malformed_request_lines()
    );
    proxy.stop().await;
}

/// nginx closes every connection after 10 requests (GOAWAY on HTTP/2,
/// `Connection: close` on HTTP/1.1) and allows 4 streams at once. Under
/// 8-way load across dozens of recycles: no request fails, nginx processes
/// each exactly once, and connections opened ≈ requests / 10.
async fn recycled_connections_lose_no_request(version: &str, protocol: &str) {
    let Some(nginx) = Nginx::start(NginxOptions {
        keepalive_requests: 10,
        max_concurrent_streams: 4,
    }) else {
        return;
    };
    let fake = start_fake(DAY).await;
    let proxy = proxy_for(&nginx, &fake, version, "").await;
    let (workers, per_worker) = (8, 40);
    let total = workers * per_worker;
    let seen = load(&proxy, workers, per_worker).await;
    assert_all_ok(&seen);

    // nginx writes a request's log line after its response is sent, so
    // the client can be done before the last line is there.
    eventually("nginx logged every request", || {
        let logged = nginx.access_log().len();
        async move { logged >= total }
    })
    .await;
    let served: Vec<_> = nginx.access_log();
    let ok = served
        .iter()
        .filter(|(_, _, status)| *status == 200)
        .count();
    let text = metrics(&proxy).await;
    assert_eq!(
        ok,
        total,
        "nginx processed each request exactly once; retries: {:?}",
        text.lines()
            .filter(|l| l.starts_with("coupa_proxy_upstream_retries"))
            .collect::<Vec<_>>()
    );
    assert!(served.iter().all(|(_, p, _)| p == protocol), "{served:?}");
    let opened = opened(
        &text,
        if protocol == "HTTP/2.0" {
            "http2"
        } else {
            "http1"
        },
    );
    let at_least = (total / 10) as f64;
    assert!(
        opened >= at_least && opened <= at_least * 1.5 + workers as f64,
        "{opened} connections for {total} requests at 10 per connection"
    );
    assert!(
        nginx.malformed_request_lines().is_empty(),
        "{:?}",
        nginx.malformed_request_lines()
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recycled_http1_connections_lose_no_request() {
    recycled_connections_lose_no_request("http1", "HTTP/1.1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recycled_http2_connections_lose_no_request() {
    recycled_connections_lose_no_request("http2", "HTTP/2.0").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_follows_alpn_to_http2_and_loses_no_request() {
    recycled_connections_lose_no_request("auto", "HTTP/2.0").await;
}

/// A cold burst of 50 concurrent requests opens one HTTP/2 connection (the
/// server allows 128 streams), not one per request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_http2_burst_shares_one_connection() {
    let Some(nginx) = Nginx::start(NginxOptions::default()) else {
        return;
    };
    let fake = start_fake(DAY).await;
    let proxy = proxy_for(&nginx, &fake, "http2", "").await;
    let seen = load(&proxy, 50, 1).await;
    assert_all_ok(&seen);
    assert_eq!(opened(&metrics(&proxy).await, "http2"), 1.0);
    proxy.stop().await;
}

/// Over HTTP/1.1 a cold burst of 50 opens at most `coupa.max_connections`
/// (4 here); the rest wait for a connection and are served on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_http1_burst_stays_under_the_connection_cap() {
    let Some(nginx) = Nginx::start(NginxOptions::default()) else {
        return;
    };
    let fake = start_fake(DAY).await;
    let proxy = proxy_for(&nginx, &fake, "http1", "max_connections = 4").await;
    let seen = load(&proxy, 50, 2).await;
    assert_all_ok(&seen);
    let text = metrics(&proxy).await;
    assert!(opened(&text, "http1") <= 4.0, "{text}");
    assert!(metric(&text, "coupa_proxy_upstream_connection_waits_total", &[]) >= 1.0);
    assert_eq!(nginx.access_log().len(), 100);
    proxy.stop().await;
}

/// nginx killed in the middle of load: every answer is Coupa's 200 or the
/// proxy's own JSON error (502/504), nothing hangs; after a restart on the
/// same port requests succeed again with no restart of the proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_killed_under_load_gives_clear_errors_then_recovers() {
    let Some(mut nginx) = Nginx::start(NginxOptions::default()) else {
        return;
    };
    let fake = start_fake(DAY).await;
    let proxy = proxy_for(&nginx, &fake, "http2", "connect_timeout = \"2s\"").await;
    let loading = {
        let url = proxy.url("/api/invoices");
        tokio::spawn(async move {
            let client = http_client();
            let mut seen = Vec::new();
            for _ in 0..400 {
                let response = client.get(&url).send().await.unwrap();
                let status = response.status().as_u16();
                seen.push((status, response.text().await.unwrap()));
            }
            seen
        })
    };
    eventually("some requests served", || async {
        nginx.access_log().len() >= 20
    })
    .await;
    nginx.kill();
    let seen = loading.await.unwrap();
    let failures: Vec<_> = seen.iter().filter(|(s, _)| *s != 200).collect();
    assert!(!failures.is_empty(), "nginx died, so some requests failed");
    for (status, body) in &failures {
        assert!([502, 504].contains(status), "{status} {body}");
        let body: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(body["source"], "coupa-auth-proxy");
        assert!(body["message"].as_str().unwrap().len() > 10, "{body}");
    }

    nginx.restart();
    eventually("requests succeed after nginx is back", || async {
        get(proxy.url("/api/invoices")).await.status() == 200
    })
    .await;
    proxy.stop().await;
}
