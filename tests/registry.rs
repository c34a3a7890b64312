//! Registry propagation across instances, and the CA-state levers: disable, park, resubmit.

mod common;

use std::time::{Duration, Instant};

use castellum::{EngineError, IssueRequest};
use common::*;

fn state_of(engine: &castellum::Engine, ca: &str) -> String {
    engine.cas().into_iter().find(|c| c.id == ca).map(|c| c.state).unwrap_or_default()
}

/// How long until `engine` serves `ca` in `state`, polling every millisecond up to `limit`.
async fn time_until_state(engine: &castellum::Engine, ca: &str, state: &str, limit: Duration) -> Duration {
    let started = Instant::now();
    while state_of(engine, ca) != state {
        assert!(started.elapsed() < limit, "{ca} not {state} after {limit:?}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    started.elapsed()
}

fn p256_request() -> IssueRequest {
    IssueRequest {
        profile: "tls-server-p256".into(),
        csr_pem: csr(Key::P256, &["reg.example.test"]),
        ..Default::default()
    }
}

#[actix_rt::test]
async fn postgres_a_disable_reaches_another_instance_within_100ms_by_notification() {
    let db = TestDb::postgres();
    let mut config_b = dev_config(&db);
    config_b.registry.poll_interval = Duration::from_secs(30); // only a notification can be this fast
    let a = castellum::Engine::start(dev_config(&db)).await.unwrap();
    let b = castellum::Engine::start(config_b).await.unwrap();
    let client = b.client("demo").unwrap();
    b.issue(&client, p256_request()).await.expect("B issues while the CA is enabled");
    // Give B's listener its first LISTEN before the change.
    tokio::time::sleep(Duration::from_millis(300)).await;

    a.set_ca_state("test-operator", "ica-p256", "disabled").await.unwrap();
    let took = time_until_state(&b, "ica-p256", "disabled", Duration::from_secs(5)).await;
    assert!(took < Duration::from_millis(100), "took {took:?}");
    assert!(matches!(b.issue(&client, p256_request()).await, Err(EngineError::CaDisabled(_))));
    eprintln!("disable reached the other instance in {took:?}");

    a.set_ca_state("test-operator", "ica-p256", "enabled").await.unwrap();
    time_until_state(&b, "ica-p256", "enabled", Duration::from_secs(5)).await;
    b.issue(&client, p256_request()).await.expect("issues again once re-enabled");

    // Both instances record heartbeats with the version they serve.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let instances = sql::instance_ids(&db);
    assert!(instances.iter().any(|i| i == a.instance_id()) && instances.iter().any(|i| i == b.instance_id()));
    // A's console shows B's actor tree, as B published it.
    let status = a.admin_status().await.unwrap();
    let b_row = status.instances.iter().find(|i| i.id == b.instance_id()).expect("B in A's cluster view");
    assert_eq!(b_row.tree["cells"].as_array().map(Vec::len), Some(4), "{:?}", b_row.tree);
    a.shutdown().await;
    b.shutdown().await;
}

#[actix_rt::test]
async fn postgres_without_notifications_the_poll_bounds_propagation() {
    let db = TestDb::postgres();
    let poll = Duration::from_millis(400);
    let mut config_b = dev_config(&db);
    config_b.registry.listen = false; // notifications blocked: only the version poll remains
    config_b.registry.poll_interval = poll;
    let a = castellum::Engine::start(dev_config(&db)).await.unwrap();
    let b = castellum::Engine::start(config_b).await.unwrap();
    for _ in 0..3 {
        a.set_profile_state("test-operator", "tls-server-p384", false).await.unwrap();
        a.set_ca_state("test-operator", "ica-rsa3072", "disabled").await.unwrap();
        let took = time_until_state(&b, "ica-rsa3072", "disabled", poll * 3).await;
        assert!(took <= poll + Duration::from_millis(150), "took {took:?} with a {poll:?} poll");
        let client = b.client("demo").unwrap();
        let refused = b
            .issue(
                &client,
                IssueRequest {
                    profile: "tls-server-p384".into(),
                    csr_pem: csr(Key::P384, &["x.example.test"]),
                    ..Default::default()
                },
            )
            .await;
        assert!(matches!(refused, Err(EngineError::ProfileDisabled(_))), "{refused:?}");
        a.set_profile_state("test-operator", "tls-server-p384", true).await.unwrap();
        a.set_ca_state("test-operator", "ica-rsa3072", "enabled").await.unwrap();
        time_until_state(&b, "ica-rsa3072", "enabled", poll * 3).await;
    }
    a.shutdown().await;
    b.shutdown().await;
}

async fn a_flood_for_a_disabled_ca_never_reaches_its_queue(db: TestDb) {
    let server = TestServer::start(dev_config(&db)).await;
    server.engine.set_ca_state("test-operator", "ica-p384", "disabled").await.unwrap();
    let csr = csr(Key::P384, &["flood.example.test"]);
    let requests = (0..300).map(|_| async {
        let resp = server.issue(DEMO_KEY, "tls-server-p384", &csr).send().await.unwrap();
        let status = resp.status().as_u16();
        let body: serde_json::Value = resp.json().await.unwrap();
        (status, body["type"].as_str().unwrap_or_default().to_string())
    });
    let answers: Vec<(u16, String)> = futures_util::future::join_all(requests).await;
    // Refused as disabled, or — the client retrying past its budget — told to back off.
    let refused = |(s, t): &(u16, String)| {
        (*s == 409 && t == "urn:castellum:problem:ca-disabled")
            || (*s == 429 && t == "urn:castellum:problem:too-many-retries")
    };
    assert!(answers.iter().all(refused), "{answers:?}");
    assert!(answers.iter().any(|(s, _)| *s == 409), "{answers:?}");
    // The database, read with plain SQL: not one request or write-ahead record for that CA.
    for table in ["requests", "certificates"] {
        let sql = format!("SELECT count(*) AS n FROM {table} WHERE ca_id = 'ica-p384'");
        assert_eq!(sql::count(&db, &sql), 0, "{table}");
    }
    // And the operator's view of the cell: nothing queued, nothing in flight.
    let status = server.engine.cell_status().await.into_iter().find(|c| c.ca == "ica-p384").unwrap();
    assert_eq!((status.interactive_queued, status.in_flight), (0, 0));
    // Other CAs are untouched.
    let ok =
        server.issue(DEMO_KEY, "tls-server-p256", &common::csr(Key::P256, &["ok.example.test"])).send().await.unwrap();
    assert_eq!(ok.status(), 201);
    server.stop().await;
}

#[actix_rt::test]
async fn sqlite_a_flood_for_a_disabled_ca_never_reaches_its_queue() {
    a_flood_for_a_disabled_ca_never_reaches_its_queue(TestDb::sqlite()).await;
}

async fn parked_work_is_all_issued_after_resubmit(db: TestDb) {
    let server = TestServer::start(dev_config(&db)).await;
    server.engine.set_ca_state("test-operator", "ica-p256", "parked").await.unwrap();
    // Sync work is refused at once; async work is accepted and held.
    let sync = server.issue(DEMO_KEY, "tls-server-p256", &csr(Key::P256, &["s.example.test"])).send().await.unwrap();
    assert_eq!(sync.status(), 503);
    assert!(sync.headers().contains_key("retry-after"));
    let mut ids = Vec::new();
    for i in 0..40 {
        ids.push(submit_async(&server, "ocsp-renewal", &format!("r{i}.example.test")).await);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(counts(&db).0, 0, "nothing is signed while parked");
    let parked = sql::count(&db, "SELECT count(*) AS n FROM requests WHERE ca_id = 'ica-p256' AND state = 'parked'");
    assert_eq!(parked, 40);
    // Resubmitting a parked CA is refused; unpark first.
    assert!(matches!(server.engine.resubmit("test-operator", "ica-p256").await, Err(EngineError::Conflict(_))));
    server.engine.set_ca_state("test-operator", "ica-p256", "enabled").await.unwrap();
    assert_eq!(server.engine.resubmit("test-operator", "ica-p256").await.unwrap(), 40);
    let mut serials = std::collections::HashSet::new();
    for id in &ids {
        let done = wait_for_request(&server.http, &server.base, id, Duration::from_secs(20)).await;
        assert_eq!(done["state"], "issued", "{done}");
        serials.insert(done["certificate"]["serial"].as_str().unwrap().to_string());
    }
    assert_eq!(serials.len(), 40, "every parked request issued once");
    assert_eq!(counts(&db).0, 40, "and nothing issued twice");
    let audit = sql::audit(&db);
    assert!(audit.iter().any(|e| e.action == "ca.state" && e.outcome == "parked" && e.actor == "test-operator"));
    assert!(audit.iter().any(|e| e.action == "ca.resubmit"));
    server.stop().await;
}

#[actix_rt::test]
async fn sqlite_parked_work_is_all_issued_after_resubmit() {
    parked_work_is_all_issued_after_resubmit(TestDb::sqlite()).await;
}

#[actix_rt::test]
async fn postgres_parked_work_is_all_issued_after_resubmit() {
    parked_work_is_all_issued_after_resubmit(TestDb::postgres()).await;
}

/// The registry's LISTEN connection is held for the engine's whole life on purpose: when it
/// goes back to its pool at a clean stop, that is no long hold to warn about (it was reported as
/// "database connection held longer than the threshold").
#[actix_rt::test]
async fn a_clean_stop_reports_no_long_hold_for_the_listen_connection() {
    let log = CapturedLog::default();
    let writer = log.clone();
    tracing_subscriber::fmt().with_writer(move || writer.clone()).with_ansi(false).init();
    let db = TestDb::postgres();
    let mut config = dev_config(&db);
    config.database.slow_hold_threshold = Duration::from_millis(500);
    let server = TestServer::start(config).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server.stop().await;
    // The listener thread notices the stop within its 20 ms poll and returns its connection.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let text = log.text();
    assert!(text.contains("engine stopped"), "{text}");
    assert!(!text.contains("held longer than the threshold"), "{text}");
}
