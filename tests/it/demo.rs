//! The newcomer's first command: `demo` starts the fake and the proxy, and
//! each call it prints does what it says.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use crate::support::*;

struct Demo(std::process::Child);

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demos_printed_calls_work_and_show_up_in_the_migration_view() {
    let mut child = Command::new(binary())
        .args(["demo", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let _demo = Demo(child);
    let printed = tokio::task::spawn_blocking(move || {
        let mut text = String::new();
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            text.push_str(&line);
            text.push('\n');
            if line.contains("Ctrl-C") {
                break;
            }
        }
        text
    })
    .await
    .unwrap();
    let url_after = |label: &str| {
        printed
            .lines()
            .map(str::split_whitespace)
            .find_map(|mut words| {
                (words.next() == Some(label))
                    .then(|| words.next())
                    .flatten()
                    .filter(|w| w.starts_with("http"))
            })
            .unwrap_or_else(|| panic!("{label} in {printed}"))
            .trim_end_matches('/')
            .to_owned()
    };
    let (proxy, admin) = (url_after("proxy"), url_after("status"));
    let key = printed
        .split("X-COUPA-API-KEY: ")
        .nth(1)
        .and_then(|rest| rest.split('\'').next())
        .unwrap()
        .to_owned();
    let client = http_client();
    eventually("demo ready", || {
        let (client, url) = (client.clone(), format!("{admin}/readyz"));
        async move { matches!(client.get(&url).send().await, Ok(r) if r.status() == 200) }
    })
    .await;

    let legacy = client
        .get(format!("{proxy}/api/invoices?limit=1&offset=0"))
        .header("x-coupa-api-key", &key)
        .send()
        .await
        .unwrap();
    assert_eq!(legacy.status(), 200);
    assert!(printed.contains("-u demo-tool:demo-tool-secret -d grant_type=client_credentials"));
    assert!(
        printed.contains("can only set a proxy") && printed.contains("ca init"),
        "the demo names the proxy-setting way"
    );
    let token: serde_json::Value = client
        .post(format!("{proxy}/oauth2/token"))
        .basic_auth("demo-tool", Some("demo-tool-secret"))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let with_token = client
        .get(format!("{proxy}/api/invoices"))
        .bearer_auth(token["access_token"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(with_token.status(), 200);
    let forbidden = client
        .put(format!("{proxy}/api/invoices/1"))
        .header("x-coupa-api-key", &key)
        .send()
        .await
        .unwrap();
    assert_eq!(
        forbidden.status(),
        403,
        "the demo credential cannot write invoices"
    );

    let status: serde_json::Value = get(format!("{admin}/status.json"))
        .await
        .json()
        .await
        .unwrap();
    let integrations = status["integrations"].as_array().unwrap();
    assert_eq!(integrations[0]["integration"], "legacy-erp");
    assert_eq!(integrations[0]["requests"], 2);
    assert_eq!(integrations[0]["resources"][0]["forbidden"], 1);
    assert_eq!(integrations[1]["integration"], "oauth-tool");
    assert_eq!(
        integrations[1]["requests"], 2,
        "the token fetch and the call"
    );
}
