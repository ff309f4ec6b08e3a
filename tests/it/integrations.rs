//! Per-integration authentication: each legacy key selects its
//! integration's credential and scopes; unknown keys get 401 and nothing
//! reaches Coupa; an open listener needs an explicit opt-in.

use std::time::Duration;

use crate::support::*;
use coupa_auth_proxy::fake_coupa::{FakeClient, FakeCoupa, FakeCoupaOptions};
use coupa_auth_proxy::proxy::auth::hash_key;

const ERP_KEY: &str = "erp-legacy-key-4f9a0c1d2e3b4a5968778695a4b3c2d1e0f9a8b7";
const SUPPLIER_KEY: &str = "supplier-legacy-key-0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d";

async fn two_client_fake() -> FakeCoupa {
    let client = |id: &str, secret: &str, scopes: &[&str]| FakeClient {
        id: id.into(),
        secret: secret.into(),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
    };
    FakeCoupa::start(FakeCoupaOptions {
        clients: vec![
            client(
                "erp-invoices",
                "invoices-secret-value",
                &[
                    "core.invoice.read",
                    "core.invoice.write",
                    "core.common.read",
                ],
            ),
            client(
                "supplier-sync",
                "suppliers-secret-value",
                &["core.supplier.read"],
            ),
        ],
        token_lifetime: Duration::from_secs(86_399),
        tls: None,
    })
    .await
    .unwrap()
}

fn two_integration_config(base_url: &str, secrets_dir: &std::path::Path) -> String {
    std::fs::write(secrets_dir.join("invoices"), "invoices-secret-value\n").unwrap();
    format!(
        r#"
[listen]
address = "127.0.0.1:0"

[coupa]
base_url = "{base_url}"

[oauth.invoices]
client_id = "erp-invoices"
client_secret_file = "{dir}/invoices"
scopes = ["core.invoice.read", "core.invoice.write"]
retry_initial = "100ms"
retry_max = "500ms"

[oauth.suppliers]
client_id = "supplier-sync"
client_secret = "suppliers-secret-value"
scopes = ["core.supplier.read"]
retry_initial = "100ms"
retry_max = "500ms"

[[integration]]
name = "erp-invoice-flow"
api_key_sha256 = "{erp}"
credential = "invoices"

[[integration]]
name = "supplier-sync"
api_key_sha256 = "{supplier}"
credential = "suppliers"

[admin]
address = "127.0.0.1:0"
"#,
        dir = secrets_dir.display(),
        erp = hash_key(ERP_KEY),
        supplier = hash_key(SUPPLIER_KEY),
    )
}

/// Fake with two clients, and the proxy with two integrations, ready. The
/// directory holds a secret file and must outlive the proxy.
async fn start_two_integrations() -> (FakeCoupa, TestProxy, tempdir::Dir) {
    let fake = two_client_fake().await;
    let dir = tempdir::Dir::new("integrations");
    let proxy = TestProxy::start(parse_config(&two_integration_config(
        &fake.base_url(),
        dir.path(),
    )))
    .await;
    proxy.wait_ready().await;
    (fake, proxy, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_integration_gets_a_token_with_its_own_scopes() {
    let (fake, proxy, _dir) = start_two_integrations().await;
    let client = http_client();
    for (key, scope) in [
        (ERP_KEY, "core.invoice.read core.invoice.write"),
        (SUPPLIER_KEY, "core.supplier.read"),
    ] {
        let response = client
            .get(proxy.url("/api/invoices"))
            .header("x-coupa-api-key", key)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let echo = echo_of(response).await;
        assert_eq!(echo["format"], "xml", "coupa.accept's default: Coupa's own");
        let token = echoed_token(&echo);
        assert_eq!(fake.state().token_scope(&token).as_deref(), Some(scope));
        assert!(header(&echoed_headers(&echo), "x-coupa-api-key").is_empty());
    }
    // Readiness covers both credentials.
    let ready: serde_json::Value = client
        .get(proxy.admin_url("/readyz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["credentials"].as_array().unwrap().len(), 2);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_or_missing_key_gets_401_and_nothing_is_forwarded() {
    let (fake, proxy, _dir) = start_two_integrations().await;
    let client = http_client();
    for key in [Some("not-a-known-key"), Some(""), None] {
        let mut request = client.get(proxy.url("/api/invoices"));
        if let Some(key) = key {
            request = request.header("x-coupa-api-key", key);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 401, "key {key:?}");
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["error"], "unknown_api_key");
    }
    assert_eq!(
        fake.state().api_requests() + fake.state().rejected_api_requests(),
        0
    );
    proxy.stop().await;
}

fn check(text: &str) -> (Option<i32>, String, String) {
    let dir = tempdir::Dir::new("open");
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, text).unwrap();
    run_binary(
        &["check", "--config", path.to_str().unwrap()],
        &[("TEST_CLIENT_SECRET", CLIENT_SECRET)],
    )
}

#[test]
fn an_open_listener_without_integrations_needs_an_explicit_opt_in() {
    let open = config_text("http://127.0.0.1:9", "", "").replace(
        "address = \"127.0.0.1:0\"\nshutdown_grace",
        "address = \"0.0.0.0:8080\"\nshutdown_grace",
    );
    let (code, _, stderr) = check(&open);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(
        stderr.contains("listen.address") && stderr.contains("allow_unauthenticated"),
        "{stderr}"
    );

    let opted_in = open.replace(
        "address = \"0.0.0.0:8080\"",
        "address = \"0.0.0.0:8080\"\nallow_unauthenticated = true",
    );
    let (code, stdout, stderr) = check(&opted_in);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stdout.contains("listen.allow_unauthenticated   true"),
        "{stdout}"
    );
}

#[test]
fn hash_key_prints_the_digest_of_stdin() {
    use std::io::Write;
    let mut child = std::process::Command::new(binary())
        .arg("hash-key")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{ERP_KEY}\n").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        hash_key(ERP_KEY)
    );
}
