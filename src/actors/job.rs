//! One unit of work for a CA's cell (made from what intake admitted), who waits for it, and how
//! it is answered: what intake, the resumer, the cell,
//! the pipeline and the signer share (a leaf: it knows none of them).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::error::EngineError;
use crate::pki::identity::IdentityDraft;
use crate::pki::profile::ApprovedNames;
use crate::pki::Lane;
use crate::pki::{CheckedCsr, Profile};
use crate::states::RequestMode;
use crate::types::IssuedCertificate;

pub type Reply = oneshot::Sender<Result<IssuedCertificate, EngineError>>;

/// Where an admitted request goes next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dispatch {
    /// To its CA's cell, to be signed.
    Queue,
    /// Stored as parked: its CA is parked, and an operator's resubmit releases it.
    Park,
}

/// A request that passed intake, with its deadline: ready to become a job once it has the key
/// it certifies (`K`: [`Keyed`] for a CSR; [`KeyToMake`] for a disposable identity, whose key
/// the engine takes from its pool after admission).
pub struct Admitted<K = Keyed> {
    pub profile: Arc<Profile>,
    pub names: Arc<ApprovedNames>,
    pub deadline: Instant,
    pub dispatch: Dispatch,
    pub key: K,
}

/// The key a certificate will certify: the requester's, from its CSR, or for a disposable
/// identity the engine's sealed key (its public half in `csr`, as a CSR's would be).
pub struct Keyed {
    pub csr: Arc<CheckedCsr>,
    pub identity: Option<Arc<IdentityDraft>>,
}

/// An admitted disposable identity whose key is not taken yet.
pub struct KeyToMake;

impl<K> Admitted<K> {
    /// The lane the request is scheduled in (its profile's).
    pub fn lane(&self) -> Lane {
        self.profile.lane
    }
}

impl Admitted<KeyToMake> {
    /// The identity's key, once taken: its public half as the CSR the cell and signer see.
    pub fn with_key(self, csr: CheckedCsr, draft: Arc<IdentityDraft>) -> Admitted {
        Admitted {
            profile: self.profile,
            names: self.names,
            deadline: self.deadline,
            dispatch: self.dispatch,
            key: Keyed { csr: Arc::new(csr), identity: Some(draft) },
        }
    }
}

impl Admitted {
    /// The fingerprint of what was asked for, to recognise an idempotent retry: the profile and
    /// CSR, or for an identity the profile and subject (its key is new on every attempt).
    pub fn body_sha256(&self) -> String {
        let mut h = openssl::sha::Sha256::new();
        match &self.key.identity {
            Some(draft) => h.update(&draft.fingerprint),
            None => {
                h.update(self.profile.id.as_bytes());
                h.update(b"\n");
                h.update(&self.key.csr.der);
            }
        }
        hex::encode(h.finish())
    }
}

/// Who is waiting for a job's outcome, and which stored request records it.
pub enum Caller {
    /// A synchronous caller; nothing about the attempt is stored.
    Waiting(Reply),
    /// A synchronous caller whose attempt is stored (it sent an `Idempotency-Key`).
    WaitingRecorded { request_id: String, reply: Reply },
    /// An accepted asynchronous request: its stored row is its only answer.
    Stored { request_id: String },
}

impl Caller {
    /// The stored request this caller's outcome is recorded on.
    pub fn request_id(&self) -> Option<&str> {
        match self {
            Caller::Waiting(_) => None,
            Caller::WaitingRecorded { request_id, .. } | Caller::Stored { request_id } => Some(request_id),
        }
    }

    pub fn mode(&self) -> RequestMode {
        match self {
            Caller::Waiting(_) | Caller::WaitingRecorded { .. } => RequestMode::Sync,
            Caller::Stored { .. } => RequestMode::Async,
        }
    }

    /// Answer a waiting caller (a stored request is recorded by the pipeline, not here).
    pub fn answer(self, result: Result<IssuedCertificate, EngineError>) {
        match self {
            Caller::Waiting(reply) | Caller::WaitingRecorded { reply, .. } => {
                // A caller that stopped waiting (its deadline passed) has dropped its receiver.
                let _ = reply.send(result);
            }
            Caller::Stored { .. } => {}
        }
    }
}

/// One unit of work for a cell.
pub struct Job {
    pub profile: Arc<Profile>,
    pub csr: Arc<CheckedCsr>,
    pub names: Arc<ApprovedNames>,
    pub client: String,
    pub caller: Caller,
    pub deadline: Instant,
    pub enqueued_at: Instant,
    pub span: tracing::Span,
    /// A disposable identity created with this certificate (interactive lane only).
    pub identity: Option<Arc<IdentityDraft>>,
}

impl Job {
    /// The one way a job is made: from what intake admitted (its deadline included), for whom.
    pub fn new(admitted: Admitted, client: &str, caller: Caller, span: tracing::Span) -> Job {
        Job {
            profile: admitted.profile,
            csr: admitted.key.csr,
            names: admitted.names,
            client: client.to_string(),
            caller,
            deadline: admitted.deadline,
            enqueued_at: Instant::now(),
            span,
            identity: admitted.key.identity,
        }
    }
}

/// Time kept, before a deadline, to record a signed certificate and answer: a job that does not
/// have it left is not signed, so nobody is answered 503 for a certificate that was issued.
pub const FINISH_MARGIN: Duration = Duration::from_millis(50);

pub fn deadline_exceeded() -> EngineError {
    EngineError::DeadlineExceeded { retry_after: Duration::from_secs(1) }
}
