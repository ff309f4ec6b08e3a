//! Tools that fetch their own token: the proxy's `/oauth2/token` answers
//! local clients with local tokens, which it swaps for Coupa's real token.
//! A real OAuth client library (requests-oauthlib's
//! BackendApplicationClient) pages through a Coupa list with it, while
//! Coupa only ever sees the proxy's token and the tool never does.

use std::time::Duration;

use crate::support::real::python_with;
use crate::support::*;
use coupa_auth_proxy::fake_coupa::FakeCoupa;
use coupa_auth_proxy::proxy::auth::hash_key;

const DAY: Duration = Duration::from_secs(86_400);
const LOCAL_ID: &str = "snaplogic";
const LOCAL_SECRET: &str = "local-only-secret-7d1f0a9c2b4e";
const ERP_KEY: &str = "erp-legacy-key-1b2c3d4e5f60718293a4b5c6d7e8f9";

fn config(base_url: &str) -> String {
    config_text(base_url, "", "")
        .replace(
            "scopes = [\"core.common.read\", \"core.invoice.read\"]",
            "scopes = [\"core.common.read\", \"core.supplier.read\"]",
        )
        + &format!(
            "\n[[integration]]\nname = \"snaplogic-flows\"\noauth_client_id = \"{LOCAL_ID}\"\noauth_client_secret_sha256 = \"{}\"\n\n\
             [[integration]]\nname = \"erp\"\napi_key_sha256 = \"{}\"\n",
            hash_key(LOCAL_SECRET),
            hash_key(ERP_KEY),
        )
}

async fn start() -> (FakeCoupa, TestProxy) {
    let fake = start_fake(DAY).await;
    fake.state().set_scoped_api(true);
    let proxy = TestProxy::start(parse_config(&config(&fake.base_url()))).await;
    proxy.wait_ready().await;
    (fake, proxy)
}

const PAGING: &str = r#"
import json, os, sys
from oauthlib.oauth2 import BackendApplicationClient
from requests_oauthlib import OAuth2Session

proxy, client_id, secret = sys.argv[1:4]
session = OAuth2Session(client=BackendApplicationClient(client_id=client_id))
session.trust_env = False  # no proxy variables: talk to 127.0.0.1 directly
token = session.fetch_token(
    token_url=proxy + "/oauth2/token", client_id=client_id, client_secret=secret
)
records, offset = [], 0
while True:
    page = session.get(
        proxy + "/api/suppliers",
        params={"offset": offset, "limit": 50},
        headers={"Accept": "application/json"},
    )
    page.raise_for_status()
    batch = page.json()
    records.extend(batch)
    if len(batch) < 50:
        break
    offset += 50
print(json.dumps({"token": token, "records": records}))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oauth_client_library_pages_through_coupa_with_a_local_token() {
    let Some(python) = python_with("requests_oauthlib") else {
        return;
    };
    let (fake, proxy) = start().await;
    let coupa_token_requests = fake.state().token_requests();
    let url = proxy.url("");
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .args(["-c", PAGING, &url, LOCAL_ID, LOCAL_SECRET])
            // oauthlib refuses plain http unless told: the test stays on
            // loopback.
            .env("OAUTHLIB_INSECURE_TRANSPORT", "1")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let result: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let records = result["records"].as_array().unwrap();
    assert_eq!(records.len(), 120, "three pages of Coupa's data");
    assert_eq!(records[0]["name"], "Supplier 1");
    assert_eq!(records[119]["id"], 120);
    let token = &result["token"];
    assert_eq!(token["token_type"], "bearer");
    assert_eq!(
        token["scope"],
        serde_json::json!(["core.common.read", "core.supplier.read"])
    );
    assert!(token["expires_in"].as_f64().unwrap() > 80_000.0, "{token}");
    let local = token["access_token"].as_str().unwrap();

    // Coupa saw the proxy's own token on every call, never the tool's,
    // and its token endpoint was not asked on the tool's behalf.
    let seen = fake.state().seen_bearers();
    assert_eq!(seen.len(), 3);
    assert!(seen
        .iter()
        .all(|t| fake.state().token_is_live(t) && t != local));
    assert_eq!(fake.state().rejected_api_requests(), 0);
    assert_eq!(fake.state().token_requests(), coupa_token_requests);

    let status = proxy.status_json().await;
    let flows = &status["integrations"][0];
    assert_eq!(flows["integration"], "snaplogic-flows");
    assert_eq!(flows["identified_by"]["oauth_client_id"], LOCAL_ID);
    assert!(flows["last_local_token"].is_string());
    assert!(
        flows["flags"].as_array().unwrap().is_empty(),
        "not on a legacy key"
    );
    proxy.stop().await;
}

async fn token_request(
    proxy: &TestProxy,
    form: &[(&str, &str)],
) -> (u16, reqwest::header::HeaderMap, serde_json::Value) {
    let response = http_client()
        .post(proxy.url("/oauth2/token"))
        .form(form)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    (status, headers, response.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_local_credentials_and_requests_get_rfc_6749_errors_and_nothing_reaches_coupa() {
    let (fake, proxy) = start().await;
    // A legacy integration's call, so Coupa's real token is known.
    let legacy = http_client()
        .get(proxy.url("/api/suppliers?limit=1"))
        .header("x-coupa-api-key", ERP_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(legacy.status(), 200);
    let coupa_token = fake.state().seen_bearers().pop().unwrap();
    let before = (
        fake.state().token_requests(),
        fake.state().api_requests() + fake.state().rejected_api_requests(),
    );
    let grant = ("grant_type", "client_credentials");
    for (form, status, code) in [
        (
            vec![grant, ("client_id", LOCAL_ID), ("client_secret", "wrong")],
            401,
            "invalid_client",
        ),
        (
            vec![
                grant,
                ("client_id", "stranger"),
                ("client_secret", LOCAL_SECRET),
            ],
            401,
            "invalid_client",
        ),
        // A legacy key is not a local client.
        (
            vec![grant, ("client_id", "erp"), ("client_secret", ERP_KEY)],
            401,
            "invalid_client",
        ),
        // The real Coupa client is unknown here too.
        (
            vec![
                grant,
                ("client_id", CLIENT_ID),
                ("client_secret", CLIENT_SECRET),
            ],
            401,
            "invalid_client",
        ),
        (
            vec![("client_id", LOCAL_ID), ("client_secret", LOCAL_SECRET)],
            400,
            "invalid_request",
        ),
        (
            vec![
                ("grant_type", "password"),
                ("client_id", LOCAL_ID),
                ("client_secret", LOCAL_SECRET),
            ],
            400,
            "unsupported_grant_type",
        ),
        (
            vec![
                grant,
                ("client_id", LOCAL_ID),
                ("client_secret", LOCAL_SECRET),
                ("scope", "core.supplier.read core.invoice.write"),
            ],
            400,
            "invalid_scope",
        ),
    ] {
        let (got, headers, body) = token_request(&proxy, &form).await;
        assert_eq!(
            (got, body["error"].as_str().unwrap()),
            (status, code),
            "{form:?}: {body}"
        );
        assert_eq!(headers["cache-control"], "no-store");
        if status == 401 {
            assert_eq!(
                headers["www-authenticate"],
                "Basic realm=\"coupa-auth-proxy\""
            );
        }
        let text = body.to_string();
        assert!(
            !text.contains(CLIENT_SECRET) && !text.contains(LOCAL_SECRET),
            "{text}"
        );
        if code == "invalid_scope" {
            let description = body["error_description"].as_str().unwrap();
            assert!(description.contains("core.invoice.write"), "{description}");
            assert!(!description.contains("core.supplier.read core.invoice.write"));
        }
    }

    // A token the proxy never issued, Coupa's own included, is refused
    // with an answer OAuth libraries understand; so is every other OAuth
    // path. None of it is forwarded.
    for bearer in ["never-issued", coupa_token.as_str()] {
        let response = http_client()
            .get(proxy.url("/api/suppliers"))
            .bearer_auth(bearer)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401);
        assert_eq!(
            response.headers()["www-authenticate"],
            "Bearer error=\"invalid_token\""
        );
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["error"], "invalid_token");
    }
    for path in [
        "/oauth2/authorizations/new",
        "/OAuth2/token/",
        "/%6Fauth2/token",
    ] {
        let response = http_client()
            .post(proxy.url(path))
            .header("x-coupa-api-key", ERP_KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 404, "{path}");
    }
    assert_eq!(
        (
            fake.state().token_requests(),
            fake.state().api_requests() + fake.state().rejected_api_requests(),
        ),
        before,
        "nothing reached Coupa"
    );

    // Form credentials work as well as Basic; the token then serves.
    let (status, _, body) = token_request(
        &proxy,
        &[
            grant,
            ("client_id", LOCAL_ID),
            ("client_secret", LOCAL_SECRET),
            ("scope", "core.supplier.read"),
        ],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["scope"], "core.common.read core.supplier.read");
    let response = http_client()
        .get(proxy.url("/api/suppliers?limit=2"))
        .bearer_auth(body["access_token"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let metrics = get(proxy.admin_url("/metrics")).await.text().await.unwrap();
    let outcome = |o: &str| {
        metric(
            &metrics,
            "coupa_proxy_local_token_requests_total",
            &[("outcome", o)],
        )
    };
    assert_eq!(outcome("issued"), 1.0);
    assert_eq!(outcome("invalid_client"), 4.0);
    assert!(
        !metrics.contains(LOCAL_SECRET)
            && !metrics.contains(body["access_token"].as_str().unwrap())
    );
    proxy.stop().await;
}
