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

use super::ratelimit::{Lane, Limiter};
use super::share::Share;
use crate::config::Integration;
use crate::insight::{Insight, Usage};

/// One integration as the request path needs it.
pub struct IntegrationKey {
    /// For log lines; shared, so identifying a request copies nothing.
    pub name: Arc<str>,
    api_key_sha256: Option<[u8; 32]>,
    /// The local OAuth client: (client id, secret digest).
    local_client: Option<(String, [u8; 32])>,
    /// Index of the credential whose token the integration gets.
    pub credential: usize,
    /// Where the migration view counts its requests, resolved once.
    pub usage: Arc<Usage>,
    /// Its cap on requests at Coupa at once.
    pub share: Arc<Share>,
    /// `Accept` for its requests that state no preference: its own
    /// `accept`, else `coupa.accept`.
    pub accept: HeaderValue,
    /// Its queue for Coupa's budget, with `[coupa.rate_limit]`.
    pub lane: Option<Arc<Lane>>,
}

impl IntegrationKey {
    /// The local client secret's digest, if it has a local client.
    pub fn local_secret(&self) -> Option<&[u8; 32]> {
        self.local_client.as_ref().map(|(_, digest)| digest)
    }
}

/// The configured integrations; empty means no authentication.
#[derive(Default)]
pub struct Integrations {
    keys: Vec<Arc<IntegrationKey>>,
    has_local_clients: bool,
}

impl Integrations {
    /// `previous`: the integrations before a reload; one that stays with
    /// the same cap keeps its share, so requests in flight still count.
    /// `default_accept` is `coupa.accept`.
    pub fn from_config(
        integrations: &[Integration],
        default_accept: &HeaderValue,
        insight: &Insight,
        limiter: Option<&Limiter>,
        previous: Option<&Integrations>,
    ) -> Self {
        let keys: Vec<_> = integrations
            .iter()
            .map(|i| {
                let share = previous
                    .and_then(|p| p.by_name(&i.name))
                    .map(|old| old.share.clone())
                    .filter(|share| share.cap() == i.max_concurrent)
                    .unwrap_or_else(|| Arc::new(Share::new(i.max_concurrent)));
                Arc::new(IntegrationKey {
                    name: Arc::from(i.name.as_str()),
                    api_key_sha256: i.api_key_sha256,
                    local_client: i
                        .local_client
                        .as_ref()
                        .map(|c| (c.client_id.clone(), c.secret_sha256)),
                    credential: i.credential,
                    usage: insight.usage(&i.name),
                    share,
                    accept: i.accept.clone().unwrap_or_else(|| default_accept.clone()),
                    lane: limiter.map(|limiter| limiter.lane(&i.name, &i.rate)),
                })
            })
            .collect();
        Self {
            has_local_clients: keys.iter().any(|k| k.local_client.is_some()),
            keys,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Whether any integration can fetch local tokens.
    pub fn has_local_clients(&self) -> bool {
        self.has_local_clients
    }

    /// The integration whose key this is, if any.
    pub fn identify(&self, legacy_key: &HeaderValue) -> Option<&Arc<IntegrationKey>> {
        let digest: [u8; 32] = Sha256::digest(legacy_key.as_bytes()).into();
        let mut found = None;
        // No early exit: every configured digest is compared.
        for key in &self.keys {
            if let Some(expected) = &key.api_key_sha256 {
                if bool::from(expected.ct_eq(&digest)) {
                    found = Some(key);
                }
            }
        }
        found
    }

    /// The integration whose local client this is, if the secret matches.
    /// The secret is hashed and compared with every local client's digest
    /// whatever the id, so a refusal takes the same time for an unknown
    /// id and a wrong secret.
    pub fn local_client(&self, client_id: &str, secret: &str) -> Option<&Arc<IntegrationKey>> {
        let digest: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
        let mut found = None;
        for key in &self.keys {
            if let Some((id, expected)) = &key.local_client {
                let secret_matches = bool::from(expected.ct_eq(&digest));
                if secret_matches && id == client_id {
                    found = Some(key);
                }
            }
        }
        found
    }

    /// The integration `name`, if it is still configured.
    pub fn by_name(&self, name: &str) -> Option<&Arc<IntegrationKey>> {
        self.keys.iter().find(|k| &*k.name == name)
    }
}

/// Hex SHA-256 of a legacy key, as `api_key_sha256` wants it.
pub fn hash_key(key: &str) -> String {
    crate::encode::hex(&Sha256::digest(key.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn integrations() -> Integrations {
        let hash = |k: &str| -> [u8; 32] { Sha256::digest(k.as_bytes()).into() };
        use crate::config::test_support::{load, MINIMAL};
        let config = load(MINIMAL).unwrap();
        let insight = Insight::new(&config);
        Integrations::from_config(
            &[
                Integration {
                    name: "erp".into(),
                    api_key_sha256: Some(hash("erp-key")),
                    local_client: None,
                    credential: 0,
                    max_concurrent: 4,
                    accept: None,
                    rate: Default::default(),
                },
                Integration {
                    name: "suppliers".into(),
                    api_key_sha256: Some(hash("supplier-key")),
                    local_client: None,
                    credential: 1,
                    max_concurrent: 4,
                    accept: Some(HeaderValue::from_static("application/xml")),
                    rate: Default::default(),
                },
                Integration {
                    name: "snaplogic".into(),
                    api_key_sha256: None,
                    local_client: Some(crate::config::LocalClient {
                        client_id: "snap".into(),
                        secret_sha256: hash("local-secret"),
                    }),
                    credential: 0,
                    max_concurrent: 4,
                    accept: None,
                    rate: Default::default(),
                },
            ],
            &HeaderValue::from_static("application/json"),
            &insight,
            None,
            None,
        )
    }

    #[test]
    fn a_known_key_selects_its_integration_and_credential() {
        let all = integrations();
        let found = all
            .identify(&HeaderValue::from_static("supplier-key"))
            .unwrap();
        assert_eq!(&*found.name, "suppliers");
        assert_eq!(found.credential, 1);
        assert!(all.has_local_clients());
    }

    #[test]
    fn unknown_keys_select_nothing() {
        let all = integrations();
        assert!(all
            .identify(&HeaderValue::from_static("erp-key "))
            .is_none());
        assert!(all.identify(&HeaderValue::from_static("")).is_none());
    }

    #[test]
    fn a_local_client_needs_its_id_and_its_secret() {
        let all = integrations();
        assert_eq!(
            &*all.local_client("snap", "local-secret").unwrap().name,
            "snaplogic"
        );
        assert!(all.local_client("snap", "wrong").is_none());
        assert!(all.local_client("other", "local-secret").is_none());
        assert!(
            all.local_client("erp", "erp-key").is_none(),
            "a legacy key is not a client"
        );
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
