//! The command line: `check` validates and summarises without secrets,
//! configuration errors name the problem and exit 64, `--config` may come
//! from COUPA_PROXY_CONFIG.

use crate::support::*;

const SECRET: &str = "example-secret-value-42";

fn example_path() -> String {
    format!("{}/proxy.toml.example", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn check_accepts_the_shipped_example_and_redacts_the_secret() {
    let (code, stdout, stderr) = run_binary(
        &["check", "--config", &example_path()],
        &[("COUPA_CLIENT_SECRET", SECRET)],
    );
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("configuration is valid"));
    assert!(stdout.contains("https://acme.coupahost.com/oauth2/token"));
    assert!(stdout.contains("redacted"));
    assert!(!stdout.contains(SECRET) && !stderr.contains(SECRET));
}

#[test]
fn config_path_may_come_from_the_environment() {
    let (code, stdout, stderr) = run_binary(
        &["check"],
        &[
            ("COUPA_CLIENT_SECRET", SECRET),
            ("COUPA_PROXY_CONFIG", &example_path()),
        ],
    );
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("configuration is valid"));
}

fn check_text(text: &str, env: &[(&str, &str)]) -> (Option<i32>, String) {
    let dir = tempdir::Dir::new("cli");
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, text).unwrap();
    let (code, _stdout, stderr) = run_binary(&["check", "--config", path.to_str().unwrap()], env);
    (code, stderr)
}

fn example() -> String {
    std::fs::read_to_string(example_path()).unwrap()
}

#[test]
fn unknown_key_is_named_and_exits_64() {
    let text = example().replace("[admin]", "[admin]\nadres = \"127.0.0.1:1\"");
    let (code, stderr) = check_text(&text, &[("COUPA_CLIENT_SECRET", SECRET)]);
    assert_eq!(code, Some(64));
    assert!(
        stderr.contains("admin") && stderr.contains("adres"),
        "{stderr}"
    );
}

#[test]
fn missing_secret_variable_is_named() {
    let (code, stderr) = check_text(&example(), &[]);
    assert_eq!(code, Some(64));
    assert!(
        stderr.contains("oauth.client_secret") && stderr.contains("COUPA_CLIENT_SECRET"),
        "{stderr}"
    );
}

#[test]
fn non_loopback_plain_http_is_refused() {
    let text = example().replace("https://acme.coupahost.com", "http://acme.coupahost.com");
    let (code, stderr) = check_text(&text, &[("COUPA_CLIENT_SECRET", SECRET)]);
    assert_eq!(code, Some(64));
    assert!(
        stderr.contains("coupa.base_url") && stderr.contains("loopback"),
        "{stderr}"
    );
}

#[test]
fn unreadable_secret_file_and_ca_file_are_named() {
    let text = example().replace(
        "client_secret = \"${COUPA_CLIENT_SECRET}\"",
        "client_secret_file = \"/nonexistent/secret\"",
    );
    let (code, stderr) = check_text(&text, &[]);
    assert_eq!(code, Some(64));
    assert!(stderr.contains("oauth.client_secret_file"), "{stderr}");

    let text = example().replace(
        "# ca_file = \"/etc/ssl/extra-ca.pem\"",
        "ca_file = \"/nonexistent/ca.pem\"",
    );
    let (code, stderr) = check_text(&text, &[("COUPA_CLIENT_SECRET", SECRET)]);
    assert_eq!(code, Some(64));
    assert!(stderr.contains("coupa.ca_file"), "{stderr}");
}

#[test]
fn run_with_bad_config_exits_64_without_serving() {
    let dir = tempdir::Dir::new("cli-run");
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, "[coupa]\nbase_url = \"https://x\"\n").unwrap();
    let (code, _, stderr) = run_binary(&["run", "--config", path.to_str().unwrap()], &[]);
    assert_eq!(code, Some(64));
    assert!(stderr.contains("oauth"), "{stderr}");
}

/// `check --live` against the fake with `text`; (exit code, stdout).
async fn live(text: String, secret: &'static str) -> (Option<i32>, String) {
    tokio::task::spawn_blocking(move || {
        let dir = tempdir::Dir::new("live");
        let path = dir.path().join("proxy.toml");
        std::fs::write(&path, text).unwrap();
        let (code, stdout, stderr) = run_binary(
            &["check", "--live", "--config", path.to_str().unwrap()],
            &[("TEST_CLIENT_SECRET", secret)],
        );
        (code, format!("{stdout}{stderr}"))
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_check_passes_against_a_working_instance() {
    let fake = start_fake(std::time::Duration::from_secs(86_399)).await;
    let (code, out) = live(config_text(&fake.base_url(), "", ""), CLIENT_SECRET).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("token       ok"), "{out}");
    assert!(out.contains("core.common.read core.invoice.read"), "{out}");
    assert!(
        out.contains("GET /api/departments?return_object=limited&limit=1 -> 200"),
        "{out}"
    );
    assert!(!out.contains(CLIENT_SECRET));
    assert_eq!(fake.state().api_requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_check_explains_a_wrong_secret_scope_or_port() {
    let fake = start_fake(std::time::Duration::from_secs(86_399)).await;
    let (code, out) = live(config_text(&fake.base_url(), "", ""), "wrong-secret").await;
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("invalid_client") && out.contains("client id or secret is wrong"),
        "{out}"
    );

    let unassigned = config_text(&fake.base_url(), "", "").replace(
        r#"scopes = ["core.common.read", "core.invoice.read"]"#,
        r#"scopes = ["core.common.read", "core.budget.write"]"#,
    );
    let (code, out) = live(unassigned, CLIENT_SECRET).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("invalid_scope") && out.contains("not assigned to this client"),
        "{out}"
    );

    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let (code, out) = live(
        config_text(&format!("http://127.0.0.1:{port}"), "", ""),
        CLIENT_SECRET,
    )
    .await;
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("unreachable") && out.contains("coupa.base_url"),
        "{out}"
    );
}
