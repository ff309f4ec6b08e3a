//! One token fetcher per credential across every process.
//!
//! A fetch ([`SharedTokens::fetch`]) first looks at the token stored in
//! Redis: one that is not the token this process already holds, and not
//! yet due for renewal, is adopted without asking Coupa. Otherwise the
//! process takes the fetch lock (`SET NX PX`, renewed while held), asks
//! Coupa, stores the sealed token with its lifetime, announces it and lets
//! go; the others wait for the announcement (pub/sub, with a periodic read
//! as the safety net) and adopt it. So a rotation, a cold start or a burst
//! of 401s across all processes costs one token request: a process whose
//! token was rejected finds the same token in Redis, which it will not
//! adopt, and either fetches under the lock or adopts the replacement the
//! lock holder stores.
//!
//! Client credentials only, and safe to fall back from: while Redis is
//! away a process fetches its own token (Coupa keeps earlier ones valid).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tracing::{debug, info};

use crate::cluster::{short_digest, unix_ms, Cluster, ClusterError};
use crate::config::OAuth;
use crate::secret::Secret;
use crate::token::client::{FetchError, FetchedToken, TokenClient};
use crate::token::TokenStore;

/// How often a waiting process reads the token again, in case an
/// announcement was lost.
const RECHECK: Duration = Duration::from_millis(250);

/// The token as stored (sealed) in Redis.
#[derive(Serialize, Deserialize)]
struct Record {
    access_token: String,
    scope: Option<String>,
    /// When the fetching process sent its token request.
    requested_at_ms: u64,
    lifetime_ms: u64,
}

impl std::fmt::Debug for Record {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Record")
            .field("requested_at_ms", &self.requested_at_ms)
            .field("lifetime_ms", &self.lifetime_ms)
            .finish_non_exhaustive()
    }
}

/// Why a shared fetch did not give a token.
enum Miss {
    /// Redis is away: fetch alone.
    Unavailable,
    /// Coupa refused (our own fetch under the lock).
    Fetch(FetchError),
}

impl From<ClusterError> for Miss {
    fn from(_: ClusterError) -> Self {
        Miss::Unavailable
    }
}

pub struct SharedTokens {
    client: TokenClient,
    cluster: Arc<Cluster>,
    store: Arc<TokenStore>,
    /// Opaque id of the credential in key names.
    digest: String,
    name: String,
    refresh_fraction: f64,
    lock_ttl: Duration,
}

impl SharedTokens {
    pub fn new(
        client: TokenClient,
        cluster: Arc<Cluster>,
        store: Arc<TokenStore>,
        name: &str,
        oauth: &OAuth,
    ) -> Self {
        Self {
            client,
            cluster,
            store,
            digest: credential_digest(oauth),
            name: name.to_owned(),
            refresh_fraction: oauth.refresh_fraction,
            lock_ttl: lock_ttl(oauth),
        }
    }

    pub fn client(&self) -> &TokenClient {
        &self.client
    }

    /// The credential's id in key names.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// A token the cluster agrees on: adopted from Redis, or fetched under
    /// the lock and shared; fetched alone while Redis is away.
    pub async fn fetch(&self) -> Result<FetchedToken, FetchError> {
        match self.fetch_shared().await {
            Ok(token) => Ok(token),
            Err(Miss::Fetch(error)) => Err(error),
            Err(Miss::Unavailable) => {
                debug!(credential = %self.name, "cluster state unavailable; fetching a token alone");
                self.client.fetch().await
            }
        }
    }

    async fn fetch_shared(&self) -> Result<FetchedToken, Miss> {
        let announcements = self.cluster.announcements(&self.digest);
        // A lock holder that died gives up its lock after its TTL; waiting
        // longer than two of those means something else is wrong.
        let give_up = Instant::now() + self.lock_ttl * 2;
        loop {
            let announced = announcements.notified();
            tokio::pin!(announced);
            announced.as_mut().enable();
            if let Some(record) = self.read().await? {
                if self.adoptable(&record) {
                    debug!(credential = %self.name, "adopting the token another process fetched");
                    return Ok(into_fetched(record));
                }
            }
            let lock = self.cluster.keys.lock(&self.digest);
            if self.cluster.try_lock(&lock, self.lock_ttl).await? {
                // Another process may have stored a token and let go of the
                // lock between the read above and taking it: read again.
                match self.read().await {
                    Ok(Some(record)) if self.adoptable(&record) => {
                        self.cluster.unlock(&lock).await;
                        return Ok(into_fetched(record));
                    }
                    Err(miss) => {
                        self.cluster.unlock(&lock).await;
                        return Err(miss);
                    }
                    Ok(_) => return self.fetch_under_lock().await,
                }
            }
            if Instant::now() >= give_up {
                return Err(Miss::Unavailable);
            }
            tokio::select! {
                _ = &mut announced => {}
                _ = tokio::time::sleep(RECHECK) => {}
            }
        }
    }

    /// Worth adopting: still usable, not the token already held (that one
    /// is due or was rejected), and not due for renewal itself.
    fn adoptable(&self, record: &Record) -> bool {
        let now = unix_ms(SystemTime::now());
        let renew_at =
            record.requested_at_ms + (record.lifetime_ms as f64 * self.refresh_fraction) as u64;
        let held = self
            .store
            .current(Instant::now())
            .is_some_and(|t| t.is(&record.access_token));
        !held && now < renew_at
    }

    async fn read(&self) -> Result<Option<Record>, Miss> {
        let key = self.cluster.keys.token(&self.digest);
        match self.cluster.read_sealed(&key).await {
            Ok(None) => Ok(None),
            Ok(Some(plain)) => match serde_json::from_slice::<Record>(&plain) {
                Ok(record) => Ok(Some(record)),
                Err(_) => self.unreadable(&crate::cluster::seal::SealError::CannotOpen),
            },
            Err(crate::cluster::ReadError::Sealed(error)) => self.unreadable(&error),
            Err(crate::cluster::ReadError::Cluster(_)) => Err(Miss::Unavailable),
        }
    }

    /// Overwritten by the next fetch; until then, fetch alone.
    fn unreadable<T>(&self, error: &crate::cluster::seal::SealError) -> Result<T, Miss> {
        tracing::error!(credential = %self.name, %error, "ignoring the shared token");
        Err(Miss::Unavailable)
    }

    /// Holds the lock (extending it) while Coupa is asked, stores and
    /// announces the token, and lets go.
    async fn fetch_under_lock(&self) -> Result<FetchedToken, Miss> {
        self.holding(true);
        info!(credential = %self.name, process = %self.cluster.process, "fetching the token for the cluster");
        let lock = self.cluster.keys.lock(&self.digest);
        let fetched = self
            .cluster
            .while_locked(&lock, self.lock_ttl, self.client.fetch())
            .await;
        if let Ok(token) = &fetched {
            let _ = self.write(token).await;
        }
        self.cluster.unlock(&lock).await;
        self.holding(false);
        fetched.map_err(Miss::Fetch)
    }

    async fn write(&self, token: &FetchedToken) -> Result<(), ClusterError> {
        let key = self.cluster.keys.token(&self.digest);
        let record = Record {
            access_token: token.access_token.expose().to_owned(),
            scope: token.scope.clone(),
            requested_at_ms: unix_ms(token.requested_at_wall),
            lifetime_ms: token.expires_in.as_millis() as u64,
        };
        let plain = serde_json::to_vec(&record).map_err(|e| ClusterError::Redis(e.to_string()))?;
        self.cluster
            .write_sealed(&key, &plain, Some(token.expires_in))
            .await?;
        self.cluster.announce(&self.digest).await
    }

    fn holding(&self, held: bool) {
        self.cluster
            .metrics
            .fetching
            .get_or_create(&[("credential", self.name.clone())])
            .set(i64::from(held));
    }
}

/// The credential as Coupa knows it: client id, token URL and scopes (not
/// the local name, which two deployments may use differently).
pub fn credential_digest(oauth: &OAuth) -> String {
    let mut scopes = oauth.scopes.clone();
    scopes.sort();
    short_digest(&[&oauth.client_id, &oauth.token_url, &scopes.join(" ")])
}

/// How long a fetch lock lasts without renewal: a token request's timeout
/// and some.
pub fn lock_ttl(oauth: &OAuth) -> Duration {
    oauth.request_timeout + Duration::from_secs(5)
}

/// A stored token as if this process had fetched it: the lifetime counts
/// from the fetching process' request time, on this process' clock.
fn into_fetched(record: Record) -> FetchedToken {
    let requested_at_wall = UNIX_EPOCH + Duration::from_millis(record.requested_at_ms);
    let age = SystemTime::now()
        .duration_since(requested_at_wall)
        .unwrap_or_default();
    let now = Instant::now();
    FetchedToken {
        access_token: Secret::new(record.access_token),
        expires_in: Duration::from_millis(record.lifetime_ms),
        scope: record.scope,
        refresh_token: None,
        requested_at: now.checked_sub(age).unwrap_or(now),
        requested_at_wall,
    }
}
