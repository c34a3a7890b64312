//! The API's contract (issue 16): the OpenAPI 3.1 description the engine serves at
//! `/openapi.json` is the one kept in `docs/openapi.json`, and schemathesis (someone else's tool,
//! PyPI, pinned in `.ci/prepare`) finds against a live engine with the dev keys no 5xx and no
//! answer that departs from it: status codes, content types, headers, JSON bodies (problem
//! details included), DER bodies parsed by Python's `cryptography` (tests/schemathesis).

mod common;

use std::time::Duration;

use common::*;

#[actix_rt::test]
async fn the_served_description_is_the_one_kept_in_the_repository() {
    let db = TestDb::sqlite();
    let server = TestServer::start(dev_config(&db)).await;
    let resp = server.http.get(server.url("/openapi.json")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let served = resp.text().await.unwrap();
    let kept = std::fs::read_to_string(repo().join("docs/openapi.json")).unwrap();
    assert!(
        served == kept,
        "docs/openapi.json is not what the engine serves: `cargo run -- openapi > docs/openapi.json`"
    );
    let doc: serde_json::Value = serde_json::from_str(&served).unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    server.stop().await;
}

/// A wrong method on a described path is `405` with the `Allow` the description gives, as
/// problem details; an undescribed path stays `404`.
#[actix_rt::test]
async fn a_wrong_method_is_405_with_allow() {
    let db = TestDb::sqlite();
    let server = TestServer::start(dev_config(&db)).await;
    for (method, path, allow) in [
        (reqwest::Method::DELETE, "/v1/certificates", "POST"),
        (reqwest::Method::PUT, "/v1/certificates/00ff", "GET"),
        (reqwest::Method::GET, "/v1/certificates/00ff/revoke", "POST"),
        (reqwest::Method::OPTIONS, "/ocsp", "POST"),
    ] {
        let resp = server.http.request(method.clone(), server.url(path)).bearer_auth(DEMO_KEY).send().await.unwrap();
        assert_eq!(resp.status(), 405, "{method} {path}");
        assert_eq!(resp.headers()["allow"], allow, "{method} {path}");
        assert_eq!(resp.headers()["content-type"], "application/problem+json");
        let body: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(body["type"], "urn:castellum:problem:method-not-allowed");
    }
    let resp = server.http.delete(server.url("/v2/nothing")).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    server.stop().await;
}

#[actix_rt::test]
async fn schemathesis_finds_every_answer_as_described() {
    let db = TestDb::sqlite();
    let server = TestServer::start(dev_config(&db)).await;
    let work = tempfile::tempdir().unwrap();
    let schema = server.url("/openapi.json");
    let run = tokio::process::Command::new("schemathesis")
        .current_dir(work.path())
        .env("PYTHONPATH", repo().join("tests/schemathesis"))
        .env("SCHEMATHESIS_HOOKS", "castellum_hooks")
        .env("NO_COLOR", "1")
        .args(["run", &schema, "--header", &format!("Authorization: Bearer {DEMO_KEY}")])
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,\
             response_headers_conformance,response_schema_conformance",
        ])
        // Bounded: 20 examples per operation and phase, 60 s in all, one request at a time.
        .args(["--max-examples", "20", "--max-time", "60", "--workers", "1", "--request-timeout", "20"])
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(240), run)
        .await
        .expect("schemathesis ends within its bound")
        .expect("schemathesis runs (.ci/prepare installs it)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "schemathesis found answers that depart from the description:\n{stdout}\n{stderr}");
    // Not a vacuous pass: it ran thousands of cases, every operation, and reached issuance.
    let generated = stdout
        .lines()
        .find_map(|l| l.trim().strip_suffix(" passed")?.split_once(" generated, ").map(|(n, _)| n.trim().to_string()))
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no test-case count in:\n{stdout}"));
    assert!(generated >= 1_000, "only {generated} cases:\n{stdout}");
    assert!(stdout.contains("Tested: 15"), "not every operation was tested:\n{stdout}");
    let metrics = server.http.get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let issued: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("castellum_requests_total{") && l.contains("outcome=\"issued\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(issued > 0.0, "schemathesis never got a certificate issued:\n{stdout}");
    server.stop().await;
}
