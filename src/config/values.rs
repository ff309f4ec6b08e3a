//! Values inside the file that several tables share: endpoints and the
//! transport policy, loopback hosts, SHA-256 digests in hex, percent
//! escapes, CA files. A leaf: it knows no table.

use std::net::IpAddr;
use std::path::Path;

use rustls::pki_types::CertificateDer;

use super::{invalid, ConfigError};

/// 64 hex digits as the 32 bytes of a SHA-256 digest.
pub(crate) fn parse_sha256(text: &str) -> Option<[u8; 32]> {
    let text = text.trim();
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// `%XX` escapes (and `+`) decoded, as in a URL's user-info.
pub(super) fn percent_decode(text: &str) -> String {
    url::form_urlencoded::parse(format!("p={text}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

/// Parses an upstream URL and applies the transport policy: HTTPS always,
/// plain HTTP only to this machine (tests, a local TLS-terminating sidecar).
pub(super) fn parse_endpoint(key: &str, text: &str) -> Result<reqwest::Url, ConfigError> {
    let url = reqwest::Url::parse(text.trim())
        .map_err(|e| invalid(key, format!("{text:?} is not a URL: {e}")))?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(invalid(key, "must not contain credentials"));
    }
    let host = url
        .host()
        .ok_or_else(|| invalid(key, format!("{text:?} has no host")))?;
    match url.scheme() {
        "https" => Ok(url),
        "http" if is_loopback(&host) => Ok(url),
        "http" => Err(invalid(
            key,
            format!("plain http:// is only allowed for loopback hosts; use https:// for {host}"),
        )),
        other => Err(invalid(
            key,
            format!("unsupported scheme {other:?}; use https://"),
        )),
    }
}

pub(super) fn is_loopback(host: &url::Host<&str>) -> bool {
    match host {
        url::Host::Domain(name) => name.eq_ignore_ascii_case("localhost"),
        url::Host::Ipv4(ip) => IpAddr::V4(*ip).is_loopback(),
        url::Host::Ipv6(ip) => IpAddr::V6(*ip).is_loopback(),
    }
}

/// The PEM certificates of a CA file.
pub(super) fn read_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let data = std::fs::read(path).map_err(|e| {
        invalid(
            "coupa.ca_file",
            format!("cannot read {}: {e}", path.display()),
        )
    })?;
    let certs = rustls_pemfile::certs(&mut data.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid("coupa.ca_file", format!("{}: bad PEM: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(invalid(
            "coupa.ca_file",
            format!("{} holds no PEM certificates", path.display()),
        ));
    }
    Ok(certs)
}
