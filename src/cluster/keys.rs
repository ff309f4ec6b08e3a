//! Key naming: every key of one deployment in front of one instance under
//! `{key_prefix}:{digest of coupa.base_url}`, and opaque digests for the
//! segments that would otherwise name a credential.

use sha2::{Digest, Sha256};

/// The keys of one deployment in front of one instance.
#[derive(Debug, Clone)]
pub struct Keys {
    base: String,
}

impl Keys {
    pub fn new(prefix: &str, base_url: &str) -> Self {
        Self {
            base: format!("{prefix}:{}", short_digest(&[base_url])),
        }
    }
    pub fn budget(&self) -> String {
        format!("{}:budget", self.base)
    }
    pub fn pause(&self) -> String {
        format!("{}:pause", self.base)
    }
    pub fn token(&self, credential: &str) -> String {
        format!("{}:token:{credential}", self.base)
    }
    pub fn consent(&self, credential: &str) -> String {
        format!("{}:consent:{credential}", self.base)
    }
    pub fn lock(&self, credential: &str) -> String {
        format!("{}:lock:{credential}", self.base)
    }
    /// A local token, by the hex SHA-256 of the token.
    pub fn local_token(&self, digest: &str) -> String {
        format!("{}:local_token:{digest}", self.base)
    }
    pub fn procs(&self) -> String {
        format!("{}:procs", self.base)
    }
    pub fn events(&self) -> String {
        format!("{}:events", self.base)
    }
}

/// 16 hex digits of SHA-256 over `parts`: a stable, opaque key segment.
pub fn short_digest(parts: &[&str]) -> String {
    let mut hash = Sha256::new();
    for part in parts {
        hash.update(part.as_bytes());
        hash.update([0]);
    }
    crate::encode::hex(&hash.finalize()[..8])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_share_one_base_per_instance_and_name_no_credential() {
        let keys = Keys::new("coupa-auth-proxy", "https://acme.coupahost.com");
        let other = Keys::new("coupa-auth-proxy", "https://acme-test.coupahost.com");
        assert!(keys.budget().starts_with("coupa-auth-proxy:"));
        assert_ne!(keys.budget(), other.budget(), "instances never mix");
        let digest = short_digest(&["client-id", "secret-looking-scope"]);
        assert_eq!(digest.len(), 16);
        assert!(!keys.token(&digest).contains("client-id"));
        assert_eq!(short_digest(&["a", "b"]), short_digest(&["a", "b"]));
        assert_ne!(
            short_digest(&["ab"]),
            short_digest(&["a", "b"]),
            "parts are separated"
        );
    }
}
