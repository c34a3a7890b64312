//! A CA key on a PKCS#11 token (issue 17): the key never leaves the token. castellum builds the
//! certificate (or CRL) exactly as for a key file and hands the token only the bytes to sign, or
//! their digest for ECDSA; the signature goes into the structure as before.
//!
//! One module is loaded and initialised once per process, whichever CAs use it. Each CA keeps its
//! own logged-in sessions, at most one per signer thread that is signing at that moment (PKCS#11
//! sessions are not for concurrent use); a session the token fails is dropped rather than reused,
//! and the error says whether the token itself is gone (the CA's key becomes unavailable and is
//! opened again in the background) or only this signature failed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::eddsa::{EddsaParams, EddsaSignatureScheme};
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsPssParams};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;

use super::vocabulary::SignatureAlgorithm;
use crate::config::Pkcs11KeyConfig;

/// Why a token could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("PKCS#11 module {module}: {reason}")]
    Module { module: String, reason: String },
    #[error("no token labelled {label:?} (tokens present: {present})")]
    NoToken { label: String, present: String },
    #[error("no private key labelled {label:?} on token {token:?}")]
    NoKey { token: String, label: String },
    #[error("the PIN was refused by token {token:?}")]
    PinRefused { token: String },
    /// The token, a session or the login is gone: every later call fails until it is opened again.
    #[error("token {token:?} is unavailable: {call} failed with {rv}")]
    Lost { token: String, call: String, rv: String },
    /// This signature failed; the token is still there.
    #[error("token {token:?}: {call} failed with {rv}")]
    Call { token: String, call: String, rv: String },
}

impl TokenError {
    /// The token (or its session or login) is gone, not just this call.
    pub fn is_lost(&self) -> bool {
        matches!(self, TokenError::Lost { .. } | TokenError::NoToken { .. } | TokenError::Module { .. })
    }
}

/// Return values that mean the token, the session or the login no longer exists.
fn is_lost(rv: RvError) -> bool {
    matches!(
        rv,
        RvError::DeviceRemoved
            | RvError::DeviceError
            | RvError::TokenNotPresent
            | RvError::TokenNotRecognized
            | RvError::SessionClosed
            | RvError::SessionHandleInvalid
            | RvError::UserNotLoggedIn
            | RvError::CryptokiNotInitialized
            | RvError::GeneralError
            // The key object itself went away (its token's storage changed under it).
            | RvError::KeyHandleInvalid
            | RvError::ObjectHandleInvalid
    )
}

/// The loaded, initialised modules, by path: `C_Initialize` once per process per module.
fn module(path: &Path) -> Result<Pkcs11, TokenError> {
    static MODULES: OnceLock<Mutex<HashMap<PathBuf, Pkcs11>>> = OnceLock::new();
    let mut modules = MODULES.get_or_init(Mutex::default).lock().unwrap_or_else(|e| e.into_inner());
    if let Some(context) = modules.get(path) {
        return Ok(context.clone());
    }
    let fail = |reason: String| TokenError::Module { module: path.display().to_string(), reason };
    let context = Pkcs11::new(path).map_err(|e| fail(e.to_string()))?;
    match context.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => return Err(fail(e.to_string())),
    }
    modules.insert(path.to_path_buf(), context.clone());
    Ok(context)
}

/// A CA's key on a token, with the sessions it has opened.
pub struct TokenKey {
    context: Pkcs11,
    slot: Slot,
    key: ObjectHandle,
    token: String,
    pin: AuthPin,
    /// Logged-in sessions not in use now.
    idle: Mutex<Vec<Session>>,
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenKey").field("token", &self.token).finish_non_exhaustive()
    }
}

impl TokenKey {
    /// Load the module, find the token by label, log in, and find the private key by label.
    pub fn open(config: &Pkcs11KeyConfig, pin: AuthPin) -> Result<TokenKey, TokenError> {
        let context = module(&config.module)?;
        let token = config.token_label.clone();
        let call = |call: &str, e: CkError| rv_error(&token, call, e);
        let slots = context.get_slots_with_token().map_err(|e| call("C_GetSlotList", e))?;
        let mut present = Vec::new();
        let mut found = None;
        for slot in slots {
            let info = context.get_token_info(slot).map_err(|e| call("C_GetTokenInfo", e))?;
            let label = info.label().trim_end().to_string();
            if label == token {
                found = Some(slot);
                break;
            }
            present.push(label);
        }
        let slot = found.ok_or_else(|| TokenError::NoToken { label: token.clone(), present: present.join(", ") })?;
        let session = context.open_ro_session(slot).map_err(|e| call("C_OpenSession", e))?;
        login(&session, &pin, &token)?;
        let template =
            [Attribute::Class(ObjectClass::PRIVATE_KEY), Attribute::Label(config.key_label.as_bytes().to_vec())];
        let keys = session.find_objects(&template).map_err(|e| call("C_FindObjects", e))?;
        let key =
            *keys.first().ok_or_else(|| TokenError::NoKey { token: token.clone(), label: config.key_label.clone() })?;
        Ok(TokenKey { context, slot, key, token, pin, idle: Mutex::new(vec![session]) })
    }

    /// The token's signature over `data` with `algorithm`, in the encoding X.509 carries (DER
    /// `ECDSA-Sig-Value` for ECDSA, the raw value for RSA and Ed25519).
    pub fn sign(&self, algorithm: SignatureAlgorithm, data: &[u8]) -> Result<Vec<u8>, TokenError> {
        let session = self.session()?;
        let signed = match algorithm {
            SignatureAlgorithm::EcdsaSha256 | SignatureAlgorithm::EcdsaSha384 | SignatureAlgorithm::EcdsaSha512 => {
                // CKM_ECDSA signs a digest: the hash is computed here, the token never sees more.
                let md = algorithm.digest().ok_or_else(|| self.call_error("digest", "no digest".into()))?;
                let digest = openssl::hash::hash(md, data).map_err(|e| self.call_error("digest", e.to_string()))?;
                session
                    .sign(&Mechanism::Ecdsa, self.key, &digest)
                    .map_err(|e| rv_error(&self.token, "C_Sign", e))
                    .and_then(|raw| ecdsa_der(&raw).map_err(|e| self.call_error("ECDSA encoding", e)))
            }
            SignatureAlgorithm::RsaSha256 => {
                session.sign(&Mechanism::Sha256RsaPkcs, self.key, data).map_err(|e| rv_error(&self.token, "C_Sign", e))
            }
            SignatureAlgorithm::RsaPssSha256 => {
                let params =
                    PkcsPssParams { hash_alg: MechanismType::SHA256, mgf: PkcsMgfType::MGF1_SHA256, s_len: 32.into() };
                session
                    .sign(&Mechanism::Sha256RsaPkcsPss(params), self.key, data)
                    .map_err(|e| rv_error(&self.token, "C_Sign", e))
            }
            SignatureAlgorithm::Ed25519 => session
                .sign(&Mechanism::Eddsa(EddsaParams::new(EddsaSignatureScheme::Pure)), self.key, data)
                .map_err(|e| rv_error(&self.token, "C_Sign", e)),
        };
        match &signed {
            // A session the token failed is not used again.
            Err(e) if e.is_lost() => drop(session),
            _ => self.idle.lock().unwrap_or_else(|e| e.into_inner()).push(session),
        }
        signed
    }

    /// Whether the token, the login and the key are still there, without signing: one attribute
    /// of the key read on a session (an idle one when there is one). A call that fails only
    /// because the token is busy is not a loss.
    pub fn probe(&self) -> Result<(), TokenError> {
        let session = self.session()?;
        let read = session.get_attributes(self.key, &[AttributeType::Label]);
        match read {
            Err(e) => {
                let e = rv_error(&self.token, "C_GetAttributeValue", e);
                if !e.is_lost() {
                    self.idle.lock().unwrap_or_else(|e| e.into_inner()).push(session);
                }
                Err(e)
            }
            Ok(_) => {
                self.idle.lock().unwrap_or_else(|e| e.into_inner()).push(session);
                Ok(())
            }
        }
    }

    /// An idle logged-in session, or a new one (the login is the token's, shared by its sessions).
    fn session(&self) -> Result<Session, TokenError> {
        if let Some(session) = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop() {
            return Ok(session);
        }
        let session = self.context.open_ro_session(self.slot).map_err(|e| rv_error(&self.token, "C_OpenSession", e))?;
        login(&session, &self.pin, &self.token)?;
        Ok(session)
    }

    fn call_error(&self, call: &str, rv: String) -> TokenError {
        TokenError::Call { token: self.token.clone(), call: call.into(), rv }
    }
}

fn login(session: &Session, pin: &AuthPin, token: &str) -> Result<(), TokenError> {
    match session.login(UserType::User, Some(pin)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
        Err(CkError::Pkcs11(RvError::PinIncorrect | RvError::PinInvalid | RvError::PinLenRange, _)) => {
            Err(TokenError::PinRefused { token: token.into() })
        }
        Err(e) => Err(rv_error(token, "C_Login", e)),
    }
}

fn rv_error(token: &str, call: &str, e: CkError) -> TokenError {
    match e {
        CkError::Pkcs11(rv, _) if is_lost(rv) => {
            TokenError::Lost { token: token.into(), call: call.into(), rv: format!("{rv:?}") }
        }
        CkError::Pkcs11(rv, _) => TokenError::Call { token: token.into(), call: call.into(), rv: format!("{rv:?}") },
        other => TokenError::Call { token: token.into(), call: call.into(), rv: other.to_string() },
    }
}

/// PKCS#11 gives an ECDSA signature as r ‖ s, each as long as the order; X.509 carries the DER
/// `ECDSA-Sig-Value`.
fn ecdsa_der(raw: &[u8]) -> Result<Vec<u8>, String> {
    if raw.is_empty() || raw.len() % 2 != 0 {
        return Err(format!("an ECDSA signature of {} bytes", raw.len()));
    }
    let (r, s) = raw.split_at(raw.len() / 2);
    let to_bn = |b: &[u8]| openssl::bn::BigNum::from_slice(b).map_err(|e| e.to_string());
    let sig = openssl::ecdsa::EcdsaSig::from_private_components(to_bn(r)?, to_bn(s)?).map_err(|e| e.to_string())?;
    sig.to_der().map_err(|e| e.to_string())
}
