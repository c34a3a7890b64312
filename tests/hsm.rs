//! CA keys on a PKCS#11 token (issue 17), on a real SoftHSM2 token made by
//! `keys-dev/pkcs11-dev-token`: certificates signed by the token for each key type, verified by
//! the `openssl` command line against the dev root; `check-config` naming what is wrong with a
//! token configuration; an inline PIN refused outside dev mode.
//!
//! Each test runs in a process of its own (nextest), so `SOFTHSM2_CONF` set by one test reaches
//! only its own engine.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use castellum::check::check_config;
use castellum::config::Config;
use common::*;

const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// A fresh token with the four dev CA keys, and `SOFTHSM2_CONF` pointing at it for this process.
fn dev_token() -> tempfile::TempDir {
    assert!(Path::new(MODULE).exists(), "SoftHSM2 is not installed: run .ci/prepare (apt-get install softhsm2)");
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(dev_keys().join("pkcs11-dev-token")).arg(dir.path()).output().unwrap();
    assert!(out.status.success(), "pkcs11-dev-token: {}", String::from_utf8_lossy(&out.stderr));
    std::env::set_var("SOFTHSM2_CONF", dir.path().join("softhsm2.conf"));
    dir
}

/// The dev configuration with `cas` signing through the dev token (key label `labels[i]` for
/// `cas[i]`), with `pin_line` as the PIN setting.
fn on_token(cas: &[(&str, &str)], pin_line: &str) -> String {
    let mut config: toml::Table = toml::from_str(&dev_config_text()).unwrap();
    for entry in config["cas"].as_array_mut().unwrap() {
        let ca = entry.as_table_mut().unwrap();
        let id = ca["id"].as_str().unwrap().to_string();
        let Some((_, label)) = cas.iter().find(|(c, _)| *c == id) else { continue };
        ca.remove("key_file");
        ca.remove("key_passphrase");
        let pkcs11: toml::Table = toml::from_str(&format!(
            "module = \"{MODULE}\"\ntoken_label = \"castellum-dev\"\nkey_label = \"{label}\"\n{pin_line}"
        ))
        .unwrap();
        let mut key = toml::Table::new();
        key.insert("pkcs11".into(), pkcs11.into());
        ca.insert("key".into(), key.into());
    }
    toml::to_string(&config).unwrap()
}

fn dev_pin_file() -> String {
    format!("pin_file = \"{}\"", dev_keys().join("pkcs11-dev-pin").display())
}

fn problems_of(text: &str) -> Vec<String> {
    let config = Config::from_toml(text, &dev_keys()).expect("parses");
    check_config(&config).0.iter().map(|p| p.to_string()).collect()
}

/// `openssl verify` of a certificate the engine returned, with the chain it returned, against the
/// repository's root; and the certificate carries the CSR's public key.
fn openssl_verifies(dir: &Path, name: &str, csr_pem: &str, answer: &serde_json::Value) {
    let write = |file: &str, text: &str| -> PathBuf {
        let path = dir.join(format!("{name}-{file}"));
        std::fs::write(&path, text).unwrap();
        path
    };
    let cert = write("cert.pem", answer["certificate"].as_str().expect("a certificate"));
    let chain: Vec<&str> = answer["chain"].as_array().expect("a chain").iter().map(|c| c.as_str().unwrap()).collect();
    let chain = write("chain.pem", &chain.join(""));
    let csr = write("csr.pem", csr_pem);
    let verify = Command::new("openssl")
        .args(["verify", "-x509_strict", "-CAfile"])
        .arg(dev_keys().join("root.crt"))
        .arg("-untrusted")
        .arg(&chain)
        .arg(&cert)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&verify.stdout).to_string() + &String::from_utf8_lossy(&verify.stderr);
    assert!(verify.status.success() && said.contains(": OK"), "{name}: openssl verify: {said}");
    let pubkey = |args: &[&str], file: &Path| {
        let out = Command::new("openssl").args(args).arg(file).output().unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    assert_eq!(
        pubkey(&["x509", "-noout", "-pubkey", "-in"], &cert),
        pubkey(&["req", "-noout", "-pubkey", "-in"], &csr),
        "{name}: the certificate carries the CSR's key"
    );
}

/// Every key type through the token: ECDSA P-256 and P-384, RSA-3072 (PKCS#1 v1.5) and Ed25519.
#[actix_rt::test]
async fn token_backed_cas_issue_certificates_openssl_verifies() {
    let _token = dev_token();
    let cas = [
        ("ica-p256", "ica-p256"),
        ("ica-p384", "ica-p384"),
        ("ica-rsa3072", "ica-rsa3072"),
        ("ica-ed25519", "ica-ed25519"),
    ];
    let text = on_token(&cas, &dev_pin_file());
    let problems = problems_of(&text);
    assert!(problems.is_empty(), "{problems:#?}");
    let db = TestDb::sqlite();
    let server = TestServer::start(config_from(&text, &db)).await;
    let dir = tempfile::tempdir().unwrap();
    for profile in ["tls-server-p256", "tls-server-p384", "tls-server-rsa", "client-ed25519"] {
        let name = format!("{profile}.example.test");
        let csr_pem = csr(Key::P256, &[name.as_str()]);
        let answer = server.issue(DEMO_KEY, profile, &csr_pem).send().await.unwrap();
        assert_eq!(answer.status(), 201, "{profile}");
        let body: serde_json::Value = answer.json().await.unwrap();
        openssl_verifies(dir.path(), profile, &csr_pem, &body);
    }
    server.stop().await;
}

/// `check-config` (and so start-up) names what is wrong with a token configuration, at the key
/// path to fix.
#[test]
fn check_config_names_what_is_wrong_with_a_token() {
    let _token = dev_token();
    let expect = |text: String, path: &str, words: &str| {
        let problems = problems_of(&text);
        assert!(
            problems.iter().any(|p| p.starts_with(&format!("{path}: ")) && p.contains(words)),
            "expected {path} mentioning {words:?}, got {problems:#?}"
        );
    };
    let pin = dev_pin_file();
    expect(
        on_token(&[("ica-p256", "ica-p256")], &pin).replace(MODULE, "/nonexistent/libpkcs11.so"),
        "cas[0].key.pkcs11",
        "/nonexistent/libpkcs11.so",
    );
    expect(
        on_token(&[("ica-p256", "ica-p256")], &pin).replace("\"castellum-dev\"", "\"no-such-token\""),
        "cas[0].key.pkcs11",
        "no token labelled \"no-such-token\"",
    );
    expect(
        on_token(&[("ica-p256", "no-such-key")], &pin),
        "cas[0].key.pkcs11",
        "no private key labelled \"no-such-key\"",
    );
    expect(on_token(&[("ica-p256", "ica-p256")], "pin = \"wrong-pin\""), "cas[0].key.pkcs11", "PIN was refused");
    // Another CA's key of the same type: the token signs, the certificate's key does not verify.
    expect(on_token(&[("ica-p256", "ica-p384")], &pin), "cas[0].key.pkcs11", "does not match the CA certificate");
    expect(
        on_token(&[("ica-p256", "ica-p256")], "pin_env = \"HSM_TEST_NO_SUCH_PIN\""),
        "cas[0].key.pkcs11.pin_file",
        "HSM_TEST_NO_SUCH_PIN is not set",
    );
    // No key at all, and both a file and a token.
    let mut both: toml::Table = toml::from_str(&on_token(&[("ica-p256", "ica-p256")], &pin)).unwrap();
    both["cas"].as_array_mut().unwrap()[0].as_table_mut().unwrap().insert("key_file".into(), "ica-p256.key".into());
    expect(toml::to_string(&both).unwrap(), "cas[0].key", "not both");
}

/// A PIN written in the configuration is refused outside dev mode (where the dev keys are refused
/// too, so the check names both).
#[test]
fn an_inline_pin_is_refused_outside_dev_mode() {
    let _token = dev_token();
    let text = on_token(&[("ica-p256", "ica-p256")], "pin = \"castellum-dev-pin\"").replacen(
        "mode = \"dev\"",
        "mode = \"production\"",
        1,
    );
    let problems = problems_of(&text);
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("cas[0].key.pkcs11.pin: ") && p.contains("refused unless mode = \"dev\"")),
        "{problems:#?}"
    );
}
