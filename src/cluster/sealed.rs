//! Entries stored sealed (AES-256-GCM, bound to their key): what Redis
//! holds never shows a token.

use std::time::Duration;

use super::{seal, Cluster, ClusterError};

impl Cluster {
    /// Reads and opens the sealed entry at `key`. `Ok(None)`: no entry;
    /// an entry that does not open is an error (never its content).
    pub async fn read_sealed(&self, key: &str) -> Result<Option<Vec<u8>>, ReadError> {
        let sealed: Option<String> = self.query(redis::cmd("GET").arg(key)).await?;
        match sealed {
            None => Ok(None),
            Some(sealed) => self
                .sealer
                .open(key, &sealed)
                .map(Some)
                .map_err(ReadError::Sealed),
        }
    }

    /// Seals `plain` and stores it at `key` (expiring after `ttl` if given).
    pub async fn write_sealed(
        &self,
        key: &str,
        plain: &[u8],
        ttl: Option<Duration>,
    ) -> Result<(), ClusterError> {
        let sealed = self
            .sealer
            .seal(key, plain)
            .map_err(|e| ClusterError::Redis(e.to_string()))?;
        let mut cmd = redis::cmd("SET");
        cmd.arg(key).arg(sealed);
        if let Some(ttl) = ttl {
            cmd.arg("PX").arg(ttl.as_millis().max(1) as u64);
        }
        self.query::<()>(&cmd).await
    }
}

/// Why a sealed entry could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Sealed(seal::SealError),
}
