//! The audit log's hash chain, tampered with through SQL as someone with database access would:
//! a row changed, deleted, inserted or reordered, or the tail deleted. `castellum audit verify`
//! names the first row where the chain stops holding; the checkpoint file, outside the database,
//! catches the deleted tail.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use castellum::audit::chain::{self, ChainFault, ChainReport};
use castellum::db::audit::AuditEntry;
use common::*;

/// An engine's audit log with a sealed chain of at least 8 rows (levers, issuances, refusals),
/// on SQLite; the database file and the checkpoint file.
async fn sealed_log(dir: &Path) -> (PathBuf, PathBuf, castellum::config::Config) {
    let db = TestDb::sqlite_file(&dir.join("audit.db"));
    let checkpoints = dir.join("audit-heads.jsonl");
    let mut config = dev_config(&db);
    config.audit.refusal_interval = Duration::from_millis(100);
    config.audit.checkpoint_file = Some(checkpoints.clone());
    let server = TestServer::start(config.clone()).await;
    for enabled in [false, true, false, true] {
        server.engine.set_profile_state("test-operator", "tls-server-p384", enabled).await.unwrap();
    }
    for i in 0..3 {
        let csr = csr(Key::P256, &[&format!("chain{i}.example.test")]);
        assert_eq!(server.issue(DEMO_KEY, "tls-server-p256", &csr).send().await.unwrap().status(), 201);
    }
    let refused = server.issue(DEMO_KEY, "no-such-profile", &csr(Key::P256, &["x.example.test"])).send().await;
    assert_eq!(refused.unwrap().status(), 404);
    // The console shows the chain's head once the writer has sealed (every 100 ms here).
    let started = std::time::Instant::now();
    loop {
        let chains = admin_status(&server).await["audit_chains"].clone();
        if chains.as_array().is_some_and(|c| c.iter().any(|h| h["seq"].as_i64() >= Some(1))) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(5), "no chain head in the admin status: {chains}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.stop().await; // writes and seals what is left, and checkpoints the head
    let sealed = sql::count(&db, "SELECT count(*) AS n FROM audit_log WHERE seq IS NOT NULL");
    assert!(sealed >= 8, "{sealed} sealed rows");
    (dir.join("audit.db"), checkpoints, config)
}

/// A consistent copy of a SQLite database (its WAL included).
fn copy_log(from: &Path, to: &Path) {
    sql::execute(&TestDb::sqlite_file(from), &format!("VACUUM INTO '{}'", to.display()));
}

/// Verify a copy of the log after `tamper` (SQL statements) ran on it.
fn verify_after(original: &Path, config: &castellum::config::Config, tamper: &[&str]) -> ChainReport {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("copy.db");
    copy_log(original, &copy);
    let db = TestDb::sqlite_file(&copy);
    for statement in tamper {
        sql::execute(&db, statement);
    }
    let mut config = config.clone();
    config.database.url = db.url.clone();
    let (reports, note) = chain::verify_configured(&config).unwrap();
    assert_eq!(note, None);
    assert_eq!(reports.len(), 1, "{reports:?}");
    reports.into_iter().next().unwrap()
}

fn id_at(original: &Path, seq: i64) -> i64 {
    sql::count(&TestDb::sqlite_file(original), &format!("SELECT id AS n FROM audit_log WHERE seq = {seq}"))
}

#[actix_rt::test]
async fn every_tampering_is_named_at_its_row() {
    let dir = tempfile::tempdir().unwrap();
    let (db, _, config) = sealed_log(dir.path()).await;
    let total = sql::count(&TestDb::sqlite_file(&db), "SELECT count(*) AS n FROM audit_log");

    let intact = verify_after(&db, &config, &[]);
    assert_eq!((intact.fault.clone(), intact.verified, intact.unsealed), (None, total, 0), "{intact:?}");

    let changed = verify_after(&db, &config, &["UPDATE audit_log SET detail = 'nothing happened' WHERE seq = 3"]);
    assert_eq!(changed.fault, Some(ChainFault::Changed { id: id_at(&db, 3), seq: 3 }));
    assert_eq!(changed.verified, 2, "rows before it still verify");

    let deleted = verify_after(&db, &config, &["DELETE FROM audit_log WHERE seq = 3"]);
    assert_eq!(deleted.fault, Some(ChainFault::Missing { seq: 3, next_id: id_at(&db, 4), next_seq: 4 }));

    // Inserted with a correct-looking link and hash, as someone who knows the algorithm would:
    // the row after it no longer follows.
    let shift = [
        "UPDATE audit_log SET seq = seq + 1000 WHERE seq >= 3",
        "UPDATE audit_log SET seq = seq - 999 WHERE seq >= 1003",
    ];
    let prev: String = sql::texts(&TestDb::sqlite_file(&db), "SELECT hash AS s FROM audit_log WHERE seq = 2").remove(0);
    let forged = chain::ChainRow {
        id: 0,
        at: 1,
        instance: config.instance_id.clone().unwrap(),
        actor: "mallory".into(),
        action: "ca.state".into(),
        target: "ica-p256".into(),
        outcome: "ok".into(),
        detail: "enabled".into(),
        count: 1,
        first_at: None,
        seq: Some(3),
        prev_hash: Some(prev.clone()),
        hash: None,
    };
    let hash = chain::link_hash(&prev, 3, &forged.fields());
    let insert = format!(
        "INSERT INTO audit_log (at, instance, actor, action, target, outcome, detail, count, seq, prev_hash, hash) \
         VALUES (1, '{}', 'mallory', 'ca.state', 'ica-p256', 'ok', 'enabled', 1, 3, '{prev}', '{hash}')",
        forged.instance
    );
    let inserted = verify_after(&db, &config, &[shift[0], shift[1], &insert]);
    assert_eq!(inserted.fault, Some(ChainFault::NotLinked { id: id_at(&db, 3), seq: 4, prev_seq: 3 }));
    assert_eq!(inserted.verified, 3, "the forged row itself links; the next does not");

    let reordered = verify_after(
        &db,
        &config,
        &[
            "UPDATE audit_log SET seq = -4 WHERE seq = 4",
            "UPDATE audit_log SET seq = 4 WHERE seq = 3",
            "UPDATE audit_log SET seq = 3 WHERE seq = -4",
        ],
    );
    assert_eq!(reordered.fault, Some(ChainFault::NotLinked { id: id_at(&db, 4), seq: 3, prev_seq: 2 }));

    // A row placed before the chain's start, where a walk from seq 1 never goes.
    let before = format!(
        "INSERT INTO audit_log (at, instance, actor, action, target, outcome, detail, count, seq, prev_hash, hash) \
         VALUES (1, '{}', 'mallory', 'ca.state', 'ica-p256', 'ok', 'enabled', 1, 0, '{prev}', '{hash}')",
        forged.instance
    );
    let outside = verify_after(&db, &config, &[&before]);
    assert!(matches!(outside.fault, Some(ChainFault::OutsideChain { seq: 0, .. })), "{outside:?}");
}

#[actix_rt::test]
async fn a_deleted_tail_is_caught_by_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let (db, checkpoints, config) = sealed_log(dir.path()).await;
    let head = sql::count(&TestDb::sqlite_file(&db), "SELECT max(seq) AS n FROM audit_log");
    let heads = chain::read_checkpoints(&checkpoints).unwrap();
    assert_eq!(heads.values().next().map(|h| h.seq), Some(head), "the last checkpoint is the head");

    let truncated = verify_after(&db, &config, &[&format!("DELETE FROM audit_log WHERE seq > {}", head - 2)]);
    assert_eq!(truncated.fault, Some(ChainFault::Truncated { seq: head - 2, checkpoint_seq: head }));
    // Without the checkpoint, what is left is a valid chain: that is what the file is for.
    let mut blind = config.clone();
    blind.audit.checkpoint_file = None;
    let dir2 = tempfile::tempdir().unwrap();
    let copy = dir2.path().join("copy.db");
    copy_log(&db, &copy);
    sql::execute(&TestDb::sqlite_file(&copy), &format!("DELETE FROM audit_log WHERE seq > {}", head - 2));
    blind.database.url = format!("sqlite://{}", copy.display());
    let (reports, note) = chain::verify_configured(&blind).unwrap();
    assert!(note.is_some() && reports[0].fault.is_none());
}

#[actix_rt::test]
async fn the_command_line_says_where_the_chain_breaks_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let (db, checkpoints, _) = sealed_log(dir.path()).await;
    let file = dir.path().join("verify.toml");
    let text = dev_config_text().replacen(
        "url = \"sqlite://castellum-dev.db\"",
        &format!("url = \"sqlite://{}\"", db.display()),
        1,
    ) + &format!("\n[audit]\ncheckpoint_file = \"{}\"\n", checkpoints.display());
    std::fs::write(&file, text).unwrap();
    let verify = || {
        let out = Command::new(env!("CARGO_BIN_EXE_castellum"))
            .args(["--config", file.to_str().unwrap(), "audit", "verify"])
            .env_remove("CASTELLUM_CONFIG")
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let (code, out) = verify();
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("rows verified") && out.contains("0 not sealed yet"), "{out}");
    let id = id_at(&db, 5);
    sql::execute(&TestDb::sqlite_file(&db), "UPDATE audit_log SET actor = 'someone else' WHERE seq = 5");
    let (code, out) = verify();
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains(&format!("row {id} (seq 5) was changed")), "{out}");
}

/// The engine verifies its own chain on its own (every `audit.verify_interval`) and the console
/// says when and what it found: a row changed under a running engine is reported.
#[actix_rt::test]
async fn a_running_engine_sees_its_chain_tampered_with() {
    let db = TestDb::sqlite();
    let mut config = dev_config(&db);
    config.audit.refusal_interval = Duration::from_millis(100);
    config.audit.verify_interval = Duration::from_millis(200);
    let server = TestServer::start(config).await;
    for enabled in [false, true, false] {
        server.engine.set_profile_state("test-operator", "tls-server-p384", enabled).await.unwrap();
    }
    let verified = |status: &serde_json::Value| status["audit_verified"].clone();
    let started = std::time::Instant::now();
    loop {
        let v = verified(&admin_status(&server).await);
        if v["verified"].as_i64() >= Some(3) {
            assert!(v["fault"].is_null(), "{v}");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(5), "never verified: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sql::execute(&db, "UPDATE audit_log SET actor = 'someone else' WHERE seq = 2");
    let started = std::time::Instant::now();
    loop {
        let v = verified(&admin_status(&server).await);
        if let Some(fault) = v["fault"].as_str() {
            assert!(fault.contains("(seq 2) was changed"), "{fault}");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(5), "the change was not seen: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.stop().await;
}

/// Sealing on PostgreSQL (one `UPDATE … FROM unnest(…)` per batch; SQLite writes a prepared
/// statement per row): a backlog of two batches and more is sealed in one round, each row
/// linked to the one before in SQL's own reading (seq 1 … n in id order, every `prev_hash` the
/// previous row's `hash`, the first the genesis), the chain verifies, and a row changed through
/// SQL afterwards is named.
#[test]
fn a_backlog_is_sealed_on_postgresql_row_after_row() {
    let db = TestDb::postgres();
    castellum::db::migrate::run(&db.url).expect("migrated");
    let rows = 2 * 250 + 7;
    sql::execute(
        &db,
        &format!(
            "INSERT INTO audit_log (at, instance, actor, action, target, outcome, detail) \
             SELECT n, 'me', 'a', 'ca.state', 't' || n, 'ok', '' FROM generate_series(1, {rows}) AS n"
        ),
    );
    let config = castellum::config::DatabaseConfig { url: db.url.clone(), ..Default::default() };
    let metrics = std::sync::Arc::new(castellum::metrics::Metrics::new());
    let pool = castellum::db::DbPool::build(&config, &Default::default(), "audit", metrics).unwrap();
    let mut conn = pool.get().unwrap();
    let head = chain::seal_backlog(&mut conn, "me").unwrap().expect("a head");
    assert_eq!(head.seq, rows);

    let out_of_order = sql::count(
        &db,
        "SELECT count(*) AS n FROM (SELECT seq, row_number() OVER (ORDER BY id) AS expected FROM audit_log) r \
         WHERE seq IS DISTINCT FROM expected",
    );
    assert_eq!(out_of_order, 0, "seq counts 1 … n in the order the rows were written");
    let unlinked = sql::count(
        &db,
        "SELECT count(*) AS n FROM audit_log a LEFT JOIN audit_log p ON p.seq = a.seq - 1 \
         WHERE a.prev_hash IS DISTINCT FROM COALESCE(p.hash, repeat('0', 64)) OR length(a.hash) <> 64",
    );
    assert_eq!(unlinked, 0, "every row's prev_hash is the hash of the row before it");
    let reports = chain::verify(&mut conn, &Default::default()).unwrap();
    assert_eq!((reports[0].verified, reports[0].unsealed, reports[0].fault.clone()), (rows, 0, None));

    sql::execute(&db, "UPDATE audit_log SET detail = 'rewritten' WHERE seq = 300");
    let reports = chain::verify(&mut conn, &Default::default()).unwrap();
    assert!(
        matches!(reports[0].fault, Some(ChainFault::Changed { seq: 300, .. })),
        "the changed row is named: {:?}",
        reports[0].fault
    );
}

/// Every writer appends audit rows with `db::audit::AppendAudit`, inside its own write
/// transaction, and they are sealed as they are inserted (the head is read under the chain's
/// lock, held to the commit): each instance's rows are linked at once, across transactions,
/// beside an older row left unsealed (a database from before, or PostgreSQL's single-certificate
/// statement), which the writer's seal then puts after them; SQL's own reading of the links and
/// the verification agree, and a row changed afterwards is named.
fn appended_rows_are_chained(db: &TestDb) {
    use castellum::db::audit::{AppendAudit, GENESIS};
    use castellum::db::models::NewAuditRow;
    castellum::db::migrate::run(&db.url).expect("migrated");
    sql::execute(
        db,
        "INSERT INTO audit_log (at, instance, actor, action, target, outcome, detail) \
         VALUES (1, 'me', 'castellum', 'ca.state', 'old', 'ok', 'written before rows were sealed at insert')",
    );
    let row = |instance: &str, target: &str, count: i64| NewAuditRow {
        at: 2,
        instance: instance.into(),
        actor: "demo".into(),
        action: "certificate.issue".into(),
        target: target.into(),
        outcome: "ok".into(),
        detail: format!("{target} of {instance}"),
        count,
        first_at: (count > 1).then_some(1),
    };
    let config = castellum::config::DatabaseConfig { url: db.url.clone(), ..Default::default() };
    let metrics = std::sync::Arc::new(castellum::metrics::Metrics::new());
    let pool = castellum::db::DbPool::build(&config, &Default::default(), "audit", metrics).unwrap();
    let mut conn = pool.get().unwrap();
    let first = [row("me", "a", 1), row("other", "x", 1), row("me", "b", 7), row("me", "c", 1)];
    let second = [row("me", "d", 1), row("me", "e", 1)];
    for rows in [&first[..], &second[..]] {
        castellum::write_transaction!(&mut *conn, |c| c.append_audit(rows).map_err(castellum::error::DbError::from))
            .expect("appended");
    }

    let sealed = |instance: &str| {
        sql::count(
            db,
            &format!("SELECT count(*) AS n FROM audit_log WHERE instance = '{instance}' AND seq IS NOT NULL"),
        )
    };
    assert_eq!((sealed("me"), sealed("other")), (5, 1), "sealed as they were inserted");
    let order = sql::count(
        db,
        "SELECT count(*) AS n FROM audit_log WHERE instance = 'me' AND target IN ('a', 'b', 'c', 'd', 'e') \
         AND seq = (SELECT count(*) FROM audit_log o WHERE o.instance = 'me' AND o.id <= audit_log.id \
                    AND o.target <> 'old')",
    );
    assert_eq!(order, 5, "seq counts 1 … 5 in the order the rows were written");
    let head = chain::seal_backlog(&mut conn, "me").unwrap().expect("a head");
    assert_eq!(head.seq, 6);
    chain::seal_backlog(&mut conn, "other").unwrap().expect("a head");
    let old = sql::count(db, "SELECT seq AS n FROM audit_log WHERE target = 'old'");
    assert_eq!(old, 6, "the older unsealed row goes after the rows sealed at insert");
    let unlinked = sql::count(
        db,
        &format!(
            "SELECT count(*) AS n FROM audit_log a LEFT JOIN audit_log p ON p.instance = a.instance AND p.seq = a.seq - 1 \
             WHERE a.seq IS NULL OR a.prev_hash IS DISTINCT FROM COALESCE(p.hash, '{GENESIS}') OR length(a.hash) <> 64"
        ),
    );
    assert_eq!(unlinked, 0, "every row's prev_hash is the hash of the row before it on its instance's chain");
    let reports = chain::verify(&mut conn, &Default::default()).unwrap();
    let summary: Vec<_> =
        reports.iter().map(|r| (r.instance.as_str(), r.verified, r.unsealed, r.fault.clone())).collect();
    assert_eq!(summary, [("me", 6, 0, None), ("other", 1, 0, None)]);

    // Sealed at insert, `b` is the second link (the writer, sealing in id order, would make it
    // the third).
    let b = sql::count(db, "SELECT seq AS n FROM audit_log WHERE target = 'b'");
    assert_eq!(b, 2);
    sql::execute(db, "UPDATE audit_log SET detail = 'rewritten' WHERE target = 'b'");
    let reports = chain::verify(&mut conn, &Default::default()).unwrap();
    assert!(matches!(reports[0].fault, Some(ChainFault::Changed { seq, .. }) if seq == b), "{:?}", reports[0].fault);
}

#[test]
fn audit_rows_are_sealed_as_they_are_inserted_on_sqlite() {
    appended_rows_are_chained(&TestDb::sqlite());
}

#[test]
fn audit_rows_are_sealed_as_they_are_inserted_on_postgresql() {
    appended_rows_are_chained(&TestDb::postgres());
}

/// A row for the tests below, of instance `me`.
fn audit_row(target: &str) -> castellum::db::models::NewAuditRow {
    castellum::db::models::NewAuditRow {
        at: 2,
        instance: "me".into(),
        actor: "demo".into(),
        action: "certificate.issue".into(),
        target: target.into(),
        outcome: "ok".into(),
        detail: String::new(),
        count: 1,
        first_at: None,
    }
}

/// On PostgreSQL a transaction that appended to a chain holds the chain's lock until it commits;
/// run `during` on another connection of `pool` while the first holds it open for 300 ms. What
/// `during` did is judged by the seq it wrote: without waiting for the lock, it would take the
/// first's seq and fail on the unique `(instance, seq)` index (no timing is asserted, so a slow
/// machine cannot fail it).
fn while_a_transaction_holds_the_chain<T>(
    pool: &castellum::db::DbPool,
    during: impl FnOnce(&mut castellum::db::DbConn) -> T,
) -> T {
    use castellum::db::audit::AppendAudit;
    let (appended_tx, appended) = std::sync::mpsc::channel();
    let first = {
        let pool = pool.clone();
        let rows = [audit_row("first-1"), audit_row("first-2")];
        std::thread::spawn(move || {
            let mut conn = pool.get().unwrap();
            castellum::write_transaction!(&mut *conn, |c| {
                c.append_audit(&rows)?;
                appended_tx.send(()).unwrap();
                std::thread::sleep(std::time::Duration::from_millis(300));
                Ok::<_, castellum::error::DbError>(())
            })
        })
    };
    appended.recv().unwrap();
    let mut conn = pool.get().unwrap();
    let result = during(&mut conn);
    first.join().unwrap().expect("the first append commits");
    result
}

fn pg_pool(db: &TestDb) -> castellum::db::DbPool {
    castellum::db::migrate::run(&db.url).expect("migrated");
    let config = castellum::config::DatabaseConfig { url: db.url.clone(), ..Default::default() };
    let metrics = std::sync::Arc::new(castellum::metrics::Metrics::new());
    castellum::db::DbPool::build(&config, &Default::default(), "issuance", metrics).unwrap()
}

/// On PostgreSQL two transactions append to one chain concurrently (the Store's workers, the
/// registry, the audit writer): while a first holds the chain's lock (until it commits), a
/// second must wait, then read the head after the first's commit and link after its rows
/// instead of taking their seq (which the unique `(instance, seq)` index would refuse, failing
/// its whole batch).
#[test]
fn concurrent_appends_on_postgresql_link_one_after_the_other() {
    concurrent_appends_link_one_after_the_other(TestDb::postgres());
}

/// The same on a server whose transactions default to REPEATABLE READ: there a transaction's
/// snapshot is taken by its first statement, before the lock is granted, and the head read after
/// it would miss the first's rows. The engine's connections set READ COMMITTED for themselves.
#[test]
fn concurrent_appends_link_one_after_the_other_on_a_server_that_defaults_to_repeatable_read() {
    let db = TestDb::postgres();
    let name = sql::texts(&db, "SELECT current_database() AS s").remove(0);
    sql::execute(&db, &format!("ALTER DATABASE \"{name}\" SET default_transaction_isolation = 'repeatable read'"));
    concurrent_appends_link_one_after_the_other(db);
}

fn concurrent_appends_link_one_after_the_other(db: TestDb) {
    use castellum::db::audit::AppendAudit;
    let pool = pg_pool(&db);
    let second = while_a_transaction_holds_the_chain(&pool, |conn| {
        let rows = [audit_row("second")];
        castellum::write_transaction!(conn, |c| c.append_audit(&rows).map_err(castellum::error::DbError::from))
    });
    second.expect("the second append waits for the first and links after it");
    let second_seq = sql::count(&db, "SELECT seq AS n FROM audit_log WHERE target = 'second'");
    assert_eq!(second_seq, 3, "after the first transaction's two rows");
    let mut conn = pool.get().unwrap();
    let reports = chain::verify(&mut conn, &Default::default()).unwrap();
    assert_eq!((reports[0].verified, reports[0].unsealed, reports[0].fault.clone()), (3, 0, None));
}

/// The writer's seal waits for the chain: while a first transaction holds it, the seal of an
/// older unsealed row waits for that commit, then reads the head in a statement of its own
/// (one that started before the commit would not see the first's rows) and links the row after
/// them, instead of taking their seq.
#[test]
fn the_writers_seal_on_postgresql_waits_for_the_chain_and_links_after_its_holder() {
    let db = TestDb::postgres();
    let pool = pg_pool(&db);
    sql::execute(
        &db,
        "INSERT INTO audit_log (at, instance, actor, action, target, outcome, detail) \
         VALUES (1, 'me', 'castellum', 'ca.state', 'older', 'ok', '')",
    );
    let sealed = while_a_transaction_holds_the_chain(&pool, |conn| chain::seal(conn, "me"));
    let (count, head) = sealed.expect("the seal commits");
    assert_eq!((count, head.map(|h| h.seq)), (1, Some(3)));
    let older_seq = sql::count(&db, "SELECT seq AS n FROM audit_log WHERE target = 'older'");
    assert_eq!(older_seq, 3, "after the first transaction's two rows");
    let mut conn = pool.get().unwrap();
    let reports = chain::verify(&mut conn, &Default::default()).unwrap();
    assert_eq!((reports[0].verified, reports[0].unsealed, reports[0].fault.clone()), (3, 0, None));
}

/// A chain whose head has no valid hash (here seq 5 with its hash erased, the rows before it
/// gone) is extended by neither path: rows appended stay unsealed, and the writer's seal refuses
/// instead of starting the chain again at seq 1 beside it.
fn a_head_without_a_valid_hash_is_not_extended(db: TestDb) {
    use castellum::db::audit::AppendAudit;
    use castellum::db::models::NewAuditRow;
    castellum::db::migrate::run(&db.url).expect("migrated");
    sql::execute(
        &db,
        "INSERT INTO audit_log (at, instance, actor, action, target, outcome, detail, seq, prev_hash) \
         VALUES (1, 'me', 'a', 'ca.state', 'head', 'ok', '', 5, NULL)",
    );
    let config = castellum::config::DatabaseConfig { url: db.url.clone(), ..Default::default() };
    let metrics = std::sync::Arc::new(castellum::metrics::Metrics::new());
    let pool = castellum::db::DbPool::build(&config, &Default::default(), "audit", metrics).unwrap();
    let mut conn = pool.get().unwrap();
    let row = NewAuditRow {
        at: 2,
        instance: "me".into(),
        actor: "demo".into(),
        action: "certificate.issue".into(),
        target: "new".into(),
        outcome: "ok".into(),
        detail: String::new(),
        count: 1,
        first_at: None,
    };
    castellum::write_transaction!(&mut *conn, |c| c
        .append_audit(std::slice::from_ref(&row))
        .map_err(castellum::error::DbError::from))
    .expect("appended");
    assert!(chain::seal(&mut conn, "me").is_err(), "the seal refuses the head");
    let unsealed = sql::count(&db, "SELECT count(*) AS n FROM audit_log WHERE target = 'new' AND seq IS NULL");
    assert_eq!(unsealed, 1, "the new row stays unsealed behind the broken head");
}

#[test]
fn a_head_without_a_valid_hash_is_extended_by_neither_the_append_nor_the_seal_on_sqlite() {
    a_head_without_a_valid_hash_is_not_extended(TestDb::sqlite());
}

#[test]
fn a_head_without_a_valid_hash_is_extended_by_neither_the_append_nor_the_seal_on_postgresql() {
    a_head_without_a_valid_hash_is_not_extended(TestDb::postgres());
}
