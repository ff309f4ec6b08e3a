//! Wires a validated [`Config`] into running parts: the token refreshers,
//! the cluster state, the reloader and the admin listener as
//! [`Background`] work; the proxy listener in the foreground; and the
//! shutdown order between them (drain the proxy, then stop the rest).

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use http_body_util::Either;
use hyper::service::service_fn;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::admin::AdminState;
use crate::background::Background;
use crate::cluster::Cluster;
use crate::config::Config;
use crate::guesses::Guesses;
use crate::insight::Insight;
use crate::local_oauth::LocalTokens;
use crate::metrics::Metrics;
use crate::proxy::ratelimit::{Limiter, SharedBudget};
use crate::proxy::{self, ClientInfo, Proxy, Services, Shared};
use crate::reload::Reloader;
use crate::server::framing::Refusal;
use crate::server::{self, Drain};
use crate::tls;
use crate::token::source::SourceError;
use crate::token::{CredentialSource, RefreshPolicy, Refresher, TokenStore};
use crate::traces::Traces;

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
    #[error("listen.intercept: {0}")]
    Intercept(#[from] crate::intercept::CaError),
    #[error(transparent)]
    Traces(#[from] crate::traces::TracesError),
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
    let (inbound_cert, acceptor) = inbound_tls(&config)?;
    let intercept = intercept(&config)?;
    // Background work stops only after the proxy has drained, so requests
    // finishing during the grace period still see a token.
    let background = Background::new();
    let stores: crate::metrics::Stores = Arc::new(
        config
            .credentials
            .iter()
            .map(|credential| (credential.name.clone(), Arc::new(TokenStore::new())))
            .collect(),
    );
    let insight = Insight::new(&config);
    let metrics = Metrics::new(stores.clone(), config.cluster.is_some(), &insight);
    let started = start_background_work(
        &config,
        config_path.as_deref(),
        &tls_config,
        &stores,
        &metrics,
        &background,
    );
    let Started {
        cluster,
        credentials,
        traces,
    } = match started {
        Ok(started) => started,
        Err(error) => {
            background.stop().await;
            return Err(error);
        }
    };
    for warning in config.warnings_with_env() {
        warn!("{warning}");
    }

    let proxy_addr = listening_on(&listeners.proxy);
    let admin_addr = listening_on(&listeners.admin);
    let guesses = Arc::new(Guesses::new(metrics.guesses.clone(), shutdown.clone()));
    let proxy = build_proxy(
        &config,
        tls_config,
        &stores,
        &metrics,
        Shared {
            insight: insight.clone(),
            guesses: guesses.clone(),
        },
        (cluster.clone(), traces),
        &background,
    );
    let admin_state = Arc::new(AdminState::new(
        &config,
        listeners.admin.local_addr().ok(),
        stores.clone(),
        metrics.clone(),
        Shared { insight, guesses },
        (shutdown.clone(), proxy.first_warm()),
        cluster,
    ));
    serve_admin(listeners.admin, admin_state, &background);
    if let Some(path) = config_path {
        let reloader = Reloader {
            path,
            startup: config.clone(),
            credentials,
            proxy: proxy.clone(),
            cert: inbound_cert,
        };
        reloader.spawn(&background);
    }
    // After the reloader has claimed SIGHUP: once the supervisor reads
    // READY=1 it may reload at once, and an unclaimed SIGHUP would end
    // the process.
    crate::lifecycle::notify::spawn(
        &background,
        (stores.clone(), proxy.first_warm()),
        metrics.clone(),
        shutdown.clone(),
    );
    info!(
        listen = %proxy_addr,
        admin = %admin_addr,
        upstream = %config.coupa.base_url,
        pid = std::process::id(),
        "coupa-auth-proxy started"
    );
    let cut = proxy.clone();
    let drain = serve_proxy(
        listeners.proxy,
        (acceptor, intercept),
        proxy,
        &config,
        &metrics,
        drain_after_delay(&shutdown, config.listen.drain_delay, &background),
    )
    .await;
    report_drain(drain, &cut);
    background.stop().await;
    Ok(drain)
}

/// A listener's address for the start-up line.
fn listening_on(listener: &TcpListener) -> String {
    listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".to_owned())
}

/// Says how the drain ended; when the grace period ran out, the requests
/// still in flight are marked as cut by the process before they are
/// dropped (their access lines say `cut_at_shutdown`).
fn report_drain(drain: Drain, proxy: &Proxy) {
    match drain {
        Drain::Complete => info!("all in-flight requests finished"),
        Drain::TimedOut { open_connections } => {
            proxy.cut_remaining();
            warn!(
                open_connections,
                "grace period ran out; closing the remaining connections"
            )
        }
    }
}

/// What runs beside the request path once started.
struct Started {
    cluster: Option<Arc<Cluster>>,
    credentials: crate::reload::CredentialHandles,
    traces: Option<Traces>,
}

/// The trace exporter (with `[telemetry] otlp_endpoint`), then the
/// cluster state and the token work ([`start_token_work`]), all on
/// `background`.
fn start_background_work(
    config: &Config,
    config_path: Option<&Path>,
    tls_config: &rustls::ClientConfig,
    stores: &[(String, Arc<TokenStore>)],
    metrics: &Metrics,
    background: &Background,
) -> Result<Started, AppError> {
    let traces = config
        .telemetry
        .otlp_traces_url
        .as_ref()
        .map(|url| Traces::start(url, metrics.traces.clone(), background))
        .transpose()?;
    let (cluster, credentials) = start_token_work(
        config,
        config_path,
        tls_config,
        stores,
        (metrics, traces.as_ref()),
        background,
    )?;
    Ok(Started {
        cluster,
        credentials,
        traces,
    })
}

/// The proxy's own shutdown: `listen.drain_delay` after `shutdown`.
/// Meanwhile `/readyz` already says draining (it watches `shutdown`) and
/// the listener still accepts and serves, so connections a load balancer
/// sends before it has taken the process out are served, not refused.
fn drain_after_delay(
    shutdown: &CancellationToken,
    delay: std::time::Duration,
    background: &Background,
) -> CancellationToken {
    if delay.is_zero() {
        return shutdown.clone();
    }
    let drain = CancellationToken::new();
    let (signal, start) = (shutdown.clone(), drain.clone());
    background.spawn(move |stop| async move {
        tokio::select! {
            _ = signal.cancelled() => {}
            _ = stop.cancelled() => return,
        }
        info!(
            drain_delay = ?delay,
            "still accepting for listen.drain_delay while load balancers take this process out"
        );
        tokio::time::sleep(delay).await;
        start.cancel();
    });
    drain
}

/// The admin listener answers (`/readyz` says "draining") until the proxy
/// has drained, so it stops with the background work.
fn serve_admin(listener: TcpListener, state: Arc<AdminState>, background: &Background) {
    background.spawn(|stop| async move {
        server::serve(
            listener,
            None,
            move |peer, _guard| {
                let state = state.clone();
                service_fn(move |request| crate::admin::handle(request, state.clone(), peer.ip()))
            },
            server::Limits::default(),
            stop,
            std::time::Duration::from_secs(1),
        )
        .await;
    });
}

/// The request path: the upstream pool, the rate budget (shared with
/// `[cluster]`), the local tokens, over the credentials' token stores.
fn build_proxy(
    config: &Config,
    tls_config: rustls::ClientConfig,
    stores: &[(String, Arc<TokenStore>)],
    metrics: &Arc<Metrics>,
    shared: Shared,
    (cluster, traces): (Option<Arc<Cluster>>, Option<Traces>),
    background: &Background,
) -> Proxy {
    let upstream = proxy::upstream::build(
        &config.coupa,
        tls_config,
        metrics.upstream.clone(),
        background,
    );
    let token_stores: Vec<_> = stores.iter().map(|(_, store)| store.clone()).collect();
    let rate_limiter = config.coupa.rate_limit.map(|limit| match &cluster {
        Some(cluster) => {
            let budget = SharedBudget::new(cluster.clone(), limit, background);
            Limiter::shared(&limit, budget, metrics.rate.clone(), background)
        }
        None => Limiter::local(&limit, metrics.rate.clone(), background),
    });
    Proxy::new(
        config,
        &token_stores,
        upstream,
        metrics.clone(),
        shared,
        Services {
            rate_limiter,
            local_tokens: LocalTokens::new(cluster),
            traces,
        },
    )
}

/// The inbound certificate (re-read on reload) and the acceptor serving
/// it, with `[listen.tls]`.
fn inbound_tls(
    config: &Config,
) -> Result<(Option<Arc<tls::ReloadingCert>>, Option<TlsAcceptor>), AppError> {
    let Some(settings) = &config.listen.tls else {
        return Ok((None, None));
    };
    let cert = Arc::new(tls::ReloadingCert::load(
        &settings.cert_file,
        &settings.key_file,
    )?);
    let acceptor = TlsAcceptor::from(Arc::new(tls::server_config(
        cert.clone(),
        settings.client_ca_file.as_deref(),
    )?));
    Ok((Some(cert), Some(acceptor)))
}

/// The cluster state (with `[cluster]`) and one refresher per credential.
/// Every source is built before any refresher starts, so a missing consent
/// stops start-up with no refresher running.
fn start_token_work(
    config: &Config,
    config_path: Option<&Path>,
    tls_config: &rustls::ClientConfig,
    stores: &[(String, Arc<TokenStore>)],
    (metrics, traces): (&Metrics, Option<&Traces>),
    background: &Background,
) -> Result<(Option<Arc<Cluster>>, crate::reload::CredentialHandles), AppError> {
    let cluster = match &config.cluster {
        Some(settings) => Some(Cluster::start(
            settings,
            &config.coupa.base_url,
            metrics.cluster.clone(),
            background,
        )?),
        None => None,
    };
    let mut sources = Vec::with_capacity(config.credentials.len());
    for (credential, (_, store)) in config.credentials.iter().zip(stores) {
        let source = CredentialSource::new(
            credential,
            tls_config.clone(),
            config_path,
            store.clone(),
            cluster.as_ref(),
        )?;
        sources.push((credential, source, store.clone()));
    }
    let mut handles = Vec::with_capacity(sources.len());
    for (credential, source, store) in sources {
        let source = match &cluster {
            Some(cluster) => source.share(cluster, store.clone(), credential),
            None => source,
        };
        handles.push((source.params_handle(), store.clone()));
        let refresher = Refresher {
            client: source,
            store,
            policy: RefreshPolicy::from(&credential.oauth),
            credential: credential.name.clone(),
            traces: traces.cloned(),
        };
        background.spawn(|stop| refresher.run(stop));
    }
    Ok((cluster, handles))
}

/// Forward-proxy mode for the instance, when `[listen.intercept]` is set.
fn intercept(config: &Config) -> Result<Option<Arc<crate::intercept::Intercept>>, AppError> {
    let Some(files) = &config.listen.intercept else {
        return Ok(None);
    };
    let ca = crate::intercept::LocalCa::load(&files.ca_cert_file, &files.ca_key_file)?;
    let authority = &config.coupa.authority;
    let port = authority
        .port_u16()
        .unwrap_or(crate::encode::default_port(Some(
            config.coupa.scheme.as_str(),
        )));
    Ok(Some(Arc::new(crate::intercept::Intercept::new(
        ca,
        authority.host(),
        port,
    )?)))
}

/// Serves the proxy listener until `shutdown` and the drain after it.
async fn serve_proxy(
    listener: TcpListener,
    (acceptor, intercept): (
        Option<TlsAcceptor>,
        Option<Arc<crate::intercept::Intercept>>,
    ),
    proxy: Proxy,
    config: &Config,
    metrics: &Metrics,
    shutdown: CancellationToken,
) -> Drain {
    // Behind an Arc: cloning a CancellationToken takes a lock, and this is
    // cloned per request.
    let draining = Arc::new(shutdown.clone());
    server::serve(
        listener,
        acceptor,
        move |peer, guard| {
            let proxy = proxy.clone();
            let client = Arc::new(ClientInfo::new(peer.ip()));
            let draining = draining.clone();
            service_fn(move |request| {
                let proxy = proxy.clone();
                let client = client.clone();
                let guard = guard.clone();
                let draining = draining.clone();
                async move {
                    let http1 = request.version() <= http::Version::HTTP_11;
                    let mut response = match guard.refusal() {
                        Some((refusal, answer)) => {
                            proxy.log_refused(
                                &request,
                                refusal.reason(),
                                refusal == Refusal::AmbiguousFraming,
                                answer.status(),
                            );
                            answer.map(Either::Right)
                        }
                        None => proxy.handle(request, &client).await,
                    };
                    if http1 && draining.is_cancelled() {
                        // The client opens its next connection elsewhere
                        // (or to the process that takes over).
                        response.headers_mut().insert(
                            http::header::CONNECTION,
                            http::HeaderValue::from_static("close"),
                        );
                    }
                    Ok::<_, Infallible>(server::answered(response, &guard))
                }
            })
        },
        server::Limits {
            header_read_timeout: config.listen.header_read_timeout,
            keepalive_timeout: config.listen.keepalive_timeout,
            min_response_rate: config.listen.min_response_rate,
            min_rate_grace: config.listen.min_rate_grace,
            max_header_bytes: config.listen.max_header_bytes,
            max_connections: config.listen.max_connections,
            release_idle_buffers_above: config.listen.release_idle_buffers_above,
            gauges: metrics.client_connections.clone(),
            intercept,
        },
        shutdown,
        config.listen.shutdown_grace,
    )
    .await
}
