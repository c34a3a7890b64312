//! Why a CA's material could not be loaded, and which configured file it concerns: so that
//! `check-config` names the field to fix by the error's kind, never by its message text.

/// The part of a CA's configuration a load error concerns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaFile {
    Cert,
    Chain,
    Key,
    Passphrase,
    /// `[cas.key] pkcs11`: the module, token or key label.
    Token,
    /// The token's PIN source.
    Pin,
}

impl CaFile {
    /// The configuration field (under `[[cas]]`) that names it.
    pub fn field(self) -> &'static str {
        match self {
            CaFile::Cert => "cert_file",
            CaFile::Chain => "chain_files",
            CaFile::Key => "key_file",
            CaFile::Passphrase => "key_passphrase",
            CaFile::Token => "key.pkcs11",
            CaFile::Pin => "key.pkcs11.pin_file",
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
    #[error("neither key_file nor [cas.key] pkcs11 is configured")]
    NoKey,
    #[error("no PIN configured (key.pkcs11.pin_env or key.pkcs11.pin_file)")]
    NoPin,
    #[error("PIN source unavailable: {0}")]
    PinSource(String),
    #[error("{0}")]
    Token(#[from] super::token::TokenError),
}

impl CaLoadError {
    /// The file (or setting) to fix.
    pub fn file(&self) -> CaFile {
        match self {
            CaLoadError::Read { file, .. } | CaLoadError::Invalid { file, .. } => *file,
            CaLoadError::KeyDecrypt => CaFile::Key,
            CaLoadError::NoPassphrase | CaLoadError::PassphraseSource(_) => CaFile::Passphrase,
            CaLoadError::NoKey => CaFile::Key,
            CaLoadError::NoPin | CaLoadError::PinSource(_) => CaFile::Pin,
            CaLoadError::Token(_) => CaFile::Token,
        }
    }

    /// A key that is there but wrong (it does not match its certificate) is a misconfiguration;
    /// every other key error may be an outage the CA recovers from when the key comes back.
    pub fn is_misconfiguration(&self) -> bool {
        use super::token::TokenError;
        match self {
            CaLoadError::Invalid { .. } | CaLoadError::NoKey => true,
            // A wrong label or PIN is the configuration's; a token or module that does not
            // answer may be an outage.
            CaLoadError::Token(e) => matches!(e, TokenError::NoKey { .. } | TokenError::PinRefused { .. }),
            _ => false,
        }
    }
}
