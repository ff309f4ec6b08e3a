//! The failure table's log column (docs/failures.md, *Failure behaviour*): each row
//! provoked against the real binary, and its log line checked — the
//! client's side of each row is tested where the feature is.

use std::time::Duration;

use coupa_auth_proxy::fake_coupa::TokenFailure;
use tokio::io::AsyncWriteExt;

use crate::support::*;

const DAY: Duration = Duration::from_secs(86_399);

/// The proxy in front of `fake` with `listen_extra` and `coupa_extra`.
fn start(
    fake: &coupa_auth_proxy::fake_coupa::FakeCoupa,
    listen_extra: &str,
    coupa_extra: &str,
) -> ProxyProcess {
    let text = config_text(&fake.base_url(), coupa_extra, "").replace(
        "shutdown_grace = \"10s\"",
        &format!("shutdown_grace = \"10s\"\n{listen_extra}"),
    );
    ProxyProcess::start(&text, &[], &[])
}

async fn logged(proxy: &ProxyProcess, message: &str) {
    eventually(&format!("the log says {message:?}"), || async {
        proxy.logs().contains(message)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_coupa_rejects_is_logged_and_replaced() {
    let fake = start_fake(DAY).await;
    let proxy = start(&fake, "", "");
    proxy.wait_ready().await;
    fake.state().revoke_all_tokens();
    assert_eq!(get(proxy.url("/api/invoices")).await.status(), 200);
    logged(&proxy, "Coupa rejected the token; fetching a new one now").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_endpoint_down_while_a_token_is_valid_is_logged_then_its_recovery() {
    // 4 s tokens, renewed at half-life.
    let fake = start_fake(Duration::from_secs(4)).await;
    let proxy = start(&fake, "", "");
    proxy.wait_ready().await;
    fake.state()
        .set_token_failure(Some(TokenFailure::ServerError));
    logged(
        &proxy,
        "token fetch failed; the current token keeps serving",
    )
    .await;
    assert_eq!(get(proxy.url("/api/invoices")).await.status(), 200);
    fake.state().set_token_failure(None);
    logged(&proxy, "token endpoint recovered").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_answer_from_coupa_is_logged() {
    let fake = start_fake(DAY).await;
    let proxy = start(&fake, "", "idle_timeout = \"500ms\"");
    proxy.wait_ready().await;
    // A small answer is read whole before its head goes out: 504.
    let answer = get(proxy.url("/api/_stall?bytes=10")).await;
    assert_eq!(answer.status(), 504);
    logged(&proxy, "upstream response stalled; aborting it").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_falling_behind_with_its_body_is_logged() {
    let fake = start_fake(DAY).await;
    let proxy = start(&fake, "body_read_timeout = \"300ms\"", "");
    proxy.wait_ready().await;
    let (status, head, body) = raw_request(
        proxy.addr,
        "POST /api/invoices HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"a\":",
    )
    .await;
    assert_eq!(status, 408, "{head}");
    let head = head.to_ascii_lowercase();
    assert!(
        head.contains("connection: close"),
        "the proxy closes it: {head}"
    );
    assert!(!head.contains("keep-alive:"), "{head}");
    let body = String::from_utf8_lossy(&body);
    assert!(body.contains("nothing was sent to Coupa"), "{body}");
    assert_eq!(fake.state().api_requests(), 0);
    logged(&proxy, "client fell behind sending the request body").await;
}

/// A client that leaves in the middle of its body: `499` in the access
/// line (nginx's code: the client closed), not a malformed body's `400`,
/// and nothing reaches Coupa.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_mid_body_is_a_499_in_the_access_line() {
    let fake = start_fake(DAY).await;
    let proxy = start(&fake, "", "");
    proxy.wait_ready().await;
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"POST /api/invoices HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"a\":")
        .await
        .unwrap();
    drop(stream);
    eventually("the access line", || async {
        !proxy.access_lines().is_empty()
    })
    .await;
    let line = proxy.access_lines().remove(0);
    assert_eq!(line["status"], 499, "{line}");
    assert_eq!(fake.state().api_requests(), 0);
    assert!(
        !proxy.logs().contains("request not forwarded"),
        "the access line is the record"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_limit_is_logged() {
    let fake = start_fake(DAY).await;
    let proxy = start(
        &fake,
        "max_connections = 2\nheader_read_timeout = \"1h\"",
        "",
    );
    proxy.wait_ready().await;
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(tokio::net::TcpStream::connect(proxy.addr).await.unwrap());
    }
    let metrics = format!("http://{}/metrics", proxy.admin);
    eventually("both connections are held", || async {
        metric(
            &scrape(&metrics).await,
            "coupa_proxy_client_connections",
            &[],
        ) == 2.0
    })
    .await;
    // A third connection, saying nothing: the server answers it at once.
    assert_eq!(raw_request(proxy.addr, "").await.0, 503);
    logged(&proxy, "connection limit reached; refusing a connection").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_framing_is_logged() {
    let fake = start_fake(DAY).await;
    let proxy = start(&fake, "", "");
    proxy.wait_ready().await;
    let (status, head, _) = raw_request(
        proxy.addr,
        "POST /api/invoices HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\
         Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(status, 400, "{head}");
    logged(
        &proxy,
        "request refused: both Content-Length and Transfer-Encoding",
    )
    .await;
    assert_eq!(fake.state().api_requests(), 0);
}
