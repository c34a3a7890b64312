//! The engine as a library: one call starts it in-process on a temporary SQLite file with the dev
//! keys; the typed handle issues, looks up, reports readiness and metrics, and shuts down.

mod common;

use std::time::{Duration, Instant};

use castellum::{EngineError, IssueRequest};
use common::*;

#[actix_rt::test]
async fn an_application_embeds_the_engine() {
    let db = TestDb::sqlite();
    let engine = castellum::Engine::start(dev_config(&db)).await.expect("engine starts");
    let client = engine.client("demo").expect("sample client");

    let issued = engine
        .issue(
            &client,
            IssueRequest {
                profile: "tls-server-p256".into(),
                csr_pem: csr(Key::P256, &["embedded.example.test"]),
                ..Default::default()
            },
        )
        .await
        .expect("issued");
    let looked_up = engine.certificate(&client, &issued.serial).await.expect("stored");
    assert_eq!(looked_up.certificate, issued.certificate);

    // The stored certificate is the one answered, and the write-ahead record's TBS, which it
    // contains byte for byte, is no longer stored beside it.
    let row = sql::certificate(&db, &issued.serial).expect("stored");
    let (_, pem) = x509_parser::pem::parse_x509_pem(issued.certificate.as_bytes()).unwrap();
    assert_eq!(row.cert_der.as_deref(), Some(pem.contents.as_slice()), "stored certificate = answered certificate");
    assert!(row.tbs_der.is_empty(), "the TBS is kept only while the record is signing: {} bytes", row.tbs_der.len());
    assert_eq!(row.state, "issued");

    // Refusals are typed.
    let refused = engine
        .issue(
            &client,
            IssueRequest { profile: "tls-server-p256".into(), csr_pem: "junk".into(), ..Default::default() },
        )
        .await;
    assert!(matches!(refused, Err(EngineError::MalformedCsr(_))), "{refused:?}");

    let readiness = engine.readiness().await;
    assert!(readiness.ready, "{readiness:?}");
    assert_eq!(readiness.cas_serving, 4);

    let metrics = engine.metrics_text();
    for family in [
        "castellum_requests_total{outcome=\"issued\"} 1",
        "castellum_requests_total{outcome=\"malformed-csr\"} 1",
        "castellum_queue_depth{ca=\"ica-p256\",lane=\"interactive\"} 0",
        "castellum_sign_duration_seconds_count{ca=\"ica-p256\"} 1",
        "castellum_db_pool_max{pool=\"issuance\"} 1",
        "castellum_db_pool_connections{pool=\"status\"}",
        "castellum_db_pool_wait_seconds_bucket",
        "castellum_store_batch_size_count",
    ] {
        assert!(metrics.contains(family), "{family} missing from /metrics:\n{metrics}");
    }

    engine.shutdown().await;
    let after = engine
        .issue(
            &client,
            IssueRequest {
                profile: "tls-server-p256".into(),
                csr_pem: csr(Key::P256, &["late.example.test"]),
                ..Default::default()
            },
        )
        .await;
    assert_eq!(after, Err(EngineError::ShuttingDown));
    assert!(!engine.readiness().await.ready);
}

/// Write-ahead: the record made durable before the signature holds exactly the TBS the CA key then
/// signs (read while the signature is held back, compared with the certificate answered).
#[actix_rt::test]
async fn the_write_ahead_record_holds_the_tbs_that_is_then_signed() {
    let db = TestDb::sqlite();
    let mut config = dev_config(&db);
    ca_of(&mut config, "ica-p256").fault.sign_latency = Some(Duration::from_millis(500));
    let engine = castellum::Engine::start(config).await.expect("engine starts");
    let client = engine.client("demo").expect("sample client");
    let request = IssueRequest {
        profile: "tls-server-p256".into(),
        csr_pem: csr(Key::P256, &["write-ahead.example.test"]),
        ..Default::default()
    };
    let issuing = actix_rt::spawn(async move { engine.issue(&client, request).await });

    let started = Instant::now();
    let recorded = loop {
        let rows = sql::certificates(&db);
        if let Some(row) = rows.into_iter().find(|r| r.names("write-ahead.example.test")) {
            assert_eq!(row.state, "signing", "the record is read while the signature is held back");
            break row;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "no write-ahead record appeared");
        actix_rt::time::sleep(Duration::from_millis(10)).await;
    };
    let issued = issuing.await.unwrap().expect("issued");
    let (_, pem) = x509_parser::pem::parse_x509_pem(issued.certificate.as_bytes()).unwrap();
    let cert = pem.parse_x509().unwrap();
    assert_eq!(recorded.serial, issued.serial);
    assert_eq!(recorded.tbs_der, cert.tbs_certificate.as_ref(), "recorded TBS = signed TBS");
}

#[actix_rt::test]
async fn health_and_readiness_over_http() {
    let db = TestDb::sqlite();
    let server = TestServer::start(dev_config(&db)).await;
    assert_eq!(server.http.get(server.url("/healthz")).send().await.unwrap().status(), 200);
    // A load balancer (no credentials) learns only whether; a client also why, and the pools.
    let ready = server.http.get(server.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    let body: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(body, serde_json::json!({ "ready": true }));
    let ready = server.http.get(server.url("/readyz")).bearer_auth(DEMO_KEY).send().await.unwrap();
    let body: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(body["database"], "ok");
    assert!(body["pools"].is_array(), "{body}");
    let wrong = server.http.get(server.url("/readyz")).bearer_auth("not-a-key").send().await.unwrap();
    assert_eq!(wrong.status(), 401);
    let metrics = server.http.get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("castellum_registry_version"));
    server.stop().await;
}

/// An application that depends on castellum with `default-features = false` gets the engine
/// without the command line's tools: no HTTP client, chart library or argument parser.
#[test]
fn the_library_without_its_tools_pulls_in_no_client_or_chart_library() {
    let out = std::process::Command::new(env!("CARGO"))
        .args(["tree", "--no-default-features", "-e", "normal", "--prefix", "none", "--offline"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo tree runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let tree = String::from_utf8_lossy(&out.stdout);
    assert!(tree.lines().any(|l| l.starts_with("actix ")), "the engine's own dependencies are listed:\n{tree}");
    for tool in ["reqwest ", "plotters ", "clap "] {
        assert!(!tree.lines().any(|l| l.starts_with(tool)), "{tool}is compiled into the bare library:\n{tree}");
    }
}
