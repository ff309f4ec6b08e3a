//! `run` (the proxy on the runtime `[runtime]` asks for, until SIGINT or
//! SIGTERM) and `demo`.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::{config_failure, Failure};
use crate::app::{self, Listeners};
use crate::config::{Config, RuntimeFlavor};
use crate::token::source::SourceError;

/// `run`: the proxy with the configuration at `path`, reloaded from it.
pub fn run(path: PathBuf) -> Result<(), Failure> {
    let config = Config::load(&path).map_err(config_failure)?;
    proxy_runtime(&config.runtime)?.block_on(serve(config, path))
}

/// `demo`: a fake Coupa and the proxy in front of it.
pub fn demo(listen: SocketAddr, admin: SocketAddr) -> Result<(), Failure> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        tokio::spawn(cancel_on_signal(shutdown.clone()));
        crate::demo::run(listen, admin, shutdown).await?;
        Ok(())
    })
}

/// The runtime `run` serves on, as `[runtime]` says.
fn proxy_runtime(settings: &crate::config::Runtime) -> Result<tokio::runtime::Runtime, Failure> {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let (flavor, workers) = settings.resolve(cores);
    let mut builder = match flavor {
        RuntimeFlavor::CurrentThread => tokio::runtime::Builder::new_current_thread(),
        _ => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(workers);
            builder
        }
    };
    let runtime = builder
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    tracing::debug!(?flavor, workers, cores, "async runtime");
    Ok(runtime)
}

async fn serve(config: Config, path: PathBuf) -> Result<(), Failure> {
    let proxy = TcpListener::bind(config.listen.address)
        .await
        .with_context(|| format!("listen.address: cannot bind {}", config.listen.address))
        .map_err(config_failure)?;
    let admin = TcpListener::bind(config.admin.address)
        .await
        .with_context(|| format!("admin.address: cannot bind {}", config.admin.address))
        .map_err(config_failure)?;
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    match app::run_with_reload(config, Some(path), Listeners { proxy, admin }, shutdown).await {
        Ok(_) => Ok(()),
        // A missing or unusable consent is fixed by the user, like a config error.
        Err(e @ app::AppError::TokenSource(SourceError::Consent(_))) => Err(config_failure(e)),
        Err(e) => Err(e.into()),
    }
}

/// Cancels `shutdown` on SIGINT (Ctrl-C) or SIGTERM.
async fn cancel_on_signal(shutdown: CancellationToken) {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = terminate => {}
    }
    tracing::info!("shutdown signal received; no new connections, draining");
    shutdown.cancel();
}
