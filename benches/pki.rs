//! In-process costs of the issuance path's CPU work (`cargo bench --bench pki`): CSR parse and
//! check, and certificate build + lint + sign, with the dev P-256 CA.

use std::time::SystemTime;

use castellum::config::{Config, Mode};
use castellum::pki::{csr, tbs, CaMaterial, Profile};
use criterion::{criterion_group, criterion_main, Criterion};

fn p256_csr() -> String {
    let out = std::process::Command::new("openssl")
        .args(["req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", "/dev/null"])
        .args(["-subj", "/CN=bench.example.test", "-addext", "subjectAltName=DNS:bench.example.test"])
        .output()
        .expect("openssl");
    String::from_utf8(out.stdout).expect("PEM")
}

fn bench(c: &mut Criterion) {
    let config = Config::load(Some(std::path::Path::new("keys-dev/castellum.toml"))).expect("dev config");
    assert_eq!(config.mode, Mode::Dev);
    let ca = CaMaterial::load(&config.cas[0]).expect("dev CA");
    let profile = Profile::from_config(&config.profiles[0]);
    let pem = p256_csr();
    c.bench_function("csr parse + check (P-256)", |b| b.iter(|| csr::check_csr_pem(&pem).expect("valid")));
    let checked = csr::check_csr_pem(&pem).expect("valid");
    let names = profile.approve(&checked).expect("approved");
    c.bench_function("certificate build + lint (P-256 CA)", |b| {
        b.iter(|| tbs::prepare(&ca, &profile, &checked, &names, SystemTime::now()).expect("prepared"))
    });
    let prepared = tbs::prepare(&ca, &profile, &checked, &names, SystemTime::now()).expect("prepared");
    c.bench_function("certificate sign (P-256 CA)", |b| b.iter(|| tbs::sign(&ca, &prepared.tbs_der).expect("signed")));
}

criterion_group!(benches, bench);
criterion_main!(benches);
