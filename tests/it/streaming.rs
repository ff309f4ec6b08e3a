//! Bodies stream both ways with bounded memory: 128 MiB each way through the
//! real binary, checked by SHA-256, while its peak RSS stays small.

use std::time::Duration;

use crate::support::*;
use coupa_auth_proxy::encode::hex;
use coupa_auth_proxy::fake_coupa::{pattern_sha256, PatternBody};
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use sha2::{Digest, Sha256};

const SIZE: u64 = 128 * 1024 * 1024;
/// Far below SIZE: a proxy that buffered a body could not stay under it.
const MAX_PEAK_RSS_KIB: u64 = 48 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_upload_and_download_stream_with_bounded_memory() {
    let fake = start_fake(Duration::from_secs(86_399)).await;
    let proxy = ProxyProcess::start(&config_text(&fake.base_url(), "", ""), &[], &[]);
    proxy.wait_ready().await;

    let client = Client::builder(TokioExecutor::new()).build_http::<PatternBody>();

    let upload = http::Request::post(proxy.url("/api/attachments"))
        .header("x-coupa-api-key", LEGACY_KEY)
        .header("content-type", "application/octet-stream")
        .body(PatternBody::new(SIZE))
        .unwrap();
    let response = client.request(upload).await.unwrap();
    assert_eq!(response.status(), 200);
    let echo: serde_json::Value =
        serde_json::from_slice(&body_bytes(response.into_body()).await).unwrap();
    assert_eq!(echo["body_bytes"], SIZE);
    assert_eq!(echo["body_sha256"], pattern_sha256(SIZE));

    let download = http::Request::get(proxy.url(&format!("/api/_download?bytes={SIZE}")))
        .body(PatternBody::new(0))
        .unwrap();
    let response = client.request(download).await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let mut hasher = Sha256::new();
    let mut received: u64 = 0;
    while let Some(frame) = body.frame().await {
        if let Some(data) = frame.unwrap().data_ref() {
            hasher.update(data);
            received += data.len() as u64;
        }
    }
    assert_eq!(received, SIZE);
    assert_eq!(hex(&hasher.finalize()), pattern_sha256(SIZE));

    let peak = proxy.peak_rss_kib().expect("VmHWM readable on Linux");
    assert!(
        peak < MAX_PEAK_RSS_KIB,
        "proxy peak RSS {peak} KiB after moving {} MiB each way",
        SIZE / (1024 * 1024)
    );
}
