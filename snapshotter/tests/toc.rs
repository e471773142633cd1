//! TOC parsing and chunk verification against real eStargz and zstd:chunked
//! blobs written by `ctr-remote` (see tests/fixtures/README.md).

use sha2::{Digest as _, Sha256};
use shoal::remote::fetch::decode_chunk;
use shoal::remote::toc::{parse_footer, Compression, Toc, TocError, FOOTER_FETCH};

fn fixture(ext: &str) -> (Vec<u8>, String) {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().and_then(|x| x.to_str()) == Some(ext) {
            let blob = std::fs::read(&p).unwrap();
            // Fixtures are named by their digest.
            let name = p.file_stem().unwrap().to_str().unwrap().to_owned();
            assert_eq!(hex::encode(Sha256::digest(&blob)), name);
            let digest =
                std::fs::read_to_string(p.with_extension(format!("{ext}.toc-digest"))).unwrap();
            return (blob, digest.trim().to_owned());
        }
    }
    panic!("no *.{ext} fixture");
}

fn open(blob: &[u8], toc_digest: &str) -> Result<Toc, TocError> {
    let size = blob.len() as u64;
    let footer = parse_footer(&blob[(size - FOOTER_FETCH) as usize..], size)?;
    let toc = &blob[footer.toc_offset as usize..(footer.toc_offset + footer.toc_len) as usize];
    Toc::parse(toc, &footer, toc_digest)
}

#[test]
fn both_formats_parse_and_every_file_reassembles_to_its_digest() {
    for (ext, compression) in [("esgz", Compression::Gzip), ("zstd", Compression::Zstd)] {
        let (blob, digest) = fixture(ext);
        let toc = open(&blob, &digest).unwrap();
        assert_eq!(toc.compression, compression);
        assert_eq!(toc.prefetch_end, Some(0), "{ext}: .no.prefetch.landmark");
        let mut regular = 0;
        for (e, chunks) in toc.entries.iter().zip(&toc.files) {
            if e.kind != "reg" {
                assert!(chunks.is_empty());
                continue;
            }
            regular += 1;
            let mut whole = Vec::new();
            for c in chunks {
                let data = decode_chunk(
                    compression,
                    &blob[c.blob_offset as usize..c.blob_end as usize],
                    c,
                )
                .unwrap_or_else(|err| panic!("{ext} {}: {err}", e.name));
                whole.extend_from_slice(&data);
            }
            assert_eq!(whole.len() as u64, e.size, "{}", e.name);
            // The whole-file digest in the TOC is an independent check that
            // the chunks were found, cut and ordered right.
            let file_digest = format!("sha256:{}", hex::encode(Sha256::digest(&whole)));
            assert_eq!(file_digest, e.digest, "{ext} {}", e.name);
            if e.name == "data/big.bin" {
                assert_eq!(chunks.len(), 4, "{ext}: 200000 bytes in 64 KiB chunks");
            }
        }
        assert!(regular >= 5, "{ext}: {regular} regular files");
    }
}

#[test]
fn a_toc_that_does_not_match_the_manifest_digest_is_refused() {
    let (blob, _) = fixture("esgz");
    let wrong = format!("sha256:{}", "0".repeat(64));
    match open(&blob, &wrong) {
        Err(TocError::DigestMismatch { expected, .. }) => assert_eq!(expected, wrong),
        other => panic!("expected a digest mismatch, got {other:?}"),
    }
}

#[test]
fn a_corrupted_chunk_fails_verification() {
    for ext in ["esgz", "zstd"] {
        let (mut blob, digest) = fixture(ext);
        let toc = open(&blob, &digest).unwrap();
        let (i, _) = toc
            .entries
            .iter()
            .enumerate()
            .find(|(_, e)| e.name == "data/big.bin")
            .unwrap();
        let c = toc.files[i][1];
        // Flip a byte in the middle of the compressed chunk.
        let mid = ((c.blob_offset + c.blob_end) / 2) as usize;
        blob[mid] ^= 0x55;
        let r = decode_chunk(
            toc.compression,
            &blob[c.blob_offset as usize..c.blob_end as usize],
            &c,
        );
        assert!(r.is_err(), "{ext}: corrupted chunk must not verify");
        // A chunk whose digest the TOC states differently fails too.
        let mut lying = toc.files[i][0];
        lying.digest[0] ^= 1;
        let r = decode_chunk(
            toc.compression,
            &blob[lying.blob_offset as usize..lying.blob_end as usize],
            &lying,
        );
        assert!(r.unwrap_err().contains("sha256"), "{ext}");
    }
}

#[test]
fn a_blob_without_a_footer_is_not_lazily_mountable() {
    let junk = vec![0u8; 4096];
    assert!(matches!(
        parse_footer(&junk[4096 - 51..], 4096),
        Err(TocError::Footer(_))
    ));
    let (blob, _) = fixture("esgz");
    // A footer pointing past the end of a truncated blob.
    let tail = &blob[blob.len() - 51..];
    assert!(parse_footer(tail, 100).is_err());
}
