//! The request headers the API interprets: `Prefer` (RFC 7240, several values, one per line
//! here) and `Idempotency-Key`. Beyond not panicking: a key accepted holds no control character.
#![no_main]

use castellum::http::certificates::{idempotency_key_of, Prefer};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = Prefer::parse(data.split(|&b| b == b'\n'));
    if let Ok(Some(key)) = idempotency_key_of(Some(data)) {
        assert!(key.chars().all(|c| c == '\t' || !c.is_control()), "{key:?}");
    }
});
