//! The test harness: real SQLite files, a fresh PostgreSQL database per test, the engine and its
//! HTTP API on loopback, CSRs made with openssl, certificates checked with the openssl command
//! line and pkilint.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use castellum::config::Config;
use castellum::db::DbPool;
use castellum::Engine;
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
    let url = format!("{}/postgres", postgres_admin_url());
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
        TestDb { url: format!("{}/{name}", postgres_admin_url()), name, postgres: true, _dir: None }
    }

    pub fn admin(&self) -> PgConnection {
        postgres_admin()
    }

    /// A separate small pool on the same database, for the test's own reads.
    pub fn pool(&self) -> DbPool {
        let mut cfg = Config::default();
        cfg.database.url = self.url.clone();
        DbPool::build(
            &cfg.database,
            &cfg.database.pools.status,
            "test",
            std::sync::Arc::new(castellum::metrics::Metrics::new()),
        )
        .expect("test pool")
    }

    pub fn conn(&self) -> castellum::db::holds::Held {
        self.pool().get().expect("test connection")
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
    .unwrap_or(-1)
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
        let engine = Engine::start(config).await.expect("engine starts");
        let (server, addrs) = castellum::http::server(engine.clone(), "127.0.0.1:0").expect("bind loopback");
        let handle = server.handle();
        actix_rt::spawn(server);
        let (admin, admin_addrs) = castellum::admin::server(engine.clone(), "127.0.0.1:0").expect("bind admin");
        let admin_handle = admin.handle();
        actix_rt::spawn(admin);
        let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().expect("http client");
        TestServer {
            engine,
            base: format!("http://{}", addrs[0]),
            admin_base: format!("http://{}", admin_addrs[0]),
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
/// finding, as text (empty when clean).
pub fn pkilint_findings(dir: &Path, leaf_pem: &str, ca_id: &str) -> String {
    let leaf = dir.join("lint.pem");
    std::fs::write(&leaf, leaf_pem).unwrap();
    let issuer = dev_keys().join(format!("{ca_id}.crt"));
    let mut findings = String::new();
    for cmd in [
        Command::new("lint_pkix_cert").args(["lint", "-s", "ERROR"]).arg(&leaf).output(),
        Command::new("lint_pkix_signer_signee_cert_chain")
            .args(["lint", "-s", "ERROR"])
            .arg(&issuer)
            .arg(&leaf)
            .output(),
    ] {
        let out = cmd.expect("pkilint is installed (`.ci/run` installs it: pip install pkilint==0.13.3)");
        let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
        for line in text.lines().filter(|l| l.contains("(ERROR)") || l.contains("(FATAL)") || l.contains("Traceback")) {
            findings.push_str(line);
            findings.push('\n');
        }
    }
    findings
}

pub fn counts(db: &TestDb) -> (i64, i64) {
    let mut conn = db.conn();
    (
        castellum::db::queries::count_certificates(&mut conn).unwrap(),
        castellum::db::queries::count_requests(&mut conn).unwrap(),
    )
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
        let db = TestDb { url: format!("{base}/{name}"), name, postgres: true, _dir: None };
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

/// Connections open for `role`, as PostgreSQL counts them.
pub fn pg_role_connections(conn: &mut PgConnection, role: &str) -> i64 {
    #[derive(QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    diesel::sql_query(format!("SELECT count(*) AS n FROM pg_stat_activity WHERE usename = '{role}'"))
        .get_result::<Count>(conn)
        .map(|c| c.n)
        .unwrap_or(-1)
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

/// A connection of the test's own to the engine's database (not one of the engine's pools), for
/// raw SQL judgements.
pub enum RawConn {
    Sqlite(SqliteConnection),
    Pg(PgConnection),
}

impl RawConn {
    pub fn open(db: &TestDb) -> RawConn {
        if db.postgres {
            RawConn::Pg(PgConnection::establish(&db.url).expect("raw PostgreSQL connection"))
        } else {
            let path = db.url.strip_prefix("sqlite://").unwrap_or(&db.url);
            RawConn::Sqlite(SqliteConnection::establish(path).expect("raw SQLite connection"))
        }
    }

    pub fn execute(&mut self, sql: &str) {
        use diesel::connection::SimpleConnection;
        match self {
            RawConn::Sqlite(c) => c.batch_execute(sql),
            RawConn::Pg(c) => c.batch_execute(sql),
        }
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    pub fn load<T>(&mut self, sql: &str) -> Vec<T>
    where
        T: QueryableByName<diesel::sqlite::Sqlite> + QueryableByName<diesel::pg::Pg> + 'static,
    {
        match self {
            RawConn::Sqlite(c) => diesel::sql_query(sql).load(c),
            RawConn::Pg(c) => diesel::sql_query(sql).load(c),
        }
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }
}

/// A row of `certificates`, read with raw SQL.
#[derive(Debug, Clone, QueryableByName)]
pub struct RawCertificate {
    #[diesel(sql_type = diesel::sql_types::Text)]
    pub serial: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    pub ca_id: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    pub state: String,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
    pub request_id: Option<String>,
    #[diesel(sql_type = diesel::sql_types::Binary)]
    pub tbs_der: Vec<u8>,
}

impl RawCertificate {
    /// Whether the to-be-signed certificate carries `name` (a DNS name is stored as its ASCII
    /// bytes in the DER, so a unique name per request identifies the request's record).
    pub fn names(&self, name: &str) -> bool {
        self.tbs_der.windows(name.len()).any(|w| w == name.as_bytes())
    }
}

pub fn raw_certificates(db: &TestDb) -> Vec<RawCertificate> {
    RawConn::open(db).load("SELECT serial, ca_id, state, request_id, tbs_der FROM certificates ORDER BY serial")
}

/// A row of `requests`, read with raw SQL.
#[derive(Debug, Clone, QueryableByName)]
pub struct RawRequest {
    #[diesel(sql_type = diesel::sql_types::Text)]
    pub id: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    pub state: String,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
    pub serial: Option<String>,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
    pub error_type: Option<String>,
}

pub fn raw_requests(db: &TestDb) -> Vec<RawRequest> {
    RawConn::open(db).load("SELECT id, state, serial, error_type FROM requests ORDER BY id")
}

/// `identities.uses` of identity `id`, read with raw SQL.
pub fn raw_identity_uses(db: &TestDb, id: &str) -> i64 {
    #[derive(QueryableByName)]
    struct Uses {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        uses: i64,
    }
    let rows: Vec<Uses> = RawConn::open(db).load(&format!("SELECT uses FROM identities WHERE id = '{id}'"));
    rows.first().map(|r| r.uses).unwrap_or_else(|| panic!("no identity {id}"))
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
