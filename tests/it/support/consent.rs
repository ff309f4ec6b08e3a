//! The user-consented side of the fake: its public client, a config for a
//! consented credential, the authorization code steps by hand, and a
//! running `authorize`.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use coupa_auth_proxy::fake_coupa::{FakeClient, FakeCoupa, FakeCoupaOptions};

use super::{binary, eventually, http_client, DEADLINE};

pub const USER_CLIENT: &str = "user-client";

/// A consent made at `fake` by hand (code, PKCE, exchange) and saved as a
/// state file in `dir`: its path, and the state as saved.
pub async fn consent_saved(
    fake: &FakeCoupa,
    dir: &Path,
) -> (
    std::path::PathBuf,
    coupa_auth_proxy::token::consent::state_file::GrantState,
) {
    use coupa_auth_proxy::token::consent::state_file::{self, GrantState};
    let redirect = "http://127.0.0.1:9/callback";
    let verifier = "v".repeat(64);
    let code = code_for(fake, &verifier, redirect).await;
    let (status, answer) = exchange(fake, &code, &verifier, redirect).await;
    assert_eq!(status, 200, "{answer}");
    let state = GrantState {
        client_id: USER_CLIENT.to_owned(),
        scope: answer["scope"].as_str().unwrap().to_owned(),
        refresh_token: coupa_auth_proxy::secret::Secret::new(
            answer["refresh_token"].as_str().unwrap(),
        ),
        refresh_token_issued_at: std::time::SystemTime::now(),
        access_token: None,
        access_token_expires_at: None,
    };
    let path = dir.join("grant.json");
    state_file::save(&path, &state).unwrap();
    (path, state)
}

pub async fn start_user_fake() -> FakeCoupa {
    FakeCoupa::start(FakeCoupaOptions {
        clients: vec![FakeClient {
            id: USER_CLIENT.to_owned(),
            // Public: PKCE alone, no secret.
            secret: String::new(),
            scopes: vec!["core.invoice.read".into(), "offline_access".into()],
        }],
        token_lifetime: Duration::from_secs(86_399),
        tls: None,
    })
    .await
    .expect("fake Coupa starts")
}

/// A config for a user-consented credential whose state file is `state`.
pub fn user_config(base_url: &str, grant: &str, state: &Path) -> String {
    let redirect = if grant == "authorization_code" {
        "redirect_uri = \"http://127.0.0.1:0/callback\""
    } else {
        ""
    };
    format!(
        r#"
[listen]
address = "127.0.0.1:0"

[coupa]
base_url = "{base_url}"
accept = "application/json"

[oauth]
client_id = "{USER_CLIENT}"
grant = "{grant}"
{redirect}
state_file = "{}"
scopes = ["core.invoice.read", "offline_access"]
activation_delay = "100ms"
retry_initial = "100ms"
retry_max = "500ms"

[admin]
address = "127.0.0.1:0"
"#,
        state.display()
    )
}

/// Asks the fake's authorize endpoint for a code bound to `verifier`.
pub async fn code_for(fake: &FakeCoupa, verifier: &str, redirect: &str) -> String {
    let no_redirects = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let challenge = coupa_auth_proxy::token::consent::pkce::challenge(verifier);
    let response = no_redirects
        .get(format!("{}/oauth2/authorizations/new", fake.base_url()))
        .query(&[
            ("client_id", USER_CLIENT),
            ("response_type", "code"),
            ("scope", "core.invoice.read offline_access"),
            ("redirect_uri", redirect),
            ("code_challenge", &challenge),
            ("code_challenge_method", "S256"),
            ("state", "s1"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 302);
    let location = url::Url::parse(response.headers()["location"].to_str().unwrap()).unwrap();
    let code = location.query_pairs().find(|(k, _)| k == "code").unwrap().1;
    code.into_owned()
}

/// Exchanges `code` with `verifier`; returns (status, JSON answer).
pub async fn exchange(
    fake: &FakeCoupa,
    code: &str,
    verifier: &str,
    redirect: &str,
) -> (u16, serde_json::Value) {
    let response = http_client()
        .post(format!("{}/oauth2/token", fake.base_url()))
        .form(&[
            ("grant_type", "authorization_code"),
            ("client_id", USER_CLIENT),
            ("code", code),
            ("redirect_uri", redirect),
            ("code_verifier", verifier),
        ])
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

/// A running `authorize` whose stderr is collected line by line.
pub struct Authorize {
    child: Child,
    output: Arc<Mutex<String>>,
    reader: std::thread::JoinHandle<()>,
}

impl Authorize {
    pub fn start(config: &Path) -> Self {
        let mut child = Command::new(binary())
            .args(["authorize", "--config"])
            .arg(config)
            .args(["--timeout", "60s"])
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("binary starts");
        let stderr = child.stderr.take().unwrap();
        let output = Arc::new(Mutex::new(String::new()));
        let sink = output.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let mut out = sink.lock().unwrap();
                out.push_str(&line);
                out.push('\n');
            }
        });
        Self {
            child,
            output,
            reader,
        }
    }

    pub fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    /// The first printed line starting with `prefix`.
    pub async fn line_starting(&self, prefix: &str) -> String {
        let mut found = None;
        eventually(
            &format!("authorize prints a line starting {prefix}"),
            || {
                let line = self
                    .output()
                    .lines()
                    .find(|l| l.trim_start().starts_with(prefix))
                    .map(|l| l.trim().to_owned());
                let hit = line.is_some();
                if hit {
                    found = line;
                }
                async move { hit }
            },
        )
        .await;
        found.unwrap()
    }

    /// Exit code and everything printed, once the process is gone.
    pub async fn finish(mut self) -> (Option<i32>, String) {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                if self.reader.is_finished() {
                    return (status.code(), self.output());
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "authorize did not exit; output:\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Authorize {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
