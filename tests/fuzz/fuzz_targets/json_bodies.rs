//! The JSON bodies of the API's POSTs, as the handlers read them (the first byte chooses which),
//! then what the engine does first with a signature request's fields (digest algorithm, base64
//! digest, its length).
#![no_main]

use base64::Engine as _;
use castellum::http::certificates::IssueBody;
use castellum::http::identities::{CreateBody, SignBody};
use castellum::http::revocation::RevokeBody;
use castellum::pki::identity::DigestAlgorithm;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else { return };
    match which % 4 {
        0 => {
            let _ = serde_json::from_slice::<IssueBody>(body);
        }
        1 => {
            let _ = serde_json::from_slice::<CreateBody>(body);
        }
        2 => {
            if let Ok(sign) = serde_json::from_slice::<SignBody>(body) {
                if let (Ok(algorithm), Ok(digest)) = (
                    DigestAlgorithm::parse(&sign.digest_algorithm),
                    base64::engine::general_purpose::STANDARD.decode(&sign.digest),
                ) {
                    let _ = algorithm.check(&digest);
                }
            }
        }
        _ => {
            let _ = serde_json::from_slice::<RevokeBody>(body);
        }
    }
});
