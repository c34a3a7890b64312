//! The database under stress, for real: the engine's connections under a 20× burst, counted by
//! PostgreSQL for a role allowed more than the engine's budget, and the database going away
//! mid-load and coming back.

mod common;

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

#[actix_rt::test]
async fn postgres_a_connection_limited_role_is_never_exceeded_under_a_20x_burst() {
    // The dev pools: issuance 1 + control 2 + status 4 + admin 1 + audit 1 = 9. The role may open
    // 10 more than that, so the server never enforces the budget: an engine that overshoots it is
    // seen doing so.
    const BUDGET: u32 = 9;
    let limited = LimitedDb::new(BUDGET + 10);
    let mut config = dev_config(&limited.db);
    assert_eq!(config.database.pools.total_max(), BUDGET);
    config.database.server_max_connections = BUDGET + 10;
    config.database.reserved_connections = 10;
    let server = Arc::new(TestServer::start(config).await);

    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicI64::new(0));
    let samples = Arc::new(AtomicI64::new(0));
    let sampler = {
        let (stop, peak, samples, role) = (stop.clone(), peak.clone(), samples.clone(), limited.role.clone());
        let mut admin = limited.db.admin();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                // By role and backend type; panics (failing the test) if PostgreSQL cannot be asked.
                peak.fetch_max(pg_role_connections(&mut admin, &role), Ordering::Relaxed);
                samples.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    // Normal load: 10 clients. The burst: 200 at once, each issuing eight times (twice was over in
    // 43 samples once the engine got faster: the sampler must see the burst, not its tail).
    let csr = Arc::new(csr(Key::P256, &["burst.example.test"]));
    let clients: Vec<_> = (0..200)
        .map(|i| {
            let (server, csr) = (server.clone(), csr.clone());
            actix_rt::spawn(async move {
                let mut out = Vec::new();
                for _ in 0..8 {
                    let started = Instant::now();
                    let resp = if i % 5 == 0 {
                        server.http.get(server.url("/readyz")).send().await.unwrap()
                    } else {
                        server.issue(DEMO_KEY, "tls-server-p256", &csr).send().await.unwrap()
                    };
                    out.push((resp.status().as_u16(), started.elapsed()));
                }
                out
            })
        })
        .collect();
    let results: Vec<_> = futures_util::future::join_all(clients).await.into_iter().flat_map(|r| r.unwrap()).collect();
    stop.store(true, Ordering::Relaxed);
    sampler.join().expect("the connection sampler saw every sample through");

    let peak = peak.load(Ordering::Relaxed);
    let samples = samples.load(Ordering::Relaxed);
    eprintln!("the sampler ran {samples} times during the burst; peak {peak} connections");
    assert!(samples >= 50, "the sampler ran {samples} times");
    assert!(peak > 0 && peak <= i64::from(BUDGET), "peak {peak} connections for a budget of {BUDGET}");
    for (status, took) in &results {
        assert!(matches!(status, 200 | 201 | 429 | 503), "{status}");
        assert!(*took < Duration::from_millis(6500), "answered after {took:?}: no timeouts past the deadline");
    }
    let issued = results.iter().filter(|r| r.0 == 201).count();
    assert!(issued > 0);
    let metrics = server.engine.metrics_text();
    assert!(!metrics.contains("outcome=\"database-unavailable\""), "the engine never found the database unavailable");
    eprintln!(
        "400 requests from 200 clients: {issued} issued, peak {peak} of {BUDGET} connections over {samples} samples"
    );
    Arc::try_unwrap(server).ok().expect("no other owner").stop().await;
}

#[actix_rt::test]
async fn postgres_the_database_going_away_mid_load_never_hangs_a_request() {
    let db = TestDb::postgres();
    let proxy = DbProxy::start("127.0.0.1:5432");
    let mut config = dev_config(&db);
    config.database.url = proxy.url_for(&db);
    let server = Arc::new(TestServer::start(config).await);
    let csr = Arc::new(csr(Key::P256, &["outage.example.test"]));
    let wait = Duration::from_secs(2);
    let started = Instant::now();
    let until = started + Duration::from_secs(7);
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (server, csr) = (server.clone(), csr.clone());
            actix_rt::spawn(async move {
                let mut out = Vec::new();
                while Instant::now() < until {
                    let sent = Instant::now();
                    let resp = server
                        .issue(DEMO_KEY, "tls-server-p256", &csr)
                        .header("prefer", "wait=2")
                        .send()
                        .await
                        .unwrap();
                    out.push((sent.duration_since(started), resp.status().as_u16(), sent.elapsed()));
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                out
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    proxy.cut();
    let cut_at = started.elapsed();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let ready = server.http.get(server.url("/readyz")).bearer_auth(DEMO_KEY).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    let why: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(why["database"], "unavailable", "{why}");
    tokio::time::sleep(Duration::from_millis(2000)).await;
    proxy.restore();
    let restore_at = started.elapsed();
    let results: Vec<_> = futures_util::future::join_all(clients).await.into_iter().flat_map(|r| r.unwrap()).collect();

    for (_, status, took) in &results {
        assert!(*took < wait + Duration::from_millis(300), "a request took {took:?}");
        assert!(matches!(status, 201 | 503), "{status}");
    }
    let during =
        results.iter().filter(|(at, _, took)| *at > cut_at + Duration::from_millis(200) && *at + *took < restore_at);
    let during: Vec<_> = during.collect();
    assert!(
        !during.is_empty() && during.iter().all(|(_, s, _)| *s == 503),
        "refused fast during the outage: {during:?}"
    );
    let after = results.iter().filter(|(at, s, _)| *at > restore_at + Duration::from_millis(1000) && *s == 201).count();
    assert!(after > 0, "issuance resumed without a restart: {results:?}");
    assert!(results.iter().any(|(at, s, _)| *at < cut_at && *s == 201));
    let slowest_refusal = during.iter().map(|(_, _, took)| *took).max().unwrap_or_default();
    eprintln!("cut at {cut_at:?}, restored at {restore_at:?}; slowest refusal during the outage {slowest_refusal:?}");
    let ready = server.http.get(server.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    eprintln!("{} requests across a 3 s outage, none past its deadline", results.len());
    Arc::try_unwrap(server).ok().expect("no other owner").stop().await;
}
