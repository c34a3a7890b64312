//! A component that holds database connections longer than it should is reported — by name,
//! while it still holds them — and issuance keeps serving from its own bulkhead.

mod common;

use std::time::Duration;

use common::*;

#[actix_rt::test]
async fn a_leaking_component_is_named_before_the_pool_runs_out() {
    let logs = CapturedLog::default();
    let writer = logs.clone();
    // Global, as in the binary: the leaking thread's spans must exist too (nextest runs each
    // test in its own process).
    tracing::subscriber::set_global_default(
        tracing_subscriber::fmt().with_writer(move || writer.clone()).with_ansi(false).finish(),
    )
    .unwrap();
    let db = TestDb::sqlite();
    let mut config = dev_config(&db);
    config.database.slow_hold_threshold = Duration::from_millis(300);
    let server = TestServer::start(config).await;

    // The leak: a report builder takes both control connections and keeps them.
    let pools = server.engine.pools().clone();
    let leak = std::thread::spawn(move || {
        let _span = tracing::info_span!("nightly_report_builder").entered();
        let held: Vec<_> = (0..2).map(|_| pools.control.get().expect("connection")).collect();
        std::thread::sleep(Duration::from_millis(1500));
        drop(held);
    });
    tokio::time::sleep(Duration::from_millis(1000)).await;

    // Reported while still held: metric and a log line naming the holder.
    let metrics = server.engine.metrics_text();
    let longest = metrics
        .lines()
        .find_map(|l| l.strip_prefix("castellum_db_pool_longest_hold_seconds{pool=\"control\"} "))
        .map(|v| v.trim().parse::<f64>().unwrap())
        .unwrap();
    assert!(longest >= 0.3, "longest hold {longest}");
    assert!(metrics.contains("castellum_db_pool_long_holds_total{pool=\"control\"} 2"), "{metrics}");
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(
        text.lines().any(|l| l.contains("held longer than the threshold") && l.contains("nightly_report_builder")),
        "{text}"
    );
    // The issuance path and the health endpoints keep answering from their own pools.
    let resp =
        server.issue(DEMO_KEY, "tls-server-p256", &csr(Key::P256, &["during.example.test"])).send().await.unwrap();
    assert_eq!(resp.status(), 201);
    assert_eq!(server.http.get(server.url("/readyz")).send().await.unwrap().status(), 200);
    leak.join().unwrap();
    server.stop().await;
}
