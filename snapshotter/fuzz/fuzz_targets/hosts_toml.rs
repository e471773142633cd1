//! containerd's `hosts.toml` (registry/hosts.rs): mirrors, capabilities,
//! CA and client certificate paths, headers, and the loopback test on
//! the hosts it names. Input: the file.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use shoal::registry::hosts::{is_localhost, parse_hosts_file};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(hosts) = parse_hosts_file(Path::new("/etc/containerd/certs.d/reg"), text) {
        // The server entry always comes last.
        assert!(!hosts.is_empty());
        for h in hosts {
            let _ = is_localhost(&h.host);
        }
    }
});
