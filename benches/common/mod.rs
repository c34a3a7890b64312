//! What the benches share.

/// A fresh P-256 CSR for `bench.example.test`, made with the openssl command line.
pub fn p256_csr() -> String {
    let out = std::process::Command::new("openssl")
        .args(["req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", "/dev/null"])
        .args(["-subj", "/CN=bench.example.test", "-addext", "subjectAltName=DNS:bench.example.test"])
        .output()
        .expect("openssl");
    String::from_utf8(out.stdout).expect("PEM")
}
