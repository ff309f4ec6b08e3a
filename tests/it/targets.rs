//! Request targets, checked against nginx as the oracle: what a lenient
//! front (nginx, which a Rails application such as Coupa sits behind)
//! accepts, the proxy forwards so that Coupa decodes the same path and
//! parameters; what nginx refuses, the proxy refuses. The corpus is
//! `request_targets.txt` beside this file, plus every printable ASCII byte
//! in a path segment and in a query value. Real clients send Coupa's
//! documented `fields=[…]` syntax unencoded: curl `--globoff`, Python's
//! `http.client` and a Java `HttpURLConnection` (the latter in
//! `intercept.rs`, directly and through the CONNECT intercept).

use std::net::SocketAddr;
use std::time::Duration;

use percent_encoding::percent_decode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::real::{python_with, tool, Nginx};
use crate::support::*;

const CORPUS: &str = include_str!("request_targets.txt");

/// Where the proxy answers differently from nginx on purpose, each with
/// its reason. The test fails if one of these stops differing, so the
/// list stays true.
const DELIBERATE: &[(&str, &str)] = &[
    (
        "/api/a%zz",
        "nginx refuses a malformed percent-encoding in the path; the proxy forwards it as sent and lets Coupa answer (its own front decides what it accepts)",
    ),
    (
        "/api/a%",
        "as above: a lone `%` in the path is Coupa's to refuse",
    ),
    (
        "/api/p%q",
        "the same for the generated case of `%` in a path segment",
    ),
    (
        "head GET /api/a HTTP/1.1\\r\\nHost: h\\r\\nX-Ctl: a\\x01b\\r\\nConnection: close\\r\\n\\r\\n",
        "a control character in a header value: RFC 9110 §5.5 forbids it and hyper's parser refuses it (400 malformed_head); nginx lets it through",
    ),
];

/// One case of the corpus.
struct Case {
    /// The corpus line, for messages.
    line: String,
    /// The request as sent.
    bytes: Vec<u8>,
    /// The target, for target lines (whose meaning is compared).
    target: Option<Vec<u8>>,
}

fn unescape(text: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 1 < bytes.len() {
            match bytes[i + 1] {
                b'r' => out.push(b'\r'),
                b'n' => out.push(b'\n'),
                b's' => out.push(b' '),
                b't' => out.push(b'\t'),
                b'\\' => out.push(b'\\'),
                b'x' => {
                    let hex = std::str::from_utf8(&bytes[i + 2..i + 4]).unwrap();
                    out.push(u8::from_str_radix(hex, 16).unwrap());
                    i += 2;
                }
                other => panic!("unknown escape \\{} in {text}", other as char),
            }
            i += 2;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    out
}

fn target_case(line: String, target: Vec<u8>) -> Case {
    let mut bytes = b"GET ".to_vec();
    bytes.extend_from_slice(&target);
    bytes.extend_from_slice(
        b" HTTP/1.1\r\nHost: coupa.example\r\nAccept: application/json\r\nConnection: close\r\n\r\n",
    );
    Case {
        line,
        bytes,
        target: Some(target),
    }
}

fn corpus() -> Vec<Case> {
    let mut cases: Vec<Case> = CORPUS
        .lines()
        .map(str::trim_end)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| match line.strip_prefix("head ") {
            Some(head) => Case {
                line: line.to_owned(),
                bytes: unescape(head),
                target: None,
            },
            None => target_case(line.to_owned(), unescape(line)),
        })
        .collect();
    for byte in 0x21u8..=0x7E {
        let path = [b"/api/p".as_slice(), &[byte], b"q"].concat();
        let query = [b"/api/p?x=a".as_slice(), &[byte], b"b&y=1"].concat();
        for target in [path, query] {
            let line = String::from_utf8(target.clone()).unwrap();
            cases.push(target_case(line, target));
        }
    }
    cases
}

/// Sends `request` on a new connection; the status (0: closed without
/// an answer) and the body, read until the server closes.
async fn exchange(addr: SocketAddr, request: &[u8]) -> (u16, Vec<u8>) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut raw = Vec::new();
    // A reset after the answer is an ending like any other.
    let _ = tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut raw))
        .await
        .expect("the server answers and closes within 20 s");
    let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return (0, Vec::new());
    };
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, raw[split + 4..].to_vec())
}

/// A path and its query parameters, percent-decoded.
type Meaning = (Vec<u8>, Vec<(Vec<u8>, Vec<u8>)>);

/// A target's meaning as a server decodes it: the path and the query
/// parameters, percent-decoded, the fragment dropped.
fn meaning(target: &[u8]) -> Meaning {
    let target = target.split(|&b| b == b'#').next().unwrap_or_default();
    let (path, query) = match target.iter().position(|&b| b == b'?') {
        Some(at) => (&target[..at], &target[at + 1..]),
        None => (target, &b""[..]),
    };
    let decode = |part: &[u8]| percent_decode(part).collect::<Vec<u8>>();
    let params = query
        .split(|&b| b == b'&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| match pair.iter().position(|&b| b == b'=') {
            Some(at) => (decode(&pair[..at]), decode(&pair[at + 1..])),
            None => (decode(pair), Vec::new()),
        })
        .collect();
    (decode(path), params)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_target_nginx_accepts_reaches_coupa_with_the_same_meaning() {
    let Some(nginx) = Nginx::start_echoing_targets() else {
        return;
    };
    let (fake, proxy) = start_pair(Duration::from_secs(86_399)).await;
    proxy.wait_ready().await;
    let nginx_addr: SocketAddr = format!("127.0.0.1:{}", nginx.port).parse().unwrap();
    let mut differences = Vec::new();
    let mut deliberate_seen = Vec::new();
    let cases = corpus();
    for case in &cases {
        let (nginx_status, nginx_body) = exchange(nginx_addr, &case.bytes).await;
        let before = fake.state().api_requests();
        let (proxy_status, proxy_body) = exchange(proxy.addr, &case.bytes).await;
        let accepted = nginx_status == 200;
        let mut differs = None;
        if accepted && proxy_status != 200 {
            differs = Some(format!(
                "nginx 200, proxy {proxy_status} {}",
                String::from_utf8_lossy(&proxy_body)
            ));
        } else if !accepted && proxy_status == 200 {
            differs = Some(format!("nginx {nginx_status}, proxy 200"));
        } else if accepted {
            if let Some(sent) = &case.target {
                let echo: serde_json::Value = serde_json::from_slice(&proxy_body)
                    .unwrap_or_else(|e| panic!("{}: {e}", case.line));
                let received = echo["target"].as_str().unwrap().as_bytes();
                // What nginx saw is what was sent; Coupa must read the same.
                assert_eq!(nginx_body, *sent, "{}: nginx echoes the target", case.line);
                if meaning(received) != meaning(sent) {
                    differs = Some(format!(
                        "Coupa received {:?}, which means something else",
                        String::from_utf8_lossy(received)
                    ));
                }
            }
        } else {
            assert_eq!(
                fake.state().api_requests(),
                before,
                "{}: a refused request reaches nothing",
                case.line
            );
        }
        match (
            DELIBERATE.iter().find(|(line, _)| *line == case.line),
            differs,
        ) {
            (Some((line, _)), Some(_)) => deliberate_seen.push(*line),
            (None, Some(difference)) => differences.push(format!("{}: {difference}", case.line)),
            (_, None) => {}
        }
    }
    assert!(
        differences.is_empty(),
        "{} of {} cases differ from nginx:\n{}",
        differences.len(),
        cases.len(),
        differences.join("\n")
    );
    for (line, reason) in DELIBERATE {
        assert!(
            deliberate_seen.contains(line),
            "{line} no longer differs from nginx ({reason}): take it off the list"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_head_is_refused_with_its_reason_in_the_body_the_log_and_the_metrics() {
    let fake = start_fake(Duration::from_secs(86_399)).await;
    let text = config_text(&fake.base_url(), "", "");
    let proxy = ProxyProcess::start(&text, &[], &[]);
    proxy.wait_ready().await;
    let refused: [(&[u8], &str); 2] = [
        (
            b"GET /api/a\x01b HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
            "malformed_request_line",
        ),
        (
            b"GET /api/a HTTP/1.1\r\nHost: h\r\nBad Header: 1\r\n\r\n",
            "malformed_head",
        ),
    ];
    for (request, reason) in refused {
        let (status, body) = exchange(proxy.addr, request).await;
        assert_eq!(status, 400);
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["error"], reason, "{body}");
    }
    assert_eq!(fake.state().api_requests(), 0, "nothing reached Coupa");

    let metrics = scrape(&format!("http://{}/metrics", proxy.admin)).await;
    for reason in ["malformed_request_line", "malformed_head"] {
        assert_eq!(
            metric(
                &metrics,
                "coupa_proxy_refused_requests_total",
                &[("reason", reason)]
            ),
            1.0,
            "{reason}"
        );
    }
    eventually("one access line per refused request", || async {
        let logs = proxy.logs();
        ["malformed_request_line", "malformed_head"]
            .iter()
            .all(|reason| {
                logs.lines()
                    .filter(|l| l.contains("coupa_auth_proxy::access") && l.contains(reason))
                    .count()
                    == 1
            })
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_and_python_send_coupas_fields_syntax_unencoded_and_get_200() {
    const FIELDS: &str = r#"/api/invoices?fields=["id",{"supplier":["name"]}]"#;
    let (curl, python) = (tool("curl"), python_with("http.client"));
    let (Some(curl), Some(python)) = (curl, python) else {
        return;
    };
    let (fake, proxy) = start_pair(Duration::from_secs(86_399)).await;
    proxy.wait_ready().await;

    let url = proxy.url(FIELDS);
    let curl_out = output(
        curl,
        &[
            "-sS",
            "--globoff",
            "-H",
            "Accept: application/json",
            "-w",
            "\n%{http_code}",
            &url,
        ],
    )
    .await;
    let out = String::from_utf8_lossy(&curl_out.stdout).into_owned();
    let (body, status) = out.rsplit_once('\n').unwrap();
    assert_eq!(status, "200", "{out}");
    let echo: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(
        meaning(echo["target"].as_str().unwrap().as_bytes()),
        meaning(FIELDS.as_bytes())
    );

    let script = format!(
        "import http.client, sys\n\
         c = http.client.HTTPConnection('127.0.0.1', {port}, timeout=20)\n\
         c.putrequest('GET', sys.argv[1], skip_accept_encoding=True)\n\
         c.putheader('Accept', 'application/json')\n\
         c.endheaders()\n\
         r = c.getresponse()\n\
         print(r.status)\n\
         sys.stdout.write(r.read().decode())\n",
        port = proxy.addr.port()
    );
    let py_out = output(python, &["-c", &script, FIELDS]).await;
    let out = String::from_utf8_lossy(&py_out.stdout).into_owned();
    let (status, body) = out
        .split_once('\n')
        .unwrap_or_else(|| panic!("{out}{}", String::from_utf8_lossy(&py_out.stderr)));
    assert_eq!(status, "200", "{out}");
    let echo: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(
        meaning(echo["target"].as_str().unwrap().as_bytes()),
        meaning(FIELDS.as_bytes())
    );
    assert_eq!(fake.state().api_requests(), 2);
}

/// Runs a client off the async workers.
async fn output(program: std::path::PathBuf, args: &[&str]) -> std::process::Output {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(program)
            .args(args)
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}
