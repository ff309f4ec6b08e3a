//! Forward-proxy mode for the one instance (`[listen.intercept]`): an
//! integration that can only be given a proxy (`https.proxyHost`,
//! `HTTPS_PROXY`, a connector's proxy setting) keeps its
//! `https://<instance>` URL and sends `CONNECT <instance>:443`. The server
//! answers `200`, terminates TLS inside the tunnel with a leaf for the
//! instance name minted from a local CA the integration's host trusts
//! ([`ca`]), and serves what comes through it like any other connection.
//!
//! Only the instance's own host and port are accepted: any other target
//! is refused with `403` and nothing is opened, so the proxy never becomes
//! an open or egress proxy. The leaf lives a day and is renewed after half
//! of that, when the next tunnel opens; no restart.

pub mod ca;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio_rustls::TlsAcceptor;

pub use ca::{CaError, LocalCa};

/// How long a minted leaf is valid, and after how much of it a new one is
/// minted.
const LEAF_LIFETIME: Duration = Duration::from_secs(24 * 3600);
const LEAF_RENEW_AFTER: Duration = Duration::from_secs(12 * 3600);

/// The instance a tunnel may reach, and the certificate it is served with.
pub struct Intercept {
    /// Lower case, without brackets for an IPv6 address.
    host: String,
    port: u16,
    ca: LocalCa,
    current: ArcSwap<Minted>,
    /// A leaf is renewed after this much of its life.
    renew_after: Duration,
    /// One renewal at a time.
    renewing: Mutex<()>,
}

struct Minted {
    acceptor: TlsAcceptor,
    renew_at: Instant,
}

impl std::fmt::Debug for Intercept {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Intercept")
            .field("instance", &self.instance())
            .finish_non_exhaustive()
    }
}

/// Why a `CONNECT` is not tunnelled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "this proxy opens CONNECT tunnels only to the Coupa instance {instance}, not {target}"
    )]
    OtherTarget { instance: String, target: String },
    #[error("CONNECT needs a target of the form host:port, got {0:?}")]
    Malformed(String),
}

impl Intercept {
    /// For the instance at `host` (a name or an address) and `port`.
    pub fn new(ca: LocalCa, host: &str, port: u16) -> Result<Self, CaError> {
        Self::renewed_after(ca, host, port, LEAF_RENEW_AFTER)
    }

    fn renewed_after(
        ca: LocalCa,
        host: &str,
        port: u16,
        renew_after: Duration,
    ) -> Result<Self, CaError> {
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase();
        let current = ArcSwap::from_pointee(mint(&ca, &host, renew_after)?);
        Ok(Self {
            host,
            port,
            ca,
            current,
            renew_after,
            renewing: Mutex::new(()),
        })
    }

    /// `host:port` as a client names it.
    pub fn instance(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// Whether a `CONNECT` to `target` (authority form) is the instance.
    /// An address for a named instance is another target: the leaf would
    /// not match it, and it may be another host.
    pub fn check(&self, target: &str) -> Result<(), Refusal> {
        let (host, port) = split_authority(target)
            .ok_or_else(|| Refusal::Malformed(target.chars().take(200).collect()))?;
        if host.eq_ignore_ascii_case(&self.host) && port == self.port {
            Ok(())
        } else {
            Err(Refusal::OtherTarget {
                instance: self.instance(),
                target: target.chars().take(200).collect(),
            })
        }
    }

    /// The TLS acceptor for a tunnel, with a leaf renewed when due.
    pub fn acceptor(&self) -> TlsAcceptor {
        let current = self.current.load();
        if Instant::now() < current.renew_at {
            return current.acceptor.clone();
        }
        if let Ok(_one) = self.renewing.try_lock() {
            match mint(&self.ca, &self.host, self.renew_after) {
                Ok(minted) => {
                    tracing::info!(instance = %self.instance(), "minted a new tunnel certificate from the local CA");
                    self.current.store(Arc::new(minted));
                }
                // The current leaf is still valid for half a day.
                Err(error) => {
                    tracing::warn!(%error, "cannot renew the tunnel certificate; the current one serves on")
                }
            }
        }
        self.current.load().acceptor.clone()
    }
}

fn mint(ca: &LocalCa, host: &str, renew_after: Duration) -> Result<Minted, CaError> {
    let leaf = ca.issue(host, LEAF_LIFETIME)?;
    let mut config = rustls::ServerConfig::builder_with_provider(crate::tls::crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| CaError::Mint(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(leaf.chain, leaf.key)
        .map_err(|e| CaError::Mint(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Minted {
        acceptor: TlsAcceptor::from(Arc::new(config)),
        renew_at: Instant::now() + renew_after,
    })
}

/// `host:port` or `[v6]:port`; the port is required in a `CONNECT`.
fn split_authority(target: &str) -> Option<(&str, u16)> {
    let (host, port) = target.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    let host = match host.strip_prefix('[') {
        Some(v6) => v6.strip_suffix(']')?,
        None if host.contains(':') => return None,
        None => host,
    };
    (!host.is_empty()).then_some((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local_ca(tag: &str) -> LocalCa {
        let dir = std::env::temp_dir().join(format!("intercept-ca-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let written = ca::init(&dir, None).unwrap();
        let ca = LocalCa::load(&written.ca_cert, &written.ca_key).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        ca
    }

    #[test]
    fn a_leaf_due_for_renewal_is_replaced_without_a_restart() {
        let due =
            Intercept::renewed_after(local_ca("due"), "acme.coupahost.com", 443, Duration::ZERO)
                .unwrap();
        let first = due.acceptor();
        let second = due.acceptor();
        assert!(!Arc::ptr_eq(first.config(), second.config()), "a new leaf");
        let fresh = Intercept::new(local_ca("fresh"), "acme.coupahost.com", 443).unwrap();
        assert!(Arc::ptr_eq(
            fresh.acceptor().config(),
            fresh.acceptor().config()
        ));
    }

    fn intercept(host: &str, port: u16) -> Intercept {
        Intercept::new(local_ca(&format!("{host}-{port}")), host, port).unwrap()
    }

    #[test]
    fn only_the_instance_itself_is_a_target() {
        let named = intercept("Acme.CoupaHost.com", 443);
        assert_eq!(named.check("acme.coupahost.com:443"), Ok(()));
        assert_eq!(named.check("ACME.coupahost.com:443"), Ok(()));
        for other in [
            "evil.example:443",
            "acme.coupahost.com:8443",
            "127.0.0.1:443",
            "acme.coupahost.com.evil.example:443",
        ] {
            let refused = named.check(other).unwrap_err();
            assert!(
                refused.to_string().contains("acme.coupahost.com:443"),
                "{refused}"
            );
        }
        for malformed in ["acme.coupahost.com", "acme:port", ":443", "[::1:443"] {
            assert!(matches!(named.check(malformed), Err(Refusal::Malformed(_))));
        }
        let v6 = intercept("[::1]", 8443);
        assert_eq!(v6.instance(), "[::1]:8443");
        assert_eq!(v6.check("[::1]:8443"), Ok(()));
        assert!(v6.check("::1:8443").is_err());
    }
}
