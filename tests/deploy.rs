//! The shipped load-balancer deployment (`deploy/haproxy.cfg`, issue 15): HAProxy itself accepts
//! it (and refuses a broken copy), its numbers agree with castellum's configuration, and run in
//! front of a real engine it passes castellum's refusals through with their `Retry-After`, and
//! answers `503` with `Retry-After` itself when no instance is up.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use castellum::drill::haproxy::{self, Haproxy};
use common::*;

fn shipped() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/haproxy.cfg")
}

fn shipped_errors() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/errors")
}

/// A copy of the shipped configuration (and its error pages) with `edit` applied.
fn copy_with(edit: impl FnOnce(String) -> String) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(shipped()).unwrap();
    std::fs::create_dir(dir.path().join("errors")).unwrap();
    for page in std::fs::read_dir(shipped_errors()).unwrap() {
        let page = page.unwrap().path();
        std::fs::copy(&page, dir.path().join("errors").join(page.file_name().unwrap())).unwrap();
    }
    let path = dir.path().join("haproxy.cfg");
    std::fs::write(&path, edit(text)).unwrap();
    (dir, path)
}

#[test]
fn haproxy_accepts_the_shipped_configuration_and_refuses_a_broken_one() {
    haproxy::check(&shipped()).expect("haproxy -c accepts deploy/haproxy.cfg");
    // The judge can fail: a health check expecting nothing HAProxy knows is refused.
    let (_dir, broken) = copy_with(|t| t.replace("http-check expect status 200", "http-check expect stauts 200"));
    assert!(haproxy::check(&broken).is_err(), "haproxy -c refuses a broken copy");
    let (_dir, missing_page) = copy_with(|t| t.replace("errors/503.http", "errors/none.http"));
    assert!(haproxy::check(&missing_page).is_err(), "haproxy -c refuses a missing error page");
}

/// A duration as HAProxy writes it (`500ms`, `6m`, `2s`).
fn haproxy_duration(text: &str) -> Duration {
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (n, unit) = text.split_at(split);
    let n: u64 = n.parse().unwrap_or_else(|_| panic!("a duration: {text}"));
    match unit {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(60 * n),
        other => panic!("unit {other} in {text}"),
    }
}

/// The word after `key` on the line holding it, in the shipped file (comments left out).
fn setting(text: &str, key: &str) -> String {
    text.lines()
        .map(|l| l.split('#').next().unwrap_or_default())
        .find_map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            let at = words.windows(key.split(' ').count()).position(|w| w.join(" ") == key)?;
            words.get(at + key.split(' ').count()).map(|w| w.to_string())
        })
        .unwrap_or_else(|| panic!("{key} in deploy/haproxy.cfg"))
}

/// What deploy/README.md's table says must agree: the drain outlasts HAProxy's `fall × inter` plus
/// one check's timeout; HAProxy's server timeout outlasts the longest synchronous wait; the
/// readiness check has room for `/readyz`'s 250 ms bound; the health check is `GET /readyz`.
#[test]
fn the_shipped_numbers_agree_with_castellums_configuration() {
    let text = std::fs::read_to_string(shipped()).unwrap();
    let config = castellum::config::Config::from_toml(&dev_config_text(), &dev_keys()).unwrap();
    let inter = haproxy_duration(&setting(&text, "inter"));
    let fall: u32 = setting(&text, "fall").parse().unwrap();
    let check_timeout = haproxy_duration(&setting(&text, "timeout check"));
    let server_timeout = haproxy_duration(&setting(&text, "timeout server"));
    // What the load-balancer drills judge the take-out of a dead instance against.
    assert_eq!((inter, fall, check_timeout), (haproxy::CHECK_INTER, haproxy::CHECK_FALL, haproxy::CHECK_TIMEOUT));
    assert!(
        config.http.drain_grace >= inter * fall + check_timeout,
        "drain_grace {:?} < fall {fall} × inter {inter:?} + timeout check {check_timeout:?}",
        config.http.drain_grace
    );
    let longest = config.lanes.interactive.max_deadline.max(config.lanes.background.max_deadline);
    assert!(server_timeout > longest, "timeout server {server_timeout:?} ≤ the longest deadline {longest:?}");
    assert!(check_timeout > Duration::from_millis(250), "timeout check {check_timeout:?} leaves /readyz no room");
    assert_eq!(setting(&text, "option httpchk"), "GET");
    assert_eq!(setting(&text, "http-check expect"), "status");
    assert_eq!(setting(&text, "http-check expect status"), "200");
    let page = std::fs::read_to_string(shipped_errors().join("503.http")).unwrap();
    assert!(page.starts_with("HTTP/1.1 503") && page.contains("\r\nRetry-After: 1\r\n"), "{page}");
}

/// Every answer HAProxy writes itself (`errorfile`) is a problem document for its own status,
/// with the headers castellum's answers carry, and each page in deploy/errors is used.
#[test]
fn every_page_haproxy_answers_with_is_a_problem_document() {
    let text = std::fs::read_to_string(shipped()).unwrap();
    let mut used: Vec<String> = text
        .lines()
        .filter_map(|l| l.split('#').next()?.trim().strip_prefix("errorfile "))
        .map(|rest| {
            let (status, page) = rest.split_once(' ').unwrap();
            let answer =
                std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy").join(page.trim()))
                    .unwrap_or_else(|e| panic!("{page}: {e}"));
            let (head, body) =
                answer.split_once("\r\n\r\n").unwrap_or_else(|| panic!("{page}: no CRLF before the body"));
            assert!(head.starts_with(&format!("HTTP/1.1 {status} ")), "{page}: {head}");
            for header in [
                "Content-Type: application/problem+json",
                "Cache-Control: no-store",
                "X-Content-Type-Options: nosniff",
                "Connection: close",
            ] {
                assert!(head.split("\r\n").any(|h| h == header), "{page} lacks {header}");
            }
            let problem: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{page}: {e}"));
            assert_eq!(problem["status"].to_string(), status, "{page}");
            assert!(problem["type"].as_str().unwrap().starts_with("urn:castellum:problem:"), "{page}");
            page.trim().trim_start_matches("errors/").to_string()
        })
        .collect();
    used.sort();
    let mut shipped: Vec<String> =
        std::fs::read_dir(shipped_errors()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    shipped.sort();
    assert_eq!(used, shipped, "every page in deploy/errors is an errorfile");
    assert!(used.contains(&"400.http".to_string()), "HAProxy's own 400 is a problem document");
}

/// An instance that takes a request and closes without answering (as one killed mid-request
/// does): HAProxy answers `502` with deploy/errors/502.http, a problem document that tells the
/// client to repeat the request with its Idempotency-Key.
#[actix_rt::test]
async fn an_instance_that_dies_mid_request_gets_a_problem_document_from_haproxy() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Healthy for HAProxy's checks; every other request is read and its connection closed.
    let dying = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let instance = dying.local_addr().unwrap().to_string();
    actix_rt::spawn(async move {
        loop {
            let Ok((mut stream, _)) = dying.accept().await else { return };
            actix_rt::spawn(async move {
                let mut request = vec![0; 4096];
                let n = stream.read(&mut request).await.unwrap_or(0);
                if request[..n].starts_with(b"GET /readyz") {
                    let _ =
                        stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").await;
                }
            });
        }
    });
    let nobody = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let log = tempfile::NamedTempFile::new().unwrap();
    let lb = Haproxy::start(&shipped(), &[&instance, &nobody, &nobody], log.path()).await.expect("haproxy starts");
    lb.wait_for(0, |s| s.is_up(), Duration::from_secs(10)).await.expect("HAProxy has the instance up");
    let answer = reqwest::Client::new().get(format!("{}/v1/cas", lb.base)).bearer_auth(DEMO_KEY).send().await.unwrap();
    assert_eq!(answer.status(), 502);
    assert_eq!(answer.headers()["content-type"], "application/problem+json");
    assert_eq!(answer.headers()["cache-control"], "no-store");
    let problem: serde_json::Value = answer.json().await.unwrap();
    assert_eq!(problem["type"], "urn:castellum:problem:bad-gateway", "{problem}");
    assert!(problem["detail"].as_str().unwrap().contains("Idempotency-Key"), "{problem}");
}

/// Through HAProxy running the shipped file: castellum's own refusal (a parked CA) arrives with
/// its status, problem type and `Retry-After`; with the instance gone, HAProxy takes it out and
/// answers `503` with `Retry-After` and a problem document itself.
#[actix_rt::test]
async fn retry_after_reaches_the_client_whoever_answers() {
    let db = TestDb::sqlite();
    let server = TestServer::start(dev_config(&db)).await;
    let instance = server.base.trim_start_matches("http://").to_string();
    // The other two servers of the file point at a port nobody listens on.
    let nobody = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let log = tempfile::NamedTempFile::new().unwrap();
    let lb = Haproxy::start(&shipped(), &[&instance, &nobody, &nobody], log.path()).await.expect("haproxy starts");
    lb.wait_for(0, |s| s.is_up(), Duration::from_secs(10)).await.expect("HAProxy has the instance up");
    server.engine.set_ca_state("test-operator", "ica-p256", "parked").await.unwrap();
    let http = reqwest::Client::new();
    let body = serde_json::json!({ "profile": "tls-server-p256", "csr": csr(Key::P256, &["lb.example.test"]) });
    let refused =
        http.post(format!("{}/v1/certificates", lb.base)).bearer_auth(DEMO_KEY).json(&body).send().await.unwrap();
    assert_eq!(refused.status(), 503);
    assert!(refused.headers().contains_key("retry-after"), "{:?}", refused.headers());
    let problem: serde_json::Value = refused.json().await.unwrap();
    assert!(problem["type"].as_str().unwrap().starts_with("urn:castellum:problem:"), "{problem}");

    server.stop().await;
    lb.wait_for(0, |s| s.is_down(), Duration::from_secs(10)).await.expect("HAProxy takes the stopped instance out");
    let none = http.get(format!("{}/v1/cas", lb.base)).bearer_auth(DEMO_KEY).send().await.unwrap();
    assert_eq!(none.status(), 503);
    assert_eq!(none.headers()["retry-after"], "1");
    let problem: serde_json::Value = none.json().await.unwrap();
    assert_eq!(problem["type"], "urn:castellum:problem:no-instance-available", "{problem}");
}
