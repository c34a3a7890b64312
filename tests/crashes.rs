//! Panics caught end to end, judged from the client's side and from the database with raw SQL: a
//! signer thread, a store worker and a CA cell panic (dev-only levers); the caller is answered at
//! once, and the next request is served. A cell that keeps dying is restarted at most 5 times a
//! minute and then left down, visibly. Asynchronous work a crashed cell held is still issued,
//! exactly once.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

fn deadline(server: &TestServer) -> Duration {
    server.engine.config().lanes.interactive.default_deadline
}

/// A signer panic is caught on its thread: the caller gets `503 signer-failure` at once, the
/// certificate it was signing is never issued, and the same (only) signer thread signs the next.
#[actix_rt::test]
async fn a_signer_panic_is_answered_and_the_thread_signs_the_next_request() {
    let db = TestDb::sqlite();
    let mut config = dev_config(&db);
    ca_of(&mut config, "ica-p256").signer_threads = 1;
    let server = TestServer::start(config).await;
    server.engine.panic_signer("ica-p256", 1).unwrap();
    let hit = answer_of(server.issue(DEMO_KEY, "tls-server-p256", &csr(Key::P256, &["hit.example.test"]))).await;
    assert!(hit.is_503("signer-failure"), "{hit:?}");
    assert!(hit.body["detail"].as_str().unwrap().contains("panicked"), "{hit:?}");
    assert!(hit.took < deadline(&server) / 4, "answered at once: {hit:?}");
    let next = answer_of(server.issue(DEMO_KEY, "tls-server-p256", &csr(Key::P256, &["next.example.test"]))).await;
    assert_eq!(next.status, 201, "the signer thread survived its panic: {next:?}");

    let started = Instant::now();
    let hit_rows = loop {
        let rows: Vec<sql::Certificate> =
            sql::certificates(&db).into_iter().filter(|r| r.names("hit.example.test")).collect();
        if rows.iter().all(|r| r.state == "abandoned") || started.elapsed() > Duration::from_secs(5) {
            break rows;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(hit_rows.len(), 1, "written ahead, then abandoned: {hit_rows:?}");
    assert_eq!(hit_rows[0].state, "abandoned");
    let next_rows: Vec<sql::Certificate> =
        sql::certificates(&db).into_iter().filter(|r| r.names("next.example.test")).collect();
    assert_eq!(next_rows.len(), 1);
    assert_eq!(next_rows[0].state, "issued");
    server.stop().await;
}

/// A store worker's panic is caught on its thread: the caller whose write it was gets an answer
/// at once (`500 internal`: a panic is a bug, not a passing condition), nothing of it is stored,
/// and the same (only) worker commits the next request.
#[actix_rt::test]
async fn a_store_worker_panic_is_answered_and_the_worker_stores_the_next_request() {
    let db = TestDb::sqlite();
    let config = dev_config(&db);
    assert_eq!(config.database.pools.issuance.max_size, 1, "one store worker");
    let server = TestServer::start(config).await;
    server.engine.panic_store().unwrap();
    let hit = answer_of(server.issue(DEMO_KEY, "tls-server-p256", &csr(Key::P256, &["hit.example.test"]))).await;
    assert_eq!((hit.status, hit.slug()), (500, "internal"), "{hit:?}");
    assert!(hit.took < deadline(&server) / 4, "answered at once: {hit:?}");
    let next = answer_of(server.issue(DEMO_KEY, "tls-server-p256", &csr(Key::P256, &["next.example.test"]))).await;
    assert_eq!(next.status, 201, "the store worker survived its panic: {next:?}");
    let rows = sql::certificates(&db);
    assert!(!rows.iter().any(|r| r.names("hit.example.test")), "the panicked batch stored nothing: {rows:?}");
    assert!(rows.iter().any(|r| r.names("next.example.test") && r.state == "issued"), "{rows:?}");
    server.stop().await;
}

/// A cell that panics while holding work: its queued and in-flight callers are answered `503`
/// at once (not at their deadline), none of their certificates is issued, the supervisor
/// replaces the cell and the CA issues again.
#[actix_rt::test]
async fn a_cell_panic_answers_its_callers_at_once_and_the_cell_is_replaced() {
    let db = TestDb::sqlite();
    let mut config = dev_config(&db);
    let ca = ca_of(&mut config, "ica-p256");
    ca.signer_threads = 1;
    ca.queue.in_flight = 1;
    ca.fault.sign_latency = Some(Duration::from_millis(500));
    let server = Arc::new(TestServer::start(config).await);
    let names: Vec<String> = (0..4).map(|i| format!("held-{i}.example.test")).collect();
    let calls: Vec<_> = names
        .iter()
        .map(|name| {
            let (server, csr) = (server.clone(), csr(Key::P256, &[name]));
            actix_rt::spawn(async move { answer_of(server.issue(DEMO_KEY, "tls-server-p256", &csr)).await })
        })
        .collect();
    // Wait until the cell holds all four (one signing, three queued), then crash it.
    let started = Instant::now();
    loop {
        let cell = cell_in(&admin_status(&server).await, "ica-p256").unwrap();
        if cell["in_flight"].as_u64().unwrap() + cell["interactive_queued"].as_u64().unwrap() == 4 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(2), "the cell never held the four: {cell}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let crashed_at = Instant::now();
    server.engine.crash_cell("ica-p256").unwrap();
    let answers: Vec<Answer> = futures_util::future::join_all(calls).await.into_iter().map(|r| r.unwrap()).collect();
    let answered_after = crashed_at.elapsed();
    eprintln!("the crashed cell's callers were answered {answered_after:?} after the crash: {answers:?}");
    for a in &answers {
        assert!(a.is_503("ca-unavailable"), "{a:?}");
    }
    assert!(answered_after < deadline(&server) / 4, "answered at the crash, not at the deadline");

    let replaced = loop {
        let a = answer_of(server.issue(DEMO_KEY, "tls-server-p256", &csr(Key::P256, &["after.example.test"]))).await;
        if a.status == 201 {
            break crashed_at.elapsed();
        }
        assert!(a.is_503("ca-unavailable"), "while the cell is replaced: {a:?}");
        assert!(crashed_at.elapsed() < Duration::from_secs(5), "the cell was not replaced");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!("issuing again {replaced:?} after the crash");
    let cell = cell_in(&admin_status(&server).await, "ica-p256").unwrap();
    assert_eq!(cell["restarts"], 1, "{cell}");
    assert_eq!(cell["state"], "enabled", "{cell}");
    // Let the signature that was in flight at the crash finish on its thread: it is never issued.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let rows = sql::certificates(&db);
    for name in &names {
        assert!(!rows.iter().any(|r| r.names(name) && r.state == "issued"), "{name} was issued: {rows:?}");
    }
    assert!(
        rows.iter().filter(|r| names.iter().any(|n| r.names(n))).count() <= 1,
        "at most the one in flight was recorded"
    );
    Arc::try_unwrap(server).ok().expect("no other owner").stop().await;
}

/// A caller that is gone by the time its write-ahead record commits (here its cell crashed while a
/// held SQLite write lock kept the commit waiting) gets nothing signed, and the record is marked
/// abandoned as soon as it is committed — by the Store's worker, not seconds later by the
/// resumer's sweep of orphaned records (which takes only records older than the longest deadline
/// plus 5 s). Judged with raw SQL.
#[actix_rt::test]
async fn a_record_committed_after_its_caller_is_gone_is_abandoned_at_once() {
    let db = TestDb::sqlite();
    let config = dev_config(&db);
    assert_eq!(config.database.pools.issuance.max_size, 1, "one store worker");
    // What the resumer's sweep waits for before it abandons an orphaned record.
    let sweep_horizon =
        config.lanes.interactive.max_deadline.max(config.lanes.background.max_deadline) + Duration::from_secs(5);
    assert!(sweep_horizon > Duration::from_secs(10), "the sweep cannot be what abandons it below");
    let server = Arc::new(TestServer::start(config).await);
    let warm = answer_of(server.issue(DEMO_KEY, "tls-server-p256", &csr(Key::P256, &["warm.example.test"]))).await;
    assert_eq!(warm.status, 201, "{warm:?}");

    let mut lock = sql::RawConn::open(&db);
    lock.execute("BEGIN IMMEDIATE;");
    let call = {
        let (server, csr) = (server.clone(), csr(Key::P256, &["gone.example.test"]));
        actix_rt::spawn(async move { answer_of(server.issue(DEMO_KEY, "tls-server-p256", &csr)).await })
    };
    // The worker holds the record's batch, waiting for the lock.
    until_the_store_commits_a_batch(&server).await;
    server.engine.crash_cell("ica-p256").unwrap();
    let gone = call.await.unwrap();
    assert!(gone.is_503("ca-unavailable"), "{gone:?}");
    assert!(
        sql::certificates(&db).iter().all(|r| !r.names("gone.example.test")),
        "the record is not committed while the lock is held"
    );

    lock.execute("COMMIT;");
    let released = Instant::now();
    let states = |db: &TestDb| -> Vec<String> {
        sql::certificates(db).into_iter().filter(|r| r.names("gone.example.test")).map(|r| r.state).collect()
    };
    let abandoned_after = loop {
        let now = states(&db);
        if now == ["abandoned"] {
            break released.elapsed();
        }
        assert!(now.is_empty() || now == ["signing"], "never signed, never issued: {now:?}");
        assert!(released.elapsed() < Duration::from_secs(2), "still {now:?} 2 s after the commit");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    eprintln!("abandoned {abandoned_after:?} after the lock was released (the sweep: {sweep_horizon:?})");
    // Nothing signs it later either.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(states(&db), ["abandoned"]);
    Arc::try_unwrap(server).ok().expect("no other owner").stop().await;
}

/// Five restarts a minute, then no more: the sixth crash leaves the CA's cell down — the
/// client gets `503 ca-unavailable` for as long as four times the slowest replacement seen,
/// the admin status shows the cell down with 5 restarts, `/readyz` counts one CA fewer, and the
/// other CAs keep issuing.
#[actix_rt::test]
async fn a_cell_that_crashes_a_sixth_time_within_a_minute_is_left_down() {
    let db = TestDb::sqlite();
    let server = TestServer::start(dev_config(&db)).await;
    let p256 = csr(Key::P256, &["again.example.test"]);
    let mut slowest = Duration::ZERO;
    for crash in 1..=5 {
        server.engine.crash_cell("ica-p256").unwrap();
        let crashed_at = Instant::now();
        loop {
            let a = answer_of(server.issue(DEMO_KEY, "tls-server-p256", &p256)).await;
            if a.status == 201 {
                break;
            }
            assert!(a.is_503("ca-unavailable"), "{a:?}");
            assert!(crashed_at.elapsed() < Duration::from_secs(5), "crash {crash}: the cell was not replaced");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        slowest = slowest.max(crashed_at.elapsed());
    }
    eprintln!("five crashes, each replaced within {slowest:?}");
    let ready: serde_json::Value =
        server.http.get(server.url("/readyz")).bearer_auth(DEMO_KEY).send().await.unwrap().json().await.unwrap();
    assert_eq!(ready["cas_serving"], 4, "{ready}");

    server.engine.crash_cell("ica-p256").unwrap();
    let crashed_at = Instant::now();
    let watch = (slowest * 4).max(Duration::from_secs(1));
    let mut refused = 0;
    while crashed_at.elapsed() < watch {
        let a = answer_of(server.issue(DEMO_KEY, "tls-server-p256", &p256)).await;
        assert!(a.is_503("ca-unavailable"), "after the sixth crash: {a:?}");
        assert!(a.took < Duration::from_secs(1), "refused at once: {a:?}");
        refused += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("{refused} requests refused over {watch:?} after the sixth crash");
    let status = admin_status(&server).await;
    let cell = cell_in(&status, "ica-p256").expect("the dead cell is still listed");
    assert_eq!(cell["state"], "down", "{cell}");
    assert_eq!(cell["restarts"], 5, "{cell}");
    let ready: serde_json::Value =
        server.http.get(server.url("/readyz")).bearer_auth(DEMO_KEY).send().await.unwrap().json().await.unwrap();
    assert_eq!(ready["cas_serving"], 3, "the dead cell's CA is not serving: {ready}");
    let other = answer_of(server.issue(DEMO_KEY, "tls-server-p384", &csr(Key::P384, &["p384.example.test"]))).await;
    assert_eq!(other.status, 201, "{other:?}");
    server.stop().await;
}

/// Asynchronous requests held by a cell that crashes are taken up again once their claim lapses
/// and all end issued, each exactly once (raw SQL: one issued certificate per request, the one
/// the request names; nothing issued twice).
#[actix_rt::test]
async fn async_work_held_by_a_crashed_cell_is_issued_exactly_once() {
    let db = TestDb::sqlite();
    let mut config = dev_config(&db);
    // A claim outlives any job's deadline (so a request is never queued twice), and both are short.
    config.async_requests.lease = Duration::from_millis(2500);
    config.async_requests.resume_interval = Duration::from_millis(200);
    config.lanes.interactive.default_deadline = Duration::from_secs(2);
    config.lanes.interactive.max_deadline = Duration::from_secs(2);
    let ca = ca_of(&mut config, "ica-p256");
    ca.signer_threads = 1;
    ca.queue.in_flight = 1;
    ca.fault.sign_latency = Some(Duration::from_millis(100));
    let server = TestServer::start(config).await;
    let names: Vec<String> = (0..8).map(|i| format!("async-{i}.example.test")).collect();
    let mut ids = Vec::new();
    for name in &names {
        let a = answer_of(
            server.issue(DEMO_KEY, "tls-server-p256", &csr(Key::P256, &[name])).header("prefer", "respond-async"),
        )
        .await;
        assert_eq!(a.status, 202, "{a:?}");
        ids.push(a.body["request_id"].as_str().unwrap().to_string());
    }
    server.engine.crash_cell("ica-p256").unwrap();
    let held = sql::requests(&db, "1 = 1").iter().filter(|r| r.state == "pending").count();
    eprintln!("{held} of 8 requests still pending when the cell crashed");
    assert!(held >= 4, "the crash hit work in the cell");

    for id in &ids {
        let body = wait_for_request(&server.http, &server.base, id, Duration::from_secs(15)).await;
        assert_eq!(body["state"], "issued", "{body}");
    }
    let requests = sql::requests(&db, "1 = 1");
    let certs = sql::certificates(&db);
    for (id, name) in ids.iter().zip(&names) {
        let request = requests.iter().find(|r| &r.id == id).expect("stored");
        assert_eq!(request.state, "issued", "{request:?}");
        let issued: Vec<&sql::Certificate> =
            certs.iter().filter(|c| c.request_id.as_ref() == Some(id) && c.state == "issued").collect();
        assert_eq!(issued.len(), 1, "{id}: exactly one issued certificate: {certs:?}");
        assert_eq!(request.serial.as_ref(), Some(&issued[0].serial));
        assert!(issued[0].names(name));
        assert_eq!(certs.iter().filter(|c| c.names(name) && c.state == "issued").count(), 1);
    }
    let orphans: Vec<&sql::Certificate> = certs.iter().filter(|c| c.state != "issued").collect();
    eprintln!("records left unissued by the crash: {:?}", orphans.iter().map(|c| &c.state).collect::<Vec<_>>());
    assert!(orphans.len() <= 1, "at most the one in flight at the crash: {orphans:?}");
    assert_eq!(certs.len() - orphans.len(), 8);
    server.stop().await;
}
