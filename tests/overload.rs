//! Overload answers, judged from the client's side and from the database with raw SQL: a CA whose
//! queue is full (`ca-overloaded`), a store with too many writes waiting (`store-overloaded`), a
//! cell whose mailbox is full (`ca-overloaded`, "mailbox full"), and an identity vault with too
//! many signatures waiting (`identity-signer-busy`). Each is a `503` with `Retry-After`, answered
//! at once, and leaves nothing in the database for the refused request.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

/// Fire one request per name at `profile`, all at once; answers in the names' order.
async fn burst(server: &Arc<TestServer>, profile: &'static str, names: &[String]) -> Vec<Answer> {
    let calls: Vec<_> = names
        .iter()
        .map(|name| {
            let (server, csr) = (server.clone(), csr(Key::P256, &[name]));
            actix_rt::spawn(async move { answer_of(server.issue(DEMO_KEY, profile, &csr)).await })
        })
        .collect();
    futures_util::future::join_all(calls).await.into_iter().map(|r| r.unwrap()).collect()
}

/// Raw SQL: a refused request left no certificate record, and every `201` has its issued record.
fn judge_records(db: &TestDb, names: &[String], answers: &[Answer]) {
    let rows = sql::certificates(db);
    for (name, answer) in names.iter().zip(answers) {
        let mine: Vec<&sql::Certificate> = rows.iter().filter(|r| r.names(name)).collect();
        if answer.status == 201 {
            assert_eq!(mine.len(), 1, "{name}: one record for a 201: {mine:?}");
            assert_eq!(mine[0].state, "issued");
            assert_eq!(answer.body["serial"].as_str(), Some(mine[0].serial.as_str()));
        } else {
            assert!(mine.is_empty(), "{name} was refused ({answer:?}) yet recorded: {mine:?}");
        }
    }
}

/// ica-p256 signs one at a time, 1 s per signature, and queues at most 2: of 10 callers at once,
/// 1 + 2 are signed and 7 are refused at once, before a single signature could complete.
#[actix_rt::test]
async fn a_full_ca_queue_answers_ca_overloaded_at_once_and_stores_nothing() {
    let db = TestDb::sqlite();
    let mut config = dev_config(&db);
    let ca = ca_of(&mut config, "ica-p256");
    ca.signer_threads = 1;
    ca.queue.in_flight = 1;
    ca.queue.interactive_capacity = 2;
    ca.fault.sign_latency = Some(Duration::from_secs(1));
    let server = Arc::new(TestServer::start(config).await);
    let names: Vec<String> = (0..10).map(|i| format!("q{i}.example.test")).collect();
    let answers = burst(&server, "tls-server-p256", &names).await;

    let issued = answers.iter().filter(|a| a.status == 201).count();
    let refused: Vec<&Answer> = answers.iter().filter(|a| a.status != 201).collect();
    assert_eq!(issued, 3, "one in flight and two queued are signed: {answers:#?}");
    assert!(refused.iter().all(|a| a.is_503("ca-overloaded")), "{refused:#?}");
    assert!(
        refused.iter().all(|a| a.took < Duration::from_secs(1)),
        "refused before one signature (1 s) could finish, so never queued: {refused:#?}"
    );
    judge_records(&db, &names, &answers);
    Arc::try_unwrap(server).ok().expect("no other owner").stop().await;
}

/// The store's bound is `store.max_pending` writes waiting for a worker. The test holds SQLite's
/// write lock, so the only store worker is stuck on its first write; 2 more wait; of 12 callers
/// the other 9 are refused `store-overloaded` at once. Released, the 3 admitted are issued: a
/// signed certificate's hand-over to the store is never refused for the full queue.
#[actix_rt::test]
async fn a_full_store_answers_store_overloaded_and_stores_nothing() {
    let db = TestDb::sqlite();
    let mut config = dev_config(&db);
    config.store.max_pending = 2;
    // One write per batch, so exactly one is held in the worker (with more, the worker may take
    // two waiting write-ahead records as one batch and a fourth caller finds room).
    config.store.max_batch = 1;
    assert_eq!(config.database.pools.issuance.max_size, 1, "one store worker");
    let server = Arc::new(TestServer::start(config).await);
    let warm = answer_of(server.issue(DEMO_KEY, "tls-server-p256", &csr(Key::P256, &["warm.example.test"]))).await;
    assert_eq!(warm.status, 201);

    let mut lock = sql::RawConn::open(&db);
    lock.execute("PRAGMA busy_timeout = 5000; BEGIN IMMEDIATE;");
    let names: Vec<String> = (0..12).map(|i| format!("s{i}.example.test")).collect();
    let answered = Arc::new(AtomicUsize::new(0));
    let call = |name: &String| {
        let (server, csr, answered) = (server.clone(), csr(Key::P256, &[name]), answered.clone());
        actix_rt::spawn(async move {
            let a = answer_of(server.issue(DEMO_KEY, "tls-server-p256", &csr)).await;
            answered.fetch_add(1, Ordering::SeqCst);
            a
        })
    };
    // The first caller's write-ahead record goes alone, and the others only once the worker holds
    // it: sent together, two could be waiting before the worker takes the first.
    let mut calls = vec![call(&names[0])];
    until_the_store_commits_a_batch(&server).await;
    calls.extend(names[1..].iter().map(call));
    // Hold the lock until the refusals are in (or 1.5 s, below the engine's 2 s busy_timeout).
    let locked_at = Instant::now();
    while answered.load(Ordering::SeqCst) < 9 && locked_at.elapsed() < Duration::from_millis(1500) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    lock.execute("COMMIT");
    let answers: Vec<Answer> = futures_util::future::join_all(calls).await.into_iter().map(|r| r.unwrap()).collect();

    let refused: Vec<&Answer> = answers.iter().filter(|a| a.status != 201).collect();
    assert_eq!(answers.len() - refused.len(), 3, "one write in the worker and max_pending = 2 waiting: {answers:#?}");
    assert!(refused.iter().all(|a| a.is_503("store-overloaded")), "{refused:#?}");
    assert!(
        refused.iter().all(|a| a.took < Duration::from_secs(1)),
        "refused at once, not after the lock: {refused:#?}"
    );
    judge_records(&db, &names, &answers);
    Arc::try_unwrap(server).ok().expect("no other owner").stop().await;
}

/// The cell's mailbox holds 1024 messages. The cell is stalled (a dev-only lever blocks its
/// thread for 3 s) and filled through the engine's handle; HTTP callers then get `ca-overloaded`
/// ("mailbox full") at once, nothing of theirs is stored, and once the cell wakes the CA issues
/// again — without having signed any of the fillers, whose 1 s deadline passed in the mailbox.
#[actix_rt::test]
async fn a_full_cell_mailbox_answers_ca_overloaded_at_once_and_stores_nothing() {
    let db = TestDb::sqlite();
    let server = Arc::new(TestServer::start(dev_config(&db)).await);
    let client = server.engine.authenticate(DEMO_KEY).unwrap();
    let filler = csr(Key::P256, &["filler.example.test"]);
    server.engine.stall_cell("ica-p256", Duration::from_secs(3)).unwrap();
    let stalled_at = Instant::now();
    let mailbox_full = Arc::new(AtomicUsize::new(0));
    let fillers: Vec<_> = (0..1100)
        .map(|_| {
            let (engine, client, mailbox_full) = (server.engine.clone(), client.clone(), mailbox_full.clone());
            let request = castellum::IssueRequest {
                profile: "tls-server-p256".into(),
                csr_pem: filler.clone(),
                wait: Some(Duration::from_secs(1)),
                idempotency_key: None,
            };
            actix_rt::spawn(async move {
                let result = engine.issue(&client, request).await;
                if matches!(&result, Err(castellum::EngineError::CaOverloaded { reason, .. }) if reason == "mailbox full")
                {
                    mailbox_full.fetch_add(1, Ordering::SeqCst);
                }
                result.is_ok()
            })
        })
        .collect();
    while mailbox_full.load(Ordering::SeqCst) == 0 {
        assert!(stalled_at.elapsed() < Duration::from_secs(2), "the mailbox never filled");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let names: Vec<String> = (0..5).map(|i| format!("m{i}.example.test")).collect();
    let mut answers = Vec::new();
    for name in &names {
        answers.push(answer_of(server.issue(DEMO_KEY, "tls-server-p256", &csr(Key::P256, &[name]))).await);
    }
    assert!(stalled_at.elapsed() < Duration::from_secs(3), "judged while the cell was still stalled");
    for a in &answers {
        assert!(a.is_503("ca-overloaded"), "{a:?}");
        assert!(a.body["detail"].as_str().unwrap_or("").contains("mailbox full"), "{a:?}");
        assert!(a.took < Duration::from_secs(1), "answered at once, not when the cell wakes: {a:?}");
    }
    // Another CA never noticed.
    let other = answer_of(server.issue(DEMO_KEY, "tls-server-p384", &csr(Key::P384, &["p384.example.test"]))).await;
    assert_eq!(other.status, 201, "{other:?}");

    let signed_fillers =
        futures_util::future::join_all(fillers).await.into_iter().filter(|r| *r.as_ref().unwrap()).count();
    // 1100 fillers were handed to the cell within the stall (they take well under a second): the
    // mailbox took exactly its 1024 and refused the rest.
    assert_eq!(1100 - mailbox_full.load(Ordering::SeqCst), 1024, "the mailbox holds 1024 messages");
    assert_eq!(signed_fillers, 0, "fillers whose deadline passed in the mailbox are never signed");
    let woke = Instant::now();
    let after = loop {
        let a = answer_of(server.issue(DEMO_KEY, "tls-server-p256", &csr(Key::P256, &["after.example.test"]))).await;
        if a.status == 201 || woke.elapsed() > Duration::from_secs(10) {
            break a;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(after.status, 201, "the CA issues again once its cell wakes: {after:?}");
    judge_records(&db, &names, &answers);
    let rows = sql::certificates(&db);
    assert!(!rows.iter().any(|r| r.names("filler.example.test")), "no filler was even recorded");
    assert_eq!(rows.len(), 2, "only the other CA's and the recovery certificate: {rows:?}");
    Arc::try_unwrap(server).ok().expect("no other owner").stop().await;
}

/// The identity vault accepts 256 signatures waiting (a constant, not configurable). With one
/// vault thread made slow (dev-only `[identities.fault] sign_latency = 2s`, 3 s deadlines), 256 signature
/// requests fill it; the next ones are refused `identity-signer-busy` at once, and a use is
/// counted (raw SQL) only for a signature that was answered 200.
#[actix_rt::test]
async fn a_full_identity_vault_answers_identity_signer_busy_and_counts_no_use() {
    use base64::Engine as _;
    let db = TestDb::sqlite();
    let mut config = dev_config(&db);
    config.identities.signer_threads = 1;
    config.identities.fault.sign_latency = Some(Duration::from_secs(2));
    config.lanes.interactive.default_deadline = Duration::from_secs(3);
    config.lanes.interactive.max_deadline = Duration::from_secs(3);
    config.database.pools.status.max_size = 32;
    let profile = config.profiles.iter_mut().find(|p| p.id == "signing-identity-p384").unwrap();
    profile.identity.as_mut().unwrap().max_uses = 10_000;
    let server = Arc::new(TestServer::start(config).await);
    let created = server
        .http
        .post(server.url("/v1/identities"))
        .bearer_auth(DEMO_KEY)
        .json(&serde_json::json!({ "profile": "signing-identity-p384", "subject": { "common_name": "Vault Test" } }))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let id = created.json::<serde_json::Value>().await.unwrap()["id"].as_str().unwrap().to_string();
    let digest = base64::engine::general_purpose::STANDARD.encode(openssl::sha::sha256(b"a contract"));
    let sign = {
        let (server, id, digest) = (server.clone(), id.clone(), digest.clone());
        move || {
            server
                .http
                .post(server.url(&format!("/v1/identities/{id}/signatures")))
                .bearer_auth(DEMO_KEY)
                .json(&serde_json::json!({ "digest": digest, "digest_algorithm": "sha256" }))
        }
    };
    // Fill the vault in waves (the status pool bounds concurrent identity reads), pacing by the
    // admin status's count of waiting signatures.
    let started = Instant::now();
    let mut waiting = Vec::new();
    loop {
        let vault = admin_status(&server).await["identities"]["vault_waiting"].as_u64().unwrap();
        if vault >= 256 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(3), "the vault did not fill: {vault} waiting");
        for _ in 0..(256 - vault).min(16) {
            let request = sign();
            waiting.push(actix_rt::spawn(async move { answer_of(request).await }));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut refused = Vec::new();
    for _ in 0..10 {
        refused.push(answer_of(sign()).await);
    }
    drop(sign);
    let waited: Vec<Answer> = futures_util::future::join_all(waiting).await.into_iter().map(|r| r.unwrap()).collect();
    for a in &refused {
        assert!(a.is_503("identity-signer-busy"), "{a:?}");
        assert!(a.took < Duration::from_secs(1), "refused at once, not after waiting: {a:?}");
    }
    let ok = waited.iter().filter(|a| a.status == 200).count();
    eprintln!(
        "{} waited: {ok} signed, the rest {:?}",
        waited.len(),
        waited.iter().map(Answer::slug).collect::<std::collections::BTreeSet<_>>()
    );
    assert!(ok >= 1, "the vault signed something");
    assert!(
        waited.iter().all(|a| a.status == 200
            || a.is_503("deadline-exceeded")
            || a.is_503("identity-signer-busy")
            || a.is_503("database-unavailable")),
        "{waited:#?}"
    );
    assert_eq!(sql::identity(&db, &id).uses, ok as i64, "a use is counted for each 200 and nothing else");
    Arc::try_unwrap(server).ok().expect("no other owner").stop().await;
}

/// The vault's fault knob is a dev-only lever: `check-config` refuses it in production mode.
#[test]
fn the_vault_fault_knob_is_refused_outside_dev_mode() {
    let db = TestDb::sqlite();
    let flagged = |latency: Option<Duration>, mode: castellum::config::Mode| {
        let mut config = dev_config(&db);
        config.mode = mode;
        config.identities.fault.sign_latency = latency;
        castellum::check::check_config(&config).0.iter().any(|p| p.path == "identities.fault" && !p.warning)
    };
    use castellum::config::Mode;
    assert!(flagged(Some(Duration::from_secs(1)), Mode::Production));
    assert!(!flagged(None, Mode::Production));
    assert!(!flagged(Some(Duration::from_secs(1)), Mode::Dev));
}
