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
use crate::lifecycle::sockets::{self, Inherited};
use crate::lifecycle::upgrade::Upgrade;
use crate::token::source::SourceError;

/// `run`: the proxy with the configuration at `path`, reloaded from it.
pub fn run(path: PathBuf) -> Result<(), Failure> {
    // Before any thread starts: taking them clears their variables.
    let inherited = sockets::take_from_env().map_err(config_failure)?;
    let config = Config::load(&path).map_err(config_failure)?;
    proxy_runtime(&config.runtime)?.block_on(serve(config, path, inherited))
}

/// `demo`: a fake Coupa and the proxy in front of it.
pub fn demo(listen: SocketAddr, admin: SocketAddr) -> Result<(), Failure> {
    let runtime = built(tokio::runtime::Builder::new_multi_thread())?;
    runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        tokio::spawn(cancel_on_signal(shutdown.clone()));
        crate::demo::run(listen, admin, shutdown).await?;
        Ok(())
    })
}

/// A runtime of `builder`'s flavor with I/O and time.
pub(super) fn built(
    mut builder: tokio::runtime::Builder,
) -> Result<tokio::runtime::Runtime, Failure> {
    Ok(builder
        .enable_all()
        .build()
        .context("cannot start the async runtime")?)
}

/// The runtime `run` serves on, as `[runtime]` says.
fn proxy_runtime(settings: &crate::config::Runtime) -> Result<tokio::runtime::Runtime, Failure> {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let (flavor, workers) = settings.resolve(cores);
    let builder = match flavor {
        RuntimeFlavor::CurrentThread => tokio::runtime::Builder::new_current_thread(),
        _ => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(workers);
            builder
        }
    };
    let runtime = built(builder)?;
    tracing::debug!(?flavor, workers, cores, "async runtime");
    Ok(runtime)
}

async fn serve(config: Config, path: PathBuf, inherited: Inherited) -> Result<(), Failure> {
    let proxy = listener(inherited.proxy, "listen.address", config.listen.address).await?;
    let admin = listener(inherited.admin, "admin.address", config.admin.address).await?;
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    match Upgrade::prepare(&proxy, &admin) {
        Ok(upgrade) => upgrade.spawn(shutdown.clone()),
        Err(error) => tracing::warn!(%error, "in-place upgrades (SIGUSR2) are off"),
    }
    match app::run_with_reload(config, Some(path), Listeners { proxy, admin }, shutdown).await {
        Ok(_) => Ok(()),
        // A missing or unusable consent is fixed by the user, like a config error.
        Err(e @ app::AppError::TokenSource(SourceError::Consent(_))) => Err(config_failure(e)),
        Err(e) => Err(e.into()),
    }
}

/// The socket handed over for `key`'s listener, or `address` bound.
async fn listener(
    handed: Option<std::net::TcpListener>,
    key: &str,
    address: SocketAddr,
) -> Result<TcpListener, Failure> {
    match handed {
        Some(socket) => {
            let local = socket.local_addr().ok();
            let listener = socket
                .set_nonblocking(true)
                .and_then(|()| TcpListener::from_std(socket))
                .with_context(|| format!("{key}: cannot use the socket handed over"))
                .map_err(config_failure)?;
            tracing::info!(key, address = ?local, "listening on a socket handed over (socket activation or upgrade)");
            Ok(listener)
        }
        None => Ok(TcpListener::bind(address)
            .await
            .with_context(|| format!("{key}: cannot bind {address}"))
            .map_err(config_failure)?),
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
    // Cancelled before anything that could fail: logging included.
    shutdown.cancel();
    tracing::info!("shutdown signal received; no new connections, draining");
}
