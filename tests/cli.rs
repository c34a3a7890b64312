//! The binary's operator commands — `hash-key`, `dev-pki`, `migrate` — judged by tools outside the
//! engine (sha256sum, the openssl command line, raw SQL), and `examples/embed.rs` run for real.

mod common;

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn castellum() -> Command {
    Command::new(env!("CARGO_BIN_EXE_castellum"))
}

/// Run a command to completion: (exit code, stdout, stderr).
fn output(cmd: &mut Command) -> (i32, String, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `openssl ARGS`, which must succeed; its stdout.
fn openssl(args: &[&str]) -> String {
    let (code, out, err) = output(Command::new("openssl").args(args));
    assert_eq!(code, 0, "openssl {args:?} failed: {out}{err}");
    out
}

fn sha256sum_of(text: &str) -> String {
    // sha256sum reads exactly the bytes printf wrote: no newline, no shell interpretation.
    let (code, out, err) = output(Command::new("sh").args(["-c", "printf %s \"$1\" | sha256sum", "sh", text]));
    assert_eq!(code, 0, "{err}");
    out.split_whitespace().next().expect("sha256sum prints a digest").to_string()
}

#[test]
fn hash_key_prints_what_sha256sum_computes_and_what_the_dev_config_holds() {
    for key in ["dev-key-demo", "a key with  spaces, \"quotes\", $HOME and ünïcode", "k"] {
        let (code, out, err) = output(castellum().args(["hash-key", key]));
        assert_eq!(code, 0, "{err}");
        let printed = out.trim_end_matches('\n');
        assert_eq!(printed.len(), 64, "one line of 64 hex digits: {out:?}");
        assert!(printed.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)), "{out:?}");
        assert_eq!(printed, sha256sum_of(key), "castellum hash-key {key:?}");
    }
    // The sample client's hash in the shipped configuration is what hash-key prints for its key.
    let (_, demo, _) = output(castellum().args(["hash-key", DEMO_KEY]));
    let config = std::fs::read_to_string(dev_keys().join("castellum.toml")).unwrap();
    assert!(config.contains(&format!("api_key_sha256 = \"{}\"", demo.trim())), "{demo}");
    // Without a key it is a usage error, not a hash of nothing.
    let (code, out, _) = output(castellum().arg("hash-key"));
    assert_ne!(code, 0);
    assert!(!out.contains(&sha256sum_of("")), "{out}");
}

/// `castellum dev-pki`: a fresh P-384 root and four issuing CAs that openssl verifies, keys
/// encrypted under the dev passphrase and readable by their owner only, and an engine that
/// starts on them and issues certificates chaining to the new root (and not to the shipped one).
#[actix_rt::test]
async fn dev_pki_writes_a_pki_openssl_verifies_and_an_engine_serves() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pki");
    let (code, stdout, stderr) = output(castellum().args(["dev-pki", "--out"]).arg(&out));
    assert_eq!(code, 0, "{stdout}{stderr}");
    let file = |name: &str| out.join(name).display().to_string();
    let root = file("root.crt");

    // The root: self-signed, P-384, a CA.
    assert!(openssl(&["verify", "-CAfile", &root, &root]).contains(": OK"));
    let root_text = openssl(&["x509", "-noout", "-text", "-in", &root]);
    assert!(root_text.contains("secp384r1") && root_text.contains("CA:TRUE"), "{root_text}");
    // Really new: not the root shipped in keys-dev/.
    assert_ne!(std::fs::read(&root).unwrap(), std::fs::read(dev_keys().join("root.crt")).unwrap());

    for (id, key_marker) in [
        ("ica-p256", "prime256v1"),
        ("ica-p384", "secp384r1"),
        ("ica-rsa3072", "Public-Key: (3072 bit)"),
        ("ica-ed25519", "ED25519"),
    ] {
        let cert = file(&format!("{id}.crt"));
        let verified = openssl(&["verify", "-CAfile", &root, &cert]);
        assert!(verified.contains(": OK"), "{id}: {verified}");
        // The control: the same certificate does not chain to the shipped dev root.
        let (code, text, err) =
            output(Command::new("openssl").args(["verify", "-CAfile"]).arg(dev_keys().join("root.crt")).arg(&cert));
        assert_ne!(code, 0, "{id} must not verify against another root: {text}{err}");
        let text = openssl(&["x509", "-noout", "-text", "-in", &cert]);
        assert!(text.contains(key_marker), "{id} key type: {text}");
        assert!(text.contains("CA:TRUE, pathlen:0"), "{id} basic constraints: {text}");
        // The chain file is the CA's certificate then the root.
        let chain = std::fs::read_to_string(file(&format!("{id}.chain.pem"))).unwrap();
        let expected = std::fs::read_to_string(&cert).unwrap() + &std::fs::read_to_string(&root).unwrap();
        assert_eq!(chain, expected, "{id}.chain.pem");
    }

    for (key, cert) in [
        ("root.key", "root.crt"),
        ("ica-p256.key", "ica-p256.crt"),
        ("ica-p384.key", "ica-p384.crt"),
        ("ica-rsa3072.key", "ica-rsa3072.crt"),
        ("ica-ed25519.key", "ica-ed25519.crt"),
    ] {
        let (key, cert) = (file(key), file(cert));
        let pem = std::fs::read_to_string(&key).unwrap();
        assert!(pem.starts_with("-----BEGIN ENCRYPTED PRIVATE KEY-----"), "{key} is encrypted: {pem:.40}");
        let (_, mode, _) = output(Command::new("stat").args(["-c", "%a"]).arg(&key));
        assert_eq!(mode.trim(), "600", "{key} is readable by its owner only");
        // The dev passphrase opens it, and it is the certificate's key; a wrong one does not.
        let public = openssl(&["pkey", "-in", &key, "-passin", "pass:castellum-dev-only", "-pubout"]);
        assert_eq!(public, openssl(&["x509", "-in", &cert, "-pubkey", "-noout"]), "{key} matches {cert}");
        let (code, _, _) =
            output(Command::new("openssl").args(["pkey", "-in", &key, "-passin", "pass:wrong", "-pubout"]));
        assert_ne!(code, 0, "{key} opened with a wrong passphrase");
    }
    // The public dev KEK, the same one the shipped keys-dev/ holds.
    let kek = std::fs::read_to_string(file("identity-kek.hex")).unwrap();
    let hex_line = |text: &str| text.lines().find(|l| !l.starts_with('#')).unwrap_or_default().trim().to_string();
    assert_eq!(hex_line(&kek).len(), 64);
    assert_eq!(hex_line(&kek), hex_line(&std::fs::read_to_string(dev_keys().join("identity-kek.hex")).unwrap()));

    // An engine on the new PKI, with a client whose hash `castellum hash-key` printed.
    let api_key = format!("fresh-{}", uuid::Uuid::new_v4().simple());
    let (_, hash, _) = output(castellum().args(["hash-key", &api_key]));
    let text = dev_config_text().replace(&dev_keys().display().to_string(), &out.display().to_string())
        + &format!(
            "\n[[clients]]\nname = \"fresh\"\napi_key_sha256 = \"{}\"\nprofiles = [\"tls-server-p256\"]\n",
            hash.trim()
        );
    assert!(!text.contains(&dev_keys().display().to_string()), "every path points to the new PKI");
    let config = dir.path().join("castellum.toml");
    std::fs::write(&config, &text).unwrap();
    let (code, stdout, stderr) = output(castellum().args(["check-config", "--config"]).arg(&config));
    assert_eq!(code, 0, "check-config on the new PKI: {stdout}{stderr}");
    assert!(stdout.contains("configuration is valid (4 CAs"), "{stdout}");

    let db = TestDb::sqlite();
    let engine =
        EngineProcess::start(&config, &[("CASTELLUM_DATABASE__URL", db.url.as_str())], Stdio::null(), Stdio::null())
            .await;
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/certificates", engine.base))
        .bearer_auth(&api_key)
        .json(&serde_json::json!({ "profile": "tls-server-p256", "csr": csr(Key::P256, &["pki.example.test"]) }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let issued: serde_json::Value = resp.json().await.unwrap();
    let leaf = dir.path().join("leaf.pem");
    std::fs::write(&leaf, issued["certificate"].as_str().unwrap()).unwrap();
    let leaf = leaf.display().to_string();
    let verified = openssl(&["verify", "-CAfile", &root, "-untrusted", &file("ica-p256.crt"), &leaf]);
    assert!(verified.contains(": OK"), "{verified}");
    let (code, _, _) = output(
        Command::new("openssl")
            .args(["verify", "-CAfile"])
            .arg(dev_keys().join("root.crt"))
            .arg("-untrusted")
            .arg(dev_keys().join("ica-p256.crt"))
            .arg(&leaf),
    );
    assert_ne!(code, 0, "signed by the new ica-p256, not the shipped one");
}

const TABLES: &[&str] =
    &["cas", "profiles", "registry", "instances", "requests", "certificates", "audit_log", "identities"];

fn migrations_shipped(db: &TestDb) -> i64 {
    let backend = if db.postgres { "postgres" } else { "sqlite" };
    std::fs::read_dir(repo().join("schema").join(backend))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().is_dir())
        .count() as i64
}

fn tables_present(db: &TestDb) -> i64 {
    let list = TABLES.iter().map(|t| format!("'{t}'")).collect::<Vec<_>>().join(", ");
    let sql = if db.postgres {
        format!(
            "SELECT count(*) AS n FROM information_schema.tables WHERE table_schema = 'public' AND table_name IN ({list})"
        )
    } else {
        format!("SELECT count(*) AS n FROM sqlite_master WHERE type = 'table' AND name IN ({list})")
    };
    sql::count(db, &sql)
}

/// `castellum migrate` on a fresh database creates every table and records every shipped
/// migration; run again it changes nothing and keeps the data. The second run names its
/// configuration through `CASTELLUM_CONFIG`, as `--help` says it may.
fn migrate_creates_the_schema_once(db: TestDb) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("castellum.toml");
    std::fs::write(&config, dev_config_text()).unwrap();
    let shipped = migrations_shipped(&db);
    assert!(shipped >= 3);
    assert_eq!(tables_present(&db), 0, "a fresh database");

    let (code, out, err) =
        output(castellum().args(["migrate", "--config"]).arg(&config).env("CASTELLUM_DATABASE__URL", &db.url));
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out.trim(), format!("{shipped} migration(s) applied"));
    assert_eq!(tables_present(&db), TABLES.len() as i64, "every table exists");
    assert_eq!(sql::count(&db, "SELECT count(*) AS n FROM __diesel_schema_migrations"), shipped);
    assert_eq!(sql::count(&db, "SELECT version AS n FROM registry WHERE id = 1"), 1, "the registry is seeded");
    if !db.postgres {
        assert_eq!(sql::texts(&db, "SELECT journal_mode AS s FROM pragma_journal_mode"), ["wal"]);
    }
    // Data written between the two runs survives the second.
    let mut raw = sql::connect(&db);
    let insert = "INSERT INTO audit_log (at, instance, actor, action, target, outcome, detail) \
                  VALUES (1, 'test', 'test', 'test.marker', 'x', 'ok', 'before the second migrate')";
    match &mut raw {
        sql::RawConn::Postgres(c) => diesel::RunQueryDsl::execute(diesel::sql_query(insert), c).unwrap(),
        sql::RawConn::Sqlite(c) => diesel::RunQueryDsl::execute(diesel::sql_query(insert), c).unwrap(),
    };
    drop(raw);

    let (code, out, err) = output(
        castellum()
            .arg("migrate")
            .env("CASTELLUM_CONFIG", &config)
            .env("CASTELLUM_DATABASE__URL", &db.url)
            .env("CASTELLUM_ADMIN_TOKEN", "the admin command's variable, not configuration")
            .env("CASTELLUM_STORM_API_KEY", "the storm command's variable, not configuration"),
    );
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out.trim(), "0 migration(s) applied");
    assert_eq!(sql::count(&db, "SELECT count(*) AS n FROM __diesel_schema_migrations"), shipped);
    assert_eq!(tables_present(&db), TABLES.len() as i64);
    assert_eq!(sql::count(&db, "SELECT count(*) AS n FROM audit_log WHERE action = 'test.marker'"), 1);
    assert_eq!(sql::count(&db, "SELECT version AS n FROM registry WHERE id = 1"), 1);
}

#[test]
fn migrate_creates_the_schema_once_on_sqlite() {
    migrate_creates_the_schema_once(TestDb::sqlite());
}

#[test]
fn migrate_creates_the_schema_once_on_postgres() {
    migrate_creates_the_schema_once(TestDb::postgres());
}

#[test]
fn migrate_fails_loudly_when_the_database_is_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("castellum.toml");
    std::fs::write(&config, dev_config_text()).unwrap();
    // Nothing listens on port 1 of loopback.
    let (code, out, err) = output(
        castellum()
            .args(["migrate", "--config"])
            .arg(&config)
            .env("CASTELLUM_DATABASE__URL", "postgres://postgres@127.0.0.1:1/castellum"),
    );
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("migration failed"), "{err}");
    assert!(!out.contains("applied"), "{out}");
}

/// The compiled example `name`, built by cargo with the same profile as this test. `cargo
/// nextest run` builds examples only when no target filter is given (`--test cli` builds none),
/// so the test asks cargo for it: a no-op when it is fresh, a build of the example alone
/// otherwise (the library is already built). Nextest holds no cargo lock while tests run.
fn example_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(Path::parent).expect("target/<profile>/deps/<test>").to_path_buf();
    let profile = profile_dir.file_name().unwrap().to_str().unwrap().to_string();
    let mut cmd = Command::new(env!("CARGO"));
    cmd.args(["build", "--offline", "--example", name, "--message-format=json-render-diagnostics", "--manifest-path"])
        .arg(repo().join("Cargo.toml"));
    if profile != "debug" {
        cmd.args(["--profile", &profile]);
    }
    let (code, out, err) = output(&mut cmd);
    assert_eq!(code, 0, "cargo build --example {name}: {err}");
    let built = out
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == name)
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .unwrap_or_else(|| panic!("cargo named no executable for example {name}: {out}"));
    assert_eq!(built.parent(), Some(profile_dir.join("examples").as_path()), "built beside this test");
    built
}

/// `examples/embed.rs` as its README line says: an application serving its own route and issuing
/// through the engine's handle on the dev configuration; the certificate chains to the dev root;
/// a refusal keeps its status; it records what it issued in its own database; SIGTERM stops it
/// cleanly.
#[actix_rt::test]
async fn the_embed_example_issues_through_its_own_route() {
    let exe = actix_web::rt::task::spawn_blocking(|| example_binary("embed")).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    // It reads keys-dev/castellum.toml and writes castellum-embed.db relative to where it runs.
    std::os::unix::fs::symlink(dev_keys(), dir.path().join("keys-dev")).unwrap();
    let mut child = Command::new(&exe)
        .current_dir(dir.path())
        .env("EMBED_LISTEN", "127.0.0.1:0")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("the example starts");
    struct Kill<'a>(&'a mut std::process::Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stdout = child.stdout.take().unwrap();
    let guard = Kill(&mut child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let started = Instant::now();
    let addr = loop {
        let left = Duration::from_secs(30).saturating_sub(started.elapsed());
        let line = rx.recv_timeout(left).expect("the example prints where it listens within 30 s");
        if let Some(rest) = line.strip_prefix("embedding application on http://") {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };

    let http = reqwest::Client::new();
    let resp = http.post(format!("http://{addr}/enroll/embed.example.test")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let pem = resp.text().await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (ok, text) = openssl_verify(tmp.path(), &pem, "ica-p256");
    assert!(ok, "the example's certificate chains to the dev root: {text}");
    assert!(openssl_text(tmp.path(), &pem).contains("DNS:embed.example.test"));
    // The profile's name policy (dns_suffixes = example.test) refuses, with its status.
    let refused = http.post(format!("http://{addr}/enroll/embed.example.com")).send().await.unwrap();
    assert_eq!(refused.status(), 422);

    let db = TestDb::sqlite_file(&dir.path().join("castellum-embed.db"));
    assert_eq!(sql::count(&db, "SELECT count(*) AS n FROM certificates WHERE state = 'issued' AND client = 'demo'"), 1);

    // SIGTERM: actix-web stops the server, then the example shuts the engine down and exits 0.
    let pid = libc::pid_t::try_from(guard.0.id()).unwrap();
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let started = Instant::now();
    let status = loop {
        if let Some(status) = guard.0.try_wait().unwrap() {
            break status;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "the example did not stop on SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status}");
}

/// `castellum bench`, shortest form: a prefilled database of rows the size of real ones, a level
/// with no errors, idle keep-alive connections the engine keeps, and no database left behind.
fn bench_prefills_measures_and_cleans_up(postgres: bool) {
    let out = tempfile::tempdir().unwrap();
    let mut cmd = castellum();
    cmd.args(["bench", "--concurrency", "4", "--duration", "1s", "--idle-connections", "20", "--prefill", "3000"])
        .arg("--keys-dev")
        .arg(dev_keys())
        .arg("--out")
        .arg(out.path());
    if postgres {
        cmd.args(["--postgres", &postgres_admin_url()]);
    }
    let (code, stdout, stderr) = output(&mut cmd);
    assert_eq!(code, 0, "{stdout}{stderr}");
    let backend = if postgres { "| PostgreSQL | 4 |" } else { "| SQLite | 4 |" };
    let row = stdout.lines().find(|l| l.starts_with(backend)).unwrap_or_else(|| panic!("{stdout}"));
    assert!(row.trim_end().ends_with("| 0 |"), "no errors: {row}");
    assert!(stderr.contains("prefilled 3000 of 3000 certificates"), "progress is shown: {stderr}");
    // Measured right after a bulk insert, the levels would share the disk with its writeback.
    assert!(stderr.contains("prefill flushed to disk"), "the prefill is flushed before the levels: {stderr}");
    // A generated row is as large as an issued one (certificate, audit row, indexes; no TBS
    // beside an issued certificate): about 1.1 KB on either backend; a prefill of empty rows
    // would be far below.
    let per_row: f64 = stdout
        .split(" bytes per stored certificate")
        .next()
        .and_then(|head| head.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the prefill's size is reported: {stdout}"));
    assert!((800.0..6_000.0).contains(&per_row), "{per_row} bytes per stored certificate");
    assert!(stdout.contains("(20 still open after the level"), "the engine kept the idle connections: {stdout}");
    let left: Vec<PathBuf> =
        walk(out.path()).into_iter().filter(|p| p.to_string_lossy().contains("bench.db")).collect();
    assert!(left.is_empty(), "the bench's database is removed: {left:?}");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries.flatten().flat_map(|e| if e.path().is_dir() { walk(&e.path()) } else { vec![e.path()] }).collect()
        })
        .unwrap_or_default()
}

/// Issue 17: `castellum bench --token` measures each key on a SoftHSM token beside the same key in
/// memory, issues through both without an error, and leaves no token or database behind.
#[test]
fn bench_token_measures_softhsm_beside_the_key_in_memory() {
    let out = tempfile::tempdir().unwrap();
    let mut cmd = castellum();
    cmd.args(["bench", "--token", "--concurrency", "2", "--duration", "1s", "--keys-dev"])
        .arg(dev_keys())
        .arg("--out")
        .arg(out.path());
    let (code, stdout, stderr) = output(&mut cmd);
    assert_eq!(code, 0, "{stdout}{stderr}");
    for (key, store) in [
        ("P-256", "in memory (key file)"),
        ("P-256", "SoftHSM2 token"),
        ("RSA-3072", "in memory (key file)"),
        ("RSA-3072", "SoftHSM2 token"),
    ] {
        let row = stdout
            .lines()
            .find(|l| l.starts_with(&format!("| {key} | {store} |")))
            .unwrap_or_else(|| panic!("no row for {key} {store}: {stdout}"));
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let signatures: f64 = cells[3].parse().unwrap_or_else(|_| panic!("signatures/s in {row}"));
        let issued: f64 = cells[6].parse().unwrap_or_else(|_| panic!("issuances/s in {row}"));
        assert!(signatures > 10.0 && issued > 10.0, "{row}");
        assert_eq!(cells[10], "0", "no errors: {row}");
    }
    assert!(walk(out.path()).is_empty(), "the bench's tokens and databases are removed: {:?}", walk(out.path()));
}

#[test]
fn bench_prefills_measures_and_cleans_up_on_sqlite() {
    bench_prefills_measures_and_cleans_up(false);
}

#[test]
fn bench_prefills_measures_and_cleans_up_on_postgres() {
    bench_prefills_measures_and_cleans_up(true);
}

/// `castellum bench --ocsp`, shortest form: in a closed loop and at a fixed rate, every answer
/// comes from the cache (no signature, no row written, no error), and the paced load keeps its
/// rate.
#[test]
fn bench_ocsp_answers_from_the_cache_closed_and_paced() {
    let out = tempfile::tempdir().unwrap();
    let mut cmd = castellum();
    cmd.args(["bench", "--ocsp", "--concurrency", "4", "--rate", "400", "--duration", "2s", "--keys-dev"])
        .arg(dev_keys())
        .arg("--out")
        .arg(out.path());
    let (code, stdout, stderr) = output(&mut cmd);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stderr.contains("every question answered once: 1800 good, 200 revoked"), "{stderr}");
    for load in ["closed loop", "400/s"] {
        let row = stdout
            .lines()
            .find(|l| l.starts_with(&format!("| SQLite | 4 | {load} | POST /ocsp, cached |")))
            .unwrap_or_else(|| panic!("no {load} OCSP row in\n{stdout}"));
        assert!(row.trim_end().ends_with("| 0 | 0 | 0 |"), "no signature, row or error during the load: {row}");
        let answers: f64 = row.split('|').nth(5).and_then(|n| n.trim().parse().ok()).unwrap();
        if load == "400/s" {
            assert!((320.0..=480.0).contains(&answers), "the paced load keeps its rate: {row}");
        } else {
            assert!(answers > 400.0, "a closed loop outruns 400/s: {row}");
        }
    }
    let left: Vec<PathBuf> =
        walk(out.path()).into_iter().filter(|p| p.to_string_lossy().contains("bench.db")).collect();
    assert!(left.is_empty(), "the bench's database is removed: {left:?}");
}

/// `--log-json` (issue 16): stdout carries JSON lines only, the listening address among them as
/// an event, no ANSI escape; each answer served has an access line (route, status, duration)
/// and a refusal has none by default (it is counted in `castellum_http_requests_total`); on
/// SIGTERM the engine's last line is written before the process exits.
#[actix_rt::test]
async fn json_logs_are_json_alone_with_an_access_line_per_answer_served() {
    let db = TestDb::sqlite();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut child = castellum()
        .args(["--log-json", "serve", "--config"])
        .arg(dev_keys().join("castellum.toml"))
        .env("CASTELLUM_DATABASE__URL", &db.url)
        .env("CASTELLUM_HTTP__LISTEN", format!("127.0.0.1:{port}"))
        .env("CASTELLUM_ADMIN__LISTEN", "")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (lines_tx, lines) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let mut seen: Vec<serde_json::Value> = Vec::new();
    let next_event = |seen: &mut Vec<serde_json::Value>| {
        let line = lines.recv_timeout(Duration::from_secs(20)).expect("a log line");
        assert!(!line.contains('\u{1b}'), "an ANSI escape in {line:?}");
        let event: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        seen.push(event.clone());
        event
    };
    let base = format!("http://127.0.0.1:{port}");
    while next_event(&mut seen)["url"] != base {}
    let http = reqwest::Client::new();
    assert_eq!(http.get(format!("{base}/v1/cas")).bearer_auth(DEMO_KEY).send().await.unwrap().status(), 200);
    assert_eq!(http.get(format!("{base}/v1/cas")).bearer_auth("wrong").send().await.unwrap().status(), 401);
    assert_eq!(http.get(format!("{base}/healthz")).send().await.unwrap().status(), 200);
    while next_event(&mut seen)["route"] != "/healthz" {}
    let access: Vec<_> = seen.iter().filter(|e| e["message"] == "request").collect();
    assert_eq!(access.len(), 2, "one line per answer served, none for the 401: {access:?}");
    assert_eq!((&access[0]["route"], &access[0]["status"]), (&"/v1/cas".into(), &200.into()), "{access:?}");
    assert!(access[0]["duration_ms"].as_f64().is_some(), "{access:?}");
    let metrics = http.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(
        metrics.contains(r#"castellum_http_requests_total{listener="api",route="/v1/cas",status="401"} 1"#),
        "the refusal is counted: {}",
        metrics.lines().filter(|l| l.contains("http_requests_total")).collect::<Vec<_>>().join("\n")
    );
    // A clean stop: the engine's last line reaches stdout and the process exits 0.
    assert_eq!(unsafe { libc::kill(libc::pid_t::try_from(child.id()).unwrap(), libc::SIGTERM) }, 0);
    let stopped = (0..1000).any(|_| next_event(&mut seen)["message"] == "engine stopped");
    assert!(stopped, "the engine's last line: {:?}", seen.last());
    assert!(child.wait().unwrap().success());
}

/// `serve` on a port another process holds: it exits 1 naming the address, having stopped the
/// engine cleanly (before, it panicked in the actors' cleanup), for either listener.
#[test]
fn serve_exits_naming_the_address_when_a_listeners_port_is_taken() {
    let db = TestDb::sqlite();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap().to_string();
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    for (api, admin, listener) in [(&taken_addr, "", "API listener"), (&free, taken_addr.as_str(), "admin listener")] {
        let mut child = castellum()
            .args(["serve", "--config"])
            .arg(dev_keys().join("castellum.toml"))
            .env("CASTELLUM_DATABASE__URL", &db.url)
            .env("CASTELLUM_HTTP__LISTEN", api)
            .env("CASTELLUM_ADMIN__LISTEN", admin)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("serve kept running with {listener} {taken_addr} taken");
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
        assert_eq!(status.code(), Some(1), "{listener}: {stderr}");
        assert!(stderr.contains(&format!("{listener} {taken_addr}")), "{listener}: {stderr}");
        assert!(!stderr.contains("panicked"), "{listener}: {stderr}");
    }
    drop(taken);
}
