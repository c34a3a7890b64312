//! The CSR check a client's `csr` goes through: PEM framing (exactly one block), DER, the
//! signature, the key and the names. Any input must end in a CSR or an error, never a panic.
#![no_main]

use castellum::pki::csr::{check_csr_der, check_csr_pem};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(pem) = std::str::from_utf8(data) {
        let _ = check_csr_pem(pem);
    }
    let _ = check_csr_der(data.to_vec());
});
