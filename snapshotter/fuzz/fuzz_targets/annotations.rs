//! Snapshot labels an image controls: Shoal's annotation hints and the
//! remote-layer detection that reads them (remote/annotations.rs,
//! remote/layers.rs). Input: `key=value` lines.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use shoal::remote::{annotations, layers};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let labels: BTreeMap<String, String> = text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let h = annotations::hints(&labels);
    if let Some((off, len)) = h.toc {
        assert!(len > 0 && off >= 8 && off.checked_add(len).is_some());
    }
    let _ = annotations::shoal_source(&labels);
    // The default policy (any host, anonymously) is the widest one.
    let _ = layers::detect(&labels, &Default::default());
});
