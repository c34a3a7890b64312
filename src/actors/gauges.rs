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
    /// Issued jobs by time in the cell (arrival to answer): bucket `i` counts those under
    /// 0.25 ms × 2^i (the last, everything slower). Read as differences by the console's history.
    pub issued_latency: [AtomicU64; LATENCY_BUCKETS],
}

pub const LATENCY_BUCKETS: usize = 16;

/// The upper bound of latency bucket `i`.
pub fn latency_bound(i: usize) -> Duration {
    Duration::from_micros(250u64 << i.min(LATENCY_BUCKETS - 1))
}

impl CellGauges {
    /// Count an issued job that spent `took` in the cell.
    pub fn record_issued(&self, took: Duration) {
        let i = (0..LATENCY_BUCKETS).find(|i| took <= latency_bound(*i)).unwrap_or(LATENCY_BUCKETS - 1);
        self.issued_latency[i].fetch_add(1, Ordering::Relaxed);
    }

    pub fn issued_latency(&self) -> [u64; LATENCY_BUCKETS] {
        std::array::from_fn(|i| self.issued_latency[i].load(Ordering::Relaxed))
    }

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
