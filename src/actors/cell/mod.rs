//! A CA cell: everything one CA needs, isolated from every other CA — its own arbiter (thread),
//! bounded lanes, signer threads, circuit breaker and key watcher. A slow or failing CA fills
//! only its own queue and opens only its own breaker.
//!
//! A job's life in the cell: turned away at once if the CA is parked, disabled, its breaker is
//! open or its lane is full; waits in its lane (interactive first, background guaranteed a
//! share); dropped at dequeue if its deadline has passed; then runs the [`Pipeline`], at most
//! `in_flight` jobs at once.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use arc_swap::ArcSwap;
use tokio::sync::oneshot;
use tracing::Instrument;

use super::breaker::{Breaker, BreakerState};
use super::coalescer::Coalescer;
use super::gauges::CellGauges;
use super::job::{deadline_exceeded, Caller, Job, FINISH_MARGIN};
use super::lanes::Lanes;
use super::pipeline::Pipeline;
use super::registry::RegistryChanged;
use super::signer::{Faults, Signer, SignerHandle};
use super::store::StoreHandle;
use crate::config::{CaConfig, Sabotage, Sabotages};
use crate::error::EngineError;
use crate::metrics::{self, Metrics};
use crate::pki::key::KeyChange;
use crate::pki::Lane;
use crate::pki::{now_ms, CaMaterial};
use crate::states::{CaState, RequestMode};
use crate::types::IssuedCertificate;

mod messages;
mod status;

pub use messages::{Crash, Drain, Enqueue, GetStatus, ResetBreaker, Stall};
pub use status::{CellState, CellStatus};

/// Same client, same profile, same public key: the same certificate would be issued.
fn coalescing_key(job: &Job) -> [u8; 32] {
    let mut h = openssl::sha::Sha256::new();
    for part in [job.client.as_bytes(), job.profile.id.as_bytes(), &job.csr.spki_der] {
        h.update(&(part.len() as u64).to_be_bytes());
        h.update(part);
    }
    h.finish()
}

/// Background work coalesces; an identity's job carries its own key, so it never is the same
/// work as another's.
fn coalesces(job: &Job) -> bool {
    job.profile.lane == Lane::Background && job.identity.is_none()
}

/// Whether the cell takes new work. Draining is for good: a cell drains at shutdown.
enum DrainState {
    Taking,
    Draining(Vec<oneshot::Sender<()>>),
}

impl DrainState {
    fn is_draining(&self) -> bool {
        matches!(self, DrainState::Draining(_))
    }
}

/// How a pipeline run ended, for the breaker.
enum Outcome {
    Signed,
    SignerFailed,
    NoSignature,
}

/// A CA's cell as the rest of the engine sees it: an address that a restart swaps.
pub struct CellSlot {
    pub addr: ArcSwap<Addr<CaCell>>,
    pub gauges: Arc<CellGauges>,
}

pub struct CaCell {
    pipeline: Pipeline,
    gauges: Arc<CellGauges>,
    lanes: Lanes<Job>,
    in_flight: usize,
    max_in_flight: usize,
    breaker: Breaker,
    last_completion: Option<Instant>,
    /// Taking work, or draining with whoever waits for the drain to finish.
    drain: DrainState,
    /// This CA's state in the registry's latest snapshot.
    ca_state: CaState,
    watching_key: bool,
    recent_transitions: VecDeque<(i64, String)>,
    /// Background jobs queued or in flight, by coalescing key, with the callers attached to them.
    coalesced: Coalescer<[u8; 32], Caller>,
}
const MAILBOX_CAPACITY: usize = 1024;
const KEY_CHECK_INTERVAL: Duration = Duration::from_millis(500);

pub struct CellParts {
    pub ca: Arc<CaMaterial>,
    pub store: StoreHandle,
    pub metrics: Arc<Metrics>,
    pub instance: Arc<str>,
    pub faults: Faults,
    pub initial_state: CaState,
    /// Shared with intake; kept across restarts of the cell.
    pub gauges: Arc<CellGauges>,
    pub sabotage: Sabotages,
}

impl CaCell {
    /// Start the cell on its own arbiter with its signer threads.
    pub fn start(cfg: &CaConfig, parts: CellParts) -> (Addr<CaCell>, Arbiter) {
        let CellParts { ca, store, metrics, instance, faults, initial_state, gauges, sabotage } = parts;
        let signer = Signer { ca: ca.clone(), metrics: metrics.clone(), faults, gauges: gauges.clone() };
        let signer = SignerHandle::start(signer, cfg.signer_threads, cfg.queue.in_flight);
        let spacing = Duration::from_secs_f64(1.0 / cfg.expected_sign_rate.max(1.0));
        gauges.completion_spacing_us.store(spacing.as_micros() as u64, Ordering::Relaxed);
        let pipeline = Pipeline { ca, signer, store, metrics, instance, sabotage, sign_timeout: cfg.sign_timeout };
        let (queue, breaker_cfg, cell_gauges) = (cfg.queue.clone(), cfg.breaker.clone(), gauges);
        let arbiter = Arbiter::new();
        // The mailbox is sized before the cell exists: sized in `started`, which runs later on
        // the cell's own thread, a burst right after a (re)start met actix's default of 16.
        let (sender, receiver) = actix::dev::channel::channel(MAILBOX_CAPACITY);
        let addr = Addr::new(sender);
        let cell = CaCell {
            pipeline,
            gauges: cell_gauges,
            lanes: Lanes::new(queue.interactive_capacity, queue.background_capacity),
            in_flight: 0,
            max_in_flight: queue.in_flight.max(1),
            breaker: Breaker::new(breaker_cfg),
            last_completion: None,
            drain: DrainState::Taking,
            ca_state: initial_state,
            watching_key: false,
            recent_transitions: VecDeque::new(),
            coalesced: Coalescer::default(),
        };
        arbiter.spawn(async move {
            Context::with_receiver(receiver).run(cell);
        });
        (addr, arbiter)
    }

    fn ca_id(&self) -> &str {
        &self.pipeline.ca.id
    }

    /// The requests attached to `job` (background work), now that it has ended.
    fn take_followers(&mut self, job: &Job) -> Vec<Caller> {
        if coalesces(job) {
            self.coalesced.release(&coalescing_key(job))
        } else {
            Vec::new()
        }
    }

    /// Every queued job, each answered as `answer` decides (the breaker opened, the CA stopped
    /// taking work).
    fn answer_queued(&mut self, mut answer: impl FnMut(&mut Self, Job)) {
        for job in self.lanes.take_all() {
            answer(self, job);
        }
    }

    fn dispatch(&mut self, ctx: &mut Context<Self>) {
        while self.in_flight < self.max_in_flight && !self.lanes.is_empty() {
            let now = Instant::now();
            let (admitted, change) = self.breaker.admit(now);
            self.note_breaker(change);
            if !admitted {
                break;
            }
            let Some(job) = self.lanes.take_next() else {
                self.breaker.release_probe();
                break;
            };
            self.pipeline
                .metrics
                .queue_wait_seconds
                .get_or_create(&metrics::ca_lane(self.ca_id(), job.profile.lane))
                .observe(now.duration_since(job.enqueued_at).as_secs_f64());
            if now + FINISH_MARGIN >= job.deadline && !self.pipeline.sabotage.has(Sabotage::IgnoreDeadlines) {
                // Its caller is (about to be) answered 503: never sign it.
                self.breaker.release_probe();
                self.pipeline.metrics.expired_in_queue.get_or_create(&metrics::ca(self.ca_id())).inc();
                self.settle(job, Err(deadline_exceeded()), None);
                continue;
            }
            self.in_flight += 1;
            let pipeline = self.pipeline.clone();
            let span = job.span.clone();
            let fut = async move {
                let result = pipeline.run(&job).await;
                (job, result)
            }
            .instrument(span);
            ctx.spawn(fut.into_actor(self).map(|(job, result), act, ctx| {
                act.in_flight -= 1;
                act.completed(match &result {
                    Ok(_) => Outcome::Signed,
                    Err(EngineError::SignerFailure { .. }) => Outcome::SignerFailed,
                    Err(_) => Outcome::NoSignature,
                });
                act.settle(job, result, None);
                act.dispatch(ctx);
            }));
        }
        self.export_gauges();
        if let DrainState::Draining(waiters) = &mut self.drain {
            if self.in_flight == 0 && self.lanes.is_empty() {
                for waiter in waiters.drain(..) {
                    let _ = waiter.send(());
                }
            }
        }
    }

    fn completed(&mut self, outcome: Outcome) {
        let now = Instant::now();
        let change = match outcome {
            Outcome::Signed => self.breaker.record(now, true),
            Outcome::SignerFailed => self.breaker.record(now, false),
            Outcome::NoSignature => {
                self.breaker.release_probe();
                None
            }
        };
        self.note_breaker(change);
        // Smoothed spacing between completions while busy: what intake uses to predict waits.
        if let Some(last) = self.last_completion {
            let sample = now.duration_since(last).as_micros() as u64;
            let old = self.gauges.completion_spacing_us.load(Ordering::Relaxed);
            self.gauges.completion_spacing_us.store((old * 4 + sample) / 5, Ordering::Relaxed);
        }
        let busy = self.in_flight > 0 || !self.lanes.is_empty();
        self.last_completion = busy.then_some(now);
    }

    fn note_breaker(&mut self, change: Option<BreakerState>) {
        let Some(state) = change else { return };
        let ca = self.ca_id().to_string();
        self.recent_transitions.push_back((now_ms(), state.name().to_string()));
        if self.recent_transitions.len() > 10 {
            self.recent_transitions.pop_front();
        }
        let m = &self.pipeline.metrics;
        m.breaker_state.get_or_create(&metrics::ca(&ca)).set(state.gauge());
        m.breaker_transitions.get_or_create(&vec![("ca", ca.clone()), ("to", state.name().to_string())]).inc();
        match state {
            BreakerState::Open { .. } => {
                let retry_after = self.breaker.retry_after(Instant::now());
                tracing::warn!(ca = %ca, retry_after_ms = retry_after.as_millis() as u64, "circuit breaker open: this CA's signer is failing");
                self.gauges.breaker_open_until_ms.store(now_ms() + retry_after.as_millis() as i64, Ordering::Relaxed);
                // Nobody waits on a breaker: queued callers are answered now.
                self.answer_queued(Self::refuse_breaker_open);
            }
            BreakerState::HalfOpen => {
                tracing::info!(ca = %ca, "circuit breaker half-open: probing the signer");
                self.gauges.breaker_open_until_ms.store(0, Ordering::Relaxed);
            }
            BreakerState::Closed => {
                tracing::info!(ca = %ca, "circuit breaker closed: the signer is healthy again");
                self.gauges.breaker_open_until_ms.store(0, Ordering::Relaxed);
            }
        }
    }

    fn refuse_breaker_open(&mut self, job: Job) {
        let retry_after = self.breaker.retry_after(Instant::now());
        let err = EngineError::CaUnavailable {
            ca: self.ca_id().to_string(),
            reason: "circuit breaker open: the CA's signer is failing".into(),
            retry_after,
        };
        self.settle(job, Err(err), Some(now_ms() + retry_after.as_millis() as i64));
    }

    /// The one way a job ends: its stored request is updated, its caller answered, and so is
    /// every request that attached to it.
    fn settle(&mut self, job: Job, result: Result<IssuedCertificate, EngineError>, retry_at: Option<i64>) {
        let followers = self.take_followers(&job);
        if let Err(err) = &result {
            self.pipeline.request_failed(&job.caller, err, retry_at);
        }
        for follower in followers {
            let answer = match &result {
                Ok(issued) => {
                    if let Some(id) = follower.request_id() {
                        self.pipeline.request_issued(id, &issued.serial);
                    }
                    Ok(IssuedCertificate { request_id: follower.request_id().map(String::from), ..issued.clone() })
                }
                Err(err) => {
                    self.pipeline.request_failed(&follower, err, retry_at);
                    Err(err.clone())
                }
            };
            follower.answer(answer);
        }
        if result.is_ok() {
            self.gauges.record_issued(job.enqueued_at.elapsed());
        }
        job.caller.answer(result);
    }

    fn export_gauges(&self) {
        let m = &self.pipeline.metrics;
        let (i, b) = self.lanes.depths();
        m.queue_depth.get_or_create(&metrics::ca_lane(self.ca_id(), Lane::Interactive)).set(i as i64);
        m.queue_depth.get_or_create(&metrics::ca_lane(self.ca_id(), Lane::Background)).set(b as i64);
        m.in_flight.get_or_create(&metrics::ca(self.ca_id())).set(self.in_flight as i64);
        self.gauges.interactive_depth.store(i, Ordering::Relaxed);
        self.gauges.background_depth.store(b, Ordering::Relaxed);
    }

    /// What a job the CA cannot take now becomes: parked work is held durably (async) or refused
    /// at once (sync); a disabled or retired CA's work fails for good.
    fn turn_away(&mut self, job: Job) {
        let ca = self.ca_id().to_string();
        if self.ca_state != CaState::Parked {
            self.settle(job, Err(EngineError::CaDisabled(ca)), None);
            return;
        }
        let parked = || EngineError::CaUnavailable {
            ca: ca.clone(),
            reason: "the CA was parked".into(),
            retry_after: Duration::from_secs(30),
        };
        let followers = self.take_followers(&job);
        for caller in std::iter::once(job.caller).chain(followers) {
            match caller {
                Caller::Stored { request_id } => self.pipeline.park_request(&request_id),
                waiting @ (Caller::Waiting(_) | Caller::WaitingRecorded { .. }) => waiting.answer(Err(parked())),
            }
        }
    }

    fn takes_work(&self) -> bool {
        match self.ca_state {
            CaState::Parked => self.pipeline.sabotage.has(Sabotage::IgnorePark),
            state => state.takes_work(),
        }
    }

    /// Look at the key file off the event loop; log what changed.
    fn check_key(&mut self, ctx: &mut Context<Self>) {
        if self.watching_key {
            return;
        }
        self.watching_key = true;
        let ca = self.pipeline.ca.clone();
        let work = actix_web::rt::task::spawn_blocking(move || ca.key.refresh());
        ctx.spawn(work.into_actor(self).map(|change, act, ctx| {
            act.watching_key = false;
            match change {
                Ok(Some(KeyChange::Lost(reason))) => {
                    tracing::error!(ca = %act.ca_id(), reason = %reason, "CA key unavailable")
                }
                Ok(Some(KeyChange::Restored)) => {
                    tracing::info!(ca = %act.ca_id(), "CA key available again");
                    act.dispatch(ctx);
                }
                Ok(None) => {}
                Err(e) => tracing::error!(ca = %act.ca_id(), error = %e, "checking the CA key failed"),
            }
        }));
    }
}

impl Actor for CaCell {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.pipeline.metrics.breaker_state.get_or_create(&metrics::ca(self.ca_id())).set(0);
        if !self.pipeline.ca.key.is_available() {
            // Started without its key: failed, not fatal. Probes will find the key when it returns.
            let change = self.breaker.open_now(Instant::now());
            self.note_breaker(change);
        }
        if self.ca_state == CaState::Retired {
            self.pipeline.ca.key.destroy();
        }
        ctx.run_interval(KEY_CHECK_INTERVAL, |act, ctx| act.check_key(ctx));
        self.export_gauges();
    }
}

impl Handler<Enqueue> for CaCell {
    type Result = ();

    fn handle(&mut self, Enqueue(mut job): Enqueue, ctx: &mut Self::Context) {
        if coalesces(&job) {
            // A renewal storm of retries cannot multiply the work: attach to the one queued.
            let key = coalescing_key(&job);
            match self.coalesced.attach(&key, job.caller) {
                Ok(()) => {
                    self.pipeline.metrics.coalesced.get_or_create(&metrics::ca(self.ca_id())).inc();
                    return;
                }
                Err(caller) => job.caller = caller,
            }
        }
        if self.drain.is_draining() {
            job.caller.answer(Err(EngineError::ShuttingDown));
            return;
        }
        if !self.takes_work() {
            // Intake read an older snapshot than ours.
            self.turn_away(job);
            return;
        }
        if matches!(self.breaker.state(), BreakerState::Open { until } if Instant::now() < until) {
            self.refuse_breaker_open(job);
            return;
        }
        let lane = job.profile.lane;
        let key = coalesces(&job).then(|| coalescing_key(&job));
        if let Err(job) = self.lanes.push(lane, job) {
            let err = EngineError::CaOverloaded {
                ca: self.pipeline.ca.id.clone(),
                reason: format!("{} queue is full", lane.as_str()),
                retry_after: Duration::from_secs(1),
            };
            self.settle(job, Err(err), None);
            return;
        }
        if let Some(key) = key {
            self.coalesced.lead(key);
        }
        self.dispatch(ctx);
    }
}

impl Handler<RegistryChanged> for CaCell {
    type Result = ();

    fn handle(&mut self, RegistryChanged(snapshot): RegistryChanged, ctx: &mut Self::Context) {
        // A CA the registry no longer knows takes no work.
        let state = snapshot.ca_state(self.ca_id()).unwrap_or(CaState::Disabled);
        if state == self.ca_state {
            return;
        }
        tracing::info!(ca = %self.ca_id(), from = %self.ca_state, to = %state, "CA state changed");
        self.ca_state = state;
        if self.ca_state == CaState::Retired {
            self.pipeline.ca.key.destroy();
        }
        if !self.takes_work() {
            self.answer_queued(Self::turn_away);
        }
        self.dispatch(ctx);
    }
}

impl Handler<Drain> for CaCell {
    type Result = ();

    fn handle(&mut self, Drain(done): Drain, ctx: &mut Self::Context) {
        // Queued asynchronous work is durable: leave it to the next instance (its claim is
        // released at shutdown) instead of holding the shutdown for it.
        self.lanes.retain(|j| j.caller.mode() == RequestMode::Sync);
        match &mut self.drain {
            DrainState::Draining(waiters) => waiters.push(done),
            DrainState::Taking => self.drain = DrainState::Draining(vec![done]),
        }
        self.dispatch(ctx);
    }
}

impl Handler<Crash> for CaCell {
    type Result = ();

    #[allow(clippy::panic)]
    fn handle(&mut self, _: Crash, _: &mut Self::Context) {
        panic!("injected fault: CA cell {} crashed", self.ca_id());
    }
}

impl Handler<Stall> for CaCell {
    type Result = ();

    fn handle(&mut self, Stall(how_long): Stall, _: &mut Self::Context) {
        tracing::warn!(ca = %self.ca_id(), ms = how_long.as_millis() as u64, "injected fault: CA cell stalled");
        std::thread::sleep(how_long);
    }
}

impl Handler<ResetBreaker> for CaCell {
    type Result = ();

    fn handle(&mut self, _: ResetBreaker, ctx: &mut Self::Context) {
        let change = self.breaker.reset();
        self.note_breaker(change);
        self.dispatch(ctx);
    }
}

impl Handler<GetStatus> for CaCell {
    type Result = CellStatus;

    fn handle(&mut self, _: GetStatus, _: &mut Self::Context) -> CellStatus {
        let now = Instant::now();
        let oldest =
            |lane| self.lanes.oldest(lane).map(|j| now.duration_since(j.enqueued_at).as_millis() as u64).unwrap_or(0);
        let signatures = self.gauges.signatures.load(Ordering::Relaxed);
        CellStatus {
            ca: self.ca_id().to_string(),
            state: CellState::Running(self.ca_state),
            breaker: self.breaker.state().name().to_string(),
            key_available: self.pipeline.ca.key.is_available(),
            key_unavailable: self.pipeline.ca.key.unavailable_reason(),
            interactive_queued: self.lanes.depths().0,
            background_queued: self.lanes.depths().1,
            interactive_oldest_ms: oldest(Lane::Interactive),
            background_oldest_ms: oldest(Lane::Background),
            in_flight: self.in_flight,
            draining: self.drain.is_draining(),
            breaker_transitions: self.recent_transitions.iter().cloned().collect(),
            signatures,
            mean_sign_us: self.gauges.sign_time_us.load(Ordering::Relaxed) / signatures.max(1),
            parked: None,
            restarts: 0,
            history: Vec::new(),
        }
    }
}
