//! The blob footer (eStargz gzip footer, zstd:chunked skippable frame) and
//! the footer Shoal builds from its `shoal.toc.position` annotation.
//! Input: 8 bytes of blob size (little endian), then the blob's tail.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal::remote::toc::{parse_footer, Compression, Footer, MAX_TOC_COMPRESSED};

fuzz_target!(|data: &[u8]| {
    let Some((size, tail)) = data.split_first_chunk::<8>() else {
        return;
    };
    let blob_size = u64::from_le_bytes(*size);
    if let Ok(f) = parse_footer(tail, blob_size) {
        // What the caller relies on to slice the blob.
        let end = f
            .toc_offset
            .checked_add(f.toc_len)
            .expect("TOC end overflows");
        assert!(end <= blob_size, "TOC past the blob: {f:?}");
        assert!(f.toc_len <= MAX_TOC_COMPRESSED);
        assert!(f.payload_end <= f.toc_offset);
        if f.compression == Compression::Gzip {
            assert_eq!(end + 51, blob_size, "eStargz TOC must end at the footer");
        }
    }
    // The annotation's OFFSET:LENGTH, from the same bytes.
    let (off, len) = (blob_size, blob_size.rotate_left(32));
    if let Ok(f) = Footer::zstd_at(off, len) {
        assert!(f.payload_end < f.toc_offset);
    }
});
