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
    let reset = post(&server, "/admin/v1/cas/ica-p256/breaker/reset", serde_json::json!({})).send().await.unwrap();
    assert_eq!(reset.status(), 200);
    assert_eq!(cell(&admin_status(&server).await, "ica-p256")["breaker"], "closed");

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
    assert_eq!(status["pools"].as_array().unwrap().len(), 3);
    server.stop().await;
}
