//! The circuit breaker, judged from the client's side and from the database with raw SQL: when
//! it opens, callers still queued are answered at once (not at their deadline); only signer
//! failures open it — refusals, policy errors and deadlines never do.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;

/// 16 callers queue on a CA whose every signature fails (200 ms each, one at a time). After
/// `consecutive_failures` = 3 signer failures the breaker opens, and the 13 callers still queued
/// are answered 503 at once — long before the 6 s deadline they would otherwise wait out.
#[actix_rt::test]
async fn when_the_breaker_opens_queued_callers_are_answered_at_once() {
    let db = TestDb::sqlite();
    let mut config = dev_config(&db);
    let deadline = config.lanes.interactive.default_deadline;
    let ca = ca_of(&mut config, "ica-p256");
    ca.signer_threads = 1;
    ca.queue.in_flight = 1;
    ca.fault.sign_latency = Some(Duration::from_millis(200));
    ca.fault.failure_rate = 1.0;
    ca.breaker.consecutive_failures = 3;
    ca.breaker.open_for = Duration::from_secs(60);
    let server = Arc::new(TestServer::start(config).await);

    let names: Vec<String> = (0..16).map(|i| format!("queued-{i}.example.test")).collect();
    let calls = names.iter().map(|name| {
        let (server, csr) = (server.clone(), csr(Key::P256, &[name]));
        actix_rt::spawn(async move { answer_of(server.issue(DEMO_KEY, "tls-server-p256", &csr)).await })
    });
    let answers: Vec<Answer> = futures_util::future::join_all(calls).await.into_iter().map(|r| r.unwrap()).collect();

    let failed: Vec<&Answer> = answers.iter().filter(|a| a.slug() == "signer-failure").collect();
    let refused: Vec<&Answer> = answers.iter().filter(|a| a.slug() == "ca-unavailable").collect();
    eprintln!(
        "signer failures answered after {:?}; breaker refusals after {:?} (deadline {deadline:?})",
        failed.iter().map(|a| a.took).collect::<Vec<_>>(),
        refused.iter().map(|a| a.took).collect::<Vec<_>>()
    );
    assert!(answers.iter().all(|a| a.status == 503 && a.retry_after.is_some_and(|s| s >= 1)), "{answers:#?}");
    assert_eq!(failed.len(), 3, "three signer failures open the breaker: {answers:#?}");
    assert_eq!(refused.len(), 13, "every other caller is refused by the breaker: {answers:#?}");
    // Queued behind three 200 ms failures, they are answered when the breaker opens (~0.6 s),
    // not when their deadline passes: well inside the first quarter of it.
    let last_failure = failed.iter().map(|a| a.took).max().unwrap();
    for a in &refused {
        assert!(a.took < deadline / 4, "a queued caller waited {:?} of its {deadline:?} deadline", a.took);
    }
    assert!(
        refused.iter().map(|a| a.took).max().unwrap() < last_failure + deadline / 10,
        "refusals follow the opening failure at once"
    );

    // The breaker stays open: a new request is refused at intake, at once, before any CSR work.
    let late = answer_of(server.issue(DEMO_KEY, "tls-server-p256", &csr(Key::P256, &["late.example.test"]))).await;
    assert!(late.is_503("ca-unavailable"), "{late:?}");
    assert!(late.took < deadline / 4, "{late:?}");
    let status = admin_status(&server).await;
    assert_eq!(cell_in(&status, "ica-p256").unwrap()["breaker"], "open", "{status}");

    // Raw SQL: nothing issued; a record exists only for the three that reached the signer.
    let started = std::time::Instant::now();
    let rows = loop {
        let rows = sql::certificates(&db);
        if rows.iter().all(|r| r.state == "abandoned") || started.elapsed() > Duration::from_secs(5) {
            break rows;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(rows.len(), 3, "{rows:?}");
    assert!(rows.iter().all(|r| r.state == "abandoned"), "{rows:?}");
    let recorded: Vec<&String> = names.iter().filter(|n| rows.iter().any(|r| r.names(n))).collect();
    assert_eq!(recorded.len(), 3, "only the three signed-and-failed requests were recorded: {recorded:?}");
    assert!(!rows.iter().any(|r| r.names("late.example.test")));
    Arc::try_unwrap(server).ok().expect("no other owner").stop().await;
}

/// Hundreds of refusals of every kind that is not a signer failure — unknown profile, disabled
/// CA, bad CSRs and policy violations, a client over its rate, deadlines too short to sign in,
/// in the queue and in the signer — sent to a CA whose breaker opens on any failure among two
/// outcomes. It never opens: a valid request afterwards is signed. Then one real signer failure
/// (an injected signer panic) opens it with the same thresholds: the refusals would have, had
/// they counted.
#[actix_rt::test]
async fn refusals_deadlines_and_bad_requests_never_open_the_breaker() {
    let db = TestDb::sqlite();
    let mut config = dev_config(&db);
    let other = config.clients.iter_mut().find(|c| c.name == "other").expect("client other");
    other.rate = Some(castellum::config::RateConfig { per_second: 1, burst: 1 });
    let ca = ca_of(&mut config, "ica-p256");
    ca.signer_threads = 1;
    ca.queue.in_flight = 1;
    ca.fault.sign_latency = Some(Duration::from_millis(100));
    ca.breaker.consecutive_failures = 1;
    ca.breaker.min_requests = 2;
    ca.breaker.failure_ratio = 0.01;
    ca.breaker.open_for = Duration::from_secs(60);
    let server = Arc::new(TestServer::start(config).await);
    let good = csr(Key::P256, &["good.example.test"]);
    let mut seen: Vec<Answer> = Vec::new();

    // Refused at intake: unknown profile, malformed CSR, weak key, names outside the policy.
    let weak = csr(Key::Rsa(1024), &["weak.example.test"]);
    let outside = csr(Key::P256, &["evil.example.com"]);
    for _ in 0..20 {
        for (profile, body, want) in [
            ("no-such-profile", good.as_str(), 404),
            ("tls-server-p256", "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n", 400),
            ("tls-server-p256", weak.as_str(), 422),
            ("tls-server-p256", outside.as_str(), 422),
        ] {
            let a = answer_of(server.issue(DEMO_KEY, profile, body)).await;
            assert_eq!(a.status, want, "{a:?}");
            seen.push(a);
        }
    }
    // A client over its rate (1/s, burst 1): 429.
    let theirs = csr(Key::P256, &["good.other.example.test"]);
    let mut limited = 0;
    for _ in 0..20 {
        let a = answer_of(server.issue(OTHER_KEY, "tls-server-p256", &theirs)).await;
        assert!(a.status == 201 || a.status == 429, "{a:?}");
        limited += usize::from(a.status == 429);
        seen.push(a);
    }
    assert!(limited >= 15, "the client was limited: {}", tally(&seen));
    // Deadlines too short to sign in: dropped at dequeue (wait=0) …
    for _ in 0..20 {
        let a = answer_of(server.issue(DEMO_KEY, "tls-server-p256", &good).header("prefer", "wait=0")).await;
        assert!(a.is_503("deadline-exceeded"), "{a:?}");
        seen.push(a);
    }
    // … and in the queue or the signer: 40 callers with 1 s to live, 100 ms per signature.
    let burst = (0..40).map(|i| {
        let (server, csr) = (server.clone(), csr(Key::P256, &[&format!("burst-{i}.example.test")]));
        actix_rt::spawn(async move {
            answer_of(server.issue(DEMO_KEY, "tls-server-p256", &csr).header("prefer", "wait=1")).await
        })
    });
    let burst: Vec<Answer> = futures_util::future::join_all(burst).await.into_iter().map(|r| r.unwrap()).collect();
    seen.extend(burst.iter().cloned());
    let expired = burst.iter().filter(|a| a.status == 503).count();
    assert!(expired >= 20, "most of the burst ran out of time: {}", tally(&burst));
    assert!(
        burst.iter().all(|a| a.status == 201 || a.is_503("deadline-exceeded") || a.is_503("ca-overloaded")),
        "{burst:#?}"
    );
    // The CA disabled: 409 at intake.
    let admin = |state: &'static str| {
        server
            .http
            .post(format!("{}/admin/v1/cas/ica-p256/state", server.admin_base))
            .bearer_auth(ADMIN_TOKEN)
            .json(&serde_json::json!({ "state": state }))
            .send()
    };
    assert_eq!(admin("disabled").await.unwrap().status(), 200);
    for _ in 0..20 {
        let a = answer_of(server.issue(DEMO_KEY, "tls-server-p256", &good)).await;
        assert_eq!((a.status, a.slug()), (409, "ca-disabled"), "{a:?}");
        seen.push(a);
    }
    assert_eq!(admin("enabled").await.unwrap().status(), 200);
    eprintln!("{} answers before the check: {}", seen.len(), tally(&seen));

    // The breaker never opened: a valid request is signed, and the admin status agrees.
    let after = answer_of(server.issue(DEMO_KEY, "tls-server-p256", &good)).await;
    assert_eq!(after.status, 201, "a valid request after the refusals: {after:?}");
    let cell = cell_in(&admin_status(&server).await, "ica-p256").unwrap();
    assert_eq!(cell["breaker"], "closed", "{cell}");
    assert_eq!(cell["breaker_transitions"], serde_json::json!([]), "{cell}");

    // Control: with these thresholds (any failure among two or more outcomes) one signer failure
    // opens it; any refusal above, had it been counted, would have.
    server.engine.panic_signer("ica-p256", 1).unwrap();
    let failed = answer_of(server.issue(DEMO_KEY, "tls-server-p256", &csr(Key::P256, &["p.example.test"]))).await;
    assert!(failed.is_503("signer-failure"), "{failed:?}");
    let refused = answer_of(server.issue(DEMO_KEY, "tls-server-p256", &good)).await;
    assert!(refused.is_503("ca-unavailable"), "a signer failure opens the breaker: {refused:?}");
    assert_eq!(cell_in(&admin_status(&server).await, "ica-p256").unwrap()["breaker"], "open");
    Arc::try_unwrap(server).ok().expect("no other owner").stop().await;
}

/// How many answers of each status and problem type.
fn tally(answers: &[Answer]) -> String {
    let mut counts: std::collections::BTreeMap<(u16, &str), usize> = Default::default();
    for a in answers {
        *counts.entry((a.status, a.slug())).or_default() += 1;
    }
    format!("{counts:?}")
}
