//! One unit of work for a CA's cell, and how it is answered: what intake, the resumer, the cell,
//! the pipeline and the signer share (a leaf: it knows none of them).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::error::EngineError;
use crate::pki::profile::ApprovedNames;
use crate::pki::{CheckedCsr, Profile};
use crate::types::IssuedCertificate;

pub type Reply = oneshot::Sender<Result<IssuedCertificate, EngineError>>;

/// One unit of work for a cell.
pub struct Job {
    pub profile: Arc<Profile>,
    pub csr: Arc<CheckedCsr>,
    pub names: Arc<ApprovedNames>,
    pub client: String,
    /// The stored request this job serves (asynchronous or idempotent requests).
    pub request_id: Option<String>,
    pub is_async: bool,
    pub deadline: Instant,
    pub enqueued_at: Instant,
    pub reply: Option<Reply>,
    pub span: tracing::Span,
    /// A disposable identity created with this certificate (interactive lane only).
    pub identity: Option<Arc<crate::pki::identity::IdentityDraft>>,
}

impl Job {
    pub fn answer(&mut self, result: Result<IssuedCertificate, EngineError>) {
        if let Some(reply) = self.reply.take() {
            let _ = reply.send(result);
        }
    }
}

/// Time kept, before a deadline, to record a signed certificate and answer: a job that does not
/// have it left is not signed, so nobody is answered 503 for a certificate that was issued.
pub const FINISH_MARGIN: Duration = Duration::from_millis(50);

pub fn deadline_exceeded() -> EngineError {
    EngineError::DeadlineExceeded { retry_after: Duration::from_secs(1) }
}
