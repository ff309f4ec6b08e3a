//! Which integration sent a request: its legacy `X-COUPA-API-KEY`, hashed,
//! selects the integration and so the OAuth credential whose token it gets.
//!
//! Only SHA-256 digests of the keys are configured, and a request's key is
//! compared with every one of them in constant time, so neither the config
//! nor the timing of a refusal gives a key away.

use std::sync::Arc;

use http::HeaderValue;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::Integration;

/// One integration as the request path needs it.
#[derive(Clone)]
pub struct IntegrationKey {
    /// For log lines; shared, so identifying a request copies nothing.
    pub name: Arc<str>,
    api_key_sha256: [u8; 32],
    /// Index of the credential whose token the integration gets.
    pub credential: usize,
}

/// The configured integrations; empty means no authentication.
#[derive(Clone, Default)]
pub struct Integrations {
    keys: Vec<IntegrationKey>,
}

impl Integrations {
    pub fn from_config(integrations: &[Integration]) -> Self {
        Self {
            keys: integrations
                .iter()
                .map(|i| IntegrationKey {
                    name: Arc::from(i.name.as_str()),
                    api_key_sha256: i.api_key_sha256,
                    credential: i.credential,
                })
                .collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The integration whose key this is, if any.
    pub fn identify(&self, legacy_key: Option<&HeaderValue>) -> Option<&IntegrationKey> {
        let digest: [u8; 32] = Sha256::digest(legacy_key?.as_bytes()).into();
        let mut found = None;
        // No early exit: every configured digest is compared.
        for key in &self.keys {
            if bool::from(key.api_key_sha256.ct_eq(&digest)) {
                found = Some(key);
            }
        }
        found
    }
}

/// Hex SHA-256 of a legacy key, as `api_key_sha256` wants it.
pub fn hash_key(key: &str) -> String {
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn integrations() -> Integrations {
        let hash = |k: &str| -> [u8; 32] { Sha256::digest(k.as_bytes()).into() };
        Integrations::from_config(&[
            Integration {
                name: "erp".into(),
                api_key_sha256: hash("erp-key"),
                credential: 0,
            },
            Integration {
                name: "suppliers".into(),
                api_key_sha256: hash("supplier-key"),
                credential: 1,
            },
        ])
    }

    #[test]
    fn a_known_key_selects_its_integration_and_credential() {
        let all = integrations();
        let found = all
            .identify(Some(&HeaderValue::from_static("supplier-key")))
            .unwrap();
        assert_eq!(&*found.name, "suppliers");
        assert_eq!(found.credential, 1);
    }

    #[test]
    fn unknown_or_missing_keys_select_nothing() {
        let all = integrations();
        assert!(all.identify(None).is_none());
        assert!(all
            .identify(Some(&HeaderValue::from_static("erp-key ")))
            .is_none());
        assert!(all.identify(Some(&HeaderValue::from_static(""))).is_none());
    }

    #[test]
    fn hash_key_matches_the_documented_example() {
        // The example in the issue and README: sha256("password").
        assert_eq!(
            hash_key("password"),
            "5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8"
        );
    }
}
