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

/// Public web roots plus `extra_roots`, with ring as the crypto provider.
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
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}
