//! Outbound TLS: one rustls client configuration, shared by the upstream
//! pool and the token endpoint, so both trust exactly the same roots.
//!
//! Certificate verification is always on; the only knob is adding roots
//! (`coupa.ca_file`) for instances behind a private CA or for tests.

use std::sync::Arc;

use rustls::pki_types::CertificateDer;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("coupa.ca_file: certificate {index} is not a usable trust root: {source}")]
    BadRoot { index: usize, source: rustls::Error },
    #[error("TLS set-up failed: {0}")]
    Setup(#[from] rustls::Error),
}

/// The crypto every TLS endpoint of the process uses (outbound to Coupa,
/// inbound listener, the intercepting CA, Redis): chosen in one place so a
/// change of provider is one line and the bench's TLS row measures it.
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Public web roots plus `extra_roots`, with [`crypto_provider`].
pub fn client_config(
    extra_roots: &[CertificateDer<'static>],
) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for (index, cert) in extra_roots.iter().enumerate() {
        roots
            .add(cert.clone())
            .map_err(|source| TlsError::BadRoot { index, source })?;
    }
    Ok(
        rustls::ClientConfig::builder_with_provider(crypto_provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

// ---------------------------------------------------------------------------
// Inbound TLS
// ---------------------------------------------------------------------------

use std::path::{Path, PathBuf};

use arc_swap::ArcSwap;
use rustls::pki_types::PrivateKeyDer;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

#[derive(Debug, thiserror::Error)]
pub enum ServerTlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no PEM {what}")]
    Empty { path: PathBuf, what: &'static str },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

fn read_pem(path: &Path) -> Result<Vec<u8>, ServerTlsError> {
    std::fs::read(path).map_err(|source| ServerTlsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Reads a PEM certificate chain and private key into a signing identity.
pub fn load_certified_key(
    cert_file: &Path,
    key_file: &Path,
) -> Result<CertifiedKey, ServerTlsError> {
    let certs = rustls_pemfile::certs(&mut read_pem(cert_file)?.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ServerTlsError::Invalid {
            path: cert_file.to_owned(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(ServerTlsError::Empty {
            path: cert_file.to_owned(),
            what: "certificates",
        });
    }
    let key: PrivateKeyDer<'static> =
        rustls_pemfile::private_key(&mut read_pem(key_file)?.as_slice())
            .map_err(|e| ServerTlsError::Invalid {
                path: key_file.to_owned(),
                reason: e.to_string(),
            })?
            .ok_or_else(|| ServerTlsError::Empty {
                path: key_file.to_owned(),
                what: "private key",
            })?;
    let signing_key = rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| {
        ServerTlsError::Invalid {
            path: key_file.to_owned(),
            reason: e.to_string(),
        }
    })?;
    let certified = CertifiedKey::new(certs, signing_key);
    certified
        .keys_match()
        .map_err(|e| ServerTlsError::Invalid {
            path: key_file.to_owned(),
            reason: format!("the key does not belong to the certificate: {e}"),
        })?;
    Ok(certified)
}

/// The listener's certificate, swappable under live connections: a
/// handshake takes whatever is current; established connections keep the
/// one they negotiated.
#[derive(Debug)]
pub struct ReloadingCert {
    cert_file: PathBuf,
    key_file: PathBuf,
    current: ArcSwap<CertifiedKey>,
}

impl ReloadingCert {
    pub fn load(cert_file: &Path, key_file: &Path) -> Result<Self, ServerTlsError> {
        Ok(Self {
            cert_file: cert_file.to_owned(),
            key_file: key_file.to_owned(),
            current: ArcSwap::from_pointee(load_certified_key(cert_file, key_file)?),
        })
    }

    /// Reads the files again; on failure the current certificate stays.
    /// Returns whether the certificate changed.
    pub fn reload(&self) -> Result<bool, ServerTlsError> {
        let fresh = load_certified_key(&self.cert_file, &self.key_file)?;
        if fresh.cert == self.current.load().cert {
            return Ok(false);
        }
        self.current.store(Arc::new(fresh));
        Ok(true)
    }

    pub fn files(&self) -> [&Path; 2] {
        [&self.cert_file, &self.key_file]
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// The listener's rustls configuration: ALPN h2 and http/1.1, and client
/// certificates required when `client_ca_file` is given (mTLS).
pub fn server_config(
    cert: Arc<ReloadingCert>,
    client_ca_file: Option<&Path>,
) -> Result<rustls::ServerConfig, ServerTlsError> {
    let provider = crypto_provider();
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| ServerTlsError::Invalid {
            path: PathBuf::new(),
            reason: e.to_string(),
        })?;
    let builder = match client_ca_file {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls_pemfile::certs(&mut read_pem(path)?.as_slice()) {
                let cert = cert.map_err(|e| ServerTlsError::Invalid {
                    path: path.to_owned(),
                    reason: e.to_string(),
                })?;
                roots.add(cert).map_err(|e| ServerTlsError::Invalid {
                    path: path.to_owned(),
                    reason: e.to_string(),
                })?;
            }
            if roots.is_empty() {
                return Err(ServerTlsError::Empty {
                    path: path.to_owned(),
                    what: "CA certificates",
                });
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| ServerTlsError::Invalid {
                path: path.to_owned(),
                reason: e.to_string(),
            })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_cert_resolver(cert);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}
