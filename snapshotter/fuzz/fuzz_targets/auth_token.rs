//! A token endpoint's JSON answer (registry/auth.rs): the token and when it
//! expires. Input: the response body.
#![no_main]

use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use shoal::registry::auth::parse_token_response;

fuzz_target!(|data: &[u8]| {
    let now = Instant::now();
    if let Ok((token, expires)) = parse_token_response(data, now) {
        assert!(!token.is_empty());
        assert!(expires > now);
    }
});
