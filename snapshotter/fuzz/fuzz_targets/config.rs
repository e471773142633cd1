//! Shoal's config file (config.rs): parse, then validate, as
//! `Config::load` does. Input: the file.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(c) = Config::parse(text) {
        let _ = c.validate();
    }
});
