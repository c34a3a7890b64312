//! SQLite's one write lock, taken in turn inside the process.
//!
//! SQLite lets one connection write at a time. A connection that finds the lock taken waits in
//! SQLite's busy handler, which sleeps 1, 2, 5, 10 … 100 ms between tries: a waiter is late by
//! up to a sleep after the lock is freed, and a writer that takes the lock again within
//! milliseconds of releasing it (the Store, committing back to back) is never seen free, so the
//! waiter (the audit seal, an operator's lever, a revocation) fails after `busy_timeout`. Every
//! writer of an engine is in one process, so its write transactions first take their turn here:
//! a waiter is woken the moment the turn is free, and the lock's eventual fairness hands the turn
//! to a waiter rather than back to the thread that just released it.
//!
//! Every write of the engine goes through `write_transaction!`, single statements included: one
//! left outside would wait in the busy handler while the gated writers hand the lock to each
//! other. Writers in other processes (`castellum` subcommands, an operator's `sqlite3`) still
//! meet SQLite's busy handler.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Weak};
use std::time::Duration;

use diesel::result::{DatabaseErrorKind, Error};
use parking_lot::{Mutex, MutexGuard};

/// One lock per SQLite file, shared by every pool of the process on that file: engines in one
/// process on different files (tests) do not wait for each other.
static GATES: LazyLock<std::sync::Mutex<HashMap<PathBuf, Weak<Mutex<()>>>>> = LazyLock::new(Default::default);

/// The lock of the SQLite file at `path`.
fn gate_of_file(path: &str) -> Arc<Mutex<()>> {
    let key = file_key(Path::new(path));
    let mut gates = GATES.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    gates.retain(|_, gate| gate.strong_count() > 0);
    if let Some(gate) = gates.get(&key).and_then(Weak::upgrade) {
        return gate;
    }
    let gate = Arc::new(Mutex::new(()));
    gates.insert(key, Arc::downgrade(&gate));
    gate
}

/// The same key for every spelling of one file's path (relative, absolute, through `..`), before
/// and after the file exists: its directory made absolute, and its name.
fn file_key(path: &Path) -> PathBuf {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    match (std::fs::canonicalize(dir), path.file_name()) {
        (Ok(dir), Some(name)) => dir.join(name),
        _ => path.to_path_buf(),
    }
}

/// A connection's way to its file's write lock: the file's gate, and how long to wait for a turn
/// (the database's `busy_timeout`).
#[derive(Clone)]
pub struct WriteTurn {
    gate: Arc<Mutex<()>>,
    wait: Duration,
}

impl WriteTurn {
    pub fn new(path: &str, wait: Duration) -> WriteTurn {
        WriteTurn { gate: gate_of_file(path), wait }
    }

    /// The turn, held until the guard is dropped. Not having it in time is the error SQLite
    /// itself gives a writer whose `busy_timeout` ran out, so callers treat it as they always
    /// did: the database is unavailable for now.
    pub fn take(&self) -> Result<MutexGuard<'_, ()>, Error> {
        self.gate.try_lock_for(self.wait).ok_or_else(|| {
            Error::DatabaseError(
                DatabaseErrorKind::Unknown,
                Box::new(format!("database is locked: no turn at the write lock within {} ms", self.wait.as_millis())),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Instant;

    use diesel::connection::SimpleConnection;
    use diesel::RunQueryDsl;

    use super::*;
    use crate::config::{DatabaseConfig, PoolConfig};
    use crate::db::DbPool;
    use crate::error::{DbError, EngineError};
    use crate::metrics::Metrics;

    fn pool(url: &str, busy: Duration) -> DbPool {
        let db = DatabaseConfig { url: url.into(), busy_timeout: busy, ..DatabaseConfig::default() };
        DbPool::build(&db, &PoolConfig { max_size: 1, ..PoolConfig::default() }, "test", Arc::new(Metrics::new()))
            .expect("pool")
    }

    fn insert(pool: &DbPool) -> Result<usize, DbError> {
        let mut conn = pool.get()?;
        Ok(crate::write_transaction!(&mut *conn, |c| diesel::sql_query("INSERT INTO t VALUES (1)").execute(c))?)
    }

    /// A writer that commits back to back (the Store under load) does not starve another writer
    /// of the process: SQLite's busy handler alone never finds the lock free between two of its
    /// commits and fails the other after `busy_timeout` ("database is locked").
    #[test]
    fn a_writer_committing_back_to_back_does_not_starve_another() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gate.db").display().to_string();
        let url = format!("sqlite://{path}");
        crate::db::migrate::run(&url).expect("migrated");
        let mut raw = <diesel::SqliteConnection as diesel::Connection>::establish(&path).unwrap();
        raw.batch_execute("PRAGMA busy_timeout = 5000; CREATE TABLE t (x INTEGER)").unwrap();
        let (busy, other) = (pool(&url, Duration::from_secs(2)), pool(&url, Duration::from_millis(300)));

        let stop = Arc::new(AtomicBool::new(false));
        let hammer = {
            let (busy, stop) = (busy.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut commits = 0;
                while !stop.load(Ordering::Relaxed) {
                    insert(&busy).expect("the busy writer's commit");
                    commits += 1;
                }
                commits
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        let mut waits = Vec::new();
        for _ in 0..20 {
            let started = Instant::now();
            let result = insert(&other);
            waits.push(started.elapsed());
            if let Err(e) = result {
                stop.store(true, Ordering::Relaxed);
                panic!("the other writer starved ({:?}) after {waits:?}", EngineError::from(e));
            }
        }
        stop.store(true, Ordering::Relaxed);
        let commits = hammer.join().unwrap();
        assert!(commits > 20, "the busy writer kept committing meanwhile: {commits}");
        eprintln!("other writer's waits beside {commits} back-to-back commits: {waits:?}");
    }

    /// No turn within the wait is SQLite's own "database is locked": the database is unavailable.
    #[test]
    fn no_turn_in_time_is_database_unavailable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gate.db").display().to_string();
        let (holder, waiter) =
            (WriteTurn::new(&path, Duration::from_secs(1)), WriteTurn::new(&path, Duration::from_millis(20)));
        assert!(Arc::ptr_eq(&holder.gate, &waiter.gate), "one gate per file");
        let roundabout = dir.path().join("sub").join("..").join("gate.db");
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let roundabout = WriteTurn::new(&roundabout.display().to_string(), Duration::ZERO);
        assert!(Arc::ptr_eq(&holder.gate, &roundabout.gate), "whatever the spelling");
        let other = WriteTurn::new(&dir.path().join("other.db").display().to_string(), Duration::ZERO);
        assert!(!Arc::ptr_eq(&holder.gate, &other.gate), "another file, another gate");
        let _held = holder.take().unwrap();
        let refused = waiter.take().map(|_| ()).unwrap_err();
        assert!(matches!(EngineError::from(DbError::from(refused)), EngineError::DatabaseUnavailable));
    }
}
