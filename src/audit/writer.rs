//! The audit writer: an actor on the system arbiter whose database work runs on a blocking
//! thread with the `audit` pool's one connection. It never makes anyone wait: events are handed
//! to it with `try_send` (a full queue drops the event and counts the drop), refusals are only
//! tallies, and a write that fails keeps its rows (bounded) for the next attempt.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use arc_swap::ArcSwapOption;

use super::chain::{self, Head, Verification};
use super::ledger::{Action, RefusalCount, RefusalLedger};
use super::recent::{ca_of, CaRefusals, RecentRefusals, SAMPLE_EVERY};
use crate::config::AuditConfig;
use crate::db::audit::AppendAudit;
use crate::db::models::{NewAuditEvent, NewAuditRow};
use crate::db::DbPool;
use crate::error::{DbError, EngineError};
use crate::metrics::Metrics;
use crate::pki::now_ms;
use crate::write_transaction;

/// After a single event arrives, wait this long for others before writing (admin actions come
/// in bursts; their rows should still appear within a moment).
const EVENT_DELAY: Duration = Duration::from_millis(50);

/// How often rows left unsealed are sealed onto the chain, between the interval writes (which
/// seal too). Rows are sealed as they are inserted (`db::audit`); on PostgreSQL the single
/// certificate's statement inserts its row unsealed (a second's rows at a time keep each seal
/// small), and the chain's head trails those by about a second.
const SEAL_EVERY: Duration = Duration::from_secs(1);

/// What the rest of the engine holds: record a refusal (in memory), send an event (never waits).
#[derive(Clone)]
pub struct AuditLog {
    ledger: Arc<RefusalLedger>,
    recent: Arc<RecentRefusals>,
    /// Each profile's CA, for the per-CA view of recent refusals.
    ca_of_profile: Arc<HashMap<String, String>>,
    /// The engine's last verification of its own chain.
    verified: Arc<ArcSwapOption<Verification>>,
    writer: Addr<AuditWriter>,
    metrics: Arc<Metrics>,
}

impl AuditLog {
    /// Count a refusal of an authenticated client. Writes nothing, takes no lock.
    pub fn refusal(&self, client: &str, action: Action, target: &str, err: &EngineError) {
        self.ledger.record(client, action, target, err, now_ms());
    }

    /// One audit row for one event (an operator's action). Dropped, and counted, if the writer's
    /// queue is full.
    pub fn event(&self, event: NewAuditEvent) {
        // The writer reads the metric at its next write and records the drops as a row.
        if self.writer.try_send(Record(event)).is_err() {
            self.metrics.audit_dropped.inc();
        }
    }

    /// When this instance last verified its own chain, and what it found.
    pub fn last_verification(&self) -> Option<Verification> {
        self.verified.load_full().map(|v| (*v).clone())
    }

    /// Refusals since start, per CA (refusals of no configured profile under `(other)`).
    pub fn refusals_by_ca(&self) -> HashMap<String, u64> {
        let mut by_ca: HashMap<String, u64> = HashMap::new();
        for (slot, n) in self.ledger.totals().into_iter().enumerate().filter(|(_, n)| *n > 0) {
            let (_, target, _) = self.ledger.kind_of(slot);
            *by_ca.entry(ca_of(&self.ca_of_profile, target).to_string()).or_default() += n;
        }
        by_ca
    }

    /// Refusals over the last minute, per CA (for the admin console).
    pub fn recent_refusals(&self) -> Vec<CaRefusals> {
        self.recent.last_minute(&self.ledger, &self.ca_of_profile)
    }

    /// Write everything pending now (at shutdown); `Err` if the database would not take it.
    pub async fn flush(&self) -> Result<(), EngineError> {
        match self.writer.send(Flush).await {
            Ok(result) => result,
            Err(_) => Err(EngineError::Internal("the audit writer stopped".into())),
        }
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct Record(NewAuditEvent);

#[derive(Message)]
#[rtype(result = "Result<(), EngineError>")]
struct Flush;

pub struct AuditWriter {
    pool: DbPool,
    ledger: Arc<RefusalLedger>,
    metrics: Arc<Metrics>,
    instance: Arc<str>,
    interval: Duration,
    max_pending: usize,
    /// Rows waiting for the next write (events, and rows a failed write kept).
    pending: Vec<NewAuditRow>,
    /// Drops the metric has counted and no row records yet.
    dropped_written: u64,
    writing: bool,
    event_write_scheduled: bool,
    /// The chain's head as last sealed, and where heads are checkpointed.
    head: Option<Head>,
    checkpoint_file: Option<PathBuf>,
    recent: Arc<RecentRefusals>,
    verified: Arc<ArcSwapOption<Verification>>,
    verify_interval: Duration,
    verifying: bool,
}

impl AuditWriter {
    /// Start the writer; its mailbox holds `max_pending` events.
    pub fn start(
        pool: DbPool,
        ledger: Arc<RefusalLedger>,
        metrics: Arc<Metrics>,
        instance: Arc<str>,
        settings: &AuditConfig,
        ca_of_profile: HashMap<String, String>,
    ) -> AuditLog {
        let recent = Arc::new(RecentRefusals::default());
        let verified = Arc::new(ArcSwapOption::empty());
        let max_pending = settings.max_pending.max(1);
        let writer = AuditWriter {
            pool,
            ledger: ledger.clone(),
            metrics: metrics.clone(),
            instance,
            interval: settings.refusal_interval,
            max_pending,
            pending: Vec::new(),
            dropped_written: 0,
            writing: false,
            event_write_scheduled: false,
            head: None,
            checkpoint_file: settings.checkpoint_file.clone(),
            recent: recent.clone(),
            verified: verified.clone(),
            verify_interval: settings.verify_interval,
            verifying: false,
        };
        let (sender, receiver) = actix::dev::channel::channel(max_pending);
        let addr = Addr::new(sender);
        actix::Arbiter::current().spawn(async move {
            Context::with_receiver(receiver).run(writer);
        });
        AuditLog { ledger, recent, ca_of_profile: Arc::new(ca_of_profile), verified, writer: addr, metrics }
    }

    /// Everything to write now: waiting rows, the tallies as aggregates, and the drops.
    fn collect(&mut self) -> Vec<NewAuditRow> {
        let mut rows = std::mem::take(&mut self.pending);
        let now = now_ms();
        rows.extend(self.ledger.drain().into_iter().map(|r| aggregate_row(&self.instance, r)));
        let dropped = self.metrics.audit_dropped.get();
        if dropped > self.dropped_written {
            rows.push(NewAuditRow {
                at: now,
                instance: self.instance.to_string(),
                actor: "castellum".into(),
                action: "audit.dropped".into(),
                target: "audit".into(),
                outcome: "dropped".into(),
                detail: "audit events dropped: the audit writer's queue was full or the database down too long".into(),
                count: (dropped - self.dropped_written) as i64,
                first_at: None,
            });
            self.dropped_written = dropped;
        }
        rows
    }

    /// Keep rows a failed write could not store, up to the bound; count the rest as dropped.
    fn keep(&mut self, mut rows: Vec<NewAuditRow>) {
        let room = self.max_pending.saturating_sub(self.pending.len());
        if rows.len() > room {
            let lost: i64 = rows.drain(room..).map(|r| r.count).sum();
            self.metrics.audit_dropped.inc_by(lost.max(0) as u64);
        }
        rows.append(&mut self.pending);
        self.pending = rows;
    }

    /// One round of the writer: what it writes, whether it seals this instance's rows left
    /// unsealed — its own, the Store's and the registry's — onto the chain, and whether it
    /// checkpoints the head.
    fn write(&mut self, ctx: &mut Context<Self>, round: Round) {
        if self.writing {
            // Single events must not wait for the next interval because a seal was under way.
            if round == Round::Events {
                self.schedule_events(ctx);
            }
            return;
        }
        let rows = match round {
            Round::Events | Round::Interval => self.collect(),
            Round::Seal => Vec::new(),
        };
        let seal = match round {
            Round::Events => false,
            Round::Seal | Round::Interval => true,
        };
        if rows.is_empty() && !seal {
            return;
        }
        self.writing = true;
        let (pool, instance) = (self.pool.clone(), self.instance.clone());
        let task = actix_web::rt::task::spawn_blocking(move || write_and_seal(&pool, &instance, rows, seal));
        ctx.spawn(task.into_actor(self).map(move |joined, act, _| {
            act.writing = false;
            match joined {
                Ok(outcome) => act.settle(outcome, round == Round::Interval),
                Err(e) => tracing::error!(error = %e, "audit write task failed"),
            }
        }));
    }

    /// Write the waiting single events in a moment (once, however many arrive meanwhile).
    fn schedule_events(&mut self, ctx: &mut Context<Self>) {
        if !self.event_write_scheduled {
            self.event_write_scheduled = true;
            ctx.run_later(EVENT_DELAY, |act, ctx| {
                act.event_write_scheduled = false;
                act.write(ctx, Round::Events);
            });
        }
    }

    /// The rows written are counted; rows not written are kept for the next attempt (never
    /// rows that were: a seal that fails after its insert committed does not write them again).
    fn settle(&mut self, outcome: Written, checkpoint: bool) {
        match outcome.inserted {
            Ok(()) => self.count_written(&outcome.rows),
            Err(e) => {
                tracing::warn!(error = %e, rows = outcome.rows.len(), "audit write failed; kept for the next attempt");
                self.keep(outcome.rows);
            }
        }
        match outcome.sealed {
            Ok(head) if checkpoint => self.checkpoint(head),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "sealing the audit chain failed; retried at the next seal"),
        }
    }

    /// Verify this instance's chain whole, on a blocking thread (one connection of the audit
    /// pool, paged reads); a break is logged as an error and shown in the console.
    fn verify(&mut self, ctx: &mut Context<Self>) {
        if self.verifying {
            return;
        }
        self.verifying = true;
        let (pool, instance, file) = (self.pool.clone(), self.instance.to_string(), self.checkpoint_file.clone());
        let task = actix_web::rt::task::spawn_blocking(move || {
            let checkpoints = file.and_then(|f| chain::read_checkpoints(&f).ok()).unwrap_or_default();
            pool.get().and_then(|mut conn| chain::verify_instance(&mut conn, instance, &checkpoints))
        });
        ctx.spawn(task.into_actor(self).map(|joined, act, _| {
            act.verifying = false;
            match joined {
                Ok(Ok(report)) => {
                    if let Some(fault) = &report.fault {
                        tracing::error!(fault = %fault, "the audit chain of this instance is broken");
                    }
                    act.verified.store(Some(Arc::new(Verification {
                        instance: report.instance,
                        at: now_ms(),
                        verified: report.verified,
                        fault: report.fault.map(|f| f.to_string()),
                    })));
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "could not verify the audit chain; retrying later"),
                Err(e) => tracing::error!(error = %e, "audit chain verification task failed"),
            }
        }));
    }

    /// A head that moved is logged and, if configured, appended to the checkpoint file: outside
    /// the database, so that a deleted tail or a rewritten chain is seen.
    fn checkpoint(&mut self, head: Option<Head>) {
        let Some(head) = head.filter(|h| self.head.as_ref() != Some(h)) else { return };
        tracing::info!(seq = head.seq, hash = %head.hash, "audit chain head");
        if let Some(path) = &self.checkpoint_file {
            if let Err(e) = chain::checkpoint(path, &head, now_ms()) {
                tracing::error!(error = %e, file = %path.display(), "could not checkpoint the audit chain");
            }
        }
        self.head = Some(head);
    }

    fn count_written(&self, rows: &[NewAuditRow]) {
        for row in rows {
            let kind = match (row.first_at, row.action.as_str()) {
                (Some(_), _) => "refusals",
                (None, "audit.dropped") => "dropped",
                (None, _) => "event",
            };
            self.metrics.audit_rows.get_or_create(&vec![("kind", kind.to_string())]).inc();
        }
    }
}

/// What a round of the audit writer does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Round {
    /// Single events, a moment after they came: written, not sealed.
    Events,
    /// Every second: rows left unsealed sealed onto the chain, nothing written.
    Seal,
    /// Every `audit.refusal_interval`: events and refusal tallies written, the chain sealed and
    /// its head checkpointed (logged, and appended to the checkpoint file).
    Interval,
}

/// What one write did: its rows and whether they were inserted, and the chain's head if sealed.
struct Written {
    rows: Vec<NewAuditRow>,
    inserted: Result<(), DbError>,
    sealed: Result<Option<Head>, DbError>,
}

/// Insert `rows` (one transaction), then — if `seal` — seal this instance's rows left unsealed,
/// the whole backlog, in transactions of their own. Runs on a blocking thread.
fn write_and_seal(pool: &DbPool, instance: &str, rows: Vec<NewAuditRow>, seal: bool) -> Written {
    let mut conn = match pool.get() {
        Ok(conn) => conn,
        Err(e) => {
            let sealed = Err(DbError::Pool(e.to_string()));
            return Written { rows, inserted: Err(e), sealed };
        }
    };
    let inserted = if rows.is_empty() { Ok(()) } else { insert(&mut conn, &rows) };
    let sealed = if seal { chain::seal_backlog(&mut conn, instance) } else { Ok(None) };
    Written { rows, inserted, sealed }
}

fn aggregate_row(instance: &str, r: RefusalCount) -> NewAuditRow {
    NewAuditRow {
        at: r.last_ms,
        instance: instance.to_string(),
        actor: r.client,
        action: r.action.to_string(),
        target: r.target,
        outcome: r.reason.to_string(),
        detail: r.example,
        count: r.count as i64,
        first_at: Some(r.first_ms),
    }
}

fn insert(conn: &mut crate::db::DbConn, rows: &[NewAuditRow]) -> Result<(), DbError> {
    write_transaction!(conn, |c| {
        c.append_audit(rows)?;
        Ok::<_, DbError>(())
    })
}

impl Actor for AuditWriter {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(self.interval, |act, ctx| act.write(ctx, Round::Interval));
        ctx.run_interval(SEAL_EVERY.min(self.interval), |act, ctx| act.write(ctx, Round::Seal));
        self.recent.sample(&self.ledger);
        ctx.run_interval(SAMPLE_EVERY, |act, _| act.recent.sample(&act.ledger));
        ctx.run_interval(self.verify_interval, |act, ctx| act.verify(ctx));
    }
}

impl Handler<Record> for AuditWriter {
    type Result = ();

    fn handle(&mut self, Record(event): Record, ctx: &mut Self::Context) {
        if self.pending.len() >= self.max_pending {
            self.metrics.audit_dropped.inc();
            return;
        }
        self.pending.push(event.into());
        self.schedule_events(ctx);
    }
}

/// How long a flush waits for an interval write already under way (its rows, if it fails, come
/// back to be flushed), polling this often.
const FLUSH_WAIT: Duration = Duration::from_secs(5);
const FLUSH_POLL: Duration = Duration::from_millis(20);

impl AuditWriter {
    /// The flush proper, once no other write is under way (or `FLUSH_WAIT` has passed).
    fn flush_when_idle(&mut self, waited: Duration) -> ResponseActFuture<Self, Result<(), EngineError>> {
        if self.writing && waited < FLUSH_WAIT {
            let pause = actix::fut::wrap_future::<_, Self>(tokio::time::sleep(FLUSH_POLL));
            return Box::pin(pause.then(move |_, act, _| act.flush_when_idle(waited + FLUSH_POLL)));
        }
        self.writing = true;
        let rows = self.collect();
        let (pool, instance) = (self.pool.clone(), self.instance.clone());
        let task = actix_web::rt::task::spawn_blocking(move || write_and_seal(&pool, &instance, rows, true));
        Box::pin(task.into_actor(self).map(|joined, act, _| {
            act.writing = false;
            match joined {
                Ok(Written { rows, inserted, sealed }) => {
                    match sealed {
                        Ok(head) => act.checkpoint(head),
                        Err(e) => tracing::warn!(error = %e, "shutdown: sealing the audit chain failed"),
                    }
                    match inserted {
                        Ok(()) => {
                            act.count_written(&rows);
                            Ok(())
                        }
                        Err(e) => {
                            // The engine is stopping: what could not be written is lost, and counted.
                            let lost: i64 = rows.iter().map(|r| r.count).sum();
                            act.metrics.audit_dropped.inc_by(lost.max(0) as u64);
                            Err(EngineError::from(e))
                        }
                    }
                }
                Err(e) => Err(EngineError::Internal(format!("audit flush task: {e}"))),
            }
        }))
    }
}

impl Handler<Flush> for AuditWriter {
    type Result = ResponseActFuture<Self, Result<(), EngineError>>;

    fn handle(&mut self, _: Flush, _: &mut Self::Context) -> Self::Result {
        self.flush_when_idle(Duration::ZERO)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DatabaseConfig, PoolConfig};
    use crate::db::schema::audit_log;
    use diesel::prelude::*;

    /// A writer on a fresh SQLite file; the file's URL for reading back.
    fn writer(dir: &tempfile::TempDir, interval: Duration, max_pending: usize) -> (AuditLog, String, Arc<Metrics>) {
        let url = format!("sqlite://{}", dir.path().join("audit.db").display());
        crate::db::migrate::run(&url).expect("migrated");
        let db = DatabaseConfig { url: url.clone(), ..DatabaseConfig::default() };
        let metrics = Arc::new(Metrics::new());
        let pool = DbPool::build(&db, &PoolConfig { max_size: 1, ..PoolConfig::default() }, "audit", metrics.clone())
            .expect("pool");
        let ledger = Arc::new(RefusalLedger::new(["demo"], ["tls-server-p256"], metrics.clone()));
        let settings = AuditConfig { refusal_interval: interval, max_pending, ..AuditConfig::default() };
        let log = AuditWriter::start(pool, ledger, metrics.clone(), "test".into(), &settings, HashMap::new());
        (log, url, metrics)
    }

    /// (action, outcome, count, first_at) of every row, oldest first.
    fn rows(url: &str) -> Vec<(String, String, i64, Option<i64>)> {
        use diesel::connection::SimpleConnection;
        use diesel::Connection;
        let mut c = diesel::SqliteConnection::establish(crate::db::sqlite_path(url)).expect("open");
        // The writer may be committing: wait for its lock as the engine's own connections do.
        c.batch_execute("PRAGMA busy_timeout = 2000").expect("busy timeout");
        audit_log::table
            .select((audit_log::action, audit_log::outcome, audit_log::count, audit_log::first_at))
            .order(audit_log::id)
            .load(&mut c)
            .expect("read")
    }

    fn event(n: usize) -> NewAuditEvent {
        NewAuditEvent {
            at: n as i64,
            instance: "test".into(),
            actor: "admin".into(),
            action: "ca.state".into(),
            target: format!("ca-{n}"),
            outcome: "ok".into(),
            detail: String::new(),
        }
    }

    #[actix_rt::test]
    async fn a_storm_of_refusals_is_one_row_per_kind_per_interval() {
        let dir = tempfile::tempdir().unwrap();
        let (log, url, metrics) = writer(&dir, Duration::from_millis(200), 16);
        let disabled = EngineError::CaDisabled("ica-p384".into());
        for _ in 0..10_000 {
            log.refusal("demo", Action::Issue, "tls-server-p256", &disabled);
        }
        log.refusal("demo", Action::Submit, "tls-server-p256", &disabled);
        let started = std::time::Instant::now();
        while rows(&url).len() < 2 {
            assert!(started.elapsed() < Duration::from_secs(5), "the tallies were never written");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let written = rows(&url);
        assert_eq!(written.len(), 2, "{written:?}");
        let issue = written.iter().find(|r| r.0 == "certificate.issue").expect("the issue tally");
        assert_eq!((issue.1.as_str(), issue.2), ("ca-disabled", 10_000));
        assert!(issue.3.is_some(), "an aggregate has its first time");
        log.flush().await.unwrap();
        assert_eq!(rows(&url).len(), 2, "nothing new to write");
        assert_eq!(metrics.audit_dropped.get(), 0);
    }

    #[actix_rt::test]
    async fn a_full_queue_drops_events_and_says_how_many() {
        let dir = tempfile::tempdir().unwrap();
        // A long interval: only events (and the flush) make writes.
        let (log, url, metrics) = writer(&dir, Duration::from_secs(3600), 4);
        // Sent without yielding, so the writer reads none of them before the queue is full.
        for n in 0..100 {
            log.event(event(n));
        }
        let dropped = metrics.audit_dropped.get();
        assert!(dropped >= 90, "the queue of 4 took {} events", 100 - dropped);
        log.flush().await.unwrap();
        let written = rows(&url);
        let events = written.iter().filter(|r| r.0 == "ca.state").count() as u64;
        let drop_row = written.iter().find(|r| r.0 == "audit.dropped").expect("the drops are written down");
        assert_eq!(events + drop_row.2 as u64, 100, "every event is written or counted: {written:?}");
        assert_eq!(drop_row.2 as u64, metrics.audit_dropped.get());
    }

    #[actix_rt::test]
    async fn an_event_is_written_within_a_moment() {
        let dir = tempfile::tempdir().unwrap();
        let (log, url, _) = writer(&dir, Duration::from_secs(3600), 16);
        log.event(event(1));
        let started = std::time::Instant::now();
        while rows(&url).is_empty() {
            assert!(started.elapsed() < Duration::from_secs(2), "the event was not written");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(rows(&url), vec![("ca.state".to_string(), "ok".to_string(), 1, None)]);
    }
}
