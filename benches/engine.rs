//! In-process costs of the engine's plumbing (`cargo bench --bench engine`): one issuance through
//! the actors (intake → cell → signer → store → reply) on SQLite, one message round trip to the
//! cells, and one Store batch (group commit) of 64 write-ahead records.

mod common;

use std::path::Path;

use castellum::db::models::CertificateRow;
use castellum::db::queries;
use castellum::db::writes::WriteOp;
use castellum::{Config, Engine, IssueRequest};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};

fn write_ahead_rows(n: usize) -> Vec<WriteOp> {
    (0..n)
        .map(|_| {
            WriteOp::WriteAhead(Box::new(CertificateRow {
                serial: hex::encode(castellum::pki::tbs::new_serial()),
                ca_id: "ica-p256".into(),
                profile: "tls-server-p256".into(),
                client: "demo".into(),
                request_id: None,
                state: castellum::states::CertState::Signing,
                tbs_der: vec![0x30; 400],
                cert_der: None,
                not_before: 0,
                not_after: 0,
                created_at: 0,
                issued_at: None,
                revoked_at: None,
                revocation_reason: None,
                crl_shard: None,
            }))
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = Config::load(Some(Path::new("keys-dev/castellum.toml"))).expect("dev config");
    config.database.url = format!("sqlite://{}", dir.path().join("bench.db").display());
    config.admin.listen = String::new();
    let system = actix_rt::System::new();
    let engine = system.block_on(Engine::start(config)).expect("engine");
    let client = engine.client("demo").expect("demo client");
    let request = IssueRequest { profile: "tls-server-p256".into(), csr_pem: common::p256_csr(), ..Default::default() };

    c.bench_function("issue in-process: intake → cell → signer → store (SQLite, durable)", |b| {
        b.iter(|| system.block_on(engine.issue(&client, request.clone())).expect("issued"))
    });
    c.bench_function("message round trip to the 4 CA cells", |b| b.iter(|| system.block_on(engine.cell_status())));

    let pool = engine.pools().issuance.clone();
    c.bench_function("store group commit: 64 write-ahead records (SQLite, synchronous=FULL)", |b| {
        b.iter_batched(
            || write_ahead_rows(64),
            |ops| {
                let mut conn = pool.get().expect("connection");
                queries::apply_batch(&mut conn, &ops).expect("committed")
            },
            BatchSize::SmallInput,
        )
    });
    system.block_on(engine.shutdown());
}

criterion_group!(benches, bench);
criterion_main!(benches);
