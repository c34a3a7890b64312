//! The identity vault: the only place an identity's private key is ever in the clear. On threads
//! of its own ([`Workers`], never a CA's signer threads), it opens a sealed key under the KEK,
//! signs one digest, and drops the key; the opened bytes are wiped and OpenSSL cleanses the key
//! it parsed. At most [`MAX_WAITING`] signatures wait for a thread; more are refused at once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::workers::{Refused, Workers};
use crate::error::EngineError;
use crate::metrics::Metrics;
use crate::pki::identity::{sign_digest, DigestAlgorithm};
use crate::pki::kek::Kek;
use crate::pki::KeyType;

/// Signatures waiting for a vault thread; beyond this, refused at once.
pub const MAX_WAITING: usize = 256;

pub struct IdentityVault {
    pub kek: Arc<Kek>,
    pub metrics: Arc<Metrics>,
    /// Injected fault (dev mode only): a slow vault, for real.
    pub sign_latency: Option<Duration>,
}

/// Sign `digest` with the identity `id`'s sealed key.
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

/// A signature asked for, and where its answer goes.
type VaultJob = (SignDigest, oneshot::Sender<Result<Vec<u8>, EngineError>>);

/// Where the engine asks the vault for signatures.
#[derive(Clone)]
pub struct VaultHandle {
    queue: Workers<VaultJob>,
}

impl VaultHandle {
    pub fn start(vault: IdentityVault, threads: usize) -> VaultHandle {
        let queue = Workers::start("castellum-vault", threads, MAX_WAITING, move |(msg, reply): VaultJob| {
            // Its caller gave up (the deadline, or the engine stopping): the key stays sealed.
            if !reply.is_closed() {
                let _ = reply.send(vault.sign(msg));
            }
        });
        VaultHandle { queue }
    }

    /// The signature, or why there is none, by the request's deadline: refused at once when
    /// [`MAX_WAITING`] signatures wait.
    pub async fn sign(&self, msg: SignDigest) -> Result<Vec<u8>, EngineError> {
        let deadline = msg.deadline;
        let (reply, signed) = oneshot::channel();
        match self.queue.try_send((msg, reply)) {
            Ok(()) => match tokio::time::timeout_at(deadline.into(), signed).await {
                Ok(answer) => answer.unwrap_or(Err(EngineError::ShuttingDown)),
                Err(_) => Err(EngineError::DeadlineExceeded { retry_after: Duration::from_secs(1) }),
            },
            Err(Refused::Full(_)) => Err(EngineError::IdentitySignerBusy),
            Err(Refused::Gone(_)) => Err(EngineError::ShuttingDown),
        }
    }

    /// Signatures waiting for a vault thread.
    pub fn waiting(&self) -> usize {
        self.queue.waiting()
    }
}

impl IdentityVault {
    fn sign(&self, msg: SignDigest) -> Result<Vec<u8>, EngineError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::identity::generate_sealed;

    fn vault(sign_latency: Option<Duration>) -> (VaultHandle, Arc<Kek>, Arc<Metrics>) {
        let kek = Arc::new(Kek::from_bytes(&[7u8; 32]));
        let metrics = Arc::new(Metrics::new());
        let vault = IdentityVault { kek: kek.clone(), metrics: metrics.clone(), sign_latency };
        (VaultHandle::start(vault, 1), kek, metrics)
    }

    fn request(kek: &Kek, digest: &[u8; 32], deadline: Instant) -> (SignDigest, Vec<u8>) {
        let key = generate_sealed(KeyType::EcdsaP256, 0, kek).expect("a sealed key");
        let msg = SignDigest {
            id: key.id.clone(),
            sealed: key.sealed,
            kek_id: key.kek_id,
            key_type: KeyType::EcdsaP256,
            scheme: "ecdsa".into(),
            algorithm: DigestAlgorithm::Sha256,
            digest: digest.to_vec(),
            deadline,
        };
        (msg, key.spki_der)
    }

    #[actix_rt::test]
    async fn the_vault_signs_with_the_sealed_key() {
        let (vault, kek, _) = vault(None);
        let digest = openssl::sha::sha256(b"to be signed");
        let (msg, spki) = request(&kek, &digest, Instant::now() + Duration::from_secs(5));
        let signature = vault.sign(msg).await.expect("a signature");
        // Judged by OpenSSL on the identity's public key, not by the vault's own code.
        let public = openssl::pkey::PKey::public_key_from_der(&spki).unwrap();
        let sig = openssl::ecdsa::EcdsaSig::from_der(&signature).unwrap();
        assert!(sig.verify(&digest, &public.ec_key().unwrap()).unwrap());
    }

    #[actix_rt::test]
    async fn a_full_vault_refuses_at_once_and_a_caller_that_gave_up_gets_nothing_signed() {
        // One thread, each signature 200 ms: the first holds the thread, MAX_WAITING wait.
        let (vault, kek, metrics) = vault(Some(Duration::from_millis(200)));
        let digest = openssl::sha::sha256(b"x");
        let later = Instant::now() + Duration::from_secs(60);
        let (reply, first) = oneshot::channel();
        assert!(vault.queue.try_send((request(&kek, &digest, later).0, reply)).is_ok());
        // The thread has taken the first once nothing waits.
        let started = Instant::now();
        while vault.waiting() > 0 {
            assert!(started.elapsed() < Duration::from_secs(5), "the vault's thread never took the first");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        for _ in 0..MAX_WAITING {
            // Callers that have given up already: their replies are closed.
            let (reply, _) = oneshot::channel();
            assert!(vault.queue.try_send((request(&kek, &digest, later).0, reply)).is_ok());
        }
        assert_eq!(vault.waiting(), MAX_WAITING);
        let started = Instant::now();
        let refused = vault.sign(request(&kek, &digest, later).0).await;
        assert!(matches!(refused, Err(EngineError::IdentitySignerBusy)), "{refused:?}");
        assert!(started.elapsed() < Duration::from_millis(100), "refused at once: {:?}", started.elapsed());
        assert!(first.await.expect("answered").is_ok());
        // The abandoned ones are skipped without opening their keys (each would take 200 ms and
        // be timed): only the first signature was made.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(vault.waiting(), 0);
        let rendered = metrics.render();
        let count = rendered.lines().find(|l| l.starts_with("castellum_identity_sign_duration_seconds_count"));
        assert_eq!(count.and_then(|l| l.split(' ').next_back()), Some("1"), "{rendered}");
    }
}
