//! No secret ever reaches the logs: a whole session at trace level, with
//! both client authentication styles, a rotation, HTTP/1.1 and HTTP/2
//! clients, and an OAuth failure, leaves no client secret, token or legacy
//! key in the output.

use std::time::Duration;

use crate::support::*;
use base64::Engine;
use coupa_auth_proxy::fake_coupa::TokenFailure;

async fn session(client_auth: &str) -> (String, Vec<String>) {
    let fake = start_fake(Duration::from_secs(3)).await;
    let text = config_text(
        &fake.base_url(),
        "",
        &format!("client_auth = \"{client_auth}\"\nrefresh_fraction = 0.5"),
    );
    let mut proxy = ProxyProcess::start(&text, &["--log-level", "trace"], &[]);
    proxy.wait_ready().await;

    let mut tokens = Vec::new();
    let h1 = http_client();
    let h2 = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    for client in [&h1, &h2] {
        let response = client
            .post(proxy.url("/api/invoices?secret_in_query=1"))
            .header("x-coupa-api-key", LEGACY_KEY)
            .header("authorization", format!("Basic {LEGACY_KEY}"))
            .header("content-type", "application/json")
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let echo: serde_json::Value = response.json().await.unwrap();
        tokens.push(echoed_token(&echo));
    }
    // A rotation, then an OAuth error on the next renewal.
    let issued = fake.state().tokens_issued();
    eventually("a rotation", || {
        let now = fake.state().tokens_issued();
        async move { now > issued }
    })
    .await;
    fake.state()
        .set_token_failure(Some(TokenFailure::OAuth("invalid_client".into())));
    let requests = fake.state().token_requests();
    eventually("a failed renewal", || {
        let now = fake.state().token_requests();
        async move { now > requests }
    })
    .await;
    let response = h1
        .get(proxy.url("/api/invoices"))
        .header("x-coupa-api-key", LEGACY_KEY)
        .send()
        .await
        .unwrap();
    if response.status() == 200 {
        let echo: serde_json::Value = response.json().await.unwrap();
        tokens.push(echoed_token(&echo));
    }
    proxy.terminate();
    assert_eq!(proxy.wait_exit().await, Some(0));
    (proxy.logs(), tokens)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_logs_never_contain_secrets_tokens_or_legacy_keys() {
    for client_auth in ["body", "basic"] {
        let (logs, tokens) = session(client_auth).await;
        // The capture worked: trace output and our own events are there.
        assert!(logs.contains("TRACE"), "no trace output captured");
        assert!(logs.contains("token fetched"));
        assert!(logs.contains("invalid_client"), "OAuth error not logged");
        assert!(logs.contains("\"path\":\"/api/invoices\""));

        let basic = base64::engine::general_purpose::STANDARD
            .encode(format!("{CLIENT_ID}:{CLIENT_SECRET}"));
        let mut forbidden = vec![
            CLIENT_SECRET.to_owned(),
            LEGACY_KEY.to_owned(),
            basic,
            "secret_in_query".to_owned(),
        ];
        forbidden.extend(tokens);
        for secret in &forbidden {
            // Any long fragment would be a leak too (e.g. a truncated value).
            let fragment = &secret[..secret.len().min(24)];
            assert!(
                !logs.contains(fragment),
                "client_auth={client_auth}: logs contain a secret fragment {fragment:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_secret_is_logged_with_the_fix_and_requests_get_503() {
    let fake = start_fake(Duration::from_secs(86_399)).await;
    let text = config_text(&fake.base_url(), "", "");
    let proxy = ProxyProcess::start(&text, &[], &[("TEST_CLIENT_SECRET", "wrong-secret-value")]);
    eventually("a refused token request", || {
        let n = fake.state().token_requests();
        async move { n >= 1 }
    })
    .await;
    eventually("the error in the logs", || {
        let logs = proxy.logs();
        async move { logs.contains("invalid_client") }
    })
    .await;
    let logs = proxy.logs();
    assert!(logs.contains("client id or secret is wrong"), "{logs}");
    assert!(!logs.contains("wrong-secret-value"));
    let response = get(proxy.url("/api/x")).await;
    assert_eq!(response.status(), 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn integrations_tls_and_reload_at_trace_level_leak_nothing() {
    use coupa_auth_proxy::proxy::auth::hash_key;
    const KEY: &str = "integration-key-Zq8-secret-0123456789abcdef0123";
    const UNKNOWN: &str = "unknown-key-Wm3-secret-0123456789abcdef0123456";
    const ROTATED: &str = "rotated-secret-Hk5-never-log-me";

    let fake = start_fake(Duration::from_secs(86_399)).await;
    let dir = tempdir::Dir::new("secrets-tls");
    let ca = pki::Ca::new("listener CA");
    let leaf = ca.issue(&["localhost"]);
    std::fs::write(dir.path().join("cert.pem"), &leaf.cert_pem).unwrap();
    std::fs::write(dir.path().join("key.pem"), &leaf.key_pem).unwrap();
    let secret_file = dir.path().join("secret");
    std::fs::write(&secret_file, CLIENT_SECRET).unwrap();
    let text = config_text(&fake.base_url(), "", "")
        .replace(
            "\n[coupa]",
            &format!(
                "\n[listen.tls]\ncert_file = \"{d}/cert.pem\"\nkey_file = \"{d}/key.pem\"\n\n[coupa]",
                d = dir.path().display()
            ),
        )
        .replace(
            "client_secret = \"${TEST_CLIENT_SECRET}\"",
            &format!("client_secret_file = \"{}\"", secret_file.display()),
        )
        + &format!(
            "\n[[integration]]\nname = \"erp\"\napi_key_sha256 = \"{}\"\n\n[reload]\nwatch_interval = \"100ms\"\n",
            hash_key(KEY)
        );
    let mut proxy = ProxyProcess::start(&text, &["--log-level", "trace"], &[]);
    proxy.wait_ready().await;

    let client = pki::client(&ca, None);
    let url = format!("https://localhost:{}/api/invoices", proxy.addr.port());
    let response = client
        .get(&url)
        .header("x-coupa-api-key", KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let echo: serde_json::Value = response.json().await.unwrap();
    let token = echoed_token(&echo);
    let response = client
        .get(&url)
        .header("x-coupa-api-key", UNKNOWN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);

    fake.state().set_client_secret(CLIENT_ID, ROTATED);
    std::fs::write(&secret_file, ROTATED).unwrap();
    eventually("the rotated secret is loaded", || {
        let logs = proxy.logs();
        async move { logs.contains("client secret changed") }
    })
    .await;
    proxy.terminate();
    assert_eq!(proxy.wait_exit().await, Some(0));

    let logs = proxy.logs();
    assert!(logs.contains("TRACE"));
    for secret in [
        KEY,
        UNKNOWN,
        ROTATED,
        CLIENT_SECRET,
        token.as_str(),
        &hash_key(KEY),
    ] {
        assert!(
            !logs.contains(&secret[..secret.len().min(24)]),
            "logs contain a secret fragment"
        );
    }
}
