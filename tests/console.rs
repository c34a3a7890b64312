//! The admin console as an operator uses it: in a real headless Chromium (Debian's, driven by
//! playwright-core), and from the command line.

mod common;

use std::process::Command;

use common::*;

#[actix_rt::test]
async fn a_browser_parks_a_ca_from_the_console() {
    let browser_dir = repo().join("tests/browser");
    assert!(
        browser_dir.join("node_modules/playwright-core").exists() && std::path::Path::new("/usr/bin/chromium").exists(),
        "the browser test needs Debian's chromium and tests/browser/node_modules: run .ci/prepare"
    );
    let db = TestDb::sqlite();
    let server = TestServer::start(dev_config(&db)).await;
    let out = tempfile::tempdir().unwrap();
    let screenshot = out.path().join("console.png");
    let admin_base = server.admin_base.clone();
    let shot = screenshot.clone();
    let output = actix_web::rt::task::spawn_blocking(move || {
        Command::new("node")
            .arg(browser_dir.join("console.mjs"))
            .args([admin_base.as_str(), ADMIN_TOKEN])
            .arg(&shot)
            .arg("ica-p384")
            .output()
            .expect("node runs")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    let seen: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(seen["cells"], 4, "the page shows every CA cell");
    assert_eq!((seen["before"].as_str(), seen["after"].as_str()), (Some("enabled"), Some("parked")));
    let store = seen["store"].as_str().unwrap_or_default();
    assert!(store.contains("Identity keys in stock") && store.contains("ecdsa-p256"), "{store}");
    // The click really parked it, and the audit log names the admin.
    let status = server.engine.admin_status().await.unwrap();
    assert_eq!(status.cells.iter().find(|c| c.ca == "ica-p384").unwrap().state, "parked");
    assert!(status.audit.iter().any(|e| e.actor == "dev-admin" && e.outcome == "parked" && e.target == "ica-p384"));
    let png = std::fs::read(&screenshot).unwrap();
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "a real screenshot");
    server.stop().await;
}

/// Run `castellum admin ARGS` off the test's thread (the engine's actors run on it).
async fn admin(base: &str, token: &str, args: &[&str]) -> (bool, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_castellum"));
    cmd.args(["admin", "--admin-url", base, "--token", token]).args(args);
    let output = actix_web::rt::task::spawn_blocking(move || cmd.output().expect("castellum runs")).await.unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).to_string(),
        String::from_utf8_lossy(&output.stderr).to_string(),
    )
}

#[actix_rt::test]
async fn castellum_admin_status_prints_the_tree_and_json_parses() {
    let db = TestDb::sqlite();
    let server = TestServer::start(dev_config(&db)).await;
    let base = server.admin_base.clone();
    let (ok, text, err) = admin(&base, ADMIN_TOKEN, &["status"]).await;
    assert!(ok, "{text}{err}");
    for needle in [
        "Cluster",
        "CA cells",
        "ica-p256",
        "ica-rsa3072",
        "Database pools",
        "issuance",
        "Store:",
        "Identities: keys in stock",
    ] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }
    let (ok, text, err) = admin(&base, ADMIN_TOKEN, &["ca-state", "ica-rsa3072", "draining"]).await;
    assert!(ok, "{text}{err}");
    let (ok, json, _) = admin(&base, ADMIN_TOKEN, &["status", "--json"]).await;
    assert!(ok);
    let status: serde_json::Value = serde_json::from_str(&json).expect("--json is JSON");
    let rsa = status["cells"].as_array().unwrap().iter().find(|c| c["ca"] == "ica-rsa3072").unwrap();
    assert_eq!(rsa["state"], "draining");
    let (ok, _, err) = admin(&base, "wrong", &["status"]).await;
    assert!(!ok && err.contains("401"), "{err}");
    server.stop().await;
}
