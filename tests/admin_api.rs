//! The admin API: its own tokens, no cross-site state changes, and every lever changing state
//! as described and landing in the audit log with the admin's name.

mod common;

use std::time::{Duration, Instant};

use common::*;

fn post(server: &TestServer, path: &str, body: serde_json::Value) -> reqwest::RequestBuilder {
    server.http.post(format!("{}{path}", server.admin_base)).bearer_auth(ADMIN_TOKEN).json(&body)
}

fn cell<'a>(status: &'a serde_json::Value, ca: &str) -> &'a serde_json::Value {
    status["cells"].as_array().unwrap().iter().find(|c| c["ca"] == ca).unwrap()
}

#[actix_rt::test]
async fn the_admin_api_refuses_strangers_and_cross_site_requests() {
    let db = TestDb::sqlite();
    let server = TestServer::start(dev_config(&db)).await;
    let url = format!("{}/admin/v1/cas/ica-p256/state", server.admin_base);
    let body = serde_json::json!({ "state": "disabled" });
    let no_token = server.http.post(&url).json(&body).send().await.unwrap();
    assert_eq!(no_token.status(), 401);
    let wrong = server.http.post(&url).bearer_auth("nope").json(&body).send().await.unwrap();
    assert_eq!(wrong.status(), 401);
    // A client API key is not an admin token.
    let client_key = server.http.post(&url).bearer_auth(DEMO_KEY).json(&body).send().await.unwrap();
    assert_eq!(client_key.status(), 401);
    // What a browser sends for a cross-site HTML form, even with the token somehow attached.
    let form = server
        .http
        .post(&url)
        .bearer_auth(ADMIN_TOKEN)
        .header("content-type", "application/x-www-form-urlencoded")
        .header("origin", "http://evil.example")
        .body("state=disabled")
        .send()
        .await
        .unwrap();
    assert_eq!(form.status(), 403);
    let cross_origin = post(&server, "/admin/v1/cas/ica-p256/state", body.clone())
        .header("origin", "http://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(cross_origin.status(), 403);
    let cross_site = post(&server, "/admin/v1/cas/ica-p256/state", body.clone())
        .header("sec-fetch-site", "cross-site")
        .send()
        .await
        .unwrap();
    assert_eq!(cross_site.status(), 403);
    assert_eq!(cell(&admin_status(&server).await, "ica-p256")["state"], "enabled", "nothing changed");
    // The client API does not serve admin routes.
    let on_client_port = server.http.get(server.url("/admin/v1/status")).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
    assert_eq!(on_client_port.status(), 404);
    server.stop().await;
}

#[actix_rt::test]
async fn the_admin_listeners_answers_are_counted_by_route_and_status() {
    let db = TestDb::sqlite();
    let server = TestServer::start(dev_config(&db)).await;
    // Each admin route once by GET (those that take POST answer 404 to it: the route still
    // names the answer), one stranger, and a path the listener does not have.
    let paths = [
        ("/admin", "/admin"),
        ("/admin/console.js", "/admin/console.js"),
        ("/admin/v1/status", "/admin/v1/status"),
        ("/admin/v1/cas/ica-p256/state", "/admin/v1/cas/{ca}/state"),
        ("/admin/v1/cas/ica-p256/resubmit", "/admin/v1/cas/{ca}/resubmit"),
        ("/admin/v1/cas/ica-p256/breaker/reset", "/admin/v1/cas/{ca}/breaker/reset"),
        ("/admin/v1/cas/ica-p256/revoke-all", "/admin/v1/cas/{ca}/revoke-all"),
        ("/admin/v1/certificates/01ab/revoke", "/admin/v1/certificates/{serial}/revoke"),
        ("/admin/v1/profiles/tls-server-p256/state", "/admin/v1/profiles/{profile}/state"),
        ("/admin/v1/faults/leak", "/admin/v1/faults/leak"),
        ("/readyz", "/readyz"),
    ];
    for (path, _) in paths {
        server.http.get(format!("{}{path}", server.admin_base)).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
    }
    let stranger = server.http.get(format!("{}/admin/v1/status", server.admin_base)).send().await.unwrap();
    assert_eq!(stranger.status(), 401);
    let nowhere = server.http.get(format!("{}/nowhere", server.admin_base)).bearer_auth(ADMIN_TOKEN).send().await;
    assert_eq!(nowhere.unwrap().status(), 404);
    let metrics = server
        .http
        .get(format!("{}/metrics", server.admin_base))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let counted = |route: &str, status: &str| {
        metrics.lines().any(|l| {
            l.starts_with("castellum_http_requests_total{")
                && l.contains(r#"listener="admin""#)
                && l.contains(&format!(r#"route="{route}""#))
                && l.contains(&format!(r#"status="{status}""#))
        })
    };
    for (path, template) in paths {
        let served = metrics.lines().any(|l| {
            l.starts_with("castellum_http_requests_total{")
                && l.contains(r#"listener="admin""#)
                && l.contains(&format!(r#"route="{template}""#))
        });
        assert!(served, "{path} is not counted under {template}:\n{metrics}");
    }
    assert!(counted("/admin/v1/status", "200") && counted("/admin/v1/status", "401"), "{metrics}");
    assert!(counted("(other)", "404"), "{metrics}");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("castellum_http_request_duration_seconds_count{")
                && l.contains(r#"listener="admin""#)),
        "{metrics}"
    );
    server.stop().await;
}

#[actix_rt::test]
async fn every_lever_changes_state_and_is_audited() {
    let db = TestDb::sqlite();
    let mut config = dev_config(&db);
    config.cas[0].breaker.open_for = Duration::from_secs(60);
    config.cas[0].fault.failure_rate = 0.0;
    let server = TestServer::start(config).await;
    let p256 = csr(Key::P256, &["lever.example.test"]);

    for state in ["disabled", "enabled", "parked", "draining", "enabled"] {
        let resp =
            post(&server, "/admin/v1/cas/ica-p256/state", serde_json::json!({ "state": state })).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{state}");
        assert_eq!(cell(&admin_status(&server).await, "ica-p256")["state"], state);
        let issued = server.issue(DEMO_KEY, "tls-server-p256", &p256).send().await.unwrap().status().as_u16();
        let expected = match state {
            "enabled" => 201,
            "disabled" => 409,
            _ => 503,
        };
        assert_eq!(issued, expected, "issuing while {state}");
    }
    let bad =
        post(&server, "/admin/v1/cas/ica-p256/state", serde_json::json!({ "state": "sideways" })).send().await.unwrap();
    assert_eq!(bad.status(), 400);
    let unknown =
        post(&server, "/admin/v1/cas/nope/state", serde_json::json!({ "state": "disabled" })).send().await.unwrap();
    assert_eq!(unknown.status(), 404);

    let resp = post(&server, "/admin/v1/profiles/tls-server-p256/state", serde_json::json!({ "enabled": false }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(server.issue(DEMO_KEY, "tls-server-p256", &p256).send().await.unwrap().status(), 409);
    post(&server, "/admin/v1/profiles/tls-server-p256/state", serde_json::json!({ "enabled": true }))
        .send()
        .await
        .unwrap();
    assert_eq!(server.issue(DEMO_KEY, "tls-server-p256", &p256).send().await.unwrap().status(), 201);

    let resubmit = post(&server, "/admin/v1/cas/ica-p256/resubmit", serde_json::json!({})).send().await.unwrap();
    assert_eq!(resubmit.status(), 200);
    // Audited here; what the lever does to a breaker that signer failures opened is judged by
    // the_breaker_reset_lever_closes_a_breaker_that_signer_failures_opened.
    let reset = post(&server, "/admin/v1/cas/ica-p256/breaker/reset", serde_json::json!({})).send().await.unwrap();
    assert_eq!(reset.status(), 200);

    // The audit log names the admin for every lever.
    let started = Instant::now();
    loop {
        let audit = admin_status(&server).await["audit"].as_array().unwrap().clone();
        let by_admin =
            |action: &str| audit.iter().filter(|e| e["action"] == action && e["actor"] == "dev-admin").count();
        if by_admin("ca.state") == 5
            && by_admin("profile.state") == 2
            && by_admin("ca.resubmit") == 1
            && by_admin("ca.breaker_reset") == 1
        {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(5), "{audit:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = admin_status(&server).await;
    assert_eq!(status["instances"].as_array().unwrap().len(), 1);
    // issuance, control, status, admin, audit.
    assert_eq!(status["pools"].as_array().unwrap().len(), 5);
    server.stop().await;
}

/// One issuance as the client sees it: status, problem type slug (empty for a 201), detail and
/// Retry-After (seconds).
async fn attempt(server: &TestServer, csr: &str) -> (u16, String, String, Option<u64>) {
    let resp = server.issue(DEMO_KEY, "tls-server-p384", csr).send().await.unwrap();
    let status = resp.status().as_u16();
    let retry_after = resp.headers().get("retry-after").and_then(|v| v.to_str().ok()?.parse().ok());
    let body: serde_json::Value = resp.json().await.unwrap_or_default();
    let kind = body["type"].as_str().unwrap_or_default().trim_start_matches("urn:castellum:problem:").to_string();
    (status, kind, body["detail"].as_str().unwrap_or_default().to_string(), retry_after)
}

/// The breaker lever on a breaker that real signer failures opened (dev-mode fault injection:
/// half of ica-p384's signatures fail; one failure opens its breaker for ten minutes). Before the
/// reset the CA is refused at once by its breaker; after it, the client reaches the signer again
/// and gets a certificate, which the database holds.
#[actix_rt::test]
async fn the_breaker_reset_lever_closes_a_breaker_that_signer_failures_opened() {
    let db = TestDb::sqlite();
    let mut config = dev_config(&db);
    let p384 = config.cas.iter_mut().find(|c| c.id == "ica-p384").unwrap();
    p384.fault.failure_rate = 0.5;
    p384.breaker.consecutive_failures = 1;
    p384.breaker.open_for = Duration::from_secs(600);
    let server = TestServer::start(config).await;
    let csr = csr(Key::P384, &["breaker.example.test"]);
    let issued =
        || sql::count(&db, "SELECT count(*) AS n FROM certificates WHERE ca_id = 'ica-p384' AND state = 'issued'");

    // Open it for real: issue until the signer fails (each try fails with probability 1/2).
    let mut tries = 0;
    loop {
        let (status, kind, detail, _) = attempt(&server, &csr).await;
        if kind == "signer-failure" {
            assert_eq!(status, 503);
            break;
        }
        assert_eq!(status, 201, "{kind}: {detail}");
        tries += 1;
        assert!(tries < 40, "the injected signer fault never fired");
    }
    let started = Instant::now();
    while cell(&admin_status(&server).await, "ica-p384")["breaker"] != "open" {
        assert!(started.elapsed() < Duration::from_secs(5), "a signer failure did not open the breaker");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Open: refused at once by the breaker (the signer is not reached), told to come back later.
    let before = issued();
    for _ in 0..3 {
        let (status, kind, detail, retry_after) = attempt(&server, &csr).await;
        assert_eq!((status, kind.as_str()), (503, "ca-unavailable"), "{detail}");
        assert!(detail.contains("circuit breaker open"), "{detail}");
        assert!(retry_after.is_some_and(|s| s >= 60), "Retry-After {retry_after:?} while open for 10 minutes");
    }
    assert_eq!(issued(), before, "nothing signed while the breaker is open");

    // The lever: closed at once, and the CA signs again. A try may still meet the injected
    // fault, which opens the breaker again: the lever closes it again. Never is a try after a
    // reset refused by the breaker; 40 failures in a row would have probability 2^-40.
    let mut resets = 0;
    loop {
        let reset = post(&server, "/admin/v1/cas/ica-p384/breaker/reset", serde_json::json!({})).send().await.unwrap();
        assert_eq!(reset.status(), 200);
        resets += 1;
        assert_eq!(cell(&admin_status(&server).await, "ica-p384")["breaker"], "closed");
        let (status, kind, detail, _) = attempt(&server, &csr).await;
        if status == 201 {
            break;
        }
        assert_eq!((status, kind.as_str()), (503, "signer-failure"), "after a reset: {detail}");
        assert!(resets < 40, "the CA never signed again after a reset");
    }
    assert_eq!(issued(), before + 1, "the certificate the client got after the reset is stored");
    // Every reset is audited (the audit row is written after the lever answers).
    let started = Instant::now();
    loop {
        let audit = sql::audit(&db);
        let audited = audit.iter().filter(|e| e.action == "ca.breaker_reset" && e.target == "ica-p384").count();
        if audited == resets {
            break;
        }
        assert!(audited < resets && started.elapsed() < Duration::from_secs(5), "{resets} resets: {audit:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.stop().await;
}
