//! The test harness: real SQLite files, a fresh PostgreSQL database per test, the engine and its
//! HTTP API on loopback, CSRs made with openssl, certificates checked with the openssl command
//! line and pkilint.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use castellum::config::Config;
use castellum::Engine;

pub use castellum::db::on_database;
use diesel::prelude::*;
use openssl::hash::MessageDigest;
use openssl::pkey::{PKey, Private};
use openssl::stack::Stack;
use openssl::x509::extension::SubjectAlternativeName;
use openssl::x509::{X509NameBuilder, X509ReqBuilder};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn dev_keys() -> PathBuf {
    repo().join("keys-dev")
}

/// A database for one test: a SQLite file in a temporary directory, or a fresh PostgreSQL
/// database that is dropped afterwards.
pub struct TestDb {
    pub url: String,
    pub name: String,
    pub postgres: bool,
    _dir: Option<tempfile::TempDir>,
}

pub fn postgres_admin_url() -> String {
    std::env::var("CASTELLUM_TEST_PG").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

fn postgres_admin() -> PgConnection {
    let url = on_database(&postgres_admin_url(), "postgres");
    PgConnection::establish(&url).unwrap_or_else(|e| {
        panic!("PostgreSQL is required for this test and is not reachable at {url}: {e}. `.ci/run` starts it.")
    })
}

impl TestDb {
    pub fn sqlite() -> TestDb {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("castellum.db");
        TestDb { url: format!("sqlite://{}", path.display()), name: "sqlite".into(), postgres: false, _dir: Some(dir) }
    }

    pub fn postgres() -> TestDb {
        let name = format!("castellum_test_{}", uuid::Uuid::new_v4().simple());
        diesel::sql_query(format!("CREATE DATABASE {name}"))
            .execute(&mut postgres_admin())
            .expect("create test database");
        TestDb { url: on_database(&postgres_admin_url(), &name), name, postgres: true, _dir: None }
    }

    pub fn admin(&self) -> PgConnection {
        postgres_admin()
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if self.postgres {
            let _ = diesel::sql_query(format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name))
                .execute(&mut postgres_admin());
        }
    }
}

/// Connections the engine has open to database `db_name`, as PostgreSQL itself counts them.
pub fn pg_connections(conn: &mut PgConnection, db_name: &str) -> i64 {
    #[derive(QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    diesel::sql_query(format!(
        "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = '{db_name}' AND application_name LIKE 'castellum:%'"
    ))
    .get_result::<Count>(conn)
    .map(|c| c.n)
    .unwrap_or_else(|e| panic!("the connection sampler cannot read pg_stat_activity: {e}"))
}

/// The shipped dev configuration's text with every file path made absolute, so a test can write
/// a variant of it anywhere.
pub fn dev_config_text() -> String {
    let text = std::fs::read_to_string(dev_keys().join("castellum.toml")).expect("dev config");
    let dir = dev_keys().display().to_string();
    text.replace("cert_file = \"", &format!("cert_file = \"{dir}/"))
        .replace("key_file = \"", &format!("key_file = \"{dir}/"))
        .replace("chain_files = [\"", &format!("chain_files = [\"{dir}/"))
        .replace("kek_file = \"", &format!("kek_file = \"{dir}/"))
}

/// The dev configuration on `db`, listening on an ephemeral loopback port.
pub fn dev_config(db: &TestDb) -> Config {
    config_from(&dev_config_text(), db)
}

pub fn config_from(text: &str, db: &TestDb) -> Config {
    let mut config = Config::from_toml(text, &dev_keys()).expect("config parses");
    config.database.url = db.url.clone();
    config.http.listen = "127.0.0.1:0".into();
    config.http.workers = 2;
    config.instance_id = Some(format!("test-{}", uuid::Uuid::new_v4().simple()));
    config
}

/// An engine and its HTTP API on loopback.
pub struct TestServer {
    pub engine: Engine,
    pub base: String,
    /// The admin API's own listener.
    pub admin_base: String,
    pub http: reqwest::Client,
    handle: actix_web::dev::ServerHandle,
    admin_handle: actix_web::dev::ServerHandle,
}

impl TestServer {
    pub async fn start(config: Config) -> TestServer {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().expect("http client");
        TestServer::start_with(config, http).await
    }

    /// Start it with the test's own HTTP client (one that trusts a TLS listener's CA).
    pub async fn start_with(config: Config, http: reqwest::Client) -> TestServer {
        let scheme = |tls: bool| if tls { "https" } else { "http" };
        let (api_scheme, admin_scheme) = (scheme(config.http.tls.is_some()), scheme(config.admin.tls.is_some()));
        let engine = Engine::start(config).await.expect("engine starts");
        let (server, addrs) = castellum::http::server(engine.clone(), "127.0.0.1:0").expect("bind loopback");
        let handle = server.handle();
        actix_rt::spawn(server);
        let (admin, admin_addrs) = castellum::admin::server(engine.clone(), "127.0.0.1:0").expect("bind admin");
        let admin_handle = admin.handle();
        actix_rt::spawn(admin);
        TestServer {
            engine,
            base: format!("{api_scheme}://{}", addrs[0]),
            admin_base: format!("{admin_scheme}://{}", admin_addrs[0]),
            http,
            handle,
            admin_handle,
        }
    }

    pub async fn stop(self) {
        self.admin_handle.stop(true).await;
        self.handle.stop(true).await;
        self.engine.shutdown().await;
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// POST /v1/certificates as the client holding `key`.
    pub fn issue(&self, key: &str, profile: &str, csr: &str) -> reqwest::RequestBuilder {
        self.http
            .post(self.url("/v1/certificates"))
            .bearer_auth(key)
            .json(&serde_json::json!({ "profile": profile, "csr": csr }))
    }
}

pub const DEMO_KEY: &str = "dev-key-demo";
pub const ADMIN_TOKEN: &str = "dev-admin-token";
pub const OTHER_KEY: &str = "dev-key-other";

#[derive(Clone, Copy, Debug)]
pub enum Key {
    P256,
    P384,
    Rsa(u32),
    Ed25519,
}

pub fn key(kind: Key) -> PKey<Private> {
    use openssl::ec::{EcGroup, EcKey};
    use openssl::nid::Nid;
    match kind {
        Key::P256 => {
            PKey::from_ec_key(EcKey::generate(&EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap()).unwrap())
                .unwrap()
        }
        Key::P384 => {
            PKey::from_ec_key(EcKey::generate(&EcGroup::from_curve_name(Nid::SECP384R1).unwrap()).unwrap()).unwrap()
        }
        Key::Rsa(bits) => PKey::from_rsa(openssl::rsa::Rsa::generate(bits).unwrap()).unwrap(),
        Key::Ed25519 => PKey::generate_ed25519().unwrap(),
    }
}

/// A PEM CSR for `names` (DNS names, or `email:` / `ip:` prefixed), CN = the first name.
pub fn csr_with(key: &PKey<Private>, names: &[&str], digest: MessageDigest) -> String {
    let mut b = X509ReqBuilder::new().unwrap();
    let mut subject = X509NameBuilder::new().unwrap();
    if let Some(first) = names.first().filter(|n| !n.contains(':')) {
        subject.append_entry_by_text("CN", first).unwrap();
    }
    b.set_subject_name(&subject.build()).unwrap();
    b.set_pubkey(key).unwrap();
    if !names.is_empty() {
        let mut san = SubjectAlternativeName::new();
        for n in names {
            if let Some(e) = n.strip_prefix("email:") {
                san.email(e);
            } else if let Some(ip) = n.strip_prefix("ip:") {
                san.ip(ip);
            } else {
                san.dns(n);
            }
        }
        let mut exts = Stack::new().unwrap();
        exts.push(san.build(&b.x509v3_context(None)).unwrap()).unwrap();
        b.add_extensions(&exts).unwrap();
    }
    let digest = if key.id() == openssl::pkey::Id::ED25519 { MessageDigest::null() } else { digest };
    b.sign(key, digest).unwrap();
    String::from_utf8(b.build().to_pem().unwrap()).unwrap()
}

pub fn csr(kind: Key, names: &[&str]) -> String {
    csr_with(&key(kind), names, MessageDigest::sha256())
}

/// Run a command, returning (success, stdout + stderr).
pub fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let mut text = String::from_utf8_lossy(&out.stdout).to_string();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// `openssl verify` of `leaf_pem` against the dev root with the issuing CA as intermediate.
pub fn openssl_verify(dir: &Path, leaf_pem: &str, ca_id: &str) -> (bool, String) {
    let leaf = dir.join("leaf.pem");
    std::fs::write(&leaf, leaf_pem).unwrap();
    run(Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(dev_keys().join("root.crt"))
        .arg("-untrusted")
        .arg(dev_keys().join(format!("{ca_id}.crt")))
        .arg(&leaf))
}

pub fn openssl_text(dir: &Path, leaf_pem: &str) -> String {
    let leaf = dir.join("text.pem");
    std::fs::write(&leaf, leaf_pem).unwrap();
    let (ok, text) = run(Command::new("openssl").args(["x509", "-noout", "-text", "-in"]).arg(&leaf));
    assert!(ok, "openssl x509 -text failed: {text}");
    text
}

/// pkilint's RFC 5280 certificate lint and issuer/subject chain lint: every ERROR or FATAL
/// finding, and every run whose exit code is not 0 (pkilint exits with its number of findings, or
/// 1 when it cannot load a certificate), as text (empty when clean).
pub fn pkilint_findings(dir: &Path, leaf_pem: &str, ca_id: &str) -> String {
    let leaf = dir.join("lint.pem");
    std::fs::write(&leaf, leaf_pem).unwrap();
    match pkilint_verdict(&leaf, &dev_keys().join(format!("{ca_id}.crt"))) {
        Ok(()) => String::new(),
        Err(findings) => findings,
    }
}

/// pkilint's CRL linter, BR profile: every finding at WARNING or above (empty when clean).
pub fn lint_crl(crl_pem: &Path) -> String {
    let (ok, out) = run(Command::new("lint_crl").args(["lint", "-t", "CRL", "-p", "BR", "-s", "WARNING"]).arg(crl_pem));
    if ok && out.trim().is_empty() {
        String::new()
    } else {
        format!("lint_crl (ok: {ok}): {out}")
    }
}

/// pkilint's CA/B Forum TLS server certificate linter: the finding codes at WARNING or above.
pub fn br_findings(dir: &Path, cert_pem: &str) -> Vec<String> {
    let leaf = dir.join("br.pem");
    std::fs::write(&leaf, cert_pem).unwrap();
    let (_, out) =
        run(Command::new("lint_cabf_serverauth_cert").args(["lint", "-d", "-s", "WARNING", "-f", "JSON"]).arg(&leaf));
    let report: serde_json::Value =
        serde_json::from_str(out.trim()).unwrap_or_else(|_| panic!("no JSON from pkilint: {out}"));
    let mut codes: Vec<String> = report["results"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|r| r["finding_descriptions"].as_array().cloned().unwrap_or_default())
        .map(|f| f["code"].as_str().unwrap_or("?").to_string())
        .collect();
    codes.sort();
    codes.dedup();
    codes
}

/// (certificate rows, request rows), counted with raw SQL on a connection of the test's own.
pub fn counts(db: &TestDb) -> (i64, i64) {
    (sql::count(db, "SELECT count(*) AS n FROM certificates"), sql::count(db, "SELECT count(*) AS n FROM requests"))
}

/// A PostgreSQL database owned by a fresh role whose `CONNECTION LIMIT` is `limit`: the server
/// itself refuses connection number `limit + 1`. Both are dropped afterwards.
pub struct LimitedDb {
    pub db: TestDb,
    pub role: String,
}

impl LimitedDb {
    pub fn new(limit: u32) -> LimitedDb {
        let role = format!("castellum_role_{}", uuid::Uuid::new_v4().simple());
        let name = format!("castellum_test_{}", uuid::Uuid::new_v4().simple());
        let mut admin = postgres_admin();
        diesel::sql_query(format!("CREATE ROLE {role} LOGIN CONNECTION LIMIT {limit}")).execute(&mut admin).unwrap();
        diesel::sql_query(format!("CREATE DATABASE {name} OWNER {role}")).execute(&mut admin).unwrap();
        let base = postgres_admin_url().replacen("postgres://postgres@", &format!("postgres://{role}@"), 1);
        let db = TestDb { url: on_database(&base, &name), name, postgres: true, _dir: None };
        LimitedDb { db, role }
    }
}

impl Drop for LimitedDb {
    fn drop(&mut self) {
        let mut admin = postgres_admin();
        let _ = diesel::sql_query(format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.db.name)).execute(&mut admin);
        self.db.postgres = false;
        let _ = diesel::sql_query(format!("DROP ROLE IF EXISTS {}", self.role)).execute(&mut admin);
    }
}

/// Client connections open for `role`, as PostgreSQL counts them (`pg_stat_activity` by role and
/// backend type: every server process a client of that role holds, whatever it calls itself).
/// A sampler that cannot see fails its test: a failed query panics.
pub fn pg_role_connections(conn: &mut PgConnection, role: &str) -> i64 {
    #[derive(QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    diesel::sql_query(format!(
        "SELECT count(*) AS n FROM pg_stat_activity WHERE usename = '{role}' AND backend_type = 'client backend'"
    ))
    .get_result::<Count>(conn)
    .map(|c| c.n)
    .unwrap_or_else(|e| panic!("the connection sampler cannot read pg_stat_activity: {e}"))
}

/// A TCP proxy to PostgreSQL that a test can cut (every connection dropped, new ones refused)
/// and restore: a database outage without stopping the server other tests share.
pub struct DbProxy {
    pub port: u16,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    generation: std::sync::Arc<std::sync::atomic::AtomicU64>,
    _thread: std::thread::JoinHandle<()>,
}

impl DbProxy {
    pub fn start(target: &str) -> DbProxy {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use std::sync::Arc;
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let generation = Arc::new(AtomicU64::new(0));
        let (cut2, gen2, target) = (cut.clone(), generation.clone(), target.to_string());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
            rt.block_on(async move {
                loop {
                    if cut2.load(Ordering::SeqCst) {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
                    let my_gen = gen2.load(Ordering::SeqCst);
                    loop {
                        let accept = tokio::time::timeout(Duration::from_millis(20), listener.accept()).await;
                        if cut2.load(Ordering::SeqCst) {
                            break; // the listener is dropped: new connections are refused
                        }
                        let Ok(Ok((mut inbound, _))) = accept else { continue };
                        let (target, gen3) = (target.clone(), gen2.clone());
                        tokio::spawn(async move {
                            let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await else { return };
                            let copy = tokio::io::copy_bidirectional(&mut inbound, &mut outbound);
                            tokio::pin!(copy);
                            loop {
                                tokio::select! {
                                    _ = &mut copy => return,
                                    _ = tokio::time::sleep(Duration::from_millis(20)) => {
                                        if gen3.load(Ordering::SeqCst) != my_gen {
                                            return; // cut: both sockets are closed
                                        }
                                    }
                                }
                            }
                        });
                    }
                }
            });
        });
        DbProxy { port, cut, generation, _thread: thread }
    }

    pub fn cut(&self) {
        self.generation.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn restore(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// The URL of `db` through this proxy.
    pub fn url_for(&self, db: &TestDb) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{}", self.port, db.name)
    }
}

/// Poll a stored request until it is no longer waiting (pending or parked), or fail after `limit`.
pub async fn wait_for_request(http: &reqwest::Client, base: &str, id: &str, limit: Duration) -> serde_json::Value {
    let started = std::time::Instant::now();
    loop {
        let resp = http.get(format!("{base}/v1/requests/{id}")).bearer_auth(DEMO_KEY).send().await;
        if let Ok(resp) = resp {
            if resp.status() == 200 {
                let body: serde_json::Value = resp.json().await.unwrap();
                if body["state"] != "pending" && body["state"] != "parked" {
                    return body;
                }
            }
        }
        assert!(started.elapsed() < limit, "request {id} still waiting after {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `castellum serve` as a child process on a free loopback port (no admin listener), for tests
/// that need the real binary: its logs, or a SIGKILL. Killed when dropped, so a failing test
/// never leaves an engine running.
pub struct EngineProcess {
    child: std::process::Child,
    pub base: String,
}

impl EngineProcess {
    /// Start it with `config`, the extra `CASTELLUM_*` (or other) variables in `env`, and wait
    /// (at most 20 s) until `/readyz` answers 200.
    pub async fn start(
        config: &Path,
        env: &[(&str, &str)],
        stdout: std::process::Stdio,
        stderr: std::process::Stdio,
    ) -> EngineProcess {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new(env!("CARGO_BIN_EXE_castellum"))
            .args(["serve", "--config"])
            .arg(config)
            .env("CASTELLUM_HTTP__LISTEN", format!("127.0.0.1:{port}"))
            .env("CASTELLUM_ADMIN__LISTEN", "")
            .envs(env.iter().copied())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .expect("the castellum binary starts");
        let engine = EngineProcess { child, base: format!("http://127.0.0.1:{port}") };
        let http = reqwest::Client::new();
        let started = std::time::Instant::now();
        while http.get(format!("{}/readyz", engine.base)).send().await.map(|r| r.status() != 200).unwrap_or(true) {
            assert!(started.elapsed() < Duration::from_secs(20), "the engine did not become ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        engine
    }

    /// SIGTERM, as a service manager stops it.
    pub fn terminate(&self) {
        let status = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap();
        assert!(status.success(), "kill -TERM");
    }

    /// Its exit status, once it has exited (at most `limit` from now). Asynchronous, so that the
    /// test's own requests in flight go on meanwhile.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let started = std::time::Instant::now();
        while started.elapsed() < limit {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    /// SIGKILL: no drain, no claim released, no checkpoint.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for EngineProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `GET /v1/certificates/{serial}` as the demo client.
pub async fn certificate(server: &TestServer, serial: &str) -> serde_json::Value {
    let url = server.url(&format!("/v1/certificates/{serial}"));
    server.http.get(url).bearer_auth(DEMO_KEY).send().await.unwrap().json().await.unwrap()
}

/// A sample's value in the engine's `/metrics`: the first line of `family` whose labels contain
/// `labels` (`""` for any).
pub async fn metric(server: &TestServer, family: &str, labels: &str) -> f64 {
    let text = server.http.get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    text.lines()
        .filter(|l| l.split([' ', '{']).next() == Some(family) && l.contains(labels))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("{family} ({labels}) missing from /metrics:\n{text}"))
}

/// `GET /admin/v1/status` with the dev admin token.
pub async fn admin_status(server: &TestServer) -> serde_json::Value {
    server
        .http
        .get(format!("{}/admin/v1/status", server.admin_base))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Wait (at most 1 s) until the Store's worker has taken a batch and is committing it: with a
/// test holding the database's write lock, what was written before stays in that batch.
pub async fn until_the_store_commits_a_batch(server: &TestServer) {
    let started = std::time::Instant::now();
    loop {
        let status = server.engine.admin_status().await.expect("admin status");
        if status.store.is_some_and(|s| s.batches_in_flight == 1) {
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(1), "the Store's worker never took the write");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

pub mod sql;

impl TestDb {
    /// An existing SQLite file someone else created (an example's own database): not removed.
    pub fn sqlite_file(path: &Path) -> TestDb {
        TestDb { url: format!("sqlite://{}", path.display()), name: "sqlite".into(), postgres: false, _dir: None }
    }
}
/// A CSR for `names` (as [`csr_with`] takes them), and the key it was made with.
pub fn csr_and_key(kind: Key, names: &[&str]) -> (String, PKey<Private>) {
    let key = key(kind);
    (csr_with(&key, names, MessageDigest::sha256()), key)
}

/// pkilint's verdict on the certificate file `leaf` issued by the certificate file `issuer`: its
/// RFC 5280 certificate lint and its issuer/subject chain lint, each judged by its exit code
/// (pkilint exits with the number of findings at or above the threshold, and 1 when it cannot
/// load a certificate) and by its JSON findings. Err holds every reason, with pkilint's output.
pub fn pkilint_verdict(leaf: &Path, issuer: &Path) -> Result<(), String> {
    let spawn = |cmd: &mut Command| {
        cmd.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("pkilint is installed (`.ci/prepare` installs it: pip install pkilint==0.13.3)")
    };
    // Both at once: each is mostly Python starting up.
    let runs = [
        ("lint_pkix_cert", spawn(Command::new("lint_pkix_cert").args(["lint", "-s", "ERROR", "-f", "JSON"]).arg(leaf))),
        (
            "lint_pkix_signer_signee_cert_chain",
            spawn(
                Command::new("lint_pkix_signer_signee_cert_chain")
                    .args(["lint", "-s", "ERROR", "-f", "JSON"])
                    .arg(issuer)
                    .arg(leaf),
            ),
        ),
    ];
    let mut wrong = Vec::new();
    for (name, child) in runs {
        let out = child.wait_with_output().expect("pkilint runs");
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        let code = out.status.code();
        let findings: Vec<String> = match serde_json::from_str::<serde_json::Value>(stdout.trim()) {
            Ok(json) => json["results"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|r| {
                    let at = format!("{} @ {}", r["validator"].as_str().unwrap_or("?"), r["node_path"]);
                    r["finding_descriptions"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(move |f| format!("{at}: {} ({}) {}", f["code"], f["severity"], f["message"]))
                })
                .collect(),
            Err(_) => vec![format!("no JSON report: {stdout}")],
        };
        if code != Some(0) || !findings.is_empty() || stderr.contains("Traceback") {
            wrong.push(format!(
                "{name} exited {code:?} with {} finding(s):\n  {}\n  stderr: {}",
                findings.len(),
                findings.join("\n  "),
                stderr.trim()
            ));
        }
    }
    if wrong.is_empty() {
        Ok(())
    } else {
        Err(wrong.join("\n"))
    }
}

/// What a certificate issued for a CSR must be, as the profile and the CSR say.
#[derive(Clone, Debug)]
pub struct IssuedExpectation {
    /// The issuing CA (its certificate is `keys-dev/<ca>.crt`).
    pub ca: String,
    /// The CSR as sent (PEM): the certificate must carry its public key.
    pub csr: String,
    /// The requested names, as [`csr_with`] takes them: DNS names, `email:` and `ip:` prefixed.
    pub names: Vec<String>,
    /// The subject, as `openssl x509 -subject -nameopt RFC2253` prints it ("" for none).
    pub subject: String,
    pub validity: Duration,
    pub backdate: Duration,
    /// Key usages and extended key usages, as openssl names them.
    pub key_usage: Vec<String>,
    pub extended_key_usage: Vec<String>,
    /// `openssl verify -purpose` for this profile, where openssl has one.
    pub purpose: Option<String>,
    /// The request was sent and answered between these instants.
    pub issued_between: (std::time::SystemTime, std::time::SystemTime),
}

pub fn strings(values: &[&str]) -> Vec<String> {
    values.iter().map(|v| v.to_string()).collect()
}

/// [`judge_issued`] on a blocking thread, so the engine's actors and the HTTP client's
/// connections (on the test's thread) are not stalled while openssl and pkilint run.
pub async fn judge_issued_async(
    dir: &Path,
    expect: &IssuedExpectation,
    response: &serde_json::Value,
) -> Result<(), String> {
    let (dir, expect, response) = (dir.to_path_buf(), expect.clone(), response.clone());
    tokio::task::spawn_blocking(move || judge_issued(&dir, &expect, &response)).await.expect("the judge runs")
}

/// `openssl x509 -noout ARGS -in file`, or why not.
fn openssl_x509(file: &Path, args: &[&str]) -> Result<String, String> {
    let out = Command::new("openssl")
        .args(["x509", "-noout"])
        .args(args)
        .arg("-in")
        .arg(file)
        .output()
        .expect("the openssl command line is installed");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!("openssl x509 {args:?} failed: {stdout}{}", String::from_utf8_lossy(&out.stderr)))
    }
}

fn sha256_fingerprint(file: &Path) -> Result<String, String> {
    Ok(openssl_x509(file, &["-fingerprint", "-sha256"])?.trim().to_string())
}

/// `openssl x509 -ext` output: extension title → (critical, values).
fn openssl_extensions(text: &str) -> std::collections::BTreeMap<String, (bool, Vec<String>)> {
    let mut out = std::collections::BTreeMap::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        if line.starts_with([' ', '\t']) {
            if let Some(entry) = current.as_ref().and_then(|t| out.get_mut(t)) {
                let (_, values): &mut (bool, Vec<String>) = entry;
                values.extend(line.trim().split(", ").filter(|v| !v.is_empty()).map(str::to_string));
            }
        } else if let Some((title, rest)) = line.split_once(':') {
            out.insert(title.trim().to_string(), (rest.trim() == "critical", Vec::new()));
            current = Some(title.trim().to_string());
        }
    }
    out
}

/// A requested name as `openssl x509 -ext subjectAltName` prints it.
fn openssl_san(name: &str) -> String {
    if let Some(email) = name.strip_prefix("email:") {
        format!("email:{email}")
    } else if let Some(ip) = name.strip_prefix("ip:") {
        match ip.parse::<std::net::IpAddr>().expect("a test IP address") {
            std::net::IpAddr::V4(v4) => format!("IP Address:{v4}"),
            std::net::IpAddr::V6(v6) => {
                let groups: Vec<String> = v6.segments().iter().map(|s| format!("{s:X}")).collect();
                format!("IP Address:{}", groups.join(":"))
            }
        }
    } else {
        format!("DNS:{name}")
    }
}

fn sorted(values: &[String]) -> Vec<String> {
    let mut v = values.to_vec();
    v.sort();
    v
}

/// The certificate in an issuance answer (`response`: the JSON body, with `certificate`, `chain`
/// and `ca`), judged by the openssl command line and pkilint against `expect`:
/// - `openssl verify -x509_strict` to the repository's root through the chain the engine
///   returned (not the repository's CA files), whose first element is the issuing CA's
///   certificate and last the root (compared by SHA-256 fingerprint);
/// - the certificate's public key is the CSR's (`openssl x509 -pubkey` = `openssl req -pubkey`);
/// - exactly the requested names (as a set, and no name twice);
/// - the subject the policy says; the profile's validity, from notBefore = the signing time less
///   the backdate; key usage, extended key usage and basic constraints as the profile says;
/// - pkilint's exit code and findings.
///
/// Err holds every check that failed, one a line.
pub fn judge_issued(dir: &Path, expect: &IssuedExpectation, response: &serde_json::Value) -> Result<(), String> {
    let mut wrong: Vec<String> = Vec::new();
    let mut check = |ok: bool, why: String| {
        if !ok {
            wrong.push(why);
        }
    };
    let cert = response["certificate"].as_str().unwrap_or_default();
    let chain: Vec<&str> =
        response["chain"].as_array().map(|a| a.iter().filter_map(|c| c.as_str()).collect()).unwrap_or_default();
    check(response["ca"] == expect.ca, format!("ca: the answer names {}, expected {}", response["ca"], expect.ca));
    let leaf = dir.join("judged.pem");
    let chain_file = dir.join("judged-chain.pem");
    let csr_file = dir.join("judged.csr");
    std::fs::write(&leaf, cert).unwrap();
    std::fs::write(&chain_file, chain.concat()).unwrap();
    std::fs::write(&csr_file, &expect.csr).unwrap();

    // The chain the engine returned: issuing CA first, the root last.
    let ca_file = dev_keys().join(format!("{}.crt", expect.ca));
    let root_file = dev_keys().join("root.crt");
    let element = |i: usize| {
        let file = dir.join(format!("judged-chain-{i}.pem"));
        std::fs::write(&file, chain[i]).unwrap();
        sha256_fingerprint(&file)
    };
    if chain.is_empty() {
        check(false, "chain: the answer carries no chain".into());
    } else {
        let first = element(0);
        check(first == sha256_fingerprint(&ca_file), format!("chain: its first element is not {ca_file:?}: {first:?}"));
        let last = element(chain.len() - 1);
        check(last == sha256_fingerprint(&root_file), format!("chain: its last element is not the root: {last:?}"));
    }
    let mut verify = Command::new("openssl");
    verify.args(["verify", "-x509_strict"]);
    if let Some(purpose) = &expect.purpose {
        verify.args(["-purpose", purpose]);
    }
    verify.arg("-CAfile").arg(&root_file).arg("-untrusted").arg(&chain_file).arg(&leaf);
    let (ok, out) = run(&mut verify);
    check(
        ok && out.trim() == format!("{}: OK", leaf.display()),
        format!("chain: openssl verify through the returned chain failed: {out}"),
    );

    // The CSR's key.
    let (req_ok, req_key) = run(Command::new("openssl").args(["req", "-pubkey", "-noout", "-in"]).arg(&csr_file));
    check(req_ok, format!("public key: openssl req cannot read the CSR: {req_key}"));
    match openssl_x509(&leaf, &["-pubkey"]) {
        Ok(cert_key) => check(
            req_ok && cert_key == req_key,
            format!("public key: the certificate's\n{cert_key}is not the CSR's\n{req_key}"),
        ),
        Err(e) => check(false, format!("public key: {e}")),
    }

    // Names, subject, extensions.
    let expected_names = {
        let mut v: Vec<String> = expect.names.iter().map(|n| openssl_san(n)).collect();
        v.sort();
        v.dedup();
        v
    };
    match openssl_x509(&leaf, &["-ext", "subjectAltName,keyUsage,extendedKeyUsage,basicConstraints"]) {
        Ok(text) => {
            let exts = openssl_extensions(&text);
            let get = |title: &str| {
                exts.get(title).cloned().map(|(c, mut v)| {
                    v.sort();
                    (c, v)
                })
            };
            let san = get("X509v3 Subject Alternative Name");
            check(
                san == Some((expect.subject.is_empty(), expected_names.clone())),
                format!(
                    "names: the certificate's subjectAltName (critical, names) is {san:?}, requested {:?} (critical {})",
                    expected_names,
                    expect.subject.is_empty()
                ),
            );
            let ku = get("X509v3 Key Usage");
            check(
                ku == Some((true, sorted(&expect.key_usage))),
                format!("key usage: {ku:?}, expected critical {:?}", expect.key_usage),
            );
            let eku = get("X509v3 Extended Key Usage");
            let want_eku = (!expect.extended_key_usage.is_empty()).then(|| (false, sorted(&expect.extended_key_usage)));
            check(eku == want_eku, format!("extended key usage: {eku:?}, expected {want_eku:?}"));
            let bc = get("X509v3 Basic Constraints");
            check(bc == Some((true, vec!["CA:FALSE".to_string()])), format!("basic constraints: {bc:?}"));
        }
        Err(e) => check(false, format!("names and extensions: {e}")),
    }
    match openssl_x509(&leaf, &["-subject", "-nameopt", "RFC2253"]) {
        Ok(text) => {
            let subject = text.trim().strip_prefix("subject=").unwrap_or(text.trim()).trim().to_string();
            check(subject == expect.subject, format!("subject: {subject:?}, expected {:?}", expect.subject));
        }
        Err(e) => check(false, format!("subject: {e}")),
    }

    // Validity: notAfter - notBefore is the profile's validity. Both are whole seconds and the
    // engine derives notAfter from notBefore, so the difference is exact; notBefore is the
    // signing time (between sending the request and its answer) less the backdate, truncated
    // to the second.
    match openssl_x509(&leaf, &["-dates", "-dateopt", "iso_8601"]) {
        Ok(text) => {
            let date = |field: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(field))
                    .and_then(|v| humantime::parse_rfc3339(&v.trim().replace(' ', "T")).ok())
            };
            match (date("notBefore="), date("notAfter=")) {
                (Some(not_before), Some(not_after)) => {
                    let validity = not_after.duration_since(not_before).unwrap_or_default();
                    check(
                        validity == expect.validity,
                        format!(
                            "validity: {validity:?} from notBefore to notAfter, the profile says {:?}",
                            expect.validity
                        ),
                    );
                    let (sent, answered) = expect.issued_between;
                    let earliest = sent - expect.backdate - Duration::from_secs(1);
                    let latest = answered - expect.backdate;
                    check(
                        earliest <= not_before && not_before <= latest,
                        format!(
                            "validity: notBefore {} is not the signing time less the backdate {:?} (between {} and {})",
                            humantime::format_rfc3339(not_before),
                            expect.backdate,
                            humantime::format_rfc3339(earliest),
                            humantime::format_rfc3339(latest)
                        ),
                    );
                    let now = std::time::SystemTime::now();
                    check(not_before <= now && now <= not_after, "validity: not valid now".into());
                }
                _ => check(false, format!("validity: cannot read the dates in {text:?}")),
            }
        }
        Err(e) => check(false, format!("validity: {e}")),
    }

    if let Err(findings) = pkilint_verdict(&leaf, &ca_file) {
        wrong.push(format!("pkilint: {findings}"));
    }
    if wrong.is_empty() {
        Ok(())
    } else {
        Err(wrong.join("\n"))
    }
}

// ---- Overload, crash and database-timeout tests: the client's view and raw SQL. ----

/// What a client saw: status, problem type, `Retry-After`, and how long the answer took.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    /// The problem's `type` (`urn:castellum:problem:…`) when the body is problem+json.
    pub problem: Option<String>,
    pub retry_after: Option<u64>,
    pub took: Duration,
    pub body: serde_json::Value,
}

impl Answer {
    /// A `503` with problem type `slug` and a `Retry-After` of at least one second.
    pub fn is_503(&self, slug: &str) -> bool {
        self.status == 503
            && self.problem.as_deref() == Some(&format!("urn:castellum:problem:{slug}"))
            && self.retry_after.is_some_and(|s| s >= 1)
    }

    pub fn slug(&self) -> &str {
        self.problem.as_deref().and_then(|p| p.strip_prefix("urn:castellum:problem:")).unwrap_or("")
    }
}

/// Send `request` and record what came back, timed from the client's side.
pub async fn answer_of(request: reqwest::RequestBuilder) -> Answer {
    let started = std::time::Instant::now();
    let resp = request.send().await.expect("the engine answers");
    let status = resp.status().as_u16();
    let is_problem = resp
        .headers()
        .get("content-type")
        .is_some_and(|v| v.to_str().unwrap_or("").starts_with("application/problem+json"));
    let retry_after = resp.headers().get("retry-after").and_then(|v| v.to_str().ok()?.parse().ok());
    let body: serde_json::Value = resp.json().await.unwrap_or(serde_json::Value::Null);
    let took = started.elapsed();
    let problem = is_problem.then(|| body["type"].as_str().unwrap_or("").to_string());
    Answer { status, problem, retry_after, took, body }
}

/// A CA of `config`, to edit (the dev configuration has ica-p256, ica-p384, ica-rsa3072, ica-ed25519).
pub fn ca_of<'a>(config: &'a mut Config, id: &str) -> &'a mut castellum::config::CaConfig {
    config.cas.iter_mut().find(|c| c.id == id).unwrap_or_else(|| panic!("no CA {id} in the configuration"))
}

/// The cell of CA `ca` in an admin status.
pub fn cell_in(status: &serde_json::Value, ca: &str) -> Option<serde_json::Value> {
    status["cells"].as_array()?.iter().find(|c| c["ca"] == ca).cloned()
}

/// A TCP proxy to PostgreSQL that a test can freeze: every connection stays open, and bytes are
/// still accepted (the proxy's kernel acknowledges them), but nothing is forwarded either way
/// until `thaw()` — a peer that is alive on the wire and never answers (a hung pooler or a
/// stopped server). New connections are accepted and frozen too.
pub struct FreezableProxy {
    pub port: u16,
    frozen: std::sync::Arc<std::sync::atomic::AtomicBool>,
    _thread: std::thread::JoinHandle<()>,
}

impl FreezableProxy {
    pub fn start(target: &str) -> FreezableProxy {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let frozen = Arc::new(AtomicBool::new(false));
        let (frozen2, target) = (frozen.clone(), target.to_string());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                loop {
                    let Ok((inbound, _)) = listener.accept().await else { continue };
                    let (target, frozen) = (target.clone(), frozen2.clone());
                    tokio::spawn(async move {
                        let Ok(outbound) = tokio::net::TcpStream::connect(&target).await else { return };
                        let (mut in_read, mut in_write) = inbound.into_split();
                        let (mut out_read, mut out_write) = outbound.into_split();
                        // One direction: read, hold while frozen, then forward.
                        async fn pump(
                            from: &mut tokio::net::tcp::OwnedReadHalf,
                            to: &mut tokio::net::tcp::OwnedWriteHalf,
                            frozen: &AtomicBool,
                        ) {
                            let mut buf = vec![0u8; 16 * 1024];
                            loop {
                                while frozen.load(Ordering::SeqCst) {
                                    tokio::time::sleep(Duration::from_millis(10)).await;
                                }
                                let n = match from.read(&mut buf).await {
                                    Ok(0) | Err(_) => return,
                                    Ok(n) => n,
                                };
                                while frozen.load(Ordering::SeqCst) {
                                    tokio::time::sleep(Duration::from_millis(10)).await;
                                }
                                if to.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                        }
                        let up = pump(&mut in_read, &mut out_write, &frozen);
                        let down = pump(&mut out_read, &mut in_write, &frozen);
                        tokio::select! { _ = up => {}, _ = down => {} }
                    });
                }
            });
        });
        FreezableProxy { port, frozen, _thread: thread }
    }

    /// Frozen until the guard is dropped (also when a test fails: an engine thread stuck on a
    /// frozen connection would otherwise keep the test process from exiting).
    pub fn freeze(&self) -> Frozen<'_> {
        self.frozen.store(true, std::sync::atomic::Ordering::SeqCst);
        Frozen(self)
    }

    /// The URL of `db` through this proxy.
    pub fn url_for(&self, db: &TestDb) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{}", self.port, db.name)
    }
}

/// A frozen [`FreezableProxy`]; dropping it thaws the proxy.
pub struct Frozen<'a>(&'a FreezableProxy);

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        self.0.frozen.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The browser tests' folder, once Debian's Chromium and playwright-core (`.ci/prepare`) are there.
pub fn browser_dir() -> PathBuf {
    let dir = repo().join("tests/browser");
    assert!(
        dir.join("node_modules/playwright-core").exists() && Path::new("/usr/bin/chromium").exists(),
        "the browser test needs Debian's chromium and tests/browser/node_modules: run .ci/prepare"
    );
    dir
}

/// Run one of the browser scripts with `args` (off the event loop) and read the JSON it prints:
/// what the page showed.
pub async fn run_browser_script(script: &str, args: Vec<std::ffi::OsString>) -> serde_json::Value {
    let script = browser_dir().join(script);
    let output = actix_web::rt::task::spawn_blocking(move || {
        Command::new("node").arg(&script).args(&args).output().expect("node runs")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

/// Submit an asynchronous request for a fresh P-256 key and `name`; its request id (202 expected).
pub async fn submit_async(server: &TestServer, profile: &str, name: &str) -> String {
    let resp = server
        .issue(DEMO_KEY, profile, &csr(Key::P256, &[name]))
        .header("prefer", "respond-async")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    resp.json::<serde_json::Value>().await.unwrap()["request_id"].as_str().unwrap().to_string()
}

/// Log lines written into memory, for a test's own `tracing` subscriber (nextest runs each test
/// alone in its process, so a global one is the test's).
#[derive(Clone, Default)]
pub struct CapturedLog(pub std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl CapturedLog {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for CapturedLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
