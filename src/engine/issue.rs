//! Issuance through the engine: synchronous (with a deadline), asynchronous (durable), and
//! idempotent retries of either.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::Engine;
use crate::actors::intake::{CsrPem, Route};
use crate::actors::job::{Admitted, Caller, Dispatch, Job};
use crate::audit::Action;
use crate::config::Sabotage;
use crate::db::models::{NewAuditEvent, RequestRow};
use crate::db::queries;
use crate::db::writes::{WriteOp, WriteOutcome};
use crate::error::EngineError;
use crate::pki::now_ms;
use crate::states::{RequestMode, RequestState};
use crate::types::*;

/// How often a retry waiting on an earlier attempt looks at its state.
const IDEMPOTENT_POLL: Duration = Duration::from_millis(25);
/// How long past its deadline a synchronous attempt may still record a certificate: the signer
/// refuses work past its deadline, and a signature made just before it is committed in the
/// Store's next batch, which gives up after SQLite's `busy_timeout` (2 s) at worst.
const ABANDONED_GRACE_MS: i64 = 2_000;
const MAX_IDEMPOTENCY_KEY: usize = 255;

impl Engine {
    /// Issue a certificate now, within the request's deadline.
    pub async fn issue(&self, client: &Client, req: IssueRequest) -> Result<IssuedCertificate, EngineError> {
        let started = Instant::now();
        let stray = self.stray_connection().await;
        let result = self.issue_inner(client, &req).await;
        let result = self.sabotaged_overload(result, started).await;
        drop(stray);
        self.count(result.as_ref().map(|_| "issued"));
        match &result {
            Ok(issued) => {
                self.time_issued(issued, started);
                self.presign_ocsp(issued)
            }
            Err(e) => self.refused(client, Action::Issue, &req.profile, e),
        }
        result
    }

    async fn issue_inner(&self, client: &Client, req: &IssueRequest) -> Result<IssuedCertificate, EngineError> {
        self.refuse_if_stopping()?;
        if self.inner.sabotage.has(Sabotage::StickyOverload) && self.inner.overload_latched.load(Ordering::Relaxed) {
            return Err(EngineError::CaOverloaded {
                ca: "every CA".into(),
                reason: "overloaded earlier (sabotage sticky-overload)".into(),
                retry_after: Duration::from_secs(1),
            });
        }
        check_idempotency_key(req.idempotency_key.as_deref())?;
        let route = Route::Sync { wait: req.wait };
        let admitted = self.inner.intake.admit(client, &req.profile, CsrPem(&req.csr_pem), route)?;
        // Only admitted work gets a span of its own: a refusal is the request span's status and
        // slug and a tally in the ledger, so a storm of them formats nothing more.
        let span = tracing::info_span!("issue", client = %client.name, profile = %req.profile, ca = %admitted.profile.ca, request_id = tracing::field::Empty);
        let issuing = self.issue_admitted(client, admitted, req.idempotency_key.as_deref(), span.clone());
        let (issued, _) = tracing::Instrument::instrument(issuing, span).await?;
        Ok(issued)
    }

    /// Issue an admitted request synchronously, honouring its Idempotency-Key: the first attempt
    /// runs, a retry gets (or waits for) the first attempt's certificate.
    pub(super) async fn issue_admitted(
        &self,
        client: &Client,
        admitted: Admitted,
        idempotency_key: Option<&str>,
        span: tracing::Span,
    ) -> Result<(IssuedCertificate, Provenance), EngineError> {
        let Some(key) = idempotency_key else {
            let issued = self.run_sync(client, admitted, None, span).await?;
            return Ok((issued, Provenance::Fresh));
        };
        let id = uuid::Uuid::now_v7().to_string();
        span.record("request_id", id.as_str());
        let expires_at = deadline_ms(admitted.deadline);
        let row = self.request_row(&id, client, &admitted, RequestMode::Sync, Some(key.to_string()), expires_at);
        match self.inner.store.write(WriteOp::InsertRequest(Box::new(row))).await? {
            WriteOutcome::Done => {
                let issued = self.run_sync(client, admitted, Some(id), span).await?;
                Ok((issued, Provenance::Fresh))
            }
            WriteOutcome::Conflict => self.follow_earlier_attempt(client, key, admitted, span).await,
            other => Err(unexpected(other)),
        }
    }

    /// What an engine without load shedding does with an overload refusal: remember it for good
    /// ([`Sabotage::StickyOverload`]) or make the caller wait out its deadline
    /// ([`Sabotage::TimeoutsNotRefusals`]). `result` unchanged on an engine built right.
    async fn sabotaged_overload(
        &self,
        result: Result<IssuedCertificate, EngineError>,
        started: Instant,
    ) -> Result<IssuedCertificate, EngineError> {
        if !matches!(result, Err(EngineError::CaOverloaded { .. })) {
            return result;
        }
        let sabotage = self.inner.sabotage;
        if sabotage.has(Sabotage::StickyOverload) {
            self.inner.overload_latched.store(true, Ordering::Relaxed);
        }
        if sabotage.has(Sabotage::TimeoutsNotRefusals) {
            tokio::time::sleep_until((started + self.inner.config.lanes.interactive.default_deadline).into()).await;
            return Err(EngineError::DeadlineExceeded { retry_after: Duration::from_secs(1) });
        }
        result
    }

    async fn run_sync(
        &self,
        client: &Client,
        admitted: Admitted,
        request_id: Option<String>,
        span: tracing::Span,
    ) -> Result<IssuedCertificate, EngineError> {
        let (tx, rx) = oneshot::channel();
        let (ca, deadline) = (admitted.profile.ca.clone(), admitted.deadline);
        let caller = match request_id {
            Some(request_id) => Caller::WaitingRecorded { request_id, reply: tx },
            None => Caller::Waiting(tx),
        };
        self.inner.intake.hand_to_cell(Job::new(admitted, &client.name, caller, span))?;
        // The caller is answered at its deadline whatever happens inside; the cell drops the
        // job unsigned if it is still queued by then.
        // Without deadlines (a defect on purpose) the caller waits as long as the cell takes.
        let deadline = match self.inner.sabotage.has(Sabotage::IgnoreDeadlines) {
            true => deadline + Duration::from_secs(3600),
            false => deadline,
        };
        match tokio::time::timeout_at(deadline.into(), rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) if self.is_shutting_down() => Err(EngineError::ShuttingDown),
            // The cell went away without answering: it crashed, and its supervisor replaces it.
            Ok(Err(_)) => Err(EngineError::CaUnavailable {
                ca,
                reason: "the CA's cell stopped before answering; it is being restarted".into(),
                retry_after: Duration::from_secs(1),
            }),
            Err(_) => Err(EngineError::DeadlineExceeded { retry_after: Duration::from_secs(1) }),
        }
    }

    /// A request with this Idempotency-Key exists: answer with its outcome, wait for it, or —
    /// if it failed for a passing reason — take it over and try again.
    async fn follow_earlier_attempt(
        &self,
        client: &Client,
        key: &str,
        admitted: Admitted,
        span: tracing::Span,
    ) -> Result<(IssuedCertificate, Provenance), EngineError> {
        let (body, deadline) = (admitted.body_sha256(), admitted.deadline);
        let (client_name, key_owned) = (client.name.clone(), key.to_string());
        loop {
            let (c, k) = (client_name.clone(), key_owned.clone());
            let row = self
                .read(move |conn| queries::find_request_by_key(conn, &c, &k))
                .await?
                .ok_or(EngineError::NotFound)?;
            if row.body_sha256 != body {
                return Err(EngineError::IdempotencyKeyReuse);
            }
            span.record("request_id", row.id.as_str());
            match row.state {
                RequestState::Issued => return Ok((self.issued_certificate_of(&row).await?, Provenance::Replayed)),
                RequestState::Failed => return Err(recorded_error(&row)),
                // An asynchronous request's expiry is its result: it was never going to be issued.
                RequestState::Expired if row.mode == RequestMode::Async => return Err(recorded_error(&row)),
                RequestState::Expired | RequestState::Pending | RequestState::Retryable | RequestState::Parked => {}
            }
            let now = now_ms();
            if row.mode == RequestMode::Sync {
                // This retry takes the request over when its last attempt is over: it failed for a
                // passing reason (recorded retryable), or it ended without an answer (its
                // instance died with it, or its deadline passed) and is past its deadline and the
                // grace, when it can no longer produce a certificate. A key replays results, not
                // transient failures.
                let abandoned = matches!(row.state, RequestState::Pending | RequestState::Expired)
                    && row.expires_at + ABANDONED_GRACE_MS < now
                    && !self.inner.sabotage.has(Sabotage::StickyKeyedFailures);
                if row.state == RequestState::Retryable || abandoned {
                    let (id, instance, until) =
                        (row.id.clone(), self.inner.instance.to_string(), deadline_ms(deadline));
                    let expired_before = now - ABANDONED_GRACE_MS;
                    let won = self
                        .read(move |conn| queries::retake_request(conn, &id, &instance, now, until, expired_before))
                        .await?;
                    if won {
                        let issued = self.run_sync(client, admitted, Some(row.id), span).await?;
                        return Ok((issued, Provenance::Fresh));
                    }
                    continue; // another retry took it over first: follow that attempt
                }
                // An attempt is under way, or within its grace (a signature made just before
                // its deadline may still be committing): wait for its outcome.
                if Instant::now() + IDEMPOTENT_POLL >= deadline {
                    return Err(match row.state {
                        RequestState::Expired => recorded_error(&row),
                        _ => EngineError::DeadlineExceeded { retry_after: Duration::from_secs(1) },
                    });
                }
                tokio::time::sleep(IDEMPOTENT_POLL).await;
                continue;
            }
            let claim_lapsed = row.claimed_until.is_none_or(|t| t < now);
            if row.state == RequestState::Retryable || claim_lapsed {
                let (id, instance, until) = (row.id.clone(), self.inner.instance.to_string(), deadline_ms(deadline));
                let won = self
                    .read(move |conn| {
                        queries::claim_request(
                            conn,
                            &id,
                            &instance,
                            now,
                            until,
                            &[RequestState::Pending, RequestState::Retryable],
                        )
                    })
                    .await?;
                if won {
                    let issued = self.run_sync(client, admitted, Some(row.id), span).await?;
                    return Ok((issued, Provenance::Fresh));
                }
            }
            if Instant::now() + IDEMPOTENT_POLL >= deadline {
                return Err(EngineError::DeadlineExceeded { retry_after: Duration::from_secs(1) });
            }
            tokio::time::sleep(IDEMPOTENT_POLL).await;
        }
    }

    /// Store the request as pending (durably) and answer at once; it is issued in the
    /// background, by this instance or — after a crash — by any other.
    pub async fn submit(&self, client: &Client, req: IssueRequest) -> Result<Accepted, EngineError> {
        let result = self.submit_inner(client, &req).await;
        self.count(result.as_ref().map(|_| "accepted"));
        if let Err(e) = &result {
            self.refused(client, Action::Submit, &req.profile, e);
        }
        result
    }

    async fn submit_inner(&self, client: &Client, req: &IssueRequest) -> Result<Accepted, EngineError> {
        self.refuse_if_stopping()?;
        check_idempotency_key(req.idempotency_key.as_deref())?;
        let admitted = self.inner.intake.admit(client, &req.profile, CsrPem(&req.csr_pem), Route::Async)?;
        let id = uuid::Uuid::now_v7().to_string();
        // Only admitted work gets a span of its own (see `issue_inner`).
        let span = tracing::info_span!("submit", client = %client.name, profile = %req.profile, request_id = %id);
        let expires_at = now_ms() + self.inner.config.async_requests.max_age.as_millis() as i64;
        let mut row =
            self.request_row(&id, client, &admitted, RequestMode::Async, req.idempotency_key.clone(), expires_at);
        if admitted.dispatch == Dispatch::Park {
            // The CA is parked: the request waits, durably, for an operator's resubmit.
            row.state = RequestState::Parked;
            row.claimed_by = None;
            row.claimed_until = None;
        }
        match self.inner.store.write(WriteOp::InsertRequest(Box::new(row))).await? {
            WriteOutcome::Done => {}
            other @ (WriteOutcome::IdentityUsed(_)
            | WriteOutcome::IdentityNotFound
            | WriteOutcome::IdentityGone { .. }) => return Err(unexpected(other)),
            WriteOutcome::Conflict => {
                let (c, k) = (client.name.clone(), req.idempotency_key.clone().unwrap_or_default());
                let row = self
                    .read(move |conn| queries::find_request_by_key(conn, &c, &k))
                    .await?
                    .ok_or(EngineError::NotFound)?;
                if row.body_sha256 != admitted.body_sha256() {
                    return Err(EngineError::IdempotencyKeyReuse);
                }
                return Ok(Accepted { request_id: row.id, replayed: true });
            }
        }
        match admitted.dispatch {
            Dispatch::Park => return Ok(Accepted { request_id: id, replayed: false }),
            Dispatch::Queue => {}
        }
        let job = Job::new(admitted, &client.name, Caller::Stored { request_id: id.clone() }, span.clone());
        // Stored is accepted: if the cell cannot take it now, the resumer will once the claim lapses.
        if let Err(e) = self.inner.intake.hand_to_cell(job) {
            span.in_scope(|| tracing::info!(error = %e, "accepted request left for the resumer"));
        }
        Ok(Accepted { request_id: id, replayed: false })
    }

    /// The state of a stored request; another client's request is "not found".
    pub async fn request_status(&self, client: &Client, id: &str) -> Result<RequestStatus, EngineError> {
        if id.len() > 64 {
            return Err(EngineError::NotFound);
        }
        let id_owned = id.to_string();
        let row = self.read(move |c| queries::load_request(c, &id_owned)).await?.ok_or(EngineError::NotFound)?;
        if row.client != client.name {
            return Err(EngineError::NotFound);
        }
        let (certificate, error) = match row.state {
            RequestState::Issued => (Some(self.issued_certificate_of(&row).await?), None),
            RequestState::Failed | RequestState::Expired | RequestState::Retryable => {
                (None, Some(RecordedError::from(&recorded_error(&row))))
            }
            RequestState::Pending | RequestState::Parked => (None, None),
        };
        Ok(RequestStatus {
            id: row.id,
            state: row.state,
            profile: row.profile,
            ca: row.ca_id,
            created_at: row.created_at,
            created_at_rfc3339: rfc3339(row.created_at),
            updated_at: row.updated_at,
            updated_at_rfc3339: rfc3339(row.updated_at),
            expires_at: row.expires_at,
            expires_at_rfc3339: rfc3339(row.expires_at),
            certificate,
            error,
        })
    }

    async fn issued_certificate_of(&self, row: &RequestRow) -> Result<IssuedCertificate, EngineError> {
        let serial = row.serial.clone().ok_or_else(|| EngineError::Internal("issued request without serial".into()))?;
        let cert = self.read(move |c| queries::load_certificate(c, &serial)).await?.ok_or(EngineError::NotFound)?;
        let der = cert.cert_der.ok_or_else(|| EngineError::Internal("issued certificate without DER".into()))?;
        Ok(IssuedCertificate {
            chain: self.chain_of(&cert.ca_id),
            serial: cert.serial,
            ca: cert.ca_id,
            profile: cert.profile,
            certificate: crate::pki::cert_pem(&der),
            not_before: cert.not_before,
            not_before_rfc3339: rfc3339(cert.not_before),
            not_after: cert.not_after,
            not_after_rfc3339: rfc3339(cert.not_after),
            request_id: Some(row.id.clone()),
        })
    }

    fn request_row(
        &self,
        id: &str,
        client: &Client,
        admitted: &Admitted,
        mode: RequestMode,
        idempotency_key: Option<String>,
        expires_at: i64,
    ) -> RequestRow {
        let now = now_ms();
        RequestRow {
            id: id.to_string(),
            client: client.name.clone(),
            profile: admitted.profile.id.clone(),
            ca_id: admitted.profile.ca.clone(),
            mode,
            state: RequestState::Pending,
            idempotency_key,
            body_sha256: admitted.body_sha256(),
            csr_der: admitted.key.csr.der.clone(),
            serial: None,
            error_type: None,
            error_detail: None,
            created_at: now,
            updated_at: now,
            expires_at,
            claimed_by: Some(self.inner.instance.to_string()),
            claimed_until: Some(now + self.inner.config.async_requests.lease.as_millis() as i64),
        }
    }

    pub(super) fn refuse_if_stopping(&self) -> Result<(), EngineError> {
        if self.is_shutting_down() {
            Err(EngineError::ShuttingDown)
        } else {
            Ok(())
        }
    }

    /// A refusal of an authenticated client: tallied in memory, written in aggregate by the
    /// audit writer. Never a database write on this path.
    pub(super) fn refused(&self, client: &Client, action: Action, target: &str, err: &EngineError) {
        self.inner.audit.refusal(&client.name, action, target, err);
        if !self.inner.sabotage.has(Sabotage::AuditEachRefusal) {
            return;
        }
        self.inner.store.write_detached(WriteOp::Audit(NewAuditEvent {
            at: now_ms(),
            instance: self.inner.instance.to_string(),
            actor: client.name.clone(),
            action: action.as_str().to_string(),
            target: target.chars().take(64).collect(),
            outcome: err.slug().to_string(),
            detail: err.to_string().chars().take(512).collect(),
        }));
    }

    fn count(&self, outcome: Result<&'static str, &EngineError>) {
        let outcome = match outcome {
            Ok(o) => o,
            Err(e) => e.slug(),
        };
        let m = &self.inner.metrics;
        m.request_outcome(outcome).inc();
    }

    /// Time a certificate issued synchronously took inside the engine, by CA and profile.
    fn time_issued(&self, issued: &IssuedCertificate, started: Instant) {
        let labels = vec![("ca", issued.ca.clone()), ("profile", issued.profile.clone())];
        self.inner.metrics.issue_seconds.get_or_create(&labels).observe(started.elapsed().as_secs_f64());
    }
}

/// Where a synchronous answer came from: this call's own work, or an earlier attempt with the
/// same Idempotency-Key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Provenance {
    Fresh,
    Replayed,
}

fn unexpected(outcome: WriteOutcome) -> EngineError {
    EngineError::Internal(format!("the store answered an insert with {outcome:?}"))
}

fn deadline_ms(deadline: Instant) -> i64 {
    now_ms() + deadline.saturating_duration_since(Instant::now()).as_millis() as i64
}

fn recorded_error(row: &RequestRow) -> EngineError {
    if row.state == RequestState::Expired {
        return EngineError::DeadlineExceeded { retry_after: Duration::from_secs(1) };
    }
    EngineError::from_recorded(
        row.error_type.as_deref().unwrap_or("internal"),
        row.error_detail.as_deref().unwrap_or(""),
    )
}

pub(super) fn check_idempotency_key(key: Option<&str>) -> Result<(), EngineError> {
    match key {
        Some(k) if k.is_empty() || k.len() > MAX_IDEMPOTENCY_KEY || !k.bytes().all(|b| b.is_ascii_graphic()) => {
            Err(EngineError::MalformedRequest(format!(
                "Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} visible ASCII characters"
            )))
        }
        _ => Ok(()),
    }
}
