//! The user-consented side of the fake: its public client, a config for a
//! consented credential, a consent saved by hand, and a running
//! `authorize`.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use coupa_auth_proxy::fake_coupa::{FakeClient, FakeCoupa, FakeCoupaOptions};

use super::{binary, eventually, DEADLINE};

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
    let code = fake
        .code_by_hand(USER_CLIENT, &verifier, redirect)
        .await
        .unwrap();
    let (status, answer) = fake
        .exchange_by_hand(USER_CLIENT, &code, &verifier, redirect)
        .await
        .unwrap();
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
