//! Idempotency keys and durable asynchronous requests.

mod common;

use std::time::{Duration, Instant};

use common::*;

async fn concurrent_retries_issue_once(db: TestDb) {
    let server = TestServer::start(dev_config(&db)).await;
    let csr = csr(Key::P256, &["idem.example.test"]);
    let send = || server.issue(DEMO_KEY, "tls-server-p256", &csr).header("idempotency-key", "order-42").send();
    let (a, b) = tokio::join!(send(), send());
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!((a.status().as_u16(), b.status().as_u16()), (201, 201));
    let a: serde_json::Value = a.json().await.unwrap();
    let b: serde_json::Value = b.json().await.unwrap();
    assert_eq!(a["serial"], b["serial"], "both attempts answer with the one certificate");
    // A later retry replays it as well.
    let c: serde_json::Value = send().await.unwrap().json().await.unwrap();
    assert_eq!(a["serial"], c["serial"]);
    assert_eq!(counts(&db).0, 1, "exactly one certificate was issued");

    // The same key with another body is refused and changes nothing.
    let other = server
        .issue(DEMO_KEY, "tls-server-p256", &common::csr(Key::P256, &["other.example.test"]))
        .header("idempotency-key", "order-42")
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 422);
    let problem: serde_json::Value = other.json().await.unwrap();
    assert_eq!(problem["type"], "urn:castellum:problem:idempotency-key-reuse");
    assert_eq!(counts(&db).0, 1);
    // Keys are per client: another client's identical key is its own request.
    let mine = server
        .issue(OTHER_KEY, "tls-server-p256", &common::csr(Key::P256, &["o.other.example.test"]))
        .header("idempotency-key", "order-42")
        .send()
        .await
        .unwrap();
    assert_eq!(mine.status(), 201);
    server.stop().await;
}

#[actix_rt::test]
async fn sqlite_concurrent_retries_issue_once() {
    concurrent_retries_issue_once(TestDb::sqlite()).await;
}

#[actix_rt::test]
async fn postgres_concurrent_retries_issue_once() {
    concurrent_retries_issue_once(TestDb::postgres()).await;
}

async fn async_request_is_issued(db: TestDb) {
    let server = TestServer::start(dev_config(&db)).await;
    let resp = server
        .issue(DEMO_KEY, "ocsp-renewal", &csr(Key::P256, &["ocsp1.example.test"]))
        .header("prefer", "respond-async")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let location = resp.headers()["location"].to_str().unwrap().to_string();
    let body: serde_json::Value = resp.json().await.unwrap();
    let id = body["request_id"].as_str().unwrap();
    assert_eq!(location, format!("/v1/requests/{id}"));
    let done = wait_for_request(&server.http, &server.base, id, Duration::from_secs(10)).await;
    assert_eq!(done["state"], "issued", "{done}");
    assert!(done["certificate"]["certificate"].as_str().unwrap().contains("BEGIN CERTIFICATE"));
    // Only its client sees it.
    let other = server.http.get(server.url(&location)).bearer_auth(OTHER_KEY).send().await.unwrap();
    assert_eq!(other.status(), 404);
    server.stop().await;
}

#[actix_rt::test]
async fn sqlite_async_request_is_issued() {
    async_request_is_issued(TestDb::sqlite()).await;
}

#[actix_rt::test]
async fn postgres_async_request_is_issued() {
    async_request_is_issued(TestDb::postgres()).await;
}

/// A `202` request survives the engine being killed before it signs: another engine on the same
/// database takes it up and issues it.
async fn accepted_request_survives_a_crash(db: TestDb) {
    let dir = tempfile::tempdir().unwrap();
    // The first engine's ica-p256 signer is slow (fault injection, dev mode): it cannot finish
    // before it is killed.
    let slow = dev_config_text().replacen(
        "signer_threads = 2\nexpected_sign_rate = 4000.0",
        "signer_threads = 2\nexpected_sign_rate = 4000.0\n[cas.fault]\nsign_latency = \"60s\"",
        1,
    );
    assert!(slow.contains("sign_latency"));
    let config_path = dir.path().join("slow.toml");
    std::fs::write(&config_path, &slow).unwrap();
    let env = [
        ("CASTELLUM_DATABASE__URL", db.url.as_str()),
        ("CASTELLUM_INSTANCE_ID", "crashing-instance"),
        ("CASTELLUM_ASYNC_REQUESTS__LEASE", "2s"),
    ];
    let mut engine =
        EngineProcess::start(&config_path, &env, std::process::Stdio::null(), std::process::Stdio::null()).await;
    let (http, base) = (reqwest::Client::new(), engine.base.clone());
    let resp = http
        .post(format!("{base}/v1/certificates"))
        .bearer_auth(DEMO_KEY)
        .header("prefer", "respond-async")
        .json(&serde_json::json!({ "profile": "ocsp-renewal", "csr": csr(Key::P256, &["crash.example.test"]) }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let id = resp.json::<serde_json::Value>().await.unwrap()["request_id"].as_str().unwrap().to_string();
    tokio::time::sleep(Duration::from_millis(300)).await;
    engine.kill();
    let row = sql::request(&db, &id).expect("request stored before 202");
    assert_eq!(row.state, "pending", "the killed engine had not issued it");
    assert_eq!(row.claimed_by.as_deref(), Some("crashing-instance"));

    let mut config = dev_config(&db);
    config.async_requests.resume_interval = Duration::from_millis(200);
    let server = TestServer::start(config).await;
    let done = wait_for_request(&server.http, &server.base, &id, Duration::from_secs(15)).await;
    assert_eq!(done["state"], "issued", "{done}");
    server.stop().await;
}

#[actix_rt::test]
async fn sqlite_accepted_request_survives_a_crash() {
    accepted_request_survives_a_crash(TestDb::sqlite()).await;
}

#[actix_rt::test]
async fn postgres_accepted_request_survives_a_crash() {
    accepted_request_survives_a_crash(TestDb::postgres()).await;
}

/// A write-ahead record a crash left in `signing`, older than any deadline, is marked abandoned
/// (it can never be signed); a recent one is left alone.
#[actix_rt::test]
async fn write_ahead_records_orphaned_by_a_crash_are_abandoned() {
    let db = TestDb::sqlite();
    let mut config = dev_config(&db);
    config.async_requests.resume_interval = Duration::from_millis(100);
    let engine = castellum::Engine::start(config).await.unwrap();
    // Written and read with raw SQL, as a crash would have left them.
    let row = |serial: &str, created_at: i64| {
        format!(
            "INSERT INTO certificates (serial, ca_id, profile, client, state, tbs_der, not_before, not_after, created_at) \
             VALUES ('{serial}', 'ica-p256', 'tls-server-p256', 'demo', 'signing', X'3000', 0, 0, {created_at})"
        )
    };
    let now = castellum::pki::now_ms();
    sql::execute(&db, &row("0a", now - 3_600_000));
    sql::execute(&db, &row("0b", now));
    let started = Instant::now();
    loop {
        let old = sql::certificate(&db, "0a").expect("stored");
        if old.state == "abandoned" {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(5), "the orphan was not swept");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let recent = sql::certificate(&db, "0b").expect("stored");
    assert_eq!(recent.state, "signing", "a recent write-ahead record may still be signed");
    engine.shutdown().await;
}

/// A burst of concurrent issuances is committed in group batches (on PostgreSQL, batches of
/// three certificates or more in one joined statement): every certificate answered is stored as
/// issued, byte for byte, and nothing else is.
async fn a_burst_is_stored_exactly_as_answered(db: TestDb) {
    let server = TestServer::start(dev_config(&db)).await;
    let csrs: Vec<String> = (0..48).map(|i| csr(Key::P256, &[&format!("burst-{i}.example.test")])).collect();
    let calls = csrs.iter().map(|csr| server.issue(DEMO_KEY, "tls-server-p256", csr).send());
    let mut answered = Vec::new();
    for response in futures_util::future::join_all(calls).await {
        let response = response.unwrap();
        assert_eq!(response.status(), 201);
        let body: serde_json::Value = response.json().await.unwrap();
        let pem = body["certificate"].as_str().unwrap();
        let der = openssl::x509::X509::from_pem(pem.as_bytes()).unwrap().to_der().unwrap();
        answered.push(format!("{} issued {}", body["serial"].as_str().unwrap(), hex::encode(der)));
    }
    let der_hex = if db.postgres { "encode(cert_der, 'hex')" } else { "lower(hex(cert_der))" };
    let mut stored =
        sql::texts(&db, &format!("SELECT serial || ' ' || state || ' ' || {der_hex} AS s FROM certificates"));
    answered.sort();
    stored.sort();
    assert_eq!(stored, answered);
    server.stop().await;
}

#[actix_rt::test]
async fn sqlite_a_burst_is_stored_exactly_as_answered() {
    a_burst_is_stored_exactly_as_answered(TestDb::sqlite()).await;
}

#[actix_rt::test]
async fn postgres_a_burst_is_stored_exactly_as_answered() {
    a_burst_is_stored_exactly_as_answered(TestDb::postgres()).await;
}

/// One line of a query plan: SQLite's `EXPLAIN QUERY PLAN` detail, PostgreSQL's `EXPLAIN` line.
#[derive(diesel::QueryableByName, Debug)]
struct SqlitePlan {
    #[diesel(sql_type = diesel::sql_types::Text)]
    detail: String,
}

#[derive(diesel::QueryableByName, Debug)]
struct PostgresPlan {
    #[diesel(sql_type = diesel::sql_types::Text)]
    #[diesel(column_name = "QUERY PLAN")]
    line: String,
}

/// The resumer's sweep of orphaned write-ahead records runs every few seconds: it finds them by
/// an index, not by reading every stored certificate (at 10 million stored certificates it held
/// SQLite's write lock for seconds and issuance failed). Judged by each database's own planner
/// on the statement the engine runs.
async fn the_orphan_sweep_reads_an_index(db: TestDb) {
    use diesel::RunQueryDsl;
    let server = TestServer::start(dev_config(&db)).await;
    server.stop().await;
    const SWEEP: &str = "UPDATE certificates SET state = 'abandoned' WHERE state = 'signing' AND created_at < 0";
    let plan = match sql::connect(&db) {
        sql::RawConn::Sqlite(mut c) => diesel::sql_query(format!("EXPLAIN QUERY PLAN {SWEEP}"))
            .load::<SqlitePlan>(&mut c)
            .unwrap()
            .into_iter()
            .map(|p| p.detail)
            .collect::<Vec<_>>(),
        sql::RawConn::Postgres(mut c) => {
            // A test table is small, so the planner would scan it anyway: forbid that to see
            // whether an index can serve the statement at all.
            diesel::sql_query("SET enable_seqscan = off").execute(&mut c).unwrap();
            diesel::sql_query(format!("EXPLAIN {SWEEP}"))
                .load::<PostgresPlan>(&mut c)
                .unwrap()
                .into_iter()
                .map(|p| p.line)
                .collect()
        }
    };
    let text = plan.join("\n");
    assert!(text.contains("certificates_by_state"), "the sweep's plan:\n{text}");
    assert!(!text.contains("SCAN certificates") && !text.contains("Seq Scan"), "the sweep's plan:\n{text}");
}

#[actix_rt::test]
async fn sqlite_the_orphan_sweep_reads_an_index() {
    the_orphan_sweep_reads_an_index(TestDb::sqlite()).await;
}

#[actix_rt::test]
async fn postgres_the_orphan_sweep_reads_an_index() {
    the_orphan_sweep_reads_an_index(TestDb::postgres()).await;
}
