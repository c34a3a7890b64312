//! A CA's private key behind a handle that can lose it. The key is a passphrase-protected file
//! read into memory, or a key on a PKCS#11 token that never leaves it ([`super::token`]).
//! `sign` is the one place a CA key signs, whatever it signs. The CA's cell calls `refresh`
//! every half second, off its event loop: a key file that disappears makes the key unavailable
//! (signatures fail, and only this CA's breaker sees it), and when it comes back, and still
//! matches the CA certificate, it is loaded again; a token that is lost (removed, its session or
//! login gone), whether a signature or the refresh's probe finds it so, makes the key unavailable
//! the same way, and is opened and logged into again once it answers. `destroy` (a retired CA) drops the key for good.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use openssl::pkey::{PKey, Private, Public};
use openssl::rsa::Padding;
use openssl::sign::{RsaPssSaltlen, Signer, Verifier};

use super::load_error::{CaFile, CaLoadError};
use super::token::TokenKey;
use super::vocabulary::SignatureAlgorithm;
use crate::config::{CaConfig, Pkcs11KeyConfig};

/// The passphrase protecting a CA key, from wherever the configuration says.
pub fn passphrase(cfg: &CaConfig) -> Result<String, CaLoadError> {
    if let Some(var) = &cfg.key_passphrase_env {
        return std::env::var(var)
            .map_err(|_| CaLoadError::PassphraseSource(format!("environment variable {var} is not set")));
    }
    if let Some(file) = &cfg.key_passphrase_file {
        let text = std::fs::read_to_string(file)
            .map_err(|e| CaLoadError::PassphraseSource(format!("{}: {e}", file.display())))?;
        return Ok(text.lines().next().unwrap_or_default().to_string());
    }
    cfg.key_passphrase.clone().ok_or(CaLoadError::NoPassphrase)
}

/// The PIN of a CA's token, from wherever the configuration says.
pub fn pin(cfg: &Pkcs11KeyConfig) -> Result<String, CaLoadError> {
    let source = |reason: String| CaLoadError::PinSource(reason);
    if let Some(var) = &cfg.pin_env {
        return std::env::var(var).map_err(|_| source(format!("environment variable {var} is not set")));
    }
    if let Some(file) = &cfg.pin_file {
        let text = std::fs::read_to_string(file).map_err(|e| source(format!("{}: {e}", file.display())))?;
        return Ok(text.lines().next().unwrap_or_default().to_string());
    }
    cfg.pin.clone().ok_or(CaLoadError::NoPin)
}

/// The key, ready to sign: cheap to clone out of the handle's lock, so that a slow signature
/// (a token) never holds the lock.
#[derive(Clone)]
enum SigningKey {
    File(PKey<Private>),
    Token(Arc<TokenKey>),
}

enum KeyState {
    /// `stamp`: the key file's modification time and length when it was read (files only).
    Available {
        key: SigningKey,
        stamp: Option<(SystemTime, u64)>,
    },
    Unavailable {
        reason: String,
    },
    Destroyed,
}

pub struct KeyHandle {
    config: CaConfig,
    public: PKey<Public>,
    algorithm: SignatureAlgorithm,
    state: RwLock<KeyState>,
}

/// A change the refresh saw, for logs and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyChange {
    Lost(String),
    Restored,
}

fn stamp(path: &PathBuf) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

impl KeyHandle {
    /// Load the key; a key that cannot be loaded leaves the handle unavailable (the CA starts in
    /// a failed state) and is reported as the error.
    pub fn load(
        config: &CaConfig,
        public: PKey<Public>,
        algorithm: SignatureAlgorithm,
    ) -> (KeyHandle, Option<CaLoadError>) {
        let handle = KeyHandle {
            config: config.clone(),
            public,
            algorithm,
            state: RwLock::new(KeyState::Unavailable { reason: "not loaded yet".into() }),
        };
        let error = handle.try_load().err();
        if let Some(e) = &error {
            handle.set(KeyState::Unavailable { reason: e.to_string() });
        }
        (handle, error)
    }

    fn set(&self, state: KeyState) {
        // A poisoned lock only means a panic elsewhere while holding it; the state is still whole.
        *self.state.write().unwrap_or_else(|e| e.into_inner()) = state;
    }

    fn try_load(&self) -> Result<(), CaLoadError> {
        match (&self.config.key, &self.config.key_file) {
            (Some(key), _) => self.open_token(&key.pkcs11),
            (None, Some(path)) => self.read_file(path),
            (None, None) => Err(CaLoadError::NoKey),
        }
    }

    fn read_file(&self, path: &PathBuf) -> Result<(), CaLoadError> {
        let pass = passphrase(&self.config)?;
        let pem = std::fs::read(path).map_err(|e| CaLoadError::Read {
            file: CaFile::Key,
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        let key = PKey::private_key_from_pem_passphrase(&pem, pass.as_bytes()).map_err(|_| CaLoadError::KeyDecrypt)?;
        if !self.public.public_eq(&key) {
            return Err(CaLoadError::Invalid {
                file: CaFile::Key,
                reason: "the private key does not match the CA certificate".into(),
            });
        }
        self.set(KeyState::Available { key: SigningKey::File(key), stamp: stamp(path) });
        Ok(())
    }

    /// Open the token and prove the key is the CA certificate's: a signature by the token that
    /// the certificate's public key verifies.
    fn open_token(&self, config: &Pkcs11KeyConfig) -> Result<(), CaLoadError> {
        let pin = pin(config)?;
        let token = TokenKey::open(config, pin.into()).map_err(CaLoadError::Token)?;
        let challenge = b"castellum: does this token key belong to the CA certificate?";
        let signature = token.sign(self.algorithm, challenge).map_err(CaLoadError::Token)?;
        if !verifies(&self.public, self.algorithm, challenge, &signature).unwrap_or(false) {
            return Err(CaLoadError::Invalid {
                file: CaFile::Token,
                reason: format!(
                    "the key labelled {:?} on token {:?} does not match the CA certificate",
                    config.key_label, config.token_label
                ),
            });
        }
        self.set(KeyState::Available { key: SigningKey::Token(Arc::new(token)), stamp: None });
        Ok(())
    }

    /// The key's signature over `data`, in the encoding X.509 carries, or why there is none. A
    /// token found lost makes the key unavailable until `refresh` opens it again.
    pub fn sign(&self, data: &[u8]) -> Result<Vec<u8>, String> {
        let key = match &*self.state.read().unwrap_or_else(|e| e.into_inner()) {
            KeyState::Available { key, .. } => key.clone(),
            KeyState::Unavailable { reason } => return Err(format!("key unavailable: {reason}")),
            KeyState::Destroyed => return Err("key destroyed".into()),
        };
        match key {
            SigningKey::File(key) => software_signature(&key, self.algorithm, data).map_err(|e| e.to_string()),
            SigningKey::Token(token) => token.sign(self.algorithm, data).map_err(|e| {
                if e.is_lost() && self.lose_token(&token, e.to_string()) {
                    // Once per loss: every later signature is refused before it reaches the token.
                    tracing::error!(ca = %self.config.id, reason = %e, "CA key unavailable");
                }
                e.to_string()
            }),
        }
    }

    /// Mark the key unavailable, if `token` is still the one in use (another thread may already
    /// have opened a new one); whether it was.
    fn lose_token(&self, token: &Arc<TokenKey>, reason: String) -> bool {
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        let in_use = matches!(&*state, KeyState::Available { key: SigningKey::Token(t), .. } if Arc::ptr_eq(t, token));
        if in_use {
            *state = KeyState::Unavailable { reason };
        }
        in_use
    }

    pub fn is_available(&self) -> bool {
        matches!(&*self.state.read().unwrap_or_else(|e| e.into_inner()), KeyState::Available { .. })
    }

    pub fn unavailable_reason(&self) -> Option<String> {
        match &*self.state.read().unwrap_or_else(|e| e.into_inner()) {
            KeyState::Available { .. } => None,
            KeyState::Unavailable { reason } => Some(reason.clone()),
            KeyState::Destroyed => Some("destroyed".into()),
        }
    }

    /// Look at the key again (blocking I/O, and a token may be slow: run it off the event loop).
    pub fn refresh(&self) -> Option<KeyChange> {
        let (available, known, token) = match &*self.state.read().unwrap_or_else(|e| e.into_inner()) {
            KeyState::Destroyed => return None,
            KeyState::Available { stamp, key } => {
                (true, *stamp, if let SigningKey::Token(t) = key { Some(t.clone()) } else { None })
            }
            KeyState::Unavailable { .. } => (false, None, None),
        };
        let Some(path) = self.config.key_file.as_ref().filter(|_| self.config.key.is_none()) else {
            // A token: while it signs, ask it whether it is still there (so a loss shows before a
            // client meets it); once lost, try to open it again.
            if let Some(token) = token {
                return match token.probe() {
                    Err(e) if e.is_lost() && self.lose_token(&token, e.to_string()) => {
                        Some(KeyChange::Lost(e.to_string()))
                    }
                    _ => None,
                };
            }
            if available {
                return None;
            }
            return match self.try_load() {
                Ok(()) => Some(KeyChange::Restored),
                Err(e) => {
                    self.set(KeyState::Unavailable { reason: e.to_string() });
                    None
                }
            };
        };
        let current = stamp(path);
        match current {
            None if available => {
                let reason = format!("key file {} is gone", path.display());
                self.set(KeyState::Unavailable { reason: reason.clone() });
                Some(KeyChange::Lost(reason))
            }
            None => None,
            Some(now) if !available || Some(now) != known => match self.try_load() {
                Ok(()) if !available => Some(KeyChange::Restored),
                Ok(()) => None,
                Err(e) => {
                    self.set(KeyState::Unavailable { reason: e.to_string() });
                    available.then(|| KeyChange::Lost(e.to_string()))
                }
            },
            Some(_) => None,
        }
    }

    /// Destroy the key in memory (openssl frees it with cleansing); it is never reloaded.
    pub fn destroy(&self) {
        self.set(KeyState::Destroyed);
    }
}

/// A signature by a key in memory.
fn software_signature(
    key: &PKey<Private>,
    algorithm: SignatureAlgorithm,
    data: &[u8],
) -> Result<Vec<u8>, openssl::error::ErrorStack> {
    // ECDSA straight on the curve key: `EVP_DigestSignInit` looks its algorithms up again (a
    // locked fetch) for every signature (2% of the engine's CPU at c=64 in a profile).
    let digest = match algorithm {
        SignatureAlgorithm::EcdsaSha256 => Some(super::sha256(data).to_vec()),
        SignatureAlgorithm::EcdsaSha384 => Some(super::sha384(data).to_vec()),
        SignatureAlgorithm::EcdsaSha512 => Some(super::sha512(data).to_vec()),
        SignatureAlgorithm::RsaSha256 | SignatureAlgorithm::RsaPssSha256 | SignatureAlgorithm::Ed25519 => None,
    };
    if let Some(digest) = digest {
        return openssl::ecdsa::EcdsaSig::sign(&digest, &*key.ec_key()?)?.to_der();
    }
    match algorithm.digest() {
        Some(md) => {
            let mut signer = Signer::new(md, key)?;
            if algorithm == SignatureAlgorithm::RsaPssSha256 {
                signer.set_rsa_padding(Padding::PKCS1_PSS)?;
                signer.set_rsa_mgf1_md(md)?;
                signer.set_rsa_pss_saltlen(RsaPssSaltlen::DIGEST_LENGTH)?;
            }
            signer.update(data)?;
            signer.sign_to_vec()
        }
        None => Signer::new_without_digest(key)?.sign_oneshot_to_vec(data),
    }
}

/// Whether `public` verifies `signature` over `data` with `algorithm`.
fn verifies(
    public: &PKey<Public>,
    algorithm: SignatureAlgorithm,
    data: &[u8],
    signature: &[u8],
) -> Result<bool, openssl::error::ErrorStack> {
    match algorithm.digest() {
        Some(md) => {
            let mut verifier = Verifier::new(md, public)?;
            if algorithm == SignatureAlgorithm::RsaPssSha256 {
                verifier.set_rsa_padding(Padding::PKCS1_PSS)?;
                verifier.set_rsa_mgf1_md(md)?;
                verifier.set_rsa_pss_saltlen(RsaPssSaltlen::DIGEST_LENGTH)?;
            }
            verifier.update(data)?;
            verifier.verify(signature)
        }
        None => Verifier::new_without_digest(public)?.verify_oneshot(signature, data),
    }
}
