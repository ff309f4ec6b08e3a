//! Who may read the status page and `/status.json`: anyone on a loopback
//! listener (they are on this machine already); off loopback only a client
//! with the password whose SHA-256 is `admin.status_password_sha256`, sent
//! as HTTP Basic (a browser prompts for it; any user name). Probes and
//! `/metrics` never ask. Wrong passwords count as guesses
//! ([`crate::guesses`]).

use std::net::SocketAddr;

use http::header::AUTHORIZATION;
use http::HeaderMap;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The status page's door.
#[derive(Clone, Copy)]
pub enum StatusAccess {
    /// The admin listener is on loopback.
    Loopback,
    /// Off loopback: HTTP Basic with the password of this digest.
    Password([u8; 32]),
    /// Off loopback without `admin.status_password_sha256`: closed.
    Closed,
}

/// What a request to the status page gets.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    /// No credential was sent (a browser's first try): ask for one.
    Asked,
    /// A wrong password: a guess.
    Refused,
    /// No password is configured off loopback.
    Closed,
}

impl StatusAccess {
    /// The door for a listener on `address` (the socket's own address,
    /// which a handed-over socket may choose) with `password_sha256`.
    pub fn new(address: Option<SocketAddr>, password_sha256: Option<[u8; 32]>) -> Self {
        let loopback = address.is_some_and(|a| a.ip().is_loopback());
        match (loopback, password_sha256) {
            (true, _) => StatusAccess::Loopback,
            (false, Some(digest)) => StatusAccess::Password(digest),
            (false, None) => StatusAccess::Closed,
        }
    }

    /// Whether the listener is reachable from other machines.
    pub fn off_loopback(self) -> bool {
        !matches!(self, StatusAccess::Loopback)
    }

    pub fn check(self, headers: &HeaderMap) -> Verdict {
        let digest = match self {
            StatusAccess::Loopback => return Verdict::Allowed,
            StatusAccess::Closed => return Verdict::Closed,
            StatusAccess::Password(digest) => digest,
        };
        let Some(value) = headers.get(AUTHORIZATION) else {
            return Verdict::Asked;
        };
        match crate::basic_auth::decode_plain(value.as_bytes()) {
            Ok((_, password)) if bool::from(Sha256::digest(password.as_bytes()).ct_eq(&digest)) => {
                Verdict::Allowed
            }
            _ => Verdict::Refused,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine as _;
    use http::HeaderValue;

    fn with_basic(user_password: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        let value = format!("Basic {}", STANDARD.encode(user_password));
        headers.insert(AUTHORIZATION, HeaderValue::from_str(&value).unwrap());
        headers
    }

    #[test]
    fn off_loopback_only_the_password_opens_the_page() {
        let digest: [u8; 32] = Sha256::digest(b"s3cret:with colon").into();
        let open = "0.0.0.0:9090".parse().ok();
        let access = StatusAccess::new(open, Some(digest));
        assert_eq!(access.check(&HeaderMap::new()), Verdict::Asked);
        assert_eq!(
            access.check(&with_basic("ops:s3cret:with colon")),
            Verdict::Allowed
        );
        assert_eq!(
            access.check(&with_basic(":s3cret:with colon")),
            Verdict::Allowed
        );
        assert_eq!(access.check(&with_basic("ops:s3cret")), Verdict::Refused);
        assert_eq!(access.check(&with_basic("no colon")), Verdict::Refused);
        let mut bearer = HeaderMap::new();
        bearer.insert(AUTHORIZATION, HeaderValue::from_static("Bearer x"));
        assert_eq!(access.check(&bearer), Verdict::Refused);

        assert_eq!(
            StatusAccess::new(open, None).check(&with_basic("ops:s3cret:with colon")),
            Verdict::Closed
        );
        let loopback = "127.0.0.1:9090".parse().ok();
        assert_eq!(
            StatusAccess::new(loopback, Some(digest)).check(&HeaderMap::new()),
            Verdict::Allowed
        );
        assert_eq!(
            StatusAccess::new("[::1]:9090".parse().ok(), None).check(&HeaderMap::new()),
            Verdict::Allowed
        );
    }
}
