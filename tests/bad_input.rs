//! A corpus of bad input: each is answered with the right 4xx problem type, and nothing is
//! stored but the audit log.

mod common;

use common::*;
use const_oid::AssociatedOid;
use der::asn1::{BitString, Ia5String, OctetString, SetOfVec};
use der::{Decode, Encode};
use openssl::hash::MessageDigest;
use x509_cert::attr::Attribute;
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::SubjectAltName;
use x509_cert::ext::Extension;
use x509_cert::name::RdnSequence;
use x509_cert::request::{CertReq, CertReqInfo, ExtensionReq, Version};
use x509_cert::spki::{AlgorithmIdentifierOwned, SubjectPublicKeyInfoOwned};

fn pem(label: &str, der: &[u8]) -> String {
    der::pem::encode_string(label, der::pem::LineEnding::LF, der).unwrap()
}

fn csr_der(pem_text: &str) -> Vec<u8> {
    openssl::x509::X509Req::from_pem(pem_text.as_bytes()).unwrap().to_der().unwrap()
}

/// A correctly signed CSR whose single DNS name is `name`, byte for byte (the openssl API
/// cannot make one with a NUL in it).
fn csr_with_raw_dns_name(name: &str) -> String {
    let key = key(Key::P256);
    let spki = SubjectPublicKeyInfoOwned::from_der(&key.public_key_to_der().unwrap()).unwrap();
    let san = SubjectAltName(vec![GeneralName::DnsName(Ia5String::new(name).unwrap())]);
    let ext = Extension {
        extn_id: SubjectAltName::OID,
        critical: false,
        extn_value: OctetString::new(san.to_der().unwrap()).unwrap(),
    };
    let attr: Attribute = ExtensionReq(vec![ext]).try_into().unwrap();
    let info = CertReqInfo {
        version: Version::V1,
        subject: RdnSequence(vec![]),
        public_key: spki,
        attributes: SetOfVec::try_from(vec![attr]).unwrap(),
    };
    let mut signer = openssl::sign::Signer::new(MessageDigest::sha256(), &key).unwrap();
    signer.update(&info.to_der().unwrap()).unwrap();
    let signature = signer.sign_to_vec().unwrap();
    let req = CertReq {
        info,
        algorithm: AlgorithmIdentifierOwned { oid: const_oid::db::rfc5912::ECDSA_WITH_SHA_256, parameters: None },
        signature: BitString::from_bytes(&signature).unwrap(),
    };
    pem("CERTIFICATE REQUEST", &req.to_der().unwrap())
}

#[derive(Default)]
struct Case {
    name: &'static str,
    key: Option<&'static str>,
    body: serde_json::Value,
    status: u16,
    problem: &'static str,
    /// What the problem's detail must say (the offending name, …); empty: not checked.
    says: &'static str,
}

fn corpus() -> Vec<Case> {
    let good = csr(Key::P256, &["ok.example.test"]);
    let der = csr_der(&good);
    let mut bad_signature = der.clone();
    *bad_signature.last_mut().unwrap() ^= 0x01;
    let truncated = pem("CERTIFICATE REQUEST", &der[..der.len() / 2]);
    let body = |profile: &str, csr: &str| serde_json::json!({ "profile": profile, "csr": csr });
    vec![
        Case {
            name: "not PEM",
            key: Some(DEMO_KEY),
            body: body("tls-server-p256", "hello, CA"),
            status: 400,
            problem: "malformed-csr",
            ..Default::default()
        },
        Case {
            name: "truncated DER",
            key: Some(DEMO_KEY),
            body: body("tls-server-p256", &truncated),
            status: 400,
            problem: "malformed-csr",
            ..Default::default()
        },
        Case {
            name: "signature does not verify",
            key: Some(DEMO_KEY),
            body: body("tls-server-p256", &pem("CERTIFICATE REQUEST", &bad_signature)),
            status: 400,
            problem: "bad-csr-signature",
            ..Default::default()
        },
        Case {
            name: "RSA-1024",
            key: Some(DEMO_KEY),
            body: body("tls-server-rsa", &csr(Key::Rsa(1024), &["rsa.example.test"])),
            status: 422,
            problem: "weak-key",
            ..Default::default()
        },
        Case {
            name: "SHA-1 signature",
            key: Some(DEMO_KEY),
            body: body("tls-server-rsa", &csr_with(&key(Key::Rsa(2048)), &["rsa.example.test"], MessageDigest::sha1())),
            status: 422,
            problem: "weak-signature-algorithm",
            ..Default::default()
        },
        Case {
            name: "unknown profile",
            key: Some(DEMO_KEY),
            body: body("no-such-profile", &good),
            status: 404,
            problem: "unknown-profile",
            ..Default::default()
        },
        Case {
            name: "profile not allowed",
            key: Some(OTHER_KEY),
            body: body("tls-server-p384", &good),
            status: 403,
            problem: "forbidden-profile",
            ..Default::default()
        },
        Case {
            name: "SAN outside the profile's policy",
            key: Some(DEMO_KEY),
            body: body("tls-server-p256", &csr(Key::P256, &["www.evil.example"])),
            status: 422,
            problem: "policy-violation",
            ..Default::default()
        },
        Case {
            name: "NUL inside a DNS name",
            key: Some(DEMO_KEY),
            body: body("tls-server-p256", &csr_with_raw_dns_name("www.example.test\0.evil.example")),
            status: 422,
            problem: "policy-violation",
            ..Default::default()
        },
        Case {
            name: "key type the profile does not allow",
            key: Some(DEMO_KEY),
            body: body("tls-server-p384", &csr(Key::Ed25519, &["x.example.test"])),
            status: 422,
            problem: "policy-violation",
            ..Default::default()
        },
        // Issue 16: strict input.
        Case {
            name: "text before the PEM block",
            key: Some(DEMO_KEY),
            body: body("tls-server-p256", &format!("hello\n{good}")),
            status: 400,
            problem: "malformed-csr",
            says: "must start with -----BEGIN CERTIFICATE REQUEST-----",
        },
        Case {
            name: "trailing garbage after the PEM block",
            key: Some(DEMO_KEY),
            body: body("tls-server-p256", &format!("{good}garbage")),
            status: 400,
            problem: "malformed-csr",
            says: "text after the PEM block",
        },
        Case {
            name: "a second CSR after the first",
            key: Some(DEMO_KEY),
            body: body("tls-server-p256", &format!("{good}{}", csr(Key::P256, &["second.example.test"]))),
            status: 400,
            problem: "malformed-csr",
            says: "text after the PEM block",
        },
        Case {
            name: "invalid punycode",
            key: Some(DEMO_KEY),
            body: body("tls-server-p256", &csr(Key::P256, &["xn--zz.example.test"])),
            status: 422,
            problem: "policy-violation",
            says: "xn--zz.example.test",
        },
        Case {
            name: "Ed25519 key on a TLS server profile",
            key: Some(DEMO_KEY),
            body: body("tls-server-p256", &csr(Key::Ed25519, &["ed.example.test"])),
            status: 422,
            problem: "policy-violation",
            says: "not allowed by profile",
        },
        // Issue 16: names per client.
        Case {
            name: "another client's domain",
            key: Some(OTHER_KEY),
            body: body("tls-server-p256", &csr(Key::P256, &["demo.example.test"])),
            status: 422,
            problem: "policy-violation",
            says: "demo.example.test is outside the names client \"other\" may request",
        },
        Case {
            name: "an IP address the profile allows but the client may not request",
            key: Some(OTHER_KEY),
            body: body("tls-server-p256", &csr(Key::P256, &["a.other.example.test", "ip:192.0.2.10"])),
            status: 422,
            problem: "policy-violation",
            says: "192.0.2.10 is outside the names client \"other\" may request",
        },
        Case {
            name: "an IP address outside the profile's ranges",
            key: Some(DEMO_KEY),
            body: body("tls-server-p256", &csr(Key::P256, &["a.example.test", "ip:8.8.8.8"])),
            status: 422,
            problem: "policy-violation",
            says: "IP address 8.8.8.8 is outside the ranges profile",
        },
        Case {
            name: "oversized body",
            key: Some(DEMO_KEY),
            body: body("tls-server-p256", &"A".repeat(200 * 1024)),
            status: 413,
            problem: "payload-too-large",
            ..Default::default()
        },
        Case {
            name: "JSON missing a field",
            key: Some(DEMO_KEY),
            body: serde_json::json!({ "profile": "x" }),
            status: 400,
            problem: "malformed-request",
            ..Default::default()
        },
        Case {
            name: "missing API key",
            key: None,
            body: body("tls-server-p256", &good),
            status: 401,
            problem: "unauthorized",
            ..Default::default()
        },
        Case {
            name: "wrong API key",
            key: Some("not-a-key"),
            body: body("tls-server-p256", &good),
            status: 401,
            problem: "unauthorized",
            ..Default::default()
        },
    ]
}

async fn bad_input_is_refused_and_stores_nothing(db: TestDb) {
    let server = TestServer::start(dev_config(&db)).await;
    let before = counts(&db);
    for case in corpus() {
        let mut req = server.http.post(server.url("/v1/certificates")).json(&case.body);
        if let Some(key) = case.key {
            req = req.bearer_auth(key);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let content_type = resp.headers().get("content-type").map(|v| v.to_str().unwrap().to_string());
        let body: serde_json::Value = resp.json().await.unwrap_or_default();
        assert_eq!(status, case.status, "{}: {body}", case.name);
        assert_eq!(content_type.as_deref(), Some("application/problem+json"), "{}", case.name);
        assert_eq!(body["type"], format!("urn:castellum:problem:{}", case.problem), "{}: {body}", case.name);
        assert_eq!(body["status"], case.status, "{}", case.name);
        let detail = body["detail"].as_str().unwrap_or_default();
        assert!(detail.contains(case.says), "{}: the detail should say {:?}: {body}", case.name, case.says);
        // The same bad input asked asynchronously is refused the same way, before anything is stored.
        let mut req =
            server.http.post(server.url("/v1/certificates")).header("prefer", "respond-async").json(&case.body);
        if let Some(key) = case.key {
            req = req.bearer_auth(key);
        }
        assert_eq!(req.send().await.unwrap().status().as_u16(), case.status, "{} (async)", case.name);
    }
    assert_eq!(counts(&db), before, "no certificate and no request was stored");
    // Refusals of authenticated clients are in the audit log, in aggregate (the last tallies
    // are written when the engine stops).
    server.stop().await;
    let audit = sql::audit(&db);
    assert!(audit.iter().any(|e| e.outcome == "bad-csr-signature" && e.actor == "demo"), "{audit:?}");
}

#[actix_rt::test]
async fn sqlite_bad_input_is_refused_and_stores_nothing() {
    bad_input_is_refused_and_stores_nothing(TestDb::sqlite()).await;
}

#[actix_rt::test]
async fn postgres_bad_input_is_refused_and_stores_nothing() {
    bad_input_is_refused_and_stores_nothing(TestDb::postgres()).await;
}

#[actix_rt::test]
async fn unknown_routes_and_serials_are_problems() {
    let db = TestDb::sqlite();
    let server = TestServer::start(dev_config(&db)).await;
    let resp = server.http.get(server.url("/v1/certificates/zz-not-hex")).bearer_auth(DEMO_KEY).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    let resp = server.http.get(server.url("/nowhere")).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(resp.headers()["content-type"], "application/problem+json");
    server.stop().await;
}

/// One HTTP/1.1 request on `stream` and the head of its answer (status line and headers).
fn exchange(stream: &mut std::net::TcpStream, host: &str, key: &str, body: &str) -> String {
    use std::io::{BufRead as _, Read as _, Write as _};
    write!(
        stream,
        "POST /v1/certificates HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
    let mut head = String::new();
    let mut length = 0;
    loop {
        let mut line = String::new();
        assert!(reader.read_line(&mut line).unwrap() > 0, "connection closed; answer so far:\n{head}");
        if let Some(n) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = n.trim().parse().unwrap();
        }
        if line == "\r\n" {
            break;
        }
        head.push_str(&line);
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).unwrap();
    head
}

/// A client retrying with a wrong key (a fleet with a revoked or mistyped key) must cost a
/// refusal, not a new TCP connection per refusal: its request body is read so the connection stays
/// open. Judged over a raw socket, as any HTTP/1.1 client would see it.
#[actix_rt::test]
async fn a_wrong_key_keeps_the_connection_open() {
    let db = TestDb::sqlite();
    let server = TestServer::start(dev_config(&db)).await;
    let host = server.base.trim_start_matches("http://").to_string();
    let body =
        serde_json::json!({ "profile": "tls-server-p256", "csr": csr(Key::P256, &["a.example.test"]) }).to_string();
    let heads = tokio::task::spawn_blocking(move || {
        let mut stream = std::net::TcpStream::connect(&host).unwrap();
        stream.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
        (0..3).map(|_| exchange(&mut stream, &host, "not-a-key", &body)).collect::<Vec<_>>()
    })
    .await
    .unwrap();
    for head in &heads {
        assert!(head.starts_with("HTTP/1.1 401"), "{head}");
        assert!(!head.to_ascii_lowercase().contains("connection: close"), "{head}");
    }
    server.stop().await;
}

/// A refused request whose body never comes is answered anyway, within a bound: the engine reads
/// a refused body only for so long, then answers (and closes the connection).
#[actix_rt::test]
async fn a_wrong_key_with_a_body_that_never_comes_is_answered() {
    let db = TestDb::sqlite();
    let server = TestServer::start(dev_config(&db)).await;
    let host = server.base.trim_start_matches("http://").to_string();
    let answer = tokio::task::spawn_blocking(move || {
        use std::io::{Read as _, Write as _};
        let mut stream = std::net::TcpStream::connect(&host).unwrap();
        stream.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
        write!(
            stream,
            "POST /v1/certificates HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer not-a-key\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        )
        .unwrap();
        let started = std::time::Instant::now();
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).expect("an answer within 10 s");
        (String::from_utf8_lossy(&head).to_string(), started.elapsed())
    })
    .await
    .unwrap();
    assert!(answer.0.starts_with("HTTP/1.1 401"), "{answer:?}");
    assert!(answer.1 < std::time::Duration::from_secs(5), "answered after {:?}", answer.1);
    server.stop().await;
}

/// Issue 16: API answers (a certificate, a problem) are never stored by a cache nor sniffed; the
/// routes meant for caches (a CA certificate, CRLs) keep their own `Cache-Control`.
#[actix_rt::test]
async fn api_answers_are_not_cached_or_sniffed() {
    let db = TestDb::sqlite();
    let server = TestServer::start(dev_config(&db)).await;
    let issued = server.issue(DEMO_KEY, "tls-server-p256", &csr(Key::P256, &["h.example.test"])).send().await.unwrap();
    let refused = server.issue("not-a-key", "tls-server-p256", "x").send().await.unwrap();
    for (what, answer) in [("201", &issued), ("401", &refused)] {
        let header = |name: &str| answer.headers().get(name).map(|v| v.to_str().unwrap().to_string());
        assert_eq!(header("cache-control").as_deref(), Some("no-store"), "{what}");
        assert_eq!(header("x-content-type-options").as_deref(), Some("nosniff"), "{what}");
    }
    let ca = server.http.get(server.url("/ca/ica-p256.der")).send().await.unwrap();
    assert_eq!(ca.headers()["cache-control"], "public, max-age=86400");
    server.stop().await;
}
