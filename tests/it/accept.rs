//! XML stays XML: Coupa answers XML to a request without `Accept`, so an
//! integration written against that default is given
//! `[[integration]] accept = "application/xml"` while another one keeps
//! JSON; a client's own `Accept` is always kept; the migration view counts
//! who relied on the default and what they got, and `check` shows each
//! integration's default.

use std::time::Duration;

use coupa_auth_proxy::proxy::auth::hash_key;

use crate::support::*;

const XML_KEY: &str = "xml-flow-legacy-key-7d1f0c2b3a4e5d6c7b8a9f0e1d2c3b4a";
const JSON_KEY: &str = "json-flow-legacy-key-0e1d2c3b4a5f6e7d8c9b0a1f2e3d4c5b";

/// `coupa.accept` is JSON (config_text), one integration wants XML.
fn config(base_url: &str) -> String {
    format!(
        "{}\n[[integration]]\nname = \"xml-flow\"\napi_key_sha256 = \"{}\"\naccept = \"application/xml\"\n\n\
         [[integration]]\nname = \"json-flow\"\napi_key_sha256 = \"{}\"\n",
        config_text(base_url, "", ""),
        hash_key(XML_KEY),
        hash_key(JSON_KEY),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_integration_gets_its_own_format_and_a_clients_accept_is_kept() {
    let fake = start_fake(Duration::from_secs(86_399)).await;
    let proxy = ProxyProcess::start(&config(&fake.base_url()), &[], &[]);
    proxy.wait_ready().await;
    let client = http_client();
    let call = |key: &'static str, accept: Option<&'static str>| {
        let mut request = client
            .get(proxy.url("/api/invoices?limit=1"))
            .header("X-COUPA-API-KEY", key);
        if let Some(accept) = accept {
            request = request.header("Accept", accept);
        }
        request.send()
    };
    // No Accept: each integration's default.
    for (key, format, accept) in [
        (XML_KEY, "xml", "application/xml"),
        (JSON_KEY, "json", "application/json"),
    ] {
        let echo = echo_of(call(key, None).await.unwrap()).await;
        assert_eq!(echo["format"], format);
        assert_eq!(header(&echoed_headers(&echo), "accept"), [accept]);
    }
    // Only */*: still the default.
    let echo = echo_of(call(XML_KEY, Some("*/*")).await.unwrap()).await;
    assert_eq!(echo["format"], "xml");
    // An Accept of the client's own is kept, whatever the integration's
    // default; Java's default Accept is passed on as it is.
    let java = "text/html, image/gif, image/jpeg, *; q=.2, */*; q=.2";
    for key in [XML_KEY, JSON_KEY] {
        let echo = echo_of(call(key, Some("application/json")).await.unwrap()).await;
        assert_eq!(echo["format"], "json");
        let echo = echo_of(call(key, Some("application/xml")).await.unwrap()).await;
        assert_eq!(echo["format"], "xml");
        let echo = echo_of(call(key, Some(java)).await.unwrap()).await;
        assert_eq!(header(&echoed_headers(&echo), "accept"), [java]);
    }

    // The migration view: who relied on the default, and what they got.
    let status: serde_json::Value = get(format!("http://{}/status.json", proxy.admin))
        .await
        .json()
        .await
        .unwrap();
    let view = |name: &str| {
        status["integrations"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["integration"] == name)
            .unwrap_or_else(|| panic!("{name} in {status}"))
            .clone()
    };
    let xml_flow = view("xml-flow");
    assert_eq!(xml_flow["default_accept"]["given"], "application/xml");
    assert_eq!(xml_flow["default_accept"]["relied_on"]["xml"], 2);
    assert_eq!(xml_flow["default_accept"]["relied_on"]["json"], 0);
    let json_flow = view("json-flow");
    assert_eq!(json_flow["default_accept"]["given"], "application/json");
    assert_eq!(json_flow["default_accept"]["relied_on"]["json"], 1);
    // Given JSON without asking: flagged, with the fix.
    let flags = json_flow["flags"].to_string();
    assert!(flags.contains("default_accept"), "{flags}");
    assert!(
        flags.contains("accept = \\\"application/xml\\\""),
        "{flags}"
    );
    assert!(!xml_flow["flags"].to_string().contains("default_accept"));
    // The status page says it too.
    let page = get(format!("http://{}/", proxy.admin))
        .await
        .text()
        .await
        .unwrap();
    assert!(
        page.contains(
            "requests without Accept are given application/xml; sent without Accept: 2 xml"
        ),
        "{page}"
    );
}

#[test]
fn check_prints_each_integrations_default_accept() {
    let dir = tempdir::Dir::new("accept-check");
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, config("http://127.0.0.1:9")).unwrap();
    let (code, stdout, stderr) = run_binary(
        &["check", "--config", path.to_str().unwrap()],
        &[("TEST_CLIENT_SECRET", "s3cret")],
    );
    assert_eq!(code, Some(0), "{stderr}");
    let line = |name: &str| {
        stdout
            .lines()
            .find(|l| l.contains(&format!("integration {name:?}")))
            .unwrap_or_else(|| panic!("{name} in {stdout}"))
            .to_owned()
    };
    assert!(
        line("xml-flow").contains("Accept when it sends none: application/xml"),
        "{stdout}"
    );
    assert!(
        line("json-flow").contains("Accept when it sends none: application/json (coupa.accept)"),
        "{stdout}"
    );
    // A value that is no media type is refused, naming the key.
    std::fs::write(
        &path,
        config("http://127.0.0.1:9").replace("accept = \"application/xml\"", "accept = \"xml\""),
    )
    .unwrap();
    let (code, _, stderr) = run_binary(
        &["check", "--config", path.to_str().unwrap()],
        &[("TEST_CLIENT_SECRET", "s3cret")],
    );
    assert_eq!(code, Some(64));
    assert!(stderr.contains("integration[0].accept"), "{stderr}");
    assert!(stderr.contains("media type"), "{stderr}");
}
