//! Live reload under a running binary: a rotated client secret file is
//! picked up for the next token fetch, SIGHUP applies new integrations, and
//! a bad file changes nothing. No secret or key appears in the logs.

use std::time::Duration;

use crate::support::*;
use coupa_auth_proxy::proxy::auth::hash_key;

const NEW_SECRET: &str = "rotated-secret-Q7-never-log-me";
const KEY_A: &str = "integration-a-legacy-key-aaaaaaaaaaaaaaaaaaaaaaaaa";
const KEY_B: &str = "integration-b-legacy-key-bbbbbbbbbbbbbbbbbbbbbbbbb";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_secret_file_is_used_for_the_next_token_fetch() {
    let fake = start_fake(Duration::from_secs(86_399)).await;
    let secrets = tempdir::Dir::new("secret");
    let secret_file = secrets.path().join("client-secret");
    std::fs::write(&secret_file, format!("{CLIENT_SECRET}\n")).unwrap();
    let text = config_text(&fake.base_url(), "", "").replace(
        "client_secret = \"${TEST_CLIENT_SECRET}\"",
        &format!("client_secret_file = \"{}\"", secret_file.display()),
    ) + "\n[reload]\nwatch_interval = \"100ms\"\n";
    let proxy = ProxyProcess::start(&text, &["--log-level", "trace"], &[]);
    proxy.wait_ready().await;

    // Rotate the secret in Coupa, then on disk (as a secret manager would).
    fake.state().set_client_secret(CLIENT_ID, NEW_SECRET);
    std::fs::write(&secret_file, format!("{NEW_SECRET}\n")).unwrap();
    eventually("the new secret is loaded", || {
        let logs = proxy.logs();
        async move { logs.contains("client secret changed") }
    })
    .await;

    // Force a fetch: Coupa rejects the current token, the proxy fetches a
    // new one with the new secret and replays.
    let issued = fake.state().tokens_issued();
    fake.state().revoke_all_tokens();
    let response = get(proxy.url("/api/invoices")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(fake.state().tokens_issued(), issued + 1);
    let logs = proxy.logs();
    assert!(!logs.contains(NEW_SECRET) && !logs.contains(CLIENT_SECRET));
}

fn integrations_config(base_url: &str, keys: &[(&str, &str)]) -> String {
    let mut text = config_text(base_url, "", "");
    for (name, key) in keys {
        text.push_str(&format!(
            "\n[[integration]]\nname = \"{name}\"\napi_key_sha256 = \"{}\"\n",
            hash_key(key)
        ));
    }
    text
}

/// The status of a call with legacy key `key`.
async fn status_with_key(proxy: &ProxyProcess, key: &str) -> reqwest::StatusCode {
    http_client()
        .get(proxy.url("/api/invoices"))
        .header("x-coupa-api-key", key)
        .send()
        .await
        .unwrap()
        .status()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_new_integrations_and_a_bad_file_changes_nothing() {
    let fake = start_fake(Duration::from_secs(86_399)).await;
    let text = integrations_config(&fake.base_url(), &[("a", KEY_A)]);
    let proxy = ProxyProcess::start(&text, &[], &[]);
    proxy.wait_ready().await;
    let status_with = |key: &'static str| status_with_key(&proxy, key);
    assert_eq!(status_with(KEY_A).await, 200);
    assert_eq!(status_with(KEY_B).await, 401);

    // A broken file: the running configuration stays.
    std::fs::write(
        proxy.config_path(),
        text.replace("[admin]", "[admin]\nbogus = 1"),
    )
    .unwrap();
    proxy.hangup();
    eventually("the failed reload is logged", || {
        let logs = proxy.logs();
        async move { logs.contains("reload failed") }
    })
    .await;
    assert!(proxy.logs().contains("bogus"), "the log names the problem");
    assert_eq!(status_with(KEY_A).await, 200);

    // A good file adding integration b and dropping a.
    std::fs::write(
        proxy.config_path(),
        integrations_config(&fake.base_url(), &[("b", KEY_B)]),
    )
    .unwrap();
    proxy.hangup();
    eventually("the reload is applied", || {
        let logs = proxy.logs();
        async move { logs.contains("configuration reloaded") }
    })
    .await;
    assert_eq!(status_with(KEY_B).await, 200);
    assert_eq!(status_with(KEY_A).await, 401);

    let logs = proxy.logs();
    for secret in [KEY_A, KEY_B, CLIENT_SECRET] {
        assert!(!logs.contains(secret));
    }
}

/// The fake's client may use `core.supplier.read` too; it may not use
/// `core.budget.write`.
fn scopes_config(base_url: &str, scopes: &str) -> String {
    config_text(base_url, "", "").replace(
        r#"scopes = ["core.common.read", "core.invoice.read"]"#,
        &format!("scopes = [{scopes}]"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_adds_a_scope_fetches_one_new_token_and_uses_it() {
    let fake = start_fake(Duration::from_secs(86_399)).await;
    let text = scopes_config(
        &fake.base_url(),
        r#""core.common.read", "core.invoice.read""#,
    );
    let proxy = ProxyProcess::start(&text, &[], &[]);
    proxy.wait_ready().await;
    let before = fake.state().token_requests();

    std::fs::write(
        proxy.config_path(),
        scopes_config(
            &fake.base_url(),
            r#""core.common.read", "core.invoice.read", "core.supplier.read""#,
        ),
    )
    .unwrap();
    proxy.hangup();
    let client = http_client();
    eventually("traffic carries a token with the new scope", || {
        let (client, url) = (client.clone(), proxy.url("/api/suppliers"));
        let fake = &fake;
        async move {
            let response = client.get(url).send().await.unwrap();
            assert_eq!(response.status(), 200, "traffic never fails");
            let echo: serde_json::Value = response.json().await.unwrap();
            fake.state().token_scope(&echoed_token(&echo)).as_deref()
                == Some("core.common.read core.invoice.read core.supplier.read")
        }
    })
    .await;
    assert_eq!(fake.state().token_requests(), before + 1);
    eventually("the change is logged with the new scopes", || {
        let logs = proxy.logs();
        async move {
            logs.lines()
                .any(|l| l.contains("token request changed") && l.contains("core.supplier.read"))
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_asking_for_an_unassigned_scope_keeps_the_old_token_and_names_the_scope() {
    let fake = start_fake(Duration::from_secs(86_399)).await;
    let text = scopes_config(&fake.base_url(), r#""core.common.read""#);
    let proxy = ProxyProcess::start(&text, &[], &[]);
    proxy.wait_ready().await;

    std::fs::write(
        proxy.config_path(),
        scopes_config(
            &fake.base_url(),
            r#""core.common.read", "core.budget.write""#,
        ),
    )
    .unwrap();
    proxy.hangup();
    eventually("the refusal is logged", || {
        let logs = proxy.logs();
        async move { logs.contains("invalid_scope") }
    })
    .await;
    let logs = proxy.logs();
    assert!(
        logs.contains(
            "scopes the client is missing (requested now, not granted before): core.budget.write"
        ),
        "{logs}"
    );
    let response = get(proxy.url("/api/invoices")).await;
    assert_eq!(response.status(), 200, "the old token keeps serving");
}

/// A local client whose secret changes on reload: tokens issued under the
/// old secret end at once, new ones are issued under the new one. At
/// trace level no log line holds either secret or a local token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_local_client_secret_ends_the_tokens_issued_under_the_old_one() {
    const OLD: &str = "local-secret-old-Qp7-never-log-me";
    const NEW: &str = "local-secret-new-Vb2-never-log-me";
    let fake = start_fake(Duration::from_secs(86_399)).await;
    let text = |secret: &str| {
        config_text(&fake.base_url(), "", "")
            + &format!(
                "\n[[integration]]\nname = \"tool\"\noauth_client_id = \"tool\"\noauth_client_secret_sha256 = \"{}\"\n",
                hash_key(secret)
            )
    };
    let proxy = ProxyProcess::start(&text(OLD), &["--log-level", "trace"], &[]);
    proxy.wait_ready().await;
    let client = http_client();
    let fetch = |secret: &'static str| {
        let (client, url) = (client.clone(), proxy.url("/oauth2/token"));
        async move {
            let response = client
                .post(url)
                .form(&[
                    ("grant_type", "client_credentials"),
                    ("client_id", "tool"),
                    ("client_secret", secret),
                ])
                .send()
                .await
                .unwrap();
            let status = response.status();
            let body: serde_json::Value = response.json().await.unwrap();
            (
                status,
                body["access_token"].as_str().unwrap_or("").to_owned(),
            )
        }
    };
    let call = |token: String| {
        let (client, url) = (client.clone(), proxy.url("/api/invoices"));
        async move {
            client
                .get(url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    let (status, old_token) = fetch(OLD).await;
    assert_eq!(status, 200);
    assert_eq!(call(old_token.clone()).await, 200);

    std::fs::write(proxy.config_path(), text(NEW)).unwrap();
    proxy.hangup();
    eventually("the reload is applied", || {
        let logs = proxy.logs();
        async move { logs.contains("configuration reloaded") }
    })
    .await;
    assert_eq!(
        call(old_token.clone()).await,
        401,
        "issued under the old secret"
    );
    assert_eq!(fetch(OLD).await.0, 401);
    let (status, new_token) = fetch(NEW).await;
    assert_eq!(status, 200);
    assert_eq!(call(new_token.clone()).await, 200);

    let logs = proxy.logs();
    assert!(logs.contains("TRACE"));
    for secret in [OLD, NEW, &old_token, &new_token, CLIENT_SECRET] {
        assert!(!logs.contains(secret), "logs hold a secret");
    }
}

/// Without SIGHUP: a change of the config file itself is seen by the
/// watcher (`reload.watch_interval`) and applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_config_file_is_applied_without_a_signal() {
    let fake = start_fake(Duration::from_secs(86_399)).await;
    let watched = |integrations: &[(&str, &str)]| {
        integrations_config(&fake.base_url(), integrations)
            + "\n[reload]\nwatch_interval = \"100ms\"\n"
    };
    let proxy = ProxyProcess::start(&watched(&[("a", KEY_A)]), &[], &[]);
    proxy.wait_ready().await;
    let status_with = |key: &'static str| status_with_key(&proxy, key);
    assert_eq!(status_with(KEY_B).await, 401);
    std::fs::write(proxy.config_path(), watched(&[("b", KEY_B)])).unwrap();
    eventually("the watcher applies the file", || async {
        proxy.logs().contains("configuration reloaded")
    })
    .await;
    assert_eq!(status_with(KEY_B).await, 200);
    assert_eq!(status_with(KEY_A).await, 401);
}
