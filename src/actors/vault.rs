//! The identity vault: the only place an identity's private key is ever in the clear. On threads
//! of its own (a SyncArbiter, never a CA's signer threads), it opens a sealed key under the KEK,
//! signs one digest, and drops the key; the opened bytes are wiped and OpenSSL cleanses the key
//! it parsed. Its queue is bounded by the engine (a semaphore), since a SyncArbiter's is not.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;

use crate::error::EngineError;
use crate::metrics::Metrics;
use crate::pki::identity::{sign_digest, DigestAlgorithm};
use crate::pki::kek::Kek;
use crate::pki::KeyType;

pub struct IdentityVault {
    pub kek: Arc<Kek>,
    pub metrics: Arc<Metrics>,
    /// Injected fault (dev mode only): a slow vault, for real.
    pub sign_latency: Option<Duration>,
}

impl Actor for IdentityVault {
    type Context = SyncContext<Self>;
}

/// Sign `digest` with the identity `id`'s sealed key.
#[derive(Message)]
#[rtype(result = "Result<Vec<u8>, EngineError>")]
pub struct SignDigest {
    pub id: String,
    pub sealed: Vec<u8>,
    /// The id of the KEK that sealed it, as stored.
    pub kek_id: String,
    pub key_type: KeyType,
    /// As stored with the identity: `ecdsa`, `ed25519`, `rsa-pkcs1`, `rsa-pss`.
    pub scheme: String,
    pub algorithm: DigestAlgorithm,
    pub digest: Vec<u8>,
    pub deadline: Instant,
}

impl Handler<SignDigest> for IdentityVault {
    type Result = Result<Vec<u8>, EngineError>;

    fn handle(&mut self, msg: SignDigest, _: &mut Self::Context) -> Self::Result {
        if Instant::now() >= msg.deadline {
            return Err(EngineError::DeadlineExceeded { retry_after: Duration::from_secs(1) });
        }
        if let Some(latency) = self.sign_latency {
            std::thread::sleep(latency);
        }
        let started = Instant::now();
        if msg.kek_id != self.kek.id() {
            return Err(EngineError::Internal(format!(
                "identity {} was sealed under key-encryption key {}, not the configured {}",
                msg.id,
                msg.kek_id,
                self.kek.id()
            )));
        }
        let result = super::catch_panic("identity-vault", || {
            let key = self.kek.open(&msg.id, &msg.sealed).map_err(|e| EngineError::Internal(e.to_string()))?;
            sign_digest(msg.key_type, &key, &msg.scheme, msg.algorithm, &msg.digest)
        })
        .unwrap_or_else(|panic| {
            self.metrics.worker_panics.get_or_create(&crate::metrics::ca("identity-vault")).inc();
            Err(EngineError::Internal(format!("identity signature panicked: {panic}")))
        });
        self.metrics.identity_sign_seconds.observe(started.elapsed().as_secs_f64());
        result
    }
}
