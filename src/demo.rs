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

const DEMO_CLIENT_ID: &str = "demo-integration";
const DEMO_CLIENT_SECRET: &str = "demo-secret-only-valid-at-the-fake";
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
accept = "application/json"

[oauth]
client_id = "{DEMO_CLIENT_ID}"
client_secret = "${{DEMO_CLIENT_SECRET}}"
scopes = ["core.common.read", "core.invoice.read"]

[admin]
address = "{admin_addr}"
"#,
        base = fake.base_url(),
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
         \n  curl -s -H 'X-COUPA-API-KEY: 0123456789abcdef0123456789abcdef01234567' 'http://{proxy_addr}/api/invoices?limit=1&offset=0'\n\
         \nThe fake Coupa answers with what it received: no X-COUPA-API-KEY, an\
         \n`authorization: Bearer fake.…` header with the token the proxy fetched,\
         \n`accept: application/json`, `host` set to the instance and X-Forwarded-*.\
         \nThe same call without the proxy would be rejected with 401:\n\
         \n  curl -s -H 'X-COUPA-API-KEY: 0123456789abcdef0123456789abcdef01234567' '{base}/api/invoices'\n\
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
