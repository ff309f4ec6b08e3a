//! Real clients on the proxy's inbound side — curl (HTTP/1.1, and h2c with
//! prior knowledge), Python's `http.client`, h2load — each gets the answer
//! a direct call to the instance (a real nginx) would get.

use std::process::Command;
use std::time::Duration;

use crate::support::real::{tool, Nginx, NginxOptions};
use crate::support::*;

const DAY: Duration = Duration::from_secs(86_400);
const TARGET: &str = "/api/invoices?limit=2&offset=0&filter=a%20b";

struct Setup {
    nginx: Nginx,
    proxy: TestProxy,
    _fake: coupa_auth_proxy::fake_coupa::FakeCoupa,
}

async fn setup() -> Option<Setup> {
    let nginx = Nginx::start(NginxOptions::default())?;
    let fake = start_fake(DAY).await;
    let text = config_text(
        &nginx.base_url(),
        &format!("ca_file = \"{}\"", nginx.ca_file.display()),
        &format!("token_url = \"{}/oauth2/token\"", fake.base_url()),
    );
    let proxy = TestProxy::start(parse_config(&text)).await;
    proxy.wait_ready().await;
    Some(Setup {
        nginx,
        proxy,
        _fake: fake,
    })
}

fn run(program: &std::path::Path, args: &[&str]) -> String {
    let output = Command::new(program).args(args).output().unwrap();
    assert!(
        output.status.success(),
        "{} {args:?}: {}",
        program.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// What the instance answers a well-formed direct call (over HTTP/1.1,
/// as the proxy's default upstream hop is).
fn direct(setup: &Setup, curl: &std::path::Path) -> String {
    run(
        curl,
        &[
            "-sS",
            "--http1.1",
            "--cacert",
            setup.nginx.ca_file.to_str().unwrap(),
            "-H",
            "Authorization: Bearer any-token",
            "-H",
            "Accept: application/json",
            &format!("{}{TARGET}", setup.nginx.base_url()),
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_over_http1_and_h2c_gets_what_a_direct_call_gets() {
    let Some(curl) = tool("curl") else { return };
    let Some(setup) = setup().await else { return };
    let expected = direct(&setup, &curl);
    assert!(expected.contains("\"ok\":true"), "{expected}");
    let url = setup.proxy.url(TARGET);
    for flag in ["--http1.1", "--http2-prior-knowledge"] {
        let curl = curl.clone();
        let url = url.clone();
        let body = tokio::task::spawn_blocking(move || {
            run(
                &curl,
                &[
                    "-sS",
                    flag,
                    "-H",
                    &format!("X-COUPA-API-KEY: {LEGACY_KEY}"),
                    &url,
                ],
            )
        })
        .await
        .unwrap();
        assert_eq!(body, expected, "{flag}");
    }
    setup.proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_http_client_gets_what_a_direct_call_gets() {
    let Some(curl) = tool("curl") else { return };
    let Some(python) = tool("python3") else {
        return;
    };
    let Some(setup) = setup().await else { return };
    let expected = direct(&setup, &curl);
    let script = format!(
        r#"
import http.client, sys
c = http.client.HTTPConnection("127.0.0.1", {port}, timeout=20)
c.request("GET", "{TARGET}", headers={{"X-COUPA-API-KEY": "{LEGACY_KEY}"}})
r = c.getresponse()
body = r.read()
assert r.status == 200, (r.status, body)
sys.stdout.write(body.decode())
"#,
        port = setup.proxy.addr.port()
    );
    let body = tokio::task::spawn_blocking(move || run(&python, &["-c", &script]))
        .await
        .unwrap();
    assert_eq!(body, expected);
    setup.proxy.stop().await;
}

/// h2load: 400 requests over 4 HTTP/2 connections with 10 streams each,
/// every one answered 2xx.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2load_over_h2c_gets_only_successes() {
    let Some(h2load) = tool("h2load") else { return };
    let Some(setup) = setup().await else { return };
    let url = setup.proxy.url("/api/invoices");
    let out = tokio::task::spawn_blocking(move || {
        run(
            &h2load,
            &[
                "-n",
                "400",
                "-c",
                "4",
                "-m",
                "10",
                "-H",
                &format!("x-coupa-api-key: {LEGACY_KEY}"),
                &url,
            ],
        )
    })
    .await
    .unwrap();
    assert!(out.contains("400 succeeded, 0 failed, 0 errored"), "{out}");
    assert!(out.contains("status codes: 400 2xx"), "{out}");
    assert_eq!(
        setup
            .nginx
            .access_log()
            .iter()
            .filter(|(_, _, s)| *s == 200)
            .count(),
        400
    );
    setup.proxy.stop().await;
}
