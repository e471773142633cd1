//! A hostile TOC that names another layer's chunk with another length.
//!
//! Chunks are stored by their sha256 digest, shared across layers. A layer B
//! whose TOC gives one of its files the chunk digest of a file of layer A,
//! but B's own (longer) length, finds A's chunk in the store on the first
//! read, without fetching anything. That read must fail with EIO and count a
//! verification failure; it must never slice the stored buffer with B's
//! length (a panic on a FUSE worker, answered EIO only by the worker's
//! `catch_unwind`, and counted nowhere an operator looks), and both mounts
//! must keep serving afterwards.
//!
//! Real parts throughout: blobs from `common::estargz` (valid compression,
//! only B's TOC lies, and its digest is the annotated one so it verifies),
//! the snapshotter's Prepare, a real FUSE mount, reads through the kernel.

mod common;

use std::collections::BTreeMap;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use common::estargz::{sha256, Entry, Format, Layer, DEFAULT_CHUNK};
use common::{labels_for, noise, open_snapshotter_blobs, MemBlob, MemBlobsByDigest};
use serde_json::json;
use shoal::error::Error;
use shoal::metadata::Kind;
use shoal::overlay::Snapshotter;
use shoal::remote::clock::SystemClock;

/// How long a read may take before the test calls it a hang.
const READ_BOUND: Duration = Duration::from_secs(10);

/// Mounts the layer of `labels` as `chain-{n}` through Prepare and returns
/// the directory it is served at.
fn prepare(sn: &Snapshotter, n: u32, labels: BTreeMap<String, String>) -> PathBuf {
    let r = sn.create(Kind::Active, &format!("extract-{n}"), None, labels);
    assert!(
        matches!(r, Err(Error::AlreadyExists(_))),
        "remote Prepare: {r:?}"
    );
    let m = sn
        .create(
            Kind::View,
            &format!("view-{n}"),
            Some(&format!("chain-{n}")),
            BTreeMap::new(),
        )
        .unwrap();
    PathBuf::from(&m[0].source)
}

/// Reads `p` through FUSE, not the page cache, on another thread; `None`
/// if it takes longer than [`READ_BOUND`] (a hung FUSE request).
fn read_bounded(p: &Path) -> Option<std::io::Result<Vec<u8>>> {
    let (tx, rx) = mpsc::channel();
    let p = p.to_owned();
    std::thread::spawn(move || {
        let r = std::fs::File::open(&p).and_then(|mut f| {
            // FOPEN_KEEP_CACHE keeps pages across opens; drop them first.
            unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
            let mut out = Vec::new();
            f.read_to_end(&mut out).map(|_| out)
        });
        let _ = tx.send(r);
    });
    rx.recv_timeout(READ_BOUND).ok()
}

fn read_ok(p: &Path) -> Vec<u8> {
    read_bounded(p)
        .unwrap_or_else(|| panic!("{}: read hung past {READ_BOUND:?}", p.display()))
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn a_toc_naming_a_stored_chunk_with_another_length_gives_eio_and_the_mounts_keep_serving() {
    // Layer A, honest: `a/one` is one chunk of M bytes, digest D.
    let one = noise(1000, 1);
    let two = noise(3000, 2);
    let a = Layer::new(
        Format::Estargz,
        DEFAULT_CHUNK,
        &[
            Entry::dir("a/"),
            Entry::file("a/one", one.clone()),
            Entry::file("a/two", two.clone()),
        ],
    );
    let (blob_a, toc_a) = a.blob();
    let d = sha256(&one);

    // Layer B: `b/f` is one chunk of N > M bytes whose TOC digest is D; its
    // size (and so the chunk table) stays N, and B's TOC digest is that of
    // the edited TOC, so the TOC verifies and the layer mounts.
    let f = noise(5000, 3);
    let g = noise(2000, 4);
    let mut b = Layer::new(
        Format::Estargz,
        DEFAULT_CHUNK,
        &[
            Entry::dir("b/"),
            Entry::file("b/f", f.clone()),
            Entry::file("b/g", g.clone()),
        ],
    );
    let e = b.entry_mut("b/f");
    assert_eq!(e["size"], json!(f.len()));
    assert!(e.get("chunkSize").is_none(), "one chunk: {e:?}");
    e.insert("chunkDigest".into(), json!(d));
    let (blob_b, toc_b) = b.blob();

    let layer_a = format!("sha256:{}", "a".repeat(64));
    let layer_b = format!("sha256:{}", "b".repeat(64));
    let (src_a, src_b) = (MemBlob::new(blob_a), MemBlob::new(blob_b));
    let blobs = Arc::new(MemBlobsByDigest(
        [
            (layer_a.clone(), src_a.clone()),
            (layer_b.clone(), src_b.clone()),
        ]
        .into(),
    ));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sn = open_snapshotter_blobs(dir.path(), blobs, &rt, 64 << 20, Arc::new(SystemClock));
    let remote = sn.remote().unwrap();
    let fetcher = remote.fetcher().clone();
    let digest_d: [u8; 32] = hex::decode(&d["sha256:".len()..])
        .unwrap()
        .try_into()
        .unwrap();

    // 1. Read A's file: its chunk D (M bytes) is now in the store.
    let root_a = prepare(
        &sn,
        1,
        labels_for(&toc_a, "chain-1", "127.0.0.1:5000/a:t", &layer_a),
    );
    assert_eq!(read_ok(&root_a.join("a/one")), one);
    assert!(fetcher.store().contains(&digest_d), "A's chunk is stored");
    assert_eq!(fetcher.store().get(&digest_d).unwrap().len(), one.len());

    // 2. Mount B and read `b/f`: a store hit of M bytes for N wanted.
    let root_b = prepare(
        &sn,
        2,
        labels_for(&toc_b, "chain-2", "127.0.0.1:5000/b:t", &layer_b),
    );
    assert_eq!(
        std::fs::metadata(root_b.join("b/f")).unwrap().len(),
        f.len() as u64
    );
    let failures = fetcher.stats.verify_failures.load(Ordering::Relaxed);
    let b_requests = src_b.requests.load(Ordering::SeqCst);
    let err = read_bounded(&root_b.join("b/f"))
        .expect("the read of b/f hung: its FUSE request was never answered")
        .expect_err("b/f must not read: its chunk is A's, with another length");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    // The kernel may retry a failed read (readahead, then the page itself):
    // every FUSE read that failed is counted, as a verification failure and
    // as a read error of B.
    let counted = fetcher.stats.verify_failures.load(Ordering::Relaxed) - failures;
    assert!(
        counted >= 1,
        "the length mismatch is counted as a verification failure"
    );
    assert_eq!(
        src_b.requests.load(Ordering::SeqCst),
        b_requests,
        "the failing read was a store hit: nothing fetched"
    );
    let status_b = remote
        .status()
        .into_iter()
        .find(|s| s.name == "chain-2")
        .expect("B is mounted");
    assert_eq!(status_b.read_errors, counted, "{status_b:?}");

    // 3. Both mounts keep serving: B's other file and A's files, one of
    // them never read before (fetched on demand now), the other from the
    // store with A's own, matching, length.
    assert_eq!(read_ok(&root_b.join("b/g")), g);
    assert_eq!(read_ok(&root_a.join("a/two")), two);
    assert_eq!(read_ok(&root_a.join("a/one")), one);
    // And the lie still fails the same way, every time.
    let err = read_bounded(&root_b.join("b/f"))
        .expect("the second read of b/f hung")
        .expect_err("b/f must not read");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");

    for n in [1, 2] {
        sn.remove(&format!("view-{n}")).unwrap();
        sn.remove(&format!("chain-{n}")).unwrap();
    }
    assert!(!root_b.join("b").exists(), "unmounted on remove");
}
