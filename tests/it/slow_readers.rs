//! A client that reads slowly holds only its own connection: Coupa's
//! answer is taken off its connection into memory and a temp file
//! (`coupa.response_buffer`, `coupa.response_spool_limit`), an answer
//! beyond both streams at the client's pace as before, and a client below
//! `listen.min_response_rate` is cut off.

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use coupa_auth_proxy::fake_coupa::{pattern_sha256, FakeCoupa};

use crate::support::*;

/// Large enough that the kernel's socket buffers cannot hide a held
/// connection.
const ANSWER: u64 = 16 * 1024 * 1024;

/// A proxy with one HTTP/1.1 connection to the fake, so a held connection
/// shows as the next request waiting.
async fn proxy_with(listen_extra: &str, coupa_extra: &str) -> (FakeCoupa, TestProxy) {
    let fake = start_fake(std::time::Duration::from_secs(86_399)).await;
    let text = config_text(
        &fake.base_url(),
        &format!("http_version = \"http1\"\nmax_connections = 1\n{coupa_extra}"),
        "",
    )
    .replace(
        "shutdown_grace = \"10s\"",
        &format!("shutdown_grace = \"10s\"\n{listen_extra}"),
    );
    let proxy = TestProxy::start(parse_config(&text)).await;
    proxy.wait_ready().await;
    (fake, proxy)
}

/// Asks for a large answer on a connection with a tiny receive buffer and
/// reads none of it yet.
async fn slow_reader(proxy: &TestProxy) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(proxy.addr).await.unwrap();
    let request = format!("GET /api/_download?bytes={ANSWER} HTTP/1.1\r\nHost: proxy\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    stream
}

/// Reads the whole answer now and checks every byte of it.
async fn read_all_of_it(stream: &mut TcpStream) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(stream.read(&mut byte).await.unwrap(), 1, "head cut short");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(
        head.contains(&format!("content-length: {ANSWER}")),
        "{head}"
    );
    let mut hasher = Sha256::new();
    let mut left = ANSWER as usize;
    let mut chunk = vec![0u8; 64 * 1024];
    tokio::time::timeout(DEADLINE, async {
        while left > 0 {
            let n = stream
                .read(&mut chunk[..left.min(64 * 1024)])
                .await
                .unwrap();
            assert!(n > 0, "answer cut short with {left} bytes to go");
            hasher.update(&chunk[..n]);
            left -= n;
        }
    })
    .await
    .expect("the rest of the answer within the deadline");
    let digest: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(digest, pattern_sha256(ANSWER));
}

async fn metrics(proxy: &TestProxy) -> String {
    get(proxy.admin_url("/metrics")).await.text().await.unwrap()
}

async fn spool_back_to_idle(proxy: &TestProxy) {
    eventually("the spool holds nothing", || async {
        let text = metrics(proxy).await;
        metric(&text, "coupa_proxy_response_buffered_bytes", &[]) == 0.0
            && metric(&text, "coupa_proxy_response_spool_files", &[]) == 0.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_holds_no_connection_to_coupa_once_coupa_is_done() {
    let (fake, proxy) = proxy_with("min_response_rate = 0", "").await;
    let mut slow = slow_reader(&proxy).await;
    eventually("the answer is spooled to a temp file", || async {
        metric(
            &metrics(&proxy).await,
            "coupa_proxy_response_spooled_bytes_total",
            &[],
        ) > 0.0
    })
    .await;
    // The one connection to Coupa is free while the client has read
    // nothing: without the spool this request would wait for it and get
    // 503 after coupa.connection_wait_timeout.
    let other = http_client().get(proxy.url("/api/x")).send().await.unwrap();
    assert_eq!(other.status(), 200);
    assert_eq!(fake.state().api_requests(), 2);
    read_all_of_it(&mut slow).await;
    drop(slow);
    spool_back_to_idle(&proxy).await;
    let text = metrics(&proxy).await;
    assert_eq!(
        metric(&text, "coupa_proxy_response_spool_overflows_total", &[]),
        0.0
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_beyond_memory_and_spool_streams_at_the_clients_pace() {
    let (_fake, proxy) = proxy_with(
        "min_response_rate = 0",
        "response_buffer = 65536\nresponse_spool_limit = 65536\nconnection_wait_timeout = \"500ms\"",
    )
    .await;
    let mut slow = slow_reader(&proxy).await;
    eventually("the answer outgrew memory and temp file", || async {
        metric(
            &metrics(&proxy).await,
            "coupa_proxy_response_spool_overflows_total",
            &[],
        ) == 1.0
    })
    .await;
    // Coupa's answer now waits for the client, holding the connection.
    let other = http_client().get(proxy.url("/api/x")).send().await.unwrap();
    assert_eq!(other.status(), 503);
    let answer: serde_json::Value = other.json().await.unwrap();
    assert_eq!(answer["error"], "upstream_busy");
    // Nothing of it is lost on the way.
    read_all_of_it(&mut slow).await;
    let next = http_client().get(proxy.url("/api/x")).send().await.unwrap();
    assert_eq!(next.status(), 200);
    drop(slow);
    spool_back_to_idle(&proxy).await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_take_its_answer_is_cut_off_at_the_minimum_rate() {
    let (_fake, proxy) =
        proxy_with("min_response_rate = 100000\nmin_rate_grace = \"1s\"", "").await;
    let mut slow = slow_reader(&proxy).await;
    eventually("the connection is closed and counted", || async {
        metric(
            &metrics(&proxy).await,
            "coupa_proxy_client_response_timeouts_total",
            &[],
        ) == 1.0
    })
    .await;
    // What the client's buffer held, then the end: never the whole answer.
    let mut got = Vec::new();
    let read = tokio::time::timeout(DEADLINE, slow.read_to_end(&mut got))
        .await
        .expect("the connection is closed");
    assert!(
        read.is_err() || (got.len() as u64) < ANSWER,
        "a cut-off answer must not look complete"
    );
    spool_back_to_idle(&proxy).await;
    // Everyone else is served as before.
    let other = http_client().get(proxy.url("/api/x")).send().await.unwrap();
    assert_eq!(other.status(), 200);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_usable_spool_dir_the_answer_still_arrives_whole() {
    let spool = tempdir::Dir::new("spool-gone");
    let (_fake, proxy) = proxy_with(
        "min_response_rate = 0",
        &format!("spool_dir = \"{}\"", spool.path().display()),
    )
    .await;
    // The directory goes away after start: the temp file cannot be made.
    std::fs::remove_dir_all(spool.path()).unwrap();
    let mut slow = slow_reader(&proxy).await;
    eventually("the answer waits for its client instead", || async {
        metric(
            &metrics(&proxy).await,
            "coupa_proxy_response_spool_overflows_total",
            &[],
        ) == 1.0
    })
    .await;
    read_all_of_it(&mut slow).await;
    drop(slow);
    spool_back_to_idle(&proxy).await;
    proxy.stop().await;
}

/// The spool's temp files are unlinked from the start: while an answer is
/// spooled the process holds a deleted file in `spool_dir` and the
/// directory lists nothing, and after a SIGKILL nothing is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spool_files_leave_nothing_in_the_spool_dir_even_after_a_crash() {
    let fake = start_fake(std::time::Duration::from_secs(86_399)).await;
    let spool = tempdir::Dir::new("spool-crash");
    let text = config_text(
        &fake.base_url(),
        &format!(
            "http_version = \"http1\"\nmax_connections = 1\nspool_dir = \"{}\"",
            spool.path().display()
        ),
        "",
    )
    .replace(
        "shutdown_grace = \"10s\"",
        "shutdown_grace = \"10s\"\nmin_response_rate = 0",
    );
    let proxy = ProxyProcess::start(&text, &[], &[]);
    proxy.wait_ready().await;
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(proxy.addr).await.unwrap();
    let request = format!("GET /api/_download?bytes={ANSWER} HTTP/1.1\r\nHost: proxy\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let metrics_url = format!("http://{}/metrics", proxy.admin);
    eventually("an answer is spooled", || async {
        metric(
            &get(&metrics_url).await.text().await.unwrap(),
            "coupa_proxy_response_spool_files",
            &[],
        ) >= 1.0
    })
    .await;
    let listed = || std::fs::read_dir(spool.path()).unwrap().count();
    assert_eq!(listed(), 0, "the spool file has no name");
    let pid = proxy.child.id();
    let held_deleted = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|fd| std::fs::read_link(fd.unwrap().path()).ok())
        .any(|target| {
            let target = target.to_string_lossy().into_owned();
            target.starts_with(&spool.path().display().to_string()) && target.ends_with("(deleted)")
        });
    assert!(held_deleted, "the process holds its spool file, unlinked");
    proxy.signal("-KILL");
    eventually("the process is gone", || async {
        !std::path::Path::new(&format!("/proc/{pid}/fd")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|stat| stat.contains(") Z"))
    })
    .await;
    assert_eq!(listed(), 0, "nothing is left behind after a crash");
    drop(stream);
}
