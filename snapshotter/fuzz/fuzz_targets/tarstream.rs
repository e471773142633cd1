//! The streaming tar reader `shoal convert` copies layers with
//! (convert/tarstream.rs): headers, PAX and GNU records, content, padding.
//! Input: a tar stream.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal::convert::tarstream::{Item, TarStream};

fuzz_target!(|data: &[u8]| {
    let mut t = TarStream::new(data);
    let mut buf = [0u8; 4096];
    // Each entry consumes at least one 512-byte block, so this ends.
    loop {
        match t.next_item() {
            Ok(Item::Entry { raw, entry }) => {
                assert!(!raw.is_empty() && raw.len() % 512 == 0);
                // Names (and hardlink targets) are cleaned: never
                // absolute, no `..` or `.` components.
                let mut names = vec![&entry.name];
                if entry.typeflag == b'1' {
                    names.push(&entry.link);
                }
                for name in names {
                    assert!(!name.starts_with('/'), "{name:?}");
                    assert!(!name.split('/').any(|c| c == ".." || c == "."), "{name:?}");
                }
                loop {
                    match t.read_data(&mut buf) {
                        Ok(0) => break,
                        Ok(_) => {}
                        Err(_) => return,
                    }
                }
                if t.padding(entry.size).is_err() {
                    return;
                }
            }
            Ok(Item::End(_)) | Err(_) => return,
        }
    }
});
