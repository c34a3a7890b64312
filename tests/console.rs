//! The admin console as an operator uses it: in a real headless Chromium (Debian's, driven by
//! playwright-core), and from the command line.

mod common;

use std::process::Command;

use common::*;

#[actix_rt::test]
async fn a_browser_parks_a_ca_from_the_console() {
    browser_dir();
    let db = TestDb::sqlite();
    let config = dev_config(&db);
    let instance = config.instance_id.clone().expect("the test config names its instance");
    let server = TestServer::start(config).await;
    // State the page can only show if it renders the engine's: another CA draining, and a
    // disabled profile.
    server.engine.set_ca_state("test-operator", "ica-rsa3072", "draining").await.unwrap();
    server.engine.set_profile_state("test-operator", "ocsp-renewal", false).await.unwrap();
    let out = tempfile::tempdir().unwrap();
    let screenshot = out.path().join("console.png");
    let args = vec![
        server.admin_base.clone().into(),
        ADMIN_TOKEN.into(),
        screenshot.clone().into_os_string(),
        "ica-p384".into(),
    ];
    let seen = run_browser_script("console.mjs", args).await;
    assert_eq!(seen["errors"], serde_json::json!([]), "no script error on the page");
    // The click really parked it (the engine says so, and the database's audit log names the
    // admin), and the page shows it, read back from the page.
    let status = admin_status(&server).await;
    let engine_cells: Vec<(String, String)> = status["cells"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["ca"].as_str().unwrap().to_string(), c["state"].as_str().unwrap().to_string()))
        .collect();
    assert!(engine_cells.contains(&("ica-p384".into(), "parked".into())), "{engine_cells:?}");
    let audit = sql::audit(&db);
    let newest = audit.first().expect("audited");
    assert_eq!(
        (newest.actor.as_str(), newest.action.as_str(), newest.target.as_str(), newest.outcome.as_str()),
        ("dev-admin", "ca.state", "ica-p384", "parked"),
        "{audit:?}"
    );
    assert_eq!((seen["before"].as_str(), seen["after"].as_str()), (Some("enabled"), Some("parked")));
    // Every cell with the state the engine holds (ica-rsa3072 draining, set before the page opened).
    let page_cells: Vec<(String, String)> = seen["shown"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (c["ca"].as_str().unwrap_or_default().to_string(), c["state"].as_str().unwrap_or_default().to_string())
        })
        .collect();
    assert_eq!(page_cells, engine_cells, "the page's CA cells are the engine's");
    assert!(page_cells.contains(&("ica-rsa3072".into(), "draining".into())), "{page_cells:?}");
    // This engine's instance id (random per test), its profiles with their states, its newest
    // audit entry as the database holds it, and its identity key stock targets.
    let meta = seen["meta"].as_str().unwrap_or_default();
    assert!(meta.starts_with(&format!("instance {instance} ")), "{meta}");
    let engine_profiles: Vec<(String, String)> = status["profiles"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_str().unwrap().to_string(), p[1].as_str().unwrap().to_string()))
        .collect();
    let page_profiles: Vec<(String, String)> = seen["profiles"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_str().unwrap_or_default().to_string(), p[1].as_str().unwrap_or_default().to_string()))
        .collect();
    assert_eq!(page_profiles, engine_profiles);
    assert!(page_profiles.contains(&("ocsp-renewal".into(), "disabled".into())), "{page_profiles:?}");
    let row = &seen["audit"][0];
    assert_eq!(
        (row[1].as_str(), row[2].as_str(), row[3].as_str(), row[4].as_str(), row[5].as_str()),
        (Some(instance.as_str()), Some("dev-admin"), Some("ca.state"), Some("ica-p384"), Some("parked")),
        "the page's newest audit row: {row}"
    );
    let store = seen["store"].as_str().unwrap_or_default();
    let stock = status["identities"]["key_stock"].as_array().unwrap();
    assert!(!stock.is_empty() && store.contains("Identity keys in stock"), "{store}");
    for k in stock {
        let (key, target) = (k["key"].as_str().unwrap(), &k["target"]);
        assert!(store.contains(&format!("{key} ")) && store.contains(&format!("/{target}")), "{key} missing: {store}");
    }
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

/// During a storm of refused requests against one CA, its cell in the console draws its recent
/// history — issued/s, p99, queue, refusals/s — and the charts move: more points a moment later,
/// and refusals/s above zero.
#[actix_rt::test]
async fn the_console_charts_a_storm_as_it_happens() {
    browser_dir();
    let db = TestDb::sqlite();
    let mut config = dev_config(&db);
    config.admin.history_interval = std::time::Duration::from_millis(250);
    let server = std::sync::Arc::new(TestServer::start(config).await);
    server.engine.set_ca_state("test-operator", "ica-p384", "disabled").await.unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let storm = tokio::spawn({
        let (server, stop) = (server.clone(), stop.clone());
        async move {
            let csr = csr(Key::P384, &["storm.example.test"]);
            let started = std::time::Instant::now();
            // Bounded: it stops when told, or after 30 s.
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && started.elapsed().as_secs() < 30 {
                let _ = server.issue(DEMO_KEY, "tls-server-p384", &csr).send().await;
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
        }
    });
    let args = [server.admin_base.as_str(), ADMIN_TOKEN, "ica-p384"].map(std::ffi::OsString::from).to_vec();
    let seen = run_browser_script("history.mjs", args).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    storm.await.unwrap();
    assert_eq!(seen["errors"], serde_json::json!([]), "{seen}");
    let (first, second) = (&seen["first"], &seen["second"]);
    for name in ["issued/s", "p99", "queued", "refusals/s"] {
        assert!(first["series"][name]["points"].as_u64() >= Some(3), "{name} drawn: {seen}");
    }
    assert!(second["points"].as_u64() > first["points"].as_u64(), "the charts move: {seen}");
    let refusals = second["series"]["refusals/s"]["label"].as_str().unwrap_or_default();
    let rate: f64 = refusals.trim_start_matches("refusals/s ").parse().unwrap_or(0.0);
    assert!(rate > 0.0, "refusals/s shown during the storm: {refusals:?}");
    std::sync::Arc::into_inner(server).expect("storm done").stop().await;
}

/// The console's revocation view, driven in Chromium: one certificate revoked by serial with a
/// reason (the engine and the audit log say so, and its CA's count moves), a whole-CA revocation
/// refused while its confirmation is mistyped and done once it is typed right (every certificate
/// of that CA revoked, as the database counts them), the shards' CRLs made again, and the OCSP
/// responder shown.
#[actix_rt::test]
async fn a_browser_revokes_a_certificate_and_a_whole_ca_from_the_console() {
    browser_dir();
    let db = TestDb::sqlite();
    let mut config = dev_config(&db);
    config.crl.delay = std::time::Duration::from_secs(1);
    ca_of(&mut config, "ica-p256").ocsp = Some(castellum::config::OcspConfig {
        responder_profile: "ocsp-renewal".into(),
        responder_name: "ocsp.ica-p256.example.test".into(),
        response_validity: std::time::Duration::from_secs(86_400),
    });
    let server = TestServer::start(config).await;
    let one = server.issue(DEMO_KEY, "tls-server-p256", &csr(Key::P256, &["one.example.test"])).send().await.unwrap();
    assert_eq!(one.status(), 201);
    let serial = one.json::<serde_json::Value>().await.unwrap()["serial"].as_str().unwrap().to_string();
    for i in 0..3 {
        let r =
            server.issue(DEMO_KEY, "tls-server-p384", &csr(Key::P256, &[&format!("p{i}.example.test")])).send().await;
        assert_eq!(r.unwrap().status(), 201);
    }
    let p384_issued =
        sql::count(&db, "SELECT count(*) AS n FROM certificates WHERE ca_id = 'ica-p384' AND state = 'issued'");
    assert_eq!(p384_issued, 3);
    let out = tempfile::tempdir().unwrap();
    let args = vec![
        server.admin_base.clone().into(),
        ADMIN_TOKEN.into(),
        serial.clone().into(),
        "ica-p256".into(),
        "ica-p384".into(),
        out.path().join("revocation.png").into_os_string(),
    ];
    let seen = run_browser_script("revocation.mjs", args).await;
    assert_eq!(seen["errors"], serde_json::json!([]), "no script error on the page");
    assert!(seen["responder"].as_str().unwrap().starts_with("expires in "), "{seen}");

    // One certificate, by serial: the engine has it revoked with the reason chosen, audited as the admin.
    let shown = seen["revokedOne"].as_str().unwrap();
    assert!(shown.contains(&serial) && shown.contains("keyCompromise"), "{shown}");
    let cert = certificate(&server, &serial).await;
    assert_eq!(
        (cert["state"].as_str(), cert["revocation"]["reason"].as_str()),
        (Some("revoked"), Some("keyCompromise"))
    );
    let audit = sql::audit(&db);
    assert!(
        audit.iter().any(|a| a.actor == "dev-admin" && a.action == "certificate.revoke" && a.target == serial),
        "{audit:?}"
    );

    // The whole CA: refused while mistyped, then every certificate of it.
    assert!(seen["mistyped"].as_str().unwrap().contains("not confirmed"), "{seen}");
    assert!(
        seen["dialogs"].as_array().unwrap().iter().any(|d| d.as_str().unwrap().contains("Type ica-p384")),
        "{seen}"
    );
    assert_eq!(seen["revokedAll"].as_str(), Some("3 certificates of ica-p384 revoked (cessationOfOperation)"));
    let revoked = |ca: &str| {
        sql::count(&db, &format!("SELECT count(*) AS n FROM certificates WHERE ca_id = '{ca}' AND state = 'revoked'"))
    };
    assert_eq!((revoked("ica-p256"), revoked("ica-p384")), (1, 3));
    let counts: Vec<(String, i64)> = seen["counts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c[0].as_str().unwrap().to_string(), c[1].as_i64().unwrap()))
        .collect();
    assert!(counts.contains(&("ica-p256".into(), 1)) && counts.contains(&("ica-p384".into(), 3)), "{counts:?}");
    // Every CA's shards are listed, each with the CRL the database holds.
    let shards = seen["shards"].as_array().unwrap();
    let in_db = sql::count(&db, "SELECT count(*) AS n FROM crl_shards");
    assert_eq!(shards.len() as i64, in_db, "{shards:?}");
    server.stop().await;
}
