//! The TOC JSON and the chunk table built from it (`Toc::parse`), in both
//! formats: the harness compresses the JSON the way each format stores it
//! and passes its real digest, so inputs get past the digest check.
//! Input: 1 byte (bit 0: 0 = zstd:chunked, 1 = eStargz), 8 bytes of
//! payload end (little endian), then the JSON.
#![no_main]

use std::io::Write as _;

use libfuzzer_sys::fuzz_target;
use sha2::{Digest as _, Sha256};
use shoal::remote::toc::{self, Compression, Footer, Toc, MAX_CHUNK, TOC_TAR_NAME};

fn compress(c: Compression, json: &[u8]) -> Vec<u8> {
    match c {
        Compression::Zstd => zstd::encode_all(json, 1).unwrap(),
        Compression::Gzip => {
            let mut h = tar::Header::new_ustar();
            h.set_path(TOC_TAR_NAME).unwrap();
            h.set_size(json.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            let mut b = tar::Builder::new(Vec::new());
            b.append(&h, json).unwrap();
            let tar = b.into_inner().unwrap();
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(&tar).unwrap();
            gz.finish().unwrap()
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let Some((end, json)) = rest.split_first_chunk::<8>() else {
        return;
    };
    let compression = if mode & 1 == 0 {
        Compression::Zstd
    } else {
        Compression::Gzip
    };
    let payload_end = u64::from_le_bytes(*end) >> (mode >> 2);
    let compressed = compress(compression, json);
    let footer = Footer {
        compression,
        payload_end,
        toc_offset: payload_end,
        toc_len: compressed.len() as u64,
    };
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(json)));
    let Ok(t) = Toc::parse(&compressed, &footer, &digest) else {
        return;
    };
    // The invariants the chunk table promises its readers (toc.rs docs).
    assert_eq!(t.entries.len(), t.files.len());
    for (e, chunks) in t.entries.iter().zip(&t.files) {
        let _ = toc::mtime(e);
        let _ = toc::xattrs(e);
        if e.kind != "reg" {
            assert!(chunks.is_empty(), "{} has chunks", e.name);
            continue;
        }
        let mut at = 0u64;
        for c in chunks {
            assert_eq!(c.file_offset, at, "{}: gap or overlap", e.name);
            assert!(c.len <= MAX_CHUNK);
            assert!(c.blob_offset < c.blob_end && c.blob_end <= payload_end);
            at += c.len;
        }
        assert_eq!(at, e.size, "{}: chunks do not cover the file", e.name);
    }
});
