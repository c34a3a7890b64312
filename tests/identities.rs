//! Disposable identities over loopback HTTP: the engine generates the key, certifies it through
//! the CA's cell, and signs digests with it for the client that created it. Signatures are
//! verified with the openssl command line against the certificate's public key; certificates
//! chain to the dev root with `openssl verify`.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::*;
use serde_json::{json, Value};

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn unb64(text: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD.decode(text).expect("base64")
}

fn create(server: &TestServer, key: &str, profile: &str, subject: Value) -> reqwest::RequestBuilder {
    server
        .http
        .post(server.url("/v1/identities"))
        .bearer_auth(key)
        .json(&json!({ "profile": profile, "subject": subject }))
}

async fn create_ok(server: &TestServer, key: &str, profile: &str, common_name: &str) -> Value {
    let resp = create(server, key, profile, json!({ "common_name": common_name })).send().await.unwrap();
    let status = resp.status();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(status, 201, "{body}");
    body
}

fn sign(server: &TestServer, key: &str, id: &str, digest: &str, algorithm: &str) -> reqwest::RequestBuilder {
    server
        .http
        .post(server.url(&format!("/v1/identities/{id}/signatures")))
        .bearer_auth(key)
        .json(&json!({ "digest": digest, "digest_algorithm": algorithm }))
}

async fn sign_status(server: &TestServer, key: &str, id: &str, digest: &[u8], algorithm: &str) -> (u16, Value) {
    let resp = sign(server, key, id, &b64(digest), algorithm).send().await.unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

fn digest_of(algorithm: &str, document: &[u8]) -> Vec<u8> {
    match algorithm {
        "sha256" => openssl::sha::sha256(document).to_vec(),
        "sha384" => openssl::sha::sha384(document).to_vec(),
        "sha512" => openssl::sha::sha512(document).to_vec(),
        other => panic!("no digest {other}"),
    }
}

/// Verify `signature` over `document` with the openssl command line and the public key taken
/// from `cert_pem`, the way a relying party would.
fn openssl_verifies(dir: &Path, cert_pem: &str, document: &[u8], signature: &[u8], algorithm: &str, scheme: &str) {
    std::fs::write(dir.join("cert.pem"), cert_pem).unwrap();
    std::fs::write(dir.join("doc.bin"), document).unwrap();
    std::fs::write(dir.join("digest.bin"), digest_of(algorithm, document)).unwrap();
    std::fs::write(dir.join("sig.bin"), signature).unwrap();
    let (ok, out) = run(Command::new("openssl")
        .args(["x509", "-pubkey", "-noout", "-in"])
        .arg(dir.join("cert.pem"))
        .arg("-out")
        .arg(dir.join("pub.pem")));
    assert!(ok, "{out}");
    // The raw digest, as a verifier holding only the hash would check it.
    let pkeyutl = || {
        let mut cmd = Command::new("openssl");
        cmd.args(["pkeyutl", "-verify", "-pubin", "-inkey"])
            .arg(dir.join("pub.pem"))
            .arg("-in")
            .arg(dir.join("digest.bin"))
            .arg("-sigfile")
            .arg(dir.join("sig.bin"));
        match scheme {
            // PureEdDSA over the digest bytes: what the API documents for Ed25519 identities.
            "ed25519" => {
                cmd.arg("-rawin");
            }
            "rsa-pss" => {
                cmd.args(["-pkeyopt", "rsa_padding_mode:pss", "-pkeyopt", "rsa_pss_saltlen:digest"]);
                cmd.args(["-pkeyopt", &format!("digest:{algorithm}")]);
            }
            "rsa-pkcs1" => {
                cmd.args(["-pkeyopt", &format!("digest:{algorithm}")]);
            }
            _ => {}
        }
        cmd
    };
    // The whole document, as a relying party would.
    let dgst = || {
        let mut cmd = Command::new("openssl");
        cmd.args(["dgst", &format!("-{algorithm}"), "-verify"]).arg(dir.join("pub.pem"));
        if scheme == "rsa-pss" {
            cmd.args(["-sigopt", "rsa_padding_mode:pss", "-sigopt", "rsa_pss_saltlen:digest"]);
        }
        cmd.arg("-signature").arg(dir.join("sig.bin")).arg(dir.join("doc.bin"));
        cmd
    };
    let checks = if scheme == "ed25519" { vec![pkeyutl()] } else { vec![dgst(), pkeyutl()] };
    for mut cmd in checks {
        let (ok, out) = run(&mut cmd);
        assert!(ok && out.contains("Verified"), "{cmd:?}: {out}");
    }
    // The check can fail: a flipped bit is refused.
    let mut bad = signature.to_vec();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    std::fs::write(dir.join("sig.bin"), &bad).unwrap();
    let mut cmd = pkeyutl();
    let (ok, out) = run(&mut cmd);
    assert!(!ok, "a damaged signature must not verify: {out}");
}

async fn signs_and_verifies(db: TestDb) {
    let server = TestServer::start(dev_config(&db)).await;
    let dir = tempfile::tempdir().unwrap();
    for (profile, ca, algorithm, scheme) in [
        ("signing-identity", "ica-p256", "sha256", "ecdsa"),
        ("signing-identity-p384", "ica-p384", "sha384", "ecdsa"),
        ("signing-identity-ed25519", "ica-ed25519", "sha256", "ed25519"),
    ] {
        let identity = create_ok(&server, DEMO_KEY, profile, "Alice Example").await;
        assert_eq!(identity["ca"], ca);
        assert_eq!(identity["state"], "active");
        assert!(identity.get("private_key").is_none() && !identity.to_string().contains("PRIVATE"));
        let cert = identity["certificate"].as_str().unwrap();
        let (ok, out) = openssl_verify(dir.path(), cert, ca);
        assert!(ok, "{profile}: {out}");
        let findings = pkilint_findings(dir.path(), cert, ca);
        assert!(findings.is_empty(), "{profile}: pkilint: {findings}");
        let text = openssl_text(dir.path(), cert);
        assert!(text.contains("CN = Alice Example"), "{text}");

        let document = format!("a contract signed by Alice with {profile}");
        let digest = digest_of(algorithm, document.as_bytes());
        let id = identity["id"].as_str().unwrap();
        let (status, body) = sign_status(&server, DEMO_KEY, id, &digest, algorithm).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["identity"], id);
        let signature = unb64(body["signature"].as_str().unwrap());
        openssl_verifies(dir.path(), cert, document.as_bytes(), &signature, algorithm, scheme);
        assert_eq!(body["remaining_uses"].as_i64(), Some(identity["max_uses"].as_i64().unwrap() - 1), "{body}");
    }
    server.stop().await;
}

#[actix_rt::test]
async fn identity_signatures_verify_with_openssl_on_sqlite() {
    signs_and_verifies(TestDb::sqlite()).await;
}

#[actix_rt::test]
async fn identity_signatures_verify_with_openssl_on_postgres() {
    signs_and_verifies(TestDb::postgres()).await;
}

/// RSA identities, PKCS#1 v1.5 and PSS, from a configuration that adds them.
#[actix_rt::test]
async fn rsa_identities_sign_pkcs1_and_pss() {
    let db = TestDb::sqlite();
    let mut text = dev_config_text().replace(
        "\"signing-identity-ed25519\",\n]",
        "\"signing-identity-ed25519\", \"signing-identity-rsa\", \"signing-identity-rsa-pss\",\n]",
    );
    for (id, scheme) in [("signing-identity-rsa", "pkcs1"), ("signing-identity-rsa-pss", "pss")] {
        text.push_str(&format!(
            "\n[[profiles]]\nid = \"{id}\"\nca = \"ica-rsa3072\"\nvalidity = \"10m\"\nkey_usage = [\"digital_signature\"]\n[profiles.identity]\nkey_type = \"rsa\"\nrsa_bits = 2048\nrsa_signature = \"{scheme}\"\nlifetime = \"10m\"\n"
        ));
    }
    let server = TestServer::start(config_from(&text, &db)).await;
    let dir = tempfile::tempdir().unwrap();
    for (profile, scheme, algorithm) in
        [("signing-identity-rsa", "rsa-pkcs1", "sha256"), ("signing-identity-rsa-pss", "rsa-pss", "sha512")]
    {
        let identity = create_ok(&server, DEMO_KEY, profile, "Bob Example").await;
        let cert = identity["certificate"].as_str().unwrap();
        assert!(openssl_verify(dir.path(), cert, "ica-rsa3072").0);
        let document = b"an RSA-signed document";
        let (status, body) = sign_status(
            &server,
            DEMO_KEY,
            identity["id"].as_str().unwrap(),
            &digest_of(algorithm, document),
            algorithm,
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["signature_algorithm"], format!("{scheme}-{algorithm}"));
        openssl_verifies(dir.path(), cert, document, &unb64(body["signature"].as_str().unwrap()), algorithm, scheme);
    }
    server.stop().await;
}

fn audit_of(db: &TestDb, target: &str) -> Vec<(String, String, String)> {
    sql::audit(db).into_iter().filter(|e| e.target == target).map(|e| (e.action, e.outcome, e.detail)).collect()
}

#[actix_rt::test]
async fn a_single_use_identity_signs_once_then_is_gone() {
    let db = TestDb::sqlite();
    let server = TestServer::start(dev_config(&db)).await;
    let identity = create(
        &server,
        DEMO_KEY,
        "signing-identity",
        json!({ "common_name": "Carol Example", "email": "carol@example.test", "organization": "Example Org" }),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(identity.status(), 201);
    let location = identity.headers()["location"].to_str().unwrap().to_string();
    let identity: Value = identity.json().await.unwrap();
    let id = identity["id"].as_str().unwrap();
    assert_eq!(location, format!("/v1/identities/{id}"));
    assert_eq!((identity["max_uses"].as_i64(), identity["remaining_uses"].as_i64()), (Some(1), Some(1)));

    let digest = openssl::sha::sha256(b"pay 100 to Dave");
    let (status, body) = sign_status(&server, DEMO_KEY, id, &digest, "sha256").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!((body["remaining_uses"].as_i64(), body["state"].as_str()), (Some(0), Some("destroyed")));
    let (status, body) = sign_status(&server, DEMO_KEY, id, &digest, "sha256").await;
    assert_eq!(status, 410, "{body}");
    assert_eq!(body["type"], "urn:castellum:problem:gone");

    let shown: Value =
        server.http.get(server.url(&location)).bearer_auth(DEMO_KEY).send().await.unwrap().json().await.unwrap();
    assert_eq!((shown["state"].as_str(), shown["remaining_uses"].as_i64()), (Some("destroyed"), Some(0)));
    let row = sql::identity(&db, id);
    assert!(row.sealed_key.is_none(), "the key is deleted at rest");
    assert_eq!((row.uses, row.destroy_reason.as_deref()), (1, Some("used")));

    let audit = audit_of(&db, id);
    let actions: Vec<&str> = audit.iter().map(|(a, o, _)| if o == "gone" { "gone" } else { a.as_str() }).collect();
    for wanted in ["identity.create", "identity.sign", "identity.destroy", "gone"] {
        assert!(actions.contains(&wanted), "audit lacks {wanted}: {audit:?}");
    }
    let digest_hex = hex::encode(digest);
    assert!(audit.iter().all(|(_, _, d)| !d.contains(&digest_hex) && !d.contains(&b64(&digest))), "{audit:?}");
    server.stop().await;
}

fn destroyed_expired_metric(server: &TestServer) -> u64 {
    server
        .engine
        .metrics_text()
        .lines()
        .find_map(|l| l.strip_prefix("castellum_identities_destroyed_total{reason=\"expired\"} "))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0)
}

#[actix_rt::test]
async fn an_expired_identity_is_gone_and_swept() {
    let db = TestDb::sqlite();
    let lifetime =
        |text: String| text.replacen("lifetime = \"10m\"\nmax_uses = 1", "lifetime = \"1s\"\nmax_uses = 1", 1);
    // First an engine whose sweep cannot come during the test: an expired identity used before
    // any sweep is destroyed by the attempt itself.
    let text = lifetime(dev_config_text()).replacen("[identities]\n", "[identities]\nsweep_interval = \"1h\"\n", 1);
    let server = TestServer::start(config_from(&text, &db)).await;
    let used_late = create_ok(&server, DEMO_KEY, "signing-identity", "Erin Example").await;
    let left_alone = create_ok(&server, DEMO_KEY, "signing-identity", "Frank Example").await;
    let expires_in = used_late["expires_at"].as_i64().unwrap() - used_late["created_at"].as_i64().unwrap();
    assert!(expires_in <= 1000, "lifetime 1s: {expires_in} ms");
    let expires_at = left_alone["expires_at"].as_i64().unwrap().max(used_late["expires_at"].as_i64().unwrap());
    let now_ms = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    while now_ms() <= expires_at {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let id = used_late["id"].as_str().unwrap().to_string();
    assert_eq!(sql::identity(&db, &id).state, "active", "expired, not yet destroyed");
    let (status, body) = sign_status(&server, DEMO_KEY, &id, &[7u8; 32], "sha256").await;
    assert_eq!(status, 410, "{body}");
    assert!(body["detail"].as_str().unwrap().contains("expired"), "{body}");
    let row = sql::identity(&db, &id);
    assert_eq!((row.state.as_str(), row.destroy_reason.as_deref()), ("destroyed", Some("expired")));
    assert!(row.sealed_key.is_none());
    let audit = sql::audit(&db);
    assert!(
        audit.iter().any(|e| e.target == id && e.action == "identity.destroy" && e.actor == "demo"),
        "destroyed by the attempt, audited as the client's: {audit:?}"
    );
    assert_eq!(destroyed_expired_metric(&server), 1);
    let untouched = left_alone["id"].as_str().unwrap().to_string();
    assert_eq!(sql::identity(&db, &untouched).state, "active", "no sweep ran");
    server.stop().await;

    // Then an engine that sweeps often, on the same database: the one nobody touched is
    // destroyed by the sweep.
    let text = lifetime(dev_config_text()).replacen("[identities]\n", "[identities]\nsweep_interval = \"200ms\"\n", 1);
    let server = TestServer::start(config_from(&text, &db)).await;
    let started = Instant::now();
    while sql::identity(&db, &untouched).state != "destroyed" {
        assert!(started.elapsed() < Duration::from_secs(5), "the sweep did not destroy the expired identity");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let row = sql::identity(&db, &untouched);
    assert_eq!(row.destroy_reason.as_deref(), Some("expired"));
    assert!(row.sealed_key.is_none());
    assert!(audit_of(&db, &untouched).iter().any(|(a, o, _)| a == "identity.destroy" && o == "expired"));
    // The sweep counts what it destroyed once its transaction has returned to the actor, a moment
    // after the row changed: wait for the count (bounded), never for a fixed time.
    let counted = Instant::now();
    while destroyed_expired_metric(&server) == 0 && counted.elapsed() < Duration::from_secs(2) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(destroyed_expired_metric(&server), 1, "the sweep is visible in metrics");
    assert!(server.engine.metrics_text().contains("castellum_identity_sweeps_total"));
    server.stop().await;
}

#[actix_rt::test]
async fn another_clients_identity_is_not_found() {
    let db = TestDb::sqlite();
    let server = TestServer::start(dev_config(&db)).await;
    let theirs = create_ok(&server, OTHER_KEY, "signing-identity", "Grace Other").await;
    let id = theirs["id"].as_str().unwrap();
    let digest = openssl::sha::sha256(b"not mine");

    let (status, stolen) = sign_status(&server, DEMO_KEY, id, &digest, "sha256").await;
    let (_, unknown) = sign_status(&server, DEMO_KEY, &uuid::Uuid::now_v7().to_string(), &digest, "sha256").await;
    let (_, malformed) = sign_status(&server, DEMO_KEY, "../../etc", &digest, "sha256").await;
    assert_eq!(status, 404, "{stolen}");
    // Indistinguishable from an identity that does not exist.
    assert_eq!(stolen, unknown);
    assert_eq!(stolen["type"], malformed["type"]);
    let shown =
        server.http.get(server.url(&format!("/v1/identities/{id}"))).bearer_auth(DEMO_KEY).send().await.unwrap();
    assert_eq!(shown.status(), 404);

    // The attempt cost its owner nothing.
    let (status, body) = sign_status(&server, OTHER_KEY, id, &digest, "sha256").await;
    assert_eq!(status, 200, "{body}");
    server.stop().await;
}

#[actix_rt::test]
async fn bad_signature_input_is_422_and_consumes_no_use() {
    let db = TestDb::sqlite();
    let server = TestServer::start(dev_config(&db)).await;
    let identity = create_ok(&server, DEMO_KEY, "signing-identity", "Heidi Example").await;
    let id = identity["id"].as_str().unwrap();
    let digest = openssl::sha::sha256(b"document");
    for (what, digest_text, algorithm) in [
        ("bad base64", "not base64!!".to_string(), "sha256"),
        ("a SHA-1-sized digest", b64(&[1u8; 20]), "sha256"),
        ("a SHA-256 digest named sha384", b64(&digest), "sha384"),
        ("an unknown algorithm", b64(&digest), "md5"),
        ("an empty algorithm", b64(&digest), ""),
    ] {
        let resp = sign(&server, DEMO_KEY, id, &digest_text, algorithm).send().await.unwrap();
        assert_eq!(resp.status(), 422, "{what}");
        assert_eq!(resp.headers()["content-type"], "application/problem+json");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["type"], "urn:castellum:problem:bad-digest", "{what}: {body}");
    }
    let row = sql::identity(&db, id);
    assert_eq!(row.uses, 0, "no use consumed");
    let (status, body) = sign_status(&server, DEMO_KEY, id, &digest, "sha256").await;
    assert_eq!(status, 200, "the single use is still there: {body}");
    server.stop().await;
}

#[actix_rt::test]
async fn identity_requests_follow_the_profile_and_idempotency_rules() {
    let db = TestDb::sqlite();
    let server = TestServer::start(dev_config(&db)).await;
    let refused = |subject: Value, profile: &'static str| {
        let server = &server;
        async move {
            let resp = create(server, DEMO_KEY, profile, subject).send().await.unwrap();
            (resp.status().as_u16(), resp.json::<Value>().await.unwrap())
        }
    };
    let cases = [
        (json!({ "common_name": "" }), "signing-identity", 422),
        (json!({ "common_name": "Ivan\u{202E}fdp.exe" }), "signing-identity", 422),
        (json!({ "common_name": "Ivan\u{200B}" }), "signing-identity", 422),
        (json!({ "common_name": "Ivan", "organization": "Evil Corp" }), "signing-identity", 422),
        (json!({ "common_name": "Ivan", "email": "ivan@elsewhere.test" }), "signing-identity", 422),
        (json!({ "common_name": "Ivan", "email": "ivan@example.test" }), "signing-identity-p384", 422),
        (json!({ "common_name": "Ivan" }), "tls-server-p256", 422),
        (json!({ "common_name": "Ivan", "title": "Dr" }), "signing-identity", 400),
        (json!({ "common_name": "Ivan" }), "no-such-profile", 404),
    ];
    for (subject, profile, status) in cases {
        let (got, body) = refused(subject.clone(), profile).await;
        assert_eq!(got, status, "{subject} on {profile}: {body}");
    }
    // An email domain covers the names below it.
    let below = create(
        &server,
        DEMO_KEY,
        "signing-identity",
        json!({ "common_name": "Ivan", "email": "ivan@mail.example.test" }),
    );
    assert_eq!(below.send().await.unwrap().status(), 201);
    // A CSR cannot be issued under an identity profile: the engine makes those keys.
    let resp = server.issue(DEMO_KEY, "signing-identity", &csr(Key::P256, &["a.example.test"])).send().await.unwrap();
    assert_eq!(resp.status(), 422);
    // Forbidden profile for this client.
    let resp =
        create(&server, OTHER_KEY, "signing-identity-p384", json!({ "common_name": "Judy" })).send().await.unwrap();
    assert_eq!(resp.status(), 403);
    assert_eq!(sql::count(&db, "SELECT count(*) AS n FROM certificates"), 1, "only the one allowed");

    let with_key = |cn: &'static str| {
        create(&server, DEMO_KEY, "signing-identity", json!({ "common_name": cn })).header("idempotency-key", "id-1")
    };
    let first: Value = with_key("Mallory Example").send().await.unwrap().json().await.unwrap();
    let again = with_key("Mallory Example").send().await.unwrap();
    assert_eq!(again.status(), 201);
    let again: Value = again.json().await.unwrap();
    assert_eq!(first["id"], again["id"], "a retry returns the identity the first attempt created");
    assert_eq!(first["certificate"], again["certificate"]);
    let other = with_key("Someone Else").send().await.unwrap();
    assert_eq!(other.status(), 422);
    assert_eq!(other.json::<Value>().await.unwrap()["type"], "urn:castellum:problem:idempotency-key-reuse");
    assert_eq!(sql::count(&db, "SELECT count(*) AS n FROM certificates"), 2, "one identity, one certificate");
    server.stop().await;
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// The engine as a process with its logs at debug level in a file; the identity keys, opened
/// here with the dev KEK (which proves they are really sealed under it), are then looked for in
/// the database files and the log.
#[actix_rt::test]
async fn identity_keys_appear_neither_in_the_database_nor_in_the_logs() {
    let db = TestDb::sqlite();
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("castellum.log");
    let env = [("CASTELLUM_DATABASE__URL", db.url.as_str()), ("RUST_LOG", "debug")];
    let stdout = std::fs::File::create(&log_path).unwrap().into();
    let stderr = std::fs::File::create(dir.path().join("stderr.log")).unwrap().into();
    let mut engine = EngineProcess::start(&dev_keys().join("castellum.toml"), &env, stdout, stderr).await;
    let (http, base) = (reqwest::Client::new(), engine.base.clone());
    let new_identity = |profile: &'static str| {
        let (http, base) = (http.clone(), base.clone());
        async move {
            let resp = http
                .post(format!("{base}/v1/identities"))
                .bearer_auth(DEMO_KEY)
                .json(&json!({ "profile": profile, "subject": { "common_name": "Olivia Example" } }))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 201);
            resp.json::<Value>().await.unwrap()
        }
    };
    let single = new_identity("signing-identity").await;
    let multi = new_identity("signing-identity-p384").await;
    let kek = castellum::pki::kek::Kek::from_bytes(&castellum::pki::kek::dev_kek());
    let mut secrets: Vec<(String, Vec<u8>)> = Vec::new();
    let mut sealed = Vec::new();
    for identity in [&single, &multi] {
        let id = identity["id"].as_str().unwrap();
        let row = sql::identity(&db, id);
        let blob = row.sealed_key.expect("sealed at rest");
        assert!(kek.open("another-identity", &blob).is_err(), "sealed for its own identity only");
        let private = kek.open(id, &blob).expect("sealed under the configured KEK");
        let key_type = castellum::pki::KeyType::parse(identity["key_type"].as_str().unwrap()).unwrap();
        let key = castellum::pki::identity::private_key(key_type, &private).unwrap();
        let cert = openssl::x509::X509::from_pem(identity["certificate"].as_str().unwrap().as_bytes()).unwrap();
        assert!(cert.public_key().unwrap().public_eq(&key), "the sealed key is the certified one");
        let scalar = key.ec_key().unwrap().private_key().to_vec();
        let pkcs8 = key.private_key_to_pkcs8().unwrap();
        for (name, bytes) in [("sealed plaintext", private.to_vec()), ("PKCS#8", pkcs8), ("private scalar", scalar)] {
            secrets.push((format!("{id} {name}"), bytes.clone()));
            secrets.push((format!("{id} {name} hex"), hex::encode(&bytes).into_bytes()));
            secrets.push((format!("{id} {name} base64"), b64(&bytes).into_bytes()));
        }
        sealed.push(blob);
    }
    for identity in [&single, &multi] {
        let resp = http
            .post(format!("{base}/v1/identities/{}/signatures", identity["id"].as_str().unwrap()))
            .bearer_auth(DEMO_KEY)
            .json(&json!({ "digest": b64(&[9u8; 48][..if identity == &single { 32 } else { 48 }]), "digest_algorithm": if identity == &single { "sha256" } else { "sha384" } }))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    engine.kill();
    // Fold the WAL into the database file, as a later checkpoint would.
    let db_path = db.url.trim_start_matches("sqlite://").to_string();
    {
        use diesel::connection::SimpleConnection;
        use diesel::Connection;
        let mut conn = diesel::SqliteConnection::establish(&db_path).unwrap();
        conn.batch_execute("PRAGMA wal_checkpoint(TRUNCATE);").unwrap();
    }
    let mut places: Vec<(String, Vec<u8>)> = Vec::new();
    for suffix in ["", "-wal", "-shm"] {
        if let Ok(bytes) = std::fs::read(format!("{db_path}{suffix}")) {
            places.push((format!("database{suffix}"), bytes));
        }
    }
    places.push(("log".into(), std::fs::read(&log_path).unwrap()));
    places.push(("stderr".into(), std::fs::read(dir.path().join("stderr.log")).unwrap()));
    let log = String::from_utf8_lossy(&places.iter().find(|(n, _)| n == "log").unwrap().1).to_string();
    assert!(log.contains(single["id"].as_str().unwrap()), "the log is at debug level and names the identity");
    for (place, bytes) in &places {
        for (secret, needle) in &secrets {
            assert!(!contains(bytes, needle), "{secret} found in the {place}");
        }
    }
    let database = &places[0].1;
    assert!(contains(database, &sealed[1]), "the multi-use identity's sealed key is still at rest (the search works)");
    assert!(!contains(database, &sealed[0]), "the destroyed identity's sealed key is gone from the database file");
}

fn p99(latencies: &mut [Duration]) -> Duration {
    latencies.sort();
    latencies[((latencies.len() as f64 * 0.99).ceil() as usize).saturating_sub(1)]
}

/// For `length`: 4 clients issue from ica-p384 one request after another while, if `burst`,
/// 8 clients create identities on ica-p256 as fast as they are answered.
/// What 8 clients do to ica-p256 while 4 others issue from ica-p384.
#[derive(Clone, Copy)]
enum Load {
    /// Certificates from CSRs: the control, the same CA kept as busy by ordinary issuance.
    Certificates,
    /// Disposable identities: the engine also generates and seals a key for each.
    Identities,
}

async fn phase(server: &Arc<TestServer>, load: Load, length: Duration) -> (Vec<Duration>, Vec<u16>, Vec<u16>) {
    let csr = Arc::new(csr(Key::P384, &["steady.example.test"]));
    let until = Instant::now() + length;
    let steady: Vec<_> = (0..4)
        .map(|_| {
            let (server, csr) = (server.clone(), csr.clone());
            actix_rt::spawn(async move {
                let mut out = Vec::new();
                while Instant::now() < until {
                    let started = Instant::now();
                    let status =
                        server.issue(DEMO_KEY, "tls-server-p384", &csr).send().await.unwrap().status().as_u16();
                    out.push((started.elapsed(), status));
                }
                out
            })
        })
        .collect();
    let burst_csr = Arc::new(common::csr(Key::P256, &["burst.example.test"]));
    let bursts: Vec<_> = (0..8)
        .map(|_| {
            let (server, burst_csr) = (server.clone(), burst_csr.clone());
            actix_rt::spawn(async move {
                let mut out = Vec::new();
                while Instant::now() < until {
                    let resp = match load {
                        Load::Certificates => server.issue(DEMO_KEY, "tls-server-p256", &burst_csr),
                        Load::Identities => {
                            create(&server, DEMO_KEY, "signing-identity", json!({ "common_name": "Burst" }))
                        }
                    };
                    out.push(resp.send().await.unwrap().status().as_u16());
                }
                out
            })
        })
        .collect();
    let steady: Vec<_> = futures_util::future::join_all(steady).await.into_iter().flat_map(|r| r.unwrap()).collect();
    let bursts = futures_util::future::join_all(bursts).await.into_iter().flat_map(|r| r.unwrap()).collect();
    (steady.iter().map(|(l, _)| *l).collect(), steady.iter().map(|(_, s)| *s).collect(), bursts)
}

#[actix_rt::test]
async fn an_identity_burst_on_one_ca_never_slows_the_others() {
    let db = TestDb::sqlite();
    let server = Arc::new(TestServer::start(dev_config(&db)).await);
    // The control keeps ica-p256 as busy with ordinary issuance: what the identities add is the
    // engine's own key generation and sealing, and that must not reach ica-p384.
    let (mut quiet, quiet_statuses, control) = phase(&server, Load::Certificates, Duration::from_secs(4)).await;
    let (mut busy, busy_statuses, burst) = phase(&server, Load::Identities, Duration::from_secs(4)).await;
    assert!(quiet_statuses.iter().chain(&busy_statuses).all(|s| *s == 201), "the other CA keeps 100% success");
    assert!(control.iter().filter(|s| **s == 201).count() > 200, "the control load ran");
    let created = burst.iter().filter(|s| **s == 201).count();
    assert!(created > 200, "the burst ran: {created} identities created, statuses {:?}", &burst[..burst.len().min(20)]);
    let metrics = server.engine.metrics_text();
    let (p99_quiet, p99_busy) = (p99(&mut quiet), p99(&mut busy));
    eprintln!(
        "ica-p384: {} requests beside {} certificates on ica-p256 (p99 {p99_quiet:?}), {} during a burst of {created} identities on ica-p256 (p99 {p99_busy:?})",
        quiet.len(),
        control.len(),
        busy.len()
    );
    assert!(p99_busy <= p99_quiet * 2, "p99 {p99_busy:?} during the burst vs {p99_quiet:?} beside the control");
    assert!(metrics.contains("castellum_identity_keys_total{key=\"ecdsa-p256\",source=\"pool\"}"), "{metrics}");
    Arc::try_unwrap(server).ok().unwrap().stop().await;
}

/// Two engine instances on one PostgreSQL database, 40 signature requests at once for two
/// identities that may sign 5 times each, in crossing orders: exactly 5 signatures each come
/// out, and no group commit deadlocks (every answer is 200 or 410).
#[actix_rt::test]
async fn concurrent_signatures_on_two_instances_never_exceed_max_uses() {
    let db = TestDb::postgres();
    let mut config = dev_config(&db);
    config.database.instances = 2;
    // Status reads are bounded at twice the pool's size: room for an instance's 20 requests.
    config.database.pools.status.max_size = 10;
    let first = Arc::new(TestServer::start(config.clone()).await);
    config.instance_id = Some("second".into());
    let second = Arc::new(TestServer::start(config).await);
    let mut ids = Vec::new();
    for name in ["Peggy Example", "Quentin Example"] {
        let identity = create_ok(&first, DEMO_KEY, "signing-identity-p384", name).await;
        assert_eq!(identity["max_uses"], 5);
        ids.push(identity["id"].as_str().unwrap().to_string());
    }
    let digest = Arc::new(b64(&openssl::sha::sha384(b"contended")));
    let attempts: Vec<_> = (0..40)
        .map(|i| {
            let server = if i % 2 == 0 { first.clone() } else { second.clone() };
            // Instance one asks for A then B, instance two for B then A.
            let id = ids[(i / 2 + i % 2) % 2].clone();
            let digest = digest.clone();
            actix_rt::spawn(async move {
                let status = sign(&server, DEMO_KEY, &id, &digest, "sha384").send().await.unwrap().status().as_u16();
                (id, status)
            })
        })
        .collect();
    let answers: Vec<(String, u16)> =
        futures_util::future::join_all(attempts).await.into_iter().map(|r| r.unwrap()).collect();
    assert!(answers.iter().all(|(_, s)| *s == 200 || *s == 410), "{answers:?}");
    for id in &ids {
        let signed = answers.iter().filter(|(i, s)| i == id && *s == 200).count();
        assert_eq!(signed, 5, "{id}: {answers:?}");
        let row = sql::identity(&db, id);
        assert_eq!((row.uses, row.state.as_str()), (5, "destroyed"));
    }
    for server in [first, second] {
        Arc::try_unwrap(server).ok().unwrap().stop().await;
    }
}

/// The engine restarted with another key-encryption key cannot open the identity: the
/// signature fails, and costs the identity nothing; back on its own KEK it signs.
#[actix_rt::test]
async fn a_signature_that_fails_inside_the_engine_costs_no_use() {
    let db = TestDb::sqlite();
    let server = TestServer::start(dev_config(&db)).await;
    let identity = create_ok(&server, DEMO_KEY, "signing-identity", "Rupert Example").await;
    let id = identity["id"].as_str().unwrap().to_string();
    server.stop().await;

    let dir = tempfile::tempdir().unwrap();
    let other_kek = dir.path().join("kek.hex");
    std::fs::write(&other_kek, hex::encode(openssl::sha::sha256(b"another deployment's KEK"))).unwrap();
    let mut config = dev_config(&db);
    config.identities.kek_file = Some(other_kek);
    let server = TestServer::start(config).await;
    let digest = openssl::sha::sha256(b"document");
    let (status, body) = sign_status(&server, DEMO_KEY, &id, &digest, "sha256").await;
    assert_eq!(status, 500, "{body}");
    let row = sql::identity(&db, &id);
    assert_eq!((row.uses, row.state.as_str()), (0, "active"), "the failure cost no use");
    server.stop().await;

    // Same KEK, but the row says another one sealed it: the vault refuses before opening.
    let server = TestServer::start(dev_config(&db)).await;
    let set_kek_id = |kek_id: &str| {
        assert!(kek_id.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(sql::execute(&db, &format!("UPDATE identities SET kek_id = '{kek_id}' WHERE id = '{id}'")), 1);
    };
    let original = sql::identity(&db, &id).kek_id;
    set_kek_id("0000000000000000");
    let (status, body) = sign_status(&server, DEMO_KEY, &id, &digest, "sha256").await;
    assert_eq!(status, 500, "{body}");
    let row = sql::identity(&db, &id);
    assert_eq!(row.uses, 0, "the refusal cost no use");
    set_kek_id(&original);
    let (status, body) = sign_status(&server, DEMO_KEY, &id, &digest, "sha256").await;
    assert_eq!(status, 200, "{body}");
    server.stop().await;
}

/// The admin status shows the identity actors: each kind of key's stock, and the vault's queue.
#[actix_rt::test]
async fn the_admin_status_shows_the_key_stock_and_the_vault() {
    let db = TestDb::sqlite();
    let server = TestServer::start(dev_config(&db)).await;
    let status = admin_status(&server).await;
    let stock = status["identities"]["key_stock"].as_array().expect("key stock in the status");
    let kinds: Vec<(&str, u64)> =
        stock.iter().map(|k| (k["key"].as_str().unwrap(), k["target"].as_u64().unwrap())).collect();
    assert_eq!(kinds, [("ecdsa-p256", 16), ("ecdsa-p384", 16), ("ed25519", 16)], "{status}");
    assert!(stock.iter().all(|k| k["stocked"].as_u64().unwrap() <= 16));
    assert_eq!(status["identities"]["vault_waiting"], 0);
    server.stop().await;
}

/// An identity lives exactly its configured lifetime from its creation (10 minutes in the dev
/// configuration), and its certificate, backdated 60 s for clock skew, outlives it: judged with
/// the `openssl` command line's reading of the certificate. Times are given twice, in
/// milliseconds and as RFC 3339 text, and the two agree.
#[actix_rt::test]
async fn an_identity_lives_exactly_its_lifetime() {
    let db = TestDb::sqlite();
    let server = TestServer::start(dev_config(&db)).await;
    let identity = create_ok(&server, DEMO_KEY, "signing-identity", "Lifetime robot").await;
    let (created, expires) = (identity["created_at"].as_i64().unwrap(), identity["expires_at"].as_i64().unwrap());
    assert_eq!(expires - created, 10 * 60 * 1000, "{identity}");
    for field in ["created_at", "expires_at"] {
        let text = identity[format!("{field}_rfc3339")].as_str().unwrap();
        let parsed = humantime::parse_rfc3339(text).unwrap();
        let ms = parsed.duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
        assert_eq!(ms, identity[field].as_i64().unwrap(), "{field}: {text}");
    }
    let dir = tempfile::tempdir().unwrap();
    let pem = dir.path().join("identity.pem");
    std::fs::write(&pem, identity["certificate"].as_str().unwrap()).unwrap();
    let dates = Command::new("openssl")
        .args(["x509", "-noout", "-dateopt", "iso_8601", "-startdate", "-enddate", "-in"])
        .arg(&pem)
        .output()
        .unwrap();
    let dates = String::from_utf8(dates.stdout).unwrap();
    let date_of = |key: &str| {
        let line = dates.lines().find_map(|l| l.strip_prefix(key)).unwrap_or_else(|| panic!("{dates}"));
        let at = humantime::parse_rfc3339_weak(line.trim().trim_end_matches('Z')).unwrap();
        at.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64 * 1000
    };
    let (not_before, not_after) = (date_of("notBefore="), date_of("notAfter="));
    assert!(not_after >= expires - 999, "the certificate ends ({not_after}) before the identity ({expires})");
    assert!(not_before <= created - 59_000, "the certificate is not backdated: {not_before} vs {created}");
    server.stop().await;
}
