//! The local CA that integration hosts trust for the one instance name:
//! loaded from `[listen.intercept]` to mint the tunnel's short-lived leaf,
//! or made new by `coupa-auth-proxy ca init`.
//!
//! The CA key can mint a certificate for any name a host that trusts the
//! CA would accept, so it is treated like the client secret: read from a
//! file only its owner may read, and never printed, logged or shown in
//! `Debug`.

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// Why the local CA could not be loaded or used. Never carries key bytes.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{} may be read by other users (mode {mode:o}); the CA key mints certificates the integration hosts trust: chmod 600 it",
        path.display()
    )]
    KeyReadable { path: PathBuf, mode: u32 },
    #[error("{} is not a usable {what}: {reason}", path.display())]
    Invalid {
        path: PathBuf,
        what: &'static str,
        reason: String,
    },
    #[error("the CA key does not belong to the CA certificate {}", path.display())]
    Mismatch { path: PathBuf },
    #[error("cannot mint a certificate: {0}")]
    Mint(String),
    #[error("{} exists already; nothing was written (remove it or choose another --dir)", path.display())]
    Exists { path: PathBuf },
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A CA that can sign leaves.
pub struct LocalCa {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate, sent after the leaf.
    cert: CertificateDer<'static>,
}

impl fmt::Debug for LocalCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LocalCa { <key redacted> }")
    }
}

/// A minted leaf: the chain to send and its key.
pub struct Leaf {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl LocalCa {
    /// Loads the CA from its certificate and key files (PEM). The key file
    /// must not be readable by group or others.
    pub fn load(cert_file: &Path, key_file: &Path) -> Result<Self, CaError> {
        let read = |path: &Path| {
            std::fs::read_to_string(path).map_err(|source| CaError::Read {
                path: path.to_owned(),
                source,
            })
        };
        let cert_pem = read(cert_file)?;
        key_private(key_file)?;
        let key_pem = read(key_file)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| CaError::Invalid {
            path: key_file.to_owned(),
            what: "private key (PEM, PKCS#8)",
            reason: e.to_string(),
        })?;
        let cert = rustls_pemfile::certs(&mut cert_pem.as_bytes())
            .next()
            .and_then(Result::ok)
            .ok_or_else(|| CaError::Invalid {
                path: cert_file.to_owned(),
                what: "CA certificate (PEM)",
                reason: "no certificate in it".into(),
            })?;
        let issuer = Issuer::from_ca_cert_der(&cert, key).map_err(|e| CaError::Invalid {
            path: cert_file.to_owned(),
            what: "CA certificate (PEM)",
            reason: e.to_string(),
        })?;
        let ca = Self { issuer, cert };
        ca.check_pair(cert_file)?;
        Ok(ca)
    }

    /// A leaf signed by this key must verify against the certificate.
    fn check_pair(&self, cert_file: &Path) -> Result<(), CaError> {
        let leaf = self.issue("pair-check.invalid", Duration::from_secs(60))?;
        let end_entity = rustls::server::ParsedCertificate::try_from(&leaf.chain[0])
            .map_err(|e| CaError::Mint(e.to_string()))?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert.clone()).map_err(|e| CaError::Invalid {
            path: cert_file.to_owned(),
            what: "CA certificate (PEM)",
            reason: e.to_string(),
        })?;
        let provider = crate::tls::crypto_provider();
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &end_entity,
            &roots,
            &[],
            rustls::pki_types::UnixTime::now(),
            provider.signature_verification_algorithms.all,
        )
        .map_err(|_| CaError::Mismatch {
            path: cert_file.to_owned(),
        })
    }

    /// A server certificate for `host` (a DNS name, or an IP address as an
    /// IP SAN), valid from a few minutes ago for `lifetime`.
    pub fn issue(&self, host: &str, lifetime: Duration) -> Result<Leaf, CaError> {
        let key = KeyPair::generate().map_err(|e| CaError::Mint(e.to_string()))?;
        let cert = leaf_params(host, lifetime)?
            .signed_by(&key, &self.issuer)
            .map_err(|e| CaError::Mint(e.to_string()))?;
        Ok(Leaf {
            chain: vec![cert.der().clone(), self.cert.clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        })
    }
}

fn leaf_params(host: &str, lifetime: Duration) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, host);
    params.subject_alt_names = vec![match host.parse::<IpAddr>() {
        Ok(ip) => SanType::IpAddress(ip),
        Err(_) => SanType::DnsName(
            host.try_into()
                .map_err(|e: rcgen::Error| CaError::Mint(format!("{host:?}: {e}")))?,
        ),
    }];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let now = time::OffsetDateTime::now_utc();
    // A little back-dating: hosts with a clock a few minutes behind.
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + time::Duration::seconds(lifetime.as_secs() as i64);
    Ok(params)
}

/// The key file must be private to its owner.
fn key_private(path: &Path) -> Result<(), CaError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .map_err(|source| CaError::Read {
            path: path.to_owned(),
            source,
        })?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(CaError::KeyReadable {
            path: path.to_owned(),
            mode: mode & 0o777,
        });
    }
    Ok(())
}

/// What `ca init` wrote.
pub struct Written {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    /// With `--host`: the leaf's certificate and key.
    pub leaf: Option<(PathBuf, PathBuf)>,
}

/// How long `ca init`'s CA and leaf are valid.
const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
const STATIC_LEAF_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);

/// Writes a new CA (`ca.pem`, `ca.key` mode 0600) into `dir`, and with
/// `host` a leaf for it (`HOST.pem`, `HOST.key` mode 0600). Refuses to
/// overwrite any file.
pub fn init(dir: &Path, host: Option<&str>) -> Result<Written, CaError> {
    let ca_cert = dir.join("ca.pem");
    let ca_key = dir.join("ca.key");
    let leaf_files = host.map(|h| (dir.join(format!("{h}.pem")), dir.join(format!("{h}.key"))));
    for path in [&ca_cert, &ca_key]
        .into_iter()
        .chain(leaf_files.iter().flat_map(|(c, k)| [c, k]))
    {
        if path.exists() {
            return Err(CaError::Exists { path: path.clone() });
        }
    }
    std::fs::create_dir_all(dir).map_err(|source| CaError::Write {
        path: dir.to_owned(),
        source,
    })?;
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, "coupa-auth-proxy local CA");
    // Signs leaves only, never another CA.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + time::Duration::seconds(CA_LIFETIME.as_secs() as i64);
    let key = KeyPair::generate().map_err(|e| CaError::Mint(e.to_string()))?;
    let cert = params
        .self_signed(&key)
        .map_err(|e| CaError::Mint(e.to_string()))?;
    let leaf = match host {
        None => None,
        Some(host) => {
            let issuer = Issuer::new(params, &key);
            let leaf_key = KeyPair::generate().map_err(|e| CaError::Mint(e.to_string()))?;
            let leaf = leaf_params(host, STATIC_LEAF_LIFETIME)?
                .signed_by(&leaf_key, &issuer)
                .map_err(|e| CaError::Mint(e.to_string()))?;
            // The chain a server presents: the leaf, then the CA.
            Some((
                format!("{}{}", leaf.pem(), cert.pem()),
                leaf_key.serialize_pem(),
            ))
        }
    };
    write_new(&ca_cert, cert.pem().as_bytes(), 0o644)?;
    write_new(&ca_key, key.serialize_pem().as_bytes(), 0o600)?;
    if let (Some((cert_path, key_path)), Some((chain, leaf_key))) = (&leaf_files, leaf) {
        write_new(cert_path, chain.as_bytes(), 0o644)?;
        write_new(key_path, leaf_key.as_bytes(), 0o600)?;
    }
    Ok(Written {
        ca_cert,
        ca_key,
        leaf: leaf_files,
    })
}

/// Creates `path` (never over an existing file) with `mode` from the start.
fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), CaError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let failed = |source| CaError::Write {
        path: path.to_owned(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::AlreadyExists => CaError::Exists {
                path: path.to_owned(),
            },
            _ => failed(source),
        })?;
    file.write_all(contents).map_err(failed)?;
    file.sync_all().map_err(failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_writes_a_ca_that_loads_and_mints_leaves_for_names_and_addresses() {
        let dir = std::env::temp_dir().join(format!("ca-init-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let written = init(&dir, Some("acme.coupahost.com")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&written.ca_key), 0o600);
        let (leaf_cert, leaf_key) = written.leaf.clone().unwrap();
        assert_eq!(mode(&leaf_key), 0o600);
        assert!(
            std::fs::read_to_string(&leaf_cert)
                .unwrap()
                .matches("BEGIN CERTIFICATE")
                .count()
                == 2
        );
        // The leaf serves as [listen.tls].
        crate::tls::load_certified_key(&leaf_cert, &leaf_key).unwrap();

        let ca = LocalCa::load(&written.ca_cert, &written.ca_key).unwrap();
        assert_eq!(format!("{ca:?}"), "LocalCa { <key redacted> }");
        for host in ["acme.coupahost.com", "127.0.0.1", "::1"] {
            let leaf = ca.issue(host, Duration::from_secs(3600)).unwrap();
            assert_eq!(leaf.chain.len(), 2);
        }

        // Nothing is overwritten.
        let again = init(&dir, None).err().unwrap();
        assert!(matches!(again, CaError::Exists { .. }), "{again}");

        // A key others may read is refused, naming the file and the fix.
        std::fs::set_permissions(&written.ca_key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let refused = LocalCa::load(&written.ca_cert, &written.ca_key)
            .err()
            .unwrap()
            .to_string();
        assert!(refused.contains("chmod 600"), "{refused}");
        assert!(!refused.contains("PRIVATE KEY"), "{refused}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_key_of_another_ca_is_refused() {
        let dir = std::env::temp_dir().join(format!("ca-mismatch-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let one = init(&dir.join("one"), None).unwrap();
        let two = init(&dir.join("two"), None).unwrap();
        let refused = LocalCa::load(&one.ca_cert, &two.ca_key).err().unwrap();
        assert!(matches!(refused, CaError::Mismatch { .. }), "{refused}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
