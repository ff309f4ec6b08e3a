//! Wires a validated [`Config`] into running parts: the token refresher in
//! the background, the proxy and admin listeners in the foreground, and the
//! shutdown order between them.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;

use http_body_util::Either;
use hyper::service::service_fn;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::admin::AdminState;
use crate::cluster::Cluster;
use crate::config::Config;
use crate::insight::Insight;
use crate::metrics::Metrics;
use crate::proxy::{self, ClientInfo, Proxy};
use crate::reload::Reloader;
use crate::server::{self, Drain};
use crate::tls;
use crate::token::source::SourceError;
use crate::token::{CredentialSource, RefreshPolicy, Refresher, TokenStore};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    TokenSource(#[from] SourceError),
    #[error("listen.tls: {0}")]
    ServerTls(#[from] tls::ServerTlsError),
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
}

/// The two sockets the proxy serves, bound by the caller (port 0 in tests).
pub struct Listeners {
    pub proxy: TcpListener,
    pub admin: TcpListener,
}

/// Runs the proxy until `shutdown` is cancelled and in-flight requests have
/// drained (or the grace period ran out).
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<Drain, AppError> {
    run_with_reload(config, None, listeners, shutdown).await
}

/// [`run`], re-reading `config_path` on SIGHUP or when it or a secret file
/// changes (see [`crate::reload`]).
pub async fn run_with_reload(
    config: Config,
    config_path: Option<PathBuf>,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<Drain, AppError> {
    let tls_config = tls::client_config(&config.coupa.extra_roots)?;
    let inbound_cert = match &config.listen.tls {
        Some(t) => Some(Arc::new(tls::ReloadingCert::load(
            &t.cert_file,
            &t.key_file,
        )?)),
        None => None,
    };
    let acceptor = match (&config.listen.tls, &inbound_cert) {
        (Some(t), Some(cert)) => Some(tokio_rustls::TlsAcceptor::from(Arc::new(
            tls::server_config(cert.clone(), t.client_ca_file.as_deref())?,
        ))),
        _ => None,
    };

    // Background work stops only after the proxy has drained, so requests
    // finishing during the grace period still see a token.
    let background = CancellationToken::new();
    // One store and one refresher per credential. Every source is built
    // before any refresher starts, so a missing consent stops start-up
    // with nothing left running.
    let stores: Vec<_> = config
        .credentials
        .iter()
        .map(|credential| (credential.name.clone(), Arc::new(TokenStore::new())))
        .collect();
    let stores = Arc::new(stores);
    let insight = Insight::new(&config);
    let metrics = Metrics::new(stores.clone(), config.cluster.is_some(), &insight);
    let cluster = match &config.cluster {
        Some(settings) => Some(Cluster::start(
            settings,
            &config.coupa.base_url,
            metrics.cluster.clone(),
            background.clone(),
        )?),
        None => None,
    };
    let mut sources = Vec::with_capacity(config.credentials.len());
    for (credential, (_, store)) in config.credentials.iter().zip(stores.iter()) {
        let source = CredentialSource::new(
            credential,
            tls_config.clone(),
            config_path.as_deref(),
            store.clone(),
            cluster.as_ref(),
        )?;
        sources.push((credential, source, store.clone()));
    }
    let mut background_tasks = Vec::with_capacity(sources.len());
    let mut handles = Vec::with_capacity(sources.len());
    for (credential, source, store) in sources {
        let source = match &cluster {
            Some(cluster) => source.share(cluster, store.clone(), credential),
            None => source,
        };
        handles.push((source.params_handle(), store.clone()));
        let refresher = Refresher {
            client: source,
            store: store.clone(),
            policy: RefreshPolicy::from(&credential.oauth),
            credential: credential.name.clone(),
        };
        background_tasks.push(tokio::spawn(refresher.run(background.clone())));
    }
    for warning in config.warnings() {
        warn!("{warning}");
    }

    let local = |l: &TcpListener| {
        l.local_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "?".to_owned())
    };
    let proxy_addr = local(&listeners.proxy);
    let admin_addr = local(&listeners.admin);
    let admin_state = Arc::new(AdminState::new(
        &config,
        stores.clone(),
        metrics.clone(),
        insight.clone(),
        shutdown.clone(),
        cluster.clone(),
    ));
    let admin_task = tokio::spawn(server::serve(
        listeners.admin,
        None,
        move |_peer, _guard| {
            let state = admin_state.clone();
            service_fn(move |request| crate::admin::handle(request, state.clone()))
        },
        server::Limits::default(),
        background.clone(),
        std::time::Duration::from_secs(1),
    ));

    let upstream = proxy::upstream::build(&config.coupa, tls_config, metrics.upstream.clone());
    let token_stores: Vec<_> = stores.iter().map(|(_, store)| store.clone()).collect();
    let proxy = Proxy::new(
        &config,
        &token_stores,
        upstream,
        metrics.clone(),
        insight,
        cluster.clone(),
    );
    if let Some(path) = config_path {
        let reloader = Reloader {
            path,
            startup: config.clone(),
            credentials: handles,
            proxy: proxy.clone(),
            cert: inbound_cert,
        };
        background_tasks.push(reloader.spawn(background.clone()));
    }
    info!(
        listen = %proxy_addr,
        admin = %admin_addr,
        upstream = %config.coupa.base_url,
        "coupa-auth-proxy started"
    );
    let drain = server::serve(
        listeners.proxy,
        acceptor,
        move |peer, guard| {
            let proxy = proxy.clone();
            let client = Arc::new(ClientInfo::new(peer.ip()));
            service_fn(move |request| {
                let proxy = proxy.clone();
                let client = client.clone();
                let guard = guard.clone();
                async move {
                    let response = match guard.refusal() {
                        Some(refusal) => refusal.map(Either::Right),
                        None => proxy.handle(request, &client).await,
                    };
                    Ok::<_, Infallible>(server::answered(response, &guard))
                }
            })
        },
        server::Limits {
            header_read_timeout: config.listen.header_read_timeout,
            max_header_bytes: config.listen.max_header_bytes,
            max_connections: config.listen.max_connections,
            release_idle_buffers_above: config.listen.release_idle_buffers_above,
            gauges: metrics.client_connections.clone(),
        },
        shutdown,
        config.listen.shutdown_grace,
    )
    .await;
    match drain {
        Drain::Complete => info!("all in-flight requests finished"),
        Drain::TimedOut { open_connections } => warn!(
            open_connections,
            "grace period ran out; closing the remaining connections"
        ),
    }
    background.cancel();
    for refresher in background_tasks {
        let _ = refresher.await;
    }
    let _ = admin_task.await;
    Ok(drain)
}
