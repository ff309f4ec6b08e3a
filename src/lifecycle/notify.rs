//! `sd_notify`: tells the supervisor (systemd with `Type=notify`, or the
//! process that started this one on an in-place upgrade) where the process
//! is in its life. Every call is a no-op without `NOTIFY_SOCKET`, and a
//! failed send is logged at debug: the supervisor's view is never worth a
//! failed request.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

use crate::background::Background;
use crate::metrics::Metrics;
use crate::token::TokenStore;

/// Each credential's token store, by name.
type Stores = Arc<Vec<(String, Arc<TokenStore>)>>;

/// How often `STATUS=` is refreshed when no watchdog asks for more.
const STATUS_EVERY: Duration = Duration::from_secs(10);

/// Set once the notify socket is gone: an upgraded process was told
/// `READY=1` over its parent's private socket, which closes when the
/// parent exits; nobody listens there any more.
static NOBODY_LISTENS: AtomicBool = AtomicBool::new(false);

fn send(states: &[NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    deliver(&NOBODY_LISTENS, || sd_notify::notify(states));
}

/// Runs `notify` unless nobody listens; a socket that no longer exists (or
/// refuses) ends the notifications for the process's life.
fn deliver(nobody_listens: &AtomicBool, notify: impl FnOnce() -> std::io::Result<()>) {
    if nobody_listens.load(Ordering::Relaxed) {
        return;
    }
    match notify() {
        Ok(()) => {}
        Err(error)
            if matches!(
                error.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            nobody_listens.store(true, Ordering::Relaxed);
            tracing::debug!(%error, "the notify socket is gone; no more sd_notify messages");
        }
        Err(error) => tracing::debug!(%error, "sd_notify failed"),
    }
}

/// A reload begins (`RELOADING=1` with the monotonic time systemd wants).
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// A reload ended, applied or not: serving as before.
pub fn reloaded() {
    send(&[NotifyState::Ready]);
}

/// One line on the supervisor's status (`systemctl status`).
fn status(stores: &[(String, Arc<TokenStore>)], metrics: &Metrics) -> String {
    let held = stores.iter().filter(|(_, s)| s.is_ready()).count();
    format!(
        "tokens held {held} of {}; {} client connections open",
        stores.len(),
        metrics.client_connections.open.get()
    )
}

/// Sends `READY=1` once every credential holds a token and the first warm
/// connection to Coupa has been tried, then keeps
/// `STATUS=` (and the watchdog, when `WATCHDOG_USEC` asks) fresh until
/// `signal` (the shutdown signal), when it sends `STOPPING=1`.
pub fn spawn(
    background: &Background,
    (stores, mut first_warm): (Stores, tokio::sync::watch::Receiver<bool>),
    metrics: Arc<Metrics>,
    signal: CancellationToken,
) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    let watchdog = sd_notify::watchdog_enabled();
    background.spawn(move |stop| async move {
        // As `/readyz`: every token held, the first warm connection tried.
        let all_ready = async {
            for (_, store) in stores.iter() {
                store.ready().await;
            }
            let _ = first_warm.wait_for(|tried| *tried).await;
        };
        tokio::select! {
            biased;
            _ = signal.cancelled() => {}
            _ = all_ready => send(&[NotifyState::Ready, NotifyState::Status(&status(&stores, &metrics))]),
            _ = stop.cancelled() => return,
        }
        let every = watchdog.map_or(STATUS_EVERY, |w| (w / 2).min(STATUS_EVERY));
        loop {
            tokio::select! {
                // Checked first: a drain with nothing in flight ends (and
                // `stop` fires) before this task may have run again, and
                // the supervisor must still hear STOPPING=1.
                biased;
                _ = signal.cancelled() => {
                    send(&[NotifyState::Stopping, NotifyState::Status("draining")]);
                    return;
                }
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {
                    let line = status(&stores, &metrics);
                    if watchdog.is_some() {
                        send(&[NotifyState::Watchdog, NotifyState::Status(&line)]);
                    } else {
                        send(&[NotifyState::Status(&line)]);
                    }
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socket_that_is_gone_ends_the_notifications() {
        let nobody_listens = AtomicBool::new(false);
        let mut tries = 0;
        deliver(&nobody_listens, || {
            tries += 1;
            Err(std::io::Error::other("a passing fault"))
        });
        deliver(&nobody_listens, || {
            tries += 1;
            Err(std::io::ErrorKind::NotFound.into())
        });
        deliver(&nobody_listens, || {
            tries += 1;
            Ok(())
        });
        assert_eq!(
            tries, 2,
            "a passing fault keeps notifying; a gone socket stops it"
        );
    }
}
