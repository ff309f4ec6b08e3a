//! The local tokens the proxy issues: opaque random strings that stand
//! for an integration. Kept by the SHA-256 of the token, so memory (and
//! Redis, with `[cluster]`) holds nothing a client could present.
//!
//! Looking a token up hashes it first: the map lookup then depends on the
//! digest, which an attacker cannot steer towards a real token's, and the
//! entry found is compared with the digest in constant time.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::time::Instant;
use tracing::warn;

use crate::cluster::{unix_ms, Cluster};
use crate::encode::{hex, parse_sha256};
use crate::secret::Secret;

/// Live tokens kept per integration; a tool that fetches more than this
/// (a new token per call) pushes out its oldest, not the process's memory.
pub const MAX_PER_INTEGRATION: usize = 1_000;

/// What a local token stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub integration: Arc<str>,
    /// The local client secret's digest at issue: a changed secret (on
    /// reload) ends the tokens issued under the old one.
    pub secret_sha256: [u8; 32],
    pub expires_at: Instant,
}

/// The shape kept in Redis (sealed), with a wall-clock expiry.
#[derive(serde::Serialize, serde::Deserialize)]
struct Shared {
    integration: String,
    secret_sha256: String,
    expires_at_unix_ms: u64,
}

#[derive(Default)]
pub struct LocalTokens {
    by_digest: RwLock<HashMap<[u8; 32], Grant>>,
    cluster: Option<Arc<Cluster>>,
}

impl LocalTokens {
    pub fn new(cluster: Option<Arc<Cluster>>) -> Self {
        Self {
            by_digest: RwLock::default(),
            cluster,
        }
    }

    /// A new token for `integration`, valid for `lifetime`.
    pub async fn issue(
        &self,
        integration: Arc<str>,
        secret_sha256: [u8; 32],
        lifetime: Duration,
    ) -> Secret {
        let mut raw = [0u8; 32];
        rand::rng().fill_bytes(&mut raw);
        let token = URL_SAFE_NO_PAD.encode(raw);
        let digest = digest(&token);
        let grant = Grant {
            integration,
            secret_sha256,
            expires_at: Instant::now() + lifetime,
        };
        if let Some(cluster) = &self.cluster {
            let shared = Shared {
                integration: grant.integration.to_string(),
                secret_sha256: hex(&secret_sha256),
                expires_at_unix_ms: unix_ms(SystemTime::now() + lifetime),
            };
            let plain = serde_json::to_vec(&shared).unwrap_or_default();
            if let Err(error) = cluster
                .write_sealed(
                    &cluster.keys.local_token(&hex(&digest)),
                    &plain,
                    Some(lifetime),
                )
                .await
            {
                warn!(
                    integration = &*grant.integration,
                    %error,
                    "local token kept by this process only: the other proxies will answer 401 until the tool fetches again"
                );
            }
        }
        self.insert(digest, grant);
        Secret::new(token)
    }

    fn insert(&self, digest: [u8; 32], grant: Grant) {
        let Ok(mut all) = self.by_digest.write() else {
            return;
        };
        let now = Instant::now();
        let held = all
            .values()
            .filter(|g| g.integration == grant.integration)
            .count();
        if held >= MAX_PER_INTEGRATION {
            all.retain(|_, g| g.expires_at > now);
            let oldest = all
                .iter()
                .filter(|(_, g)| g.integration == grant.integration)
                .min_by_key(|(_, g)| g.expires_at)
                .map(|(d, _)| *d);
            let still = all
                .values()
                .filter(|g| g.integration == grant.integration)
                .count();
            if let (Some(oldest), true) = (oldest, still >= MAX_PER_INTEGRATION) {
                all.remove(&oldest);
            }
        }
        all.insert(digest, grant);
    }

    /// The grant `token` stands for, if it is live: from memory, or (with
    /// `[cluster]`) from another proxy's issue.
    pub async fn lookup(&self, token: &str) -> Option<Grant> {
        let digest = digest(token);
        let now = Instant::now();
        let found = self.by_digest.read().ok().and_then(|all| {
            all.get_key_value(&digest)
                .filter(|(d, _)| bool::from(d.ct_eq(&digest)))
                .map(|(_, g)| g.clone())
        });
        match found {
            Some(grant) if grant.expires_at > now => return Some(grant),
            Some(_) => {
                if let Ok(mut all) = self.by_digest.write() {
                    all.remove(&digest);
                }
                return None;
            }
            None => {}
        }
        let cluster = self.cluster.as_ref()?;
        let plain = cluster
            .read_sealed(&cluster.keys.local_token(&hex(&digest)))
            .await
            .ok()??;
        let shared: Shared = serde_json::from_slice(&plain).ok()?;
        let left = Duration::from_millis(
            shared
                .expires_at_unix_ms
                .checked_sub(unix_ms(SystemTime::now()))?,
        );
        let grant = Grant {
            integration: Arc::from(shared.integration),
            secret_sha256: parse_sha256(&shared.secret_sha256)?,
            expires_at: now + left,
        };
        self.insert(digest, grant.clone());
        Some(grant)
    }

    /// Live tokens held in this process's memory.
    pub fn live(&self) -> usize {
        let now = Instant::now();
        self.by_digest
            .read()
            .map(|all| all.values().filter(|g| g.expires_at > now).count())
            .unwrap_or(0)
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_token_stands_for_its_integration_until_it_expires() {
        let tokens = LocalTokens::new(None);
        let token = tokens
            .issue("snaplogic".into(), [7; 32], Duration::from_secs(60))
            .await;
        let grant = tokens.lookup(token.expose()).await.unwrap();
        assert_eq!(&*grant.integration, "snaplogic");
        assert_eq!(grant.secret_sha256, [7; 32]);
        assert!(tokens.lookup("not-a-token").await.is_none());
        assert!(tokens.lookup(&token.expose()[1..]).await.is_none());
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(tokens.lookup(token.expose()).await.is_none(), "expired");
        assert_eq!(tokens.live(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_are_random_and_memory_is_capped_per_integration() {
        let tokens = LocalTokens::new(None);
        let first = tokens
            .issue("a".into(), [0; 32], Duration::from_secs(60))
            .await;
        tokio::time::advance(Duration::from_millis(1)).await;
        let mut last = first.expose().to_owned();
        for _ in 0..MAX_PER_INTEGRATION {
            let next = tokens
                .issue("a".into(), [0; 32], Duration::from_secs(60))
                .await;
            assert_ne!(next.expose(), last);
            assert_eq!(next.expose().len(), 43, "32 random bytes, base64url");
            last = next.expose().to_owned();
        }
        let other = tokens
            .issue("b".into(), [0; 32], Duration::from_secs(60))
            .await;
        assert_eq!(tokens.live(), MAX_PER_INTEGRATION + 1);
        assert!(
            tokens.lookup(first.expose()).await.is_none(),
            "the oldest went"
        );
        assert!(tokens.lookup(&last).await.is_some());
        assert!(
            tokens.lookup(other.expose()).await.is_some(),
            "b is not pushed out by a"
        );
    }
}
