//! A CA's and a request's lifecycle at its ends: a retired CA (refused at intake, nothing queued,
//! its key never used again, no way back), an asynchronous request that outlives its `max_age`
//! (expired, never signed), and an `Idempotency-Key` on asynchronous requests (one request, one
//! certificate). Judged from the client's side and from the database with raw SQL.

mod common;

use std::time::{Duration, Instant};

use common::*;

fn admin_post(server: &TestServer, path: &str, body: serde_json::Value) -> reqwest::RequestBuilder {
    server.http.post(format!("{}{path}", server.admin_base)).bearer_auth(ADMIN_TOKEN).json(&body)
}

async fn set_ca_state(server: &TestServer, ca: &str, state: &str) -> (u16, serde_json::Value) {
    let resp = admin_post(server, &format!("/admin/v1/cas/{ca}/state"), serde_json::json!({ "state": state }))
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap_or(serde_json::Value::Null))
}

fn cell(status: &serde_json::Value, ca: &str) -> serde_json::Value {
    status["cells"].as_array().unwrap().iter().find(|c| c["ca"] == ca).unwrap().clone()
}

/// Poll the admin status until `ca`'s cell satisfies `check`, or fail with `what` after 10 s.
async fn wait_for_cell(server: &TestServer, ca: &str, what: &str, check: impl Fn(&serde_json::Value) -> bool) {
    let started = Instant::now();
    loop {
        let c = cell(&admin_status(server).await, ca);
        if check(&c) {
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "{what}: {c}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Issue (sync) or submit (async) on `profile`: (status, problem type or request id).
async fn ask(server: &TestServer, profile: &str, name: &str, is_async: bool) -> (u16, serde_json::Value) {
    let mut req = server.issue(DEMO_KEY, profile, &csr(Key::P384, &[name]));
    if is_async {
        req = req.header("prefer", "respond-async");
    }
    let resp = req.send().await.unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

/// The dev configuration with its key files copied to `dir`, so a test may remove and restore
/// them.
fn config_with_own_keys(db: &TestDb, dir: &std::path::Path) -> castellum::Config {
    for entry in std::fs::read_dir(dev_keys()).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
    }
    let text = dev_config_text().replace(&dev_keys().display().to_string(), &dir.display().to_string());
    config_from(&text, db)
}

/// `retired` through the admin API: the CA's requests are refused at intake with `409
/// ca-disabled`, sync or async, and nothing of theirs reaches the database but the audit log;
/// its key is destroyed — shown unavailable, never reloaded when its file changes (a control CA's
/// key, removed and restored at the same time, is), nor after a restart; and no state leads out
/// of `retired`.
#[actix_rt::test]
async fn a_retired_ca_refuses_at_intake_and_never_comes_back() {
    let db = TestDb::sqlite();
    let keys = tempfile::tempdir().unwrap();
    let mut config = config_with_own_keys(&db, keys.path());
    config.audit.refusal_interval = Duration::from_millis(200);
    let server = TestServer::start(config.clone()).await;
    let (status, _) = ask(&server, "tls-server-p384", "before.example.test", false).await;
    assert_eq!(status, 201, "the CA serves before it is retired");

    let (status, body) = set_ca_state(&server, "ica-p384", "retired").await;
    assert_eq!(status, 200, "{body}");
    let cas: serde_json::Value =
        server.http.get(server.url("/v1/cas")).bearer_auth(DEMO_KEY).send().await.unwrap().json().await.unwrap();
    let listed = cas["cas"].as_array().unwrap().iter().find(|c| c["id"] == "ica-p384").unwrap().clone();
    assert_eq!(listed["state"], "retired");
    let c = cell(&admin_status(&server).await, "ica-p384");
    assert_eq!((c["state"].as_str(), c["key_available"].as_bool()), (Some("retired"), Some(false)), "{c}");

    for (i, is_async) in [false, true, false, true].into_iter().enumerate() {
        let (status, problem) = ask(&server, "tls-server-p384", &format!("after{i}.example.test"), is_async).await;
        assert_eq!(status, 409, "{problem}");
        assert_eq!(problem["type"], "urn:castellum:problem:ca-disabled");
    }
    // Never queued or stored: the only trace of the refusals is the audit log.
    assert_eq!(sql::count(&db, "SELECT count(*) AS n FROM requests WHERE ca_id = 'ica-p384'"), 0);
    assert_eq!(sql::count(&db, "SELECT count(*) AS n FROM certificates WHERE ca_id = 'ica-p384'"), 1);
    let started = Instant::now();
    // In aggregate: one row per kind of refusal, counting them.
    let tallied = "SELECT CAST(COALESCE(SUM(count), 0) AS BIGINT) AS n FROM audit_log WHERE outcome = 'ca-disabled'";
    while sql::count(&db, tallied) < 4 {
        assert!(started.elapsed() < Duration::from_secs(5), "the refusals are audited");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Other CAs are not affected.
    assert_eq!(ask(&server, "tls-server-p256", "other.example.test", false).await.0, 201);

    // No way out of retired.
    for state in ["enabled", "parked", "draining", "disabled"] {
        let (status, problem) = set_ca_state(&server, "ica-p384", state).await;
        assert_eq!(status, 409, "retired -> {state}: {problem}");
        assert_eq!(problem["type"], "urn:castellum:problem:conflict");
    }
    assert_eq!(sql::texts(&db, "SELECT state AS s FROM cas WHERE id = 'ica-p384'"), ["retired"]);

    // Its key file removed and restored: the control CA's key comes back, the retired one's not.
    let (p384, p256) = (keys.path().join("ica-p384.key"), keys.path().join("ica-p256.key"));
    let (p384_pem, p256_pem) = (std::fs::read(&p384).unwrap(), std::fs::read(&p256).unwrap());
    std::fs::remove_file(&p384).unwrap();
    std::fs::remove_file(&p256).unwrap();
    wait_for_cell(&server, "ica-p256", "the control CA notices its key is gone", |c| c["key_available"] == false).await;
    std::fs::write(&p384, &p384_pem).unwrap();
    std::fs::write(&p256, &p256_pem).unwrap();
    wait_for_cell(&server, "ica-p256", "the control CA reloads its key", |c| c["key_available"] == true).await;
    assert_eq!(cell(&admin_status(&server).await, "ica-p384")["key_available"], false, "a retired key is not reloaded");
    server.stop().await;

    // Nor after a restart: the key is loaded from its file at start-up, and destroyed at once.
    let server = TestServer::start(config).await;
    let c = cell(&admin_status(&server).await, "ica-p384");
    assert_eq!((c["state"].as_str(), c["key_available"].as_bool()), (Some("retired"), Some(false)), "{c}");
    assert_eq!(ask(&server, "tls-server-p384", "restart.example.test", false).await.0, 409);
    assert_eq!(ask(&server, "tls-server-p384", "restart.example.test", true).await.0, 409);
    assert_eq!(sql::count(&db, "SELECT count(*) AS n FROM certificates WHERE ca_id = 'ica-p384'"), 1);
    assert_eq!(sql::count(&db, "SELECT count(*) AS n FROM requests WHERE ca_id = 'ica-p384'"), 0);
    let readiness = server.http.get(server.url("/readyz")).send().await.unwrap();
    assert_eq!(readiness.status(), 200, "the other CAs serve");
    server.stop().await;
}

/// Retirement is final in the database, not only in the instance that retired the CA: another
/// instance that has not heard of it yet (no LISTEN, a one-minute poll) cannot bring it back.
#[actix_rt::test]
async fn retirement_is_final_across_instances() {
    let db = TestDb::postgres();
    let first = TestServer::start(dev_config(&db)).await;
    let mut late = dev_config(&db);
    late.registry.listen = false;
    late.registry.poll_interval = Duration::from_secs(60);
    let second = TestServer::start(late).await;
    // The second's registry reads the database once as it starts, on a thread of its own; a
    // retirement committed before that read would be "heard". Its heartbeat row is written by
    // that same read, just before it: once both rows exist, the read is done or under way.
    let deadline = Instant::now() + Duration::from_secs(5);
    while sql::count(&db, "SELECT count(*) AS n FROM instances") < 2 {
        assert!(Instant::now() < deadline, "the second instance never wrote its heartbeat");
        actix_rt::time::sleep(Duration::from_millis(10)).await;
    }

    assert_eq!(set_ca_state(&first, "ica-p384", "retired").await.0, 200);
    assert_eq!(cell(&admin_status(&second).await, "ica-p384")["state"], "enabled", "the second has not heard yet");
    let (status, problem) = set_ca_state(&second, "ica-p384", "enabled").await;
    assert_eq!(status, 409, "{problem}");
    assert_eq!(problem["type"], "urn:castellum:problem:conflict");
    assert_eq!(sql::texts(&db, "SELECT state AS s FROM cas WHERE id = 'ica-p384'"), ["retired"]);
    // Other changes still go through from there.
    assert_eq!(set_ca_state(&second, "ica-p256", "parked").await.0, 200);
    assert_eq!(sql::texts(&db, "SELECT state AS s FROM cas WHERE id = 'ica-p256'"), ["parked"]);
    second.stop().await;
    first.stop().await;
}

async fn get_request(server: &TestServer, id: &str) -> serde_json::Value {
    let resp = server.http.get(server.url(&format!("/v1/requests/{id}"))).bearer_auth(DEMO_KEY).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.json().await.unwrap()
}

fn certificates_of(db: &TestDb, request: &str, condition: &str) -> i64 {
    sql::count(db, &format!("SELECT count(*) AS n FROM certificates WHERE request_id = '{request}' AND {condition}"))
}

/// An asynchronous request held (its CA parked) past `async_requests.max_age` ends `expired`,
/// and stays unsigned: unparking and resubmitting the CA does not bring it back, while a control
/// request submitted then is issued.
async fn a_parked_request_past_its_max_age_expires_unsigned(db: TestDb) {
    let mut config = dev_config(&db);
    config.async_requests.max_age = Duration::from_secs(2);
    config.async_requests.resume_interval = Duration::from_millis(100);
    let server = TestServer::start(config).await;
    assert_eq!(set_ca_state(&server, "ica-p256", "parked").await.0, 200);
    let id = submit_async(&server, "ocsp-renewal", "aged.example.test").await;
    assert_eq!(get_request(&server, &id).await["state"], "parked");

    let done = wait_for_request(&server.http, &server.base, &id, Duration::from_secs(10)).await;
    assert_eq!(done["state"], "expired", "{done}");
    assert_eq!(done["error"]["type"], "urn:castellum:problem:deadline-exceeded", "{done}");
    assert!(done["certificate"].is_null(), "{done}");
    let row = &sql::requests(&db, &format!("id = '{id}'"))[0];
    assert_eq!((row.state.as_str(), row.serial.as_deref()), ("expired", None), "{row:?}");
    assert!(row.expires_at <= castellum::pki::now_ms());

    // Unparked and resubmitted: nothing parked is left to resubmit.
    assert_eq!(set_ca_state(&server, "ica-p256", "enabled").await.0, 200);
    let resubmit = admin_post(&server, "/admin/v1/cas/ica-p256/resubmit", serde_json::json!({})).send().await.unwrap();
    assert_eq!(resubmit.status(), 200);
    assert_eq!(resubmit.json::<serde_json::Value>().await.unwrap()["resubmitting"], 0);
    let control = submit_async(&server, "ocsp-renewal", "fresh.example.test").await;
    let issued = wait_for_request(&server.http, &server.base, &control, Duration::from_secs(10)).await;
    assert_eq!(issued["state"], "issued", "{issued}");
    assert_eq!(certificates_of(&db, &control, "state = 'issued'"), 1);
    assert_eq!(certificates_of(&db, &id, "1 = 1"), 0, "the expired request was never even prepared");
    assert_eq!(get_request(&server, &id).await["state"], "expired");
    server.stop().await;
}

#[actix_rt::test]
async fn a_parked_request_past_its_max_age_expires_unsigned_sqlite() {
    a_parked_request_past_its_max_age_expires_unsigned(TestDb::sqlite()).await;
}

#[actix_rt::test]
async fn a_parked_request_past_its_max_age_expires_unsigned_postgres() {
    a_parked_request_past_its_max_age_expires_unsigned(TestDb::postgres()).await;
}

/// A request already in its CA's pipeline when its max age passes (the signer takes 2 s, the
/// max age is 1 s) is not signed: the signer refuses it, its write-ahead record is abandoned, and
/// the request ends — and stays — `expired`.
#[actix_rt::test]
async fn a_request_in_flight_past_its_max_age_is_never_signed() {
    let db = TestDb::sqlite();
    let mut config = dev_config(&db);
    assert_eq!(config.cas[0].id, "ica-p256");
    config.cas[0].fault.sign_latency = Some(Duration::from_secs(2));
    config.async_requests.max_age = Duration::from_secs(1);
    config.async_requests.resume_interval = Duration::from_millis(100);
    let server = TestServer::start(config).await;
    let id = submit_async(&server, "ocsp-renewal", "slow.example.test").await;
    // The signer has had its turn once the write-ahead record is settled one way or the other.
    let started = Instant::now();
    while certificates_of(&db, &id, "state IN ('issued', 'abandoned')") == 0 {
        assert!(started.elapsed() < Duration::from_secs(10), "the signer never finished with it");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(certificates_of(&db, &id, "state = 'issued' OR cert_der IS NOT NULL"), 0, "signed after its max age");
    let done = wait_for_request(&server.http, &server.base, &id, Duration::from_secs(5)).await;
    assert_eq!(done["state"], "expired", "{done}");
    let row = &sql::requests(&db, &format!("id = '{id}'"))[0];
    assert_eq!((row.state.as_str(), row.serial.as_deref()), ("expired", None), "{row:?}");
    server.stop().await;
}

/// `Idempotency-Key` with `Prefer: respond-async`: concurrent and later retries get the same
/// request (same id, same Location), a synchronous retry gets its certificate, another body under
/// the key is `422`; one request row and one certificate in the database.
async fn idempotent_async_retries_make_one_request(db: TestDb) {
    let server = TestServer::start(dev_config(&db)).await;
    let body = csr(Key::P256, &["idem-async.example.test"]);
    let send = |prefer_async: bool, csr: &str| {
        let req = server.issue(DEMO_KEY, "ocsp-renewal", csr).header("idempotency-key", "renew-7");
        let req = if prefer_async { req.header("prefer", "respond-async") } else { req };
        req.send()
    };
    let answers = futures_util::future::join_all((0..3).map(|_| send(true, &body))).await;
    let mut seen = Vec::new();
    for resp in answers {
        let resp = resp.unwrap();
        assert_eq!(resp.status(), 202);
        let location = resp.headers()["location"].to_str().unwrap().to_string();
        let json: serde_json::Value = resp.json().await.unwrap();
        seen.push((json["request_id"].as_str().unwrap().to_string(), location));
    }
    let (id, location) = seen[0].clone();
    assert_eq!(location, format!("/v1/requests/{id}"));
    assert!(seen.iter().all(|s| *s == seen[0]), "every attempt is the one request: {seen:?}");

    let done = wait_for_request(&server.http, &server.base, &id, Duration::from_secs(10)).await;
    assert_eq!(done["state"], "issued", "{done}");
    let serial = done["certificate"]["serial"].as_str().unwrap().to_string();
    // A retry after it was issued: the same request again.
    let later = send(true, &body).await.unwrap();
    assert_eq!(later.status(), 202);
    assert_eq!(later.headers()["location"].to_str().unwrap(), location);
    // A synchronous retry under the same key gets that request's certificate.
    let sync = send(false, &body).await.unwrap();
    assert_eq!(sync.status(), 201);
    assert_eq!(sync.json::<serde_json::Value>().await.unwrap()["serial"].as_str(), Some(serial.as_str()));
    // Another body under the same key, either way, is refused.
    let other = csr(Key::P256, &["other-body.example.test"]);
    for prefer_async in [true, false] {
        let resp = send(prefer_async, &other).await.unwrap();
        assert_eq!(resp.status(), 422);
        let problem: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(problem["type"], "urn:castellum:problem:idempotency-key-reuse");
    }

    assert_eq!(sql::count(&db, "SELECT count(*) AS n FROM requests"), 1);
    assert_eq!(
        sql::count(&db, "SELECT count(*) AS n FROM requests WHERE idempotency_key = 'renew-7' AND client = 'demo'"),
        1
    );
    assert_eq!(sql::count(&db, "SELECT count(*) AS n FROM certificates"), 1);
    assert_eq!(certificates_of(&db, &id, &format!("serial = '{serial}' AND state = 'issued'")), 1);
    server.stop().await;
}

#[actix_rt::test]
async fn idempotent_async_retries_make_one_request_sqlite() {
    idempotent_async_retries_make_one_request(TestDb::sqlite()).await;
}

#[actix_rt::test]
async fn idempotent_async_retries_make_one_request_postgres() {
    idempotent_async_retries_make_one_request(TestDb::postgres()).await;
}
