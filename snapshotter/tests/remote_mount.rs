//! Remote layers end to end inside one process: Prepare with the labels
//! containerd's unpacker sends, a real FUSE mount of a real eStargz layer,
//! reads through the kernel, verification failures surfacing as EIO, and
//! remounting after a restart without the network. The blob is served from
//! memory by a source that can lie or be unreachable (faults a real registry
//! cannot produce on demand); tests/e2e covers the real registry.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use sha2::{Digest as _, Sha256};
use shoal::error::Error;
use shoal::metadata::Kind;
use shoal::overlay::Snapshotter;

mod common;
use common::{labels, open_snapshotter, MemBlob};

fn fixture() -> (Vec<u8>, String) {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
    let p = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().and_then(|x| x.to_str()) == Some("esgz"))
        .unwrap();
    let digest = std::fs::read_to_string(p.with_extension("esgz.toc-digest")).unwrap();
    (std::fs::read(&p).unwrap(), digest.trim().to_owned())
}

/// Mounts the layer through Prepare and returns the directory it is served at.
fn prepare_remote(sn: &Snapshotter, toc: &str) -> PathBuf {
    let r = sn.create(Kind::Active, "extract-1", None, labels(toc, "chain-1"));
    assert!(
        matches!(r, Err(Error::AlreadyExists(_))),
        "remote Prepare must answer AlreadyExists: {r:?}"
    );
    let info = sn.stat("chain-1").unwrap();
    assert_eq!(info.kind, Kind::Committed);
    let m = sn
        .create(Kind::View, "view-1", Some("chain-1"), BTreeMap::new())
        .unwrap();
    assert_eq!(m[0].r#type, "bind");
    PathBuf::from(&m[0].source)
}

fn sha256_file(p: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(p)?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)?;
    Ok(format!("sha256:{}", hex::encode(Sha256::digest(&buf))))
}

#[test]
fn a_remote_layer_serves_verified_bytes_through_fuse_and_survives_a_restart_offline() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (bytes, toc) = fixture();
    let blob = MemBlob::new(bytes);
    let sn = open_snapshotter(dir.path(), blob.clone(), &rt);
    let layer = prepare_remote(&sn, &toc);

    // A second Prepare of the same layer (another namespace) needs no work.
    let before = blob.requests.load(Ordering::SeqCst);
    let r = sn.create(Kind::Active, "extract-2", None, labels(&toc, "chain-1"));
    assert!(matches!(r, Err(Error::AlreadyExists(_))));
    assert_eq!(blob.requests.load(Ordering::SeqCst), before);

    let big = layer.join("data/big.bin");
    assert_eq!(std::fs::metadata(&big).unwrap().len(), 200000);
    // Nothing fetched for file data yet: the mount is lazy (footer + TOC only).
    assert_eq!(blob.requests.load(Ordering::SeqCst), 2);
    let big_digest = sha256_file(&big).unwrap();
    assert_eq!(
        big_digest,
        "sha256:795baab0caa8e78c95f9eb55510726f9a1849133bcb04d0e1749d7c2b5138d42"
    );
    assert_eq!(
        std::fs::read(layer.join("data/hello.txt")).unwrap(),
        b"hello\n"
    );
    let a = std::fs::metadata(layer.join("data/hello.txt")).unwrap();
    let b = std::fs::metadata(layer.join("data/hardlink")).unwrap();
    assert_eq!(
        (a.ino(), a.nlink()),
        (b.ino(), 2),
        "hardlinks share an inode"
    );
    assert!(std::fs::metadata(layer.join("data/fifo"))
        .unwrap()
        .file_type()
        .is_fifo());
    assert_eq!(
        std::fs::metadata(layer.join("data")).unwrap().mode() & 0o7777,
        0o4755
    );
    assert_eq!(
        std::fs::read_link(layer.join("bin/sh")).unwrap(),
        Path::new("busybox")
    );
    assert_eq!(
        std::fs::metadata(layer.join("data/empty")).unwrap().len(),
        0
    );

    // Restart with the registry unreachable: the TOC is local, the chunks
    // read so far are in the store, so the layer still serves.
    sn.remove("view-1").unwrap();
    drop(sn);
    blob.offline.store(true, Ordering::SeqCst);
    let sn = open_snapshotter(dir.path(), blob.clone(), &rt);
    let m = sn
        .create(Kind::View, "view-2", Some("chain-1"), BTreeMap::new())
        .unwrap();
    let layer = PathBuf::from(&m[0].source);
    assert_eq!(
        sha256_file(&layer.join("data/big.bin")).unwrap(),
        big_digest
    );
    // A chunk never fetched cannot be read offline: an error, not wrong bytes.
    let err = std::fs::read(layer.join("bin/busybox")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    sn.remove("view-2").unwrap();
    sn.remove("chain-1").unwrap();
    assert!(!layer.join("data").exists(), "unmounted on remove");
}

#[test]
fn a_lying_source_gives_eio_never_wrong_bytes() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (bytes, toc) = fixture();
    let blob = MemBlob::new(bytes);
    let sn = open_snapshotter(dir.path(), blob.clone(), &rt);
    let layer = prepare_remote(&sn, &toc);
    blob.lie.store(true, Ordering::SeqCst);
    let err = std::fs::read(layer.join("data/big.bin")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    // Honest again: the same file now reads correctly (nothing bad was cached).
    blob.lie.store(false, Ordering::SeqCst);
    assert_eq!(
        sha256_file(&layer.join("data/big.bin")).unwrap(),
        "sha256:795baab0caa8e78c95f9eb55510726f9a1849133bcb04d0e1749d7c2b5138d42"
    );
}

#[test]
fn a_toc_that_does_not_match_its_annotation_falls_back_to_a_normal_pull() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (bytes, _) = fixture();
    let blob = MemBlob::new(bytes);
    let sn = open_snapshotter(dir.path(), blob, &rt);
    let wrong = format!("sha256:{}", "1".repeat(64));
    let m = sn
        .create(Kind::Active, "extract-1", None, labels(&wrong, "chain-1"))
        .unwrap();
    assert_eq!(
        m[0].r#type, "bind",
        "a normal active snapshot for containerd to unpack into"
    );
    assert!(sn.stat("chain-1").is_err());
}

/// The zstd:chunked fixture, its TOC digest, and its TOC's (offset, length)
/// from the footer.
fn zstd_fixture() -> (Vec<u8>, String, (u64, u64)) {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
    let p = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().and_then(|x| x.to_str()) == Some("zstd"))
        .unwrap();
    let digest = std::fs::read_to_string(p.with_extension("zstd.toc-digest")).unwrap();
    let bytes = std::fs::read(&p).unwrap();
    let n = bytes.len();
    let le = |r: std::ops::Range<usize>| u64::from_le_bytes(bytes[r].try_into().unwrap());
    let pos = (le(n - 40..n - 32), le(n - 32..n - 24));
    (bytes, digest.trim().to_owned(), pos)
}

#[test]
fn an_annotated_toc_position_saves_the_footer_read_and_a_wrong_one_falls_back() {
    use shoal::remote::annotations::LABEL_SHOAL_TOC_POSITION;
    let (bytes, toc, (offset, len)) = zstd_fixture();
    // (hint, Range requests the first mount makes)
    for (hint, requests) in [
        (format!("{offset}:{len}"), 1),       // the TOC, nothing else
        (format!("{}:{len}", offset + 1), 3), // a bad TOC there; footer; TOC
        (format!("{offset}:{}", len + 10), 3),
    ] {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let blob = MemBlob::new(bytes.clone());
        let sn = open_snapshotter(dir.path(), blob.clone(), &rt);
        let mut l = labels(&toc, "chain-1");
        l.insert(LABEL_SHOAL_TOC_POSITION.to_owned(), hint.clone());
        let r = sn.create(Kind::Active, "extract-1", None, l);
        assert!(matches!(r, Err(Error::AlreadyExists(_))), "{hint}: {r:?}");
        assert_eq!(blob.requests.load(Ordering::SeqCst), requests, "{hint}");
        let m = sn
            .create(Kind::View, "view-1", Some("chain-1"), BTreeMap::new())
            .unwrap();
        let layer = PathBuf::from(&m[0].source);
        assert_eq!(
            std::fs::read(layer.join("data/hello.txt")).unwrap(),
            b"hello\n",
            "{hint}"
        );
        sn.remove("view-1").unwrap();
        sn.remove("chain-1").unwrap();
    }
}

/// Regular files of the fixture's TOC, in blob order of their first chunk.
fn files_in_blob_order(bytes: &[u8], toc_digest: &str) -> Vec<String> {
    use shoal::remote::toc::{parse_footer, Toc, FOOTER_FETCH};
    let size = bytes.len() as u64;
    let footer = parse_footer(&bytes[(size - FOOTER_FETCH) as usize..], size).unwrap();
    let toc = Toc::parse(
        &bytes[footer.toc_offset as usize..(footer.toc_offset + footer.toc_len) as usize],
        &footer,
        toc_digest,
    )
    .unwrap();
    let mut files: Vec<(u64, String)> = toc
        .entries
        .iter()
        .zip(&toc.files)
        .filter_map(|(e, cs)| Some((cs.first()?.blob_offset, e.name.clone())))
        .collect();
    files.sort();
    files.into_iter().map(|(_, n)| n).collect()
}

#[test]
fn a_fetching_read_takes_the_following_chunks_along_in_the_same_request() {
    use common::{open_snapshotter_config, test_config, MemBlobs};
    let (bytes, toc) = fixture();
    let files = files_in_blob_order(&bytes, &toc);
    assert!(files.len() >= 3, "{files:?}");
    // (fetch-ahead bytes, Range requests after reading every file in blob
    // order: footer + TOC, then one per fetching read)
    let mut counts = Vec::new();
    for ahead in [0u64, 1 << 20] {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let blob = MemBlob::new(bytes.clone());
        let mut cfg = test_config();
        cfg.fetch_ahead_bytes = ahead;
        let sn = open_snapshotter_config(
            dir.path(),
            std::sync::Arc::new(MemBlobs(blob.clone())),
            &rt,
            64 << 20,
            std::sync::Arc::new(shoal::remote::clock::SystemClock),
            cfg,
        );
        let layer = prepare_remote(&sn, &toc);
        assert_eq!(blob.requests.load(Ordering::SeqCst), 2);
        for f in &files {
            std::fs::read(layer.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        }
        assert_eq!(
            sha256_file(&layer.join("data/big.bin")).unwrap(),
            "sha256:795baab0caa8e78c95f9eb55510726f9a1849133bcb04d0e1749d7c2b5138d42"
        );
        counts.push(blob.requests.load(Ordering::SeqCst));
        sn.remove("view-1").unwrap();
        sn.remove("chain-1").unwrap();
    }
    // The whole payload is under 1 MiB and contiguous: the first read takes
    // everything after it along.
    assert_eq!(counts[1], 3, "with fetch-ahead: {counts:?}");
    assert!(counts[0] > counts[1] + 1, "without fetch-ahead: {counts:?}");
}

#[test]
fn a_bad_kept_toc_is_removed_and_the_layer_mounted_again_once_serving() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (bytes, toc) = fixture();
    let blob = MemBlob::new(bytes);
    let sn = open_snapshotter(dir.path(), blob.clone(), &rt);
    let layer = prepare_remote(&sn, &toc);
    let hello = std::fs::read(layer.join("data/hello.txt")).unwrap();
    sn.remove("view-1").unwrap();
    drop(sn);

    // A torn or corrupted copy, and the registry down.
    let toc_file = std::fs::read_dir(dir.path().join("tocs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().and_then(|x| x.to_str()) == Some("toc"))
        .unwrap();
    let good = std::fs::read(&toc_file).unwrap();
    let mut bad = good.clone();
    bad[good.len() / 2] ^= 0xff;
    std::fs::write(&toc_file, &bad).unwrap();
    blob.offline.store(true, Ordering::SeqCst);

    // Opening needs no network: the layer waits, its bad copy is gone, and
    // using it is an error at once (no empty layer, no hang).
    let sn = std::sync::Arc::new(open_snapshotter(dir.path(), blob.clone(), &rt));
    assert_eq!(sn.waiting_remounts(), 1);
    assert!(!toc_file.exists(), "the bad copy was kept");
    assert_eq!(sn.stat("chain-1").unwrap().kind, Kind::Committed);
    // (The view of a single layer is a bind mount of the layer's own path.)
    let err = std::fs::read(layer.join("data/hello.txt")).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::NotFound, "{err}");
    let r = sn.create(Kind::View, "view-2", Some("chain-1"), BTreeMap::new());
    assert!(r.is_err(), "a view of a layer not back yet: {r:?}");

    // Once serving, with the registry back: fetched, kept again, mounted.
    blob.offline.store(false, Ordering::SeqCst);
    sn.remount_waiting()
        .expect("a remount thread")
        .join()
        .unwrap();
    assert_eq!(sn.waiting_remounts(), 0);
    let m = sn
        .create(Kind::View, "view-2", Some("chain-1"), BTreeMap::new())
        .unwrap();
    assert_eq!(PathBuf::from(&m[0].source), layer);
    assert_eq!(std::fs::read(layer.join("data/hello.txt")).unwrap(), hello);
    assert_eq!(std::fs::read(&toc_file).unwrap(), good, "TOC kept again");
    sn.remove("view-2").unwrap();
    sn.remove("chain-1").unwrap();
}
