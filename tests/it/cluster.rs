//! Several proxies in front of one instance sharing state in a real
//! `redis-server`: one rate budget, one token request per rotation and per
//! 401 burst, Redis killed and restarted under load, and sealed entries
//! that do not open.

use std::time::{Duration, Instant};

use crate::support::real::Redis;
use crate::support::*;
use coupa_auth_proxy::fake_coupa::FakeCoupa;

/// 32 bytes, base64: a test key.
const KEY: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
const OTHER_KEY: &str = "ZmVkY2JhOTg3NjU0MzIxMGZlZGNiYTk4NzY1NDMyMTA=";

/// The test config plus a `[cluster]` table on `redis`, sealing with `key`.
fn clustered(
    fake: &FakeCoupa,
    redis: &Redis,
    dir: &tempdir::Dir,
    key: &str,
    coupa_extra: &str,
) -> String {
    let key_file = dir.path().join(format!("key-{}", &key[..4]));
    std::fs::write(&key_file, format!("{key}\n")).unwrap();
    config_text(&fake.base_url(), coupa_extra, "")
        + &format!(
            "\n[cluster]\nredis_url = \"{}\"\nkey_prefix = \"test\"\nencryption_key_file = \"{}\"\n",
            redis.url(),
            key_file.display()
        )
}

/// A fake whose user tokens live 3 s (renewed about every 2.5 s), a
/// consent made there and saved in `dir`, and the config of a credential
/// using it with `[cluster]` on `redis`: the fake, the config, the state
/// file and the state.
async fn consented_cluster(
    redis: &Redis,
    dir: &tempdir::Dir,
) -> (
    FakeCoupa,
    String,
    std::path::PathBuf,
    coupa_auth_proxy::token::consent::state_file::GrantState,
) {
    use crate::support::consent::{consent_saved, start_user_fake, user_config};
    let fake = start_user_fake().await;
    fake.state().set_token_lifetime(Duration::from_secs(3));
    let (state_path, consented) = consent_saved(&fake, dir.path()).await;
    let key_file = dir.path().join("key");
    std::fs::write(&key_file, KEY).unwrap();
    let text = user_config(&fake.base_url(), "device_code", &state_path)
        + &format!(
            "\n[cluster]\nredis_url = \"{}\"\nencryption_key_file = \"{}\"\n",
            redis.url(),
            key_file.display()
        );
    (fake, text, state_path, consented)
}

async fn start_proxies(text: &str, n: usize) -> Vec<TestProxy> {
    let mut proxies = Vec::new();
    for _ in 0..n {
        proxies.push(TestProxy::start(parse_config(text)).await);
    }
    for proxy in &proxies {
        proxy.wait_ready().await;
    }
    proxies
}

/// A proxy in this process or as the real binary.
trait Served {
    fn url(&self, target: &str) -> String;
}

impl Served for TestProxy {
    fn url(&self, target: &str) -> String {
        TestProxy::url(self, target)
    }
}

impl Served for ProxyProcess {
    fn url(&self, target: &str) -> String {
        ProxyProcess::url(self, target)
    }
}

/// The bearer each proxy sends now.
async fn tokens_served(proxies: &[impl Served]) -> Vec<String> {
    let mut tokens = Vec::new();
    for proxy in proxies {
        let echo: serde_json::Value = get(proxy.url("/api/invoices")).await.json().await.unwrap();
        tokens.push(echoed_token(&echo));
    }
    tokens
}

async fn all_serve_one_token(proxies: &[impl Served]) -> bool {
    let tokens = tokens_served(proxies).await;
    tokens.iter().all(|t| *t == tokens[0])
}

/// Coupa's limit is per instance: three proxies under concurrent load send
/// no more than burst + rate × time between them, and every request is
/// answered 200 or 429 with `Retry-After` (nothing lost, no 5xx).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_proxies_share_one_rate_budget() {
    let Some(redis) = Redis::start() else { return };
    let fake = start_fake(Duration::from_secs(86_400)).await;
    let dir = tempdir::Dir::new("cluster-budget");
    let text = clustered(
        &fake,
        &redis,
        &dir,
        KEY,
        "[coupa.rate_limit]\nper_second = 10\nburst = 5\nmax_queue = 5",
    );
    let proxies = start_proxies(&text, 3).await;
    let before = fake.state().api_requests();
    let started = Instant::now();
    let run_for = Duration::from_millis(2500);
    let client = http_client();
    let mut tasks = Vec::new();
    for proxy in &proxies {
        for _ in 0..6 {
            let client = client.clone();
            let url = proxy.url("/api/invoices");
            tasks.push(tokio::spawn(async move {
                let mut seen = Vec::new();
                while started.elapsed() < run_for {
                    let response = client.get(&url).send().await.unwrap();
                    let retry_after = response.headers().contains_key("retry-after");
                    seen.push((response.status().as_u16(), retry_after));
                    if response.status() == 429 {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                seen
            }));
        }
    }
    let mut seen = Vec::new();
    for task in tasks {
        seen.extend(task.await.unwrap());
    }
    let elapsed = started.elapsed().as_secs_f64();
    let forwarded = fake.state().api_requests() - before;
    for (status, retry_after) in &seen {
        assert!(
            *status == 200 || (*status == 429 && *retry_after),
            "{status} (retry-after: {retry_after})"
        );
    }
    let ok = seen.iter().filter(|(s, _)| *s == 200).count() as u64;
    assert_eq!(ok, forwarded, "every 200 came from Coupa");
    let bound = 5.0 + 10.0 * elapsed + 2.0;
    assert!(
        (forwarded as f64) <= bound,
        "{forwarded} requests reached Coupa in {elapsed:.2} s; the shared budget allows {bound:.0}"
    );
    assert!(
        seen.iter().any(|(s, _)| *s == 429),
        "the load exceeded the budget"
    );
    for proxy in proxies {
        proxy.stop().await;
    }
}

/// One token request per rotation and per burst of 401s across three
/// processes, all serving the same token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_proxies_fetch_one_token_per_rotation_and_per_401_burst() {
    let Some(redis) = Redis::start() else { return };
    // Renewed at 5/6 of 6 s: a rotation every 5 s.
    let fake = start_fake(Duration::from_secs(6)).await;
    let dir = tempdir::Dir::new("cluster-tokens");
    let text = clustered(&fake, &redis, &dir, KEY, "");
    let proxies: Vec<ProxyProcess> = (0..3)
        .map(|_| ProxyProcess::start(&text, &["--log-level", "info,coupa_auth_proxy=debug"], &[]))
        .collect();
    for proxy in &proxies {
        proxy.wait_ready().await;
    }
    assert_eq!(
        fake.state().token_requests(),
        1,
        "one fetch for a cold start"
    );
    assert!(all_serve_one_token(&proxies).await);
    let first = tokens_served(&proxies).await.remove(0);

    // A rotation: one more request, adopted by the other two.
    eventually("a rotation", || async {
        fake.state().token_requests() >= 2
    })
    .await;
    eventually("every proxy serves the new token", || async {
        let tokens = tokens_served(&proxies).await;
        tokens.iter().all(|t| *t == tokens[0] && *t != first)
    })
    .await;
    assert_eq!(fake.state().token_requests(), 2, "one fetch per rotation");

    // Coupa revokes the token: a burst of 401s on every proxy costs one
    // token request, and every request gets the replay's answer.
    fake.state().revoke_all_tokens();
    let before = fake.state().token_requests();
    let client = http_client();
    let mut burst = Vec::new();
    for (i, proxy) in proxies.iter().enumerate() {
        for _ in 0..8 {
            let request = client.get(proxy.url("/api/invoices")).send();
            burst.push(async move {
                let response = request.await.unwrap();
                (i, response.status(), response.text().await.unwrap())
            });
        }
    }
    for (i, status, body) in futures_util::future::join_all(burst).await {
        assert_eq!(status, 200, "proxy {i}: {body}\n{}", proxies[i].logs());
    }
    assert_eq!(
        fake.state().token_requests(),
        before + 1,
        "one fetch per 401 burst"
    );
    assert!(all_serve_one_token(&proxies).await);
    assert_eq!(fake.state().expired_token_uses(), 0);
}

/// Redis killed under load: no request fails (each process falls back to
/// its own token and a share of the budget) and the status says since when
/// the state is unavailable; restarted, the processes share again without
/// a restart of their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_fails_no_request_and_sharing_resumes_after() {
    let Some(mut redis) = Redis::start() else {
        return;
    };
    let fake = start_fake(Duration::from_secs(86_400)).await;
    let dir = tempdir::Dir::new("cluster-outage");
    let text = clustered(
        &fake,
        &redis,
        &dir,
        KEY,
        "[coupa.rate_limit]\nper_second = 500\nburst = 100\nmax_queue = 100",
    );
    let proxies = start_proxies(&text, 2).await;
    let client = http_client();
    let urls: Vec<String> = proxies.iter().map(|p| p.url("/api/invoices")).collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (client, stop) = (client.clone(), stop.clone());
        tokio::spawn(async move {
            let mut statuses = Vec::new();
            for i in 0.. {
                if stop.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                let response = client.get(&urls[i % urls.len()]).send().await.unwrap();
                statuses.push(response.status().as_u16());
            }
            statuses
        })
    };
    eventually("load under way", || async {
        fake.state().api_requests() >= 30
    })
    .await;
    let view = proxies[0].status_json().await;
    assert_eq!(view["cluster"]["redis"], "available", "{view}");
    assert_eq!(
        view["cluster"]["processes_seen"].as_array().map(Vec::len),
        Some(2),
        "both processes are in the cluster view: {view}"
    );
    redis.kill();
    let at_kill = fake.state().api_requests();
    eventually("requests keep flowing without Redis", || async {
        fake.state().api_requests() >= at_kill + 150
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let statuses = load.await.unwrap();
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let status = proxies[0].status_json().await;
    assert!(
        status["cluster"]["redis"]
            .as_str()
            .unwrap()
            .starts_with("cluster state unavailable since"),
        "{status}"
    );
    let metrics = get(proxies[0].admin_url("/metrics"))
        .await
        .text()
        .await
        .unwrap();
    assert_eq!(metric(&metrics, "coupa_proxy_cluster_up", &[]), 0.0);
    assert_eq!(
        get(proxies[0].admin_url("/readyz")).await.status(),
        200,
        "ready while a valid token is held"
    );

    redis.restart();
    for proxy in &proxies {
        eventually("the process rejoins", || async {
            let text = get(proxy.admin_url("/metrics")).await.text().await.unwrap();
            metric(&text, "coupa_proxy_cluster_up", &[]) == 1.0
        })
        .await;
    }
    // Sharing again: a 401 burst across both costs one token request.
    fake.state().revoke_all_tokens();
    let before = fake.state().token_requests();
    let mut burst = Vec::new();
    for proxy in &proxies {
        for _ in 0..4 {
            let request = client.get(proxy.url("/api/invoices")).send();
            burst.push(async move { request.await.unwrap().status() });
        }
    }
    for status in futures_util::future::join_all(burst).await {
        assert_eq!(status, 200);
    }
    assert_eq!(fake.state().token_requests(), before + 1);
    for proxy in proxies {
        proxy.stop().await;
    }
}

/// A token sealed with another deployment's key, or a corrupted entry, is
/// an error that names the cause and never the token; the process fetches
/// its own and keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_that_do_not_open_are_refused_clearly() {
    let Some(redis) = Redis::start() else { return };
    let fake = start_fake(Duration::from_secs(86_400)).await;
    let dir = tempdir::Dir::new("cluster-keys");
    let first = start_proxies(&clustered(&fake, &redis, &dir, KEY, ""), 1).await;
    assert_eq!(fake.state().token_requests(), 1);
    let shared = tokens_served(&first).await.remove(0);

    let other = ProxyProcess::start(&clustered(&fake, &redis, &dir, OTHER_KEY, ""), &[], &[]);
    other.wait_ready().await;
    let logs = other.logs();
    assert!(logs.contains("cannot be opened"), "{logs}");
    assert!(logs.contains("encryption_key_file"), "{logs}");
    assert!(!logs.contains(&shared), "the token is never logged");
    assert_eq!(fake.state().token_requests(), 2, "it fetched its own");
    assert_eq!(get(other.url("/api/invoices")).await.status(), 200);

    // A corrupted entry: the same clear refusal, no crash.
    let keys = redis.command(&["KEYS", "test:*:token:*"]);
    let key = keys
        .lines()
        .find(|l| l.starts_with("test:"))
        .expect("the token entry exists")
        .to_owned();
    redis.command(&["SET", &key, "not-a-sealed-entry"]);
    let before = fake.state().token_requests();
    let third = ProxyProcess::start(&clustered(&fake, &redis, &dir, KEY, ""), &[], &[]);
    third.wait_ready().await;
    let logs = third.logs();
    assert!(
        logs.contains("cannot be opened"),
        "the right key read the corrupted entry and refused it: {logs}"
    );
    assert!(!logs.contains("not-a-sealed-entry"), "{logs}");
    assert_eq!(
        fake.state().token_requests(),
        before + 1,
        "it fetched its own"
    );
    assert_eq!(get(third.url("/api/invoices")).await.status(), 200);
    assert_eq!(get(first[0].url("/api/invoices")).await.status(), 200);
    for proxy in first {
        proxy.stop().await;
    }
}

/// A user-consented credential shared by two processes: the state file is
/// imported once, then every refresh happens under the lock with the
/// rotated refresh token written to Redis first. Across several rotations
/// of short-lived tokens neither process meets `invalid_grant` and both
/// keep serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_proxies_share_one_consent_across_rotations() {
    use coupa_auth_proxy::token::consent::state_file;

    let Some(redis) = Redis::start() else { return };
    let dir = tempdir::Dir::new("cluster-consent");
    let (fake, text, state_path, consented) = consented_cluster(&redis, &dir).await;
    let proxies: Vec<ProxyProcess> = (0..2)
        .map(|_| ProxyProcess::start(&text, &[], &[]))
        .collect();
    for proxy in &proxies {
        proxy.wait_ready().await;
    }
    let grants_before = fake.state().refresh_grants();
    eventually("four rotations", || async {
        fake.state().refresh_grants() >= grants_before + 4
    })
    .await;
    for proxy in &proxies {
        for _ in 0..3 {
            assert_eq!(get(proxy.url("/api/invoices")).await.status(), 200);
        }
        let logs = proxy.logs();
        assert!(!logs.contains("invalid_grant"), "{logs}");
        assert!(
            !logs.contains(consented.refresh_token.expose()),
            "no refresh token in logs"
        );
    }
    assert!(
        !fake
            .state()
            .refresh_token_is_live(consented.refresh_token.expose()),
        "the imported refresh token was rotated away"
    );
    assert_eq!(
        state_file::load(&state_path).unwrap().refresh_token,
        consented.refresh_token,
        "with [cluster] the state file is only the import source"
    );
}

/// Coupa's own 429 (with `Retry-After: 7`) seen by one proxy makes every
/// proxy hold off: the other one answers 429 itself, with `Retry-After`,
/// and sends nothing to Coupa meanwhile. (Re-sends are off here, so the
/// one 429 is the one pause.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coupas_429_makes_every_proxy_hold_off() {
    let Some(redis) = Redis::start() else { return };
    let fake = start_fake(Duration::from_secs(86_400)).await;
    let dir = tempdir::Dir::new("cluster-pause");
    let text = clustered(
        &fake,
        &redis,
        &dir,
        KEY,
        "resend_429_within = \"0s\"\n[coupa.rate_limit]\nper_second = 100\nburst = 10\nmax_queue = 100",
    );
    let proxies = start_proxies(&text, 2).await;
    let response = get(proxies[0].url("/api/_status?code=429")).await;
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "7");

    let reached_coupa = fake.state().api_requests();
    eventually("the other proxy holds off", || async {
        let response = get(proxies[1].url("/api/invoices")).await;
        let ours = response.status() == 429
            && response.headers().contains_key("retry-after")
            && response.text().await.unwrap().contains("coupa-auth-proxy");
        ours
    })
    .await;
    let metrics = get(proxies[0].admin_url("/metrics"))
        .await
        .text()
        .await
        .unwrap();
    assert_eq!(
        metric(&metrics, "coupa_proxy_cluster_budget_pauses_total", &[]),
        1.0
    );
    let held_off = get(proxies[1].url("/api/invoices")).await;
    assert_eq!(held_off.status(), 429);
    assert!(
        fake.state().api_requests() <= reached_coupa + 1,
        "requests held off did not reach Coupa"
    );
    for proxy in proxies {
        proxy.stop().await;
    }
}

/// A tool's local token from one proxy is honoured by the others: it is
/// kept (sealed, by its digest) in the shared state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_token_issued_by_one_proxy_serves_at_the_others() {
    let Some(redis) = Redis::start() else { return };
    let fake = start_fake(Duration::from_secs(86_400)).await;
    let dir = tempdir::Dir::new("cluster-local-token");
    let secret = "local-secret-shared-by-tool-and-proxy";
    let text = clustered(&fake, &redis, &dir, KEY, "")
        + &format!(
            "\n[[integration]]\nname = \"postman\"\noauth_client_id = \"postman\"\noauth_client_secret_sha256 = \"{}\"\n",
            coupa_auth_proxy::proxy::auth::hash_key(secret)
        );
    let proxies = start_proxies(&text, 2).await;
    let answer: serde_json::Value = http_client()
        .post(proxies[0].url("/oauth2/token"))
        .basic_auth("postman", Some(secret))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = answer["access_token"].as_str().unwrap().to_owned();
    for proxy in &proxies {
        let response = http_client()
            .get(proxy.url("/api/invoices"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let echo: serde_json::Value = response.json().await.unwrap();
        assert!(fake.state().token_is_live(&echoed_token(&echo)));
    }
    // Redis holds the token's digest, never the token.
    let reply = redis.command(&["KEYS", "test:*:local_token:*"]);
    let keys: Vec<&str> = reply
        .lines()
        .filter(|l| !l.starts_with('*') && !l.starts_with('$'))
        .collect();
    assert_eq!(keys.len(), 1, "{reply}");
    assert!(!keys[0].contains(&token));
    let stored = redis.command(&["GET", keys[0]]);
    assert!(
        !stored.contains(&token) && !stored.contains("postman"),
        "sealed: {stored}"
    );
    for proxy in proxies {
        proxy.stop().await;
    }
}

/// A failover to a replica that had not received the last write brings
/// back an older consent: its refresh token is already dead at Coupa. The
/// process holding the newer one notices on its next read, writes its own
/// back, and refreshes with it: no `invalid_grant`, no new consent needed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consent_write_lost_by_redis_is_written_back_not_refreshed_from() {
    let Some(redis) = Redis::start() else { return };
    let dir = tempdir::Dir::new("cluster-lost-consent");
    let (fake, text, _, _) = consented_cluster(&redis, &dir).await;
    let proxy = ProxyProcess::start(&text, &[], &[]);
    proxy.wait_ready().await;
    let mut connection = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let consent_key = || {
        let mut connection = connection.clone();
        async move {
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg("*:consent:*")
                .query_async(&mut connection)
                .await
                .unwrap();
            assert_eq!(keys.len(), 1, "{keys:?}");
            keys[0].clone()
        }
    };
    let key = consent_key().await;
    let stored = || {
        let (mut connection, key) = (connection.clone(), key.clone());
        async move {
            redis::cmd("GET")
                .arg(&key)
                .query_async::<String>(&mut connection)
                .await
                .unwrap()
        }
    };
    // Coupa rotates first, the proxy writes after: a rotation counts once
    // its state is in Redis.
    let fake = &fake;
    let stored = &stored;
    let rotated_from = |before: String| async move {
        let grants = fake.state().refresh_grants();
        eventually("a rotation", || async {
            fake.state().refresh_grants() > grants
        })
        .await;
        eventually("its state written", || async { stored().await != before }).await;
        stored().await
    };

    // A rotation; what Redis holds then is the state a lagging replica has.
    let stale = rotated_from(stored().await).await;
    // The next rotation's write is the one the failover loses.
    rotated_from(stale.clone()).await;
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg(&stale)
        .query_async(&mut connection)
        .await
        .unwrap();

    let grants = fake.state().refresh_grants();
    eventually("two more rotations", || async {
        fake.state().refresh_grants() >= grants + 2
    })
    .await;
    assert_eq!(get(proxy.url("/api/invoices")).await.status(), 200);
    let logs = proxy.logs();
    assert!(!logs.contains("invalid_grant"), "{logs}");
    assert!(logs.contains("writing ours back"), "{logs}");
    let now: String = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut connection)
        .await
        .unwrap();
    assert_ne!(now, stale, "Redis holds the live consent again");
}

/// Fairness across processes: a flood through one proxy does not hold up
/// another integration's calls through the other, though both share one
/// budget — each process keeps at most one reservation in it at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_through_one_proxy_does_not_delay_calls_through_another() {
    use coupa_auth_proxy::proxy::auth::hash_key;
    let Some(redis) = Redis::start() else { return };
    let fake = start_fake(Duration::from_secs(86_400)).await;
    let dir = tempdir::Dir::new("cluster-fair");
    let text = clustered(
        &fake,
        &redis,
        &dir,
        KEY,
        "[coupa.rate_limit]\nper_second = 10\nburst = 1\nmax_queue = 100",
    ) + &format!(
        "\n[[integration]]\nname = \"batch\"\napi_key_sha256 = \"{}\"\nmax_concurrent = 100\n\
         \n[[integration]]\nname = \"approvals\"\napi_key_sha256 = \"{}\"\n",
        hash_key("batch-key-0123456789abcdef0123456789"),
        hash_key("approvals-key-0123456789abcdef012345"),
    );
    let proxies = start_proxies(&text, 2).await;
    let client = http_client();
    let call = |proxy: &TestProxy, key: &'static str| {
        let (client, url) = (client.clone(), proxy.url("/api/invoices"));
        async move {
            client
                .get(url)
                .header("X-COUPA-API-KEY", key)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    // Four seconds of the shared budget, queued in the first proxy.
    let flood: Vec<_> = (0..40)
        .map(|_| tokio::spawn(call(&proxies[0], "batch-key-0123456789abcdef0123456789")))
        .collect();
    wait_queued(&proxies[0].admin_url("/metrics"), "batch", 20.0).await;
    let mut waits = Vec::new();
    for _ in 0..5 {
        let asked = Instant::now();
        let status = call(&proxies[1], "approvals-key-0123456789abcdef012345").await;
        assert_eq!(status, 200);
        waits.push(asked.elapsed());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let worst = *waits.iter().max().unwrap();
    eprintln!("calls through the other proxy while the flood queued: {waits:?}");
    assert!(
        worst < Duration::from_secs(1),
        "calls through the other proxy waited {worst:?} behind the flood ({waits:?})"
    );
    for call in flood {
        assert_eq!(call.await.unwrap(), 200);
    }
    for proxy in proxies {
        proxy.stop().await;
    }
}
