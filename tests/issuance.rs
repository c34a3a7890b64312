//! Issuance end to end over real HTTP on loopback, on SQLite and on PostgreSQL: every dev CA and
//! profile, verified with `openssl verify`, inspected with `openssl x509 -text` and x509-parser,
//! and linted with pkilint.

mod common;

use common::*;
use x509_parser::prelude::*;

/// (profile, CA, key for the CSR, names)
const CASES: &[(&str, &str, Key, &[&str])] = &[
    ("tls-server-p256", "ica-p256", Key::P256, &["www.example.test", "api.example.test"]),
    ("tls-server-p384", "ica-p384", Key::P384, &["p384.example.test"]),
    ("tls-server-rsa", "ica-rsa3072", Key::Rsa(2048), &["rsa.example.test"]),
    ("client-ed25519", "ica-ed25519", Key::Ed25519, &["device.example.test", "email:ops@example.test"]),
    ("ocsp-renewal", "ica-p256", Key::P256, &["ocsp.example.test"]),
];

async fn every_ca_and_profile_issues(db: TestDb) {
    let server = TestServer::start(dev_config(&db)).await;
    let dir = tempfile::tempdir().unwrap();
    for (profile, ca, key, names) in CASES {
        let resp = server.issue(DEMO_KEY, profile, &csr(*key, names)).send().await.unwrap();
        assert_eq!(resp.status(), 201, "{profile}: {}", resp.text().await.unwrap());
        let location = resp.headers()["location"].to_str().unwrap().to_string();
        let body: serde_json::Value = resp.json().await.unwrap();
        let pem = body["certificate"].as_str().unwrap();
        assert_eq!(body["ca"], *ca);
        assert_eq!(body["chain"].as_array().unwrap().len(), 2, "issuing CA + root");

        let (ok, out) = openssl_verify(dir.path(), pem, ca);
        assert!(ok, "{profile}: openssl verify failed: {out}");
        let text = openssl_text(dir.path(), pem);
        for needle in [
            "X509v3 Subject Key Identifier",
            "X509v3 Authority Key Identifier",
            "CA:FALSE",
            "X509v3 Key Usage: critical",
        ] {
            assert!(text.contains(needle), "{profile}: {needle} missing:\n{text}");
        }
        let findings = pkilint_findings(dir.path(), pem, ca);
        assert!(findings.is_empty(), "{profile}: pkilint findings:\n{findings}");

        let (_, parsed) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        let cert = parsed.parse_x509().unwrap();
        let serial = cert.raw_serial();
        assert_eq!(serial.len(), 20, "serial is 20 bytes");
        assert!(serial[0] & 0x80 == 0 && serial[0] != 0, "serial is positive and minimal");
        assert_eq!(hex::encode(serial), body["serial"].as_str().unwrap());
        let bc = cert.basic_constraints().unwrap().unwrap();
        assert!(bc.critical && !bc.value.ca);
        let san = cert.subject_alternative_name().unwrap().expect("SAN present");
        assert_eq!(san.value.general_names.len(), names.len());
        let ca_cert_pem = std::fs::read(dev_keys().join(format!("{ca}.crt"))).unwrap();
        let (_, ca_pem) = x509_parser::pem::parse_x509_pem(&ca_cert_pem).unwrap();
        let ca_cert = ca_pem.parse_x509().unwrap();
        let ca_ski = ca_cert.extensions().iter().find_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
            _ => None,
        });
        let aki = cert.extensions().iter().find_map(|e| match e.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(a) => a.key_identifier.as_ref().map(|k| k.0.to_vec()),
            _ => None,
        });
        assert_eq!(aki, ca_ski, "{profile}: AKI is the CA's SKI");
        let eku = cert.extended_key_usage().unwrap().expect("EKU present").value;
        match *profile {
            "client-ed25519" => assert!(eku.client_auth && !eku.server_auth),
            "ocsp-renewal" => assert!(eku.ocsp_signing),
            _ => assert!(eku.server_auth),
        }

        // The certificate can be fetched back, as JSON and as a PEM chain.
        let fetched: serde_json::Value =
            server.http.get(server.url(&location)).bearer_auth(DEMO_KEY).send().await.unwrap().json().await.unwrap();
        assert_eq!(fetched["certificate"].as_str().unwrap(), pem);
        let chain = server
            .http
            .get(server.url(&location))
            .bearer_auth(DEMO_KEY)
            .header("accept", "application/pem-certificate-chain")
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert_eq!(chain.matches("BEGIN CERTIFICATE").count(), 3);
        // Another client cannot see it (no existence leak).
        let other = server.http.get(server.url(&location)).bearer_auth(OTHER_KEY).send().await.unwrap();
        assert_eq!(other.status(), 404);
    }
    let cas: serde_json::Value =
        server.http.get(server.url("/v1/cas")).bearer_auth(DEMO_KEY).send().await.unwrap().json().await.unwrap();
    assert_eq!(cas["cas"].as_array().unwrap().len(), 4);
    server.stop().await;
}

#[actix_rt::test]
async fn sqlite_every_ca_and_profile_issues() {
    every_ca_and_profile_issues(TestDb::sqlite()).await;
}

#[actix_rt::test]
async fn postgres_every_ca_and_profile_issues() {
    every_ca_and_profile_issues(TestDb::postgres()).await;
}

/// The README's path: a CSR made by the `openssl req` command line.
#[actix_rt::test]
async fn csr_from_the_openssl_command_line_issues() {
    let db = TestDb::sqlite();
    let server = TestServer::start(dev_config(&db)).await;
    let dir = tempfile::tempdir().unwrap();
    let (ok, out) = run(std::process::Command::new("openssl")
        .args(["req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout"])
        .arg(dir.path().join("k.pem"))
        .args(["-subj", "/CN=demo.example.test", "-addext", "subjectAltName=DNS:demo.example.test", "-out"])
        .arg(dir.path().join("r.csr")));
    assert!(ok, "{out}");
    let csr = std::fs::read_to_string(dir.path().join("r.csr")).unwrap();
    let resp = server.issue(DEMO_KEY, "tls-server-p256", &csr).send().await.unwrap();
    assert_eq!(resp.status(), 201);
    server.stop().await;
}
