//! The Store: the only writer of the database on the issuance path.
//!
//! Writers put their writes in one shared queue; each worker thread takes everything waiting
//! (up to `max_batch`) as one transaction — a group commit — and answers every write of the
//! batch itself, from its own thread, once it is committed. Beside a batch being committed,
//! another worker starts one only once `overlap_at` writes wait (1 by default: at once). There
//! are exactly as many workers as the issuance pool has connections, so database concurrency on
//! this path can never exceed the pool, whatever the load. No actor sits between a writer and a worker: a write crosses one
//! thread to be committed and one back to its writer (an actor in between cost two more
//! wake-ups per write, four per issuance).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use tokio::sync::oneshot;

use crate::config::StoreConfig;
use crate::db::queries;
use crate::db::writes::{WriteOp, WriteOutcome};
use crate::db::DbPool;
use crate::error::{DbError, EngineError};
use crate::metrics::Metrics;

/// What a write's commit (or refusal) is answered to.
pub enum Ack {
    /// A caller awaiting the commit.
    Reply(oneshot::Sender<Result<WriteOutcome, EngineError>>),
    /// Work to do on the worker's thread once the write is committed or refused (the pipeline
    /// hands a recorded job to its signer this way, and the signer its certificate to whoever
    /// waits for it: straight from the commit, without waking another thread in between).
    Then(Box<dyn FnOnce(Result<WriteOutcome, EngineError>) + Send>),
}

/// Whether a write may be refused because the queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admission {
    /// New work: refused when `max_pending` writes wait.
    New,
    /// The second write of work the store already admitted (the signer's certificate): refused
    /// for a full queue, its signature would be thrown away. Hand-overs are few (at most the
    /// signers' jobs in flight), so the queue stays bounded without counting them.
    HandOver,
}

impl Ack {
    fn send(self, result: Result<WriteOutcome, EngineError>) {
        match self {
            Ack::Reply(tx) => {
                let _ = tx.send(result);
            }
            Ack::Then(f) => f(result),
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct StoreStatus {
    pub workers: usize,
    pub batches_in_flight: usize,
    pub pending_writes: usize,
    pub database_down: bool,
}

/// Cheap handle used by everyone who writes. When the last one is dropped, the workers commit
/// what is waiting and stop.
#[derive(Clone)]
pub struct StoreHandle {
    shared: Arc<Shared>,
    _open: Arc<Open>,
}

struct Shared {
    queue: Mutex<Queue>,
    /// Signalled when a write arrives that an idle worker may start a batch for, or the store
    /// closes.
    work: Condvar,
    worker_count: usize,
    max_batch: usize,
    max_pending: usize,
    overlap_at: usize,
    metrics: Arc<Metrics>,
    /// Fault injection (dev mode only): this many of the next batches panic in their worker.
    injected_panics: AtomicU32,
}

struct Queue {
    pending: VecDeque<(WriteOp, Option<Ack>)>,
    /// Batches being committed (≤ workers).
    busy: usize,
    /// Workers waiting: for a write, or (beside a batch being committed) for `overlap_at`.
    idle: usize,
    /// After a commit failed for want of the database, writes are refused at once until then
    /// (one batch at a time probes whether it is back).
    database_down_until: Option<Instant>,
    closed: bool,
}

/// Closes the store when the last handle goes.
struct Open(Arc<Shared>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.lock().closed = true;
        self.0.work.notify_all();
    }
}

/// How long writes are refused at once after the database was found unavailable.
const DATABASE_DOWN_BACKOFF: std::time::Duration = std::time::Duration::from_millis(250);

impl Shared {
    /// Whether a waiting worker starts a batch now: at once when no batch is being committed;
    /// beside one only once `overlap_at` writes wait. Each batch costs the database its round
    /// trips and a commit whatever its size, and a second worker that took every write arriving
    /// during the first one's commit made batches of a few writes (PostgreSQL at c=64: 8.8
    /// writes a batch with two workers, 21 with one; docs/PERFORMANCE.md).
    fn may_start_batch(&self, q: &Queue) -> bool {
        !q.pending.is_empty() && (q.busy == 0 || q.pending.len() >= self.overlap_at)
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        // A worker never panics while holding the lock (batches run outside it).
        self.queue.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Queue a write, or refuse it at once: the queue is full, or the database was just found
    /// unavailable (fail fast rather than queue behind a probe).
    fn push(&self, op: WriteOp, ack: Option<Ack>, admission: Admission) {
        let mut q = self.lock();
        let refusal = if admission == Admission::New && q.pending.len() >= self.max_pending {
            Some(EngineError::StoreOverloaded)
        } else if q.closed {
            Some(EngineError::ShuttingDown)
        } else if q.database_down_until.is_some_and(|t| Instant::now() < t || q.busy > 0) {
            Some(EngineError::DatabaseUnavailable)
        } else {
            None
        };
        if let Some(err) = refusal {
            drop(q);
            match ack {
                Some(ack) => ack.send(Err(err)),
                // No log here: this is the refusal path, at the rate of whatever fails.
                None => {
                    self.metrics.store_dropped.inc();
                }
            }
            return;
        }
        q.pending.push_back((op, ack));
        self.metrics.store_pending.set(q.pending.len() as i64);
        let wake = q.idle > 0 && self.may_start_batch(&q);
        drop(q);
        if wake {
            self.work.notify_one();
        }
    }

    /// A worker's life: take everything waiting (up to `max_batch`), commit it, answer it.
    fn work(&self, pool: &DbPool) {
        let mut q = self.lock();
        loop {
            while !(q.closed || self.may_start_batch(&q)) {
                q.idle += 1;
                q = self.work.wait(q).unwrap_or_else(|poisoned| poisoned.into_inner());
                q.idle -= 1;
            }
            if q.pending.is_empty() {
                return; // closed, and nothing left to commit
            }
            let n = q.pending.len().min(self.max_batch);
            let (ops, acks): (Vec<_>, Vec<_>) = q.pending.drain(..n).unzip();
            q.busy += 1;
            self.metrics.store_pending.set(q.pending.len() as i64);
            drop(q);

            self.metrics.store_batch_size.observe(n as f64);
            let started = Instant::now();
            let result = self.commit(pool, &ops);
            self.metrics.store_commit_seconds.observe(started.elapsed().as_secs_f64());
            let result = result.map_err(|e| {
                tracing::warn!(error = %e, writes = n, "group commit failed");
                EngineError::from(e)
            });

            q = self.lock();
            q.busy -= 1;
            match &result {
                Ok(_) => q.database_down_until = None,
                Err(EngineError::DatabaseUnavailable) => {
                    q.database_down_until = Some(Instant::now() + DATABASE_DOWN_BACKOFF)
                }
                Err(_) => {}
            }
            drop(q);
            match result {
                Ok(outcomes) => {
                    for (ack, outcome) in acks.into_iter().zip(outcomes) {
                        if let Some(ack) = ack {
                            ack.send(Ok(outcome));
                        }
                    }
                }
                Err(err) => acks.into_iter().flatten().for_each(|ack| ack.send(Err(err.clone()))),
            }
            q = self.lock();
        }
    }

    fn commit(&self, pool: &DbPool, ops: &[WriteOp]) -> Result<Vec<WriteOutcome>, DbError> {
        let _span = tracing::info_span!("store_batch", writes = ops.len()).entered();
        super::catch_panic("store", || {
            super::injected_panic(&self.injected_panics, "store worker");
            let mut conn = pool.get()?;
            queries::apply_batch(&mut conn, ops)
        })
        .unwrap_or_else(|panic| {
            self.metrics.worker_panics.get_or_create(&crate::metrics::ca("store")).inc();
            Err(DbError::WorkerPanic(panic))
        })
    }
}

impl StoreHandle {
    /// Start `pool.max_size` workers, each on a thread of its own.
    pub fn start(pool: DbPool, config: &StoreConfig, metrics: Arc<Metrics>) -> StoreHandle {
        let worker_count = pool.max_size as usize;
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                pending: VecDeque::new(),
                busy: 0,
                idle: 0,
                database_down_until: None,
                closed: false,
            }),
            work: Condvar::new(),
            worker_count,
            max_batch: config.max_batch.max(1),
            max_pending: config.max_pending,
            overlap_at: config.overlap_at.max(1),
            metrics,
            injected_panics: AtomicU32::new(0),
        });
        for i in 0..worker_count {
            let (shared, pool) = (shared.clone(), pool.clone());
            std::thread::Builder::new()
                .name(format!("castellum-store-{i}"))
                .spawn(move || shared.work(&pool))
                .expect("start-up: a store worker thread");
        }
        StoreHandle { _open: Arc::new(Open(shared.clone())), shared }
    }

    /// Write and wait for the commit.
    pub async fn write(&self, op: WriteOp) -> Result<WriteOutcome, EngineError> {
        let (tx, rx) = oneshot::channel();
        self.shared.push(op, Some(Ack::Reply(tx)), Admission::New);
        rx.await.unwrap_or(Err(EngineError::ShuttingDown))
    }

    /// Write, and run `then` on the worker's thread with the outcome (or the refusal).
    pub fn write_then(&self, op: WriteOp, then: impl FnOnce(Result<WriteOutcome, EngineError>) + Send + 'static) {
        self.shared.push(op, Some(Ack::Then(Box::new(then))), Admission::New);
    }

    /// The same, for the second write of admitted work (the signer's certificate): never
    /// refused for a full queue.
    pub fn hand_over(&self, op: WriteOp, then: impl FnOnce(Result<WriteOutcome, EngineError>) + Send + 'static) {
        self.shared.push(op, Some(Ack::Then(Box::new(then))), Admission::HandOver);
    }

    /// Fault injection (dev mode only; the engine checks): the next batch a worker takes panics
    /// (caught there; its writes are answered as errors).
    pub fn inject_panic(&self) {
        self.shared.injected_panics.fetch_add(1, Ordering::SeqCst);
    }

    pub async fn status(&self) -> Option<StoreStatus> {
        let q = self.shared.lock();
        Some(StoreStatus {
            workers: self.shared.worker_count,
            batches_in_flight: q.busy,
            pending_writes: q.pending.len(),
            database_down: q.database_down_until.is_some(),
        })
    }

    /// Write without waiting (a request's failure, an abandoned write-ahead record, an audit
    /// event). Dropped and counted (`castellum_store_dropped_writes_total`) when the store
    /// refuses it: a flood of failures must not crowd out issuance, nor the log.
    pub fn write_detached(&self, op: WriteOp) {
        self.shared.push(op, None, Admission::New);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::Duration;

    use diesel::connection::SimpleConnection;
    use diesel::{Connection, RunQueryDsl, SqliteConnection};

    use super::*;
    use crate::config::{DatabaseConfig, PoolConfig};
    pub(crate) use crate::db::writes::test_writes::write_ahead;

    /// A store on a fresh SQLite file, with `workers` connections; the file's path for SQL.
    pub(crate) fn store(
        dir: &tempfile::TempDir,
        workers: u32,
        max_batch: usize,
        max_pending: usize,
    ) -> (StoreHandle, String, Arc<Metrics>) {
        store_waiting(dir, workers, limits(max_batch, max_pending), Duration::from_millis(200))
    }

    /// The store's limits, and its default `overlap_at`.
    fn limits(max_batch: usize, max_pending: usize) -> StoreConfig {
        StoreConfig { max_batch, max_pending, ..StoreConfig::default() }
    }

    /// A store as [`store`] makes, with the whole `config` and SQLite's busy timeout (how long a
    /// commit waits for a lock) set to `busy`.
    fn store_waiting(
        dir: &tempfile::TempDir,
        workers: u32,
        config: StoreConfig,
        busy: Duration,
    ) -> (StoreHandle, String, Arc<Metrics>) {
        let path = dir.path().join("store.db").display().to_string();
        let url = format!("sqlite://{path}");
        crate::db::migrate::run(&url).expect("migrated");
        let db = DatabaseConfig { url, busy_timeout: busy, ..DatabaseConfig::default() };
        let metrics = Arc::new(Metrics::new());
        let pool_cfg = PoolConfig { max_size: workers, ..PoolConfig::default() };
        let pool = DbPool::build(&db, &pool_cfg, "issuance", metrics.clone()).expect("pool");
        (StoreHandle::start(pool, &config, metrics.clone()), path, metrics)
    }

    /// Rows in `certificates`, read with plain SQL on a connection of the test's own.
    /// One text value (`SELECT … AS v`), read with plain SQL on a connection of the test's own.
    pub(crate) fn text(path: &str, sql: &str) -> Option<String> {
        #[derive(diesel::QueryableByName)]
        struct Value {
            #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
            v: Option<String>,
        }
        let mut conn = connect(path);
        diesel::sql_query(sql).get_result::<Value>(&mut conn).unwrap().v
    }

    /// A connection of the test's own holding the file's write lock (waiting for the pool's new
    /// connections to finish setting up, which take it for a moment).
    fn lock(path: &str) -> SqliteConnection {
        let mut conn = connect(path);
        conn.batch_execute("BEGIN EXCLUSIVE").unwrap();
        conn
    }

    /// A connection of the test's own that waits for locks (the pool's connections take one for
    /// a moment while they set themselves up).
    fn connect(path: &str) -> SqliteConnection {
        let mut conn = SqliteConnection::establish(path).unwrap();
        conn.batch_execute("PRAGMA busy_timeout = 10000").unwrap();
        conn
    }

    pub(crate) fn certificates(path: &str) -> i64 {
        #[derive(diesel::QueryableByName)]
        struct Count {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            n: i64,
        }
        let mut conn = connect(path);
        diesel::sql_query("SELECT COUNT(*) AS n FROM certificates").get_result::<Count>(&mut conn).unwrap().n
    }

    fn metric(metrics: &Metrics, series: &str) -> f64 {
        let text = metrics.render();
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{series} in\n{text}"))
    }

    #[actix_rt::test]
    async fn concurrent_writes_are_committed_in_groups_of_at_most_max_batch() {
        let dir = tempfile::tempdir().unwrap();
        let (store, path, metrics) = store(&dir, 1, 8, 1000);
        let writes = (0..40).map(|i| store.write(write_ahead(&format!("{i:040x}"))));
        for outcome in futures_util::future::join_all(writes).await {
            assert!(matches!(outcome, Ok(WriteOutcome::Done)), "{outcome:?}");
        }
        assert_eq!(certificates(&path), 40);
        let batches = metric(&metrics, "castellum_store_batch_size_count");
        assert_eq!(metric(&metrics, "castellum_store_batch_size_sum"), 40.0);
        assert!((5.0..40.0).contains(&batches), "40 writes in {batches} batches of at most 8, some grouped");
        let status = store.status().await.unwrap();
        assert_eq!((status.workers, status.batches_in_flight, status.pending_writes), (1, 0, 0));
    }

    #[actix_rt::test]
    async fn never_more_batches_out_than_workers_and_detached_writes_are_committed_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (store, path, _) = store_waiting(&dir, 1, limits(1, 1000), Duration::from_secs(30));
        // The one worker is held up by a lock on the file while the status is read.
        let mut blocker = lock(&path);
        let writes: Vec<_> = (0..5)
            .map(|i| {
                actix_rt::spawn({
                    let store = store.clone();
                    async move { store.write(write_ahead(&format!("{i:040x}"))).await }
                })
            })
            .collect();
        store.write_detached(write_ahead(&"9".repeat(40)));
        actix_rt::time::sleep(Duration::from_millis(50)).await;
        let status = store.status().await.unwrap();
        assert_eq!((status.batches_in_flight, status.pending_writes), (1, 5), "one batch out, the rest waiting");
        blocker.batch_execute("ROLLBACK").unwrap();
        for w in writes {
            assert!(matches!(w.await.unwrap(), Ok(WriteOutcome::Done)));
        }
        // Written after the detached write was sent: once it is committed, so is the detached one.
        assert!(matches!(store.write(write_ahead(&"8".repeat(40))).await, Ok(WriteOutcome::Done)));
        assert_eq!(certificates(&path), 7);
    }

    /// Beside a batch being committed, a second worker starts another only once `overlap_at`
    /// writes wait: fewer, larger batches under load.
    #[actix_rt::test]
    async fn a_second_batch_starts_beside_the_first_only_once_enough_writes_wait() {
        let dir = tempfile::tempdir().unwrap();
        let config = StoreConfig { max_batch: 1, max_pending: 1000, overlap_at: 3 };
        let (store, path, _) = store_waiting(&dir, 2, config, Duration::from_secs(30));
        // The first batch is held up by a lock on the file.
        let mut blocker = lock(&path);
        let mut writes = Vec::new();
        let mut write = |i: usize| {
            writes.push(actix_rt::spawn({
                let store = store.clone();
                async move { store.write(write_ahead(&format!("{i:040x}"))).await }
            }))
        };
        let out = |store: StoreHandle| async move {
            actix_rt::time::sleep(Duration::from_millis(50)).await;
            let status = store.status().await.unwrap();
            (status.batches_in_flight, status.pending_writes)
        };
        write(0);
        write(1);
        write(2);
        assert_eq!(out(store.clone()).await, (1, 2), "two writes waiting: no second batch yet");
        write(3);
        assert_eq!(out(store.clone()).await, (2, 2), "three waiting: the second worker took one");
        blocker.batch_execute("ROLLBACK").unwrap();
        for w in writes {
            assert!(matches!(w.await.unwrap(), Ok(WriteOutcome::Done)));
        }
        assert_eq!(certificates(&path), 4);
    }

    /// Once the back-off has passed, one batch probes the database; writes that come while it is
    /// out are refused at once rather than queued behind it.
    #[actix_rt::test]
    async fn while_a_probe_is_out_writes_are_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let (store, path, _) = store_waiting(&dir, 1, limits(8, 1000), Duration::from_secs(1));
        let mut blocker = lock(&path);
        assert_eq!(store.write(write_ahead(&"1".repeat(40))).await.unwrap_err(), EngineError::DatabaseUnavailable);
        actix_rt::time::sleep(DATABASE_DOWN_BACKOFF + Duration::from_millis(50)).await;
        let probe = actix_rt::spawn({
            let store = store.clone();
            async move { store.write(write_ahead(&"2".repeat(40))).await }
        });
        actix_rt::time::sleep(Duration::from_millis(50)).await;
        let started = Instant::now();
        assert_eq!(store.write(write_ahead(&"3".repeat(40))).await.unwrap_err(), EngineError::DatabaseUnavailable);
        assert!(started.elapsed() < Duration::from_millis(500), "queued behind the probe: {:?}", started.elapsed());
        blocker.batch_execute("ROLLBACK").unwrap();
        assert!(matches!(probe.await.unwrap(), Ok(WriteOutcome::Done)), "the probe finds the database back");
        assert_eq!(certificates(&path), 1);
    }

    #[actix_rt::test]
    async fn a_write_beyond_max_pending_is_refused_not_queued() {
        let dir = tempfile::tempdir().unwrap();
        let (store, path, _) = store(&dir, 1, 8, 0);
        assert_eq!(store.write(write_ahead(&"a".repeat(40))).await.unwrap_err(), EngineError::StoreOverloaded);
        assert_eq!(certificates(&path), 0);
        // A write-ahead record handed to its signer from the commit is new work: refused too.
        let (tx, rx) = oneshot::channel();
        store.write_then(write_ahead(&"w".repeat(40)), move |outcome| {
            let _ = tx.send(outcome);
        });
        assert_eq!(rx.await.unwrap().unwrap_err(), EngineError::StoreOverloaded);
        // The hand-over of work already admitted (a signed certificate) is not new work: taken.
        let (tx, rx) = oneshot::channel();
        store.hand_over(write_ahead(&"h".repeat(40)), move |outcome| {
            let _ = tx.send(outcome);
        });
        assert!(matches!(rx.await.unwrap(), Ok(WriteOutcome::Done)));
        assert_eq!(certificates(&path), 1);
    }

    #[actix_rt::test]
    async fn a_failing_batch_answers_its_writes_and_the_next_one_commits() {
        let dir = tempfile::tempdir().unwrap();
        let (store, path, _) = store(&dir, 2, 8, 1000);
        store.inject_panic();
        let err = store.write(write_ahead(&"b".repeat(40))).await.unwrap_err();
        assert!(matches!(err, EngineError::Internal(ref why) if why.contains("panic")), "{err:?}");
        assert!(matches!(store.write(write_ahead(&"c".repeat(40))).await, Ok(WriteOutcome::Done)));
        assert_eq!(certificates(&path), 1);
        assert_eq!(store.status().await.unwrap().workers, 2);
    }

    #[actix_rt::test]
    async fn after_the_database_is_found_down_writes_are_refused_at_once_for_a_while() {
        let dir = tempfile::tempdir().unwrap();
        let (store, path, metrics) = store(&dir, 1, 8, 1000);
        // The database goes away: its file is locked by another connection in an open write
        // transaction, so checkouts wait out busy_timeout and commits fail as unavailable.
        let mut blocker = lock(&path);
        let first = store.write(write_ahead(&"d".repeat(40))).await.unwrap_err();
        assert_eq!(first, EngineError::DatabaseUnavailable);
        assert!(store.status().await.unwrap().database_down);
        let started = Instant::now();
        assert_eq!(store.write(write_ahead(&"e".repeat(40))).await.unwrap_err(), EngineError::DatabaseUnavailable);
        assert!(started.elapsed() < Duration::from_millis(100), "refused without a commit attempt");
        // A write nobody waits for is dropped and counted (no log line per refusal).
        store.write_detached(write_ahead(&"g".repeat(40)));
        assert_eq!(metrics.store_dropped.get(), 1);
        blocker.batch_execute("ROLLBACK").unwrap();
        std::thread::sleep(DATABASE_DOWN_BACKOFF);
        assert!(matches!(store.write(write_ahead(&"f".repeat(40))).await, Ok(WriteOutcome::Done)));
        assert!(!store.status().await.unwrap().database_down);
        assert_eq!(certificates(&path), 1);
    }
}
