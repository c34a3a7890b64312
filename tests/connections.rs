//! Database connections are bounded by construction: under 200 concurrent requests the engine
//! never holds more PostgreSQL connections than its configured pools, as the server itself counts
//! them in `pg_stat_activity` (by the engine's own role and the client-backend type, sampled
//! every few milliseconds), with a role limit above the budget so that an engine that overshoots
//! is seen doing it rather than refused by the server.

mod common;

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;

/// Refusals an overloaded engine may answer with; each carries a Retry-After.
const REFUSALS: &[&str] =
    &["rate-limited", "ca-overloaded", "deadline-exceeded", "store-overloaded", "database-unavailable"];

#[actix_rt::test]
async fn postgres_connections_never_exceed_the_pools_under_200_concurrent_requests() {
    let budget =
        castellum::config::Config::from_toml(&dev_config_text(), &dev_keys()).unwrap().database.pools.total_max();
    let limited = LimitedDb::new(budget + 10);
    let config = dev_config(&limited.db);
    assert_eq!(config.database.pools.total_max(), budget);
    let server = TestServer::start(config).await;

    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicI64::new(0));
    let samples = Arc::new(AtomicI64::new(0));
    let sampler = {
        let (stop, peak, samples) = (stop.clone(), peak.clone(), samples.clone());
        let mut admin = limited.db.admin();
        let role = limited.role.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                // Panics (and so fails the test) if PostgreSQL cannot be asked.
                peak.fetch_max(pg_role_connections(&mut admin, &role), Ordering::Relaxed);
                samples.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };

    let csrs: Vec<String> = (0..200).map(|i| csr(Key::P256, &[&format!("host{i}.example.test")])).collect();
    let requests = csrs.iter().enumerate().map(|(i, csr)| {
        let server = &server;
        async move {
            let mut ready = None;
            if i % 4 == 0 {
                // Some clients read while others issue: the status pool is exercised too.
                let resp = server.http.get(server.url("/readyz")).send().await.expect("/readyz is answered");
                let status = resp.status().as_u16();
                ready = Some((status, resp.json::<serde_json::Value>().await.unwrap_or_default()));
            }
            let resp = server.issue(DEMO_KEY, "tls-server-p256", csr).send().await.expect("every request is answered");
            let status = resp.status().as_u16();
            let retry_after = resp.headers().get("retry-after").map(|v| v.to_str().unwrap_or_default().to_string());
            let body = resp.json::<serde_json::Value>().await.unwrap_or_default();
            (ready, status, retry_after, body)
        }
    });
    let answers = futures_util::future::join_all(requests).await;
    stop.store(true, Ordering::Relaxed);
    sampler.join().expect("the connection sampler saw every sample through");

    // /readyz: ready, or a 503 that says why. Under this burst of 50 probes at once the status
    // pool's waiting line fills and a probe is refused with the reason "database: database
    // unavailable" (the pool, not the database: the warnings name the saturated status pool).
    let mut ready_ok = 0;
    for (status, body) in answers.iter().filter_map(|a| a.0.as_ref()) {
        match status {
            200 => {
                assert_eq!(body["ready"], true, "{body}");
                ready_ok += 1;
            }
            503 => {
                let reasons = body["reasons"].as_array().cloned().unwrap_or_default();
                assert!(
                    body["ready"] == false
                        && !reasons.is_empty()
                        && reasons.iter().all(|r| r.as_str().is_some_and(|r| r.starts_with("database:"))),
                    "an unready answer must say why: {body}"
                );
            }
            _ => panic!("/readyz answered {status}: {body}"),
        }
    }
    assert!(ready_ok > 0, "no readiness probe got through while issuance was loaded (its own bulkhead)");
    // Issuance: a certificate, or a refusal with a type and a Retry-After.
    let mut issued = 0;
    for (_, status, retry_after, body) in &answers {
        match status {
            201 => {
                assert!(body["certificate"].as_str().is_some_and(|c| c.contains("BEGIN CERTIFICATE")), "{body}");
                issued += 1;
            }
            429 | 503 => {
                let kind = body["type"].as_str().unwrap_or_default().trim_start_matches("urn:castellum:problem:");
                assert!(REFUSALS.contains(&kind), "{status} {body}");
                let after: Option<u64> = retry_after.as_deref().and_then(|s| s.parse().ok());
                assert!(after.is_some_and(|s| s >= 1), "{status} {kind} without a Retry-After: {retry_after:?}");
            }
            _ => panic!("answered {status}: {body}"),
        }
    }
    assert!(issued > 0, "nothing issued");
    let stored = sql::count(&limited.db, "SELECT count(*) AS n FROM certificates WHERE state = 'issued'");
    assert_eq!(stored, issued, "every 201 is one issued certificate in the database (raw SQL), and no other");

    let peak = peak.load(Ordering::Relaxed);
    let samples = samples.load(Ordering::Relaxed);
    // The burst lasts about a second (the debug build is optimised) and PostgreSQL answers a
    // sample in a few to tens of milliseconds under it: a sampler that ran fewer times than this
    // did not watch the burst.
    assert!(samples >= 20, "the sampler ran {samples} times");
    assert!(peak > 0, "the sampler sees the engine's connections");
    assert!(peak <= i64::from(budget), "peak {peak} connections, budget {budget} (the role may open {})", budget + 10);
    let refused = answers.len() as i64 - issued;
    eprintln!(
        "200 concurrent requests: {issued} issued, {refused} refused; /readyz 200 {ready_ok} of 50; \
         peak {peak} connections of {budget} over {samples} samples"
    );
    server.stop().await;
}
