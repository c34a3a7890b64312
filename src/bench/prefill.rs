//! `castellum bench --prefill N`: a database that already holds N issued certificates (and
//! their audit rows), generated in bulk by the database itself — `INSERT … SELECT` over a
//! generated series, in transactions of [`CHUNK`] rows — rather than issued one by one, so the
//! bench can measure whether issuance slows down as a CA's history grows.
//!
//! Every generated row has the size of a real one: the certificate's bytes are those of a
//! certificate the engine issued, with no TBS beside it (as on an issued record:
//! `TBS_ONCE_ISSUED`), and each serial has the engine's form (`0x01`, the issuance time in
//! milliseconds, random octets: `tbs::new_serial`), with times in the day before now, so the
//! primary key holds what a CA's history would. The audit rows belong to an instance of their own
//! (`prefill`), whose chain the engine neither seals nor verifies.
//!
//! The prefill ends by flushing what it wrote to disk (SQLite's `wal_checkpoint`, PostgreSQL's
//! `CHECKPOINT`), so that the levels measure issuance beside a stored history, not beside the
//! kernel writing out gigabytes of a bulk insert.

use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Binary, Text};

use crate::db::models::TBS_ONCE_ISSUED;
use crate::drill::target::DrillDb;
use crate::drill::DrillError;

/// Rows per transaction: large enough to amortise the commits, small enough to show progress.
const CHUNK: i64 = 100_000;

/// What a prefill left in the database.
#[derive(Debug, Clone)]
pub struct Prefilled {
    pub certificates: i64,
    pub took: Duration,
    /// The database's size on disk afterwards (SQLite file, or `pg_database_size`).
    pub bytes: u64,
}

/// Insert `n` issued certificates and one audit row each, with `cert` as every row's certificate;
/// progress on stderr.
pub fn prefill(db: &DrillDb, n: i64, cert: &[u8]) -> Result<Prefilled, DrillError> {
    let tbs = TBS_ONCE_ISSUED;
    let started = Instant::now();
    let salt = uuid::Uuid::new_v4().simple().to_string();
    let now = crate::pki::now_ms();
    let fail = |e: diesel::result::Error| DrillError::Setup(format!("prefill: {e}"));
    match db {
        DrillDb::Sqlite(path) => {
            let mut c = SqliteConnection::establish(&path.display().to_string())
                .map_err(|e| DrillError::Setup(format!("prefill: {e}")))?;
            c.batch_execute("PRAGMA busy_timeout = 10000; PRAGMA synchronous = NORMAL;").map_err(fail)?;
            in_chunks(n, started, |from, upto| {
                c.transaction(|c| {
                    diesel::sql_query(SQLITE_CERTIFICATES)
                        .bind::<BigInt, _>(from)
                        .bind::<BigInt, _>(upto)
                        .bind::<Binary, _>(tbs)
                        .bind::<Binary, _>(cert)
                        .bind::<BigInt, _>(now)
                        .execute(c)?;
                    diesel::sql_query(SQLITE_AUDIT)
                        .bind::<BigInt, _>(from)
                        .bind::<BigInt, _>(upto)
                        .bind::<BigInt, _>(now)
                        .execute(c)
                })
            })?;
            let flushing = Instant::now();
            c.batch_execute("PRAGMA wal_checkpoint(TRUNCATE);").map_err(fail)?;
            eprintln!("  prefill flushed to disk (wal_checkpoint) in {:.1} s", flushing.elapsed().as_secs_f64());
        }
        DrillDb::Postgres { .. } => {
            let mut c = PgConnection::establish(&db.url()).map_err(|e| DrillError::Setup(format!("prefill: {e}")))?;
            in_chunks(n, started, |from, upto| {
                c.transaction(|c| {
                    diesel::sql_query(POSTGRES_CERTIFICATES)
                        .bind::<BigInt, _>(from)
                        .bind::<BigInt, _>(upto)
                        .bind::<Binary, _>(tbs)
                        .bind::<Binary, _>(cert)
                        .bind::<BigInt, _>(now)
                        .bind::<Text, _>(&salt)
                        .execute(c)?;
                    diesel::sql_query(POSTGRES_AUDIT)
                        .bind::<BigInt, _>(from)
                        .bind::<BigInt, _>(upto)
                        .bind::<BigInt, _>(now)
                        .bind::<Text, _>(&salt)
                        .execute(c)
                })
            })?;
            c.batch_execute("ANALYZE certificates; ANALYZE audit_log;").map_err(fail)?;
            // The bulk insert leaves gigabytes the server has handed to the kernel but not yet had
            // written, and a WAL-triggered checkpoint spread over the next minute: measured right
            // away, the levels would share the disk with that writeback. A CA's history was not
            // written in the last three minutes, so flush it first, as SQLite's checkpoint does.
            let flushing = Instant::now();
            match c.batch_execute("CHECKPOINT;") {
                Ok(()) => {
                    eprintln!("  prefill flushed to disk (CHECKPOINT) in {:.1} s", flushing.elapsed().as_secs_f64())
                }
                Err(e) => eprintln!(
                    "  prefill: CHECKPOINT refused ({e}); the levels will share the disk with the bulk insert's \
                     writeback (CHECKPOINT needs a superuser or the pg_checkpoint role)"
                ),
            }
        }
    }
    Ok(Prefilled { certificates: n, took: started.elapsed(), bytes: size(db).unwrap_or(0) })
}

/// Rows 1..=n in transactions of [`CHUNK`] (`chunk(from, upto)`, both inclusive), with progress.
fn in_chunks(
    n: i64,
    started: Instant,
    mut chunk: impl FnMut(i64, i64) -> QueryResult<usize>,
) -> Result<(), DrillError> {
    let mut done = 0;
    while done < n {
        let upto = (done + CHUNK).min(n);
        chunk(done + 1, upto).map_err(|e| DrillError::Setup(format!("prefill: {e}")))?;
        done = upto;
        progress(done, n, started);
    }
    Ok(())
}

fn progress(done: i64, n: i64, started: Instant) {
    let rate = done as f64 / started.elapsed().as_secs_f64().max(1e-3);
    let left = (n - done) as f64 / rate.max(1.0);
    eprintln!("  prefilled {done} of {n} certificates ({rate:.0}/s, about {left:.0} s left)");
}

/// The database's size on disk.
pub fn size(db: &DrillDb) -> Option<u64> {
    match db {
        DrillDb::Sqlite(path) => {
            let file = |suffix: &str| std::fs::metadata(format!("{}{suffix}", path.display())).map(|m| m.len()).ok();
            Some(file("")? + file("-wal").unwrap_or(0))
        }
        DrillDb::Postgres { .. } => {
            #[derive(QueryableByName)]
            struct Size {
                #[diesel(sql_type = BigInt)]
                bytes: i64,
            }
            let mut c = PgConnection::establish(&db.url()).ok()?;
            let size: Size =
                diesel::sql_query("SELECT pg_database_size(current_database()) AS bytes").get_result(&mut c).ok()?;
            u64::try_from(size.bytes).ok()
        }
    }
}

const SQLITE_CERTIFICATES: &str = "\
    WITH RECURSIVE n(i) AS (SELECT ?1 UNION ALL SELECT i + 1 FROM n WHERE i < ?2) \
    INSERT INTO certificates (serial, ca_id, profile, client, request_id, state, tbs_der, cert_der, \
                              not_before, not_after, created_at, issued_at) \
    SELECT '01' || printf('%012x', ?5 - 86400000 + i) || lower(hex(randomblob(13))), \
           'ica-p256', 'tls-server-p256', 'prefill', NULL, 'issued', ?3, ?4, \
           ?5 - 86400000 + i, ?5 + 7776000000, ?5 - 86400000 + i, ?5 - 86400000 + i FROM n";

const SQLITE_AUDIT: &str = "\
    WITH RECURSIVE n(i) AS (SELECT ?1 UNION ALL SELECT i + 1 FROM n WHERE i < ?2) \
    INSERT INTO audit_log (at, instance, actor, action, target, outcome, detail, count) \
    SELECT ?3 - 86400000 + i, 'prefill', 'prefill', 'certificate.issue', lower(hex(randomblob(20))), 'issued', \
           'ca=ica-p256 profile=tls-server-p256', 1 FROM n";

const POSTGRES_CERTIFICATES: &str = "\
    INSERT INTO certificates (serial, ca_id, profile, client, request_id, state, tbs_der, cert_der, \
                              not_before, not_after, created_at, issued_at) \
    SELECT '01' || lpad(to_hex($5 - 86400000 + i), 12, '0') \
           || substr(encode(sha256(convert_to($6 || i::text, 'UTF8')), 'hex'), 1, 26), 'ica-p256', \
           'tls-server-p256', 'prefill', NULL, 'issued', $3, $4, \
           $5 - 86400000 + i, $5 + 7776000000, $5 - 86400000 + i, $5 - 86400000 + i \
    FROM generate_series($1::int8, $2::int8) AS i";

const POSTGRES_AUDIT: &str = "\
    INSERT INTO audit_log (at, instance, actor, action, target, outcome, detail, count) \
    SELECT $3 - 86400000 + i, 'prefill', 'prefill', 'certificate.issue', \
           substr(encode(sha256(convert_to($4 || i::text, 'UTF8')), 'hex'), 1, 40), 'issued', \
           'ca=ica-p256 profile=tls-server-p256', 1 \
    FROM generate_series($1::int8, $2::int8) AS i";
