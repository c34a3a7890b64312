//! TLS on both listeners (issue 16): judged by real TLS clients (`curl`, `openssl s_client`,
//! and reqwest's rustls): a certificate rotated under load without a restart and without a
//! failed request, a file that does not load changing nothing, and client certificates — one
//! castellum itself issued from its client profile — authenticating a configured client, while a
//! certificate from an unknown CA, an expired one and a server-only one are refused.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::process::Command;

use castellum::config::TlsConfig;
use common::*;
use openssl::asn1::{Asn1Integer, Asn1Time};
use openssl::bn::BigNum;
use openssl::hash::MessageDigest;
use openssl::pkey::{PKey, Private};
use openssl::x509::extension::{BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAlternativeName};
use openssl::x509::{X509NameBuilder, X509};

/// A certificate and its key, made by the test (with the openssl library, not the engine).
struct Issued {
    cert: X509,
    key: PKey<Private>,
}

enum Usage {
    Ca,
    Server,
    Client,
}

/// A certificate for `cn` (and `sans`, `DNS:`/`IP:` prefixed), valid from `from` to `to`
/// (Unix seconds), signed by `issuer` (self-signed when `None`).
fn make(cn: &str, sans: &[&str], usage: Usage, from: i64, to: i64, issuer: Option<&Issued>) -> Issued {
    let key = common::key(Key::P256);
    let mut name = X509NameBuilder::new().unwrap();
    name.append_entry_by_text("CN", cn).unwrap();
    let name = name.build();
    let mut b = X509::builder().unwrap();
    b.set_version(2).unwrap();
    let serial = BigNum::from_u32(rand_serial()).unwrap();
    b.set_serial_number(&Asn1Integer::from_bn(&serial).unwrap()).unwrap();
    b.set_subject_name(&name).unwrap();
    b.set_issuer_name(issuer.map(|i| i.cert.subject_name()).unwrap_or(&name)).unwrap();
    b.set_pubkey(&key).unwrap();
    b.set_not_before(&Asn1Time::from_unix(from).unwrap()).unwrap();
    b.set_not_after(&Asn1Time::from_unix(to).unwrap()).unwrap();
    match usage {
        Usage::Ca => {
            b.append_extension(BasicConstraints::new().critical().ca().build().unwrap()).unwrap();
            b.append_extension(KeyUsage::new().critical().key_cert_sign().crl_sign().build().unwrap()).unwrap();
        }
        Usage::Server | Usage::Client => {
            b.append_extension(BasicConstraints::new().critical().build().unwrap()).unwrap();
            b.append_extension(KeyUsage::new().critical().digital_signature().build().unwrap()).unwrap();
            let mut eku = ExtendedKeyUsage::new();
            match usage {
                Usage::Server => eku.server_auth(),
                _ => eku.client_auth(),
            };
            b.append_extension(eku.build().unwrap()).unwrap();
        }
    }
    if !sans.is_empty() {
        let mut san = SubjectAlternativeName::new();
        for s in sans {
            match s.split_once(':') {
                Some(("DNS", n)) => san.dns(n),
                Some(("IP", n)) => san.ip(n),
                _ => panic!("{s}"),
            };
        }
        let ext = san.build(&b.x509v3_context(issuer.map(|i| i.cert.as_ref()), None)).unwrap();
        b.append_extension(ext).unwrap();
    }
    b.sign(issuer.map(|i| &i.key).unwrap_or(&key), MessageDigest::sha256()).unwrap();
    Issued { cert: b.build(), key }
}

fn rand_serial() -> u32 {
    u32::from_le_bytes(openssl::sha::sha256(uuid::Uuid::new_v4().as_bytes())[..4].try_into().unwrap()) >> 1
}

fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

const DAY: i64 = 86_400;

/// The listeners' own little PKI, in a directory.
struct Pki {
    dir: tempfile::TempDir,
    ca: Issued,
}

impl Pki {
    fn new() -> Pki {
        let ca = make("castellum listener test CA", &[], Usage::Ca, now() - DAY, now() + 30 * DAY, None);
        let pki = Pki { dir: tempfile::tempdir().unwrap(), ca };
        pki.write("ca.pem", &pki.ca.cert.to_pem().unwrap());
        pki
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Write `bytes` to `name` as a rotation would: a new file renamed over the old one.
    fn write(&self, name: &str, bytes: &[u8]) {
        let tmp = self.path(&format!(".{name}.tmp"));
        std::fs::write(&tmp, bytes).unwrap();
        std::fs::rename(tmp, self.path(name)).unwrap();
    }

    /// A server certificate for loopback with common name `cn`, as `cert.pem` / `key.pem`.
    fn server(&self, cn: &str) {
        let leaf = make(cn, &["DNS:localhost", "IP:127.0.0.1"], Usage::Server, now() - 60, now() + DAY, Some(&self.ca));
        self.write("key.pem", &leaf.key.private_key_to_pem_pkcs8().unwrap());
        self.write("cert.pem", &leaf.cert.to_pem().unwrap());
    }

    fn tls(&self, client_ca: Option<PathBuf>) -> TlsConfig {
        TlsConfig {
            certificate: self.path("cert.pem"),
            key: self.path("key.pem"),
            client_ca,
            client_crl: None,
            reload_interval: Duration::from_millis(100),
        }
    }

    /// A client that trusts this PKI and opens a new connection with a full handshake (no
    /// session resumption) for every request, so that each one reaches the certificate resolver.
    fn client(&self) -> reqwest::Client {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(rustls::pki_types::CertificateDer::from(self.ca.cert.to_der().unwrap())).unwrap();
        let mut tls = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
        tls.resumption = rustls::client::Resumption::disabled();
        reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .pool_max_idle_per_host(0)
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap()
    }

    /// The subject line `openssl s_client` shows for the certificate `addr` serves, after
    /// verifying it against this PKI's CA.
    async fn served_subject(&self, addr: &str) -> String {
        let out = Command::new("openssl")
            .args(["s_client", "-connect", addr, "-verify_return_error", "-CAfile"])
            .arg(self.path("ca.pem"))
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(Duration::from_secs(10), out).await.expect("s_client ends").unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(text.contains("Verify return code: 0 (ok)"), "{text}{}", String::from_utf8_lossy(&out.stderr));
        text.lines().find(|l| l.starts_with("subject=")).unwrap_or_default().to_string()
    }
}

fn addr_of(base: &str) -> String {
    base.split("://").nth(1).unwrap().to_string()
}

/// Run a command without blocking the test's runtime (which serves the engine's listeners).
async fn run_async(cmd: &mut Command) -> (bool, String) {
    let out = cmd.kill_on_drop(true).output().await.unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let mut text = String::from_utf8_lossy(&out.stdout).to_string();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

async fn curl(args: &[&str]) -> (bool, String) {
    run_async(Command::new("curl").args(["-sS", "--max-time", "10"]).args(args)).await
}

/// Both listeners speak TLS that curl verifies; plain HTTP to them gets no answer; the admin
/// command line reaches an https admin listener from the configuration's address, with the token
/// read from a file.
#[actix_rt::test]
async fn both_listeners_speak_tls_that_curl_verifies() {
    let pki = Pki::new();
    pki.server("castellum api");
    let db = TestDb::sqlite();
    let mut config = dev_config(&db);
    config.http.tls = Some(pki.tls(None));
    config.admin.tls = Some(pki.tls(None));
    let server = TestServer::start_with(config, pki.client()).await;
    assert!(server.base.starts_with("https://") && server.admin_base.starts_with("https://"));
    let ca = pki.path("ca.pem").display().to_string();

    let (ok, out) = curl(&["--cacert", &ca, &server.url("/v1/cas"), "-H", "Authorization: Bearer dev-key-demo"]).await;
    assert!(ok && out.contains("ica-p256"), "{out}");
    let (ok, out) =
        curl(&["--cacert", &ca, "-o", "/dev/null", "-w", "%{http_code}", &format!("{}/admin", server.admin_base)])
            .await;
    assert!(ok && out == "200", "{out}");
    // A client that does not trust the listener's CA is refused by its own TLS check.
    let (ok, out) = curl(&[&server.url("/healthz")]).await;
    assert!(!ok && out.contains("certificate"), "{out}");
    // Plain HTTP to a TLS listener gets no HTTP answer.
    let (ok, out) =
        curl(&["-o", "/dev/null", "-w", "%{http_code}", &format!("http://{}/healthz", addr_of(&server.base))]).await;
    assert!(!ok || out == "000", "{out}");
    assert!(pki.served_subject(&addr_of(&server.admin_base)).await.contains("castellum api"));

    // `castellum admin -c`: the admin address from the configuration, the token from a file.
    let port = addr_of(&server.admin_base).rsplit(':').next().unwrap().to_string();
    let config_file = pki.path("castellum.toml");
    let text =
        dev_config_text().replace("listen = \"127.0.0.1:8081\"", &format!("listen = \"0.0.0.0:{port}\"")).replace(
            "\n[database]",
            &format!(
                "\n[admin.tls]\ncertificate = \"{}\"\nkey = \"{}\"\n\n[database]",
                pki.path("cert.pem").display(),
                pki.path("key.pem").display()
            ),
        );
    std::fs::write(&config_file, text).unwrap();
    std::fs::write(pki.path("token"), "dev-admin-token\n").unwrap();
    let admin = |extra: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_castellum"));
        cmd.arg("admin").arg("-c").arg(&config_file).args(extra).arg("status");
        cmd.env_remove("CASTELLUM_ADMIN_URL").env_remove("CASTELLUM_ADMIN_TOKEN");
        async move { run_async(&mut cmd).await }
    };
    let token = pki.path("token").display().to_string();
    let (ok, out) = admin(&["--token-file", &token, "--cacert", &ca]).await;
    assert!(ok && out.contains("registry version"), "{out}");
    let (ok, out) = admin(&["--token-file", &token]).await;
    assert!(!ok && out.contains("certificate"), "an https admin listener is verified: {out}");
    let (ok, out) = admin(&["--cacert", &ca]).await;
    assert!(!ok && out.contains("no admin token"), "{out}");
    server.stop().await;
}

/// The certificate is replaced while a client makes a new TLS connection for every request: no
/// request fails, `openssl s_client` sees the new certificate within a few reload intervals, and
/// files that do not load (a key that does not match) change nothing and are counted.
#[actix_rt::test]
async fn a_certificate_rotates_under_load_without_a_restart() {
    let pki = Pki::new();
    pki.server("rotation-1");
    let db = TestDb::sqlite();
    let mut config = dev_config(&db);
    config.http.tls = Some(pki.tls(None));
    let server = TestServer::start_with(config, pki.client()).await;
    let addr = addr_of(&server.base);
    assert!(pki.served_subject(&addr).await.contains("rotation-1"));

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (client, url, stop) = (pki.client(), server.url("/v1/cas"), stop.clone());
        actix_rt::spawn(async move {
            let (mut served, mut failed) = (0u32, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match client.get(&url).bearer_auth(DEMO_KEY).send().await {
                    Ok(r) if r.status() == 200 => served += 1,
                    Ok(r) => failed.push(r.status().to_string()),
                    Err(e) => failed.push(format!("{e:?}")),
                }
            }
            (served, failed)
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    pki.server("rotation-2");
    let started = Instant::now();
    while !pki.served_subject(&addr).await.contains("rotation-2") {
        assert!(started.elapsed() < Duration::from_secs(5), "the new certificate is not served");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(metric(&server, "castellum_tls_reloads_total", "outcome=\"loaded\"").await, 1.0);
    let expiry = metric(&server, "castellum_tls_certificate_not_after", "listener=\"api\"").await;
    assert!((expiry - (now() + DAY) as f64).abs() < 120.0, "{expiry}");

    // A rotation gone wrong: a key of another certificate. The served certificate stays. (The
    // rotation above may itself have been seen half-done, a new key beside the old certificate,
    // and refused once: count from here.)
    let refused_before = metric(&server, "castellum_tls_reloads_total", "outcome=\"refused\"").await;
    let stray = make("stray", &[], Usage::Server, now() - 60, now() + DAY, Some(&pki.ca));
    pki.write("key.pem", &stray.key.private_key_to_pem_pkcs8().unwrap());
    let started = Instant::now();
    while metric(&server, "castellum_tls_reloads_total", "outcome=\"refused\"").await < refused_before + 1.0 {
        assert!(started.elapsed() < Duration::from_secs(5), "the bad key is not noticed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(pki.served_subject(&addr).await.contains("rotation-2"));
    let refused = metric(&server, "castellum_tls_reloads_total", "outcome=\"refused\"").await;
    assert_eq!(refused, refused_before + 1.0, "a content is tried, and refused, once");

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (served, failed) = load.await.unwrap();
    assert!(failed.is_empty(), "{} of {} requests failed: {:?}", failed.len(), served as usize + failed.len(), failed);
    assert!(served >= 10, "the load made only {served} requests");
    server.stop().await;
}

/// Mutual TLS: a client certificate castellum issued from its client profile (to the client
/// itself, with a bootstrap key) authenticates the client configured with its name (curl, no
/// bearer key); a certificate from an unknown CA, an expired one and one for servers only are
/// refused in the handshake; a valid one whose name no client has gets `401`. No other client
/// may obtain the name (check-config would refuse it: `check_config`).
#[actix_rt::test]
async fn client_certificates_authenticate_a_configured_client() {
    let pki = Pki::new();
    pki.server("castellum api");
    let db = TestDb::sqlite();
    let server = TestServer::start_with(robot_config(&pki, &db, None), pki.client()).await;
    issue_robot_certificate(&server, &pki, "robot").await;

    let ca = pki.path("ca.pem").display().to_string();
    let body = serde_json::json!({ "profile": "tls-server-p256", "csr": csr_of(Key::P256, "robot.example.test") });
    let body = body.to_string();
    let with_cert = |cert: &str, key: &str, extra: &[&str]| {
        let (cert, key) = (pki.path(cert).display().to_string(), pki.path(key).display().to_string());
        let url = server.url("/v1/certificates");
        let mut args = vec!["--cacert", &ca, "--cert", &cert, "--key", &key, "-w", "\n%{http_code}"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["-H", "Content-Type: application/json", "--data", &body, &url]);
        let args: Vec<String> = args.into_iter().map(String::from).collect();
        async move { curl(&args.iter().map(String::as_str).collect::<Vec<_>>()).await }
    };
    let (ok, out) = with_cert("robot.pem", "robot.key", &[]).await;
    assert!(ok && out.ends_with("201"), "{out}");
    let answer: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    let serial = answer["serial"].as_str().unwrap();
    // Issued to robot: demo does not see it, and robot's client certificate does.
    let theirs = server.http.get(server.url(&format!("/v1/certificates/{serial}"))).bearer_auth(DEMO_KEY);
    assert_eq!(theirs.send().await.unwrap().status(), 404);
    let (robot_cert, robot_key) =
        (pki.path("robot.pem").display().to_string(), pki.path("robot.key").display().to_string());
    let url = server.url(&format!("/v1/certificates/{serial}"));
    let (ok, out) =
        curl(&["--cacert", &ca, "--cert", &robot_cert, "--key", &robot_key, "-w", "\n%{http_code}", &url]).await;
    assert!(ok && out.ends_with("200") && out.contains(serial), "{out}");
    // A bearer key, when given, is what authenticates (a wrong one is not rescued by the certificate).
    let (ok, out) = with_cert("robot.pem", "robot.key", &["-H", "Authorization: Bearer wrong"]).await;
    assert!(ok && out.ends_with("401"), "{out}");

    // Refused in the handshake: an unknown CA's certificate, an expired one, a server one.
    let stranger_ca = make("stranger CA", &[], Usage::Ca, now() - DAY, now() + DAY, None);
    let refused = [
        (
            "unknown CA",
            make(
                "robot.example.test",
                &["DNS:robot.example.test"],
                Usage::Client,
                now() - 60,
                now() + DAY,
                Some(&stranger_ca),
            ),
        ),
        (
            "expired",
            make(
                "robot.example.test",
                &["DNS:robot.example.test"],
                Usage::Client,
                now() - 3 * DAY,
                now() - DAY,
                Some(&pki.ca),
            ),
        ),
        (
            "server only",
            make(
                "robot.example.test",
                &["DNS:robot.example.test"],
                Usage::Server,
                now() - 60,
                now() + DAY,
                Some(&pki.ca),
            ),
        ),
    ];
    for (why, cert) in &refused {
        pki.write("bad.pem", &cert.cert.to_pem().unwrap());
        pki.write("bad.key", &cert.key.private_key_to_pem_pkcs8().unwrap());
        let (ok, out) = with_cert("bad.pem", "bad.key", &[]).await;
        assert!(!ok && !out.ends_with("201"), "{why}: {out}");
    }
    // Valid, but no client has its name.
    let nobody = make(
        "nobody.example.test",
        &["DNS:nobody.example.test"],
        Usage::Client,
        now() - 60,
        now() + DAY,
        Some(&pki.ca),
    );
    pki.write("nobody.pem", &nobody.cert.to_pem().unwrap());
    pki.write("nobody.key", &nobody.key.private_key_to_pem_pkcs8().unwrap());
    let (ok, out) = with_cert("nobody.pem", "nobody.key", &[]).await;
    assert!(ok && out.ends_with("401") && out.contains("unauthorized"), "{out}");
    // Without a certificate, a bearer key still works on the same listener.
    let csr = csr_of(Key::P256, "demo.example.test");
    assert_eq!(server.issue(DEMO_KEY, "tls-server-p256", &csr).send().await.unwrap().status(), 201);
    server.stop().await;
}

/// Client certificates checked against CRLs (`http.tls.client_crl`), judged by curl: while the
/// file holds only another CA's CRL, castellum's client certificate is refused (no CRL covers
/// it); once it holds every shard of the issuing CA's CRL (fetched from castellum, converted by
/// the openssl library), it authenticates; after one of two such certificates is revoked and
/// the file renewed, that one is refused in the handshake and the other still authenticates.
#[actix_rt::test]
async fn a_revoked_client_certificate_is_refused_once_the_crl_file_lists_it() {
    let pki = Pki::new();
    pki.server("castellum api");
    pki.write("client-crl.pem", &test_ca_crl(&pki));
    let db = TestDb::sqlite();
    let mut config = robot_config(&pki, &db, Some(pki.path("client-crl.pem")));
    config.crl.delay = Duration::from_secs(1);
    let shards = config.cas.iter().find(|c| c.id == "ica-ed25519").map(|c| c.crl_shards).unwrap();
    let server = TestServer::start_with(config, pki.client()).await;
    let revoked = issue_robot_certificate(&server, &pki, "revoked").await;
    let kept = issue_robot_certificate(&server, &pki, "kept").await;
    let ca = pki.path("ca.pem").display().to_string();
    // GET the certificate's own record with it: (curl succeeded, HTTP status).
    let with_cert = |file: &str, serial: &str| {
        let args: Vec<String> = [
            "--cacert".to_string(),
            ca.clone(),
            "--cert".into(),
            pki.path(&format!("{file}.pem")).display().to_string(),
            "--key".into(),
            pki.path(&format!("{file}.key")).display().to_string(),
            "-o".into(),
            "/dev/null".into(),
            "-w".into(),
            "%{http_code}".into(),
            server.url(&format!("/v1/certificates/{serial}")),
        ]
        .into();
        async move { curl(&args.iter().map(String::as_str).collect::<Vec<_>>()).await }
    };
    // Until the verdict is `want` (the file is read every 100 ms), or 5 s.
    let settles = |file: &'static str, serial: String, want: bool| {
        let with_cert = &with_cert;
        async move {
            let started = Instant::now();
            loop {
                let (ok, out) = with_cert(file, &serial).await;
                let accepted = ok && out == "200";
                if accepted == want || started.elapsed() > Duration::from_secs(5) {
                    return (accepted, out);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };

    let (accepted, out) = with_cert("kept", &kept).await;
    assert!(!(accepted && out == "200"), "accepted with no CRL covering its CA: {out}");

    let crls = |listed: Option<String>| {
        let server = &server;
        let pki = &pki;
        async move {
            let started = Instant::now();
            loop {
                let mut file = test_ca_crl(pki);
                let (mut lists_it, mut fetched) = (listed.is_none(), 0);
                for shard in 0..shards {
                    let response = server.http.get(server.url(&format!("/crl/ica-ed25519/{shard}.crl"))).send().await;
                    let der = response.unwrap().bytes().await.unwrap();
                    let Ok(crl) = openssl::x509::X509Crl::from_der(&der) else { continue };
                    file.extend(crl.to_pem().unwrap());
                    fetched += 1;
                    let serials = crl.get_revoked().into_iter().flatten();
                    let serials: Vec<String> =
                        serials.map(|r| r.serial_number().to_bn().unwrap().to_hex_str().unwrap().to_string()).collect();
                    lists_it |= listed.as_ref().is_some_and(|s| serials.iter().any(|h| h.eq_ignore_ascii_case(s)));
                }
                if lists_it && fetched == shards {
                    return file;
                }
                assert!(
                    started.elapsed() < Duration::from_secs(5),
                    "ica-ed25519's CRLs not ready (listing {listed:?})"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    pki.write("client-crl.pem", &crls(None).await);
    for (file, serial) in [("revoked", &revoked), ("kept", &kept)] {
        let (accepted, out) = settles(file, serial.clone(), true).await;
        assert!(accepted, "{file}: refused with its CA's CRLs loaded: {out}");
    }

    let revoke = server
        .http
        .post(server.url(&format!("/v1/certificates/{revoked}/revoke")))
        .bearer_auth(ROBOT_BOOTSTRAP_KEY)
        .json(&serde_json::json!({ "reason": "keyCompromise" }))
        .send()
        .await
        .unwrap();
    assert_eq!(revoke.status(), 200);
    pki.write("client-crl.pem", &crls(Some(revoked.clone())).await);
    let (accepted, out) = settles("revoked", revoked.clone(), false).await;
    assert!(!accepted, "a revoked client certificate still authenticates: {out}");
    let (accepted, out) = with_cert("kept", &kept).await;
    assert!(accepted && out == "200", "the certificate not revoked is refused: {out}");
    // The file's first nextUpdate is the test CA's (1 day) or a shard's (7 days): alertable.
    let next_update = metric(&server, "castellum_tls_client_crl_next_update", r#"listener="api""#).await as i64;
    assert!(next_update > now() && next_update <= now() + 86_400 + 60, "{next_update}");
    server.stop().await;
}

/// An empty CRL of the test CA, made by `openssl ca -gencrl`, as PEM.
fn test_ca_crl(pki: &Pki) -> Vec<u8> {
    pki.write("ca.key", &pki.ca.key.private_key_to_pem_pkcs8().unwrap());
    pki.write("index.txt", b"");
    // A CRL number makes it a v2 CRL, the only version rustls reads.
    pki.write("crlnumber", b"01\n");
    let conf = format!(
        "[ca]\ndefault_ca = test\n[test]\ndatabase = {}\ncrlnumber = {}\ndefault_md = sha256\ndefault_crl_days = 1\n",
        pki.path("index.txt").display(),
        pki.path("crlnumber").display()
    );
    pki.write("ca.cnf", conf.as_bytes());
    let out = std::process::Command::new("openssl")
        .args(["ca", "-gencrl", "-batch", "-config"])
        .arg(pki.path("ca.cnf"))
        .arg("-keyfile")
        .arg(pki.path("ca.key"))
        .arg("-cert")
        .arg(pki.path("ca.pem"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

const ROBOT_BOOTSTRAP_KEY: &str = "robot-bootstrap-key";

/// The dev configuration with a client `robot` authenticated by the name `robot.example.test`
/// in a client certificate (or by its bootstrap key), TLS on the API with the dev root and the
/// test CA as client CAs, and `client_crl` if given.
fn robot_config(pki: &Pki, db: &TestDb, client_crl: Option<PathBuf>) -> castellum::config::Config {
    let mut bundle = std::fs::read(dev_keys().join("root.crt")).unwrap();
    bundle.extend(pki.ca.cert.to_pem().unwrap());
    pki.write("client-ca.pem", &bundle);
    let robot = format!(
        "[[clients]]\nname = \"robot\"\napi_key_sha256 = \"{}\"\ncertificate_names = [\"robot.example.test\"]\n\
         profiles = [\"client-ed25519\", \"tls-server-p256\"]\n[clients.names]\ndns_suffixes = [\"robot.example.test\"]\n\n",
        hex::encode(openssl::sha::sha256(ROBOT_BOOTSTRAP_KEY.as_bytes()))
    );
    let text = dev_config_text()
        .replace("[clients.names]\nip_ranges", "[clients.names]\ndns_suffixes = [\"demo.example.test\"]\nip_ranges")
        .replace("[[clients]]\nname = \"other\"", &format!("{robot}[[clients]]\nname = \"other\""));
    let mut config = config_from(&text, db);
    let mut tls = pki.tls(Some(pki.path("client-ca.pem")));
    tls.client_crl = client_crl;
    config.http.tls = Some(tls);
    let (problems, _) = castellum::check::check_config(&config);
    assert!(problems.iter().all(|p| !p.to_string().contains("certificate_names")), "{problems:?}");
    config
}

/// castellum issues a client certificate for `robot.example.test` (Ed25519, client profile) to
/// the robot, by its bootstrap key; written as `{file}.pem` (with its chain) and `{file}.key`.
/// Returns its serial.
async fn issue_robot_certificate(server: &TestServer, pki: &Pki, file: &str) -> String {
    let (csr, key) = csr_and_key(Key::Ed25519, &["robot.example.test"]);
    let issued = server.issue(ROBOT_BOOTSTRAP_KEY, "client-ed25519", &csr).send().await.unwrap();
    assert_eq!(issued.status(), 201);
    let issued: serde_json::Value = issued.json().await.unwrap();
    let mut chain = issued["certificate"].as_str().unwrap().to_string();
    for c in issued["chain"].as_array().unwrap() {
        chain.push_str(c.as_str().unwrap());
    }
    pki.write(&format!("{file}.pem"), chain.as_bytes());
    pki.write(&format!("{file}.key"), &key.private_key_to_pem_pkcs8().unwrap());
    issued["serial"].as_str().unwrap().to_string()
}

fn csr_of(kind: Key, name: &str) -> String {
    csr(kind, &[name])
}
