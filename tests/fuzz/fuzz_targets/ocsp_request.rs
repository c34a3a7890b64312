//! OCSP requests: the DER of a POST, and the URL-encoded base64 of a GET's path. A question read
//! from a request must encode again as a request that reads back as the same question.
#![no_main]

use castellum::http::revocation::ocsp_get_request;
use castellum::pki::ocsp::read_request;
use libfuzzer_sys::fuzz_target;

fn read(der: &[u8]) {
    if let Ok(question) = read_request(der) {
        let again = question.request_der().expect("a question read encodes again");
        assert_eq!(read_request(&again).ok(), Some(question));
    }
}

fuzz_target!(|data: &[u8]| {
    read(data);
    if let Ok(path) = std::str::from_utf8(data) {
        read(&ocsp_get_request(path));
    }
});
