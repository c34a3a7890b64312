//! Retry storms (incident 003): clients of a broken CA retrying without back-off. Refusals are
//! counted in memory and written in aggregate, so a storm costs the database almost nothing; the
//! operator's levers run on the admin pool, so a disable issued during a storm succeeds and
//! reaches the other instance. Judged from the database with raw SQL and over real HTTP.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

/// `tasks` clients each sending requests back to back to `profile` until `stop` is set or
/// `each` requests are sent; the answers' statuses and Retry-After (seconds).
async fn storm(
    server: &Arc<TestServer>,
    profile: &str,
    tasks: usize,
    each: usize,
    stop: Arc<AtomicBool>,
) -> Vec<(u16, Option<u64>)> {
    let csr = Arc::new(csr(Key::P384, &["storm.example.test"]));
    let clients = (0..tasks).map(|_| {
        let (server, csr, profile, stop) = (server.clone(), csr.clone(), profile.to_string(), stop.clone());
        tokio::spawn(async move {
            let mut statuses = Vec::with_capacity(each);
            while statuses.len() < each && !stop.load(Ordering::Relaxed) {
                let resp = server.issue(DEMO_KEY, &profile, &csr).send().await.unwrap();
                let after = resp.headers().get("retry-after").and_then(|v| v.to_str().ok()?.parse().ok());
                statuses.push((resp.status().as_u16(), after));
            }
            statuses
        })
    });
    futures_util::future::join_all(clients).await.into_iter().flat_map(Result::unwrap).collect()
}

fn audit_rows(db: &TestDb) -> i64 {
    sql::count(db, "SELECT count(*) AS n FROM audit_log")
}

/// 3,200 refusals (a disabled CA), then the engine stops: the audit rows they wrote and the
/// refusals those rows count. Every request must have been refused, nothing issued, and every
/// refusal counted in the metrics as it happened.
async fn refusal_storm(db: &TestDb, sabotage: &[castellum::config::Sabotage]) -> (i64, i64) {
    let mut config = dev_config(db);
    config.sabotage = sabotage.to_vec();
    config.audit.refusal_interval = Duration::from_millis(500);
    let server = Arc::new(TestServer::start(config.clone()).await);
    server.engine.set_ca_state("test-operator", "ica-p384", "disabled").await.unwrap();
    let certificates_before = sql::count(db, "SELECT count(*) AS n FROM certificates");
    // The lever's own audit row, written by the audit writer a moment after it answers.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rows_before = audit_rows(db);

    let started = Instant::now();
    let statuses = storm(&server, "tls-server-p384", 16, 200, Arc::default()).await;
    let took = started.elapsed();
    assert_eq!(statuses.len(), 3_200);
    // Refused as disabled; past its budget of 50 a second the client is told to back off.
    let (disabled, back_off) =
        (statuses.iter().filter(|s| s.0 == 409).count(), statuses.iter().filter(|s| s.0 == 429).count());
    // A 429 says how long to wait, at least the 2 s of a first second over the budget, jittered
    // so that clients refused together do not come back together.
    let waits: std::collections::BTreeSet<u64> = statuses.iter().filter(|s| s.0 == 429).filter_map(|s| s.1).collect();
    assert_eq!(statuses.iter().filter(|s| s.0 == 429 && s.1.is_none()).count(), 0, "a 429 without Retry-After");
    assert!(waits.first().is_some_and(|w| *w >= 2) && waits.len() > 1, "Retry-After of the 429s: {waits:?}");
    assert_eq!(disabled + back_off, 3_200, "every request refused");
    assert!(disabled >= 50 && back_off > 0, "{disabled} answered 409, {back_off} answered 429");
    let metrics = server.http.get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let counted: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("castellum_refusals_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(counted, 3_200, "refusals are metrics as they happen");

    // The operator sees the storm: its CA, its reasons, and who is retrying.
    let status = admin_status(&server).await;
    let refusals = status["refusals"].as_array().expect("refusals in the admin status").clone();
    let p384 = refusals.iter().find(|r| r["ca"] == "ica-p384").unwrap_or_else(|| panic!("{refusals:?}"));
    assert_eq!(p384["top_clients"][0][0], "demo", "{p384}");
    assert!(p384["by_reason"].as_array().unwrap().iter().any(|r| r[0] == "ca-disabled"), "{p384}");
    assert!(p384["per_second"].as_f64().unwrap() > 0.0, "{p384}");

    let server = Arc::into_inner(server).expect("the storm's clients are done");
    server.stop().await; // writes the last tallies
                         // Everything written, on this backend, is sealed into a chain that verifies.
    assert_eq!(sql::count(db, "SELECT count(*) AS n FROM audit_log WHERE seq IS NULL"), 0, "unsealed rows");
    let (chains, _) = castellum::audit::chain::verify_configured(&config).unwrap();
    assert!(chains.iter().all(|c| c.fault.is_none() && c.verified > 0), "{chains:?}");
    let written = audit_rows(db) - rows_before;
    eprintln!("3,200 refusals in {took:?}: {written} audit rows");
    let tallied = sql::count(
        db,
        "SELECT CAST(COALESCE(SUM(count), 0) AS BIGINT) AS n FROM audit_log \
         WHERE outcome IN ('ca-disabled', 'too-many-retries') AND actor = 'demo'",
    );
    assert_eq!(sql::count(db, "SELECT count(*) AS n FROM certificates"), certificates_before);
    (written, tallied)
}

/// At most 1 audit row per 100 refusals, and every refusal counted in those rows.
async fn a_refusal_storm_writes_one_audit_row_per_kind_per_interval(db: TestDb) {
    let (written, tallied) = refusal_storm(&db, &[]).await;
    assert!((1..=32).contains(&written), "{written} audit rows for 3,200 refusals");
    assert_eq!(tallied, 3_200, "every refusal is in a tally");
}

#[actix_rt::test]
async fn sqlite_a_refusal_storm_writes_one_audit_row_per_kind_per_interval() {
    a_refusal_storm_writes_one_audit_row_per_kind_per_interval(TestDb::sqlite()).await;
}

#[actix_rt::test]
async fn postgres_a_refusal_storm_writes_one_audit_row_per_kind_per_interval() {
    a_refusal_storm_writes_one_audit_row_per_kind_per_interval(TestDb::postgres()).await;
}

/// The same storm against an engine that audits each refusal as a row of its own (the engine
/// before issue 12): the judge above sees it.
#[actix_rt::test]
async fn the_storm_judge_catches_a_row_per_refusal() {
    let db = TestDb::sqlite();
    let (written, _) = refusal_storm(&db, &[castellum::config::Sabotage::AuditEachRefusal]).await;
    assert!(written > 32, "an engine writing a row per refusal wrote only {written}");
}

/// Two instances on one PostgreSQL database; ica-p384's every signature fails, so its breaker
/// opens and its clients, retrying at once, are refused on both instances. During that storm the
/// operator disables the CA on A: the lever answers, and B refuses the CA within 1 s.
#[actix_rt::test]
async fn postgres_a_disable_during_a_storm_succeeds_and_reaches_the_other_instance() {
    let (status, reached) = disable_during_storm(&[]).await;
    assert!(status < 300, "the lever answered {status}");
    assert!(reached < Duration::from_secs(1), "B refused the CA {reached:?} after the lever was pulled");
}

/// The lever's HTTP status, and how long after it was pulled B refused the CA (5 s: never).
async fn disable_during_storm(sabotage: &[castellum::config::Sabotage]) -> (u16, Duration) {
    let db = TestDb::postgres();
    let broken = |db: &TestDb| {
        let mut config = dev_config(db);
        config.sabotage = sabotage.to_vec();
        let ca = config.cas.iter_mut().find(|c| c.id == "ica-p384").unwrap();
        ca.fault.failure_rate = 1.0;
        ca.breaker.open_for = Duration::from_secs(60);
        config
    };
    let a = Arc::new(TestServer::start(broken(&db)).await);
    let b = Arc::new(TestServer::start(broken(&db)).await);
    // Unpaced, until the judge has seen the disable reach B (bounded: 20,000 requests each).
    let stop = Arc::new(AtomicBool::new(false));
    let storm_a = tokio::spawn({
        let (a, stop) = (a.clone(), stop.clone());
        async move { storm(&a, "tls-server-p384", 8, 2_500, stop).await }
    });
    let storm_b = tokio::spawn({
        let (b, stop) = (b.clone(), stop.clone());
        async move { storm(&b, "tls-server-p384", 8, 2_500, stop).await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;

    let asked = Instant::now();
    let answer = a
        .http
        .post(format!("{}/admin/v1/cas/ica-p384/state", a.admin_base))
        .bearer_auth(ADMIN_TOKEN)
        .json(&serde_json::json!({"state": "disabled"}))
        .send()
        .await
        .unwrap();
    let lever_took = asked.elapsed();
    let status = answer.status().as_u16();
    // What B's intake refuses by: the state its registry serves. (A probe request would be
    // answered 429 too-many-retries while the storm's own client is over its budget.)
    let served = |engine: &castellum::Engine| {
        engine.cas().into_iter().find(|c| c.id == "ica-p384").map(|c| c.state).unwrap_or_default()
    };
    let reached = loop {
        if served(&b.engine) == "disabled" || asked.elapsed() > Duration::from_secs(5) {
            break asked.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    // Keep storming a moment after the disable, so the storm's clients see it too.
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    let (during_a, during_b) = (storm_a.await.unwrap(), storm_b.await.unwrap());
    eprintln!(
        "lever answered {status} in {lever_took:?}; B refused the CA {reached:?} after it was asked; storm: {} requests",
        during_a.len() + during_b.len()
    );
    for statuses in [&during_a, &during_b] {
        assert!(statuses.iter().all(|s| [503, 409, 429].contains(&s.0)), "only refusals: {statuses:?}");
        assert!(statuses.iter().all(|s| s.0 == 409 || s.1.is_some()), "a 503 or 429 without Retry-After");
    }
    for server in [a, b] {
        Arc::into_inner(server).expect("storm done").stop().await;
    }
    (status, reached)
}
