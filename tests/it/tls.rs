//! Upstream over verified TLS: a test CA made here, trusted through
//! `coupa.ca_file`; without it the proxy refuses the instance.

use std::time::Duration;

use crate::support::*;
use coupa_auth_proxy::fake_coupa::{FakeCoupa, FakeCoupaOptions};

async fn tls_fake() -> (FakeCoupa, String) {
    let ca = pki::Ca::new("coupa-auth-proxy test CA");
    let (ca_pem, server) = (ca.pem(), ca.server_config());
    let fake = FakeCoupa::start(FakeCoupaOptions {
        clients: vec![fake_client()],
        token_lifetime: Duration::from_secs(86_399),
        tls: Some(server),
    })
    .await
    .unwrap();
    (fake, ca_pem)
}

/// A ready proxy in front of `fake` trusting `ca_pem` through
/// `coupa.ca_file`, with `coupa_extra` in `[coupa]`.
async fn proxy_trusting(
    fake: &FakeCoupa,
    ca_pem: &str,
    coupa_extra: &str,
) -> (tempdir::Dir, TestProxy) {
    let dir = tempdir::Dir::new("tls");
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, ca_pem).unwrap();
    let text = config_text(
        &fake.base_url(),
        &format!("ca_file = \"{}\"\n{coupa_extra}", ca_path.display()),
        "",
    );
    let proxy = TestProxy::start(parse_config(&text)).await;
    proxy.wait_ready().await;
    (dir, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_over_tls_with_ca_file_and_auto_uses_http2_by_alpn() {
    let (fake, ca_pem) = tls_fake().await;
    // Coupa's JWTs grow with their scopes: the HTTP/2 hop must carry them.
    fake.state().set_token_padding(20 * 1024);
    let (_dir, proxy) = proxy_trusting(&fake, &ca_pem, "http_version = \"auto\"").await;

    let response = http_client()
        .post(proxy.url("/api/invoices?x=%20y"))
        .header("x-coupa-api-key", LEGACY_KEY)
        .header("content-type", "application/json")
        .body("{\"a\":1}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let echo: serde_json::Value = response.json().await.unwrap();
    assert_eq!(echo["version"], "HTTP/2.0", "ALPN should pick h2");
    assert_eq!(echo["target"], "/api/invoices?x=%20y");
    assert_eq!(echo["body_bytes"], 7);
    let token = echoed_token(&echo);
    assert!(token.len() > 20 * 1024);
    assert!(fake.state().token_is_live(&token));

    // One HTTP/2 connection carries every later request, concurrent or not.
    let client = http_client();
    let batch: Vec<_> = (0..10)
        .map(|_| {
            let request = client
                .get(proxy.url("/api/invoices"))
                .header("x-coupa-api-key", LEGACY_KEY)
                .send();
            async move { request.await.unwrap().status() }
        })
        .collect();
    for status in futures_util::future::join_all(batch).await {
        assert_eq!(status, 200);
    }
    let metrics = get(proxy.admin_url("/metrics")).await.text().await.unwrap();
    let open: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("coupa_proxy_upstream_connections "))
        .collect();
    assert_eq!(open, ["coupa_proxy_upstream_connections 1"], "{metrics}");
    proxy.stop().await;
}

/// `coupa.http_version` defaults to HTTP/1.1 even when the instance offers
/// h2 (ALPN offers only `http/1.1`), as nginx, HAProxy and Envoy do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_defaults_to_http1_over_tls_even_when_h2_is_offered() {
    let (fake, ca_pem) = tls_fake().await;
    let (_dir, proxy) = proxy_trusting(&fake, &ca_pem, "").await;
    let response = http_client()
        .get(proxy.url("/api/invoices"))
        .header("x-coupa-api-key", LEGACY_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let echo: serde_json::Value = response.json().await.unwrap();
    assert_eq!(echo["version"], "HTTP/1.1");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_certificate_is_refused() {
    let (fake, _ca_pem) = tls_fake().await;
    let proxy = TestProxy::start(parse_config(&config_text(&fake.base_url(), "", ""))).await;
    let client = http_client();
    let url = proxy.admin_url("/readyz");
    let last_error = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    eventually("a failed token fetch", || {
        let client = client.clone();
        let url = url.clone();
        let last_error = last_error.clone();
        async move {
            let r: serde_json::Value = client.get(&url).send().await.unwrap().json().await.unwrap();
            match r["last_token_error"].as_str() {
                Some(e) => {
                    *last_error.lock().unwrap() = e.to_owned();
                    true
                }
                None => false,
            }
        }
    })
    .await;
    let last_error = last_error.lock().unwrap().clone();
    assert!(
        last_error.to_lowercase().contains("certificate"),
        "error should name the certificate problem: {last_error}"
    );
    assert_eq!(fake.state().token_requests(), 0);
    let response = client.get(proxy.url("/api/invoices")).send().await.unwrap();
    assert_eq!(response.status(), 503);
    proxy.stop().await;
}
