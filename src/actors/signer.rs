//! The Signer: one CA's key, on threads of its own (CPU-bound work never runs on an event loop).
//! It builds the TBS from the profile, lints it, and — after the Store has recorded the TBS —
//! signs it. A panic is caught and answered as a signer failure; the thread lives on.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use actix::prelude::*;

use super::gauges::CellGauges;
use super::job::FINISH_MARGIN;
use crate::error::EngineError;
use crate::metrics::{self, Metrics};
use crate::pki::profile::ApprovedNames;
use crate::pki::{tbs, CaMaterial, CheckedCsr, LintedTbs, PreparedCert, Profile};

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
    pub sign_latency: Option<Duration>,
    pub failure_rate: f64,
}

impl Actor for Signer {
    type Context = SyncContext<Self>;
}

/// Build and lint the to-be-signed certificate.
#[derive(Message)]
#[rtype(result = "Result<PreparedCert, EngineError>")]
pub struct Prepare {
    pub profile: Arc<Profile>,
    pub csr: Arc<CheckedCsr>,
    pub names: Arc<ApprovedNames>,
}

/// Sign recorded, linted TBS bytes, unless the deadline has passed.
#[derive(Message)]
#[rtype(result = "Result<Vec<u8>, EngineError>")]
pub struct Sign {
    pub tbs: LintedTbs,
    pub deadline: Instant,
}

impl Handler<Prepare> for Signer {
    type Result = Result<PreparedCert, EngineError>;

    fn handle(&mut self, msg: Prepare, _: &mut Self::Context) -> Self::Result {
        super::catch_panic("signer", || tbs::prepare(&self.ca, &msg.profile, &msg.csr, &msg.names, SystemTime::now()))
            .unwrap_or_else(|panic| {
                self.metrics.worker_panics.get_or_create(&metrics::ca(&self.ca.id)).inc();
                Err(EngineError::Internal(format!("certificate preparation panicked: {panic}")))
            })
    }
}

impl Handler<Sign> for Signer {
    type Result = Result<Vec<u8>, EngineError>;

    fn handle(&mut self, msg: Sign, _: &mut Self::Context) -> Self::Result {
        if let Some(latency) = self.faults.sign_latency {
            std::thread::sleep(latency);
        }
        // The last check before the key is used: a caller that has given up gets nothing signed.
        if Instant::now() + FINISH_MARGIN >= msg.deadline {
            self.metrics.expired_in_queue.get_or_create(&metrics::ca(&self.ca.id)).inc();
            return Err(EngineError::DeadlineExceeded { retry_after: std::time::Duration::from_secs(1) });
        }
        if self.faults.failure_rate > 0.0 && rand::random::<f64>() < self.faults.failure_rate {
            return Err(EngineError::SignerFailure { ca: self.ca.id.clone(), reason: "injected signer fault".into() });
        }
        let started = Instant::now();
        let result = super::catch_panic("signer", || {
            super::injected_panic(&self.gauges.injected_signer_panics, "signer");
            tbs::sign(&self.ca, &msg.tbs)
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
