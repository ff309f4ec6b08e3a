//! User-consented grants end to end against the fake Coupa: `authorize`
//! (authorization code with PKCE, device code), the state file, and `run`
//! renewing from it across restarts.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::support::consent::*;
use crate::support::*;
use coupa_auth_proxy::fake_coupa::FakeCoupa;
use coupa_auth_proxy::token::consent::state_file;

/// Writes the config and returns (config path, state file path).
fn setup(dir: &tempdir::Dir, fake: &FakeCoupa, grant: &str) -> (PathBuf, PathBuf) {
    let state = dir.path().join("state").join("grant.json");
    let config = dir.path().join("proxy.toml");
    std::fs::write(&config, user_config(&fake.base_url(), grant, &state)).unwrap();
    (config, state)
}

/// Runs the authorization code consent as a browser would: open the
/// printed URL and follow the redirect to the loopback listener.
async fn consent_in_browser(config: &Path) -> (Option<i32>, String) {
    let authorize = Authorize::start(config);
    let url = authorize.line_starting("http").await;
    let page = http_client().get(&url).send().await.unwrap();
    assert_eq!(page.status(), 200, "the callback page says it worked");
    authorize.finish().await
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_code_consent_is_stored_and_run_renews_and_persists_rotated_refresh_tokens() {
    let fake = start_user_fake().await;
    // Short-lived tokens: the stored one is too short to install, so `run`
    // refreshes at once, and again every couple of seconds.
    fake.state().set_token_lifetime(Duration::from_secs(3));
    let dir = tempdir::Dir::new("consent-code");
    let (config, state_path) = setup(&dir, &fake, "authorization_code");

    let (code, output) = consent_in_browser(&config).await;
    assert_eq!(code, Some(0), "{output}");
    assert!(output.contains("code_challenge_method=S256"), "{output}");
    assert!(output.contains("consent stored"), "{output}");
    assert_eq!(mode(&state_path), 0o600);
    assert_eq!(
        mode(state_path.parent().unwrap()),
        0o700,
        "the directory authorize created"
    );
    let consented = state_file::load(&state_path).unwrap();
    assert!(fake
        .state()
        .refresh_token_is_live(consented.refresh_token.expose()));
    assert!(!output.contains(consented.refresh_token.expose()));
    assert!(!output.contains(consented.access_token.as_ref().unwrap().expose()));

    let config_text = std::fs::read_to_string(&config).unwrap();
    let mut proxy = ProxyProcess::start(&config_text, &["--log-level", "trace"], &[]);
    proxy.wait_ready().await;
    // Each refresh rotates the refresh token; the file follows.
    eventually("two rotations persisted", || {
        let rotated = state_file::load(&state_path)
            .map(|s| s.refresh_token != consented.refresh_token)
            .unwrap_or(false);
        let grants = fake.state().refresh_grants();
        async move { rotated && grants >= 2 }
    })
    .await;
    // The file lags the fake only by the write; then it holds the live one.
    eventually("the persisted refresh token is the live one", || {
        let live = state_file::load(&state_path)
            .map(|s| fake.state().refresh_token_is_live(s.refresh_token.expose()))
            .unwrap_or(false);
        async move { live }
    })
    .await;
    let on_disk = state_file::load(&state_path).unwrap();
    assert!(!fake
        .state()
        .refresh_token_is_live(consented.refresh_token.expose()));
    assert_eq!(mode(&state_path), 0o600);
    // With 3-second tokens a renewal that a busy machine delays (it writes
    // the state file first) can leave a moment without a usable token;
    // this test is about persistence, so it waits for the next one.
    served(&proxy.url("/api/invoices")).await;
    proxy.terminate();
    proxy.wait_exit().await;
    let logs = proxy.logs();
    assert!(!logs.contains(consented.refresh_token.expose()));
    assert!(!logs.contains(on_disk.refresh_token.expose()));
    assert!(!logs.contains("refresh."), "no refresh token in the logs");

    // A restart needs no new consent: it renews from the file.
    let grants_before = fake.state().refresh_grants();
    let restarted = ProxyProcess::start(&config_text, &[], &[]);
    restarted.wait_ready().await;
    assert!(fake.state().refresh_grants() > grants_before);
    served(&restarted.url("/api/invoices")).await;
}

/// Waits until `url` answers 200 (see the note on 3-second tokens above).
async fn served(url: &str) {
    eventually("a request is served", || {
        let url = url.to_owned();
        async move { get(url).await.status() == 200 }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_reuses_the_stored_access_token_without_a_refresh() {
    let fake = start_user_fake().await;
    let dir = tempdir::Dir::new("consent-reuse");
    let (config, state_path) = setup(&dir, &fake, "authorization_code");
    let (code, output) = consent_in_browser(&config).await;
    assert_eq!(code, Some(0), "{output}");
    let stored = state_file::load(&state_path).unwrap();

    let proxy = ProxyProcess::start(&std::fs::read_to_string(&config).unwrap(), &[], &[]);
    proxy.wait_ready().await;
    let echo: serde_json::Value = get(proxy.url("/api/invoices")).await.json().await.unwrap();
    assert_eq!(echoed_token(&echo), stored.access_token.unwrap().expose());
    assert_eq!(fake.state().refresh_grants(), 0);

    // `token` prints the same stored token, again without a refresh.
    let config_arg = config.to_str().unwrap().to_owned();
    let (code, stdout, stderr) =
        tokio::task::spawn_blocking(move || run_binary(&["token", "--config", &config_arg], &[]))
            .await
            .unwrap();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(fake.state().token_is_live(stdout.trim()));
    assert_eq!(fake.state().refresh_grants(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_with_a_foreign_state_is_refused_and_nothing_is_stored() {
    let fake = start_user_fake().await;
    let dir = tempdir::Dir::new("consent-csrf");
    let (config, state_path) = setup(&dir, &fake, "authorization_code");
    let authorize = Authorize::start(&config);
    let url = authorize.line_starting("http").await;
    let mut forged = url::Url::parse(&url).unwrap();
    let pairs: Vec<(String, String)> = forged
        .query_pairs()
        .map(|(k, v)| {
            let v = if k == "state" {
                "attacker-chosen".to_owned()
            } else {
                v.into_owned()
            };
            (k.into_owned(), v)
        })
        .collect();
    forged.query_pairs_mut().clear().extend_pairs(pairs);
    let page = http_client().get(forged.as_str()).send().await.unwrap();
    assert_eq!(page.status(), 400);
    let (code, output) = authorize.finish().await;
    assert_eq!(code, Some(1), "{output}");
    assert!(output.contains("state does not match"), "{output}");
    assert!(!state_path.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_code_flow_honours_pending_and_slow_down() {
    let fake = start_user_fake().await;
    fake.state().set_device_interval(Duration::from_secs(1));
    fake.state()
        .set_device_script(&["authorization_pending", "slow_down"]);
    let dir = tempdir::Dir::new("consent-device");
    let (config, state_path) = setup(&dir, &fake, "device_code");
    let authorize = Authorize::start(&config);
    let (code, output) = authorize.finish().await;
    assert_eq!(code, Some(0), "{output}");
    assert!(output.contains("/oauth2/device"), "{output}");
    assert!(output.contains("left"), "a countdown is shown: {output}");
    // pending, slow_down, then approval on the poll after the longer wait.
    assert_eq!(fake.state().device_polls(), 3, "{output}");
    assert_eq!(fake.state().device_polls_too_fast(), 0, "{output}");
    assert_eq!(mode(&state_path), 0o600);
    let stored = state_file::load(&state_path).unwrap();
    assert!(fake
        .state()
        .refresh_token_is_live(stored.refresh_token.expose()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_code_denied_says_so() {
    let fake = start_user_fake().await;
    fake.state().set_device_interval(Duration::from_secs(0));
    fake.state().set_deny_consent(true);
    let dir = tempdir::Dir::new("consent-denied");
    let (config, state_path) = setup(&dir, &fake, "device_code");
    let (code, output) = Authorize::start(&config).finish().await;
    assert_eq!(code, Some(1), "{output}");
    assert!(output.contains("access_denied"), "{output}");
    assert!(!state_path.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_refresh_token_names_the_command_to_run() {
    let fake = start_user_fake().await;
    fake.state().set_token_lifetime(Duration::from_secs(3));
    let dir = tempdir::Dir::new("consent-revoked");
    let (config, _) = setup(&dir, &fake, "authorization_code");
    let (code, output) = consent_in_browser(&config).await;
    assert_eq!(code, Some(0), "{output}");
    fake.state().revoke_refresh_tokens();

    let proxy = ProxyProcess::start(&std::fs::read_to_string(&config).unwrap(), &[], &[]);
    let command = "coupa-auth-proxy authorize --config";
    eventually("the log names the authorize command", || {
        let logs = proxy.logs();
        async move { logs.contains(command) && logs.contains("credential default") }
    })
    .await;
    let ready: serde_json::Value = get(format!("http://{}/readyz", proxy.admin))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(ready["ready"], false);
    assert!(
        ready["last_token_error"]
            .as_str()
            .unwrap()
            .contains(command),
        "{ready}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_token_near_its_end_is_flagged_in_readiness_logs_and_metrics() {
    let fake = start_user_fake().await;
    let dir = tempdir::Dir::new("consent-ageing");
    let (config, state_path) = setup(&dir, &fake, "authorization_code");
    let (code, output) = consent_in_browser(&config).await;
    assert_eq!(code, Some(0), "{output}");
    // Consent given 80 days ago: 10 days left of Coupa's 90.
    let mut state = state_file::load(&state_path).unwrap();
    state.refresh_token_issued_at = SystemTime::now() - Duration::from_secs(80 * 86_400);
    state_file::save(&state_path, &state).unwrap();

    let proxy = ProxyProcess::start(&std::fs::read_to_string(&config).unwrap(), &[], &[]);
    proxy.wait_ready().await;
    let ready: serde_json::Value = get(format!("http://{}/readyz", proxy.admin))
        .await
        .json()
        .await
        .unwrap();
    let warning = ready["warnings"][0].as_str().unwrap_or_default().to_owned();
    assert!(
        warning.contains("expires in 10 days") && warning.contains("authorize --config"),
        "{ready}"
    );
    assert!(proxy.logs().contains("expires in 10 days"));
    let metrics = get(format!("http://{}/metrics", proxy.admin))
        .await
        .text()
        .await
        .unwrap();
    let line = metrics
        .lines()
        .find(|l| l.starts_with("coupa_proxy_refresh_token_expires_in_seconds{"))
        .unwrap_or_else(|| panic!("{metrics}"));
    let seconds: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(
        (9.0 * 86_400.0..=10.0 * 86_400.0).contains(&seconds),
        "{line}"
    );

    // `check` says the same.
    let config_arg = config.to_str().unwrap().to_owned();
    let (code, stdout, stderr) =
        tokio::task::spawn_blocking(move || run_binary(&["check", "--config", &config_arg], &[]))
            .await
            .unwrap();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("warning: credential default"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_without_a_usable_consent_stops_and_says_to_authorize() {
    let fake = start_user_fake().await;
    let dir = tempdir::Dir::new("consent-missing");
    let (config, state_path) = setup(&dir, &fake, "device_code");
    let config_arg = config.to_str().unwrap().to_owned();
    let run = move |args: &'static [&'static str]| {
        let config_arg = config_arg.clone();
        tokio::task::spawn_blocking(move || {
            let mut all: Vec<&str> = args.to_vec();
            all.extend(["--config", &config_arg]);
            run_binary(&all, &[])
        })
    };
    let (code, _, stderr) = run(&["run"]).await.unwrap();
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("does not exist"), "{stderr}");
    assert!(
        stderr.contains("coupa-auth-proxy authorize --config")
            && stderr.contains("--credential default"),
        "{stderr}"
    );

    std::fs::create_dir_all(state_path.parent().unwrap()).unwrap();
    std::fs::write(&state_path, "{\"version\": 1, \"client_id\": ").unwrap();
    for args in [&["run"][..], &["check"][..]] {
        let (code, _, stderr) = run(args).await.unwrap();
        assert_eq!(code, Some(64), "{args:?}: {stderr}");
        assert!(stderr.contains("corrupt"), "{stderr}");
        assert!(stderr.contains("authorize --config"), "{stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_refresh_token_is_on_disk_before_its_access_token_is_used() {
    use coupa_auth_proxy::config::Config;
    use coupa_auth_proxy::token::refresher::TokenSource;
    use coupa_auth_proxy::token::{CredentialSource, FetchError, TokenStore};

    let fake = start_user_fake().await;
    let dir = tempdir::Dir::new("consent-ordering");
    let (config_path, state_path) = setup(&dir, &fake, "authorization_code");
    let (code, output) = consent_in_browser(&config_path).await;
    assert_eq!(code, Some(0), "{output}");
    // Make the stored access token too short to serve, so a fetch refreshes.
    let mut state = state_file::load(&state_path).unwrap();
    state.access_token_expires_at = Some(SystemTime::now());
    state_file::save(&state_path, &state).unwrap();

    let config = Config::load(&config_path).unwrap();
    let tls = coupa_auth_proxy::tls::client_config(&[]).unwrap();
    let source = CredentialSource::new(
        &config.credentials[0],
        tls,
        Some(&config_path),
        Arc::new(TokenStore::new()),
        None,
    )
    .unwrap();

    // The state directory becomes unwritable (a file stands in its place).
    let state_dir = state_path.parent().unwrap().to_owned();
    std::fs::rename(&state_dir, dir.path().join("moved")).unwrap();
    std::fs::write(&state_dir, "not a directory").unwrap();
    let err = source.fetch().await.unwrap_err();
    assert!(matches!(err, FetchError::StateFile(_)), "{err:?}");
    assert!(err.to_string().contains("held back"), "{err}");
    assert_eq!(fake.state().refresh_grants(), 1);

    // Once the file can be written, the held token is saved, then served,
    // with no second refresh (the old refresh token is dead already).
    std::fs::remove_file(&state_dir).unwrap();
    std::fs::create_dir(&state_dir).unwrap();
    let token = source.fetch().await.unwrap();
    assert_eq!(fake.state().refresh_grants(), 1);
    let on_disk = state_file::load(&state_path).unwrap();
    assert_eq!(
        on_disk.access_token.unwrap().expose(),
        token.access_token.expose()
    );
    assert!(fake
        .state()
        .refresh_token_is_live(on_disk.refresh_token.expose()));
    assert!(!fake
        .state()
        .refresh_token_is_live(state.refresh_token.expose()));
}

/// With `[cluster]`, `authorize` stores the consent in the cluster state
/// (sealed in Redis) instead of a file, and `run` serves from it with no
/// state file anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_cluster_authorize_stores_the_consent_in_redis_and_run_uses_it() {
    let Some(redis) = crate::support::real::Redis::start() else {
        return;
    };
    let fake = start_user_fake().await;
    let dir = tempdir::Dir::new("consent-cluster");
    let state_path = dir.path().join("state").join("grant.json");
    let key_file = dir.path().join("cluster.key");
    std::fs::write(&key_file, "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=").unwrap();
    let text = user_config(&fake.base_url(), "device_code", &state_path)
        + &format!(
            "\n[cluster]\nredis_url = \"{}\"\nencryption_key_file = \"{}\"\n",
            redis.url(),
            key_file.display()
        );
    let config = dir.path().join("proxy.toml");
    std::fs::write(&config, &text).unwrap();

    let (code, output) = Authorize::start(&config).finish().await;
    assert_eq!(code, Some(0), "{output}");
    assert!(
        output.contains("consent stored in the cluster state"),
        "{output}"
    );
    assert!(!state_path.exists(), "no state file with [cluster]");

    let proxy = ProxyProcess::start(&text, &[], &[]);
    proxy.wait_ready().await;
    assert_eq!(get(proxy.url("/api/invoices")).await.status(), 200);
    assert!(!state_path.exists());
}
