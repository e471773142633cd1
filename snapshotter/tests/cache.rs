//! The chunk cache with real FUSE mounts: GC while readers hammer a mounted
//! layer, pins (of mounted layers, and of layers unmounted and removed), the
//! unreferenced TTL under an injected clock, the kept TOCs' GC, layers whose
//! registry is unreachable or silent, and what survives a restart. The blob is served
//! from memory (tests/common::MemBlob) so the source can be taken offline on
//! demand; tests/e2e/cache.sh covers a real registry and containerd.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shoal::error::Error;
use shoal::metadata::Kind;
use shoal::overlay::Snapshotter;
use shoal::remote::clock::ManualClock;
use shoal::remote::gc::CacheConfig;

mod common;
use common::estargz::{Entry, Format, Layer};
use common::{labels, labels_for, noise, open_snapshotter_blobs, open_snapshotter_with, MemBlob};

const IMAGE: &str = "127.0.0.1:5000/hostile:t";
const FILES: usize = 24;
const FILE_BYTES: usize = 96 << 10;
const CHUNK: usize = 16 << 10;

/// File names and contents.
type Files = Vec<(String, Vec<u8>)>;

/// A layer of FILES files of FILE_BYTES distinct bytes, CHUNK-sized chunks:
/// blob, TOC digest, files.
fn layer(seed: u64) -> (Vec<u8>, String, Files) {
    let files: Files = (0..FILES)
        .map(|i| {
            (
                format!("f{i:02}"),
                noise(FILE_BYTES, seed * 1000 + i as u64),
            )
        })
        .collect();
    let entries: Vec<Entry> = files
        .iter()
        .map(|(n, d)| Entry::file(n, d.clone()))
        .collect();
    let (blob, toc) = Layer::new(Format::Estargz, CHUNK, &entries).blob();
    (blob, toc, files)
}

fn prepare(sn: &Snapshotter, toc: &str, n: u32) -> PathBuf {
    prepare_labelled(sn, n, labels(toc, &format!("chain-{n}")))
}

/// Mounts a layer as committed snapshot `chain-N` and a view `view-N` of it.
fn prepare_labelled(sn: &Snapshotter, n: u32, labels: BTreeMap<String, String>) -> PathBuf {
    let chain = format!("chain-{n}");
    let r = sn.create(Kind::Active, &format!("extract-{n}"), None, labels);
    assert!(matches!(r, Err(Error::AlreadyExists(_))), "{r:?}");
    let m = sn
        .create(
            Kind::View,
            &format!("view-{n}"),
            Some(&chain),
            BTreeMap::new(),
        )
        .unwrap();
    PathBuf::from(&m[0].source)
}

/// Reads `p` through FUSE, not the page cache (FOPEN_KEEP_CACHE keeps pages
/// across opens; DONTNEED drops this file's clean pages first).
fn read_uncached(p: &Path) -> std::io::Result<Vec<u8>> {
    let mut f = std::fs::File::open(p)?;
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    let mut out = Vec::new();
    f.read_to_end(&mut out)?;
    Ok(out)
}

fn cfg(max_bytes: u64, high: u8, low: u8, ttl: u64) -> CacheConfig {
    CacheConfig {
        limits: CacheConfig::limits(max_bytes, high, low),
        ttl_secs: ttl,
        interval: Duration::from_secs(3600),
        unfetchable_max_bytes: u64::MAX,
    }
}

#[test]
fn gc_with_a_tiny_max_bytes_under_hammering_readers_never_gives_wrong_data_or_errors() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (blob, toc, files) = layer(1);
    let blob = MemBlob::new(blob);
    let clock = Arc::new(ManualClock::new(1_000_000));
    // No memory cache: every FUSE read goes to the disk store or the source.
    let sn = open_snapshotter_with(dir.path(), blob.clone(), &rt, 0, clock.clone());
    let root = prepare(&sn, &toc, 1);
    let remote = sn.remote().unwrap();
    let cache = remote.cache().clone();
    // Room for about an eighth of the layer; GC from half of that down to 10%.
    let max = (FILES * FILE_BYTES / 8) as u64;
    cache.configure(cfg(max, 50, 10, 3600));

    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let files = Arc::new(files);
    let readers: Vec<_> = (0..4)
        .map(|t| {
            let (stop, reads, files, root) =
                (stop.clone(), reads.clone(), files.clone(), root.clone());
            std::thread::spawn(move || {
                let mut problems = Vec::new();
                let mut i = t * 5;
                while !stop.load(Ordering::Relaxed) {
                    let (name, want) = &files[i % files.len()];
                    match read_uncached(&root.join(name)) {
                        Ok(got) if got == *want => {}
                        Ok(got) => {
                            problems.push(format!("{name}: wrong bytes ({} read)", got.len()))
                        }
                        Err(e) => problems.push(format!("{name}: {e}")),
                    }
                    reads.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                }
                problems
            })
        })
        .collect();
    let started = Instant::now();
    let (mut runs, mut evicted, mut busy) = (0u64, 0u64, 0u64);
    while started.elapsed() < Duration::from_secs(4) {
        clock.advance(1);
        let r = rt.block_on(cache.gc(false, "test"));
        runs += 1;
        evicted += r.evicted_chunks;
        busy += r.skipped_busy;
        std::thread::sleep(Duration::from_millis(5));
    }
    stop.store(true, Ordering::Relaxed);
    let problems: Vec<String> = readers
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    assert!(
        problems.is_empty(),
        "readers saw: {:?}",
        &problems[..problems.len().min(10)]
    );
    let reads = reads.load(Ordering::Relaxed);
    let f = &remote.fetcher().stats;
    let served =
        f.served_from_cache.load(Ordering::Relaxed) + f.served_after_fetch.load(Ordering::Relaxed);
    eprintln!(
        "{reads} file reads ({served} bytes through FUSE), {runs} GC runs evicted {evicted} chunks, \
         {busy} skipped while being read, {} range requests",
        blob.requests.load(Ordering::SeqCst)
    );
    assert!(
        reads >= 100,
        "readers made too few reads to mean anything: {reads}"
    );
    assert!(
        served >= 50 * FILE_BYTES as u64,
        "reads did not go through FUSE (page cache?): {served} bytes"
    );
    assert!(evicted > 0, "GC evicted nothing");
    let chunks = (FILES * FILE_BYTES / CHUNK) as u64;
    assert!(
        blob.requests.load(Ordering::SeqCst) > chunks,
        "evicted chunks were never fetched again"
    );
    let store = remote.fetcher().store();
    assert!(
        store.index().used() <= max,
        "{} > max_bytes {max}",
        store.index().used()
    );
    assert_eq!(store.stats.corrupt_on_disk.load(Ordering::Relaxed), 0);
}

#[test]
fn pins_keep_chunks_the_ttl_expires_unreferenced_ones_and_both_survive_a_restart() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (blob, toc, files) = layer(2);
    let blob = MemBlob::new(blob);
    let clock = Arc::new(ManualClock::new(5_000_000));
    let sn = open_snapshotter_with(dir.path(), blob.clone(), &rt, 0, clock.clone());
    let root = prepare(&sn, &toc, 1);
    for (name, want) in files.iter() {
        assert_eq!(read_uncached(&root.join(name)).unwrap(), *want);
    }
    let cache = sn.remote().unwrap().cache().clone();
    let store = cache.store().clone();
    let all = store.index().used();
    assert_eq!(store.index().len(), FILES * FILE_BYTES / CHUNK);
    cache.configure(cfg(0, 90, 50, 100));
    let r = rt.block_on(cache.gc(false, "test"));
    assert_eq!(r.evicted_chunks, 0, "referenced chunks under no limit stay");

    // Pinned by image: even far over a tiny limit, nothing goes.
    let p = cache.pin(IMAGE).unwrap();
    assert!(p.changed);
    assert_eq!(p.layers, 1);
    assert!(cache.pin("not a reference!").is_err());
    cache.configure(cfg(all / 4, 50, 25, 100));
    let r = rt.block_on(cache.gc(false, "test"));
    assert_eq!((r.evicted_chunks, r.pinned_bytes), (0, all), "{r:?}");
    // A dry run after unpinning says what would go, and removes nothing.
    assert!(cache.unpin(IMAGE).unwrap().changed);
    let dry = rt.block_on(cache.gc(true, "test"));
    assert!(dry.evicted_lru > 0 && dry.used_after <= all / 8, "{dry:?}");
    assert_eq!(store.index().used(), all);
    let r = rt.block_on(cache.gc(false, "test"));
    assert_eq!(
        (r.evicted_lru, r.freed_bytes),
        (dry.evicted_lru, dry.freed_bytes)
    );
    assert!(store.index().used() <= all / 8);
    // The layer is still served: the evicted chunks come back from the source.
    for (name, want) in files.iter() {
        assert_eq!(read_uncached(&root.join(name)).unwrap(), *want);
    }

    // Unreferenced (layer removed) chunks live out the TTL, then go.
    cache.configure(cfg(0, 90, 50, 100));
    sn.remove("view-1").unwrap();
    sn.remove("chain-1").unwrap();
    let before = store.index().len();
    clock.advance(99);
    assert_eq!(rt.block_on(cache.gc(false, "test")).evicted_chunks, 0);
    clock.advance(1);
    let r = rt.block_on(cache.gc(false, "test"));
    assert_eq!(r.evicted_expired as usize, before);
    assert_eq!(store.index().used(), 0);
    assert!(std::fs::read_dir(dir.path().join("chunks"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name() != "tmp")
        .all(|d| std::fs::read_dir(d.path()).unwrap().count() == 0));

    // Pins, the last GC result and access times are in metadata.redb.
    assert!(cache.pin(IMAGE).unwrap().changed);
    drop((cache, store));
    drop(sn);
    let sn = open_snapshotter_with(dir.path(), blob, &rt, 0, clock.clone());
    let cache = sn.remote().unwrap().cache().clone();
    assert!(cache.pins().contains(IMAGE));
    let last = cache.last_report().expect("last GC kept");
    assert_eq!(last.evicted_expired as usize, before);
}

#[test]
fn chunks_of_a_layer_whose_registry_is_unreachable_are_kept_over_the_limit() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (blob, toc, files) = layer(3);
    let blob = MemBlob::new(blob);
    let clock = Arc::new(ManualClock::new(7_000_000));
    let sn = open_snapshotter_with(dir.path(), blob.clone(), &rt, 0, clock);
    let root = prepare(&sn, &toc, 1);
    for (name, want) in files.iter() {
        assert_eq!(read_uncached(&root.join(name)).unwrap(), *want);
    }
    let cache = sn.remote().unwrap().cache().clone();
    let all = cache.store().index().used();
    blob.offline.store(true, Ordering::SeqCst);
    cache.configure(cfg(all / 4, 50, 25, 100));
    let r = rt.block_on(cache.gc(false, "test"));
    assert_eq!(r.evicted_chunks, 0, "{r:?}");
    assert_eq!(r.kept_unfetchable_bytes, all);
    assert_eq!(r.unfetchable_layers, vec!["sha256:hostile".to_owned()]);
    assert!(!r.disk_full);
    // The container keeps reading its data with the registry gone.
    for (name, want) in files.iter() {
        assert_eq!(read_uncached(&root.join(name)).unwrap(), *want);
    }
}

/// A layer blob as a source, counting requests, slow enough for overlap.
struct SlowBlob {
    blob: Vec<u8>,
    requests: AtomicU64,
    bytes: AtomicU64,
}

impl shoal::remote::fetch::RangeSource for SlowBlob {
    fn fetch(
        &self,
        offset: u64,
        len: u64,
    ) -> shoal::remote::fetch::BoxFuture<'_, Result<bytes::Bytes, shoal::remote::fetch::SourceError>>
    {
        Box::pin(async move {
            self.requests.fetch_add(1, Ordering::SeqCst);
            self.bytes.fetch_add(len, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(30)).await;
            Ok(bytes::Bytes::copy_from_slice(
                &self.blob[offset as usize..(offset + len) as usize],
            ))
        })
    }
    fn name(&self) -> &str {
        "slow-blob"
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_chunk_shared_by_two_layers_is_fetched_once_when_both_read_it_at_once() {
    use shoal::remote::toc::{parse_footer, Toc, FOOTER_FETCH};
    let shared = noise(3 * CHUNK, 42);
    // Two different layers (different blobs, other files) holding the same file.
    let blobs: Vec<(Vec<u8>, Toc)> = (0..2u64)
        .map(|i| {
            let entries = [
                Entry::file(&format!("only-in-{i}"), noise(CHUNK, 100 + i)),
                Entry::file("shared.bin", shared.clone()),
            ];
            let (blob, digest) = Layer::new(Format::Estargz, CHUNK, &entries).blob();
            let size = blob.len() as u64;
            let footer = parse_footer(&blob[(size - FOOTER_FETCH) as usize..], size).unwrap();
            let toc_bytes =
                &blob[footer.toc_offset as usize..(footer.toc_offset + footer.toc_len) as usize];
            let toc = Toc::parse(toc_bytes, &footer, &digest).unwrap();
            (blob, toc)
        })
        .collect();
    assert_ne!(blobs[0].0, blobs[1].0);
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(shoal::remote::store::ChunkStore::open(dir.path(), 64 << 20).unwrap());
    let fetcher = Arc::new(shoal::remote::fetch::Fetcher::new(store));
    let mut tasks = Vec::new();
    let mut sources = Vec::new();
    let mut spans = Vec::new();
    for (blob, toc) in &blobs {
        let src = Arc::new(SlowBlob {
            blob: blob.clone(),
            requests: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
        });
        sources.push(src.clone());
        let i = toc
            .entries
            .iter()
            .position(|e| e.name == "shared.bin")
            .unwrap();
        let chunks = toc.files[i].clone();
        assert_eq!(chunks.len(), 3);
        spans.push(
            chunks
                .iter()
                .map(|c| c.blob_end - c.blob_offset)
                .sum::<u64>(),
        );
        for _ in 0..4 {
            let (f, src, chunks, c) = (
                fetcher.clone(),
                src.clone(),
                chunks.clone(),
                toc.compression,
            );
            tasks.push(tokio::spawn(async move {
                f.get(
                    &shoal::remote::fetch::Router::new(src.clone()),
                    c,
                    "layer",
                    &chunks,
                )
                .await
            }));
        }
    }
    for t in tasks {
        let bufs = t.await.unwrap().unwrap();
        assert_eq!(bufs.concat(), shared);
    }
    // Readers plan all their chunks under one lock, so the first leads the
    // shared file's three chunks as one merged request and the seven others
    // wait for it: one request in all, carrying the bytes of one copy.
    let requests: u64 = sources
        .iter()
        .map(|s| s.requests.load(Ordering::SeqCst))
        .sum();
    let bytes: u64 = sources.iter().map(|s| s.bytes.load(Ordering::SeqCst)).sum();
    let one_copy = spans.iter().copied().max().unwrap();
    assert_eq!(
        requests, 1,
        "eight readers over two layers: one merged request in all"
    );
    assert!(
        bytes <= one_copy,
        "{bytes} bytes fetched for a file whose chunks take {one_copy} bytes in one blob"
    );
}

fn stored(store: &shoal::remote::store::ChunkStore) -> std::collections::BTreeSet<[u8; 32]> {
    store
        .index()
        .snapshot()
        .into_iter()
        .map(|(d, _)| d)
        .collect()
}

fn toc_files(root: &Path) -> usize {
    std::fs::read_dir(root.join("tocs")).unwrap().count()
}

#[test]
fn a_pin_keeps_an_unmounted_removed_layer_across_restart_and_its_toc_outlives_unpinned_ones() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pinned_layer = format!("sha256:{}", "a".repeat(64));
    let other_layer = format!("sha256:{}", "b".repeat(64));
    let (blob_a, toc_a, files_a) = layer(4);
    let (blob_b, toc_b, files_b) = layer(5);
    let blobs = Arc::new(common::MemBlobsByDigest(
        [
            (pinned_layer.clone(), MemBlob::new(blob_a)),
            (other_layer.clone(), MemBlob::new(blob_b)),
        ]
        .into(),
    ));
    let clock = Arc::new(ManualClock::new(9_000_000));
    let sn = open_snapshotter_blobs(dir.path(), blobs.clone(), &rt, 0, clock.clone());
    let cache = sn.remote().unwrap().cache().clone();
    let store = cache.store().clone();
    let root = prepare_labelled(
        &sn,
        1,
        labels_for(&toc_a, "chain-1", "127.0.0.1:5000/a:t", &pinned_layer),
    );
    for (name, want) in files_a.iter() {
        assert_eq!(read_uncached(&root.join(name)).unwrap(), *want);
    }
    let set_a = stored(&store);
    let root = prepare_labelled(
        &sn,
        2,
        labels_for(&toc_b, "chain-2", "127.0.0.1:5000/b:t", &other_layer),
    );
    for (name, want) in files_b.iter() {
        assert_eq!(read_uncached(&root.join(name)).unwrap(), *want);
    }
    let set_b: std::collections::BTreeSet<_> = stored(&store).difference(&set_a).copied().collect();
    assert_eq!(set_a.len(), FILES * FILE_BYTES / CHUNK);
    assert_eq!(set_b.len(), set_a.len());
    let bytes_a: u64 = store
        .index()
        .snapshot()
        .iter()
        .filter(|(d, _)| set_a.contains(d))
        .map(|(_, e)| e.size)
        .sum();
    assert_eq!(toc_files(dir.path()), 4, "two TOCs, two footers");

    // Mounted TOCs are never collected, however old.
    cache.configure(cfg(0, 90, 50, 100));
    clock.advance(10_000);
    let r = rt.block_on(cache.gc(false, "test"));
    assert_eq!((r.tocs_removed, r.tocs_kept), (0, 2), "{r:?}");

    let p = cache.pin(&pinned_layer).unwrap();
    assert_eq!((p.changed, p.layers), (true, 1));
    for n in [1, 2] {
        sn.remove(&format!("view-{n}")).unwrap();
        sn.remove(&format!("chain-{n}")).unwrap();
    }
    assert_eq!(sn.remote().unwrap().mounted_count(), 0);
    // The pin still covers the unmounted layer, through its kept TOC.
    let p = cache.pin(&pinned_layer).unwrap();
    assert_eq!((p.changed, p.layers), (false, 1));

    // A limit far below the pinned layer: everything else goes, it stays.
    cache.configure(cfg(bytes_a / 8, 50, 10, 100));
    let r = rt.block_on(cache.gc(false, "test"));
    assert_eq!(r.evicted_chunks as usize, set_b.len(), "{r:?}");
    assert_eq!(r.pinned_bytes, bytes_a);
    assert_eq!(stored(&store), set_a);
    // Both TOCs are kept: one pinned, one unreferenced for less than the TTL.
    assert_eq!((r.tocs_removed, r.tocs_kept), (0, 2));
    clock.advance(99);
    let r = rt.block_on(cache.gc(false, "test"));
    assert_eq!((r.tocs_removed, r.tocs_kept), (0, 2), "{r:?}");
    let dry = rt.block_on(cache.gc(true, "test"));
    assert_eq!(dry.tocs_removed, 0);
    clock.advance(1);
    let dry = rt.block_on(cache.gc(true, "test"));
    assert_eq!((dry.tocs_removed, dry.tocs_kept), (1, 1), "{dry:?}");
    assert_eq!(toc_files(dir.path()), 4, "a dry run removes nothing");
    let r = rt.block_on(cache.gc(false, "test"));
    assert_eq!((r.tocs_removed, r.tocs_kept), (1, 1), "{r:?}");
    let (toc_path, footer_path) = cache.tocs().paths(&toc_b);
    assert!(!toc_path.exists() && !footer_path.exists());
    let (toc_path, footer_path) = cache.tocs().paths(&toc_a);
    assert!(toc_path.exists() && footer_path.exists());

    // A restart: no snapshot left, yet the pin still finds the layer's chunks.
    drop((cache, store, root));
    drop(sn);
    let sn = open_snapshotter_blobs(dir.path(), blobs.clone(), &rt, 0, clock.clone());
    let cache = sn.remote().unwrap().cache().clone();
    let store = cache.store().clone();
    assert_eq!(stored(&store), set_a);
    cache.configure(cfg(bytes_a / 8, 50, 10, 100));
    clock.advance(1000);
    let r = rt.block_on(cache.gc(false, "test"));
    assert_eq!((r.evicted_chunks, r.pinned_bytes), (0, bytes_a), "{r:?}");
    assert_eq!((r.tocs_removed, r.tocs_kept), (0, 1));
    assert_eq!(stored(&store), set_a);

    // Unpinned, it goes like any other: chunks and TOC.
    assert!(cache.unpin(&pinned_layer).unwrap().changed);
    let r = rt.block_on(cache.gc(false, "test"));
    assert_eq!(r.evicted_chunks as usize, set_a.len(), "{r:?}");
    assert_eq!((r.tocs_removed, r.tocs_kept), (1, 0));
    assert_eq!(store.index().used(), 0);
    assert_eq!(toc_files(dir.path()), 0);
    assert_eq!(cache.pin(&pinned_layer).unwrap().layers, 0);
}

/// Accepts TCP connections and never answers: a registry that hangs.
fn silent_listener() -> (u16, Arc<AtomicU64>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicU64::new(0));
    let count = accepted.clone();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in l.incoming().flatten() {
            count.fetch_add(1, Ordering::SeqCst);
            held.push(s);
        }
    });
    (port, accepted)
}

#[test]
fn probes_of_many_layers_from_a_silent_registry_take_about_one_timeout() {
    use shoal::metadata::RemoteRef;
    use shoal::registry::{Registry, RegistryConfig};
    use shoal::remote::cache::{Cache, PROBE_CONCURRENCY, PROBE_TIMEOUT};
    use shoal::remote::layer::LayerReader;
    use shoal::remote::layers::Blobs;
    use shoal::remote::toc::{parse_footer, Toc, FOOTER_FETCH};

    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (port, accepted) = silent_listener();
    let registry = Registry::new(RegistryConfig {
        config_path: dir.path().join("certs.d"),
        request_timeout: Duration::from_secs(60),
        retries: 0,
        max_concurrent: PROBE_CONCURRENCY,
        credentials: Vec::new(),
        docker_config: Some(dir.path().join("no-docker-config.json")),
        ..RegistryConfig::default()
    })
    .unwrap();
    let blobs: Arc<dyn Blobs> =
        Arc::new(shoal::remote::fetch::registry::RegistryBlobs::new(registry));
    let store =
        Arc::new(shoal::remote::store::ChunkStore::open(&dir.path().join("chunks"), 0).unwrap());
    let fetcher = Arc::new(shoal::remote::fetch::Fetcher::new(store.clone()));
    let tocs = Arc::new(shoal::remote::tocs::KeptTocs::new(dir.path().join("tocs")).unwrap());
    let cache = Cache::new(store, blobs.clone(), tocs);
    let (blob, digest, _) = layer(6);
    let size = blob.len() as u64;
    let footer = parse_footer(&blob[(size - FOOTER_FETCH) as usize..], size).unwrap();
    let toc = &blob[footer.toc_offset as usize..(footer.toc_offset + footer.toc_len) as usize];
    let toc = Arc::new(Toc::parse(toc, &footer, &digest).unwrap());
    let n = PROBE_CONCURRENCY;
    for i in 0..n {
        let r = RemoteRef {
            image_ref: format!("127.0.0.1:{port}/dead:t"),
            layer_digest: format!("sha256:{i:064x}"),
            toc_digest: digest.clone(),
            anonymous: false,
        };
        let reader = Arc::new(LayerReader::new(
            r.layer_digest.clone(),
            toc.clone(),
            fetcher.clone(),
            Arc::new(shoal::remote::fetch::Router::new(blobs.source(&r))),
            rt.handle().clone(),
            shoal::remote::recorder::Recorder::new(
                toc.entries.len(),
                Default::default(),
                Default::default(),
            ),
        ));
        cache.register(i as u64, r, reader);
    }
    let started = Instant::now();
    let r = rt.block_on(cache.gc(true, "test"));
    let took = started.elapsed();
    eprintln!(
        "GC probing {n} layers of a silent registry took {took:?} (probe timeout {PROBE_TIMEOUT:?}); {} connection(s) accepted",
        accepted.load(Ordering::SeqCst)
    );
    assert_eq!(r.unfetchable_layers.len(), n, "{r:?}");
    assert!(
        accepted.load(Ordering::SeqCst) >= 1,
        "the probes never reached the listener"
    );
    assert!(
        took >= PROBE_TIMEOUT,
        "the probes did not wait for the silent registry: {took:?}"
    );
    // One after another they would take n timeouts.
    assert!(
        took < PROBE_TIMEOUT * 2,
        "{n} probes took {took:?}: not concurrent"
    );
}

/// Blobs by TOC digest: an attacker's layer that claims another layer's
/// digest and image is still served from its own blob.
struct BlobsByToc(std::collections::HashMap<String, Arc<MemBlob>>);

impl shoal::remote::layers::Blobs for BlobsByToc {
    fn source(&self, r: &shoal::metadata::RemoteRef) -> Arc<dyn shoal::remote::fetch::RangeSource> {
        self.0[&r.toc_digest].clone()
    }
    fn size<'a>(
        &'a self,
        r: &'a shoal::metadata::RemoteRef,
    ) -> shoal::remote::fetch::BoxFuture<'a, Result<u64, String>> {
        let n = self.0[&r.toc_digest].bytes.len() as u64;
        Box::pin(async move { Ok(n) })
    }
}

#[test]
fn a_layer_whose_labels_claim_a_pinned_digest_and_image_is_not_pinned() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let image = "127.0.0.1:5000/prod:v1";
    let layer_digest = format!("sha256:{}", "c".repeat(64));
    let (blob_a, toc_a, files_a) = layer(6);
    let (blob_b, toc_b, files_b) = layer(7);
    let blobs = Arc::new(BlobsByToc(
        [
            (toc_a.clone(), MemBlob::new(blob_a)),
            (toc_b.clone(), MemBlob::new(blob_b)),
        ]
        .into(),
    ));
    let clock = Arc::new(ManualClock::new(9_000_000));
    let sn = open_snapshotter_blobs(dir.path(), blobs, &rt, 0, clock.clone());
    let cache = sn.remote().unwrap().cache().clone();
    let store = cache.store().clone();
    let read_all = |root: &Path, files: &Files| {
        for (name, want) in files.iter() {
            assert_eq!(read_uncached(&root.join(name)).unwrap(), *want);
        }
    };
    let root = prepare_labelled(&sn, 1, labels_for(&toc_a, "chain-1", image, &layer_digest));
    read_all(&root, &files_a);
    let set_a = stored(&store);
    // The operator pins the image and its layer: both bind to TOC A.
    assert_eq!(cache.pin(image).unwrap().layers, 1);
    assert_eq!(cache.pin(&layer_digest).unwrap().layers, 1);

    // Another image's layer claims the same image reference and layer
    // digest, with its own (valid) TOC.
    let root = prepare_labelled(&sn, 2, labels_for(&toc_b, "chain-2", image, &layer_digest));
    read_all(&root, &files_b);
    let pinned: Vec<(String, bool)> = sn
        .remote()
        .unwrap()
        .status()
        .into_iter()
        .map(|l| (l.remote.toc_digest, l.pinned))
        .collect();
    assert_eq!(pinned, [(toc_a.clone(), true), (toc_b.clone(), false)]);

    // Far over a tiny limit: the claimant's chunks go, the pinned layer's stay.
    let bytes_a: u64 = store
        .index()
        .snapshot()
        .iter()
        .filter(|(d, _)| set_a.contains(d))
        .map(|(_, e)| e.size)
        .sum();
    cache.configure(cfg(bytes_a / 8, 50, 10, 100));
    let r = rt.block_on(cache.gc(false, "test"));
    assert_eq!(r.pinned_bytes, bytes_a, "{r:?}");
    assert_eq!(stored(&store), set_a, "{r:?}");

    // Unmounted, its kept TOC's record still claims the pin's names: the
    // TOC is collected after the TTL all the same; the pinned one stays.
    sn.remove("view-2").unwrap();
    sn.remove("chain-2").unwrap();
    clock.advance(100);
    rt.block_on(cache.gc(false, "test"));
    clock.advance(100);
    let r = rt.block_on(cache.gc(false, "test"));
    assert_eq!((r.tocs_removed, r.tocs_kept), (1, 1), "{r:?}");
    assert!(!cache.tocs().paths(&toc_b).0.exists());
    assert!(cache.tocs().paths(&toc_a).0.exists());

    // Pinning again binds what the operator then sees: still TOC A alone.
    assert_eq!(cache.pin(image).unwrap().layers, 1);
}
