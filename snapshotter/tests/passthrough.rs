//! Kernel passthrough for large, all-local files, with real FUSE mounts and
//! a real store: which files get it, that their reads bypass the daemon,
//! that GC never takes a backing file from a mounted layer, that a rotted
//! object is caught before the kernel sees it, and that an inode's mode
//! holds across a daemon restart. The blob is served from memory
//! (tests/common::MemBlob).

use std::collections::BTreeMap;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use shoal::error::Error;
use shoal::metadata::Kind;
use shoal::overlay::Snapshotter;
use shoal::remote::clock::ManualClock;
use shoal::remote::gc::CacheConfig;

mod common;
use common::estargz::{Entry, Format, Layer};
use common::{labels, noise, open_snapshotter_with, MemBlob};

const CHUNK: usize = 256 << 10;

/// Two large files (several chunks, over the passthrough threshold) and a
/// small one.
fn files() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("big1", noise(3 * (1 << 20) + 123, 1)),
        ("big2", noise(3 * (1 << 19), 2)),
        ("small", noise(10_000, 3)),
    ]
}

/// The layer of [`files`] as an eStargz blob in memory, and its TOC digest.
fn blob() -> (Arc<MemBlob>, String) {
    let entries: Vec<Entry> = files()
        .into_iter()
        .map(|(n, d)| Entry::file(n, d))
        .collect();
    let (blob, toc) = Layer::new(Format::Estargz, CHUNK, &entries).blob();
    (MemBlob::new(blob), toc)
}

/// A snapshotter at `dir` (no memory cache: FUSE reads come from the disk
/// store) with the layer mounted, fetched and laid out: it and the mount.
fn laid_out(
    dir: &Path,
    blob: &Arc<MemBlob>,
    toc: &str,
    rt: &tokio::runtime::Runtime,
    clock: Arc<ManualClock>,
) -> (Snapshotter, PathBuf) {
    let sn = open_snapshotter_with(dir, blob.clone(), rt, 0, clock);
    let root = prepare(&sn, toc);
    let remote = sn.remote().unwrap();
    let id = remote.status()[0].id;
    rt.block_on(remote.fetch_and_lay_out(id)).unwrap();
    (sn, root)
}

fn prepare(sn: &Snapshotter, toc: &str) -> PathBuf {
    let r = sn.create(Kind::Active, "extract", None, labels(toc, "chain"));
    assert!(matches!(r, Err(Error::AlreadyExists(_))), "{r:?}");
    let m = sn
        .create(Kind::View, "view", Some("chain"), BTreeMap::new())
        .unwrap();
    PathBuf::from(&m[0].source)
}

/// Reads `p` from its start, without this file's clean pages in the page
/// cache (for a passthrough file: without the backing file's).
fn read_uncached(p: &Path) -> Vec<u8> {
    let mut f = std::fs::File::open(p).unwrap();
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    let mut out = Vec::new();
    f.read_to_end(&mut out).unwrap();
    out
}

/// The mount's I/O mode log: (passthrough inodes, cached inodes).
fn modes(mountpoint: &Path) -> (usize, usize) {
    let log = std::fs::read_to_string(mountpoint.parent().unwrap().join("iomodes")).unwrap();
    let p = log.lines().filter(|l| l.starts_with("P ")).count();
    let c = log.lines().filter(|l| l.starts_with("C ")).count();
    (p, c)
}

#[test]
fn large_local_files_bypass_the_daemon_and_keep_their_backing_files_while_mounted() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let files = files();
    let (blob, toc) = blob();
    let clock = Arc::new(ManualClock::new(1_000_000));
    let (sn, root) = laid_out(dir.path(), &blob, &toc, &rt, clock);
    let remote = sn.remote().unwrap();
    let store = remote.fetcher().store().clone();
    let objects_dir = dir.path().join("chunks/files");
    let object_files = || {
        std::fs::read_dir(&objects_dir)
            .unwrap()
            .flatten()
            .flat_map(|d| std::fs::read_dir(d.path()).unwrap().flatten())
            .filter(|f| f.path().extension().is_none())
            .count()
    };
    assert_eq!(
        object_files(),
        2,
        "one object per large file, none for small"
    );

    // big1: passthrough; its bytes never pass through the daemon.
    let served = |s: &shoal::remote::fetch::FetchStats| {
        s.served_from_cache.load(Ordering::Relaxed) + s.served_after_fetch.load(Ordering::Relaxed)
    };
    let before = served(&remote.fetcher().stats);
    assert_eq!(read_uncached(&root.join("big1")), files[0].1);
    assert_eq!(read_uncached(&root.join("big1")), files[0].1);
    assert_eq!(
        served(&remote.fetcher().stats),
        before,
        "a passthrough file was read through the daemon"
    );
    assert_eq!(modes(&root), (1, 0));
    // small: through the daemon and the page cache.
    assert_eq!(read_uncached(&root.join("small")), files[2].1);
    assert_eq!(
        served(&remote.fetcher().stats) - before,
        files[2].1.len() as u64
    );
    assert_eq!(modes(&root), (1, 1));

    // GC at a tiny limit: big1's object backs an open-able inode of a
    // mounted layer and stays; big2's (never opened) goes.
    let cache = remote.cache().clone();
    cache.configure(CacheConfig {
        limits: CacheConfig::limits(1000, 50, 0),
        ttl_secs: 3600,
        interval: Duration::from_secs(3600),
        unfetchable_max_bytes: u64::MAX,
    });
    let r = rt.block_on(cache.gc(false, "test"));
    assert!(r.skipped_busy > 0, "{r:?}");
    assert_eq!(object_files(), 1, "{r:?}");
    assert_eq!(read_uncached(&root.join("big1")), files[0].1);
    // big2 is fetched again and served through the daemon, correctly.
    let requests = blob.requests.load(Ordering::SeqCst);
    assert_eq!(read_uncached(&root.join("big2")), files[1].1);
    assert!(blob.requests.load(Ordering::SeqCst) > requests);
    assert_eq!(modes(&root), (1, 2));
    assert_eq!(store.stats.corrupt_on_disk.load(Ordering::Relaxed), 0);
}

#[test]
fn a_rotted_object_is_dropped_before_the_kernel_reads_it() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let files = files();
    let (blob, toc) = blob();
    let clock = Arc::new(ManualClock::new(1_000_000));
    // Dropping the snapshotter unmounts.
    drop(laid_out(dir.path(), &blob, &toc, &rt, clock.clone()));
    // Flip one byte of every object on disk while no daemon runs.
    for d in std::fs::read_dir(dir.path().join("chunks/files"))
        .unwrap()
        .flatten()
    {
        for f in std::fs::read_dir(d.path()).unwrap().flatten() {
            if f.path().extension().is_none() {
                let mut b = std::fs::read(f.path()).unwrap();
                b[777_777] ^= 0x40;
                std::fs::write(f.path(), b).unwrap();
            }
        }
    }
    let sn = open_snapshotter_with(dir.path(), blob.clone(), &rt, 0, clock);
    let root = PathBuf::from(
        &sn.create(Kind::View, "view2", Some("chain"), BTreeMap::new())
            .unwrap()[0]
            .source,
    );
    let store = sn.remote().unwrap().fetcher().store().clone();
    assert_eq!(read_uncached(&root.join("big1")), files[0].1);
    assert_eq!(read_uncached(&root.join("big2")), files[1].1);
    assert_eq!(store.stats.corrupt_on_disk.load(Ordering::Relaxed), 2);
    assert_eq!(modes(&root).0, 0, "no rotted object may back an inode");
}

/// The first check of an object after a restart runs off the FUSE workers:
/// while the checks of two large files are stuck (their objects are FIFOs
/// that nobody writes, so opening them blocks), as many as the mount has
/// workers, the mount still serves a third file. Once the objects are back,
/// the stuck opens complete with the right bytes.
#[test]
fn stuck_first_checks_of_objects_leave_the_fuse_workers_free() {
    use std::sync::mpsc::channel;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let files = files();
    let (blob, toc) = blob();
    let clock = Arc::new(ManualClock::new(1_000_000));
    drop(laid_out(dir.path(), &blob, &toc, &rt, clock.clone()));
    // A fresh process: its objects are not checked yet.
    let sn = open_snapshotter_with(dir.path(), blob.clone(), &rt, 0, clock);
    let root = PathBuf::from(
        &sn.create(Kind::View, "view2", Some("chain"), BTreeMap::new())
            .unwrap()[0]
            .source,
    );
    // Each object moves aside, and a FIFO takes its name.
    let aside = dir.path().join("aside");
    std::fs::create_dir(&aside).unwrap();
    let mut objects = Vec::new();
    for d in std::fs::read_dir(dir.path().join("chunks/files"))
        .unwrap()
        .flatten()
    {
        for f in std::fs::read_dir(d.path()).unwrap().flatten() {
            if f.path().extension().is_none() {
                objects.push(f.path());
            }
        }
    }
    assert_eq!(objects.len(), 2);
    for (i, o) in objects.iter().enumerate() {
        let fifo = aside.join(format!("{i}.fifo"));
        std::fs::rename(o, aside.join(format!("{i}.real"))).unwrap();
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        std::fs::hard_link(&fifo, o).unwrap();
    }
    let big: Vec<_> = ["big1", "big2"]
        .into_iter()
        .map(|name| {
            let p = root.join(name);
            std::thread::spawn(move || read_uncached(&p))
        })
        .collect();
    // Both opens reach their (stuck) checks.
    std::thread::sleep(Duration::from_millis(500));
    let (tx, rx) = channel();
    let small = root.join("small");
    std::thread::spawn(move || tx.send(read_uncached(&small)));
    let got = rx.recv_timeout(Duration::from_secs(10));
    // Put the objects back, then let the stuck checks go on.
    for (i, o) in objects.iter().enumerate() {
        std::fs::rename(aside.join(format!("{i}.real")), o).unwrap();
        drop(
            std::fs::OpenOptions::new()
                .write(true)
                .open(aside.join(format!("{i}.fifo")))
                .unwrap(),
        );
    }
    assert_eq!(
        got.expect("the mount stalled while objects were being checked"),
        files[2].1
    );
    for (t, f) in big.into_iter().zip(&files) {
        assert_eq!(t.join().unwrap(), f.1);
    }
}
