//! PKCE (RFC 7636) and the `state` parameter: the one-time values of an
//! authorization code request.

use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::secret::Secret;

/// Random bytes behind a verifier: 48 bytes make 64 base64url characters,
/// inside RFC 7636's 43..=128 and drawn from its unreserved set.
const VERIFIER_BYTES: usize = 48;

/// A verifier with its S256 challenge, used for one authorization only.
#[derive(Debug)]
pub struct Pkce {
    /// Sent only to the token endpoint, with the code.
    pub verifier: Secret,
    /// Sent in the authorization URL.
    pub challenge: String,
}

impl Pkce {
    pub fn generate() -> Self {
        let verifier = Secret::new(random_urlsafe(VERIFIER_BYTES));
        let challenge = challenge(verifier.expose());
        Self {
            verifier,
            challenge,
        }
    }
}

/// `BASE64URL(SHA256(ASCII(verifier)))` without padding: method S256.
pub fn challenge(verifier: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

/// An unguessable `state` value binding the redirect to this request (CSRF).
pub fn random_state() -> String {
    random_urlsafe(24)
}

fn random_urlsafe(bytes: usize) -> String {
    let mut raw = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut raw);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenge_matches_rfc_7636_appendix_b() {
        assert_eq!(
            challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
    }

    #[test]
    fn verifiers_are_fresh_long_enough_and_unreserved() {
        let a = Pkce::generate();
        let b = Pkce::generate();
        assert_ne!(a.verifier, b.verifier);
        let v = a.verifier.expose();
        assert!((43..=128).contains(&v.len()), "{}", v.len());
        assert!(v
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._~".contains(c)));
        assert_eq!(a.challenge, challenge(v));
        assert!(!a.challenge.contains('='));
        assert_ne!(random_state(), random_state());
    }
}
