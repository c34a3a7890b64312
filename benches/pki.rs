//! In-process costs of the issuance path's CPU work (`cargo bench --bench pki`): CSR parse and
//! check, and certificate build + lint + sign, with the dev P-256 CA; and the identity path's:
//! key generation + sealing per key type, and opening a sealed key + signing a digest.

mod common;

use std::time::SystemTime;

use castellum::config::{Config, Mode};
use castellum::pki::{csr, tbs, CaMaterial, Profile};
use criterion::{criterion_group, criterion_main, Criterion};

fn bench(c: &mut Criterion) {
    let config = Config::load(Some(std::path::Path::new("keys-dev/castellum.toml"))).expect("dev config");
    assert_eq!(config.mode, Mode::Dev);
    let ca = CaMaterial::load(&config.cas[0]).expect("dev CA");
    let profile = Profile::from_config(&config.profiles[0]);
    let pem = common::p256_csr();
    c.bench_function("csr parse + check (P-256)", |b| b.iter(|| csr::check_csr_pem(&pem).expect("valid")));
    let checked = csr::check_csr_pem(&pem).expect("valid");
    let names = profile.approve(&checked).expect("approved");
    c.bench_function("certificate build + lint (P-256 CA)", |b| {
        b.iter(|| tbs::prepare(&ca, &profile, &checked, &names, SystemTime::now()).expect("prepared"))
    });
    let prepared = tbs::prepare(&ca, &profile, &checked, &names, SystemTime::now()).expect("prepared");
    c.bench_function("certificate sign (P-256 CA)", |b| b.iter(|| tbs::sign(&ca, &prepared.tbs).expect("signed")));
}

fn identities(c: &mut Criterion) {
    use castellum::pki::identity::signature_scheme;
    use castellum::pki::identity::{generate_sealed, sign_digest, DigestAlgorithm};
    use castellum::pki::kek::{dev_kek, Kek};
    use castellum::pki::{KeyType, RsaSignatureScheme};
    let kek = Kek::from_bytes(&dev_kek());
    for (name, kind, bits) in
        [("ecdsa-p256", KeyType::EcdsaP256, 0), ("ecdsa-p384", KeyType::EcdsaP384, 0), ("ed25519", KeyType::Ed25519, 0)]
    {
        c.bench_function(&format!("identity key generate + seal ({name})"), |b| {
            b.iter(|| generate_sealed(kind, bits, &kek).expect("generated"))
        });
    }
    let mut rsa = c.benchmark_group("identity RSA key generate + seal");
    rsa.sample_size(10);
    for bits in [2048, 3072] {
        rsa.bench_function(format!("rsa-{bits}"), |b| {
            b.iter(|| generate_sealed(KeyType::Rsa, bits, &kek).expect("generated"))
        });
    }
    rsa.finish();
    let digest = openssl::sha::sha256(b"a document");
    for (name, kind) in
        [("ecdsa-p256", KeyType::EcdsaP256), ("ecdsa-p384", KeyType::EcdsaP384), ("ed25519", KeyType::Ed25519)]
    {
        let key = generate_sealed(kind, 0, &kek).expect("generated");
        let name_scheme = signature_scheme(kind, RsaSignatureScheme::Pkcs1);
        c.bench_function(&format!("identity open + sign digest ({name})"), |b| {
            b.iter(|| {
                let private = kek.open(&key.id, &key.sealed).expect("opens");
                sign_digest(kind, &private, name_scheme, DigestAlgorithm::Sha256, &digest).expect("signed")
            })
        });
    }
}

criterion_group!(benches, bench, identities);
criterion_main!(benches);
