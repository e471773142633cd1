//! `WWW-Authenticate` challenges from a registry's 401 and the credential
//! host names of Docker's config.json (registry/auth.rs).
//! Input: the header value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal::registry::auth::{normalize_host, parse_www_authenticate};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for c in parse_www_authenticate(text) {
        assert!(!c.scheme.is_empty());
    }
    let _ = normalize_host(text);
});
