//! OpenTelemetry traces against parts nobody here wrote: a job
//! instrumented with the OpenTelemetry Python SDK calls through the proxy
//! with its `traceparent`; an OTLP/HTTP receiver decodes what the proxy
//! exports with the official `opentelemetry-proto` package
//! (`tests/otel/`). One trace runs from the job's span through the
//! proxy's request span and its phases to the `traceparent` Coupa
//! received; a dead or hanging collector costs requests nothing.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use coupa_auth_proxy::proxy::auth::hash_key;

use crate::support::real::{free_port, python_with, wait_listening};
use crate::support::*;

const KEY: &str = "traces-legacy-key-6e5d4c3b2a19";
const DAY: Duration = Duration::from_secs(86_400);

/// The receiver script, stopped on drop.
struct Receiver {
    child: Child,
    spans: PathBuf,
    port: u16,
    _dir: tempdir::Dir,
}

impl Receiver {
    fn start(python: &Path, mode: &str) -> Self {
        let dir = tempdir::Dir::new("otlp");
        let spans = dir.path().join("spans.jsonl");
        let port = free_port();
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/otel/receiver.py");
        let child = Command::new(python)
            .args([script, &port.to_string(), spans.to_str().unwrap(), mode])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_listening(port, "the OTLP receiver", String::new);
        Self {
            child,
            spans,
            port,
            _dir: dir,
        }
    }

    fn spans(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.spans)
            .unwrap_or_default()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn config(base_url: &str, collector_port: u16) -> String {
    config_text(base_url, "", "")
        + &format!(
            "\n[[integration]]\nname = \"erp\"\napi_key_sha256 = \"{}\"\nmax_concurrent = 4\n\n\
             [telemetry]\notlp_endpoint = \"http://127.0.0.1:{collector_port}\"\n",
            hash_key(KEY)
        )
}

fn named<'a>(spans: &'a [serde_json::Value], name: &str) -> Vec<&'a serde_json::Value> {
    spans.iter().filter(|s| s["name"] == name).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jobs_trace_runs_through_the_proxy_to_coupa() {
    let Some(python) = python_with("opentelemetry.sdk") else {
        return;
    };
    if python_with("opentelemetry.proto").is_none() {
        return;
    }
    let receiver = Receiver::start(&python, "ok");
    let fake = start_fake(DAY).await;
    let mut proxy = ProxyProcess::start(&config(&fake.base_url(), receiver.port), &[], &[]);
    proxy.wait_ready().await;

    let url = proxy.url("/api/invoices?filter=default");
    let job = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .args([
                concat!(env!("CARGO_MANIFEST_DIR"), "/tests/otel/client.py"),
                &url,
                KEY,
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        job.status.success(),
        "{}",
        String::from_utf8_lossy(&job.stderr)
    );
    let job: serde_json::Value = serde_json::from_slice(&job.stdout).unwrap();
    assert_eq!(job["status"], 200, "{job}");
    let trace_id = job["trace_id"].as_str().unwrap().to_owned();
    // And one call with no trace of its own: the proxy starts one.
    assert_eq!(
        http_client()
            .get(proxy.url("/api/suppliers"))
            .header("X-COUPA-API-KEY", KEY)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    // A loaded machine can fail a loopback connection to Coupa: an
    // attempt sent again is a span of its own.
    let metrics = scrape(&format!("http://{}/metrics", proxy.admin)).await;
    let retried = metric(&metrics, "coupa_proxy_upstream_retries_total", &[]) as usize;

    // Stopping flushes what is queued: every span is there once the
    // process has exited, none waits for a later batch.
    proxy.terminate();
    assert_eq!(proxy.wait_exit().await, Some(0), "{}", proxy.logs());
    let spans = receiver.spans();
    let exported = |name: &str| named(&spans, name).len();
    assert_eq!(exported("GET invoices"), 1, "{spans:#?}");
    assert_eq!(exported("GET suppliers"), 1, "{spans:#?}");
    assert_eq!(exported("coupa request"), 2 + retried, "{spans:#?}");
    assert_eq!(exported("connection slot"), 2, "{spans:#?}");
    assert!(exported("token fetch") >= 1, "{spans:#?}");
    for span in &spans {
        assert_eq!(span["path"], "/v1/traces");
        assert_eq!(span["content_type"], "application/x-protobuf");
        assert_eq!(span["service"], "coupa-auth-proxy");
        assert_eq!(span["scope"], "coupa-auth-proxy");
        assert!(span["start"].as_u64() <= span["end"].as_u64(), "{span}");
    }

    // The job's span → the proxy's request span → its phases.
    let request = named(&spans, "GET invoices")[0];
    assert_eq!(request["trace_id"], trace_id);
    assert_eq!(request["parent_span_id"], job["span_id"]);
    assert_eq!(request["kind"], 2, "SPAN_KIND_SERVER");
    assert_eq!(request["attributes"]["http.response.status_code"], 200);
    assert_eq!(request["attributes"]["coupa.integration"], "erp");
    assert_eq!(request["attributes"]["url.path"], "/api/invoices");
    let children: Vec<_> = spans
        .iter()
        .filter(|s| s["parent_span_id"] == request["span_id"])
        .collect();
    // The attempt Coupa answered (an earlier one may have failed).
    let attempt = children
        .iter()
        .find(|s| {
            s["name"] == "coupa request" && s["attributes"]["http.response.status_code"] == 200
        })
        .expect("the attempt at Coupa is a child of the request span");
    assert!(children.iter().any(|s| s["name"] == "connection slot"));
    assert!(children.iter().all(|s| s["trace_id"] == trace_id));
    assert_eq!(attempt["kind"], 3, "SPAN_KIND_CLIENT");
    assert_eq!(attempt["attributes"]["http.response.status_code"], 200);

    // Coupa received the attempt's own span as its parent.
    assert_eq!(
        fake.state().seen_traceparents()[0],
        format!("00-{trace_id}-{}-01", attempt["span_id"].as_str().unwrap())
    );
    // The call without a trace got a root span of a new trace.
    let own = named(&spans, "GET suppliers")[0];
    assert_eq!(own["parent_span_id"], "");
    assert_ne!(own["trace_id"], trace_id);

    // The access lines name the traces.
    let lines = proxy.access_lines();
    let line_of = |path: &str| {
        lines
            .iter()
            .find(|l| l["path"] == path)
            .unwrap_or_else(|| panic!("an access line for {path}: {lines:?}"))
    };
    assert_eq!(line_of("/api/invoices")["trace_id"], trace_id);
    assert_eq!(line_of("/api/suppliers")["trace_id"], own["trace_id"]);

    // A token fetch is a trace of its own, and names no secret.
    let fetch = named(&spans, "token fetch")[0];
    assert_eq!(fetch["parent_span_id"], "");
    assert_eq!(fetch["attributes"]["coupa.credential"], "default");
    assert_eq!(fetch["attributes"]["coupa.token.trigger"], "start");

    // No secret anywhere in the bytes exported, nor the query string.
    let mut secrets = vec![KEY.to_owned(), CLIENT_SECRET.to_owned()];
    secrets.extend(fake.state().seen_bearers());
    secrets.push("filter=default".to_owned());
    for span in &spans {
        let raw = span["raw"].as_str().unwrap();
        for secret in &secrets {
            let hex: String = secret.bytes().map(|b| format!("{b:02x}")).collect();
            assert!(!raw.contains(&hex), "{secret:?} in an export");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_or_hanging_collector_costs_requests_nothing() {
    let Some(python) = python_with("opentelemetry.proto") else {
        return;
    };
    let hanging = Receiver::start(&python, "slow");
    // Bound but never listening, and held for the whole test: connecting
    // is refused, and no other test can take the port meanwhile.
    let dead = tokio::net::TcpSocket::new_v4().unwrap();
    dead.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let dead_port = dead.local_addr().unwrap().port();
    let fake = start_fake(DAY).await;
    for port in [dead_port, hanging.port] {
        let proxy = ProxyProcess::start(&config(&fake.base_url(), port), &[], &[]);
        proxy.wait_ready().await;
        let client = http_client();
        for _ in 0..50 {
            let answer = client
                .get(proxy.url("/api/invoices"))
                .header("X-COUPA-API-KEY", KEY)
                .send()
                .await
                .unwrap();
            assert_eq!(answer.status(), 200);
        }
        let metrics_url = format!("http://{}/metrics", proxy.admin);
        // Every span is counted as not exported once the collector
        // refused it or its export's deadline passed.
        // A hanging collector holds each batch for the export's deadline
        // (5 s): longer than `eventually` waits.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
        loop {
            let text = scrape(&metrics_url).await;
            // Each request made three spans (request, slot, attempt) and
            // one more per attempt sent again (a loaded machine can fail
            // a loopback connection); the first token fetch one.
            let retried = metric(&text, "coupa_proxy_upstream_retries_total", &[]);
            let expected = 50.0 * 3.0 + retried + 1.0;
            let dropped = metric(
                &text,
                "coupa_proxy_trace_spans_dropped_total",
                &[("reason", "export_failed")],
            );
            if dropped == expected {
                break;
            }
            assert!(
                dropped < expected && tokio::time::Instant::now() < deadline,
                "{dropped} of {expected} spans counted as dropped: {}",
                proxy.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let text = scrape(&metrics_url).await;
        assert_eq!(
            metric(&text, "coupa_proxy_trace_spans_exported_total", &[]),
            0.0
        );
        // Said once, not once per batch or request.
        let warnings = proxy.logs().matches("could not export spans").count();
        assert_eq!(warnings, 1, "{}", proxy.logs());
    }
}
