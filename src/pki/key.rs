//! A CA's private key behind a handle that can lose it: the software-key equivalent of an HSM
//! session. The key is read from its (encrypted) file at start-up and re-checked by the CA's
//! cell every half second: a key file that disappears makes the key unavailable (signatures
//! fail, and only this CA's breaker sees it); when it comes back, and still matches the CA
//! certificate, it is loaded again. `destroy` (a retired CA) drops it for good.

use std::path::PathBuf;
use std::sync::RwLock;
use std::time::SystemTime;

use openssl::pkey::{PKey, Private, Public};

use super::load_error::{CaFile, CaLoadError};
use crate::config::CaConfig;

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

enum KeyState {
    Available { key: PKey<Private>, stamp: Option<(SystemTime, u64)> },
    Unavailable { reason: String },
    Destroyed,
}

pub struct KeyHandle {
    config: CaConfig,
    public: PKey<Public>,
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
    pub fn load(config: &CaConfig, public: PKey<Public>) -> (KeyHandle, Option<CaLoadError>) {
        let handle = KeyHandle {
            config: config.clone(),
            public,
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
        let pass = passphrase(&self.config)?;
        let path = &self.config.key_file;
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
        self.set(KeyState::Available { key, stamp: stamp(path) });
        Ok(())
    }

    /// Sign with the key, or say why it is unavailable.
    pub fn with_key<T>(&self, f: impl FnOnce(&PKey<Private>) -> T) -> Result<T, String> {
        match &*self.state.read().unwrap_or_else(|e| e.into_inner()) {
            KeyState::Available { key, .. } => Ok(f(key)),
            KeyState::Unavailable { reason } => Err(format!("key unavailable: {reason}")),
            KeyState::Destroyed => Err("key destroyed".into()),
        }
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

    /// Look at the key file again (blocking I/O: run it off the event loop).
    pub fn refresh(&self) -> Option<KeyChange> {
        let path = &self.config.key_file;
        let current = stamp(path);
        let (available, known) = match &*self.state.read().unwrap_or_else(|e| e.into_inner()) {
            KeyState::Destroyed => return None,
            KeyState::Available { stamp, .. } => (true, *stamp),
            KeyState::Unavailable { .. } => (false, None),
        };
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
