//! `castellum check-config`: each misconfiguration fails, naming its key path; the shipped
//! sample passes; every problem is reported at once.

mod common;

use castellum::check::check_config;
use castellum::config::Config;
use common::*;

fn problems_of(text: &str) -> Vec<String> {
    let config = Config::from_toml(text, &dev_keys()).expect("parses");
    check_config(&config).0.iter().map(|p| p.to_string()).collect()
}

fn assert_flags(text: &str, path: &str, words: &str) {
    let problems = problems_of(text);
    assert!(
        problems.iter().any(|p| p.starts_with(&format!("{path}: ")) && p.contains(words)),
        "expected a problem at {path} mentioning {words:?}, got {problems:#?}"
    );
}

fn check_config_binary(text: &str) -> (Option<i32>, String) {
    check_config_with(text, &[])
}

#[test]
fn the_shipped_sample_passes() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_castellum"))
        .args(["check-config", "--config"])
        .arg(dev_keys().join("castellum.toml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(problems_of(&dev_config_text()).is_empty());
}

#[test]
fn a_missing_file_is_an_error() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_castellum"))
        .args(["check-config", "--config", "/nonexistent/castellum.toml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nonexistent"));
}

#[test]
fn a_profile_naming_no_ca() {
    let text = dev_config_text().replacen("ca = \"ica-p384\"", "ca = \"ica-missing\"", 1);
    assert_flags(&text, "profiles[1].ca", "no CA named \"ica-missing\"");
}

#[test]
fn a_key_that_does_not_match_its_certificate() {
    let text = dev_config_text().replacen("ica-p256.key", "ica-p384.key", 1);
    assert_flags(&text, "cas[0].key_file", "does not match");
}

#[test]
fn a_wrong_key_passphrase() {
    let text = dev_config_text().replacen("key_passphrase = \"castellum-dev-only\"", "key_passphrase = \"wrong\"", 1);
    assert_flags(&text, "cas[0].key_file", "cannot be decrypted");
}

#[test]
fn a_chain_that_does_not_verify() {
    let text = dev_config_text().replacen("root.crt\"]", "ica-p384.crt\"]", 1);
    assert_flags(&text, "cas[0].chain_files", "does not verify");
}

#[test]
fn dev_keys_outside_dev_mode() {
    let text = dev_config_text().replacen("\nmode = \"dev\"", "\nmode = \"production\"", 1);
    assert_flags(&text, "cas[0].key_file", "development keys");
    assert_flags(&text, "cas[0].cert_file", "development root");
    assert_flags(&text, "cas[0].key_passphrase", "only in dev mode");
}

#[test]
fn fault_injection_outside_dev_mode() {
    let text = dev_config_text().replacen("\nmode = \"dev\"", "\nmode = \"production\"", 1).replacen(
        "expected_sign_rate = 4000.0",
        "expected_sign_rate = 4000.0\n[cas.fault]\nsign_latency = \"1s\"",
        1,
    );
    assert_flags(&text, "cas[0].fault", "refused unless mode");
}

#[test]
fn sabotage_outside_dev_mode() {
    let text =
        dev_config_text().replacen("\nmode = \"dev\"", "\nmode = \"production\"\nsabotage = [\"silent-leaks\"]", 1);
    assert_flags(&text, "sabotage", "refused unless mode");
    // In dev mode the same line is accepted (the drills' tests use it), and an unknown defect is
    // a configuration error, not ignored.
    let dev = dev_config_text().replacen("\nmode = \"dev\"", "\nmode = \"dev\"\nsabotage = [\"silent-leaks\"]", 1);
    assert!(problems_of(&dev).iter().all(|p| !p.starts_with("sabotage")), "{:?}", problems_of(&dev));
    let unknown = dev_config_text().replacen("\nmode = \"dev\"", "\nmode = \"dev\"\nsabotage = [\"no-such\"]", 1);
    assert!(castellum::config::Config::from_toml(&unknown, &dev_keys()).is_err());
}

#[test]
fn a_pool_budget_over_the_servers_connections() {
    let text = dev_config_text().replacen(
        "url = \"sqlite://castellum-dev.db\"",
        "url = \"postgres://castellum@db.invalid/castellum\"\ninstances = 4\nserver_max_connections = 30\nreserved_connections = 5",
        1,
    );
    // 4 instances × (issuance 1 + control 2 + status 4 + admin 1 + audit 1) = 36 > 30 − 5: the
    // operator's and the audit writer's connections are counted like the others.
    assert_flags(
        &text,
        "database.pools",
        "(issuance 1 + control 2, the registry's LISTEN among them, + status 4 + admin 1 + audit 1) = 36, more than server_max_connections 30 − reserved_connections 5 = 25",
    );
}

/// `check-config --config FILE ARGS…` on `text`: exit code and everything printed.
fn check_config_with(text: &str, args: &[&str]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, text).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_castellum"))
        .args(["check-config", "--config"])
        .arg(&path)
        .args(args)
        .output()
        .unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr))
}

/// A setting as the server reports it, read with `psql` (not castellum's own query).
fn server_setting(name: &str) -> u32 {
    let out = std::process::Command::new("psql")
        .args([&on_database(&postgres_admin_url(), "postgres"), "-qtAc", &format!("SHOW {name}")])
        .output()
        .expect("psql runs");
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or_else(|_| panic!("SHOW {name}: {out:?}"))
}

fn on_postgres(url: &str, database_lines: &str) -> String {
    dev_config_text().replacen("url = \"sqlite://castellum-dev.db\"", &format!("url = \"{url}\"\n{database_lines}"), 1)
}

/// `check-config --instances N` (issue 15) reads the server's own limits: N instances of the dev
/// pools (9 connections each) fit in `max_connections` less the server's reserved slots and
/// `database.reserved_connections`; one more instance does not, and the refusal names the
/// server's figures. The figures are read with psql here.
#[test]
fn instances_are_checked_against_the_servers_own_limits() {
    let db = TestDb::postgres();
    let text = on_postgres(&db.url, "reserved_connections = 10");
    let (max, superuser) = (server_setting("max_connections"), server_setting("superuser_reserved_connections"));
    let budget = max - superuser - 10;
    let fits = budget / 9;

    let (code, out) = check_config_with(&text, &["--instances", &fits.to_string()]);
    assert_eq!(code, Some(0), "{fits} instances fit in {budget}: {out}");
    assert!(out.contains(&format!("= {}, of {budget} the server allows", fits * 9)), "{out}");

    let (code, out) = check_config_with(&text, &["--instances", &(fits + 1).to_string()]);
    assert_eq!(code, Some(1), "{} instances do not fit in {budget}: {out}", fits + 1);
    assert!(
        out.contains(&format!(
            "= {}, more than the server allows: max_connections {max} − superuser_reserved_connections {superuser}",
            (fits + 1) * 9
        )),
        "{out}"
    );
}

/// A role's own CONNECTION LIMIT is the budget when it is the tightest: 2 instances (18) fit in
/// a limit of 20, 3 (27) do not, whatever max_connections says.
#[test]
fn a_roles_connection_limit_bounds_the_instances() {
    let db = TestDb::postgres();
    let role = format!("castellum_check_{}", uuid::Uuid::new_v4().simple());
    let admin = on_database(&postgres_admin_url(), "postgres");
    let psql = |sql: &str| {
        let out = std::process::Command::new("psql").args([&admin, "-qtAc", sql]).output().unwrap();
        assert!(out.status.success(), "{sql}: {out:?}");
    };
    psql(&format!("CREATE ROLE {role} LOGIN CONNECTION LIMIT 20"));
    let url = db.url.replacen("postgres://postgres@", &format!("postgres://{role}@"), 1);
    let text = on_postgres(&url, "reserved_connections = 0");
    let two = check_config_with(&text, &["--instances", "2"]);
    let three = check_config_with(&text, &["--instances", "3"]);
    psql(&format!("DROP ROLE {role}"));
    assert_eq!(two.0, Some(0), "{}", two.1);
    assert_eq!(three.0, Some(1), "{}", three.1);
    assert!(three.1.contains("= 27, more than the server allows: the role's CONNECTION LIMIT 20"), "{}", three.1);
}

#[test]
fn a_pool_timeout_not_well_below_the_shortest_deadline() {
    let text = dev_config_text().replacen("max_size = 1", "max_size = 1\nconnection_timeout = \"5s\"", 1);
    assert_flags(&text, "database.pools.issuance.connection_timeout", "not well below the shortest deadline");
}

#[test]
fn a_queue_that_cannot_be_served_within_its_deadline() {
    let text = dev_config_text().replacen("interactive_capacity = 256", "interactive_capacity = 5000", 1);
    // ica-rsa3072: 5000 requests at 400/s take 12.5 s, over the interactive lane's 6 s.
    assert_flags(&text, "cas[2].queue.interactive_capacity", "12.5s to sign at 400 per second");
}

#[test]
fn a_profile_outliving_its_ca() {
    let text = dev_config_text().replacen("validity = \"30d\"", "validity = \"7300d\"", 1);
    assert_flags(&text, "profiles[0].validity", "would outlive CA \"ica-p256\"");
}

/// Issue 16: IP names need explicit ranges, the Baseline Requirements' key types on TLS server
/// profiles, clients' DNS suffixes, and a CIDR that is not one.
#[test]
fn names_and_key_types_a_ca_must_not_allow() {
    let ranges = "ip_ranges = [\"192.0.2.0/24\", \"2001:db8::/32\"]\n";
    let text = dev_config_text().replacen(ranges, "", 1);
    assert_flags(&text, "profiles[0].names.ip_ranges", "ip = true needs the address ranges");
    let text = dev_config_text().replacen(
        "allowed_keys = [\"ecdsa-p256\", \"ecdsa-p384\", \"rsa\"]",
        "allowed_keys = [\"ecdsa-p256\", \"ed25519\"]",
        1,
    );
    assert_flags(&text, "profiles[0].allowed_keys", "ed25519 keys are not allowed in TLS server certificates");
    let text =
        dev_config_text().replacen("dns_suffixes = [\"other.example.test\"]", "dns_suffixes = [\"not a name\"]", 1);
    assert_flags(&text, "clients[1].names.dns_suffixes[0]", "is not a DNS name");
    for (setting, path) in [
        ("body_timeout = \"0s\"", "http.body_timeout"),
        ("connections_per_source = 0", "http.connections_per_source"),
        ("auth_failures = { per_second = 0, burst = 5 }", "http.auth_failures"),
    ] {
        let text = dev_config_text().replacen("[http]", &format!("[http]\n{setting}"), 1);
        assert_flags(&text, path, "must be");
    }
    let bad_cidr = dev_config_text().replacen("192.0.2.0/24", "192.0.2.0/33", 1);
    let (code, out) = check_config_binary(&bad_cidr);
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("ip_ranges"), "{out}");
}

#[test]
fn a_store_that_would_never_batch_is_refused() {
    for (setting, path) in [("max_batch = 0", "store.max_batch"), ("overlap_at = 0", "store.overlap_at")] {
        let text = format!("{}\n[store]\n{setting}\n", dev_config_text());
        assert_flags(&text, path, "must be at least 1");
    }
}

#[test]
fn an_unknown_key_is_named() {
    let text = dev_config_text().replacen("[http]", "[http]\nlisten_port = 1", 1);
    let (code, out) = check_config_binary(&text);
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("http") && out.contains("listen_port"), "{out}");
}

#[test]
fn every_problem_is_listed_at_once_and_exits_non_zero() {
    let text = dev_config_text()
        .replacen("ca = \"ica-p384\"", "ca = \"ica-missing\"", 1)
        .replacen("ica-p384.key", "ica-p256.key", 1)
        .replacen("validity = \"30d\"", "validity = \"7300d\"", 1);
    let (code, out) = check_config_binary(&text);
    assert_eq!(code, Some(1), "{out}");
    for path in ["profiles[1].ca:", "cas[1].key_file:", "profiles[0].validity:"] {
        assert!(out.contains(path), "{path} missing from:\n{out}");
    }
    assert!(out.contains("3 problem(s)"), "{out}");
}

#[test]
fn start_up_refuses_what_check_config_refuses() {
    let db = TestDb::sqlite();
    let text = dev_config_text().replacen("ca = \"ica-p384\"", "ca = \"ica-missing\"", 1);
    let config = config_from(&text, &db);
    let result = actix_rt::System::new().block_on(castellum::Engine::start(config));
    match result {
        Err(castellum::StartError::Config(problems)) => {
            assert!(problems.iter().any(|p| p.path == "profiles[1].ca"))
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("the engine started on an invalid configuration"),
    }
}

/// The dev configuration's KEK line, as `dev_config_text` writes it.
fn dev_kek_line() -> String {
    format!("kek_file = \"{}\"", dev_keys().join("identity-kek.hex").display())
}

fn with_kek_file(contents: &str, mode: u32) -> (tempfile::TempDir, String) {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kek.hex");
    std::fs::write(&path, contents).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    let text = dev_config_text().replacen(&dev_kek_line(), &format!("kek_file = \"{}\"", path.display()), 1);
    (dir, text)
}

#[test]
fn identity_profiles_need_a_key_encryption_key() {
    let text = dev_config_text().replacen(&dev_kek_line(), "", 1);
    assert_flags(&text, "identities", "no key-encryption key configured");
    let text = dev_config_text().replacen(&dev_kek_line(), "kek_env = \"CASTELLUM_TEST_UNSET_KEK\"", 1);
    assert_flags(&text, "identities.kek_env", "CASTELLUM_TEST_UNSET_KEK is not set");
    let text = dev_config_text().replacen(&dev_kek_line(), "kek_file = \"missing-kek.hex\"", 1);
    assert_flags(&text, "identities.kek_file", "cannot read");
}

#[test]
fn a_weak_or_malformed_key_encryption_key_is_refused() {
    let (_d, text) = with_kek_file(&"00".repeat(32), 0o600);
    assert_flags(&text, "identities.kek_file", "too few distinct bytes");
    let (_d, text) = with_kek_file(&hex::encode("The quick brown fox jumps over!!"), 0o600);
    assert_flags(&text, "identities.kek_file", "printable text");
    let (_d, text) = with_kek_file("not hex at all", 0o600);
    assert_flags(&text, "identities.kek_file", "64 hex digits");
    let (_d, text) = with_kek_file(&"ab".repeat(31), 0o600);
    assert_flags(&text, "identities.kek_file", "64 hex digits");
    // A good one passes.
    let random = openssl::sha::sha256(b"a test KEK that is not the dev one");
    let (_d, text) = with_kek_file(&hex::encode(random), 0o600);
    assert!(!problems_of(&text).iter().any(|p| p.starts_with("identities")), "{:?}", problems_of(&text));
}

#[test]
fn the_dev_key_encryption_key_and_an_exposed_one_are_refused_outside_dev_mode() {
    let production = |text: String| text.replacen("\nmode = \"dev\"", "\nmode = \"production\"", 1);
    assert_flags(&production(dev_config_text()), "identities.kek_file", "development key-encryption key");
    let random = openssl::sha::sha256(b"a production KEK");
    let (_d, text) = with_kek_file(&hex::encode(random), 0o644);
    assert_flags(&production(text), "identities.kek_file", "readable by other users");
    let (_d, text) = with_kek_file(&hex::encode(random), 0o600);
    assert!(!problems_of(&production(text.clone())).iter().any(|p| p.starts_with("identities")));
}

#[test]
fn identity_profile_rules() {
    let text = dev_config_text().replacen("lifetime = \"30m\"\nmax_uses = 5", "lifetime = \"2h\"\nmax_uses = 0", 1);
    assert_flags(&text, "profiles[6].identity.lifetime", "must not exceed the profile's validity");
    assert_flags(&text, "profiles[6].identity.max_uses", "at least 1");
    let text = dev_config_text().replacen(
        "id = \"signing-identity\"\nca = \"ica-p256\"",
        "id = \"signing-identity\"\nca = \"ica-p256\"\nlane = \"background\"",
        1,
    );
    assert_flags(&text, "profiles[5].lane", "interactive lane");
}

#[test]
fn an_rsa_identity_profile_is_a_warning_not_a_refusal() {
    let text = dev_config_text().replacen("key_type = \"ecdsa-p384\"", "key_type = \"rsa\"", 1);
    let (code, out) = check_config_binary(&text);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("warning: profiles[6].identity.key_type: RSA-3072 key generation"), "{out}");
    assert!(out.contains("1 warning(s)"), "{out}");
}

#[test]
fn the_audit_writers_settings_are_checked() {
    let with = |section: &str| format!("{}\n{section}", dev_config_text());
    assert_flags(&with("[audit]\nrefusal_interval = \"0s\""), "audit.refusal_interval", "at least 10ms");
    assert_flags(&with("[audit]\nmax_pending = 0"), "audit.max_pending", "at least 1");
    assert_flags(
        &with("[audit]\ncheckpoint_file = \"/nonexistent-castellum-folder/heads.jsonl\""),
        "audit.checkpoint_file",
        "does not exist",
    );
    assert_flags(&with("[audit]\ncheckpoint_file = \"/tmp\""), "audit.checkpoint_file", "is a folder");
    assert!(problems_of(&with("[audit]\ncheckpoint_file = \"/tmp/castellum-heads.jsonl\"")).is_empty());
}

#[test]
fn revocation_settings_are_checked() {
    let with = |section: &str| format!("{}\n{section}", dev_config_text());
    assert_flags(&with("[crl]\nvalidity = \"11d\""), "crl.validity", "at most ten days");
    assert_flags(&with("[crl]\ndelay = \"10ms\""), "crl.delay", "at least 200ms");
    assert_flags(&with("[crl]\nlease = \"0s\""), "crl.lease", "at least 1s");
    let text = dev_config_text();
    let shards = text.replacen("expected_sign_rate = 4000.0", "expected_sign_rate = 4000.0\ncrl_shards = 0", 1);
    assert_flags(&shards, "cas[0].crl_shards", "between 1 and 1024");
    let trailing = text.replacen("base_url = \"http://127.0.0.1:8080\"", "base_url = \"http://127.0.0.1:8080/\"", 1);
    assert_flags(&trailing, "cas[0].base_url", "without a trailing slash");
    let scheme = text.replacen("base_url = \"http://127.0.0.1:8080\"", "base_url = \"ldap://crl\"", 1);
    assert_flags(&scheme, "cas[0].base_url", "not an http:// or https:// URL");
    let policy = text.replacen("policies = [\"2.23.140.1.2.1\"]", "policies = [\"dv\"]", 1);
    assert_flags(&policy, "profiles[0].policies[0]", "not an object identifier");
}

/// Listeners off loopback in production: the admin listener without TLS is refused, the API
/// listener without TLS is warned about (a balancer on a private network may terminate TLS);
/// on loopback, or in dev mode, neither is flagged.
#[test]
fn listeners_off_loopback_need_tls_in_production() {
    let production = dev_config_text().replace("mode = \"dev\"", "mode = \"production\"");
    let open = production
        .replace("listen = \"127.0.0.1:8081\"", "listen = \"0.0.0.0:8081\"")
        .replace("listen = \"127.0.0.1:8080\"", "listen = \"0.0.0.0:8080\"");
    assert_flags(&open, "admin.tls", "not on loopback and has no TLS");
    assert_flags(&open, "warning: http.tls", "not on loopback and has no TLS");
    let flagged = |text: &str| problems_of(text).iter().filter(|p| p.contains(".tls")).cloned().collect::<Vec<_>>();
    assert!(flagged(&production).is_empty(), "{:?}", flagged(&production));
    let dev_open = open.replace("mode = \"production\"", "mode = \"dev\"");
    assert!(flagged(&dev_open).is_empty(), "{:?}", flagged(&dev_open));
}

/// TLS files are loaded by check-config: a missing file, a key of another certificate, client
/// certificate names without a client CA, a client CA on the admin listener.
#[test]
fn tls_files_and_client_certificates_are_checked() {
    // Two listener certificates with their keys, made by the openssl command line.
    let dir = tempfile::tempdir().unwrap();
    for name in ["one", "two"] {
        let (ok, out) = run(std::process::Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1"])
            .args(["-subj", &format!("/CN={name}"), "-keyout"])
            .arg(dir.path().join(format!("{name}.key")))
            .arg("-out")
            .arg(dir.path().join(format!("{name}.crt"))));
        assert!(ok, "{out}");
    }
    let keys = dir.path().to_path_buf();
    let tls = |cert: &str, key: &str, extra: &str| {
        let listener = format!(
            "[http.tls]\ncertificate = \"{}\"\nkey = \"{}\"\n{extra}\n",
            keys.join(cert).display(),
            keys.join(key).display()
        );
        dev_config_text().replacen("[admin]", &format!("{listener}\n[admin]"), 1)
    };
    let good = tls("one.crt", "one.key", "");
    assert!(problems_of(&good).iter().all(|p| !p.contains("tls")), "{:?}", problems_of(&good));
    assert_flags(&tls("one.crt", "two.key", ""), "http.tls", "does not match");
    assert_flags(&tls("missing.crt", "one.key", ""), "http.tls", "missing.crt");
    assert_flags(&tls("one.crt", "one.key", "reload_interval = \"0s\""), "http.tls.reload_interval", "positive");
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(keys.join("one.key"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let production = good.replace("mode = \"dev\"", "mode = \"production\"");
    assert_flags(&production, "warning: http.tls.key", "readable by its group or other users");
    let cert_only = dev_config_text().replace(
        "[[clients]]\nname = \"other\"",
        "[[clients]]\nname = \"robot\"\ncertificate_names = [\"robot.example.test\"]\nprofiles = []\n\n[[clients]]\nname = \"other\"",
    );
    assert_flags(&cert_only, "clients[1].certificate_names[0]", "set http.tls.client_ca");
    // demo may request any example.test name from the client profile: it could act as robot.
    assert_flags(&cert_only, "clients[1].certificate_names[0]", "client \"demo\" may obtain a client certificate");
    let admin_ca = dev_config_text().replacen(
        "[database]",
        &format!(
            "[admin.tls]\ncertificate = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"\n\n[database]",
            keys.join("one.crt").display(),
            keys.join("one.key").display(),
            dev_keys().join("root.crt").display()
        ),
        1,
    );
    assert_flags(&admin_ca, "admin.tls.client_ca", "admins authenticate by token");
    // Client CRLs: only beside a client CA, and the file must hold CRLs.
    let crl_alone = tls("one.crt", "one.key", &format!("client_crl = \"{}\"", keys.join("one.crt").display()));
    assert_flags(&crl_alone, "http.tls.client_crl", "none is asked for without client_ca");
    let not_a_crl = tls(
        "one.crt",
        "one.key",
        &format!(
            "client_ca = \"{}\"\nclient_crl = \"{}\"",
            dev_keys().join("root.crt").display(),
            keys.join("one.crt").display()
        ),
    );
    assert_flags(&not_a_crl, "http.tls", "holds no PEM X509 CRL");
}
