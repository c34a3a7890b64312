//! What one of the Store's batches writes, read back column by column with plain SQL on both
//! backends. Each backend writes a batch its own way (SQLite: a prepared statement per row;
//! PostgreSQL: each column bound as an array and unnested by one statement), so a column bound
//! to the wrong array, a NULL lost or rows reordered is seen here, not in a certificate served
//! later.

mod common;

use castellum::db::models::{CertificateRow, NewAuditEvent};
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
    #[diesel(sql_type = Nullable<Integer>)]
    crl_shard: Option<i32>,
}

#[derive(Debug, PartialEq, QueryableByName)]
struct AuditRead {
    #[diesel(sql_type = Text)]
    target: String,
    #[diesel(sql_type = Text)]
    detail: String,
    #[diesel(sql_type = BigInt)]
    at: i64,
}

/// Six write-ahead records in one batch (with and without a request, shards 0–2), then four of
/// them issued (the joined statement on PostgreSQL) and one abandoned in the next.
fn a_batch_reads_back_as_written(db: &TestDb) {
    castellum::db::migrate::run(&db.url).expect("migrated");
    let config = castellum::config::DatabaseConfig { url: db.url.clone(), ..Default::default() };
    let metrics = std::sync::Arc::new(castellum::metrics::Metrics::new());
    let pool = castellum::db::DbPool::build(&config, &Default::default(), "issuance", metrics).unwrap();
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
            issued_at: None,
            revoked_at: None,
            revocation_reason: None,
            crl_shard: Some((i % 3) as i32),
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

    let stored: Vec<Stored> = sql::rows(
        db,
        "SELECT serial, ca_id, profile, client, request_id, state, tbs_der, cert_der, not_before, not_after, \
         created_at, issued_at, crl_shard FROM certificates ORDER BY serial",
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
            tbs_der: row.tbs_der.clone(),
            cert_der: (i < 4).then(|| vec![0x30, 0x82, i as u8]),
            not_before: row.not_before,
            not_after: row.not_after,
            created_at: row.created_at,
            issued_at: (i < 4).then_some(4_000 + i as i64),
            crl_shard: row.crl_shard,
        })
        .collect();
    assert_eq!(stored, expected);

    let audit: Vec<AuditRead> = sql::rows(db, "SELECT target, detail, at FROM audit_log ORDER BY id");
    let expected: Vec<AuditRead> = (0..4i64)
        .map(|i| AuditRead { target: format!("01{i:02}"), detail: format!("profile-{i}"), at: 4_000 + i })
        .collect();
    assert_eq!(audit, expected, "one audit row per certificate, in the batch's order");
}

#[test]
fn a_batch_reads_back_as_written_on_sqlite() {
    a_batch_reads_back_as_written(&TestDb::sqlite());
}

#[test]
fn a_batch_reads_back_as_written_on_postgresql() {
    a_batch_reads_back_as_written(&TestDb::postgres());
}
