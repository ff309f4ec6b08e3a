//! Sealing what is stored in Redis: AES-256-GCM with a random nonce per
//! entry and the entry's key name as associated data, so an entry copied to
//! another key, or opened with another deployment's key, fails to open.

use base64::Engine as _;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

use crate::secret::Secret;

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("the encryption key is not 32 base64-encoded bytes")]
    BadKey,
    #[error(
        "a sealed entry in Redis cannot be opened: it was written with another \
         cluster.encryption_key_file, or it is corrupted"
    )]
    CannotOpen,
    #[error("no randomness for a nonce")]
    Random,
}

pub struct Sealer {
    key: LessSafeKey,
    random: SystemRandom,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(...)")
    }
}

impl Sealer {
    /// `key` is the base64 text of 32 bytes (checked by the config).
    pub fn new(key: &Secret) -> Result<Self, SealError> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(key.expose().trim())
            .map_err(|_| SealError::BadKey)?;
        let unbound = UnboundKey::new(&AES_256_GCM, &bytes).map_err(|_| SealError::BadKey)?;
        Ok(Self {
            key: LessSafeKey::new(unbound),
            random: SystemRandom::new(),
        })
    }

    /// `plaintext` sealed for the entry named `name`: base64 of nonce,
    /// ciphertext and tag.
    pub fn seal(&self, name: &str, plaintext: &[u8]) -> Result<String, SealError> {
        let mut nonce = [0u8; NONCE_LEN];
        self.random
            .fill(&mut nonce)
            .map_err(|_| SealError::Random)?;
        let mut sealed = plaintext.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(name.as_bytes()),
                &mut sealed,
            )
            .map_err(|_| SealError::Random)?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        Ok(base64::engine::general_purpose::STANDARD.encode(out))
    }

    pub fn open(&self, name: &str, sealed: &str) -> Result<Vec<u8>, SealError> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(sealed)
            .map_err(|_| SealError::CannotOpen)?;
        if bytes.len() < NONCE_LEN {
            return Err(SealError::CannotOpen);
        }
        let (nonce, rest) = bytes.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| SealError::CannotOpen)?;
        let mut rest = rest.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(name.as_bytes()), &mut rest)
            .map_err(|_| SealError::CannotOpen)?;
        Ok(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> Secret {
        Secret::new(base64::engine::general_purpose::STANDARD.encode([byte; 32]))
    }

    #[test]
    fn sealed_entries_open_only_with_their_key_and_name() {
        let sealer = Sealer::new(&key(7)).unwrap();
        let sealed = sealer.seal("p:token:a", b"the-token").unwrap();
        assert!(!sealed.contains("the-token"));
        assert_eq!(sealer.open("p:token:a", &sealed).unwrap(), b"the-token");
        assert!(matches!(
            sealer.open("p:token:b", &sealed),
            Err(SealError::CannotOpen)
        ));
        let other = Sealer::new(&key(8)).unwrap();
        let error = other.open("p:token:a", &sealed).unwrap_err().to_string();
        assert!(error.contains("encryption_key_file"), "{error}");
        assert!(!error.contains("the-token"));
        let mut corrupted = sealed.into_bytes();
        corrupted[20] ^= 1;
        assert!(sealer
            .open("p:token:a", &String::from_utf8_lossy(&corrupted))
            .is_err());
        assert_eq!(format!("{sealer:?}"), "Sealer(...)");
    }
}
