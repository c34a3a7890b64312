//! Failure isolation and overload control with real faults: a CA's key file removed at runtime,
//! a slow signer, a client over its rate.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

fn p99(latencies: &mut [Duration]) -> Duration {
    latencies.sort();
    latencies[((latencies.len() as f64 * 0.99).ceil() as usize).saturating_sub(1)]
}

struct Phase {
    healthy_latencies: Vec<Duration>,
    healthy_statuses: Vec<u16>,
    flood_statuses: Vec<u16>,
}

/// For `length`: 4 clients issue from the healthy CA one request after another, while 8
/// clients flood `flood_profile`.
async fn phase(
    server: &Arc<TestServer>,
    flood_profile: &'static str,
    flood_csr: &Arc<String>,
    length: Duration,
) -> Phase {
    let healthy_csr = Arc::new(csr(Key::P256, &["healthy.example.test"]));
    let until = Instant::now() + length;
    let healthy = (0..4).map(|_| {
        let (server, csr) = (server.clone(), healthy_csr.clone());
        actix_rt::spawn(async move {
            let mut out = Vec::new();
            while Instant::now() < until {
                let started = Instant::now();
                let status = server.issue(DEMO_KEY, "tls-server-p256", &csr).send().await.unwrap().status().as_u16();
                out.push((started.elapsed(), status));
            }
            out
        })
    });
    let healthy: Vec<_> = healthy.collect(); // spawn now, not when awaited
    let flood = (0..8).map(|_| {
        let (server, csr) = (server.clone(), flood_csr.clone());
        actix_rt::spawn(async move {
            let mut out = Vec::new();
            while Instant::now() < until {
                out.push(server.issue(DEMO_KEY, flood_profile, &csr).send().await.unwrap().status().as_u16());
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            out
        })
    });
    let flood: Vec<_> = flood.collect();
    let healthy: Vec<_> = futures_util::future::join_all(healthy).await.into_iter().flat_map(|r| r.unwrap()).collect();
    let flood_statuses = futures_util::future::join_all(flood).await.into_iter().flat_map(|r| r.unwrap()).collect();
    Phase {
        healthy_latencies: healthy.iter().map(|(l, _)| *l).collect(),
        healthy_statuses: healthy.iter().map(|(_, s)| *s).collect(),
        flood_statuses,
    }
}

fn breaker_of(metrics: &str, ca: &str) -> Option<i64> {
    let prefix = format!("castellum_breaker_state{{ca=\"{ca}\"}} ");
    metrics.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.trim().parse().ok())
}

#[actix_rt::test]
async fn a_ca_losing_its_key_never_slows_the_others() {
    let db = TestDb::sqlite();
    let keys = tempfile::tempdir().unwrap();
    let key_path = keys.path().join("ica-p384.key");
    std::fs::copy(dev_keys().join("ica-p384.key"), &key_path).unwrap();
    let text = dev_config_text()
        .replace(&dev_keys().join("ica-p384.key").display().to_string(), &key_path.display().to_string())
        .replacen("expected_sign_rate = 1500.0", "expected_sign_rate = 1500.0\n[cas.breaker]\nopen_for = \"1s\"", 1);
    let server = Arc::new(TestServer::start(config_from(&text, &db)).await);
    let flood_csr = Arc::new(csr(Key::P384, &["flood.example.test"]));

    // Baseline: the same traffic, no fault.
    let mut base = phase(&server, "tls-server-p384", &flood_csr, Duration::from_secs(3)).await;
    assert!(base.healthy_statuses.iter().all(|s| *s == 201));
    assert!(base.flood_statuses.len() > 100, "the flood ran: {}", base.flood_statuses.len());
    assert!(base.flood_statuses.iter().all(|s| *s == 201), "baseline flood is issued");

    // Fault: the key file disappears; the watcher notices within half a second.
    std::fs::remove_file(&key_path).unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let mut fault = phase(&server, "tls-server-p384", &flood_csr, Duration::from_secs(3)).await;

    let healthy_ok = fault.healthy_statuses.iter().filter(|s| **s == 201).count();
    assert_eq!(healthy_ok, fault.healthy_statuses.len(), "healthy CA keeps 100% success");
    let (p99_base, p99_fault) = (p99(&mut base.healthy_latencies), p99(&mut fault.healthy_latencies));
    eprintln!(
        "healthy CA: {} requests at baseline (p99 {p99_base:?}), {} with the fault (p99 {p99_fault:?}); flood: {} answered",
        base.healthy_latencies.len(),
        fault.healthy_latencies.len(),
        fault.flood_statuses.len()
    );
    assert!(p99_fault <= p99_base * 2, "p99 {p99_fault:?} with the fault vs {p99_base:?} without");
    assert!(fault.flood_statuses.len() > 100, "the flood ran: {}", fault.flood_statuses.len());
    assert!(fault.flood_statuses.iter().all(|s| *s == 503), "failing CA answers 503: {:?}", fault.flood_statuses);
    let metrics = server.engine.metrics_text();
    assert!(metrics.contains("castellum_breaker_transitions_total{ca=\"ica-p384\",to=\"open\"}"), "{metrics}");
    assert_eq!(breaker_of(&metrics, "ica-p256"), Some(0), "no other breaker moved");
    assert!(!metrics.contains("castellum_breaker_transitions_total{ca=\"ica-p256\""));

    // The key comes back: probes close the breaker and the CA issues again.
    std::fs::copy(dev_keys().join("ica-p384.key"), &key_path).unwrap();
    let started = Instant::now();
    loop {
        let status = server.issue(DEMO_KEY, "tls-server-p384", &flood_csr).send().await.unwrap().status();
        if status == 201 && breaker_of(&server.engine.metrics_text(), "ica-p384") == Some(0) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "the breaker did not close after the key returned");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(server
        .engine
        .metrics_text()
        .contains("castellum_breaker_transitions_total{ca=\"ica-p384\",to=\"closed\"} 1"));
    Arc::try_unwrap(server).ok().expect("no other owner").stop().await;
}

#[actix_rt::test]
async fn work_whose_deadline_passes_in_the_queue_is_never_signed() {
    let db = TestDb::sqlite();
    // ica-p256 with one signer thread that takes 150 ms per signature.
    let text = dev_config_text().replacen(
        "signer_threads = 2\nexpected_sign_rate = 4000.0",
        "signer_threads = 1\nexpected_sign_rate = 4000.0\n[cas.queue]\nin_flight = 1\n[cas.fault]\nsign_latency = \"150ms\"",
        1,
    );
    let server = Arc::new(TestServer::start(config_from(&text, &db)).await);
    let csr = Arc::new(csr(Key::P256, &["slow.example.test"]));
    let wait = Duration::from_secs(1);
    let requests = (0..30).map(|_| {
        let (server, csr) = (server.clone(), csr.clone());
        actix_rt::spawn(async move {
            let started = Instant::now();
            let resp = server.issue(DEMO_KEY, "tls-server-p256", &csr).header("prefer", "wait=1").send().await.unwrap();
            let retry_after = resp.headers().contains_key("retry-after");
            (resp.status().as_u16(), started.elapsed(), retry_after)
        })
    });
    let results: Vec<_> = futures_util::future::join_all(requests).await.into_iter().map(|r| r.unwrap()).collect();
    // Let anything still inside the signer finish, so every signature is counted.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let issued = results.iter().filter(|r| r.0 == 201).count();
    assert!((3..30).contains(&issued), "some issued, some not: {results:?}");
    for (status, took, retry_after) in &results {
        assert!(*status == 201 || (*status == 503 && *retry_after), "{status}");
        assert!(*took < wait + Duration::from_millis(250), "answered after {took:?}");
    }
    let metrics = server.engine.metrics_text();
    let signed = metrics
        .lines()
        .find_map(|l| l.strip_prefix("castellum_signatures_total{ca=\"ica-p256\"} "))
        .map(|v| v.trim().parse::<usize>().unwrap())
        .unwrap_or(0);
    assert_eq!(signed, issued, "signatures == successful responses: nothing signed after its deadline");
    let stored_issued = castellum::db::queries::count_certificates_in_state(&mut db.conn(), "issued").unwrap();
    assert_eq!(stored_issued as usize, issued, "every stored certificate was answered 201");
    assert!(
        metrics_count(&metrics, "castellum_expired_in_queue_total{ca=\"ica-p256\"} ") > 0,
        "some expired in the queue"
    );
    eprintln!("30 requests with 1 s to live at ~6/s: {issued} issued, the rest 503 in time");
    Arc::try_unwrap(server).ok().expect("no other owner").stop().await;
}

fn metrics_count(metrics: &str, prefix: &str) -> usize {
    metrics.lines().find_map(|l| l.strip_prefix(prefix)).map(|v| v.trim().parse().unwrap()).unwrap_or(0)
}

#[actix_rt::test]
async fn over_its_rate_a_client_gets_429_and_an_overloaded_ca_503() {
    let db = TestDb::sqlite();
    let other_profiles = "profiles = [\"tls-server-p256\", \"signing-identity\"]";
    let text = dev_config_text();
    assert!(text.contains(other_profiles), "the dev configuration's client `other` changed");
    let text = text.replacen(other_profiles, &format!("{other_profiles}\nrate = {{ per_second = 1, burst = 2 }}"), 1);
    let server = TestServer::start(config_from(&text, &db)).await;
    let csr = csr(Key::P256, &["rate.example.test"]);
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let resp = server.issue(OTHER_KEY, "tls-server-p256", &csr).send().await.unwrap();
        statuses
            .push((resp.status().as_u16(), resp.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string())));
    }
    assert_eq!(statuses[0].0, 201);
    assert_eq!(statuses[1].0, 201);
    assert_eq!(statuses[2].0, 429, "{statuses:?}");
    assert!(statuses[2].1.as_deref().is_some_and(|s| s.parse::<u64>().unwrap() >= 1));
    // Another client is not limited by this one's rate.
    assert_eq!(server.issue(DEMO_KEY, "tls-server-p256", &csr).send().await.unwrap().status(), 201);
    server.stop().await;

    // An overloaded CA: its queue cannot hold more, the answer is 503 with Retry-After.
    let db = TestDb::sqlite();
    let text = dev_config_text().replacen(
        "signer_threads = 2\nexpected_sign_rate = 4000.0",
        "signer_threads = 1\nexpected_sign_rate = 4000.0\n[cas.queue]\nin_flight = 1\ninteractive_capacity = 2\n[cas.fault]\nsign_latency = \"300ms\"",
        1,
    );
    let server = Arc::new(TestServer::start(config_from(&text, &db)).await);
    let csr = Arc::new(csr);
    let burst = (0..10).map(|_| {
        let (server, csr) = (server.clone(), csr.clone());
        actix_rt::spawn(async move {
            let resp = server.issue(DEMO_KEY, "tls-server-p256", &csr).send().await.unwrap();
            (resp.status().as_u16(), resp.headers().contains_key("retry-after"))
        })
    });
    let results: Vec<_> = futures_util::future::join_all(burst).await.into_iter().map(|r| r.unwrap()).collect();
    assert!(results.contains(&(503, true)), "{results:?}");
    assert!(results.iter().all(|r| r.0 == 201 || *r == (503, true)), "{results:?}");
    Arc::try_unwrap(server).ok().expect("no other owner").stop().await;
}

#[actix_rt::test]
async fn a_renewal_storm_coalesces_into_one_signature() {
    let db = TestDb::sqlite();
    let text = dev_config_text().replacen(
        "signer_threads = 2\nexpected_sign_rate = 4000.0",
        "signer_threads = 1\nexpected_sign_rate = 4000.0\n[cas.queue]\nin_flight = 1\n[cas.fault]\nsign_latency = \"300ms\"",
        1,
    );
    let server = TestServer::start(config_from(&text, &db)).await;
    let renewal = csr(Key::P256, &["ocsp.example.test"]);
    let other = csr(Key::P256, &["ocsp2.example.test"]);
    let submit = |csr: &str| server.issue(DEMO_KEY, "ocsp-renewal", csr).header("prefer", "respond-async").send();
    let mut ids = Vec::new();
    for body in std::iter::once(&renewal).chain(std::iter::repeat_n(&renewal, 20)).chain(std::iter::once(&other)) {
        let resp = submit(body).await.unwrap();
        assert_eq!(resp.status(), 202);
        ids.push(resp.json::<serde_json::Value>().await.unwrap()["request_id"].as_str().unwrap().to_string());
    }
    let mut serials = Vec::new();
    for id in &ids {
        let body = wait_for_request(&server.http, &server.base, id, Duration::from_secs(10)).await;
        assert_eq!(body["state"], "issued", "{body}");
        serials.push(body["certificate"]["serial"].as_str().unwrap().to_string());
    }
    let distinct: std::collections::HashSet<_> = serials.iter().collect();
    assert_eq!(distinct.len(), 2, "21 identical renewals share one certificate, the other key has its own");
    assert!(serials[..21].iter().all(|s| *s == serials[0]));
    let metrics = server.engine.metrics_text();
    assert_eq!(metrics_count(&metrics, "castellum_signatures_total{ca=\"ica-p256\"} "), 2);
    assert_eq!(metrics_count(&metrics, "castellum_coalesced_total{ca=\"ica-p256\"} "), 20);
    server.stop().await;
}

#[actix_rt::test]
async fn a_ca_whose_key_is_missing_at_start_up_starts_failed_and_recovers() {
    let db = TestDb::sqlite();
    let keys = tempfile::tempdir().unwrap();
    let key_path = keys.path().join("ica-rsa3072.key");
    let text = dev_config_text()
        .replace(&dev_keys().join("ica-rsa3072.key").display().to_string(), &key_path.display().to_string());
    // check-config refuses it …
    let config = config_from(&text, &db);
    let (problems, _) = castellum::config::check_config(&config);
    assert!(problems.iter().any(|p| p.path == "cas[2].key_file" && p.key_unavailable), "{problems:?}");
    // … but the engine starts, with that CA failed and the others serving.
    let server = TestServer::start(config).await;
    let ready: serde_json::Value = server.http.get(server.url("/readyz")).send().await.unwrap().json().await.unwrap();
    assert_eq!(ready["cas_serving"], 3, "{ready}");
    let rsa_csr = csr(Key::Rsa(2048), &["rsa.example.test"]);
    let refused = server.issue(DEMO_KEY, "tls-server-rsa", &rsa_csr).send().await.unwrap();
    assert_eq!(refused.status(), 503);
    let ok = server.issue(DEMO_KEY, "tls-server-p256", &csr(Key::P256, &["ok.example.test"])).send().await.unwrap();
    assert_eq!(ok.status(), 201);
    // The key file appears: the CA serves without a restart.
    std::fs::copy(dev_keys().join("ica-rsa3072.key"), &key_path).unwrap();
    let started = Instant::now();
    while server.issue(DEMO_KEY, "tls-server-rsa", &rsa_csr).send().await.unwrap().status() != 201 {
        assert!(started.elapsed() < Duration::from_secs(10), "the CA did not recover");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let ready: serde_json::Value = server.http.get(server.url("/readyz")).send().await.unwrap().json().await.unwrap();
    assert_eq!(ready["cas_serving"], 4);
    server.stop().await;
}

#[actix_rt::test]
async fn a_crashed_cell_is_replaced_and_the_other_cas_never_notice() {
    let db = TestDb::sqlite();
    let server = Arc::new(TestServer::start(dev_config(&db)).await);
    let until = Instant::now() + Duration::from_secs(3);
    let other = {
        let server = server.clone();
        let csr = csr(Key::P384, &["steady.example.test"]);
        actix_rt::spawn(async move {
            let mut statuses = Vec::new();
            while Instant::now() < until {
                statuses.push(server.issue(DEMO_KEY, "tls-server-p384", &csr).send().await.unwrap().status().as_u16());
            }
            statuses
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.engine.crash_cell("ica-p256").unwrap();
    let p256 = csr(Key::P256, &["again.example.test"]);
    let crashed_at = Instant::now();
    while server.issue(DEMO_KEY, "tls-server-p256", &p256).send().await.unwrap().status() != 201 {
        assert!(crashed_at.elapsed() < Duration::from_secs(3), "the cell was not replaced");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("ica-p256 issuing again {:?} after its cell crashed", crashed_at.elapsed());
    let statuses = other.await.unwrap();
    assert!(statuses.len() > 50 && statuses.iter().all(|s| *s == 201), "other CA: {statuses:?}");
    assert_eq!(metrics_count(&server.engine.metrics_text(), "castellum_cell_restarts_total{ca=\"ica-p256\"} "), 1);
    // The replacement follows registry changes like the original.
    server.engine.set_ca_state("test", "ica-p256", "disabled").await.unwrap();
    assert_eq!(server.issue(DEMO_KEY, "tls-server-p256", &p256).send().await.unwrap().status(), 409);
    Arc::try_unwrap(server).ok().expect("no other owner").stop().await;
}
