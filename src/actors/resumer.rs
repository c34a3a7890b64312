//! The Resumer: nothing accepted is lost. Every `resume_interval` it marks expired asynchronous
//! requests as such (they are never signed), then takes up pending ones whose owner's claim has
//! lapsed — after a crash, a restart, or a transient failure — and feeds them to their cells.

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;

use super::intake::{CsrDer, Intake, Route};
use super::job::{Caller, Job};
use super::pipeline::request_failure;
use super::store::StoreHandle;
use crate::config::Config;
use crate::db::models::RequestRow;
use crate::db::queries;
use crate::db::DbPool;
use crate::error::{DbError, EngineError};
use crate::metrics::Metrics;
use crate::pki::now_ms;
use crate::states::RequestMode;

/// Requests taken up per round, so one instance never grabs a whole backlog at once.
const BATCH: i64 = 64;

/// Feed a CA's parked requests back to it, `per_second` at most, until none are left.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Resubmit {
    pub ca: String,
    pub per_second: u32,
}

/// Resubmission works in ticks of this length.
const RESUBMIT_TICK: Duration = Duration::from_millis(100);

pub struct Resumer {
    intake: Intake,
    control: DbPool,
    store: StoreHandle,
    instance: Arc<str>,
    lease: Duration,
    interval: Duration,
    metrics: Arc<Metrics>,
    /// No job lives longer than this (the longest lane deadline): older write-ahead records
    /// still `signing` were orphaned by a crash.
    longest_deadline: Duration,
    busy: bool,
    /// CAs being resubmitted, with their rate per second.
    resubmitting: std::collections::HashMap<String, u32>,
    resubmit_busy: bool,
}

impl Resumer {
    pub fn new(
        config: &Config,
        intake: Intake,
        control: DbPool,
        store: StoreHandle,
        instance: Arc<str>,
        metrics: Arc<Metrics>,
    ) -> Resumer {
        Resumer {
            intake,
            control,
            store,
            instance,
            lease: config.async_requests.lease,
            interval: config.async_requests.resume_interval,
            metrics,
            longest_deadline: config.lanes.interactive.max_deadline.max(config.lanes.background.max_deadline),
            busy: false,
            resubmitting: std::collections::HashMap::new(),
            resubmit_busy: false,
        }
    }

    fn round(&mut self, ctx: &mut Context<Self>) {
        if self.busy {
            return;
        }
        self.busy = true;
        let pool = self.control.clone();
        let instance = self.instance.clone();
        let lease_ms = self.lease.as_millis() as i64;
        // Only CAs that can sign now: taking up a broken CA's requests would only fail them
        // again, and load the database every other CA shares.
        let serving = self.intake.serving_cas();
        let orphaned_before = self.longest_deadline.as_millis() as i64 + 5_000;
        let work = actix_web::rt::task::spawn_blocking(move || -> Result<Vec<RequestRow>, DbError> {
            let _span = tracing::info_span!("resumer").entered();
            let mut conn = pool.get()?;
            let now = now_ms();
            let expired = queries::expire_requests(&mut conn, now)?;
            if expired > 0 {
                tracing::info!(expired, "asynchronous requests expired before they could be issued");
            }
            let abandoned = queries::abandon_stale_signing(&mut conn, now - orphaned_before)?;
            if abandoned > 0 {
                tracing::warn!(abandoned, "write-ahead records orphaned by a crash marked abandoned (never signed)");
            }
            let candidates: Vec<RequestRow> = queries::claimable_requests(&mut conn, now, BATCH)?
                .into_iter()
                .filter(|row| serving.contains(&row.ca_id))
                .collect();
            queries::claim_requests(&mut conn, candidates, &instance, now, now + lease_ms)
        });
        ctx.spawn(work.into_actor(self).map(|result, act, _| {
            act.busy = false;
            match result {
                Ok(Ok(rows)) => rows.into_iter().for_each(|row| act.resume(row)),
                Ok(Err(e)) => tracing::warn!(error = %e, "could not look for pending requests"),
                Err(e) => tracing::error!(error = %e, "resumer task failed"),
            }
        }));
    }

    fn resubmit_tick(&mut self, ctx: &mut Context<Self>) {
        if self.resubmit_busy || self.resubmitting.is_empty() {
            return;
        }
        self.resubmit_busy = true;
        let work: Vec<(String, i64)> =
            self.resubmitting.iter().map(|(ca, rate)| (ca.clone(), i64::from(rate.div_ceil(10).max(1)))).collect();
        let pool = self.control.clone();
        let instance = self.instance.clone();
        let lease_ms = self.lease.as_millis() as i64;
        let task =
            actix_web::rt::task::spawn_blocking(move || -> Result<Vec<(String, bool, Vec<RequestRow>)>, DbError> {
                let mut conn = pool.get()?;
                let now = now_ms();
                let mut out = Vec::new();
                for (ca, n) in work {
                    let rows = queries::claim_parked(&mut conn, &ca, n, &instance, now, now + lease_ms)?;
                    let finished = (rows.len() as i64) < n;
                    out.push((ca, finished, rows));
                }
                Ok(out)
            });
        ctx.spawn(task.into_actor(self).map(|result, act, _| {
            act.resubmit_busy = false;
            match result {
                Ok(Ok(batches)) => {
                    for (ca, finished, rows) in batches {
                        for row in rows {
                            act.resume(row);
                        }
                        if finished {
                            tracing::info!(ca = %ca, "resubmission of parked requests finished");
                            act.resubmitting.remove(&ca);
                        }
                    }
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "resubmission round failed; retrying"),
                Err(e) => tracing::error!(error = %e, "resubmission task failed"),
            }
        }));
    }

    fn resume(&self, row: RequestRow) {
        let span = tracing::info_span!("resume", request_id = %row.id, client = %row.client, profile = %row.profile);
        let _entered = span.enter();
        let admitted = (|| {
            let client = self.intake.client(&row.client).ok_or(EngineError::Unauthorized)?;
            let route = Route::Resume { expires_at_ms: row.expires_at };
            self.intake.admit(&client, &row.profile, CsrDer(row.csr_der.clone()), route)
        })();
        let result = admitted.and_then(|a| {
            self.metrics.async_resumed.inc();
            let caller = Caller::Stored { request_id: row.id.clone() };
            self.intake.hand_to_cell(Job::new(a, &row.client, caller, span.clone()))
        });
        if let Err(err) = result {
            tracing::info!(error = %err, "pending request could not be resumed now");
            self.store.write_detached(request_failure(&row.id, RequestMode::Async, &err, None));
        }
    }
}

impl Actor for Resumer {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.round(ctx);
        ctx.run_interval(self.interval, |act, ctx| act.round(ctx));
        ctx.run_interval(RESUBMIT_TICK, |act, ctx| act.resubmit_tick(ctx));
    }
}

impl Handler<Resubmit> for Resumer {
    type Result = ();

    fn handle(&mut self, msg: Resubmit, _: &mut Self::Context) {
        tracing::info!(ca = %msg.ca, per_second = msg.per_second, "resubmitting parked requests");
        self.resubmitting.insert(msg.ca, msg.per_second);
    }
}
