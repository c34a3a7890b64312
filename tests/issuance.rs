//! Issuance end to end over real HTTP on loopback, on SQLite and on PostgreSQL: every profile
//! with every key type it allows, each certificate judged for content by the openssl command
//! line and pkilint (`judge_issued`), against what the CSR asked for and the profile says; and
//! the judges themselves shown to fail on certificates that are wrong.

mod common;

use std::time::{Duration, SystemTime};

use common::*;
use openssl::asn1::{Asn1Integer, Asn1Time};
use openssl::bn::BigNum;
use openssl::hash::MessageDigest;
use openssl::x509::extension::{
    AuthorityKeyIdentifier, BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAlternativeName, SubjectKeyIdentifier,
};
use openssl::x509::{X509Builder, X509NameBuilder, X509};
use x509_parser::prelude::*;

/// One issuance and what its certificate must be. The profile's side (validity, key usage,
/// extended key usage) is stated here, from keys-dev/castellum.toml; the key usage is what the
/// profile asks for that the key can do (key encipherment only for RSA keys).
struct Case {
    profile: &'static str,
    ca: &'static str,
    key: Key,
    names: &'static [&'static str],
    /// RFC 2253: CN = the CSR's common name (the first DNS name here), none when the CSR has none
    /// or the profile leaves it out (the TLS server profiles: DV certificates name no CN).
    subject: &'static str,
    validity: Duration,
    key_usage: &'static [&'static str],
    extended_key_usage: &'static [&'static str],
    purpose: Option<&'static str>,
}

const DAY: Duration = Duration::from_secs(86_400);
/// The profiles' default backdate (none of the dev profiles sets one).
const BACKDATE: Duration = Duration::from_secs(60);
const DS: &[&str] = &["Digital Signature"];
const DS_KE: &[&str] = &["Digital Signature", "Key Encipherment"];
const SERVER: &[&str] = &["TLS Web Server Authentication"];
const CLIENT: &[&str] = &["TLS Web Client Authentication"];

/// Every profile that issues for CSRs, with every key type it allows.
const CASES: &[Case] = &[
    Case {
        profile: "tls-server-p256",
        ca: "ica-p256",
        key: Key::P256,
        names: &["www.example.test", "api.example.test", "ip:192.0.2.10"],
        subject: "",
        validity: Duration::from_secs(30 * 86_400),
        key_usage: DS,
        extended_key_usage: SERVER,
        purpose: Some("sslserver"),
    },
    Case {
        profile: "tls-server-p256",
        ca: "ica-p256",
        key: Key::P384,
        names: &["p384-key.example.test"],
        subject: "",
        validity: Duration::from_secs(30 * 86_400),
        key_usage: DS,
        extended_key_usage: SERVER,
        purpose: Some("sslserver"),
    },
    Case {
        profile: "tls-server-p256",
        ca: "ica-p256",
        key: Key::Rsa(2048),
        names: &["rsa-key.example.test", "ip:2001:db8::1"],
        subject: "",
        validity: Duration::from_secs(30 * 86_400),
        key_usage: DS_KE,
        extended_key_usage: SERVER,
        purpose: Some("sslserver"),
    },
    Case {
        profile: "tls-server-p384",
        ca: "ica-p384",
        key: Key::P384,
        names: &["p384.example.test"],
        subject: "",
        validity: Duration::from_secs(30 * 86_400),
        key_usage: DS,
        extended_key_usage: SERVER,
        purpose: Some("sslserver"),
    },
    Case {
        profile: "tls-server-p384",
        ca: "ica-p384",
        key: Key::P256,
        names: &["p256-key.example.test", "second.p256-key.example.test"],
        subject: "",
        validity: Duration::from_secs(30 * 86_400),
        key_usage: DS,
        extended_key_usage: SERVER,
        purpose: Some("sslserver"),
    },
    Case {
        profile: "tls-server-rsa",
        ca: "ica-rsa3072",
        key: Key::Rsa(2048),
        names: &["rsa.example.test"],
        subject: "",
        validity: Duration::from_secs(30 * 86_400),
        key_usage: DS_KE,
        extended_key_usage: SERVER,
        purpose: Some("sslserver"),
    },
    Case {
        profile: "tls-server-rsa",
        ca: "ica-rsa3072",
        key: Key::P256,
        names: &["p256-on-rsa.example.test"],
        subject: "",
        validity: Duration::from_secs(30 * 86_400),
        key_usage: DS,
        extended_key_usage: SERVER,
        purpose: Some("sslserver"),
    },
    Case {
        profile: "client-ed25519",
        ca: "ica-ed25519",
        key: Key::Ed25519,
        names: &["device.example.test", "email:ops@example.test"],
        subject: "CN=device.example.test",
        validity: DAY,
        key_usage: DS,
        extended_key_usage: CLIENT,
        purpose: Some("sslclient"),
    },
    Case {
        // No common name in the CSR: an empty subject, and so a critical subjectAltName.
        profile: "client-ed25519",
        ca: "ica-ed25519",
        key: Key::P256,
        names: &["email:p256-device@example.test"],
        subject: "",
        validity: DAY,
        key_usage: DS,
        extended_key_usage: CLIENT,
        purpose: Some("sslclient"),
    },
    Case {
        profile: "ocsp-renewal",
        ca: "ica-p256",
        key: Key::P256,
        names: &["ocsp.example.test"],
        subject: "CN=ocsp.example.test",
        validity: Duration::from_secs(7 * 86_400),
        key_usage: DS,
        extended_key_usage: &["OCSP Signing"],
        purpose: None,
    },
];

impl Case {
    fn expectation(&self, csr: &str, issued_between: (SystemTime, SystemTime)) -> IssuedExpectation {
        IssuedExpectation {
            ca: self.ca.into(),
            csr: csr.into(),
            names: strings(self.names),
            subject: self.subject.into(),
            validity: self.validity,
            backdate: BACKDATE,
            key_usage: strings(self.key_usage),
            extended_key_usage: strings(self.extended_key_usage),
            purpose: self.purpose.map(String::from),
            issued_between,
        }
    }
}

/// The engine's HTTP API with a client that opens a connection per request. The judge takes
/// seconds between requests, about as long as the server keeps an idle connection open (5 s):
/// a pooled connection reused just as the server closes it fails with IncompleteMessage, a race
/// of HTTP keep-alive that is no part of what these tests judge.
async fn start(db: &TestDb) -> TestServer {
    let mut server = TestServer::start(dev_config(db)).await;
    server.http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("http client");
    server
}

/// POST the CSR; the answer's status, JSON body, Location, and when it was sent and answered.
async fn issue(
    server: &TestServer,
    profile: &str,
    csr: &str,
) -> (u16, serde_json::Value, String, (SystemTime, SystemTime)) {
    let sent = SystemTime::now();
    let resp = server.issue(DEMO_KEY, profile, csr).send().await.unwrap();
    let status = resp.status().as_u16();
    let location = resp.headers().get("location").map(|l| l.to_str().unwrap().to_string()).unwrap_or_default();
    let body: serde_json::Value = resp.json().await.unwrap_or_default();
    (status, body, location, (sent, SystemTime::now()))
}

async fn every_profile_and_key_type_issues(db: TestDb) {
    let server = start(&db).await;
    let dir = tempfile::tempdir().unwrap();
    for case in CASES {
        let profile = case.profile;
        let (csr, _key) = csr_and_key(case.key, case.names);
        let (status, body, location, between) = issue(&server, profile, &csr).await;
        assert_eq!(status, 201, "{profile} {:?}: {body}", case.key);
        if let Err(verdict) = judge_issued_async(dir.path(), &case.expectation(&csr, between), &body).await {
            panic!("{profile} with a {:?} key: the certificate is not what was asked for:\n{verdict}", case.key);
        }
        let pem = body["certificate"].as_str().unwrap();
        assert_eq!(body["chain"].as_array().unwrap().len(), 2, "issuing CA + root");
        let text = openssl_text(dir.path(), pem);
        assert!(text.contains("X509v3 Authority Key Identifier"), "{profile}: AKI missing:\n{text}");
        // The TLS server profiles leave the SKI out (Baseline Requirements 7.1.2.7.6: not
        // recommended in subscriber certificates); the others carry it.
        let tls_server = profile.starts_with("tls-server");
        assert_eq!(text.contains("X509v3 Subject Key Identifier"), !tls_server, "{profile}:\n{text}");
        if tls_server {
            // And they point relying parties to their CRL shard and their CA's certificate.
            let crl = format!("URI:http://127.0.0.1:8080/crl/{}/", case.ca);
            let ca_issuers = format!("CA Issuers - URI:http://127.0.0.1:8080/ca/{}.der", case.ca);
            assert!(text.contains(&crl) && text.contains(&ca_issuers), "{profile}:\n{text}");
            assert!(text.contains("Policy: 2.23.140.1.2.1"), "{profile}: the DV policy:\n{text}");
        }

        let (_, parsed) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        let cert = parsed.parse_x509().unwrap();
        let serial = cert.raw_serial();
        assert_eq!(serial.len(), 20, "serial is 20 bytes");
        assert!(serial[0] & 0x80 == 0 && serial[0] != 0, "serial is positive and minimal");
        assert_eq!(hex::encode(serial), body["serial"].as_str().unwrap());
        let ca_cert_pem = std::fs::read(dev_keys().join(format!("{}.crt", case.ca))).unwrap();
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
    assert_eq!(counts(&db).0, CASES.len() as i64, "one stored certificate per issuance (raw SQL)");
    let cas: serde_json::Value =
        server.http.get(server.url("/v1/cas")).bearer_auth(DEMO_KEY).send().await.unwrap().json().await.unwrap();
    assert_eq!(cas["cas"].as_array().unwrap().len(), 4);
    server.stop().await;
}

#[actix_rt::test]
async fn sqlite_every_profile_and_key_type_issues() {
    every_profile_and_key_type_issues(TestDb::sqlite()).await;
}

#[actix_rt::test]
async fn postgres_every_profile_and_key_type_issues() {
    every_profile_and_key_type_issues(TestDb::postgres()).await;
}

/// The README's path: a CSR made by the `openssl req` command line, and its certificate judged
/// like every other (chain, key, names, subject, validity, usages, pkilint); its public key is
/// also the one `openssl pkey` derives from the key file `openssl req` wrote.
#[actix_rt::test]
async fn csr_from_the_openssl_command_line_issues() {
    let db = TestDb::sqlite();
    let server = start(&db).await;
    let dir = tempfile::tempdir().unwrap();
    let (ok, out) = run(std::process::Command::new("openssl")
        .args(["req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout"])
        .arg(dir.path().join("k.pem"))
        .args(["-subj", "/CN=demo.example.test", "-addext", "subjectAltName=DNS:demo.example.test", "-out"])
        .arg(dir.path().join("r.csr")));
    assert!(ok, "{out}");
    let csr = std::fs::read_to_string(dir.path().join("r.csr")).unwrap();
    let (status, body, _, between) = issue(&server, "tls-server-p256", &csr).await;
    assert_eq!(status, 201, "{body}");
    let expect = IssuedExpectation {
        ca: "ica-p256".into(),
        csr: csr.clone(),
        names: strings(&["demo.example.test"]),
        // The TLS server profiles leave the common name out (DV, Baseline Requirements).
        subject: "".into(),
        validity: Duration::from_secs(30 * 86_400),
        backdate: BACKDATE,
        key_usage: strings(DS),
        extended_key_usage: strings(SERVER),
        purpose: Some("sslserver".into()),
        issued_between: between,
    };
    if let Err(verdict) = judge_issued_async(dir.path(), &expect, &body).await {
        panic!("the README's certificate is not what was asked for:\n{verdict}");
    }
    let (ok, key_file_public) =
        run(std::process::Command::new("openssl").args(["pkey", "-pubout", "-in"]).arg(dir.path().join("k.pem")));
    assert!(ok, "{key_file_public}");
    std::fs::write(dir.path().join("readme.pem"), body["certificate"].as_str().unwrap()).unwrap();
    let (ok, cert_public) = run(std::process::Command::new("openssl")
        .args(["x509", "-noout", "-pubkey", "-in"])
        .arg(dir.path().join("readme.pem")));
    assert!(ok, "{cert_public}");
    assert_eq!(cert_public, key_file_public, "the certificate carries the key `openssl req` made");
    server.stop().await;
}

/// A certificate that looks like one `ca` issued for `key` and `names` (DNS names): the CA's
/// name as issuer, its key identifier, the usages of a TLS server profile; but signed by a
/// stranger's key, with `serial`.
fn forged(ca: &str, key: &openssl::pkey::PKey<openssl::pkey::Private>, names: &[&str], serial: u32) -> String {
    let ca_cert = X509::from_pem(&std::fs::read(dev_keys().join(format!("{ca}.crt"))).unwrap()).unwrap();
    let stranger = common::key(Key::P256);
    let mut b = X509Builder::new().unwrap();
    b.set_version(2).unwrap();
    b.set_serial_number(&Asn1Integer::from_bn(&BigNum::from_u32(serial).unwrap()).unwrap()).unwrap();
    let mut subject = X509NameBuilder::new().unwrap();
    subject.append_entry_by_text("CN", names[0]).unwrap();
    b.set_subject_name(&subject.build()).unwrap();
    b.set_issuer_name(ca_cert.subject_name()).unwrap();
    b.set_pubkey(key).unwrap();
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() as i64;
    b.set_not_before(&Asn1Time::from_unix(now - 60).unwrap()).unwrap();
    b.set_not_after(&Asn1Time::from_unix(now - 60 + 30 * 86_400).unwrap()).unwrap();
    b.append_extension(BasicConstraints::new().critical().build().unwrap()).unwrap();
    b.append_extension(KeyUsage::new().critical().digital_signature().build().unwrap()).unwrap();
    b.append_extension(ExtendedKeyUsage::new().server_auth().build().unwrap()).unwrap();
    let ski = SubjectKeyIdentifier::new().build(&b.x509v3_context(None, None)).unwrap();
    b.append_extension(ski).unwrap();
    let aki = AuthorityKeyIdentifier::new().keyid(true).build(&b.x509v3_context(Some(&ca_cert), None)).unwrap();
    b.append_extension(aki).unwrap();
    let mut san = SubjectAlternativeName::new();
    for name in names {
        san.dns(name);
    }
    let san = san.build(&b.x509v3_context(Some(&ca_cert), None)).unwrap();
    b.append_extension(san).unwrap();
    b.sign(&stranger, MessageDigest::sha256()).unwrap();
    String::from_utf8(b.build().to_pem().unwrap()).unwrap()
}

const JUDGED: Case = Case {
    profile: "tls-server-p256",
    ca: "ica-p256",
    key: Key::P256,
    names: &["judge-a.example.test", "judge-b.example.test"],
    subject: "",
    validity: Duration::from_secs(30 * 86_400),
    key_usage: DS,
    extended_key_usage: SERVER,
    purpose: Some("sslserver"),
};

/// The certificate judge can fail: handed a certificate that is not what was asked for (another
/// key, other names, a chain from another CA, a forged signature, garbage...), it fails, and
/// names what is wrong. The right certificate, judged the same way, passes.
#[actix_rt::test]
async fn the_certificate_judge_fails_on_wrong_certificates() {
    let db = TestDb::sqlite();
    let server = start(&db).await;
    let dir = tempfile::tempdir().unwrap();
    let (csr, key) = csr_and_key(JUDGED.key, JUDGED.names);
    let (status, issued, _, between) = issue(&server, JUDGED.profile, &csr).await;
    assert_eq!(status, 201, "{issued}");
    let expect = JUDGED.expectation(&csr, between);
    if let Err(verdict) = judge_issued_async(dir.path(), &expect, &issued).await {
        panic!("the control, the right certificate, fails:\n{verdict}");
    }
    let (other_csr, _) = csr_and_key(Key::P256, &["other.example.test"]);
    let (status, other, _, _) = issue(&server, JUDGED.profile, &other_csr).await;
    assert_eq!(status, 201, "{other}");
    server.stop().await;

    let with = |field: &str, value: serde_json::Value| {
        let mut response = issued.clone();
        response[field] = value;
        response
    };
    let pem = |file: &str| serde_json::Value::from(std::fs::read_to_string(dev_keys().join(file)).unwrap());
    let cert = issued["certificate"].as_str().unwrap();
    let same_names_other_key = csr_with(&common::key(Key::P256), JUDGED.names, MessageDigest::sha256());
    let garbage: String = (0..800u32).map(|i| char::from(b'!' + (i * 37 % 90) as u8)).collect();
    let an_hour = Duration::from_secs(3600);
    let wrong: Vec<(&str, IssuedExpectation, serde_json::Value, &[&str])> = vec![
        (
            "a key other than the CSR's",
            IssuedExpectation { csr: same_names_other_key.clone(), ..expect.clone() },
            issued.clone(),
            &["public key"],
        ),
        (
            "another issued certificate",
            expect.clone(),
            with("certificate", other["certificate"].clone()),
            &["public key", "names", "subject"],
        ),
        (
            "another name set of the same size",
            IssuedExpectation { names: strings(&["judge-a.example.test", "judge-x.example.test"]), ..expect.clone() },
            issued.clone(),
            &["names"],
        ),
        (
            "one name fewer",
            IssuedExpectation { names: strings(&["judge-a.example.test"]), ..expect.clone() },
            issued.clone(),
            &["names"],
        ),
        (
            "a chain from another CA",
            expect.clone(),
            with("chain", serde_json::json!([pem("ica-p384.crt"), pem("root.crt")])),
            &["chain: its first element", "chain: openssl verify"],
        ),
        (
            "a chain without its root",
            expect.clone(),
            with("chain", serde_json::json!([pem("ica-p256.crt")])),
            &["chain: its last element"],
        ),
        ("no chain", expect.clone(), with("chain", serde_json::json!([])), &["chain: the answer carries no chain"]),
        (
            "another validity",
            IssuedExpectation { validity: 31 * DAY, ..expect.clone() },
            issued.clone(),
            &["validity: 2592000s"],
        ),
        (
            "another signing time",
            IssuedExpectation { issued_between: (between.0 + an_hour, between.1 + an_hour), ..expect.clone() },
            issued.clone(),
            &["notBefore"],
        ),
        (
            "another subject",
            IssuedExpectation { subject: "CN=judge-b.example.test".into(), ..expect.clone() },
            issued.clone(),
            &["subject"],
        ),
        (
            "other key usages",
            IssuedExpectation { key_usage: strings(DS_KE), ..expect.clone() },
            issued.clone(),
            &["key usage"],
        ),
        (
            "other extended key usages",
            IssuedExpectation { extended_key_usage: strings(CLIENT), ..expect.clone() },
            issued.clone(),
            &["extended key usage"],
        ),
        ("another CA named", expect.clone(), with("ca", "ica-p384".into()), &["ca: the answer names"]),
        (
            "a forged signature",
            expect.clone(),
            with("certificate", forged("ica-p256", &key, JUDGED.names, 12345).into()),
            &["chain: openssl verify", "pkilint: lint_pkix_signer_signee_cert_chain", "signature_verification_failed"],
        ),
        (
            "garbage",
            expect.clone(),
            with("certificate", garbage.into()),
            &["public key", "names", "subject", "validity", "pkilint: lint_pkix_cert exited Some(1)"],
        ),
        (
            "a truncated certificate",
            expect.clone(),
            with("certificate", cert[..cert.len() / 2].into()),
            &["public key", "pkilint: lint_pkix_cert exited Some(1)"],
        ),
    ];
    // Each case in its own directory, all at once: pkilint is mostly Python starting up.
    std::thread::scope(|s| {
        let runs: Vec<_> = wrong
            .iter()
            .enumerate()
            .map(|(i, (what, expectation, response, named))| {
                let case_dir = dir.path().join(format!("case-{i}"));
                std::fs::create_dir(&case_dir).unwrap();
                (what, named, s.spawn(move || judge_issued(&case_dir, expectation, response)))
            })
            .collect();
        for (what, named, run) in runs {
            match run.join().unwrap() {
                Ok(()) => panic!("the judge passed {what}"),
                Err(verdict) => {
                    for needle in named.iter() {
                        assert!(verdict.contains(needle), "{what}: the verdict does not say {needle:?}:\n{verdict}");
                    }
                }
            }
        }
    });
}

/// pkilint's judge reads both its exit code and its findings: an unparsable file (pkilint prints
/// "Failed to load certificate" and exits 1 with no finding), a truncated certificate, the
/// wrong issuer, and an RFC 5280 violation each fail it; the right certificate passes.
#[actix_rt::test]
async fn the_pkilint_judge_fails_on_broken_files() {
    let db = TestDb::sqlite();
    let server = start(&db).await;
    let dir = tempfile::tempdir().unwrap();
    let (csr, key) = csr_and_key(Key::P256, &["lint.example.test"]);
    let (status, issued, _, _) = issue(&server, "tls-server-p256", &csr).await;
    assert_eq!(status, 201, "{issued}");
    server.stop().await;
    let cert = issued["certificate"].as_str().unwrap();
    let file = |name: &str, bytes: &[u8]| {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    };
    let good = file("good.pem", cert.as_bytes());
    let ca = dev_keys().join("ica-p256.crt");
    if let Err(verdict) = pkilint_verdict(&good, &ca) {
        panic!("the control, the right certificate and issuer, fails:\n{verdict}");
    }
    let mut noise = [0u8; 700];
    openssl::rand::rand_bytes(&mut noise).unwrap();
    let judged = [
        ("garbage bytes", file("garbage.pem", &noise), ca.clone(), "lint_pkix_cert exited Some(1)"),
        (
            "a truncated certificate",
            file("truncated.pem", &cert.as_bytes()[..cert.len() / 2]),
            ca.clone(),
            "lint_pkix_cert exited Some(1)",
        ),
        (
            "the wrong issuer",
            good.clone(),
            dev_keys().join("ica-p384.crt"),
            "pkix.issuer_and_subject_key_identifier_not_equal",
        ),
        (
            "a serial number of zero",
            file("zero.pem", forged("ica-p256", &key, &["lint.example.test"], 0).as_bytes()),
            ca.clone(),
            "pkix.certificate_serial_number_out_of_range",
        ),
    ];
    for (what, leaf, issuer, named) in judged {
        match pkilint_verdict(&leaf, &issuer) {
            Ok(()) => panic!("pkilint's judge passed {what}"),
            Err(verdict) => assert!(verdict.contains(named), "{what}: the verdict does not say {named:?}:\n{verdict}"),
        }
    }
    // The older helper that other tests use reads the exit code too.
    assert!(!pkilint_findings(dir.path(), "not a certificate", "ica-p256").is_empty(), "garbage has findings");
}
