//! `coupa-auth-proxy token`: one token on stdout for tools that cannot sit
//! behind the proxy; explanations, never a token, on failure.

use std::time::Duration;

use crate::support::*;

fn write_config(dir: &tempdir::Dir, text: &str) -> String {
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_prints_exactly_one_line_that_coupa_accepts() {
    let fake = start_fake(Duration::from_secs(86_399)).await;
    let dir = tempdir::Dir::new("token");
    let path = write_config(&dir, &config_text(&fake.base_url(), "", ""));
    let (code, stdout, stderr) = tokio::task::spawn_blocking(move || {
        run_binary(
            &["token", "--config", &path],
            &[("TEST_CLIENT_SECRET", CLIENT_SECRET)],
        )
    })
    .await
    .unwrap();
    assert_eq!(code, Some(0), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{stdout}");
    assert!(fake.state().token_is_live(lines[0]));
    assert!(
        stderr.contains("expires in") && stderr.contains("core.invoice.read"),
        "{stderr}"
    );
    assert!(
        stderr.contains("credential"),
        "the warning is on stderr: {stderr}"
    );

    // The token works as a bearer straight against Coupa.
    let response = http_client()
        .get(format!("{}/api/invoices", fake.base_url()))
        .bearer_auth(lines[0])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_json_prints_the_whole_response() {
    let fake = start_fake(Duration::from_secs(86_399)).await;
    let dir = tempdir::Dir::new("token-json");
    let path = write_config(&dir, &config_text(&fake.base_url(), "", ""));
    let (code, stdout, stderr) = tokio::task::spawn_blocking(move || {
        run_binary(
            &["token", "--json", "--config", &path],
            &[("TEST_CLIENT_SECRET", CLIENT_SECRET)],
        )
    })
    .await
    .unwrap();
    assert_eq!(code, Some(0), "{stderr}");
    let response: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(response["token_type"], "bearer");
    assert_eq!(response["expires_in"], 86_399);
    assert!(fake
        .state()
        .token_is_live(response["access_token"].as_str().unwrap()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_secret_explains_and_prints_nothing_on_stdout() {
    let fake = start_fake(Duration::from_secs(86_399)).await;
    let dir = tempdir::Dir::new("token-wrong");
    let path = write_config(&dir, &config_text(&fake.base_url(), "", ""));
    let (code, stdout, stderr) = tokio::task::spawn_blocking(move || {
        run_binary(
            &["token", "--config", &path],
            &[("TEST_CLIENT_SECRET", "not-the-secret")],
        )
    })
    .await
    .unwrap();
    assert_ne!(code, Some(0));
    assert!(stdout.is_empty(), "{stdout}");
    assert!(
        stderr.contains("invalid_client") && stderr.contains("client id or secret is wrong"),
        "{stderr}"
    );
    assert!(!stderr.contains("not-the-secret"));
}

#[test]
fn unknown_credential_is_named() {
    let dir = tempdir::Dir::new("token-cred");
    let path = write_config(&dir, &config_text("http://127.0.0.1:9", "", ""));
    let (code, stdout, stderr) = run_binary(
        &["token", "--credential", "nope", "--config", &path],
        &[("TEST_CLIENT_SECRET", CLIENT_SECRET)],
    );
    assert_eq!(code, Some(64));
    assert!(stdout.is_empty());
    assert!(
        stderr.contains("nope") && stderr.contains("default"),
        "{stderr}"
    );
}
