//! Restarts, upgrades and rollouts lose no call: requests wait for the
//! first token instead of 503; the listening sockets outlive the process
//! (handed over as systemd does, by Debian's `systemd-socket-activate`,
//! and to the new binary on `SIGUSR2`); `sd_notify` tells readiness; a
//! drain delay keeps accepting while load balancers catch up. Each path
//! runs under four connection-per-call and four keep-alive clients sending
//! GETs and POSTs: no call fails, none gets 503, and Coupa sees each
//! request once.

use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use coupa_auth_proxy::fake_coupa::{FakeCoupa, TokenFailure};

use crate::support::real::tool;
use crate::support::*;

const DAY: Duration = Duration::from_secs(86_400);

/// What the clients saw.
#[derive(Debug, Default)]
struct Tally {
    ok: AtomicU64,
    failed: std::sync::Mutex<Vec<String>>,
}

/// Four connection-per-call and four keep-alive clients calling `addr`,
/// GET and POST in turn, until `stop`.
fn start_load(
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
) -> (Arc<Tally>, Vec<tokio::task::JoinHandle<()>>) {
    let tally = Arc::new(Tally::default());
    let fresh = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let kept = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let tasks = (0..8)
        .map(|worker| {
            let client = if worker < 4 {
                fresh.clone()
            } else {
                kept.clone()
            };
            let (tally, stop) = (tally.clone(), stop.clone());
            tokio::spawn(async move {
                let mut call = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    call += 1;
                    let url = format!("http://{addr}/api/invoices?w={worker}&c={call}");
                    let request = if call % 2 == 0 {
                        client
                            .post(&url)
                            .body(format!("{{\"w\":{worker},\"c\":{call}}}"))
                    } else {
                        client.get(&url)
                    };
                    match request.send().await {
                        Ok(r) if r.status() == 200 => {
                            let _ = r.bytes().await;
                            tally.ok.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(r) => {
                            let status = r.status();
                            let body = r.text().await.unwrap_or_default();
                            tally
                                .failed
                                .lock()
                                .unwrap()
                                .push(format!("{status} {body}"));
                        }
                        Err(e) => tally.failed.lock().unwrap().push(format!("{e:?}")),
                    }
                }
            })
        })
        .collect();
    (tally, tasks)
}

/// Waits until the clients got `more` answers beyond what they had.
async fn wait_for_calls(tally: &Tally, more: u64) {
    let target = tally.ok.load(Ordering::SeqCst) + more;
    eventually("the clients are served", || async {
        tally.ok.load(Ordering::SeqCst) >= target
    })
    .await;
}

/// Stops the load and checks it: nothing failed, and every answered call
/// reached Coupa exactly once.
async fn finish(
    fake: &FakeCoupa,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
) {
    stop.store(true, Ordering::SeqCst);
    for task in tasks {
        task.await.unwrap();
    }
    let failed = tally.failed.lock().unwrap().clone();
    let ok = tally.ok.load(Ordering::SeqCst);
    assert!(
        failed.is_empty(),
        "{} of {} calls failed: {failed:?}",
        failed.len(),
        ok + failed.len() as u64
    );
    assert!(ok >= 100, "only {ok} calls made");
    eprintln!("{ok} calls answered 200, {} failed", failed.len());
    assert_eq!(fake.state().api_requests(), ok, "Coupa saw each call once");
}

/// A token is used as soon as it arrives, as in the measurement.
fn no_activation_delay(text: &str) -> String {
    text.replace("activation_delay = \"100ms\"", "activation_delay = \"0s\"")
}

fn config(fake: &FakeCoupa, listen_extra: &str) -> String {
    no_activation_delay(&config_text(&fake.base_url(), "", "")).replace(
        "shutdown_grace = \"10s\"",
        &format!("shutdown_grace = \"10s\"\n{listen_extra}"),
    )
}

/// Sockets a supervisor holds across the proxy's restarts.
struct HeldSockets {
    proxy: std::net::TcpListener,
    admin: std::net::TcpListener,
}

impl HeldSockets {
    fn bind() -> Self {
        Self {
            proxy: std::net::TcpListener::bind("127.0.0.1:0").unwrap(),
            admin: std::net::TcpListener::bind("127.0.0.1:0").unwrap(),
        }
    }

    fn handed(&self) -> Vec<(OwnedFd, &'static str)> {
        vec![
            (self.proxy.as_fd().try_clone_to_owned().unwrap(), "proxy"),
            (self.admin.as_fd().try_clone_to_owned().unwrap(), "admin"),
        ]
    }

    fn addr(&self) -> SocketAddr {
        self.proxy.local_addr().unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_at_a_cold_start_wait_for_the_first_token_instead_of_503() {
    let fake = start_fake(DAY).await;
    fake.state().set_token_delay(Duration::from_secs(2));
    let text = no_activation_delay(&config_text(&fake.base_url(), "", ""));
    let proxy = TestProxy::start(parse_config(&text)).await;
    let client = http_client();
    let calls: Vec<_> = (0..8)
        .map(|i| {
            let (client, url) = (client.clone(), proxy.url(&format!("/api/invoices?i={i}")));
            tokio::spawn(async move { client.get(url).send().await.unwrap().status() })
        })
        .collect();
    for call in calls {
        assert_eq!(call.await.unwrap(), 200, "waited for the token");
    }
    assert_eq!(fake.state().token_requests(), 1);
    assert_eq!(fake.state().api_requests(), 8);
    proxy.stop().await;

    // Past the bound: the 503 with its reason, nothing forwarded.
    let fake = start_fake(DAY).await;
    fake.state()
        .set_token_failure(Some(TokenFailure::ServerError));
    let text = config_text(&fake.base_url(), "token_wait_timeout = \"300ms\"", "");
    let proxy = TestProxy::start(parse_config(&text)).await;
    let answer = client.get(proxy.url("/api/invoices")).send().await.unwrap();
    assert_eq!(answer.status(), 503);
    let body: serde_json::Value = answer.json().await.unwrap();
    assert_eq!(body["error"], "no_token");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("the last token request failed"),
        "{body}"
    );
    assert_eq!(fake.state().api_requests(), 0);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_on_sockets_handed_over_as_systemd_does_loses_no_call() {
    let fake = start_fake(DAY).await;
    let sockets = HeldSockets::bind();
    let text = config(&fake, "");
    let mut first = ProxyProcess::start_handing(&text, &[], &[], sockets.handed());
    assert_eq!(first.addr, sockets.addr(), "the handed socket is served");
    first.wait_ready().await;
    let stop = Arc::new(AtomicBool::new(false));
    let (tally, tasks) = start_load(sockets.addr(), stop.clone());
    wait_for_calls(&tally, 40).await;

    first.terminate();
    let second = ProxyProcess::start_handing(&text, &[], &[], sockets.handed());
    assert_eq!(first.wait_exit().await, Some(0));
    second.wait_ready().await;
    wait_for_calls(&tally, 60).await;
    finish(&fake, stop, tally, tasks).await;
    assert!(second.logs().contains("listening on a socket handed over"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_socket_activate_starts_the_proxy_on_its_socket() {
    let Some(activate) = tool("systemd-socket-activate") else {
        return;
    };
    let fake = start_fake(DAY).await;
    let port = crate::support::real::free_port();
    let listen = format!("127.0.0.1:{port}");
    let binary = binary().display().to_string();
    // systemd-socket-activate starts the program at the first connection:
    // that call waits in the backlog, then for the first token.
    let first_call = {
        let listen = listen.clone();
        std::thread::spawn(move || {
            use std::io::{Read, Write};
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            let mut stream = loop {
                match std::net::TcpStream::connect(&listen) {
                    Ok(stream) => break stream,
                    Err(e) if std::time::Instant::now() > deadline => panic!("{e}"),
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            };
            stream
                .write_all(b"GET /api/invoices HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
                .unwrap();
            let mut answer = String::new();
            let _ = stream.read_to_string(&mut answer);
            answer
        })
    };
    let proxy = ProxyProcess::start_program(
        &activate,
        // It passes on only the variables named with -E.
        &[
            "-l",
            &listen,
            "--fdname=proxy",
            "-E",
            "TEST_CLIENT_SECRET",
            &binary,
        ],
        &config(&fake, ""),
        &[],
        &[],
        Vec::new(),
    );
    assert_eq!(proxy.addr.to_string(), listen);
    let first = tokio::task::spawn_blocking(move || first_call.join().unwrap())
        .await
        .unwrap();
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    proxy.wait_ready().await;
    let answer = get(proxy.url("/api/invoices")).await;
    assert_eq!(answer.status(), 200);
    // systemd-socket-activate sets LISTEN_PID to the proxy's own pid.
    assert!(proxy.logs().contains("listening on a socket handed over"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_socket_name_is_a_clear_start_up_error() {
    let sockets = HeldSockets::bind();
    let fake = start_fake(DAY).await;
    let dir = tempdir::Dir::new("badname");
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, config(&fake, "")).unwrap();
    let output = tokio::task::spawn_blocking(move || {
        use command_fds::{CommandFdExt, FdMapping};
        let mut command = std::process::Command::new(binary());
        command
            .args(["run", "--config", path.to_str().unwrap()])
            .env("TEST_CLIENT_SECRET", "x")
            .env("LISTEN_FDS", "1")
            .env("LISTEN_PID", "")
            .env("LISTEN_FDNAMES", "metrics");
        command
            .fd_mappings(vec![FdMapping {
                parent_fd: sockets.proxy.as_fd().try_clone_to_owned().unwrap(),
                child_fd: 3,
            }])
            .unwrap();
        command.output().unwrap()
    })
    .await
    .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("\"metrics\"") && stderr.contains("FileDescriptorName"),
        "{stderr}"
    );
}

/// The datagrams a process sent to `NOTIFY_SOCKET`, in order.
struct NotifySocket {
    socket: tokio::net::UnixDatagram,
    path: std::path::PathBuf,
    _dir: tempdir::Dir,
}

impl NotifySocket {
    fn bind() -> Self {
        let dir = tempdir::Dir::new("notify");
        let path = dir.path().join("notify.sock");
        let socket = tokio::net::UnixDatagram::bind(&path).unwrap();
        Self {
            socket,
            path,
            _dir: dir,
        }
    }

    /// The next message that holds `state` (`READY=1`, …), with every
    /// state it carried; `STATUS=`-only messages are skipped.
    async fn next_with(&self, state: &str) -> Vec<String> {
        let mut buf = [0u8; 4096];
        loop {
            let n = tokio::time::timeout(Duration::from_secs(20), self.socket.recv(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("no {state} within 20 s"))
                .unwrap();
            let lines: Vec<String> = String::from_utf8_lossy(&buf[..n])
                .lines()
                .map(str::to_owned)
                .collect();
            if lines.iter().any(|l| l == state) {
                return lines;
            }
            assert!(
                lines
                    .iter()
                    .all(|l| l.starts_with("STATUS=") || l == "WATCHDOG=1"),
                "{lines:?} came before {state}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sd_notify_says_ready_after_the_first_token_reloading_and_stopping() {
    let fake = start_fake(DAY).await;
    fake.state().set_token_delay(Duration::from_millis(500));
    let notify = NotifySocket::bind();
    let path = notify.path.display().to_string();
    let mut proxy = ProxyProcess::start(&config(&fake, ""), &[], &[("NOTIFY_SOCKET", &path)]);
    let ready = notify.next_with("READY=1").await;
    assert!(
        fake.state().tokens_issued() >= 1,
        "READY only after the first token"
    );
    assert!(
        ready
            .iter()
            .any(|l| l.starts_with("STATUS=tokens held 1 of 1")),
        "{ready:?}"
    );

    proxy.hangup();
    let reloading = notify.next_with("RELOADING=1").await;
    assert!(
        reloading.iter().any(|l| l.starts_with("MONOTONIC_USEC=")),
        "{reloading:?}"
    );
    notify.next_with("READY=1").await;

    proxy.terminate();
    notify.next_with("STOPPING=1").await;
    assert_eq!(proxy.wait_exit().await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_delay_keeps_serving_while_readyz_says_draining() {
    let fake = start_fake(DAY).await;
    let mut proxy = ProxyProcess::start(&config(&fake, "drain_delay = \"2s\""), &[], &[]);
    proxy.wait_ready().await;
    let stop = Arc::new(AtomicBool::new(false));
    let (tally, tasks) = start_load(proxy.addr, stop.clone());
    wait_for_calls(&tally, 40).await;
    proxy.terminate();
    let readyz = format!("http://{}/readyz", proxy.admin);
    eventually("/readyz says draining", || async {
        matches!(http_client().get(&readyz).send().await, Ok(r) if r.status() == 503)
    })
    .await;
    // Still accepting: new connections are served during the delay.
    let served_while_draining = tally.ok.load(Ordering::SeqCst);
    wait_for_calls(&tally, 20).await;
    assert!(
        !proxy.logs().contains("all in-flight requests finished"),
        "the drain had not begun"
    );
    let ok_before_stop = tally.ok.load(Ordering::SeqCst);
    assert!(ok_before_stop > served_while_draining);
    stop.store(true, Ordering::SeqCst);
    for task in tasks {
        task.await.unwrap();
    }
    let failed = tally.failed.lock().unwrap().clone();
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(proxy.wait_exit().await, Some(0));
}

/// The pids the binaries writing `logs` logged at start, in order.
fn started_pids(logs: &str) -> Vec<u64> {
    logs.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == "coupa-auth-proxy started")
        .filter_map(|v| v["pid"].as_u64())
        .collect()
}

/// Whether `pid` runs (a zombie whose parent has gone does not).
fn running(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let (_, after_name) = stat.rsplit_once(')')?;
            after_name
                .split_whitespace()
                .next()
                .map(|state| state != "Z")
        })
        .unwrap_or(false)
}

/// Processes the test started without being their parent (the upgraded
/// ones), stopped when the test ends, failed or not.
#[derive(Default)]
struct Orphans(Vec<u64>);

impl Drop for Orphans {
    fn drop(&mut self) {
        for pid in self.0.iter().filter(|pid| running(**pid)) {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr2_upgrades_in_place_twice_and_a_failed_upgrade_keeps_the_old_process() {
    let fake = start_fake(DAY).await;
    let dir = tempdir::Dir::new("upgrade");
    let installed = dir.path().join("coupa-auth-proxy");
    std::fs::copy(binary(), &installed).unwrap();
    let old =
        ProxyProcess::start_program(&installed, &[], &config(&fake, ""), &[], &[], Vec::new());
    old.wait_ready().await;
    let stop = Arc::new(AtomicBool::new(false));
    let (tally, tasks) = start_load(old.addr, stop.clone());
    wait_for_calls(&tally, 40).await;

    // A new build in place of the old file (a copy is enough).
    std::fs::remove_file(&installed).unwrap();
    std::fs::copy(binary(), &installed).unwrap();
    old.signal("-USR2");
    let old_pid = u64::from(old.child.id());
    eventually(
        "the old process exits once the new one is ready",
        || async move { !running(old_pid) },
    )
    .await;
    let pids = started_pids(&old.logs());
    assert_eq!(pids.len(), 2, "{}", old.logs());
    let new_pid = pids[1];
    let mut orphans = Orphans::default();
    orphans.0.push(new_pid);
    assert_ne!(new_pid, old_pid);
    wait_for_calls(&tally, 40).await;

    // A second upgrade, from the new process.
    let _ = std::process::Command::new("kill")
        .args(["-USR2", &new_pid.to_string()])
        .status();
    eventually("a third process started and the second stopped", || async {
        started_pids(&old.logs()).len() == 3 && !running(new_pid)
    })
    .await;
    let third_pid = started_pids(&old.logs())[2];
    orphans.0.push(third_pid);
    wait_for_calls(&tally, 40).await;

    // A broken build: the upgrade fails and the running process stays.
    std::fs::remove_file(&installed).unwrap();
    std::fs::write(&installed, "#!/bin/sh\nexit 1\n").unwrap();
    let mut permissions = std::fs::metadata(&installed).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut permissions, 0o755);
    std::fs::set_permissions(&installed, permissions).unwrap();
    let _ = std::process::Command::new("kill")
        .args(["-USR2", &third_pid.to_string()])
        .status();
    eventually("the failed upgrade is logged", || async {
        old.logs()
            .contains("upgrade failed; this process keeps serving")
    })
    .await;
    assert!(
        old.logs().contains("exited before it was ready"),
        "{}",
        old.logs()
    );
    wait_for_calls(&tally, 40).await;
    assert!(running(third_pid));

    finish(&fake, stop, tally, tasks).await;
    assert_eq!(fake.state().token_requests(), 3, "one token per process");

    // The upgraded process stops on SIGTERM like any other.
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &third_pid.to_string()])
        .status();
    eventually("the last process exits on SIGTERM", || async {
        !running(third_pid)
    })
    .await;
}

/// Sends SIGUSR2 to `pid` and waits until the process it starts (the next
/// "started" line in `first`'s log, which every upgraded process shares)
/// is ready and `pid` has exited; returns the new process's pid.
async fn upgrade(first: &ProxyProcess, pid: u64, orphans: &mut Orphans) -> u64 {
    let starts = started_pids(&first.logs()).len();
    let signalled = std::time::Instant::now();
    let _ = std::process::Command::new("kill")
        .args(["-USR2", &pid.to_string()])
        .status();
    eventually("the new process is ready and the old one gone", || async {
        started_pids(&first.logs()).len() > starts && !running(pid)
    })
    .await;
    let new_pid = started_pids(&first.logs())[starts];
    eprintln!(
        "upgrade: the new process served and the old one was gone {:?} after SIGUSR2",
        signalled.elapsed()
    );
    orphans.0.push(new_pid);
    new_pid
}

/// The config file now fails validation: the new process exits naming the
/// field, and the running one keeps serving every call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_to_a_config_that_no_longer_validates_keeps_the_old_process() {
    let fake = start_fake(DAY).await;
    let text = config(&fake, "");
    let old = ProxyProcess::start(&text, &[], &[]);
    old.wait_ready().await;
    let stop = Arc::new(AtomicBool::new(false));
    let (tally, tasks) = start_load(old.addr, stop.clone());
    wait_for_calls(&tally, 40).await;

    let broken = text.replace(
        &format!("base_url = \"{}\"", fake.base_url()),
        "base_url = \"ftp://coupa.example\"",
    );
    assert_ne!(broken, text);
    std::fs::write(old.config_path(), broken).unwrap();
    old.signal("-USR2");
    eventually("the failed upgrade is logged", || async {
        old.logs()
            .contains("upgrade failed; this process keeps serving")
    })
    .await;
    let logs = old.logs();
    assert!(logs.contains("exited before it was ready"), "{logs}");
    assert!(
        logs.contains("coupa.base_url"),
        "the cause is named: {logs}"
    );
    assert_eq!(started_pids(&logs).len(), 1, "{logs}");
    wait_for_calls(&tally, 40).await;
    finish(&fake, stop, tally, tasks).await;
    assert!(
        running(u64::from(old.child.id())),
        "the old process still runs"
    );
}

/// A user's consent in a state file survives an upgrade: the new process
/// takes the access token and the refresh token the old one last saved
/// (the fake rotates refresh tokens on every use), so it asks Coupa for
/// nothing and the consent still renews.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_keeps_a_users_consent_from_the_state_file() {
    use crate::support::consent::{consent_saved, start_user_fake, user_config};
    let fake = start_user_fake().await;
    let dir = tempdir::Dir::new("upgrade-consent");
    let (state_path, _) = consent_saved(&fake, dir.path()).await;
    let text = no_activation_delay(&user_config(&fake.base_url(), "device_code", &state_path));
    let first = ProxyProcess::start(&text, &[], &[]);
    first.wait_ready().await;
    let grants_at_start = fake.state().refresh_grants();
    assert!(
        grants_at_start >= 1,
        "the old process used the refresh token"
    );
    let stop = Arc::new(AtomicBool::new(false));
    let (tally, tasks) = start_load(first.addr, stop.clone());
    wait_for_calls(&tally, 40).await;

    let mut orphans = Orphans::default();
    let old_pid = u64::from(first.child.id());
    let new_pid = upgrade(&first, old_pid, &mut orphans).await;
    wait_for_calls(&tally, 40).await;
    finish(&fake, stop, tally, tasks).await;
    let logs = first.logs();
    assert!(!logs.contains("invalid_grant"), "{logs}");
    assert_eq!(
        fake.state().refresh_grants(),
        grants_at_start,
        "the new process took the access token the state file holds"
    );
    let saved = coupa_auth_proxy::token::consent::state_file::load(&state_path).unwrap();
    assert!(
        fake.state()
            .refresh_token_is_live(saved.refresh_token.expose()),
        "the refresh token the new process holds still renews"
    );
    assert!(running(new_pid));
}

/// With `[cluster]`, the new process takes the token the old one shared:
/// an upgrade costs Coupa no token request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_with_cluster_takes_the_shared_token() {
    let Some(redis) = crate::support::real::Redis::start() else {
        return;
    };
    let fake = start_fake(DAY).await;
    let dir = tempdir::Dir::new("upgrade-cluster");
    let key_file = dir.path().join("key");
    std::fs::write(&key_file, "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=").unwrap();
    let text = config(&fake, "")
        + &format!(
            "\n[cluster]\nredis_url = \"{}\"\nencryption_key_file = \"{}\"\n",
            redis.url(),
            key_file.display()
        );
    let first = ProxyProcess::start(&text, &[], &[]);
    first.wait_ready().await;
    assert_eq!(fake.state().token_requests(), 1);
    let stop = Arc::new(AtomicBool::new(false));
    let (tally, tasks) = start_load(first.addr, stop.clone());
    wait_for_calls(&tally, 40).await;

    let mut orphans = Orphans::default();
    let old_pid = u64::from(first.child.id());
    let second = upgrade(&first, old_pid, &mut orphans).await;
    wait_for_calls(&tally, 40).await;
    let third = upgrade(&first, second, &mut orphans).await;
    wait_for_calls(&tally, 40).await;
    finish(&fake, stop, tally, tasks).await;
    assert_eq!(
        fake.state().token_requests(),
        1,
        "each new process took the shared token: {}",
        first.logs()
    );
    assert!(running(third));
}
