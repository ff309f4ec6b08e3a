//! Values inside the file that several tables share: endpoints and the
//! transport policy, loopback hosts, CA files. A leaf: it knows no table.

use std::net::IpAddr;
use std::path::Path;

use rustls::pki_types::CertificateDer;

use super::{invalid, ConfigError};

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
