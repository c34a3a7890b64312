//! Several instances on one database: migrations serialised when they start together, claims
//! handed back on a clean shutdown and taken up by another instance, a dead instance shown stale.
//! Judged from the database with raw SQL and from the surviving instance's admin API.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;

/// Poll `check` every 50 ms until it returns `Some`, or fail with `what` after `limit`.
async fn eventually<T>(limit: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        if let Some(found) = check() {
            return found;
        }
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Four engines started at the same moment on one fresh PostgreSQL database: every one starts,
/// and the schema is migrated exactly once (without the advisory lock, two of them run the same
/// `CREATE TABLE` and one fails).
#[actix_rt::test]
async fn instances_starting_together_migrate_postgres_once() {
    let db = TestDb::postgres();
    let configs: Vec<_> = (0..4).map(|_| dev_config(&db)).collect();
    let ids: Vec<String> = configs.iter().map(|c| c.instance_id.clone().unwrap()).collect();
    let started = futures_util::future::join_all(configs.into_iter().map(castellum::Engine::start)).await;
    let engines: Vec<castellum::Engine> = started
        .into_iter()
        .enumerate()
        .map(|(i, r)| r.unwrap_or_else(|e| panic!("engine {i} of 4 failed to start: {e}")))
        .collect();

    let shipped = std::fs::read_dir(repo().join("schema/postgres")).unwrap().count() as i64;
    assert_eq!(sql::count(&db, "SELECT count(*) AS n FROM __diesel_schema_migrations"), shipped);
    assert_eq!(sql::count(&db, "SELECT count(DISTINCT version) AS n FROM __diesel_schema_migrations"), shipped);
    assert_eq!(
        sql::count(
            &db,
            "SELECT count(*) AS n FROM information_schema.tables WHERE table_schema = 'public' AND table_name IN \
             ('cas', 'profiles', 'registry', 'instances', 'requests', 'certificates', 'audit_log', 'identities')"
        ),
        8
    );
    // The seed row and the registry rows exist once, whoever inserted them.
    assert_eq!(sql::count(&db, "SELECT count(*) AS n FROM registry"), 1);
    assert_eq!(sql::count(&db, "SELECT count(*) AS n FROM cas"), 4);
    assert_eq!(sql::count(&db, "SELECT count(*) AS n FROM profiles"), 8);
    // Each instance runs: its heartbeat row appears, and it is ready.
    let listed = ids.iter().map(|i| format!("'{i}'")).collect::<Vec<_>>().join(", ");
    eventually(Duration::from_secs(10), "a heartbeat row per instance", || {
        (sql::count(&db, &format!("SELECT count(*) AS n FROM instances WHERE id IN ({listed})")) == 4).then_some(())
    })
    .await;
    for engine in &engines {
        let readiness = engine.readiness().await;
        assert!(readiness.ready, "{readiness:?}");
    }
    for engine in &engines {
        engine.shutdown().await;
    }
}

/// Shutting down cleanly, an instance gives back its claims on the asynchronous requests it
/// could not finish, so another instance issues them at once instead of after the lease (5
/// minutes here). Control: a request whose claim is still held by someone else is left alone
/// until that claim lapses. Every request ends with exactly one certificate.
async fn claims_are_handed_back_on_a_clean_shutdown(db: TestDb) {
    let mut config = dev_config(&db);
    assert_eq!(config.cas[0].id, "ica-p256");
    // One job at a time on a slow signer: most of the submitted work is still queued at shutdown.
    config.cas[0].fault.sign_latency = Some(Duration::from_millis(1000));
    config.cas[0].queue.in_flight = 1;
    config.async_requests.lease = Duration::from_secs(300);
    let first_id = config.instance_id.clone().unwrap();
    let first = TestServer::start(config).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(submit_async(&first, "ocsp-renewal", &format!("claim{i}.example.test")).await);
    }
    // While it runs, the first instance holds a 5-minute claim on everything it has not issued
    // (at most one signature a second gets done meanwhile).
    let before = sql::requests(&db, "1 = 1");
    let claimed: Vec<_> = before.iter().filter(|r| r.state == "pending").collect();
    assert!(claimed.len() >= 3, "{before:?}");
    let lease_end = castellum::pki::now_ms() + 200_000;
    for r in &claimed {
        assert_eq!(r.claimed_by.as_deref(), Some(first_id.as_str()), "{r:?}");
        assert!(r.claimed_until.unwrap() > lease_end, "{r:?}");
    }

    first.stop().await;
    let after = sql::requests(&db, "1 = 1");
    assert_eq!(after.len(), 5);
    let pending: Vec<_> = after.iter().filter(|r| r.state == "pending").collect();
    let issued = after.iter().filter(|r| r.state == "issued").count();
    assert_eq!(pending.len() + issued, 5, "{after:?}");
    assert!(pending.len() >= 3, "most requests were unfinished at shutdown: {after:?}");
    for r in &pending {
        assert_eq!((r.claimed_by.as_deref(), r.claimed_until), (None, None), "claim handed back: {r:?}");
    }

    // The control: one unfinished request is claimed by an instance that is still alive.
    let held = pending[0].id.clone();
    let far = castellum::pki::now_ms() + 300_000;
    sql::execute(
        &db,
        &format!("UPDATE requests SET claimed_by = 'still-alive', claimed_until = {far} WHERE id = '{held}'"),
    );

    let mut config = dev_config(&db);
    config.async_requests.resume_interval = Duration::from_millis(200);
    let second = TestServer::start(config).await;
    eventually(Duration::from_secs(15), "the second instance issues the handed-back requests", || {
        (sql::count(&db, &format!("SELECT count(*) AS n FROM requests WHERE state = 'issued' AND id <> '{held}'")) == 4)
            .then_some(())
    })
    .await;
    let control = sql::requests(&db, &format!("id = '{held}'"));
    assert_eq!(control[0].state, "pending", "a live claim is respected: {control:?}");
    assert_eq!(sql::count(&db, &format!("SELECT count(*) AS n FROM certificates WHERE request_id = '{held}'")), 0);
    // Its claim lapses: now it is taken up too.
    sql::execute(&db, &format!("UPDATE requests SET claimed_until = 0 WHERE id = '{held}'"));
    eventually(Duration::from_secs(15), "the lapsed claim is taken up", || {
        (sql::count(&db, "SELECT count(*) AS n FROM requests WHERE state = 'issued'") == 5).then_some(())
    })
    .await;
    // Exactly once: one issued certificate per request, the one the request names.
    assert_eq!(sql::count(&db, "SELECT count(*) AS n FROM certificates"), 5);
    assert_eq!(
        sql::count(
            &db,
            "SELECT count(*) AS n FROM requests r JOIN certificates c ON c.serial = r.serial \
             WHERE c.request_id = r.id AND c.state = 'issued' AND c.cert_der IS NOT NULL"
        ),
        5
    );
    second.stop().await;
}

#[actix_rt::test]
async fn claims_are_handed_back_on_a_clean_shutdown_sqlite() {
    claims_are_handed_back_on_a_clean_shutdown(TestDb::sqlite()).await;
}

#[actix_rt::test]
async fn claims_are_handed_back_on_a_clean_shutdown_postgres() {
    claims_are_handed_back_on_a_clean_shutdown(TestDb::postgres()).await;
}

fn instance<'a>(status: &'a serde_json::Value, id: &str) -> Option<&'a serde_json::Value> {
    status["instances"].as_array().unwrap().iter().find(|i| i["id"] == id)
}

/// An instance killed with SIGKILL stops heartbeating; the surviving instance's admin status
/// shows it stale once its last heartbeat is older than `registry.stale_after` (2 s here), and
/// not before; the survivor itself stays fresh.
#[actix_rt::test]
async fn an_instance_that_stops_heartbeating_is_shown_stale() {
    let db = TestDb::postgres();
    let stale_after = Duration::from_secs(2);
    let mut config = dev_config(&db);
    config.registry.poll_interval = Duration::from_millis(200);
    config.registry.stale_after = stale_after;
    let survivor_id = config.instance_id.clone().unwrap();
    let survivor = TestServer::start(config).await;

    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("castellum.toml");
    std::fs::write(&config_path, dev_config_text()).unwrap();
    let doomed = format!("doomed-{}", uuid::Uuid::new_v4().simple());
    let env = [
        ("CASTELLUM_DATABASE__URL", db.url.as_str()),
        ("CASTELLUM_INSTANCE_ID", doomed.as_str()),
        ("CASTELLUM_REGISTRY__POLL_INTERVAL", "200ms"),
    ];
    let mut victim = EngineProcess::start(&config_path, &env, Stdio::null(), Stdio::null()).await;

    // Alive: listed, fresh, and its heartbeat advances.
    let mut beats = std::collections::BTreeSet::new();
    let started = Instant::now();
    while beats.len() < 3 {
        let status = admin_status(&survivor).await;
        if let Some(i) = instance(&status, &doomed) {
            assert_eq!(i["stale"], false, "a live instance is not stale: {i}");
            beats.insert(i["heartbeat_at"].as_i64().unwrap());
        }
        assert!(started.elapsed() < Duration::from_secs(10), "the second instance's heartbeat does not advance");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    victim.kill();
    let killed = Instant::now();
    let killed_ms = castellum::pki::now_ms();
    let seen_stale_after = loop {
        let status = admin_status(&survivor).await;
        let i = instance(&status, &doomed).expect("a dead instance stays listed");
        if i["stale"] == true {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < stale_after + Duration::from_secs(2),
            "still shown fresh {:?} after SIGKILL (stale_after {stale_after:?}): {i}",
            killed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Its last heartbeat was at most one poll interval (200 ms) before the kill, so it cannot be
    // stale sooner than stale_after minus that; half of stale_after leaves room for a late beat.
    assert!(seen_stale_after >= stale_after / 2, "shown stale too soon: {seen_stale_after:?}");
    let status = admin_status(&survivor).await;
    assert_eq!(instance(&status, &survivor_id).expect("the survivor is listed")["stale"], false);
    let last_beat = sql::count(&db, &format!("SELECT heartbeat_at AS n FROM instances WHERE id = '{doomed}'"));
    assert!(last_beat <= killed_ms, "nothing heartbeats for the dead instance: {last_beat} > {killed_ms}");
    survivor.stop().await;
}

/// kill -9 in the middle of a synchronous request with an `Idempotency-Key` (issue 15): that
/// attempt died without answering anyone, so it must not fix the key's result. The client's
/// retries on the other instance get a certificate once the dead attempt is past its deadline,
/// every later retry gets the same serial, and the database holds exactly one issued certificate
/// for the request.
#[actix_rt::test]
async fn a_keyed_request_whose_instance_was_killed_is_issued_by_a_retry_on_another() {
    let db = TestDb::postgres();
    let survivor = TestServer::start(dev_config(&db)).await;
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("castellum.toml");
    // The victim stalls each interactive signature 7 s after its write-ahead (a defect on purpose,
    // dev mode only), so the kill lands in the middle of the attempt.
    let victim_config = format!("sabotage = [\"slow-interactive-signing\"]\n{}", dev_config_text());
    std::fs::write(&config_path, victim_config).unwrap();
    let env = [("CASTELLUM_DATABASE__URL", db.url.as_str())];
    let mut victim = EngineProcess::start(&config_path, &env, Stdio::null(), Stdio::null()).await;

    let key = "kill-9-then-retry";
    let body = serde_json::json!({"profile": "tls-server-p256", "csr": csr(Key::P256, &["retried.example.test"])});
    let http = reqwest::Client::new();
    let attempt = |base: &str| {
        http.post(format!("{base}/v1/certificates")).bearer_auth(DEMO_KEY).header("Idempotency-Key", key).json(&body)
    };
    let of_the_key = format!("request_id IN (SELECT id FROM requests WHERE idempotency_key = '{key}')");
    let first = tokio::spawn(attempt(&victim.base).send());
    let signing = format!("SELECT count(*) AS n FROM certificates WHERE state = 'signing' AND {of_the_key}");
    eventually(Duration::from_secs(10), "the first attempt's write-ahead", || {
        (sql::count(&db, &signing) == 1).then_some(())
    })
    .await;
    victim.kill();
    let first = first.await.unwrap();
    assert!(first.is_err(), "the killed instance answered the first attempt: {first:?}");

    // The client retries through the other instance, as through a load balancer.
    let started = Instant::now();
    let mut refusals = Vec::new();
    let serial = loop {
        let response = attempt(&survivor.base).send().await.unwrap();
        let status = response.status().as_u16();
        let answer: serde_json::Value = response.json().await.unwrap_or_default();
        if status == 201 {
            break answer["serial"].as_str().expect("a serial").to_string();
        }
        refusals.push(format!("{status} {}", answer["type"].as_str().unwrap_or("")));
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no certificate for the key after 20 s of retries; answered: {refusals:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    // The dead attempt's deadline (6 s) and the grace (2 s) bound how long that took.
    assert!(started.elapsed() < Duration::from_secs(12), "issued only after {:?}", started.elapsed());
    for _ in 0..3 {
        let response = attempt(&survivor.base).send().await.unwrap();
        assert_eq!(response.status(), 201, "a replay");
        let answer: serde_json::Value = response.json().await.unwrap();
        assert_eq!(answer["serial"], serial.as_str(), "every retry gets the same certificate");
    }
    let issued = format!("SELECT count(*) AS n FROM certificates WHERE state = 'issued' AND {of_the_key}");
    assert_eq!(sql::count(&db, &issued), 1, "one certificate issued for the key");
    let signed_by_the_dead = sql::count(&db, &format!("SELECT count(*) AS n FROM certificates WHERE serial <> '{serial}' AND cert_der IS NOT NULL AND {of_the_key}"));
    assert_eq!(signed_by_the_dead, 0, "the killed attempt signed nothing");
    survivor.stop().await;
}

/// A graceful stop a load balancer can follow (issue 15): on SIGTERM, `/readyz` answers 503
/// "draining" at once while requests are still served for the configured grace; then the
/// listener closes, a request in flight at that moment still gets its certificate, the instance
/// hands back its claims on unfinished asynchronous requests, and it exits 0.
#[actix_rt::test]
async fn sigterm_drains_first_then_stops_cleanly() {
    let db = TestDb::postgres();
    let mut config: toml::Table = toml::from_str(&dev_config_text()).unwrap();
    let grace = Duration::from_millis(1500);
    // A slow signer taking one job at a time on ica-p256: most asynchronous work is unfinished at
    // the stop; the lease is long, so only a hand-back frees it.
    let cas = config["cas"].as_array_mut().unwrap();
    let p256 = cas.iter_mut().find(|c| c["id"].as_str() == Some("ica-p256")).unwrap().as_table_mut().unwrap();
    p256.insert("fault".into(), toml::toml! { sign_latency = "1s" }.into());
    p256.entry("queue")
        .or_insert(toml::Value::Table(Default::default()))
        .as_table_mut()
        .unwrap()
        .insert("in_flight".into(), 1.into());
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("castellum.toml");
    std::fs::write(&config_path, toml::to_string(&config).unwrap()).unwrap();
    let env = [
        ("CASTELLUM_DATABASE__URL", db.url.as_str()),
        ("CASTELLUM_HTTP__DRAIN_GRACE", "1500ms"),
        ("CASTELLUM_ASYNC_REQUESTS__LEASE", "300s"),
    ];
    let log_path = dir.path().join("engine.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut engine = EngineProcess::start(&config_path, &env, Stdio::from(log), Stdio::null()).await;
    let http = reqwest::Client::new();
    let issue = |profile: &str, name: &str, respond_async: bool| {
        let request = http
            .post(format!("{}/v1/certificates", engine.base))
            .bearer_auth(DEMO_KEY)
            .json(&serde_json::json!({"profile": profile, "csr": csr(Key::P256, &[name])}));
        if respond_async {
            request.header("Prefer", "respond-async")
        } else {
            request
        }
    };
    for i in 0..4 {
        let accepted = issue("ocsp-renewal", &format!("drain{i}.example.test"), true).send().await.unwrap();
        assert_eq!(accepted.status(), 202);
    }
    let ready = http.get(format!("{}/readyz", engine.base)).send().await.unwrap();
    assert_eq!(ready.status(), 200);

    engine.terminate();
    let signalled = Instant::now();
    // Readiness flips first...
    loop {
        let ready =
            http.get(format!("{}/readyz", engine.base)).bearer_auth(DEMO_KEY).send().await.expect("still listening");
        if ready.status() == 503 {
            let body: serde_json::Value = ready.json().await.unwrap();
            assert!(body["reasons"].to_string().contains("draining"), "{body}");
            break;
        }
        assert!(signalled.elapsed() < Duration::from_millis(500), "/readyz still 200 after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ...while requests are still served, until the grace ends.
    let during = issue("tls-server-p384", "during-the-drain.example.test", false).send().await.unwrap();
    assert_eq!(during.status(), 201, "served while draining");
    assert!(signalled.elapsed() < grace, "the drain's answers came within the grace");
    // A request still in flight when the listener closes gets its answer: on ica-p256 (1 s per
    // signature, one at a time) sent 200 ms before the grace ends, it is answered after.
    tokio::time::sleep_until((signalled + grace - Duration::from_millis(200)).into()).await;
    let in_flight = issue("tls-server-p256", "in-flight-at-close.example.test", false).send();
    let in_flight = actix_rt::spawn(async move {
        let answer = in_flight.await.map(|r| r.status().as_u16());
        (answer, signalled.elapsed())
    });

    let status = engine.wait_exit(Duration::from_secs(20)).await.expect("the instance exits after the drain");
    let (answer, answered_at) = in_flight.await.unwrap();
    assert_eq!(
        answer.as_ref().ok(),
        Some(&201),
        "the request in flight at the close was answered: {answer:?} at {answered_at:?}"
    );
    assert!(answered_at > grace, "it really was in flight when the listener closed: answered at {answered_at:?}");
    assert!(status.success(), "a graceful stop exits 0: {status}");
    assert!(signalled.elapsed() >= grace, "it served the whole grace before stopping: {:?}", signalled.elapsed());
    assert!(http.get(format!("{}/readyz", engine.base)).send().await.is_err(), "the listener is closed");
    let requests = sql::requests(&db, "1 = 1");
    let pending: Vec<_> = requests.iter().filter(|r| r.state == "pending").collect();
    assert!(!pending.is_empty(), "some asynchronous work was unfinished at the stop: {requests:?}");
    for r in pending {
        assert_eq!((r.claimed_by.as_deref(), r.claimed_until), (None, None), "claim handed back: {r:?}");
    }
    // The registry's LISTEN connection, held for the instance's life, is no leak to report when
    // it goes back to its pool at the stop (it was, as "held longer than the threshold").
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.contains("engine stopped"), "{log}");
    assert!(!log.contains("held longer than the threshold"), "{log}");
}
