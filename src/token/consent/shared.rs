//! A user-consented grant's state (refresh token, current access token)
//! kept in Redis, sealed, so several processes can serve one consent.
//!
//! Coupa rotates the refresh token on every refresh and the old one dies,
//! so exactly one process may refresh at a time: under the credential's
//! fetch lock, after reading the state again (another process may just have
//! refreshed). The rotated state is written before its access token is
//! used — the invariant the state file keeps — and announced; the others
//! adopt it. While Redis is away nobody refreshes: the current access token
//! keeps serving, and renewal waits for Redis (never a double refresh).

use std::sync::Arc;
use std::time::Duration;

use super::state_file::{self, GrantState};
use crate::cluster::{Cluster, ClusterError, ReadError};
use crate::config::OAuth;
use crate::token::shared::{credential_digest, lock_ttl};

/// Why the shared consent could not be used now.
#[derive(Debug, thiserror::Error)]
pub enum ConsentStateError {
    #[error("the cluster state (Redis) is unavailable, and a refresh token is only renewed under its lock")]
    Unavailable,
    #[error("the consent stored in the cluster state cannot be used: {0}")]
    Unusable(String),
}

impl From<ClusterError> for ConsentStateError {
    fn from(_: ClusterError) -> Self {
        ConsentStateError::Unavailable
    }
}

pub struct SharedConsent {
    pub cluster: Arc<Cluster>,
    /// Digest of the credential in key names.
    pub digest: String,
    pub lock_ttl: Duration,
}

impl SharedConsent {
    pub fn new(cluster: Arc<Cluster>, oauth: &OAuth) -> Self {
        Self {
            cluster,
            digest: credential_digest(oauth),
            lock_ttl: lock_ttl(oauth),
        }
    }

    fn key(&self) -> String {
        self.cluster.keys.consent(&self.digest)
    }

    pub fn lock_key(&self) -> String {
        self.cluster.keys.lock(&self.digest)
    }

    /// The stored state; `None` when no consent was stored yet.
    pub async fn read(&self) -> Result<Option<GrantState>, ConsentStateError> {
        match self.cluster.read_sealed(&self.key()).await {
            Ok(None) => Ok(None),
            Ok(Some(plain)) => state_file::decode(&plain)
                .map(Some)
                .map_err(ConsentStateError::Unusable),
            Err(ReadError::Sealed(error)) => Err(ConsentStateError::Unusable(error.to_string())),
            Err(ReadError::Cluster(_)) => Err(ConsentStateError::Unavailable),
        }
    }

    /// Stores `state` (no expiry: the refresh token's life is Coupa's to
    /// end) and tells the other processes.
    pub async fn write(&self, state: &GrantState) -> Result<(), ConsentStateError> {
        self.cluster
            .write_sealed(&self.key(), &state_file::encode(state), None)
            .await?;
        // With replicas (Sentinel), the rotated refresh token should be on
        // one before its access token is used: a failover right after
        // would otherwise lose it.
        self.cluster.wait_for_replica().await;
        let _ = self.cluster.announce(&self.digest).await;
        Ok(())
    }

    /// Stores `state` only if no consent is stored yet (the first start
    /// after turning `[cluster]` on imports the state file); true if it did.
    pub async fn import(&self, state: &GrantState) -> Result<bool, ConsentStateError> {
        let sealed = self
            .cluster
            .sealer
            .seal(&self.key(), &state_file::encode(state))
            .map_err(|e| ConsentStateError::Unusable(e.to_string()))?;
        let stored: Option<String> = self
            .cluster
            .query(redis::cmd("SET").arg(self.key()).arg(sealed).arg("NX"))
            .await?;
        Ok(stored.is_some())
    }
}
