//! PostgreSQL timeouts, for real: a statement blocked by a lock the test holds is cancelled by
//! the engine's `statement_timeout` and answered `503 database-unavailable` long before the
//! request's deadline; a database that stops answering on a live connection (a frozen proxy).

mod common;

use std::time::{Duration, Instant};

use common::*;

#[derive(diesel::QueryableByName, Debug)]
struct Waiting {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

/// Backends of the engine's issuance pool waiting on a lock, as PostgreSQL reports them.
fn issuance_waiting_on_a_lock(admin: &mut sql::RawConn, db: &str) -> i64 {
    admin
        .load::<Waiting>(&format!(
            "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = '{db}' \
             AND application_name = 'castellum:issuance' AND wait_event_type = 'Lock'"
        ))
        .first()
        .map(|w| w.n)
        .unwrap_or(0)
}

#[actix_rt::test]
async fn postgres_a_statement_blocked_by_a_lock_is_cancelled_at_statement_timeout() {
    let db = TestDb::postgres();
    let mut config = dev_config(&db);
    let statement_timeout = Duration::from_secs(1);
    config.database.statement_timeout = statement_timeout;
    let deadline = config.lanes.interactive.default_deadline;
    let server = TestServer::start(config).await;
    let warm = answer_of(server.issue(DEMO_KEY, "tls-server-p256", &csr(Key::P256, &["warm.example.test"]))).await;
    assert_eq!(warm.status, 201, "{warm:?}");

    // The test's own connection holds the certificates table in a transaction left open.
    let mut lock = sql::RawConn::open(&db);
    lock.execute("BEGIN; LOCK TABLE certificates IN ACCESS EXCLUSIVE MODE;");
    let request = server.issue(DEMO_KEY, "tls-server-p256", &csr(Key::P256, &["blocked.example.test"]));
    let call = actix_rt::spawn(answer_of(request));
    // PostgreSQL itself shows the engine's write waiting on the test's lock.
    let mut observer = sql::RawConn::open(&db);
    let started = Instant::now();
    while issuance_waiting_on_a_lock(&mut observer, &db.name) == 0 {
        assert!(started.elapsed() < statement_timeout, "the engine's write never waited on the lock");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let blocked = call.await.unwrap();
    eprintln!(
        "blocked write answered after {:?} (statement_timeout {statement_timeout:?}, deadline {deadline:?})",
        blocked.took
    );
    assert!(blocked.is_503("database-unavailable"), "{blocked:?}");
    assert!(blocked.took >= statement_timeout, "cancelled by the timeout, not before: {blocked:?}");
    // Nearer the statement timeout than the deadline it would otherwise have waited out.
    assert!(blocked.took < statement_timeout + (deadline - statement_timeout) / 2, "{blocked:?}");
    assert_eq!(issuance_waiting_on_a_lock(&mut observer, &db.name), 0, "the statement was cancelled");
    lock.execute("ROLLBACK");

    let rows = sql::certificates(&db);
    assert!(!rows.iter().any(|r| r.names("blocked.example.test")), "the cancelled write left nothing: {rows:?}");
    let started = Instant::now();
    loop {
        let a = answer_of(server.issue(DEMO_KEY, "tls-server-p256", &csr(Key::P256, &["after.example.test"]))).await;
        if a.status == 201 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(3), "no recovery after the lock was released: {a:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.stop().await;
}

/// The database stops answering on live connections: a frozen proxy, whose kernel acknowledges
/// every byte and forwards none (a hung pooler, a stopped server). Neither `statement_timeout`
/// (the server never sees the statement) nor `tcp_user_timeout` and keepalives (every segment
/// is acknowledged) can notice this; what bounds the caller's wait is the engine's own: a read
/// on a pooled connection at the interactive deadline, an issuance at its deadline — each a
/// 503 — while `/readyz` answers 503 at once (within 250 ms) from its background probe; and the
/// engine issues again, without a restart, once the database answers.
#[actix_rt::test]
async fn postgres_a_frozen_database_connection_never_holds_a_caller_past_its_bound() {
    let db = TestDb::postgres();
    let proxy = FreezableProxy::start("127.0.0.1:5432");
    let mut config = dev_config(&db);
    config.database.url = proxy.url_for(&db);
    let deadline = Duration::from_millis(2500);
    config.lanes.interactive.default_deadline = deadline;
    config.lanes.interactive.max_deadline = deadline;
    config.database.statement_timeout = Duration::from_secs(1);
    let server = std::sync::Arc::new(TestServer::start(config).await);
    let warm = answer_of(server.issue(DEMO_KEY, "tls-server-p256", &csr(Key::P256, &["warm.example.test"]))).await;
    assert_eq!(warm.status, 201, "{warm:?}");
    let serial = warm.body["serial"].as_str().unwrap().to_string();
    let get = || server.http.get(server.url(&format!("/v1/certificates/{serial}"))).bearer_auth(DEMO_KEY);
    assert_eq!(answer_of(get()).await.status, 200, "a status-pool connection is open and idle");

    let frozen = proxy.freeze();
    let issue = {
        let server = server.clone();
        actix_rt::spawn(async move {
            answer_of(server.issue(DEMO_KEY, "tls-server-p256", &csr(Key::P256, &["frozen.example.test"]))).await
        })
    };
    // The read takes the idle (now frozen) status connection and waits on it.
    let read = answer_of(get()).await;
    let ready = answer_of(server.http.get(server.url("/readyz")).bearer_auth(DEMO_KEY)).await;
    let issue = issue.await.unwrap();
    eprintln!("frozen: read {:?}, issue {:?}, readyz {:?}", read.took, issue.took, ready.took);
    let margin = Duration::from_secs(1);
    assert!(read.is_503("database-unavailable"), "{read:?}");
    assert!(read.took >= deadline && read.took < deadline + margin, "a read ends at the deadline: {read:?}");
    assert!(issue.is_503("deadline-exceeded"), "{issue:?}");
    assert!(issue.took >= deadline && issue.took < deadline + margin, "an issuance ends at its deadline: {issue:?}");
    assert_eq!(ready.status, 503, "{ready:?}");
    assert_eq!(ready.body["database"], "unavailable", "{ready:?}");
    // Readiness answers from what the engine's background probe found, never waiting on the
    // database (it took its full 2 s check before: longer than a load balancer's check timeout).
    assert!(ready.took < Duration::from_millis(250), "readiness answers at once: {ready:?}");
    for _ in 0..5 {
        let again = answer_of(server.http.get(server.url("/readyz"))).await;
        assert_eq!(again.status, 503, "{again:?}");
        assert!(again.took < Duration::from_millis(250), "readiness answers at once: {again:?}");
    }

    drop(frozen);
    let thawed = answer_of(server.issue(DEMO_KEY, "tls-server-p256", &csr(Key::P256, &["thawed.example.test"]))).await;
    assert_eq!(thawed.status, 201, "issuing again once the database answers: {thawed:?}");
    let rows = sql::certificates(&db);
    assert!(rows.iter().any(|r| r.names("thawed.example.test") && r.state == "issued"));
    std::sync::Arc::try_unwrap(server).ok().expect("no other owner").stop().await;
}
