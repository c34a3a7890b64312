//! Database connections are bounded by construction: under 200 concurrent requests the engine
//! never holds more PostgreSQL connections than its configured pools (seen by the server itself
//! in `pg_stat_activity`).

mod common;

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;

use common::*;

#[actix_rt::test]
async fn postgres_connections_never_exceed_the_pools_under_200_concurrent_requests() {
    let db = TestDb::postgres();
    let config = dev_config(&db);
    let budget = i64::from(config.database.pools.total_max());
    let server = TestServer::start(config).await;

    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicI64::new(0));
    let samples = Arc::new(AtomicI64::new(0));
    let sampler = {
        let (stop, peak, samples) = (stop.clone(), peak.clone(), samples.clone());
        let mut admin = db.admin();
        let db_name = db.name.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let n = pg_connections(&mut admin, &db_name);
                peak.fetch_max(n, Ordering::Relaxed);
                samples.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        })
    };

    let csrs: Vec<String> = (0..200).map(|i| csr(Key::P256, &[&format!("host{i}.example.test")])).collect();
    let requests = csrs.iter().enumerate().map(|(i, csr)| {
        let server = &server;
        async move {
            if i % 4 == 0 {
                // Some clients read while others issue: the status pool is exercised too.
                let _ = server.http.get(server.url("/readyz")).send().await;
            }
            server.issue(DEMO_KEY, "tls-server-p256", csr).send().await.map(|r| r.status().as_u16())
        }
    });
    let statuses = futures_util::future::join_all(requests).await;
    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();

    let statuses: Vec<u16> = statuses.into_iter().map(|s| s.expect("every request is answered")).collect();
    let issued = statuses.iter().filter(|s| **s == 201).count();
    assert!(statuses.iter().all(|s| matches!(s, 201 | 429 | 503)), "{statuses:?}");
    assert!(issued > 0);
    assert_eq!(counts(&db).0 as usize, issued, "every 201 is one stored certificate");
    let peak = peak.load(Ordering::Relaxed);
    assert!(samples.load(Ordering::Relaxed) > 10, "the sampler ran");
    assert!(peak > 0, "the sampler sees the engine's connections");
    assert!(peak <= budget, "peak {peak} connections, budget {budget}");
    eprintln!("200 concurrent requests: {issued} issued, peak {peak} connections of {budget}");
    server.stop().await;
}
