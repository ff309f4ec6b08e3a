//! The admin listener off loopback: the status page and `/status.json`
//! ask for the password (HTTP Basic, as curl's `-u` sends it) while
//! probes and `/metrics` stay open, `/readyz` says nothing of what a
//! credential is, and without a password the page is closed with a
//! sentence naming the key that opens it (which `check` warns of too).

use std::process::Command;
use std::time::Duration;

use coupa_auth_proxy::proxy::auth::hash_key;

use crate::support::real::tool;
use crate::support::*;

const PASSWORD: &str = "correct horse battery staple";

fn off_loopback(base_url: &str, admin_extra: &str) -> String {
    config_text(base_url, "", "").replace(
        "[admin]\naddress = \"127.0.0.1:0\"",
        &format!("[admin]\naddress = \"0.0.0.0:0\"\n{admin_extra}"),
    )
}

/// The admin port of a proxy whose admin listener is on all interfaces,
/// reached over loopback.
fn admin_over_loopback(proxy: &ProxyProcess) -> String {
    assert!(proxy.admin.ip().is_unspecified(), "{}", proxy.admin);
    format!("http://127.0.0.1:{}", proxy.admin.port())
}

/// `curl` with `args`: the status code and the body.
fn curl(curl: &std::path::Path, args: &[&str]) -> (u16, String) {
    let output = Command::new(curl)
        .args(["--silent", "--show-error", "--noproxy", "*"])
        .args(["--write-out", "\n%{http_code}"])
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.trim().parse().unwrap(), body.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn off_loopback_the_status_page_asks_for_the_password_and_probes_stay_open() {
    let Some(curl_bin) = tool("curl") else { return };
    let fake = start_fake(Duration::from_secs(86_400)).await;
    let text = off_loopback(
        &fake.base_url(),
        &format!("status_password_sha256 = \"{}\"", hash_key(PASSWORD)),
    );
    let proxy = ProxyProcess::start(&text, &[], &[]);
    let admin = admin_over_loopback(&proxy);
    eventually("ready", || async {
        get(format!("{admin}/readyz")).await.status() == 200
    })
    .await;

    for path in ["/", "/status.json"] {
        let url = format!("{admin}{path}");
        let (code, body) = curl(&curl_bin, &[&url]);
        assert_eq!(code, 401, "{path} without a password: {body}");
        assert!(!body.contains(CLIENT_ID), "{body}");
        let (code, body) = curl(&curl_bin, &["-u", "ops:wrong password", &url]);
        assert_eq!(code, 401, "{path} with a wrong password: {body}");
        let login = format!("ops:{PASSWORD}");
        let (code, body) = curl(&curl_bin, &["-u", &login, &url]);
        assert_eq!(code, 200, "{path} with the password: {body}");
        assert!(body.contains(CLIENT_ID), "the page itself: {body}");
    }
    let challenge = get(format!("{admin}/status.json")).await;
    assert_eq!(
        challenge.headers()["www-authenticate"],
        "Basic realm=\"coupa-auth-proxy status\", charset=\"UTF-8\"",
        "a browser prompts for the password"
    );
    for path in ["/healthz", "/readyz", "/metrics"] {
        let (code, body) = curl(&curl_bin, &[&format!("{admin}{path}")]);
        assert_eq!(code, 200, "{path} stays open: {body}");
        assert!(
            !body.contains(CLIENT_ID),
            "{path} names no client id: {body}"
        );
    }
    let metrics = scrape(&format!("{admin}/metrics")).await;
    assert_eq!(
        metric(
            &metrics,
            "coupa_proxy_failed_credentials_total",
            &[("kind", "status_login")]
        ),
        2.0,
        "each wrong password counted"
    );
    let logs = proxy.logs();
    assert!(
        !logs.contains(PASSWORD) && !logs.contains(&hash_key(PASSWORD)),
        "{logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn off_loopback_without_a_password_the_status_page_is_closed_and_check_says_why() {
    let Some(curl_bin) = tool("curl") else { return };
    let fake = start_fake(Duration::from_secs(86_400)).await;
    let text = off_loopback(&fake.base_url(), "");
    let proxy = ProxyProcess::start(&text, &[], &[]);
    let admin = admin_over_loopback(&proxy);
    eventually("ready", || async {
        get(format!("{admin}/readyz")).await.status() == 200
    })
    .await;
    let login = format!("ops:{PASSWORD}");
    let (code, body) = curl(&curl_bin, &["-u", &login, &format!("{admin}/")]);
    assert_eq!(code, 401, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["error"], "status_page_closed");
    assert!(
        answer["message"]
            .as_str()
            .unwrap()
            .contains("admin.status_password_sha256"),
        "{body}"
    );
    assert_eq!(curl(&curl_bin, &[&format!("{admin}/metrics")]).0, 200);
    let warned = |logs: &str| {
        logs.matches("admin.status_password_sha256 is not set")
            .count()
    };
    assert_eq!(warned(&proxy.logs()), 1, "the start-up log warns once");

    let dir = tempdir::Dir::new("admin-check");
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, &text).unwrap();
    let check = Command::new(binary())
        .args(["check", "--config"])
        .arg(&path)
        .env("TEST_CLIENT_SECRET", CLIENT_SECRET)
        .output()
        .unwrap();
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(check.status.success(), "{printed}");
    assert_eq!(warned(&printed), 1, "{printed}");
}

/// On loopback nothing changes: the page answers without a password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_loopback_the_status_page_stays_open() {
    let fake = start_fake(Duration::from_secs(86_400)).await;
    let proxy = ProxyProcess::start(&config_text(&fake.base_url(), "", ""), &[], &[]);
    proxy.wait_ready().await;
    let page = get(format!("http://{}/status.json", proxy.admin)).await;
    assert_eq!(page.status(), 200);
    let readyz = get(format!("http://{}/readyz", proxy.admin)).await;
    assert!(readyz.text().await.unwrap().contains(CLIENT_ID));
}
