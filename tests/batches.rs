//! What one of the Store's batches writes, read back column by column with plain SQL on both
//! backends. Each backend writes a batch its own way (SQLite: a prepared statement per row;
//! PostgreSQL: each column bound as an array and unnested by one statement), so a column bound
//! to the wrong array, a NULL lost or rows reordered is seen here, not in a certificate served
//! later.

mod common;

use castellum::db::audit::AppendAudit;
use castellum::db::models::{CertificateRow, NewAuditEvent, NewAuditRow};
use castellum::db::queries::apply_batch;
use castellum::db::writes::{WriteOp, WriteOutcome};
use castellum::states::CertState;
use common::*;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Binary, Integer, Nullable, Text};

#[derive(Debug, PartialEq, QueryableByName)]
struct Stored {
    #[diesel(sql_type = Text)]
    serial: String,
    #[diesel(sql_type = Text)]
    ca_id: String,
    #[diesel(sql_type = Text)]
    profile: String,
    #[diesel(sql_type = Text)]
    client: String,
    #[diesel(sql_type = Nullable<Text>)]
    request_id: Option<String>,
    #[diesel(sql_type = Text)]
    state: String,
    #[diesel(sql_type = Binary)]
    tbs_der: Vec<u8>,
    #[diesel(sql_type = Nullable<Binary>)]
    cert_der: Option<Vec<u8>>,
    #[diesel(sql_type = BigInt)]
    not_before: i64,
    #[diesel(sql_type = BigInt)]
    not_after: i64,
    #[diesel(sql_type = BigInt)]
    created_at: i64,
    #[diesel(sql_type = Nullable<BigInt>)]
    issued_at: Option<i64>,
    #[diesel(sql_type = Nullable<BigInt>)]
    revoked_at: Option<i64>,
    #[diesel(sql_type = Nullable<Integer>)]
    revocation_reason: Option<i32>,
    #[diesel(sql_type = Nullable<Integer>)]
    crl_shard: Option<i32>,
}

#[derive(Debug, PartialEq, QueryableByName)]
struct AuditRead {
    #[diesel(sql_type = BigInt)]
    at: i64,
    #[diesel(sql_type = Text)]
    instance: String,
    #[diesel(sql_type = Text)]
    actor: String,
    #[diesel(sql_type = Text)]
    action: String,
    #[diesel(sql_type = Text)]
    target: String,
    #[diesel(sql_type = Text)]
    outcome: String,
    #[diesel(sql_type = Text)]
    detail: String,
    #[diesel(sql_type = BigInt)]
    count: i64,
    #[diesel(sql_type = Nullable<BigInt>)]
    first_at: Option<i64>,
}

/// An issuance pool of `connections` on `db`, migrated.
fn issuance_pool(db: &TestDb, connections: u32) -> castellum::db::DbPool {
    castellum::db::migrate::run(&db.url).expect("migrated");
    let config = castellum::config::DatabaseConfig { url: db.url.clone(), ..Default::default() };
    let metrics = std::sync::Arc::new(castellum::metrics::Metrics::new());
    let pool = castellum::config::PoolConfig { max_size: connections, ..Default::default() };
    castellum::db::DbPool::build(&config, &pool, "issuance", metrics).unwrap()
}

/// `$check` run as two tests, one per backend.
macro_rules! on_both_backends {
    ($check:ident: $on_sqlite:ident, $on_postgresql:ident) => {
        #[test]
        fn $on_sqlite() {
            $check(&TestDb::sqlite());
        }

        #[test]
        fn $on_postgresql() {
            $check(&TestDb::postgres());
        }
    };
}

/// Six write-ahead records in one batch (with and without a request, shards 0–2, every nullable
/// column both NULL and not), then four of them issued (the joined statement on PostgreSQL) with
/// their audit rows and one abandoned in the next, then refusal tallies appended as the audit
/// writer appends them (a count and a first time).
fn a_batch_reads_back_as_written(db: &TestDb) {
    let pool = issuance_pool(db, 10);
    let mut conn = pool.get().unwrap();

    let ahead: Vec<CertificateRow> = (0..6i64)
        .map(|i| CertificateRow {
            serial: format!("01{i:02}"),
            ca_id: format!("ca-{}", i % 2),
            profile: format!("profile-{i}"),
            client: format!("client-{i}"),
            request_id: (i % 2 == 0).then(|| format!("request-{i}")),
            state: CertState::Signing,
            tbs_der: vec![0x30, i as u8, 0xA0 + i as u8],
            cert_der: None,
            not_before: 1_000 + i,
            not_after: 2_000 + i,
            created_at: 3_000 + i,
            issued_at: (i == 5).then_some(4_500),
            revoked_at: (i % 2 == 1).then_some(5_000 + i),
            revocation_reason: (i % 2 == 1).then_some(i as i32),
            crl_shard: (i != 5).then_some((i % 3) as i32),
        })
        .collect();
    let ops: Vec<WriteOp> = ahead.iter().cloned().map(|row| WriteOp::WriteAhead(Box::new(row))).collect();
    assert!(apply_batch(&mut conn, &ops).unwrap().iter().all(|o| matches!(o, WriteOutcome::Done)));

    let mut ops: Vec<WriteOp> = (0..4i64)
        .map(|i| WriteOp::CertificateIssued {
            serial: format!("01{i:02}"),
            cert_der: vec![0x30, 0x82, i as u8],
            at: 4_000 + i,
            request_id: None,
            audit: Box::new(NewAuditEvent {
                at: 4_000 + i,
                instance: "me".into(),
                actor: format!("client-{i}"),
                action: "certificate.issue".into(),
                target: format!("01{i:02}"),
                outcome: "ok".into(),
                detail: format!("profile-{i}"),
            }),
            identity: None,
        })
        .collect();
    ops.push(WriteOp::CertificateAbandoned { serial: "0104".into() });
    apply_batch(&mut conn, &ops).unwrap();

    let tallies: Vec<NewAuditRow> = (0..2i64)
        .map(|i| NewAuditRow {
            at: 6_000 + i,
            instance: "me".into(),
            actor: format!("client-{i}"),
            action: "certificate.issue".into(),
            target: format!("profile-{i}"),
            outcome: "breaker-open".into(),
            detail: String::new(),
            count: 7 + i,
            first_at: Some(5_500 + i),
        })
        .collect();
    castellum::write_transaction!(&mut *conn, |c| c.append_audit(&tallies).map_err(castellum::error::DbError::from))
        .expect("appended");

    let stored: Vec<Stored> = sql::rows(
        db,
        "SELECT serial, ca_id, profile, client, request_id, state, tbs_der, cert_der, not_before, not_after, \
         created_at, issued_at, revoked_at, revocation_reason, crl_shard FROM certificates ORDER BY serial",
    );
    let expected: Vec<Stored> = ahead
        .iter()
        .enumerate()
        .map(|(i, row)| Stored {
            serial: row.serial.clone(),
            ca_id: row.ca_id.clone(),
            profile: row.profile.clone(),
            client: row.client.clone(),
            request_id: row.request_id.clone(),
            state: match i {
                0..=3 => "issued",
                4 => "abandoned",
                _ => "signing",
            }
            .into(),
            // An issued record's TBS is inside its certificate, and no longer beside it.
            tbs_der: if i < 4 { Vec::new() } else { row.tbs_der.clone() },
            cert_der: (i < 4).then(|| vec![0x30, 0x82, i as u8]),
            not_before: row.not_before,
            not_after: row.not_after,
            created_at: row.created_at,
            issued_at: if i < 4 { Some(4_000 + i as i64) } else { row.issued_at },
            revoked_at: row.revoked_at,
            revocation_reason: row.revocation_reason,
            crl_shard: row.crl_shard,
        })
        .collect();
    assert_eq!(stored, expected);

    let audit: Vec<AuditRead> = sql::rows(
        db,
        "SELECT at, instance, actor, action, target, outcome, detail, count, first_at FROM audit_log ORDER BY id",
    );
    let issued = (0..4i64).map(|i| AuditRead {
        at: 4_000 + i,
        instance: "me".into(),
        actor: format!("client-{i}"),
        action: "certificate.issue".into(),
        target: format!("01{i:02}"),
        outcome: "ok".into(),
        detail: format!("profile-{i}"),
        count: 1,
        first_at: None,
    });
    let tallied = tallies.iter().map(|t| AuditRead {
        at: t.at,
        instance: t.instance.clone(),
        actor: t.actor.clone(),
        action: t.action.clone(),
        target: t.target.clone(),
        outcome: t.outcome.clone(),
        detail: t.detail.clone(),
        count: t.count,
        first_at: t.first_at,
    });
    let expected: Vec<AuditRead> = issued.chain(tallied).collect();
    assert_eq!(audit, expected, "every audit row as written, in the order written");
}

on_both_backends!(a_batch_reads_back_as_written: a_batch_reads_back_as_written_on_sqlite, a_batch_reads_back_as_written_on_postgresql);

/// On PostgreSQL the batch's inserts are kept prepared, and its joins against a table are planned
/// on every run: a join kept prepared gets a generic plan made from the table's size when the
/// connection first ran it, and one made while the table was small (a hash join over a
/// sequential scan) stayed as the table grew (PostgreSQL's CPU per issuance rose sevenfold
/// within a benchmark). Judged by the server's own list of the connection's prepared statements.
#[test]
fn postgresql_keeps_the_inserts_prepared_and_plans_the_joins_on_every_run() {
    let db = TestDb::postgres();
    let pool = issuance_pool(&db, 1);
    let mut conn = pool.get().unwrap();
    for round in 0..8i64 {
        let serials: Vec<String> = (0..3).map(|i| format!("01{round:02}{i:02}")).collect();
        let ahead: Vec<WriteOp> = serials.iter().map(|serial| write_ahead(serial)).collect();
        apply_batch(&mut conn, &ahead).unwrap();
        let signed: Vec<WriteOp> = serials.iter().map(|serial| issued(serial, 4)).collect();
        apply_batch(&mut conn, &signed).unwrap();
        // A certificate alone: its record and its audit row in one statement.
        let alone = format!("02{round:02}");
        apply_batch(&mut conn, &[write_ahead(&alone)]).unwrap();
        apply_batch(&mut conn, &[issued(&alone, 4)]).unwrap();
        // An audit writer's tally, appended in a transaction of its own.
        let tally = NewAuditRow {
            at: 5,
            instance: "me".into(),
            actor: "client".into(),
            action: "certificate.issue".into(),
            target: "profile".into(),
            outcome: "breaker-open".into(),
            detail: String::new(),
            count: 2,
            first_at: Some(4),
        };
        castellum::write_transaction!(&mut *conn, |c| c
            .append_audit(std::slice::from_ref(&tally))
            .map_err(castellum::error::DbError::from))
        .expect("appended");
    }
    let mut prepared = |pattern: &str| -> i64 {
        let sql = format!("(SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE '{pattern}')");
        castellum::with_conn!(&mut *conn, |c| diesel::select(diesel::dsl::sql::<BigInt>(&sql)).get_result::<i64>(c))
            .unwrap()
    };
    assert_eq!(prepared("INSERT INTO certificates %unnest%"), 1, "the write-ahead insert is kept prepared");
    assert_eq!(prepared("INSERT INTO audit_log %unnest%"), 1, "the audit insert is kept prepared");
    assert_eq!(prepared("UPDATE certificates %unnest%"), 0, "the mark-issued join is planned on every run");
    assert_eq!(
        prepared("WITH issued AS (UPDATE certificates % WHERE serial = $5) INSERT INTO audit_log %"),
        1,
        "a certificate alone, updated by its serial, is kept prepared with its audit row's insert"
    );
    let issued = sql::count(&db, "SELECT count(*) AS n FROM certificates WHERE state = 'issued'");
    assert_eq!(issued, 32);
    // Both statements clear the TBS the certificate now holds (the join's 24, the single ones' 8).
    let beside =
        sql::count(&db, "SELECT count(*) AS n FROM certificates WHERE state = 'issued' AND length(tbs_der) > 0");
    assert_eq!(beside, 0, "issued records keep no TBS beside their certificate");
}

fn write_ahead(serial: &str) -> WriteOp {
    WriteOp::WriteAhead(Box::new(CertificateRow {
        serial: serial.into(),
        ca_id: "ca".into(),
        profile: "profile".into(),
        client: "client".into(),
        request_id: None,
        state: CertState::Signing,
        tbs_der: vec![0x30, serial.len() as u8],
        cert_der: None,
        not_before: 1,
        not_after: 2,
        created_at: 3,
        issued_at: None,
        revoked_at: None,
        revocation_reason: None,
        crl_shard: Some(1),
    }))
}

fn event(target: &str, at: i64) -> NewAuditEvent {
    NewAuditEvent {
        at,
        instance: "me".into(),
        actor: "client".into(),
        action: "certificate.issue".into(),
        target: target.into(),
        outcome: "ok".into(),
        detail: "profile".into(),
    }
}

fn issued(serial: &str, at: i64) -> WriteOp {
    WriteOp::CertificateIssued {
        serial: serial.into(),
        cert_der: vec![0x30, 0x82, at as u8],
        at,
        request_id: None,
        audit: Box::new(event(serial, at)),
        identity: None,
    }
}

/// What the Store writes in one statement on PostgreSQL (write-ahead records alone; one signed
/// certificate with its audit row) and in a transaction (anything else) is written whole or not
/// at all: a batch with a write-ahead record whose serial is stored already writes none of its
/// rows; then one certificate, then a batch mixing every kind, are written row for row.
fn batches_are_written_whole_or_not_at_all(db: &TestDb) {
    let pool = issuance_pool(db, 10);
    let mut conn = pool.get().unwrap();
    apply_batch(&mut conn, &[write_ahead("0101"), write_ahead("0102")]).unwrap();
    let certificates = |db: &TestDb| {
        sql::rows::<Stored>(
            db,
            "SELECT serial, ca_id, profile, client, request_id, state, tbs_der, cert_der, not_before, not_after, \
             created_at, issued_at, revoked_at, revocation_reason, crl_shard FROM certificates ORDER BY serial",
        )
        .into_iter()
        .map(|row| (row.serial, row.state, !row.tbs_der.is_empty(), row.cert_der, row.issued_at))
        .collect::<Vec<_>>()
    };
    // A signing record keeps its TBS; an issued one keeps only its certificate (on PostgreSQL a
    // certificate in a transaction goes through the per-row statement, alone through the WITH).
    let signing = |serial: &str| (serial.to_string(), "signing".to_string(), true, None, None);
    let issued_as = |serial: &str, at: i64| {
        (serial.to_string(), "issued".to_string(), false, Some(vec![0x30, 0x82, at as u8]), Some(at))
    };
    let audit = |db: &TestDb| -> Vec<(String, i64)> {
        sql::rows::<AuditRead>(
            db,
            "SELECT at, instance, actor, action, target, outcome, detail, count, first_at FROM audit_log ORDER BY id",
        )
        .into_iter()
        .map(|row| (row.target, row.at))
        .collect()
    };

    for clashing in [
        vec![write_ahead("0103"), write_ahead("0102")],
        vec![write_ahead("0103"), issued("0101", 10), WriteOp::Audit(event("lever", 11)), write_ahead("0102")],
    ] {
        assert!(apply_batch(&mut conn, &clashing).is_err(), "0102 is stored already");
        assert_eq!(certificates(db), [signing("0101"), signing("0102")], "nothing of the failed batch is written");
        assert!(audit(db).is_empty(), "nor its audit rows");
    }

    // One certificate whose audit row the database refuses: its record stays as it was (on
    // PostgreSQL the update and the insert are one statement).
    let refuse = match db.postgres {
        true => "ALTER TABLE audit_log ADD CONSTRAINT refuse_boom CHECK (target <> 'boom')",
        false => {
            "CREATE TRIGGER refuse_boom BEFORE INSERT ON audit_log WHEN NEW.target = 'boom' \
                  BEGIN SELECT RAISE(ABORT, 'refused'); END"
        }
    };
    sql::execute(db, refuse);
    apply_batch(&mut conn, &[write_ahead("boom")]).unwrap();
    assert!(apply_batch(&mut conn, &[issued("boom", 15)]).is_err(), "its audit row is refused");
    assert_eq!(certificates(db)[2], signing("boom"), "so its record is not marked issued");
    sql::execute(db, "DELETE FROM certificates WHERE serial = 'boom'");

    let outcomes = apply_batch(&mut conn, &[issued("0101", 20)]).unwrap();
    assert!(matches!(outcomes[..], [WriteOutcome::Done]));
    assert_eq!(certificates(db), [issued_as("0101", 20), signing("0102")]);
    assert_eq!(audit(db), [("0101".to_string(), 20)]);

    let batch = [write_ahead("0103"), WriteOp::Audit(event("lever", 21)), issued("0102", 22), write_ahead("0104")];
    let outcomes = apply_batch(&mut conn, &batch).unwrap();
    assert_eq!(outcomes.len(), 4);
    assert!(outcomes.iter().all(|o| matches!(o, WriteOutcome::Done)));
    assert_eq!(certificates(db), [issued_as("0101", 20), issued_as("0102", 22), signing("0103"), signing("0104")]);
    assert_eq!(
        audit(db),
        [("0101".to_string(), 20), ("lever".into(), 21), ("0102".into(), 22)],
        "in the order written"
    );
}

on_both_backends!(
    batches_are_written_whole_or_not_at_all:
        batches_are_written_whole_or_not_at_all_on_sqlite,
        batches_are_written_whole_or_not_at_all_on_postgresql
);
