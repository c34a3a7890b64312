//! The key-encryption key (KEK) that seals every identity key at rest.
//!
//! A sealed key is `nonce (12) ‖ AES-256-GCM ciphertext ‖ tag (16)`, authenticated with the
//! identity's id as additional data: a sealed key copied onto another identity's row does not
//! open. The KEK comes from a file or an environment variable, never from the database, so the
//! database alone never exposes an identity key.

use std::path::Path;

use openssl::symm::{decrypt_aead, encrypt_aead, Cipher};
use zeroize::Zeroizing;

use crate::config::{IdentitiesConfig, Mode};

const KEY_LEN: usize = 32;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;

/// What the development KEK is derived from; it is public, and refused unless `mode = "dev"`.
const DEV_KEK_SEED: &[u8] = b"castellum development identity KEK - NOT FOR PRODUCTION";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KekError {
    #[error("no key-encryption key configured (identities.kek_file or identities.kek_env)")]
    Missing,
    #[error("set only one of identities.kek_file and identities.kek_env")]
    TwoSources,
    #[error("cannot read {0}")]
    Unreadable(String),
    #[error("environment variable {0} is not set")]
    EnvUnset(String),
    #[error("the key-encryption key must be 64 hex digits (32 bytes)")]
    Malformed,
    #[error("the key-encryption key is weak: {0}; generate one with `openssl rand -hex 32`")]
    Weak(&'static str),
    #[error("this is the development key-encryption key, refused unless mode = \"dev\"")]
    DevKeyOutsideDev,
    #[error("{0} is readable by other users; restrict it to the engine's user (chmod 600)")]
    Exposed(String),
}

/// Sealing or opening failed: a wrong KEK, a sealed key moved to another identity, or damage.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("the sealed identity key does not open under this key-encryption key")]
pub struct SealError;

pub struct Kek {
    /// On the heap, so moving a `Kek` never leaves a copy of the key behind.
    key: Box<Zeroizing<[u8; KEY_LEN]>>,
    /// First 8 bytes of SHA-256 of the key, hex: stored with every sealed key (for rotation).
    id: String,
}

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kek").field("id", &self.id).finish_non_exhaustive()
    }
}

/// The development KEK (what `keys-dev/identity-kek.hex` holds).
pub fn dev_kek() -> [u8; KEY_LEN] {
    openssl::sha::sha256(DEV_KEK_SEED)
}

/// Why 32 bytes are not a usable key, if they are not. A random key has about 30 distinct byte
/// values and is almost never all printable text; a passphrase typed as hex is.
fn weakness(key: &[u8; KEY_LEN]) -> Option<&'static str> {
    let distinct = key.iter().collect::<std::collections::HashSet<_>>().len();
    if distinct < 16 {
        return Some("too few distinct bytes to be random");
    }
    if key.iter().all(|b| (0x20..0x7f).contains(b)) {
        return Some("it is printable text, not random bytes");
    }
    None
}

fn parse(text: &str) -> Result<Zeroizing<[u8; KEY_LEN]>, KekError> {
    let digits: Zeroizing<String> = Zeroizing::new(
        text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect::<Vec<_>>().concat(),
    );
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    hex::decode_to_slice(digits.as_bytes(), key.as_mut()).map_err(|_| KekError::Malformed)?;
    Ok(key)
}

#[cfg(unix)]
fn exposed(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).map(|m| m.permissions().mode() & 0o077 != 0).unwrap_or(false)
}

#[cfg(not(unix))]
fn exposed(_: &Path) -> bool {
    false
}

impl Kek {
    /// Load the KEK the configuration names, refusing a missing, malformed or weak one, and the
    /// development KEK outside dev mode.
    pub fn load(cfg: &IdentitiesConfig, mode: Mode) -> Result<Kek, KekError> {
        let text = match (&cfg.kek_file, &cfg.kek_env) {
            (Some(_), Some(_)) => return Err(KekError::TwoSources),
            (None, None) => return Err(KekError::Missing),
            (Some(path), None) => Zeroizing::new(
                std::fs::read_to_string(path).map_err(|_| KekError::Unreadable(path.display().to_string()))?,
            ),
            (None, Some(var)) => Zeroizing::new(std::env::var(var).map_err(|_| KekError::EnvUnset(var.clone()))?),
        };
        let key = parse(&text)?;
        if *key == dev_kek() {
            if mode != Mode::Dev {
                return Err(KekError::DevKeyOutsideDev);
            }
        } else if let Some(why) = weakness(&key) {
            return Err(KekError::Weak(why));
        }
        if let Some(path) = cfg.kek_file.as_deref().filter(|p| mode != Mode::Dev && exposed(p)) {
            return Err(KekError::Exposed(path.display().to_string()));
        }
        Ok(Kek::from_bytes(&key))
    }

    pub fn from_bytes(bytes: &[u8; KEY_LEN]) -> Kek {
        let mut key = Box::new(Zeroizing::new([0u8; KEY_LEN]));
        key.copy_from_slice(bytes);
        let id = hex::encode(&openssl::sha::sha256(bytes)[..8]);
        Kek { key, id }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Seal `plaintext` for the identity `aad` names.
    pub fn seal(&self, aad: &str, plaintext: &[u8]) -> Result<Vec<u8>, SealError> {
        let mut nonce = [0u8; NONCE_LEN];
        openssl::rand::rand_bytes(&mut nonce).map_err(|_| SealError)?;
        let mut tag = [0u8; TAG_LEN];
        let ciphertext =
            encrypt_aead(Cipher::aes_256_gcm(), self.key.as_slice(), Some(&nonce), aad.as_bytes(), plaintext, &mut tag)
                .map_err(|_| SealError)?;
        let mut sealed = Vec::with_capacity(NONCE_LEN + ciphertext.len() + TAG_LEN);
        sealed.extend_from_slice(&nonce);
        sealed.extend_from_slice(&ciphertext);
        sealed.extend_from_slice(&tag);
        Ok(sealed)
    }

    /// Open a sealed key for the identity `aad` names; the plaintext is wiped when dropped.
    pub fn open(&self, aad: &str, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, SealError> {
        if sealed.len() < NONCE_LEN + TAG_LEN {
            return Err(SealError);
        }
        let (nonce, rest) = sealed.split_at(NONCE_LEN);
        let (ciphertext, tag) = rest.split_at(rest.len() - TAG_LEN);
        decrypt_aead(Cipher::aes_256_gcm(), self.key.as_slice(), Some(nonce), aad.as_bytes(), ciphertext, tag)
            .map(Zeroizing::new)
            .map_err(|_| SealError)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_keys_open_only_for_their_identity() {
        let kek = Kek::from_bytes(&dev_kek());
        let sealed = kek.seal("identity-a", b"secret key bytes").unwrap();
        assert!(!sealed.windows(6).any(|w| w == b"secret"));
        assert_eq!(kek.open("identity-a", &sealed).unwrap().as_slice(), b"secret key bytes");
        assert_eq!(kek.open("identity-b", &sealed), Err(SealError));
        let other = Kek::from_bytes(&openssl::sha::sha256(b"another key"));
        assert_eq!(other.open("identity-a", &sealed), Err(SealError));
        let mut damaged = sealed.clone();
        damaged[20] ^= 1;
        assert_eq!(kek.open("identity-a", &damaged), Err(SealError));
    }

    #[test]
    fn weak_and_malformed_keys_are_refused() {
        assert_eq!(parse("abcd").err(), Some(KekError::Malformed));
        assert!(weakness(&[0u8; 32]).is_some());
        let text: [u8; 32] = *b"correct horse battery staple!!!!";
        assert!(weakness(&text).is_some());
        assert!(weakness(&dev_kek()).is_none());
        let key = parse(&format!("# comment\n{}\n", hex::encode(dev_kek()))).unwrap();
        assert_eq!(*key, dev_kek());
    }
}
