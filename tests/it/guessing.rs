//! Guessing slowed per source, against the real binary: wrong legacy keys
//! and wrong local client secrets sent as fast as a client can from one
//! address are answered within the budget at once, then one at a time at
//! a doubling pace, while a valid credential from the same address (and
//! from another) is answered at once throughout; 20,000 addresses failing
//! once each leave the proxy's table at its bound.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use coupa_auth_proxy::guesses::{BUDGET, CAPACITY};
use coupa_auth_proxy::proxy::auth::hash_key;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

const DAY: Duration = Duration::from_secs(86_400);
const ERP_KEY: &str = "erp-legacy-key-4f1e2d3c4b5a69788796a5b4c3d2e1f0";
const LOCAL_ID: &str = "snaplogic";
const LOCAL_SECRET: &str = "people-chose-this-one";
/// Attackers sending at once; each waits for its answer and sends again.
const ATTACKERS: usize = 30;
/// The window failed answers are counted in: within it the schedule
/// releases the budget at once, then at 0.25 s, 0.75 s, 1.75 s and 3.75 s.
const WINDOW: Duration = Duration::from_secs(5);
const RELEASED_IN_WINDOW: usize = 4;

fn config(base_url: &str) -> String {
    config_text(base_url, "", "")
        + &format!(
            "\n[[integration]]\nname = \"erp\"\napi_key_sha256 = \"{}\"\n\n\
             [[integration]]\nname = \"snaplogic-flows\"\noauth_client_id = \"{LOCAL_ID}\"\noauth_client_secret_sha256 = \"{}\"\n",
            hash_key(ERP_KEY),
            hash_key(LOCAL_SECRET),
        )
}

fn client_from(source: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .local_address(source.parse::<IpAddr>().unwrap())
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

/// A request with a legacy key, or a local token request with a secret.
#[derive(Clone, Copy)]
enum Attempt {
    LegacyKey,
    LocalSecret,
}

impl Attempt {
    fn send(
        self,
        client: &reqwest::Client,
        proxy: SocketAddr,
        secret: &str,
    ) -> reqwest::RequestBuilder {
        match self {
            Attempt::LegacyKey => client
                .get(format!("http://{proxy}/api/invoices"))
                .header("X-COUPA-API-KEY", secret),
            Attempt::LocalSecret => client.post(format!("http://{proxy}/oauth2/token")).form(&[
                ("grant_type", "client_credentials"),
                ("client_id", LOCAL_ID),
                ("client_secret", secret),
            ]),
        }
    }

    fn valid(self) -> &'static str {
        match self {
            Attempt::LegacyKey => ERP_KEY,
            Attempt::LocalSecret => LOCAL_SECRET,
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Attempt::LegacyKey => "legacy_key",
            Attempt::LocalSecret => "local_client_secret",
        }
    }
}

/// The attack from 127.0.0.1 and, while its answers are held, a valid
/// credential from 127.0.0.1 and from 127.0.0.2.
async fn guessing_is_slowed_and_valid_credentials_are_not(attempt: Attempt) {
    let fake = start_fake(DAY).await;
    let proxy = ProxyProcess::start(&config(&fake.base_url()), &[], &[]);
    proxy.wait_ready().await;
    let addr = proxy.addr;
    let failed_at: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let started = Instant::now();
    let attackers: Vec<_> = (0..ATTACKERS)
        .map(|worker| {
            let failed_at = failed_at.clone();
            let client = client_from("127.0.0.1");
            tokio::spawn(async move {
                for n in 0.. {
                    let guess = format!("guess-{worker}-{n}");
                    let Ok(answer) = attempt.send(&client, addr, &guess).send().await else {
                        continue;
                    };
                    assert_eq!(answer.status(), 401, "a wrong credential");
                    failed_at.lock().unwrap().push(started.elapsed());
                }
            })
        })
        .collect();
    let answered = || failed_at.lock().unwrap().len();
    eventually("the budget is answered at once", || async {
        answered() >= BUDGET as usize
    })
    .await;

    // The attacker's answers are now queued far beyond a minute; a valid
    // credential from its own address and from another is not among them.
    for source in ["127.0.0.1", "127.0.0.2"] {
        let sent = Instant::now();
        let answer = attempt
            .send(&client_from(source), addr, attempt.valid())
            .send()
            .await
            .unwrap();
        let took = sent.elapsed();
        assert_eq!(answer.status(), 200, "the valid credential from {source}");
        assert!(
            took < Duration::from_secs(3),
            "the valid credential from {source} waited {took:?}, as if it were a guess"
        );
    }

    tokio::time::sleep(WINDOW.saturating_sub(started.elapsed())).await;
    let in_window = failed_at
        .lock()
        .unwrap()
        .iter()
        .filter(|at| **at <= WINDOW)
        .count();
    assert!(
        in_window <= BUDGET as usize + RELEASED_IN_WINDOW,
        "{in_window} failed answers in the first {WINDOW:?} from one source"
    );
    for attacker in attackers {
        attacker.abort();
    }
    let metrics = scrape(&format!("http://{}/metrics", proxy.admin)).await;
    let kind = [("kind", attempt.kind())];
    let failed = metric(&metrics, "coupa_proxy_failed_credentials_total", &kind);
    let delayed = metric(
        &metrics,
        "coupa_proxy_failed_credentials_delayed_total",
        &kind,
    );
    assert!(failed >= (ATTACKERS + BUDGET as usize) as f64, "{failed}");
    assert_eq!(
        failed - delayed,
        f64::from(BUDGET),
        "all past the budget are delayed"
    );

    let logs = proxy.logs();
    assert_eq!(
        logs.matches("passed their budget").count(),
        1,
        "the source is named once, not per guess: {logs}"
    );
    assert!(
        !logs.contains("request not forwarded"),
        "a failed credential is the access line's reason, not a warning"
    );
    assert!(!logs.contains(attempt.valid()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_legacy_keys_are_answered_late_and_valid_keys_never() {
    guessing_is_slowed_and_valid_credentials_are_not(Attempt::LegacyKey).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_local_client_secrets_are_answered_late_and_valid_secrets_never() {
    guessing_is_slowed_and_valid_credentials_are_not(Attempt::LocalSecret).await;
}

/// 20,000 addresses in 127.0.0.0/8, each failing once (within its own
/// budget: answered at once): every failure is counted and the table
/// stays at its bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_sources_leave_the_table_at_its_bound() {
    const SOURCES: u32 = 20_000;
    let fake = start_fake(DAY).await;
    let proxy = ProxyProcess::start(&config(&fake.base_url()), &[], &[]);
    proxy.wait_ready().await;
    let addr = proxy.addr;
    let next = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let workers: Vec<_> = (0..32)
        .map(|_| {
            let next = next.clone();
            tokio::spawn(async move {
                loop {
                    let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if n >= SOURCES {
                        return;
                    }
                    // 127.1.0.0 onwards: one address each.
                    let source = std::net::Ipv4Addr::from(0x7f01_0000 + n);
                    let socket = tokio::net::TcpSocket::new_v4().unwrap();
                    socket.bind(SocketAddr::new(source.into(), 0)).unwrap();
                    let mut stream = socket.connect(addr).await.unwrap();
                    stream
                        .write_all(
                            b"GET /api/invoices HTTP/1.1\r\nHost: coupa\r\n\
                              X-COUPA-API-KEY: wrong\r\nConnection: close\r\n\r\n",
                        )
                        .await
                        .unwrap();
                    let mut answer = Vec::new();
                    stream.read_to_end(&mut answer).await.unwrap();
                    assert!(answer.starts_with(b"HTTP/1.1 401"), "{source}");
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.unwrap();
    }
    let metrics = scrape(&format!("http://{}/metrics", proxy.admin)).await;
    assert_eq!(
        metric(
            &metrics,
            "coupa_proxy_failed_credentials_total",
            &[("kind", "legacy_key")]
        ),
        f64::from(SOURCES)
    );
    assert_eq!(
        metric(
            &metrics,
            "coupa_proxy_refused_requests_total",
            &[("reason", "unknown_api_key")]
        ),
        f64::from(SOURCES)
    );
    // The flood costs one access line a request, nothing more (the README
    // states the figure: about 410 bytes of JSON a line).
    let logs = proxy.logs();
    let lines = logs
        .lines()
        .filter(|l| l.contains("unknown_api_key"))
        .count();
    assert_eq!(lines, SOURCES as usize, "one line each");
    eprintln!("{} bytes of log for {SOURCES} refused requests", logs.len());
    assert!(
        logs.len() < SOURCES as usize * 450,
        "{} bytes of log for {SOURCES} refused requests",
        logs.len()
    );
    assert_eq!(
        metric(&metrics, "coupa_proxy_failed_credential_sources", &[]),
        CAPACITY as f64
    );
}
