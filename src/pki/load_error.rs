//! Why a CA's material could not be loaded, and which configured file it concerns: so that
//! `check-config` names the field to fix by the error's kind, never by its message text.

/// The part of a CA's configuration a load error concerns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaFile {
    Cert,
    Chain,
    Key,
    Passphrase,
}

impl CaFile {
    /// The configuration field (under `[[cas]]`) that names it.
    pub fn field(self) -> &'static str {
        match self {
            CaFile::Cert => "cert_file",
            CaFile::Chain => "chain_files",
            CaFile::Key => "key_file",
            CaFile::Passphrase => "key_passphrase",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CaLoadError {
    #[error("cannot read {path}: {reason}")]
    Read { file: CaFile, path: String, reason: String },
    #[error("{reason}")]
    Invalid { file: CaFile, reason: String },
    #[error("the private key cannot be decrypted with the configured passphrase, or is not PKCS#8")]
    KeyDecrypt,
    #[error("no passphrase configured (key_passphrase_env or key_passphrase_file)")]
    NoPassphrase,
    #[error("passphrase source unavailable: {0}")]
    PassphraseSource(String),
}

impl CaLoadError {
    /// The file (or setting) to fix.
    pub fn file(&self) -> CaFile {
        match self {
            CaLoadError::Read { file, .. } | CaLoadError::Invalid { file, .. } => *file,
            CaLoadError::KeyDecrypt => CaFile::Key,
            CaLoadError::NoPassphrase | CaLoadError::PassphraseSource(_) => CaFile::Passphrase,
        }
    }

    /// A key that is there but wrong (it does not match its certificate) is a misconfiguration;
    /// every other key error may be an outage the CA recovers from when the key comes back.
    pub fn is_misconfiguration(&self) -> bool {
        matches!(self, CaLoadError::Invalid { .. })
    }
}
