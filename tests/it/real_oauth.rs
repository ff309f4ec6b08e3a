//! The token path against a real OAuth 2 authorization server nobody here
//! wrote: Doorkeeper (tests/doorkeeper/app.rb), the provider of Rails
//! applications. Client credentials with body and Basic authentication,
//! `check --live`, `token`, rotation under load, revocation, a user's
//! consent with PKCE and rotating refresh tokens, a user token ended early,
//! restart from the state file, and a token URL that redirects.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::support::consent::Authorize;
use crate::support::doorkeeper::*;
use crate::support::*;

/// A client-credentials config for Doorkeeper; the secret comes from
/// `DK_SECRET`. `extra` goes into `[oauth]`.
fn cc_config(dk: &Doorkeeper, client: &str, client_auth: &str, extra: &str) -> String {
    format!(
        r#"
[listen]
address = "127.0.0.1:0"

[coupa]
base_url = "{}"
accept = "application/json"

[oauth]
client_id = "{client}"
client_secret = "${{DK_SECRET}}"
client_auth = "{client_auth}"
scopes = ["core.invoice.read"]
retry_initial = "100ms"
retry_max = "500ms"
{extra}

[admin]
address = "127.0.0.1:0"
"#,
        dk.base_url()
    )
}

/// A config for the user client's consent, kept in `state`, with the
/// redirect on `redirect_port`.
fn user_config(dk: &Doorkeeper, redirect_port: u16, state: &Path, extra: &str) -> String {
    format!(
        r#"
[listen]
address = "127.0.0.1:0"

[coupa]
base_url = "{base}"
accept = "application/json"

[oauth]
client_id = "{USER_CLIENT}"
grant = "authorization_code"
authorize_url = "{base}/oauth2/authorize"
redirect_uri = "http://127.0.0.1:{redirect_port}/callback"
state_file = "{state}"
scopes = ["core.invoice.read", "offline_access"]
retry_initial = "100ms"
retry_max = "500ms"
{extra}

[admin]
address = "127.0.0.1:0"
"#,
        base = dk.base_url(),
        state = state.display()
    )
}

fn write(dir: &tempdir::Dir, name: &str, text: &str) -> PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs the binary off the async runtime.
async fn run(args: &[&str], secret: &str) -> (Option<i32>, String, String) {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let secret = secret.to_owned();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_binary(&args, &[("DK_SECRET", &secret)])
    })
    .await
    .unwrap()
}

/// GET `url`; (status, the server's id of the token it saw).
async fn call(url: &str) -> (u16, Option<u64>) {
    let response = http_client().get(url).send().await.unwrap();
    let status = response.status().as_u16();
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    (status, body["token_id"].as_u64())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_credentials_with_body_and_basic_auth_against_doorkeeper() {
    let Some(dk) = Doorkeeper::start(Duration::from_secs(600), "http://127.0.0.1:1/cb") else {
        return;
    };
    let dir = tempdir::Dir::new("dk-cc");

    // The form body carries any secret unambiguously.
    let body = write(&dir, "body.toml", &cc_config(&dk, CC_CLIENT, "body", ""));
    let body = body.to_str().unwrap();
    let (code, out, err) = run(&["check", "--config", body, "--live"], CC_SECRET).await;
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(out.contains("live check passed"), "{out}");
    assert!(!out.lines().any(|l| l.starts_with("warning:")), "{out}");
    let (code, token, err) = run(&["token", "--config", body], CC_SECRET).await;
    assert_eq!(code, Some(0), "{err}");
    let accepted = http_client()
        .get(format!("{}/api/invoices", dk.base_url()))
        .bearer_auth(token.trim())
        .send()
        .await
        .unwrap();
    assert_eq!(
        accepted.status(),
        200,
        "Doorkeeper accepts the printed token"
    );

    // Basic with a secret of unreserved characters: encoded or not, the same.
    let plain = write(
        &dir,
        "plain.toml",
        &cc_config(&dk, PLAIN_CLIENT, "basic", ""),
    );
    let (code, out, err) = run(
        &["check", "--config", plain.to_str().unwrap(), "--live"],
        PLAIN_SECRET,
    )
    .await;
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(!out.lines().any(|l| l.starts_with("warning:")), "{out}");

    // Basic with `+ / = % :`: the proxy encodes as RFC 6749 says,
    // Doorkeeper does not decode. `check` warns before trying, and the
    // failure says why and what to set.
    let basic = write(&dir, "basic.toml", &cc_config(&dk, CC_CLIENT, "basic", ""));
    let (code, out, err) = run(
        &["check", "--config", basic.to_str().unwrap(), "--live"],
        CC_SECRET,
    )
    .await;
    assert_ne!(code, Some(0), "{out}\n{err}");
    let warning = out
        .lines()
        .find(|l| l.starts_with("warning: credential default: oauth.client_auth = \"basic\""))
        .unwrap_or_else(|| panic!("no Basic warning in:\n{out}"));
    assert!(warning.contains("client_auth = \"body\""), "{warning}");
    assert!(out.contains("invalid_client"), "{out}");
    assert!(
        out.contains("RFC 6749 §2.3.1"),
        "the hint names the rule: {out}"
    );
    for text in [&out, &err] {
        assert!(!text.contains(CC_SECRET), "the secret leaked: {text}");
    }
}

/// The other kind of server: one that decodes Basic as the RFC says (the
/// fake Coupa, like Keycloak or Spring). The same secret works there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_with_an_encoded_secret_works_against_a_server_that_decodes() {
    use coupa_auth_proxy::fake_coupa::{FakeClient, FakeCoupa, FakeCoupaOptions};
    let fake = FakeCoupa::start(FakeCoupaOptions {
        clients: vec![FakeClient {
            id: CC_CLIENT.to_owned(),
            secret: CC_SECRET.to_owned(),
            scopes: vec!["core.invoice.read".into()],
        }],
        token_lifetime: Duration::from_secs(86_399),
        tls: None,
    })
    .await
    .unwrap();
    let dir = tempdir::Dir::new("rfc-basic");
    let text = format!(
        "[coupa]\nbase_url = \"{}\"\n\n[oauth]\nclient_id = \"{CC_CLIENT}\"\n\
         client_secret = \"${{DK_SECRET}}\"\nclient_auth = \"basic\"\nscopes = [\"core.invoice.read\"]\n",
        fake.base_url()
    );
    let path = write(&dir, "proxy.toml", &text);
    let (code, token, err) = run(&["token", "--config", path.to_str().unwrap()], CC_SECRET).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(fake.state().token_is_live(token.trim()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_tokens_rotate_under_load_without_a_failed_request() {
    let Some(dk) = Doorkeeper::start(Duration::from_secs(6), "http://127.0.0.1:1/cb") else {
        return;
    };
    let config = cc_config(&dk, PLAIN_CLIENT, "body", "activation_delay = \"200ms\"");
    let proxy = ProxyProcess::start(&config, &[], &[("DK_SECRET", PLAIN_SECRET)]);
    proxy.wait_ready().await;
    let url = proxy.url("/api/invoices");
    // Three renewals (6 s tokens renewed at 5 s) under four callers.
    let give_up = Instant::now() + Duration::from_secs(120);
    let mut callers = Vec::new();
    for _ in 0..4 {
        let url = url.clone();
        let stats_port = dk.port;
        callers.push(tokio::spawn(async move {
            let mut answers = Vec::new();
            loop {
                answers.push(call(&url).await.0);
                let stats: serde_json::Value = http_client()
                    .get(format!("http://127.0.0.1:{stats_port}/test/stats"))
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                if stats["client_credentials"].as_u64().unwrap() >= 4 || Instant::now() > give_up {
                    return answers;
                }
            }
        }));
    }
    let mut total = 0;
    for caller in callers {
        let answers = caller.await.unwrap();
        total += answers.len();
        assert!(
            answers.iter().all(|&s| s == 200),
            "a request failed during rotation: {answers:?}\n{}",
            proxy.logs()
        );
    }
    assert!(
        dk.stats().client_credentials >= 4,
        "three renewals happened"
    );
    assert!(total > 20, "{total} requests");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_is_refreshed_once_and_replayed_without_the_activation_delay() {
    let Some(dk) = Doorkeeper::start(Duration::from_secs(600), "http://127.0.0.1:1/cb") else {
        return;
    };
    // A delay far beyond the bound below: waiting it out would show.
    let config = cc_config(&dk, PLAIN_CLIENT, "body", "activation_delay = \"30s\"");
    let proxy = ProxyProcess::start(&config, &[], &[("DK_SECRET", PLAIN_SECRET)]);
    proxy.wait_ready().await;
    let url = proxy.url("/api/invoices");
    let (status, first) = call(&url).await;
    assert_eq!(status, 200);

    dk.end_access_tokens();
    let started = Instant::now();
    let burst: Vec<_> = (0..8)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { call(&url).await })
        })
        .collect();
    for answer in burst {
        let (status, token) = answer.await.unwrap();
        assert_eq!(status, 200, "{}", proxy.logs());
        assert_ne!(token, first, "replayed with the new token");
    }
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(15),
        "the burst waited {waited:?}: the 30 s activation delay was waited on a rejected token"
    );
    assert_eq!(
        dk.stats().client_credentials,
        2,
        "one token request for the whole burst"
    );
}

/// Plays the user's consent: `authorize` prints the URL, the test approves
/// at Doorkeeper (the consent form's POST) and follows the redirect back.
async fn consent(dk: &Doorkeeper, config: &Path) {
    let authorize = Authorize::start(config);
    let url = url::Url::parse(&authorize.line_starting("http").await).unwrap();
    let no_redirects = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let approved = no_redirects
        .post(format!("{}/oauth2/authorize", dk.base_url()))
        .form(&url.query_pairs().into_owned().collect::<Vec<_>>())
        .send()
        .await
        .unwrap();
    assert_eq!(approved.status(), 302, "Doorkeeper approves");
    let back = approved.headers()["location"].to_str().unwrap().to_owned();
    assert!(back.contains("code="), "{back}");
    let page = http_client().get(&back).send().await.unwrap();
    assert_eq!(page.status(), 200, "the callback page says it worked");
    let (code, output) = authorize.finish().await;
    assert_eq!(code, Some(0), "{output}");
}

/// Doorkeeper with access tokens living `lifetime`, and a user's consent
/// given for a proxy config with `extra` in `[oauth]`.
struct Consented {
    dk: Doorkeeper,
    /// The config, consent kept in `state`.
    text: String,
    state: PathBuf,
    _dir: tempdir::Dir,
}

impl Consented {
    async fn give(lifetime: Duration, extra: &str) -> Option<Self> {
        let redirect_port = real::free_port();
        let dk = Doorkeeper::start(
            lifetime,
            &format!("http://127.0.0.1:{redirect_port}/callback"),
        )?;
        let dir = tempdir::Dir::new("dk-user");
        let state = dir.path().join("grant.json");
        let text = user_config(&dk, redirect_port, &state, extra);
        consent(&dk, &write(&dir, "proxy.toml", &text)).await;
        Some(Self {
            dk,
            text,
            state,
            _dir: dir,
        })
    }
}

fn refresh_token_in(state: &Path) -> String {
    coupa_auth_proxy::token::consent::state_file::load(state)
        .unwrap()
        .refresh_token
        .expose()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_token_ended_early_is_refreshed_at_once_and_survives_restart() {
    let Some(consented) = Consented::give(
        Duration::from_secs(600),
        "activation_delay = \"30s\"\nrejected_token_cooldown = \"1s\"",
    )
    .await
    else {
        return;
    };
    let Consented {
        dk,
        text,
        state,
        _dir,
    } = &consented;
    let consented = refresh_token_in(state);
    assert_eq!(dk.stats().user, 1);

    let mut proxy = ProxyProcess::start(text, &[], &[]);
    proxy.wait_ready().await;
    let url = proxy.url("/api/invoices");
    let (status, stored) = call(&url).await;
    assert_eq!(status, 200, "the consent's own access token serves");

    // Twice: the first refresh rotates the refresh token (Doorkeeper ends
    // the old pair), so the second works only with the rotated one saved.
    let mut previous = stored;
    for round in 1..=2 {
        if round > 1 {
            // Past the cooldown that keeps a token Coupa rejects twice
            // from looping.
            tokio::time::sleep(Duration::from_millis(1500)).await;
        }
        dk.end_access_tokens();
        let started = Instant::now();
        let (status, renewed) = call(&url).await;
        let waited = started.elapsed();
        assert_eq!(status, 200, "round {round}: {}", proxy.logs());
        assert_ne!(renewed, previous, "round {round}: a new token");
        assert!(
            waited < Duration::from_secs(15),
            "round {round}: served after {waited:?}; the rejected token was waited on"
        );
        assert_eq!(dk.stats().user, 1 + round, "one refresh per revocation");
        previous = renewed;
    }
    assert_ne!(
        refresh_token_in(state),
        consented,
        "the rotated refresh token is on disk"
    );
    let logs = proxy.logs();
    assert!(
        !logs.contains("changed on disk"),
        "its own save was taken for a new consent:\n{logs}"
    );

    // A restart serves from the state file: no consent, no extra refresh.
    proxy.terminate();
    assert_eq!(proxy.wait_exit().await, Some(0));
    let proxy = ProxyProcess::start(text, &[], &[]);
    proxy.wait_ready().await;
    let (status, after_restart) = call(&proxy.url("/api/invoices")).await;
    assert_eq!(status, 200, "{}", proxy.logs());
    assert_eq!(after_restart, previous, "the saved access token serves on");
    assert_eq!(dk.stats().user, 3);
}

/// Doorkeeper ends the previous pair when it rotates the refresh token, so
/// requests during the activation delay meet a 401: the waiting token is
/// installed and they are replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_tokens_renew_under_load_while_the_server_ends_the_previous_pair() {
    // `_dir` holds the state file: bound, so it lives as long as the test.
    let Some(Consented { dk, text, _dir, .. }) =
        Consented::give(Duration::from_secs(6), "activation_delay = \"1s\"").await
    else {
        return;
    };

    let proxy = ProxyProcess::start(&text, &[], &[]);
    proxy.wait_ready().await;
    let url = proxy.url("/api/invoices");
    let give_up = Instant::now() + Duration::from_secs(120);
    let mut answers = Vec::new();
    // The consent's token is too short-lived to install, so the proxy
    // refreshed at start (2); then two scheduled renewals (4).
    while dk.stats().user < 4 && Instant::now() < give_up {
        answers.push(call(&url).await.0);
    }
    assert!(dk.stats().user >= 4, "two renewals happened");
    assert!(
        answers.iter().all(|&s| s == 200),
        "a request failed across renewals: {answers:?}\n{}",
        proxy.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_url_that_redirects_is_reported_with_the_new_location() {
    let Some(dk) = Doorkeeper::start(Duration::from_secs(600), "http://127.0.0.1:1/cb") else {
        return;
    };
    let dir = tempdir::Dir::new("dk-redirect");
    let moved = format!("token_url = \"{}/moved/oauth2/token\"", dk.base_url());
    let text = cc_config(&dk, PLAIN_CLIENT, "body", &moved);
    let path = write(&dir, "proxy.toml", &text);
    let path = path.to_str().unwrap();
    let expected = format!(
        "the token endpoint redirected (HTTP 308) to {}/oauth2/token: set oauth.token_url to it",
        dk.base_url()
    );

    let (code, out, err) = run(&["check", "--config", path, "--live"], PLAIN_SECRET).await;
    assert_ne!(code, Some(0));
    assert!(out.contains(&expected), "{out}\n{err}");
    let (code, _, err) = run(&["token", "--config", path], PLAIN_SECRET).await;
    assert_ne!(code, Some(0));
    assert!(err.contains(&expected), "{err}");

    let proxy = ProxyProcess::start(&text, &[], &[("DK_SECRET", PLAIN_SECRET)]);
    let readyz = format!("http://{}/readyz", proxy.admin);
    eventually("/readyz names the redirect", || {
        let readyz = readyz.clone();
        let expected = expected.clone();
        async move {
            let response = http_client().get(&readyz).send().await.unwrap();
            response.status() == 503 && response.text().await.unwrap().contains(&expected)
        }
    })
    .await;
    assert!(proxy.logs().contains(&expected), "{}", proxy.logs());

    // The secret never went to the new location.
    assert_eq!(dk.stats().client_credentials, 0);
    assert!(
        !dk.access_log().contains("POST /oauth2/token"),
        "{}",
        dk.access_log()
    );
}
