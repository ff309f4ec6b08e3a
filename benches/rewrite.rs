//! Micro-benchmarks of the per-request work that is the proxy's own: the
//! header rewrite and the token read. `cargo bench --bench rewrite`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // bench set-up

use std::hint::black_box;
use std::time::{Duration, SystemTime};

use coupa_auth_proxy::proxy::headers::{rewrite_request, ClientInfo, RewriteRules};
use coupa_auth_proxy::secret::Secret;
use coupa_auth_proxy::token::{ActiveToken, TokenStore};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use http::{HeaderMap, HeaderName, HeaderValue};
use tokio::time::Instant;

/// What a typical legacy integration sends.
fn client_headers() -> HeaderMap {
    let mut map = HeaderMap::new();
    for (k, v) in [
        ("host", "127.0.0.1:8080"),
        ("user-agent", "SAP-ERP-Connector/7.5"),
        (
            "x-coupa-api-key",
            "0123456789abcdef0123456789abcdef01234567",
        ),
        ("accept", "*/*"),
        ("content-type", "application/json"),
        ("content-length", "512"),
        ("connection", "keep-alive"),
    ] {
        map.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
    }
    map
}

fn bench_rewrite(c: &mut Criterion) {
    let rules = RewriteRules {
        upstream_host: HeaderValue::from_static("acme.coupahost.com"),
        forwarded_proto: HeaderValue::from_static("http"),
    };
    let client = ClientInfo::new("127.0.0.1".parse().unwrap());
    let accept = HeaderValue::from_static("application/xml");
    // A Coupa JWT with a handful of scopes is well over a kilobyte.
    let bearer = {
        let mut v = HeaderValue::from_str(&format!("Bearer {}", "x".repeat(1200))).unwrap();
        v.set_sensitive(true);
        v
    };
    c.bench_function("rewrite_request (typical legacy request)", |b| {
        b.iter_batched_ref(
            client_headers,
            |headers| {
                rewrite_request(headers, None, &rules, &accept, bearer.clone(), &client);
                black_box(headers);
            },
            BatchSize::SmallInput,
        )
    });
}

fn bench_token_read(c: &mut Criterion) {
    let store = TokenStore::new();
    let now = Instant::now();
    store.install(
        ActiveToken::new(
            &Secret::new("x".repeat(1200)),
            now,
            now + Duration::from_secs(86_000),
            SystemTime::now() + Duration::from_secs(86_000),
            None,
        )
        .unwrap(),
    );
    c.bench_function("token_store.bearer (load + clone)", |b| {
        b.iter(|| black_box(store.bearer(black_box(now))))
    });
}

criterion_group!(benches, bench_rewrite, bench_token_read);
criterion_main!(benches);
