//! Revocation end to end over real HTTP: a client revokes its own certificate, an operator any
//! certificate or a whole CA's population; the CRLs castellum publishes are judged by the openssl
//! command line (`verify -crl_check`, `crl -verify`) and pkilint (`lint_crl`, BR profile), and
//! the TLS server certificates that point to them by pkilint's BR linter
//! (`lint_cabf_serverauth_cert`). On SQLite and on PostgreSQL, where two instances share the
//! database and a revocation through one is on the other's CRL.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use castellum::config::Config;
use common::*;
use serde_json::{json, Value};

/// What certificates name as the CA's base URL in these tests; the test maps it onto the
/// server's ephemeral port.
const BASE_URL: &str = "http://pki.castellum.test";

/// The dev configuration with a CRL made again within 1 s of a revocation, and OCSP on for
/// ica-p256 (its responder certificate issued with the dev `ocsp-renewal` profile).
fn config(db: &TestDb) -> Config {
    let mut config = dev_config(db);
    config.crl.delay = Duration::from_secs(1);
    for ca in &mut config.cas {
        ca.base_url = Some(BASE_URL.into());
    }
    ca_of(&mut config, "ica-p256").ocsp = Some(castellum::config::OcspConfig {
        responder_profile: "ocsp-renewal".into(),
        responder_name: "ocsp.ica-p256.example.test".into(),
        response_validity: Duration::from_secs(86_400),
    });
    config
}

async fn issue_ok(server: &TestServer, key: &str, profile: &str, name: &str) -> Value {
    let response = server.issue(key, profile, &csr(Key::P256, &[name])).send().await.unwrap();
    assert_eq!(response.status(), 201);
    response.json().await.unwrap()
}

async fn revoke(server: &TestServer, key: &str, serial: &str, body: Value) -> (u16, Value) {
    let response = server
        .http
        .post(server.url(&format!("/v1/certificates/{serial}/revoke")))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.json().await.unwrap_or(Value::Null))
}

async fn admin_post(server: &TestServer, path: &str, body: Value) -> (u16, Value) {
    let response = server
        .http
        .post(format!("{}{path}", server.admin_base))
        .bearer_auth(ADMIN_TOKEN)
        .json(&body)
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.json().await.unwrap_or(Value::Null))
}

/// The CRL distribution point a certificate names, read by openssl (not the engine).
fn crl_url_of(dir: &Path, cert_pem: &str) -> String {
    let text = openssl_text(dir, cert_pem);
    let url = text
        .lines()
        .map(str::trim)
        .find_map(|l| l.strip_prefix("URI:").filter(|u| u.ends_with(".crl")))
        .unwrap_or_else(|| panic!("no CRL distribution point in:\n{text}"));
    assert!(url.starts_with(BASE_URL), "{url}");
    url.to_string()
}

/// Fetch a CRL by the URL a certificate names, from this server.
async fn fetch_crl(server: &TestServer, url: &str) -> reqwest::Response {
    server.http.get(server.url(url.trim_start_matches(BASE_URL))).send().await.unwrap()
}

/// `openssl crl -text` of a DER CRL, and the file (PEM) it was written to.
fn crl_text(dir: &Path, der: &[u8], name: &str) -> (String, PathBuf) {
    let der_file = dir.join(format!("{name}.der"));
    let pem_file = dir.join(format!("{name}.pem"));
    std::fs::write(&der_file, der).unwrap();
    let (ok, out) =
        run(Command::new("openssl").args(["crl", "-inform", "DER", "-in"]).arg(&der_file).arg("-out").arg(&pem_file));
    assert!(ok, "openssl cannot read the CRL: {out}");
    let (ok, text) = run(Command::new("openssl").args(["crl", "-noout", "-text", "-in"]).arg(&pem_file));
    assert!(ok, "{text}");
    (text, pem_file)
}

/// The CRL number openssl reads.
fn crl_number(text: &str) -> u64 {
    let mut lines = text.lines().map(str::trim);
    lines.find(|l| l.starts_with("X509v3 CRL Number"));
    lines.next().and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("no CRL number in:\n{text}"))
}

/// Wait until the CRL at `url` lists `serial` (upper-case hex, as openssl prints it).
async fn wait_listed(server: &TestServer, dir: &Path, url: &str, serial: &str, within: Duration) -> (String, PathBuf) {
    let started = Instant::now();
    loop {
        let response = fetch_crl(server, url).await;
        if response.status() == 200 {
            let (text, file) = crl_text(dir, &response.bytes().await.unwrap(), "waited");
            if text.contains(&serial.to_ascii_uppercase()) {
                return (text, file);
            }
        }
        assert!(started.elapsed() < within, "{serial} not on {url} within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `openssl verify -crl_check` of a leaf with its CA's CRL.
fn verify_with_crl(dir: &Path, leaf_pem: &str, ca: &str, crl_pem: &Path) -> (bool, String) {
    let leaf = dir.join("verified.pem");
    std::fs::write(&leaf, leaf_pem).unwrap();
    run(Command::new("openssl")
        .args(["verify", "-crl_check", "-CRLfile"])
        .arg(crl_pem)
        .arg("-CAfile")
        .arg(dev_keys().join("root.crt"))
        .arg("-untrusted")
        .arg(dev_keys().join(format!("{ca}.crt")))
        .arg(&leaf))
}

/// `openssl crl -verify`: the CRL's signature checks against its CA.
fn crl_signature_verifies(dir: &Path, crl_pem: &Path, ca: &str) -> (bool, String) {
    let chain = dir.join("crl-chain.pem");
    let mut pem = std::fs::read(dev_keys().join(format!("{ca}.crt"))).unwrap();
    pem.extend(std::fs::read(dev_keys().join("root.crt")).unwrap());
    std::fs::write(&chain, pem).unwrap();
    run(Command::new("openssl").args(["crl", "-noout", "-verify", "-in"]).arg(crl_pem).arg("-CAfile").arg(&chain))
}

async fn a_client_revokes_its_own_certificate_and_openssl_sees_it_on_the_crl(db: TestDb) {
    let server = TestServer::start(config(&db)).await;
    let dir = tempfile::tempdir().unwrap();
    let revoked = issue_ok(&server, DEMO_KEY, "tls-server-p256", "gone.example.test").await;
    let kept = issue_ok(&server, DEMO_KEY, "tls-server-p256", "kept.example.test").await;
    let serial = revoked["serial"].as_str().unwrap();
    let url = crl_url_of(dir.path(), revoked["certificate"].as_str().unwrap());

    // The shard's CRL exists before anything is revoked; remember its number.
    let started = Instant::now();
    let before = loop {
        let response = fetch_crl(&server, &url).await;
        if response.status() == 200 {
            assert_eq!(response.headers()["content-type"], "application/pkix-crl");
            break crl_number(&crl_text(dir.path(), &response.bytes().await.unwrap(), "before").0);
        }
        assert!(started.elapsed() < Duration::from_secs(5), "no CRL at {url}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    // Bad input changes nothing: another client's serial, a reason only the CA asserts, an
    // unknown reason.
    assert_eq!(revoke(&server, OTHER_KEY, serial, json!({ "reason": "keyCompromise" })).await.0, 404);
    assert_eq!(revoke(&server, DEMO_KEY, serial, json!({ "reason": "cACompromise" })).await.0, 403);
    assert_eq!(revoke(&server, DEMO_KEY, serial, json!({ "reason": "whimsy" })).await.0, 400);
    assert_eq!(revoke(&server, DEMO_KEY, "not-hex", json!({})).await.0, 404);
    let state = |s: &str| sql::count(&db, &format!("SELECT count(*) AS n FROM certificates WHERE state = '{s}'"));
    assert_eq!(state("revoked"), 0, "refused revocations changed nothing");

    let (status, first) = revoke(&server, DEMO_KEY, serial, json!({ "reason": "keyCompromise" })).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!((first["reason"].as_str(), first["newly_revoked"].as_bool()), (Some("keyCompromise"), Some(true)));
    // Durable before answered: the row says so on the test's own connection, with its audit row.
    assert_eq!(state("revoked"), 1);
    let audited = sql::count(
        &db,
        &format!("SELECT count(*) AS n FROM audit_log WHERE action = 'certificate.revoke' AND target = '{serial}' AND outcome = 'keyCompromise' AND actor = 'demo'"),
    );
    assert_eq!(audited, 1);
    // Idempotent: the first reason and time stand.
    let (status, again) = revoke(&server, DEMO_KEY, serial, json!({ "reason": "superseded" })).await;
    assert_eq!(status, 200);
    assert_eq!(again["newly_revoked"], false);
    assert_eq!((&again["reason"], &again["revoked_at"]), (&first["reason"], &first["revoked_at"]));
    let shown = certificate(&server, serial).await;
    assert_eq!(shown["state"], "revoked");
    assert_eq!(shown["revocation"]["reason"], "keyCompromise");

    // On the shard's CRL within the configured delay (1 s; 3 s allowed for a loaded machine).
    let (text, crl_pem) = wait_listed(&server, dir.path(), &url, serial, Duration::from_secs(3)).await;
    assert!(crl_number(&text) > before, "the CRL number grew: {before} → {}\n{text}", crl_number(&text));
    assert!(text.contains("Key Compromise"), "the entry carries its reason:\n{text}");
    assert!(text.contains(&format!("URI:{url}")), "its Issuing Distribution Point names its URL:\n{text}");
    let (ok, out) = verify_with_crl(dir.path(), revoked["certificate"].as_str().unwrap(), "ica-p256", &crl_pem);
    assert!(!ok && out.contains("certificate revoked"), "openssl must refuse the revoked certificate: {out}");
    let (ok, out) = crl_signature_verifies(dir.path(), &crl_pem, "ica-p256");
    assert!(ok && out.contains("verify OK"), "{out}");
    assert_eq!(lint_crl(&crl_pem), "");

    // The certificate kept passes with its own shard's CRL.
    let kept_url = crl_url_of(dir.path(), kept["certificate"].as_str().unwrap());
    let kept_crl = fetch_crl(&server, &kept_url).await.bytes().await.unwrap();
    let (_, kept_pem) = crl_text(dir.path(), &kept_crl, "kept");
    let (ok, out) = verify_with_crl(dir.path(), kept["certificate"].as_str().unwrap(), "ica-p256", &kept_pem);
    assert!(ok, "a good certificate passes -crl_check: {out}");
    server.stop().await;
}

#[actix_rt::test]
async fn sqlite_a_client_revokes_its_own_certificate_and_openssl_sees_it_on_the_crl() {
    a_client_revokes_its_own_certificate_and_openssl_sees_it_on_the_crl(TestDb::sqlite()).await;
}

#[actix_rt::test]
async fn postgres_a_client_revokes_its_own_certificate_and_openssl_sees_it_on_the_crl() {
    a_client_revokes_its_own_certificate_and_openssl_sees_it_on_the_crl(TestDb::postgres()).await;
}

/// An operator revokes a whole CA's population (the destroyed CA of incident 003) in one call,
/// and any single certificate with a reason only the CA may assert; other CAs are untouched.
#[actix_rt::test]
async fn an_operator_revokes_a_whole_ca_and_its_crls_list_every_certificate() {
    let db = TestDb::sqlite();
    let server = TestServer::start(config(&db)).await;
    let dir = tempfile::tempdir().unwrap();
    let mut issued = Vec::new();
    for i in 0..24 {
        issued.push(issue_ok(&server, DEMO_KEY, "tls-server-p256", &format!("h{i}.example.test")).await);
    }
    let spared = issue_ok(&server, DEMO_KEY, "tls-server-p384", "spared.example.test").await;
    let single = issue_ok(&server, DEMO_KEY, "tls-server-p384", "single.example.test").await;

    let (status, body) =
        admin_post(&server, "/admin/v1/cas/nope/revoke-all", json!({ "reason": "cACompromise" })).await;
    assert_eq!(status, 404, "{body}");
    let (status, body) =
        admin_post(&server, "/admin/v1/cas/ica-p256/revoke-all", json!({ "reason": "cACompromise" })).await;
    assert_eq!(status, 200, "{body}");
    // The 24, and the CA's OCSP responder certificate(s) castellum issued itself.
    let responders =
        sql::count(&db, "SELECT count(*) AS n FROM certificates WHERE profile = 'ocsp-renewal' AND state = 'revoked'");
    assert!(responders >= 1, "the responder certificate is the CA's too");
    assert_eq!(body["revoked"], 24 + responders);
    let serial = single["serial"].as_str().unwrap();
    let (status, body) = admin_post(
        &server,
        &format!("/admin/v1/certificates/{serial}/revoke"),
        json!({ "reason": "privilegeWithdrawn" }),
    )
    .await;
    assert_eq!((status, body["reason"].as_str()), (200, Some("privilegeWithdrawn")), "{body}");

    let count = |sql: &str| sql::count(&db, sql);
    assert_eq!(
        count("SELECT count(*) AS n FROM certificates WHERE ca_id = 'ica-p256' AND state = 'revoked' AND revocation_reason = 2"),
        24 + responders
    );
    assert_eq!(count("SELECT count(*) AS n FROM certificates WHERE ca_id = 'ica-p384' AND state = 'revoked'"), 1);
    assert_eq!(
        count(&format!(
            "SELECT count(*) AS n FROM certificates WHERE serial = '{}' AND state = 'issued'",
            spared["serial"].as_str().unwrap()
        )),
        1
    );
    assert!(
        count("SELECT count(*) AS n FROM audit_log WHERE action = 'certificate.revoke' AND target = 'ica-p256'") >= 1
    );

    // Every certificate is on the CRL its distribution point names, signed by its CA.
    for cert in &issued {
        let url = crl_url_of(dir.path(), cert["certificate"].as_str().unwrap());
        let (text, pem) =
            wait_listed(&server, dir.path(), &url, cert["serial"].as_str().unwrap(), Duration::from_secs(3)).await;
        assert!(text.contains("CA Compromise"), "{text}");
        let (ok, out) = verify_with_crl(dir.path(), cert["certificate"].as_str().unwrap(), "ica-p256", &pem);
        assert!(!ok && out.contains("certificate revoked"), "{out}");
    }
    let url = crl_url_of(dir.path(), single["certificate"].as_str().unwrap());
    let (_, pem) = wait_listed(&server, dir.path(), &url, serial, Duration::from_secs(3)).await;
    let (ok, out) = crl_signature_verifies(dir.path(), &pem, "ica-p384");
    assert!(ok, "{out}");
    assert_eq!(lint_crl(&pem), "");
    server.stop().await;
}

/// A CRL is cacheable until its nextUpdate and revalidates by ETag; shards that do not exist,
/// and CAs that do not, are 404.
#[actix_rt::test]
async fn a_crl_is_served_with_its_etag_and_cache_lifetime() {
    let db = TestDb::sqlite();
    let server = TestServer::start(config(&db)).await;
    let started = Instant::now();
    let response = loop {
        let response = server.http.get(server.url("/crl/ica-p384/0.crl")).send().await.unwrap();
        if response.status() == 200 {
            break response;
        }
        assert!(started.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let etag = response.headers()["etag"].to_str().unwrap().to_string();
    let cache = response.headers()["cache-control"].to_str().unwrap().to_string();
    let max_age: u64 = cache.split("max-age=").nth(1).and_then(|s| s.split(',').next()).unwrap().parse().unwrap();
    assert!(max_age > 6 * 86_400 && max_age <= 7 * 86_400, "{cache}");
    let again = server.http.get(server.url("/crl/ica-p384/0.crl")).header("if-none-match", &etag).send().await.unwrap();
    assert_eq!(again.status(), 304);
    for missing in ["/crl/ica-p384/4.crl", "/crl/nope/0.crl", "/crl/ica-p384/x.crl", "/ca/nope.der"] {
        assert_eq!(server.http.get(server.url(missing)).send().await.unwrap().status(), 404, "{missing}");
    }
    let ca = server.http.get(server.url("/ca/ica-p384.der")).send().await.unwrap();
    assert_eq!(ca.headers()["content-type"], "application/pkix-cert");
    assert_eq!(
        ca.bytes().await.unwrap().to_vec(),
        openssl::x509::X509::from_pem(&std::fs::read(dev_keys().join("ica-p384.crt")).unwrap())
            .unwrap()
            .to_der()
            .unwrap()
    );
    server.stop().await;
}

/// Every TLS server profile of the dev configuration passes pkilint's CA/B Forum linter but for
/// the internal names the dev configuration uses by design (`.test`); the judge is shown to
/// catch the certificates castellum issued before (no CRL, no AIA, no policy, SKI, CN).
#[actix_rt::test]
async fn tls_server_certificates_pass_the_br_linter_and_the_judge_catches_the_old_ones() {
    let db = TestDb::sqlite();
    let server = TestServer::start(config(&db)).await;
    let dir = tempfile::tempdir().unwrap();
    for profile in ["tls-server-p256", "tls-server-p384", "tls-server-rsa"] {
        let cert = issue_ok(&server, DEMO_KEY, profile, "www.example.test").await;
        let findings = br_findings(dir.path(), cert["certificate"].as_str().unwrap());
        assert_eq!(findings, vec!["cabf.internal_domain_name".to_string()], "{profile}");
    }
    server.stop().await;

    // The control: the profile as it was (no base URL, policies, SKI and CN as before).
    let db = TestDb::sqlite();
    let mut old = config(&db);
    for ca in &mut old.cas {
        ca.base_url = None;
    }
    for p in &mut old.profiles {
        (p.policies, p.omit_common_name, p.omit_subject_key_id) = (Vec::new(), false, false);
    }
    let server = TestServer::start(old).await;
    let cert = issue_ok(&server, DEMO_KEY, "tls-server-p256", "www.example.test").await;
    let findings = br_findings(dir.path(), cert["certificate"].as_str().unwrap());
    for expected in [
        "cabf.serverauth.subscriber.revocation_information_absent",
        "cabf.serverauth.subscriber.authority_info_access_extension_absent",
        "cabf.serverauth.subscriber.certificate_policies_extension_absent",
    ] {
        assert!(
            findings.iter().any(|f| f.contains(expected.rsplit('.').next().unwrap())),
            "{expected} not in {findings:?}"
        );
    }
    server.stop().await;
}

/// Two instances on one PostgreSQL database: a revocation through one is on the CRL the other
/// serves within the configured delay, and the CRL number keeps growing whichever makes it.
#[actix_rt::test]
async fn postgres_a_revocation_through_one_instance_is_on_the_others_crl() {
    let db = TestDb::postgres();
    let a = TestServer::start(config(&db)).await;
    let b = TestServer::start(config(&db)).await;
    let dir = tempfile::tempdir().unwrap();
    let cert = issue_ok(&a, DEMO_KEY, "tls-server-p256", "two.example.test").await;
    let serial = cert["serial"].as_str().unwrap();
    let url = crl_url_of(dir.path(), cert["certificate"].as_str().unwrap());
    let (status, _) = revoke(&a, DEMO_KEY, serial, json!({ "reason": "superseded" })).await;
    assert_eq!(status, 200);
    let (text, pem) = wait_listed(&b, dir.path(), &url, serial, Duration::from_secs(3)).await;
    let first = crl_number(&text);
    let (ok, out) = verify_with_crl(dir.path(), cert["certificate"].as_str().unwrap(), "ica-p256", &pem);
    assert!(!ok && out.contains("certificate revoked"), "{out}");

    // A second revocation on the same shard through the other instance: a later number.
    let shard_mate = loop {
        let c = issue_ok(&b, DEMO_KEY, "tls-server-p256", "mate.example.test").await;
        if crl_url_of(dir.path(), c["certificate"].as_str().unwrap()) == url {
            break c;
        }
    };
    let mate = shard_mate["serial"].as_str().unwrap();
    assert_eq!(revoke(&b, DEMO_KEY, mate, json!({})).await.0, 200);
    let (text, _) = wait_listed(&a, dir.path(), &url, mate, Duration::from_secs(3)).await;
    assert!(crl_number(&text) > first, "{first} then {}", crl_number(&text));
    a.stop().await;
    b.stop().await;
}

/// Wait until the CA has an OCSP responder (its certificate is issued through the CA's cell
/// shortly after start).
async fn wait_for_responder(server: &TestServer) {
    let started = Instant::now();
    loop {
        let readiness: Value =
            server.http.get(server.url("/readyz")).bearer_auth(DEMO_KEY).send().await.unwrap().json().await.unwrap();
        let warnings = readiness["warnings"].as_array().cloned().unwrap_or_default();
        if !warnings.iter().any(|w| w.as_str().unwrap_or("").contains("OCSP responder")) {
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "no OCSP responder: {readiness}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `openssl ocsp` against the engine: its verdict line and the whole output.
fn openssl_ocsp(dir: &Path, server: &TestServer, cert_pem: &str, ca: &str) -> (String, String) {
    openssl_ocsp_with(dir, cert_pem, ca, "-sha1", &["-url", &server.url("/ocsp"), "-respout", "response.der"])
}

/// `openssl ocsp -issuer CA DIGEST -cert LEAF -CAfile CHAIN -resp_text ARGS`, run in `dir` (DIGEST
/// hashes the issuer in the question's CertID): its verdict line for the leaf and the whole output.
fn openssl_ocsp_with(dir: &Path, cert_pem: &str, ca: &str, digest: &str, args: &[&str]) -> (String, String) {
    let leaf = dir.join("ocsp-leaf.pem");
    std::fs::write(&leaf, cert_pem).unwrap();
    let chain = dir.join("ocsp-chain.pem");
    let mut pem = std::fs::read(dev_keys().join(format!("{ca}.crt"))).unwrap();
    pem.extend(std::fs::read(dev_keys().join("root.crt")).unwrap());
    std::fs::write(&chain, pem).unwrap();
    let (_, out) = run(Command::new("openssl")
        .current_dir(dir)
        .args(["ocsp", "-issuer"])
        .arg(dev_keys().join(format!("{ca}.crt")))
        .arg(digest)
        .arg("-cert")
        .arg(&leaf)
        .arg("-CAfile")
        .arg(&chain)
        .arg("-resp_text")
        .args(args));
    let verdict = out
        .lines()
        .find(|l| l.starts_with(&*leaf.display().to_string()))
        .map(|l| l.rsplit(": ").next().unwrap_or("").trim().to_string())
        .unwrap_or_default();
    (verdict, out)
}

/// OCSP: `openssl ocsp` says good, then revoked (with its reason) after revocation; the response
/// verifies against the CA through the delegated responder castellum issued itself; `-respin`
/// reads the cached response back; pkilint's OCSP linter finds nothing; a malformed request gets
/// `malformedRequest`, an issuer castellum does not serve `unauthorized` (unsigned OCSP statuses).
async fn ocsp_answers_good_then_revoked(db: TestDb) {
    let server = TestServer::start(config(&db)).await;
    let dir = tempfile::tempdir().unwrap();
    wait_for_responder(&server).await;
    let cert = issue_ok(&server, DEMO_KEY, "tls-server-p256", "ocsp-me.example.test").await;
    let pem = cert["certificate"].as_str().unwrap();
    assert!(openssl_text(dir.path(), pem).contains(&format!("OCSP - URI:{BASE_URL}/ocsp")), "AIA names the responder");

    let (verdict, out) = openssl_ocsp(dir.path(), &server, pem, "ica-p256");
    assert_eq!(verdict, "good", "{out}");
    assert!(out.contains("Response verify OK"), "{out}");
    assert!(out.contains("OCSP No Check"), "the responder certificate says nocheck:\n{out}");
    assert!(out.contains("OCSP Signing"), "and is for OCSP signing:\n{out}");
    // Read back from what was saved (what a stapling server does).
    let (ok, again) = run(Command::new("openssl")
        .args(["ocsp", "-respin"])
        .arg(dir.path().join("response.der"))
        .args(["-resp_text", "-noverify"]));
    assert!(ok && again.contains("Cert Status: good"), "{again}");
    let (ok, lint) = run(Command::new("lint_ocsp_response").args(["lint"]).arg(dir.path().join("response.der")));
    assert!(ok && lint.trim().is_empty(), "lint_ocsp_response: {lint}");

    let serial = cert["serial"].as_str().unwrap();
    assert_eq!(revoke(&server, DEMO_KEY, serial, json!({ "reason": "keyCompromise" })).await.0, 200);
    let (verdict, out) = openssl_ocsp(dir.path(), &server, pem, "ica-p256");
    assert_eq!(verdict, "revoked", "{out}");
    assert!(out.contains("Reason: keyCompromise"), "{out}");
    let (ok, lint) = run(Command::new("lint_ocsp_response").args(["lint"]).arg(dir.path().join("response.der")));
    assert!(ok && lint.trim().is_empty(), "lint_ocsp_response: {lint}");

    // Unsigned statuses: malformed bytes; an issuer castellum does not answer for (ica-p384 has
    // no [cas.ocsp]).
    let garbage = server.http.post(server.url("/ocsp")).body(vec![0x30, 0x03, 0x01, 0x01]).send().await.unwrap();
    assert_eq!(garbage.headers()["content-type"], "application/ocsp-response");
    let status = |der: &[u8]| x509_ocsp_status(der);
    assert_eq!(status(&garbage.bytes().await.unwrap()), 1, "malformedRequest");
    let other = issue_ok(&server, DEMO_KEY, "tls-server-p384", "p384.example.test").await;
    let (verdict, out) = openssl_ocsp(dir.path(), &server, other["certificate"].as_str().unwrap(), "ica-p384");
    assert!(out.contains("unauthorized"), "{verdict}: {out}");
    server.stop().await;
}

/// The responseStatus of an OCSPResponse: SEQUENCE { ENUMERATED status, ... }.
fn x509_ocsp_status(der: &[u8]) -> u8 {
    assert_eq!((der[0], der[2], der[3]), (0x30, 0x0a, 0x01), "an OCSPResponse: {der:02x?}");
    der[4]
}

#[actix_rt::test]
async fn sqlite_ocsp_answers_good_then_revoked() {
    ocsp_answers_good_then_revoked(TestDb::sqlite()).await;
}

#[actix_rt::test]
async fn postgres_ocsp_answers_good_then_revoked() {
    ocsp_answers_good_then_revoked(TestDb::postgres()).await;
}

/// Two instances on PostgreSQL: a revocation through one is in the other's OCSP answer within
/// the CRL delay, although the other had the good answer cached.
#[actix_rt::test]
async fn postgres_a_revocation_through_one_instance_is_in_the_others_ocsp_answers() {
    let db = TestDb::postgres();
    let a = TestServer::start(config(&db)).await;
    let b = TestServer::start(config(&db)).await;
    let dir = tempfile::tempdir().unwrap();
    wait_for_responder(&a).await;
    wait_for_responder(&b).await;
    let cert = issue_ok(&a, DEMO_KEY, "tls-server-p256", "cached.example.test").await;
    let pem = cert["certificate"].as_str().unwrap();
    assert_eq!(openssl_ocsp(dir.path(), &b, pem, "ica-p256").0, "good");
    assert_eq!(revoke(&a, DEMO_KEY, cert["serial"].as_str().unwrap(), json!({})).await.0, 200);
    let started = Instant::now();
    loop {
        let (verdict, out) = openssl_ocsp(dir.path(), &b, pem, "ica-p256");
        if verdict == "revoked" {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(3), "still {verdict} after 3 s: {out}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    a.stop().await;
    b.stop().await;
}

/// Pre-signed answers, RFC 5019's GET form and SHA-256 CertIDs: a certificate's answer is signed
/// when it is issued, so its first question costs no signature; a question asked by `GET /ocsp/{base64}` (the request
/// openssl wrote, base64 then URL-encoded) is answered, cacheably, and openssl verifies the saved
/// answer; a SHA-256 question about a serial already answered for a SHA-1 one gets an answer that
/// names it the SHA-256 way (openssl matches the CertID hash by hash).
#[actix_rt::test]
async fn ocsp_answers_the_get_form_and_sha256_questions() {
    use base64::Engine as _;
    let db = TestDb::sqlite();
    let server = TestServer::start(config(&db)).await;
    let dir = tempfile::tempdir().unwrap();
    wait_for_responder(&server).await;
    let before = metric(&server, "castellum_ocsp_signatures_total", "").await;
    let cert = issue_ok(&server, DEMO_KEY, "tls-server-p256", "get-form.example.test").await;
    let pem = cert["certificate"].as_str().unwrap();
    // Pre-signed at issuance (off the request's path): one signature, and the first question
    // costs none.
    let started = Instant::now();
    while metric(&server, "castellum_ocsp_signatures_total", "").await < before + 1.0 {
        assert!(started.elapsed() < Duration::from_secs(5), "not pre-signed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(openssl_ocsp(dir.path(), &server, pem, "ica-p256").0, "good");
    assert_eq!(
        metric(&server, "castellum_ocsp_signatures_total", "").await,
        before + 1.0,
        "the first question was answered from the cache"
    );
    let url = server.url("/ocsp");
    let (verdict, out) = openssl_ocsp_with(dir.path(), pem, "ica-p256", "-sha256", &["-url", &url]);
    assert_eq!(verdict, "good", "a SHA-256 question after a SHA-1 one:\n{out}");
    assert!(out.contains("Response verify OK"), "{out}");
    assert_eq!(
        metric(&server, "castellum_ocsp_signatures_total", "").await,
        before + 2.0,
        "a SHA-256 question is signed at its first ask"
    );

    let (ok, out) = run(Command::new("openssl")
        .current_dir(dir.path())
        .args(["ocsp", "-issuer"])
        .arg(dev_keys().join("ica-p256.crt"))
        .args(["-cert", "ocsp-leaf.pem", "-no_nonce", "-reqout", "request.der"]));
    assert!(ok, "{out}");
    let request = std::fs::read(dir.path().join("request.der")).unwrap();
    let b64 = base64::engine::general_purpose::STANDARD.encode(&request);
    let path: String = percent_encoding::utf8_percent_encode(&b64, percent_encoding::NON_ALPHANUMERIC).to_string();
    let response = server.http.get(server.url(&format!("/ocsp/{path}"))).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/ocsp-response");
    let cache = response.headers()["cache-control"].to_str().unwrap().to_string();
    let max_age: u64 = cache.split("max-age=").nth(1).and_then(|v| v.split(',').next()?.trim().parse().ok()).unwrap();
    assert!(max_age > 3600 && max_age <= 86_400, "cacheable up to its nextUpdate: {cache}");
    std::fs::write(dir.path().join("got.der"), response.bytes().await.unwrap()).unwrap();
    let (verdict, out) = openssl_ocsp_with(dir.path(), pem, "ica-p256", "-sha1", &["-respin", "got.der"]);
    assert_eq!(verdict, "good", "{out}");
    assert!(out.contains("Response verify OK"), "{out}");
    // Not base64: an OCSP malformedRequest, not a problem document.
    let bad = server.http.get(server.url("/ocsp/%%%not-base64")).send().await.unwrap();
    assert_eq!(x509_ocsp_status(&bad.bytes().await.unwrap()), 1, "malformedRequest");
    server.stop().await;
}

/// The responder profile's validity in `renewal_failure` (renewal due at two thirds of it).
const SHORT_RESPONDER: Duration = Duration::from_secs(18);

/// Incident 003's failing renewal: a CA whose responder renewal fails (its profile disabled)
/// keeps answering with its current responder, while readiness, the admin status and the metrics
/// say so before it expires; once it has expired, answers are `tryLater` (never signed by an
/// expired responder); once renewal works again, they are good again.
#[actix_rt::test]
async fn a_failing_responder_renewal_keeps_answering_and_says_so_until_the_responder_expires() {
    let db = TestDb::sqlite();
    let mut config = config(&db);
    let profile = config.profiles.iter_mut().find(|p| p.id == "ocsp-renewal").unwrap();
    (profile.validity, profile.backdate) = (SHORT_RESPONDER, Duration::ZERO);
    let server = TestServer::start(config).await;
    let dir = tempfile::tempdir().unwrap();
    wait_for_responder(&server).await;
    let started = Instant::now();
    let cert = issue_ok(&server, DEMO_KEY, "tls-server-p256", "renewal.example.test").await;
    let pem = cert["certificate"].as_str().unwrap();
    assert_eq!(openssl_ocsp(dir.path(), &server, pem, "ica-p256").0, "good");
    server.engine.set_profile_state("test-operator", "ocsp-renewal", false).await.unwrap();

    // The renewal point (12 s) passes and the next look (every 15 s) fails to renew.
    let warning = loop {
        let readiness: Value =
            server.http.get(server.url("/readyz")).bearer_auth(DEMO_KEY).send().await.unwrap().json().await.unwrap();
        let warnings = readiness["warnings"].as_array().cloned().unwrap_or_default();
        let found = warnings.iter().filter_map(|w| w.as_str()).find_map(|w| {
            (w.contains("CA ica-p256: OCSP responder certificate expires in") && w.contains("renewal failing"))
                .then(|| w.to_string())
        });
        if let Some(w) = found {
            break w;
        }
        assert!(started.elapsed() < SHORT_RESPONDER, "no warning before the responder expired: {readiness}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(warning.contains("disabled"), "the failure names its cause: {warning}");
    let admin = admin_status(&server).await;
    assert!(admin["warnings"].as_array().unwrap().iter().any(|w| w.as_str() == Some(&warning)), "{admin}");
    assert!(metric(&server, "castellum_ocsp_renewal_failures_total", "ica-p256").await >= 1.0);
    let left = metric(&server, "castellum_ocsp_responder_valid_seconds", "ica-p256").await;
    assert!(left > 0.0 && left < SHORT_RESPONDER.as_secs_f64() / 3.0 + 1.0, "{left} s left");
    // Still answering, with the responder it has.
    let (verdict, out) = openssl_ocsp(dir.path(), &server, pem, "ica-p256");
    assert_eq!(verdict, "good", "{out}");
    assert!(out.contains("Response verify OK"), "{out}");

    // Expired: no answer is signed or served past the responder.
    tokio::time::sleep(SHORT_RESPONDER.saturating_sub(started.elapsed()) + Duration::from_secs(1)).await;
    let (_, out) = openssl_ocsp(dir.path(), &server, pem, "ica-p256");
    assert!(out.to_lowercase().contains("trylater"), "after the responder expired:\n{out}");

    // Renewal works again at the next look.
    server.engine.set_profile_state("test-operator", "ocsp-renewal", true).await.unwrap();
    let renewed = Instant::now();
    loop {
        let (verdict, out) = openssl_ocsp(dir.path(), &server, pem, "ica-p256");
        if verdict == "good" {
            assert!(out.contains("Response verify OK"), "{out}");
            break;
        }
        assert!(renewed.elapsed() < Duration::from_secs(20), "not renewed: {out}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    server.stop().await;
}

/// An entry stays on its CRL until its certificate has expired, then leaves at the CRL's next
/// issue (Baseline Requirements 4.10.1), judged by what `openssl crl` lists.
#[actix_rt::test]
async fn an_expired_certificate_leaves_the_crl() {
    let db = TestDb::sqlite();
    let mut config = config(&db);
    ca_of(&mut config, "ica-p256").crl_shards = 1;
    let short = config.profiles.iter_mut().find(|p| p.id == "tls-server-p256").unwrap();
    short.validity = short.backdate + Duration::from_secs(3);
    let server = TestServer::start(config).await;
    let dir = tempfile::tempdir().unwrap();
    let expiring = issue_ok(&server, DEMO_KEY, "tls-server-p256", "expiring.example.test").await;
    let serial = expiring["serial"].as_str().unwrap();
    let url = crl_url_of(dir.path(), expiring["certificate"].as_str().unwrap());
    assert_eq!(revoke(&server, DEMO_KEY, serial, json!({ "reason": "superseded" })).await.0, 200);
    wait_listed(&server, dir.path(), &url, serial, Duration::from_secs(5)).await;

    tokio::time::sleep(Duration::from_secs(4)).await; // it has expired
    let later = issue_ok(&server, DEMO_KEY, "tls-server-p256", "later.example.test").await;
    let later_serial = later["serial"].as_str().unwrap();
    assert_eq!(crl_url_of(dir.path(), later["certificate"].as_str().unwrap()), url, "one shard");
    assert_eq!(revoke(&server, DEMO_KEY, later_serial, json!({})).await.0, 200);
    let (text, _) = wait_listed(&server, dir.path(), &url, later_serial, Duration::from_secs(5)).await;
    assert!(!text.to_uppercase().contains(&serial.to_uppercase()), "the expired entry is gone:\n{text}");
    server.stop().await;
}
