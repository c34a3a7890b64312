//! The Signer: one CA's key, on threads of its own (CPU-bound work never runs on an event loop).
//! It signs linted TBS bytes the Store has recorded, and hands the certificate straight to the
//! Store; whoever waits hears from the Store's worker once the certificate is committed. A panic
//! is caught and answered as a signer failure; the thread lives on.
//!
//! Its threads ([`Workers`]) take [`Sign`]s from one bounded queue that anyone holding a
//! [`SignerHandle`] puts into: the Store's worker does, the moment a write-ahead record is
//! committed.

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::gauges::CellGauges;
use super::job::FINISH_MARGIN;
use super::store::StoreHandle;
use super::workers::{Refused, Workers};
use crate::db::writes::WriteOp;
use crate::error::EngineError;
use crate::metrics::{self, Metrics};
use crate::pki::{tbs, CaMaterial, LintedTbs};

pub struct Signer {
    pub ca: Arc<CaMaterial>,
    pub metrics: Arc<Metrics>,
    /// Injected faults (dev mode only): a slow or failing HSM, on this CA's threads only.
    pub faults: Faults,
    /// Where the admin console reads this CA's signing count and time.
    pub gauges: Arc<CellGauges>,
}

/// Fault injection for drills and tests (dev mode only): a slow or failing signer, for real.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Before the signature starts (a slow signer: it queues the CA's work).
    pub sign_latency: Option<Duration>,
    /// Inside the key operation (a hung token): what `cas[].sign_timeout` judges.
    pub key_stall: Option<Duration>,
    pub failure_rate: f64,
}

/// Where a CA's signatures are asked for; its threads stop once every handle is gone.
#[derive(Clone)]
pub struct SignerHandle {
    queue: Workers<Sign>,
    ca: Arc<str>,
}

impl SignerHandle {
    /// Start `threads` threads signing with `signer`'s key. `capacity` bounds the queue: the
    /// cell never has more jobs in flight, so a full queue is a defect, answered as one.
    pub fn start(signer: Signer, threads: usize, capacity: usize) -> SignerHandle {
        let ca: Arc<str> = signer.ca.id.as_str().into();
        let queue = Workers::start("castellum-sign", threads, capacity, move |sign| signer.handle(sign));
        SignerHandle { queue, ca }
    }

    /// Ask for a signature; a refusal is answered on the job's reply at once.
    pub fn send(&self, sign: Sign) {
        let (sign, reason) = match self.queue.try_send(sign) {
            Ok(()) => return,
            Err(Refused::Full(sign)) => (sign, "the signer's queue is full"),
            Err(Refused::Gone(sign)) => (sign, "the signer's threads are gone"),
        };
        let failure = EngineError::SignerFailure { ca: self.ca.to_string(), reason: reason.into() };
        let _ = sign.reply.send(Err(NotIssued::Unsigned(failure)));
    }
}

/// Sign recorded, linted TBS bytes, unless the deadline has passed; then record the certificate
/// (`record` makes the write from its DER) and answer `reply` with the DER once it is committed.
pub struct Sign {
    pub tbs: LintedTbs,
    pub deadline: Instant,
    pub store: StoreHandle,
    pub record: Record,
    /// When the key operation started (the time it may take is counted from there): set, not
    /// sent, so the cell's thread is not woken for it (whoever waits reads it when its timer
    /// fires).
    pub started: Arc<OnceLock<Instant>>,
    pub reply: oneshot::Sender<Result<Vec<u8>, NotIssued>>,
}

/// Makes the write that records a certificate from its DER.
pub type Record = Box<dyn FnOnce(&[u8]) -> WriteOp + Send>;

/// Why a [`Sign`] ended without a recorded certificate.
#[derive(Debug)]
pub enum NotIssued {
    /// The write-ahead record was not committed: there is nothing to sign, nor to abandon.
    Unwritten(EngineError),
    /// Nothing was signed (the deadline passed, or the key failed): the write-ahead record
    /// can be abandoned.
    Unsigned(EngineError),
    /// Signed, but the store did not commit the certificate: its record stays `signing`.
    Unrecorded(EngineError),
}

impl Signer {
    fn handle(&self, msg: Sign) {
        if let Some(latency) = self.faults.sign_latency {
            std::thread::sleep(latency);
        }
        // Nobody waits for this certificate any more (its cell crashed and its caller was told
        // so): nothing is signed.
        if msg.reply.is_closed() {
            return;
        }
        let _ = msg.started.set(Instant::now());
        match self.sign(&msg.tbs, msg.deadline) {
            // Looked at again: the cell may have crashed while the key worked. The signature is
            // dropped unrecorded; its write-ahead record stays `signing` until the resumer's
            // sweep marks it abandoned. (A crash between here and the commit still records it.)
            Ok(_) if msg.reply.is_closed() => {}
            Ok(der) => {
                let reply = msg.reply;
                let write = (msg.record)(&der);
                msg.store.hand_over(write, move |committed| {
                    let _ = reply.send(committed.map(|_| der).map_err(NotIssued::Unrecorded));
                });
            }
            Err(e) => {
                let _ = msg.reply.send(Err(NotIssued::Unsigned(e)));
            }
        }
    }

    fn sign(&self, tbs: &LintedTbs, deadline: Instant) -> Result<Vec<u8>, EngineError> {
        // The last check before the key is used: a caller that has given up gets nothing signed.
        if Instant::now() + FINISH_MARGIN >= deadline {
            self.metrics.expired_in_queue.get_or_create(&metrics::ca(&self.ca.id)).inc();
            return Err(EngineError::DeadlineExceeded { retry_after: std::time::Duration::from_secs(1) });
        }
        if self.faults.failure_rate > 0.0 && rand::random::<f64>() < self.faults.failure_rate {
            return Err(EngineError::SignerFailure { ca: self.ca.id.clone(), reason: "injected signer fault".into() });
        }
        let started = Instant::now();
        let result = super::catch_panic("signer", || {
            super::injected_panic(&self.gauges.injected_signer_panics, "signer");
            if let Some(stall) = self.faults.key_stall {
                std::thread::sleep(stall);
            }
            tbs::sign(&self.ca, tbs)
        })
        .unwrap_or_else(|panic| {
            self.metrics.worker_panics.get_or_create(&metrics::ca(&self.ca.id)).inc();
            Err(EngineError::SignerFailure { ca: self.ca.id.clone(), reason: format!("signer panicked: {panic}") })
        });
        let labels = metrics::ca(&self.ca.id);
        let took = started.elapsed();
        self.metrics.sign_seconds.get_or_create(&labels).observe(took.as_secs_f64());
        if result.is_ok() {
            self.metrics.signatures.get_or_create(&labels).inc();
            self.gauges.signatures.fetch_add(1, Ordering::Relaxed);
            self.gauges.sign_time_us.fetch_add(took.as_micros() as u64, Ordering::Relaxed);
        }
        result
    }
}
