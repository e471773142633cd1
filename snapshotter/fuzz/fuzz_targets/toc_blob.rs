//! The compressed TOC as it lies in a blob: gzip + tar (eStargz) or a zstd
//! frame (zstd:chunked), through `Toc::parse`. The first parse learns the
//! real digest from the mismatch error; the second passes it, so inputs
//! that decompress also reach the JSON and the chunk table.
//! Input: 1 byte (bit 0: 0 = zstd:chunked, 1 = eStargz), then the TOC bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal::remote::toc::{Compression, Footer, Toc, TocError};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, compressed)) = data.split_first() else {
        return;
    };
    let compression = if mode & 1 == 0 {
        Compression::Zstd
    } else {
        Compression::Gzip
    };
    let footer = Footer {
        compression,
        payload_end: 1 << 40,
        toc_offset: 1 << 40,
        toc_len: compressed.len() as u64,
    };
    if let Err(TocError::DigestMismatch { actual, .. }) = Toc::parse(compressed, &footer, "") {
        let _ = Toc::parse(compressed, &footer, &actual);
    }
});
