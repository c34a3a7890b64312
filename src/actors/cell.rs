//! A CA cell: everything one CA needs, isolated from every other CA. Its own arbiter (thread),
//! its own bounded lanes, its own signer threads. A slow or failing CA fills only its own queue.
//!
//! A job's life in the cell: refused at once if its lane is full; waits in its lane; is dropped
//! at dequeue if its deadline has passed; then runs the write-ahead pipeline —
//! prepare (signer) → record TBS (store) → sign (signer, deadline re-checked) → record
//! certificate (store) → reply. Up to `in_flight` jobs run the pipeline at once.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use tokio::sync::oneshot;
use tracing::Instrument;

use super::registry::{ca_state, RegistryChanged};
use super::signer::{Prepare, Sign, Signer};
use super::store::StoreHandle;
use crate::config::{CaConfig, Lane};
use crate::db::models::{cert_state, request_state, CertificateRow, NewAuditEvent};
use crate::db::queries::WriteOp;
use crate::engine::types::IssuedCertificate;
use crate::error::EngineError;
use crate::metrics::{self, Metrics};
use crate::pki::profile::ApprovedNames;
use crate::pki::{cert_pem, now_ms, CaMaterial, CheckedCsr, Profile};

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
}

impl Job {
    fn answer(&mut self, result: Result<IssuedCertificate, EngineError>) {
        if let Some(reply) = self.reply.take() {
            let _ = reply.send(result);
        }
    }
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct Enqueue(pub Job);

/// Stop taking work and answer once everything queued and in flight is done.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Drain(pub oneshot::Sender<()>);

#[derive(Message)]
#[rtype(result = "CellStatus")]
pub struct GetStatus;

#[derive(Debug, Clone, serde::Serialize, MessageResponse)]
pub struct CellStatus {
    pub ca: String,
    pub interactive_queued: usize,
    pub background_queued: usize,
    pub in_flight: usize,
    pub draining: bool,
}

/// Fault injection for drills and tests (dev mode only): slows this CA's signer for real.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    pub sign_latency: Option<Duration>,
}

/// What the pipeline needs, cloned once per job.
#[derive(Clone)]
struct Pipeline {
    ca: Arc<CaMaterial>,
    signer: Addr<Signer>,
    store: StoreHandle,
    metrics: Arc<Metrics>,
    instance: Arc<str>,
}

pub struct CaCell {
    pipeline: Pipeline,
    interactive: VecDeque<Job>,
    background: VecDeque<Job>,
    interactive_capacity: usize,
    background_capacity: usize,
    in_flight: usize,
    max_in_flight: usize,
    /// Interactive jobs dispatched in a row while background work waited.
    interactive_streak: u32,
    drain_waiters: Vec<oneshot::Sender<()>>,
    draining: bool,
    /// This CA's state in the registry's latest snapshot.
    ca_state: String,
}

/// Background work gets at least one dispatch in this many when both lanes wait.
const BACKGROUND_SHARE: u32 = 5;
const MAILBOX_CAPACITY: usize = 1024;

impl CaCell {
    /// Start the cell on its own arbiter with its signer threads.
    pub fn start(
        cfg: &CaConfig,
        ca: Arc<CaMaterial>,
        store: StoreHandle,
        metrics: Arc<Metrics>,
        instance: Arc<str>,
        faults: Faults,
        initial_state: String,
    ) -> (Addr<CaCell>, Arbiter) {
        let signer_ca = ca.clone();
        let signer_metrics = metrics.clone();
        let signer = SyncArbiter::start(cfg.signer_threads.max(1), move || Signer {
            ca: signer_ca.clone(),
            metrics: signer_metrics.clone(),
            sign_latency: faults.sign_latency,
        });
        let pipeline = Pipeline { ca, signer, store, metrics, instance };
        let queue = cfg.queue.clone();
        let arbiter = Arbiter::new();
        let addr = CaCell::start_in_arbiter(&arbiter.handle(), move |_| CaCell {
            pipeline,
            interactive: VecDeque::new(),
            background: VecDeque::new(),
            interactive_capacity: queue.interactive_capacity,
            background_capacity: queue.background_capacity,
            in_flight: 0,
            max_in_flight: queue.in_flight.max(1),
            interactive_streak: 0,
            drain_waiters: Vec::new(),
            draining: false,
            ca_state: initial_state,
        });
        (addr, arbiter)
    }

    fn ca_id(&self) -> &str {
        &self.pipeline.ca.id
    }

    fn next_job(&mut self) -> Option<Job> {
        let take_background = !self.background.is_empty()
            && (self.interactive.is_empty() || self.interactive_streak + 1 >= BACKGROUND_SHARE);
        if take_background {
            self.interactive_streak = 0;
            self.background.pop_front()
        } else {
            let job = self.interactive.pop_front();
            if job.is_some() && !self.background.is_empty() {
                self.interactive_streak += 1;
            }
            job
        }
    }

    fn dispatch(&mut self, ctx: &mut Context<Self>) {
        while self.in_flight < self.max_in_flight {
            let Some(mut job) = self.next_job() else {
                break;
            };
            let now = Instant::now();
            let lane = job.profile.lane;
            self.pipeline
                .metrics
                .queue_wait_seconds
                .get_or_create(&metrics::ca_lane(self.ca_id(), lane))
                .observe(now.duration_since(job.enqueued_at).as_secs_f64());
            if now >= job.deadline {
                // Its caller has already been answered 503: never sign it.
                self.pipeline.metrics.expired_in_queue.get_or_create(&metrics::ca(self.ca_id())).inc();
                let err = EngineError::DeadlineExceeded { retry_after: Duration::from_secs(1) };
                finish_request(&self.pipeline, &job, Err(&err));
                job.answer(Err(err));
                continue;
            }
            self.in_flight += 1;
            let pipeline = self.pipeline.clone();
            let span = job.span.clone();
            let fut = async move {
                let result = run(&pipeline, &job).await;
                finish_request(&pipeline, &job, result.as_ref().map(|_| ()));
                job.answer(result);
            }
            .instrument(span);
            ctx.spawn(fut.into_actor(self).map(|_, act, ctx| {
                act.in_flight -= 1;
                act.dispatch(ctx);
            }));
        }
        self.export_gauges();
        if self.draining && self.in_flight == 0 && self.interactive.is_empty() && self.background.is_empty() {
            for waiter in self.drain_waiters.drain(..) {
                let _ = waiter.send(());
            }
        }
    }

    fn export_gauges(&self) {
        let m = &self.pipeline.metrics;
        m.queue_depth
            .get_or_create(&metrics::ca_lane(self.ca_id(), Lane::Interactive))
            .set(self.interactive.len() as i64);
        m.queue_depth
            .get_or_create(&metrics::ca_lane(self.ca_id(), Lane::Background))
            .set(self.background.len() as i64);
        m.in_flight.get_or_create(&metrics::ca(self.ca_id())).set(self.in_flight as i64);
    }
}

impl Actor for CaCell {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(MAILBOX_CAPACITY);
        self.export_gauges();
    }
}

impl Handler<Enqueue> for CaCell {
    type Result = ();

    fn handle(&mut self, Enqueue(mut job): Enqueue, ctx: &mut Self::Context) {
        if self.draining {
            job.answer(Err(EngineError::ShuttingDown));
            return;
        }
        if !self.takes_work() {
            // Intake read an older snapshot than ours.
            self.turn_away(job);
            return;
        }
        let lane = job.profile.lane;
        let (queue, capacity) = match lane {
            Lane::Interactive => (&mut self.interactive, self.interactive_capacity),
            Lane::Background => (&mut self.background, self.background_capacity),
        };
        if queue.len() >= capacity {
            let err = EngineError::CaOverloaded {
                ca: self.pipeline.ca.id.clone(),
                reason: format!("{} queue is full", lane.as_str()),
                retry_after: Duration::from_secs(1),
            };
            finish_request(&self.pipeline, &job, Err(&err));
            job.answer(Err(err));
            return;
        }
        queue.push_back(job);
        self.dispatch(ctx);
    }
}

impl CaCell {
    /// What a job the CA cannot take now becomes: parked work is held durably (async) or refused
    /// at once (sync); a disabled or retired CA's work fails for good.
    fn turn_away(&self, mut job: Job) {
        let ca = self.pipeline.ca.id.clone();
        if self.ca_state == ca_state::PARKED {
            if job.is_async {
                park_request(&self.pipeline, &job);
            } else {
                job.answer(Err(EngineError::CaUnavailable {
                    ca,
                    reason: "the CA was parked".into(),
                    retry_after: Duration::from_secs(30),
                }));
            }
            return;
        }
        let err = EngineError::CaDisabled(ca);
        finish_request(&self.pipeline, &job, Err(&err));
        job.answer(Err(err));
    }

    fn takes_work(&self) -> bool {
        matches!(self.ca_state.as_str(), ca_state::ENABLED | ca_state::DRAINING)
    }
}

impl Handler<RegistryChanged> for CaCell {
    type Result = ();

    fn handle(&mut self, RegistryChanged(snapshot): RegistryChanged, ctx: &mut Self::Context) {
        let state = snapshot.ca_state(&self.pipeline.ca.id).to_string();
        if state == self.ca_state {
            return;
        }
        tracing::info!(ca = %self.pipeline.ca.id, from = %self.ca_state, to = %state, "CA state changed");
        self.ca_state = state;
        if !self.takes_work() {
            let queued: Vec<Job> = self.interactive.drain(..).chain(self.background.drain(..)).collect();
            for job in queued {
                self.turn_away(job);
            }
        }
        self.dispatch(ctx);
    }
}

impl Handler<Drain> for CaCell {
    type Result = ();

    fn handle(&mut self, Drain(done): Drain, ctx: &mut Self::Context) {
        self.draining = true;
        // Queued asynchronous work is durable: leave it to the next instance (its claim is
        // released at shutdown) instead of holding the shutdown for it.
        self.interactive.retain(|j| !j.is_async);
        self.background.retain(|j| !j.is_async);
        self.drain_waiters.push(done);
        self.dispatch(ctx);
    }
}

impl Handler<GetStatus> for CaCell {
    type Result = CellStatus;

    fn handle(&mut self, _: GetStatus, _: &mut Self::Context) -> CellStatus {
        CellStatus {
            ca: self.pipeline.ca.id.clone(),
            interactive_queued: self.interactive.len(),
            background_queued: self.background.len(),
            in_flight: self.in_flight,
            draining: self.draining,
        }
    }
}

fn mailbox_gone(_: MailboxError) -> EngineError {
    EngineError::ShuttingDown
}

/// The write-ahead pipeline for one job.
async fn run(p: &Pipeline, job: &Job) -> Result<IssuedCertificate, EngineError> {
    let prepared = p
        .signer
        .send(Prepare { profile: job.profile.clone(), csr: job.csr.clone(), names: job.names.clone() })
        .await
        .map_err(mailbox_gone)??;
    let serial = prepared.serial_hex.clone();
    tracing::debug!(serial = %serial, "recording the certificate before signing");
    p.store
        .write(WriteOp::WriteAhead(Box::new(CertificateRow {
            serial: serial.clone(),
            ca_id: p.ca.id.clone(),
            profile: job.profile.id.clone(),
            client: job.client.clone(),
            request_id: job.request_id.clone(),
            state: cert_state::SIGNING.into(),
            tbs_der: prepared.tbs_der.clone(),
            cert_der: None,
            not_before: prepared.not_before_ms,
            not_after: prepared.not_after_ms,
            created_at: now_ms(),
            issued_at: None,
            revoked_at: None,
            revocation_reason: None,
        })))
        .await?;

    let signed =
        p.signer.send(Sign { tbs_der: prepared.tbs_der, deadline: job.deadline }).await.map_err(mailbox_gone)?;
    let cert_der = match signed {
        Ok(der) => der,
        Err(e) => {
            p.store.write_detached(WriteOp::CertificateAbandoned { serial });
            return Err(e);
        }
    };
    let issued_at = now_ms();
    p.store
        .write(WriteOp::CertificateIssued {
            serial: serial.clone(),
            cert_der: cert_der.clone(),
            at: issued_at,
            request_id: job.request_id.clone(),
            audit: Box::new(NewAuditEvent {
                at: issued_at,
                instance: p.instance.to_string(),
                actor: job.client.clone(),
                action: "certificate.issue".into(),
                target: serial.clone(),
                outcome: "issued".into(),
                detail: format!("ca={} profile={}", p.ca.id, job.profile.id),
            }),
        })
        .await?;
    Ok(IssuedCertificate {
        serial,
        ca: p.ca.id.clone(),
        profile: job.profile.id.clone(),
        certificate: cert_pem(&cert_der),
        chain: p.ca.chain_pem.clone(),
        not_before: prepared.not_before_ms,
        not_after: prepared.not_after_ms,
        request_id: job.request_id.clone(),
    })
}

/// Hold an asynchronous request durably until an operator resubmits it.
fn park_request(p: &Pipeline, job: &Job) {
    let Some(id) = &job.request_id else { return };
    p.store.write_detached(WriteOp::RequestFinished {
        id: id.clone(),
        state: request_state::PARKED,
        error_type: None,
        error_detail: None,
        at: now_ms(),
        claimed_until: None,
    });
}

/// Record a stored request's outcome (issued requests were recorded with their certificate).
fn finish_request(p: &Pipeline, job: &Job, result: Result<(), &EngineError>) {
    let (Some(id), Err(err)) = (&job.request_id, result) else {
        return;
    };
    let now = now_ms();
    let (state, claimed_until) = if err.is_permanent() {
        (request_state::FAILED, None)
    } else if job.is_async {
        // Back to pending: any instance may take it up again after a short pause.
        (request_state::PENDING, Some(now + 1_000))
    } else {
        (request_state::RETRYABLE, None)
    };
    p.store.write_detached(WriteOp::RequestFinished {
        id: id.clone(),
        state,
        error_type: Some(err.slug().to_string()),
        error_detail: Some(err.to_string()),
        at: now,
        claimed_until,
    });
}
