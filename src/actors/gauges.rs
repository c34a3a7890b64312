//! What a cell publishes for others to read without asking it: intake (refuse early, predict
//! waits), the signer threads (signatures made) and the admin console.

use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use crate::pki::Lane;

/// What a cell publishes for intake to read without asking (refuse early, predict waits).
#[derive(Debug, Default)]
pub struct CellGauges {
    /// Epoch ms until which the breaker is open (0: not open).
    pub breaker_open_until_ms: AtomicI64,
    pub interactive_depth: AtomicUsize,
    pub background_depth: AtomicUsize,
    /// Smoothed time between completions while busy, in microseconds.
    pub completion_spacing_us: AtomicU64,
    /// Signatures made and the time they took (written by the signer threads).
    pub signatures: AtomicU64,
    pub sign_time_us: AtomicU64,
    /// Fault injection (dev mode only): this many of the CA's next signatures panic in the
    /// signer (caught there, answered as signer failures).
    pub injected_signer_panics: AtomicU32,
}

impl CellGauges {
    /// How long a job entering `lane` now can expect to wait before it is dispatched.
    pub fn predicted_wait(&self, lane: Lane) -> Duration {
        let ahead = match lane {
            Lane::Interactive => self.interactive_depth.load(Ordering::Relaxed),
            Lane::Background => {
                self.interactive_depth.load(Ordering::Relaxed) + self.background_depth.load(Ordering::Relaxed)
            }
        };
        Duration::from_micros(self.completion_spacing_us.load(Ordering::Relaxed).saturating_mul(ahead as u64))
    }
}
