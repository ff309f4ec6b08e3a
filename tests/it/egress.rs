//! Behind a corporate egress proxy (`[coupa.egress_proxy]`), with a real
//! one (Debian's tinyproxy): both hops tunnel through it and nothing goes
//! direct; the environment's proxy variables are ignored and named; each
//! failure names the hop; HTTP/2 to Coupa works inside the tunnel.

use std::net::IpAddr;
use std::time::Duration;

use coupa_auth_proxy::fake_coupa::{FakeCoupa, FakeCoupaOptions};

use crate::support::pki::Ca;
use crate::support::tinyproxy::{Tinyproxy, OUTGOING};
use crate::support::*;

const PROXY_USER: &str = "svc-coupa";
const PROXY_PASSWORD: &str = "egress-pa55word-71c3";

/// A fake Coupa over TLS for `localhost`, as the real one is over HTTPS.
async fn tls_fake(ca: &Ca) -> FakeCoupa {
    FakeCoupa::start(FakeCoupaOptions {
        clients: vec![fake_client()],
        token_lifetime: Duration::from_secs(86_399),
        tls: Some(ca.server_config()),
    })
    .await
    .expect("fake starts")
}

/// The proxy's config for `fake`, through `egress` when given (with
/// `password` in its password file), in `dir`.
fn config(
    fake: &FakeCoupa,
    ca: &Ca,
    dir: &std::path::Path,
    coupa_extra: &str,
    egress: Option<(&Tinyproxy, &str)>,
) -> String {
    let ca_file = dir.join("coupa-ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let mut text = config_text(
        &fake.base_url(),
        &format!("ca_file = \"{}\"\n{coupa_extra}", ca_file.display()),
        "",
    );
    if let Some((proxy, password)) = egress {
        let password_file = dir.join("proxy-password");
        std::fs::write(&password_file, format!("{password}\n")).unwrap();
        text += &format!(
            "\n[coupa.egress_proxy]\nurl = \"{}\"\nusername = \"{PROXY_USER}\"\npassword_file = \"{}\"\n",
            proxy.url(),
            password_file.display()
        );
    }
    text
}

fn outgoing() -> IpAddr {
    OUTGOING.parse().unwrap()
}

async fn readyz(proxy: &ProxyProcess) -> (u16, serde_json::Value) {
    let response = get(format!("http://{}/readyz", proxy.admin)).await;
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or_default())
}

/// `check --live` with `config`: its exit code, its report without
/// figures that change from run to run, and all it printed.
fn live_report(config: &str, dir: &std::path::Path) -> (Option<i32>, String, String) {
    let path = dir.join(format!("live-{}.toml", config.len()));
    std::fs::write(&path, config).unwrap();
    let (code, stdout, stderr) = run_binary(
        &["check", "--live", "--config", path.to_str().unwrap()],
        &[("TEST_CLIENT_SECRET", CLIENT_SECRET)],
    );
    let report: String = stdout
        .lines()
        .filter(|l| l.trim_start().starts_with("token") || l.trim_start().starts_with("api call"))
        .map(|l| l.split(':').next().unwrap_or("").to_owned() + "\n")
        .collect();
    (code, report, stdout + &stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_hops_tunnel_through_the_egress_proxy_and_nothing_goes_direct() {
    let Some(tinyproxy) = Tinyproxy::start(Some((PROXY_USER, PROXY_PASSWORD))) else {
        return;
    };
    let ca = Ca::new("coupa-test-ca");
    let fake = tls_fake(&ca).await;
    let dir = tempdir::Dir::new("egress");
    // HTTP/2 to Coupa when ALPN offers it: inside the tunnel too.
    let text = config(
        &fake,
        &ca,
        dir.path(),
        "http_version = \"auto\"",
        Some((&tinyproxy, PROXY_PASSWORD)),
    );
    // Variables pointing at a dead proxy change nothing when the config
    // names one.
    let proxy = ProxyProcess::start(&text, &[], &[("HTTPS_PROXY", "http://127.0.0.1:9")]);
    proxy.wait_ready().await;
    let answer = http_client()
        .get(proxy.url("/api/invoices?limit=1"))
        .header("Accept", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let echo = echo_of(answer).await;
    assert_eq!(echo["version"], "HTTP/2.0", "HTTP/2 inside the tunnel");
    assert!(fake.state().token_requests() >= 1 && fake.state().api_requests() >= 1);
    // The token client's tunnel and the pool's: both through the proxy.
    let instance = fake.base_url().trim_start_matches("https://").to_owned();
    let connects = tinyproxy.connects();
    assert!(
        connects.iter().filter(|c| **c == instance).count() >= 2,
        "{connects:?}"
    );
    assert_eq!(
        fake.state().peers(),
        vec![outgoing()],
        "nothing went direct"
    );
    // The proxy's password is shown nowhere.
    assert!(!proxy.logs().contains(PROXY_PASSWORD));
    let (_, _, check) = live_report(&text, dir.path());
    assert!(!check.contains(PROXY_PASSWORD));
    let status = get(format!("http://{}/status.json", proxy.admin))
        .await
        .text()
        .await
        .unwrap();
    assert!(!status.contains(PROXY_PASSWORD));

    // `token` takes the same way.
    let before = tinyproxy.connects().len();
    let path = dir.path().join("token.toml");
    std::fs::write(&path, &text).unwrap();
    let (code, token, stderr) = run_binary(
        &["token", "--config", path.to_str().unwrap()],
        &[("TEST_CLIENT_SECRET", CLIENT_SECRET)],
    );
    assert_eq!(code, Some(0), "{stderr}");
    assert!(token.starts_with("fake."), "{token}");
    assert!(
        tinyproxy.connects().len() > before,
        "the token CLI tunnelled"
    );
    assert_eq!(
        fake.state().peers(),
        vec![outgoing()],
        "nothing went direct"
    );

    // `check --live` through the proxy reports what it reports direct.
    let (through_code, through, _) = live_report(&text, dir.path());
    let direct_text = config(&fake, &ca, dir.path(), "http_version = \"auto\"", None);
    let (direct_code, direct, _) = live_report(&direct_text, dir.path());
    assert_eq!(
        (through_code, direct_code),
        (Some(0), Some(0)),
        "{through}\n{direct}"
    );
    assert_eq!(through, direct);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coupa_unreachable_behind_the_egress_proxy_is_named_as_such() {
    let Some(tinyproxy) = Tinyproxy::start(None) else {
        return;
    };
    // Nothing listens where the instance is said to be.
    let port = crate::support::real::free_port();
    let text = config_text(&format!("https://localhost:{port}"), "", "")
        + &format!("\n[coupa.egress_proxy]\nurl = \"{}\"\n", tinyproxy.url());
    let proxy = ProxyProcess::start(&text, &[], &[]);
    eventually("readyz names the hop behind the proxy", || async {
        let (status, ready) = readyz(&proxy).await;
        let text = ready.to_string();
        status == 503 && text.contains("could not reach Coupa") && text.contains(&tinyproxy.url())
    })
    .await;
    let answer = http_client()
        .get(proxy.url("/api/invoices"))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 503, "no token, so nothing is forwarded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_variables_of_the_environment_are_ignored_and_named() {
    let ca = Ca::new("coupa-test-ca");
    let fake = tls_fake(&ca).await;
    let dir = tempdir::Dir::new("egress-env");
    let text = config(&fake, &ca, dir.path(), "", None);
    let dead = [
        ("HTTPS_PROXY", "http://127.0.0.1:9"),
        ("HTTP_PROXY", "http://127.0.0.1:9"),
    ];
    let proxy = ProxyProcess::start(&text, &[], &dead);
    proxy.wait_ready().await;
    let answer = http_client()
        .get(proxy.url("/api/invoices"))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200, "both hops went direct and work");
    let warned = |text: &str| {
        text.contains("HTTPS_PROXY")
            && text.contains("ignored")
            && text.contains("[coupa.egress_proxy]")
    };
    assert!(warned(&proxy.logs()), "{}", proxy.logs());
    let (_, ready) = readyz(&proxy).await;
    assert!(warned(&ready.to_string()), "{ready}");
    let path = dir.path().join("check.toml");
    std::fs::write(&path, &text).unwrap();
    let (code, stdout, stderr) = run_binary(
        &["check", "--config", path.to_str().unwrap()],
        &[
            ("TEST_CLIENT_SECRET", CLIENT_SECRET),
            ("HTTPS_PROXY", "http://127.0.0.1:9"),
        ],
    );
    assert_eq!(code, Some(0), "{stderr}");
    assert!(warned(&(stdout + &stderr)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_proxy_password_is_named_and_the_proxy_is_not_ready() {
    let Some(tinyproxy) = Tinyproxy::start(Some((PROXY_USER, PROXY_PASSWORD))) else {
        return;
    };
    let ca = Ca::new("coupa-test-ca");
    let fake = tls_fake(&ca).await;
    let dir = tempdir::Dir::new("egress-login");
    let text = config(
        &fake,
        &ca,
        dir.path(),
        "",
        Some((&tinyproxy, "not-the-password")),
    );
    let proxy = ProxyProcess::start(&text, &[], &[]);
    eventually("readyz names the rejected login", || async {
        let (status, ready) = readyz(&proxy).await;
        status == 503 && ready.to_string().contains("rejected the login")
    })
    .await;
    assert!(!proxy.logs().contains("not-the-password"));
    let (code, _, report) = live_report(&text, dir.path());
    assert_ne!(code, Some(0));
    assert!(report.contains("rejected the login"), "{report}");
    assert!(!report.contains("not-the-password"), "{report}");
    assert_eq!(fake.state().token_requests(), 0, "nothing reached Coupa");

    // The password file is fixed and re-read on reload: no restart.
    std::fs::write(dir.path().join("proxy-password"), PROXY_PASSWORD).unwrap();
    proxy.hangup();
    proxy.wait_ready().await;
    let answer = http_client()
        .get(proxy.url("/api/invoices"))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    assert!(!proxy.logs().contains(PROXY_PASSWORD));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_egress_proxy_stopped_under_load_gives_clear_502s_then_recovers() {
    let Some(mut tinyproxy) = Tinyproxy::start(None) else {
        return;
    };
    let ca = Ca::new("coupa-test-ca");
    let fake = tls_fake(&ca).await;
    let dir = tempdir::Dir::new("egress-down");
    let mut text = config(&fake, &ca, dir.path(), "", None);
    text += &format!("\n[coupa.egress_proxy]\nurl = \"{}\"\n", tinyproxy.url());
    let proxy = ProxyProcess::start(&text, &[], &[]);
    proxy.wait_ready().await;
    let client = http_client();
    let post = || {
        client
            .post(proxy.url("/api/invoices"))
            .header("Content-Type", "application/json")
            .body("{\"po\":1}")
            .send()
    };
    let mut answered = 0;
    for _ in 0..10 {
        assert_eq!(post().await.unwrap().status(), 200);
        answered += 1;
    }
    tinyproxy.kill();
    // New tunnels fail at the egress proxy, and the answer says so.
    let mut refused = 0;
    let mut last = serde_json::Value::Null;
    for _ in 0..10 {
        let response = post().await.unwrap();
        if response.status() == 200 {
            answered += 1;
            continue;
        }
        assert_eq!(response.status(), 502);
        last = response.json().await.unwrap();
        refused += 1;
    }
    assert!(refused > 0, "pooled tunnels die with the proxy");
    assert_eq!(last["error"], "egress_proxy_error", "{last}");
    let message = last["message"].as_str().unwrap();
    assert!(
        message.contains("egress proxy") && message.contains(&tinyproxy.url()),
        "{message}"
    );
    let metrics = get(format!("http://{}/metrics", proxy.admin))
        .await
        .text()
        .await
        .unwrap();
    assert!(
        metric(
            &metrics,
            "coupa_proxy_egress_failures_total",
            &[("cause", "proxy_unreachable")]
        ) >= 1.0,
        "{metrics}"
    );
    // Back, and so is the service; no POST reached Coupa twice.
    tinyproxy.restart();
    eventually("requests flow again", || async {
        post().await.is_ok_and(|r| r.status() == 200)
    })
    .await;
    answered += 1;
    assert!(
        fake.state().api_requests() <= answered + 1,
        "a POST was sent twice: {} at Coupa for {answered} answered",
        fake.state().api_requests()
    );
}
