//! `coupa-auth-proxy demo`: the fake Coupa and the proxy on loopback, with a
//! ready-to-paste `curl` that shows what the proxy does to a legacy call.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::app::{self, AppError, Listeners};
use crate::config::{Config, ConfigError};
use crate::fake_coupa::{FakeClient, FakeCoupa, FakeCoupaOptions};
use crate::proxy::auth::hash_key;

const DEMO_CLIENT_ID: &str = "demo-integration";
const DEMO_CLIENT_SECRET: &str = "demo-secret-only-valid-at-the-fake";
/// The legacy key the printed `curl` sends, and the local OAuth client a
/// tool would use; both known to the demo's integrations.
const DEMO_LEGACY_KEY: &str = "0123456789abcdef0123456789abcdef01234567";
const DEMO_TOOL_ID: &str = "demo-tool";
const DEMO_TOOL_SECRET: &str = "demo-tool-secret";
const DEMO_SCOPES: [&str; 3] = [
    "core.common.read",
    "core.invoice.read",
    "core.supplier.read",
];

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("cannot start the fake Coupa: {0}")]
    Fake(std::io::Error),
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("demo configuration is invalid (a bug): {0}")]
    Config(#[from] ConfigError),
    #[error(transparent)]
    App(#[from] AppError),
}

/// Binds `preferred`, or any free loopback port when it is taken, so the
/// demo starts even next to a running proxy.
async fn bind_or_any(what: &'static str, preferred: SocketAddr) -> Result<TcpListener, DemoError> {
    match TcpListener::bind(preferred).await {
        Ok(listener) => Ok(listener),
        Err(_) => {
            let any = SocketAddr::new(preferred.ip(), 0);
            TcpListener::bind(any)
                .await
                .map_err(|source| DemoError::Bind {
                    what,
                    addr: any,
                    source,
                })
        }
    }
}

pub async fn run(
    listen: SocketAddr,
    admin: SocketAddr,
    shutdown: CancellationToken,
) -> Result<(), DemoError> {
    let fake = FakeCoupa::start(FakeCoupaOptions {
        clients: vec![FakeClient {
            id: DEMO_CLIENT_ID.to_owned(),
            secret: DEMO_CLIENT_SECRET.to_owned(),
            scopes: DEMO_SCOPES.iter().map(|s| s.to_string()).collect(),
        }],
        token_lifetime: Duration::from_secs(86_399),
        tls: None,
    })
    .await
    .map_err(DemoError::Fake)?;
    // Like Coupa: a resource needs its scope, so the status page shows 403s.
    fake.state().set_scoped_api(true);

    let proxy_listener = bind_or_any("the proxy", listen).await?;
    let admin_listener = bind_or_any("the admin endpoint", admin).await?;
    let proxy_addr = proxy_listener.local_addr().map_err(DemoError::Fake)?;
    let admin_addr = admin_listener.local_addr().map_err(DemoError::Fake)?;

    let text = format!(
        r#"
[listen]
address = "{proxy_addr}"
shutdown_grace = "2s"

[coupa]
base_url = "{base}"

[oauth]
client_id = "{DEMO_CLIENT_ID}"
client_secret = "${{DEMO_CLIENT_SECRET}}"
scopes = ["core.common.read", "core.invoice.read", "core.supplier.read"]

[[integration]]
name = "legacy-erp"
api_key_sha256 = "{legacy}"

[[integration]]
name = "oauth-tool"
oauth_client_id = "{DEMO_TOOL_ID}"
oauth_client_secret_sha256 = "{tool}"

[admin]
address = "{admin_addr}"
"#,
        base = fake.base_url(),
        legacy = hash_key(DEMO_LEGACY_KEY),
        tool = hash_key(DEMO_TOOL_SECRET),
    );
    let config = Config::from_toml(&text, Path::new("."), |var| {
        (var == "DEMO_CLIENT_SECRET").then(|| DEMO_CLIENT_SECRET.to_owned())
    })?;

    println!(
        "coupa-auth-proxy demo: a fake Coupa instance and the proxy in front of it\n\
         \n  fake Coupa  {base} (OAuth client {DEMO_CLIENT_ID:?}, tokens live 24 h)\
         \n  proxy       http://{proxy_addr}\
         \n  readiness   http://{admin_addr}/readyz\
         \n  status      http://{admin_addr}/ (metrics at /metrics)\
         \n\nA legacy integration's call, sent to the proxy with an old API key:\n\
         \n  curl -s -H 'X-COUPA-API-KEY: {DEMO_LEGACY_KEY}' 'http://{proxy_addr}/api/invoices?limit=1&offset=0'\n\
         \nThe fake Coupa answers with what it received: no X-COUPA-API-KEY, an\
         \n`authorization: Bearer fake.…` header with the token the proxy fetched,\
         \n`accept: application/xml` (what Coupa answers a call without Accept, as a\
         \nlegacy integration expects), `host` set to the instance and X-Forwarded-*.\
         \nThe same call without the proxy would be rejected with 401:\n\
         \n  curl -s -H 'X-COUPA-API-KEY: {DEMO_LEGACY_KEY}' '{base}/api/invoices'\n\
         \nA tool that fetches its own token asks the proxy, which answers with a\
         \nlocal token (Coupa's secret and tokens stay in the proxy):\n\
         \n  curl -s -u {DEMO_TOOL_ID}:{DEMO_TOOL_SECRET} -d grant_type=client_credentials 'http://{proxy_addr}/oauth2/token'\
         \n  curl -s -H 'Authorization: Bearer <access_token>' 'http://{proxy_addr}/api/invoices'\n\
         \nA call its credential has no scope for gets Coupa's 403, counted on the\
         \nstatus page's migration view:\n\
         \n  curl -s -X PUT -H 'X-COUPA-API-KEY: {DEMO_LEGACY_KEY}' 'http://{proxy_addr}/api/invoices/1'\n\
         \nAn integration that can only set a proxy keeps Coupa's https:// URL: see\
         \n`coupa-auth-proxy ca init` and [listen.intercept] (docs/integrations.md: Integrations that cannot change their base URL).\n\
         \nCtrl-C stops the demo.",
        base = fake.base_url(),
    );

    app::run(
        config,
        Listeners {
            proxy: proxy_listener,
            admin: admin_listener,
        },
        shutdown,
    )
    .await?;
    drop(fake);
    Ok(())
}
