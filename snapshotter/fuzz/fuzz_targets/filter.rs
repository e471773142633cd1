//! containerd's filter language (filter.rs): parsing, and matching the
//! parsed filter against a made-up object. Input: one filter per line.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal::filter::Filter;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let exprs: Vec<&str> = text.split('\n').collect();
    match Filter::parse_all(&exprs) {
        Ok(f) => {
            let _ = f.matches(|path| match path.first().map(String::as_str) {
                Some("kind") => Some("committed".into()),
                Some("labels") => path.get(1).map(|k| format!("v-{k}")),
                Some("name") => Some(text.to_string()),
                _ => None,
            });
        }
        Err(e) => {
            // The error message marks a position in the input; render it.
            let _ = e.to_string();
        }
    }
});
