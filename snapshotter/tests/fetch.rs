//! The verified fetch path against a real eStargz blob, served by a test
//! source that can lie (a fault a real registry cannot produce on demand).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use sha2::{Digest as _, Sha256};
use shoal::remote::fetch::{
    BoxFuture, FetchError, Fetcher, RangeSource, Router, Sink, SourceError, SourceKind,
};
use shoal::remote::store::ChunkStore;
use shoal::remote::toc::{parse_footer, Chunk, Toc, FOOTER_FETCH};

struct Source {
    blob: Vec<u8>,
    requests: AtomicU64,
    /// Corrupt this many responses, then answer honestly.
    lies_left: AtomicU64,
}

impl RangeSource for Source {
    fn fetch(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<Bytes, SourceError>> {
        Box::pin(async move {
            self.requests.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            let mut b = self.blob[offset as usize..(offset + len) as usize].to_vec();
            if self.lies_left.load(Ordering::SeqCst) > 0 {
                self.lies_left.fetch_sub(1, Ordering::SeqCst);
                let mid = b.len() / 2;
                b[mid] ^= 0xff;
            }
            Ok(Bytes::from(b))
        })
    }
    fn name(&self) -> &str {
        "test-source"
    }
}

fn setup(lies: u64) -> (Arc<Source>, Toc, Vec<Chunk>) {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
    let p = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().and_then(|x| x.to_str()) == Some("esgz"))
        .unwrap();
    let blob = std::fs::read(&p).unwrap();
    let digest = std::fs::read_to_string(p.with_extension("esgz.toc-digest")).unwrap();
    let size = blob.len() as u64;
    let footer = parse_footer(&blob[(size - FOOTER_FETCH) as usize..], size).unwrap();
    let toc = Toc::parse(
        &blob[footer.toc_offset as usize..(footer.toc_offset + footer.toc_len) as usize],
        &footer,
        digest.trim(),
    )
    .unwrap();
    let i = toc
        .entries
        .iter()
        .position(|e| e.name == "data/big.bin")
        .unwrap();
    let chunks = toc.files[i].clone();
    let src = Arc::new(Source {
        blob,
        requests: AtomicU64::new(0),
        lies_left: AtomicU64::new(lies),
    });
    (src, toc, chunks)
}

fn fetcher() -> (tempfile::TempDir, Arc<Fetcher>) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(ChunkStore::open(dir.path(), 64 << 20).unwrap());
    (dir, Arc::new(Fetcher::new(store)))
}

#[tokio::test(flavor = "multi_thread")]
async fn adjacent_chunks_merge_into_one_request_and_concurrent_readers_share_it() {
    let (src, toc, chunks) = setup(0);
    let (_d, f) = fetcher();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (f, src, chunks) = (f.clone(), src.clone(), chunks.clone());
        let c = toc.compression;
        tasks.push(tokio::spawn(async move {
            f.get(&Router::new(src.clone()), c, "layer", &chunks).await
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap().unwrap());
    }
    let whole: Vec<u8> = results[0].iter().flat_map(|b| b.to_vec()).collect();
    assert_eq!(whole.len(), 200000);
    for r in &results {
        assert_eq!(r, &results[0]);
    }
    // Eight readers of four adjacent chunks: one merged request in all.
    assert_eq!(src.requests.load(Ordering::SeqCst), 1);
    // Served from the store from now on.
    f.get(&Router::new(src.clone()), toc.compression, "layer", &chunks)
        .await
        .unwrap();
    assert_eq!(src.requests.load(Ordering::SeqCst), 1);
    for c in &chunks {
        assert!(f.store().contains(&c.digest));
    }
}

#[tokio::test]
async fn one_lie_is_dropped_and_refetched() {
    let (src, toc, chunks) = setup(1);
    let (_d, f) = fetcher();
    let got = f
        .get(
            &Router::new(src.clone()),
            toc.compression,
            "layer",
            &chunks[..1],
        )
        .await
        .unwrap();
    assert_eq!(Sha256::digest(&got[0]).as_slice(), chunks[0].digest);
    assert_eq!(f.stats.verify_failures.load(Ordering::SeqCst), 1);
    assert_eq!(src.requests.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_source_that_keeps_lying_yields_an_error_and_caches_nothing() {
    let (src, toc, chunks) = setup(u64::MAX);
    let (_d, f) = fetcher();
    let err = f
        .get(
            &Router::new(src.clone()),
            toc.compression,
            "layer",
            &chunks[..1],
        )
        .await
        .unwrap_err();
    assert!(matches!(err, FetchError::Verify { .. }), "{err}");
    assert_eq!(f.stats.verify_failures.load(Ordering::SeqCst), 2);
    assert!(
        !f.store().contains(&chunks[0].digest),
        "unverified bytes must not be cached"
    );
}

/// Streams the first half of every range at once, then holds the rest until
/// the gate opens (a slow link, frozen mid-body on demand).
struct Gated {
    inner: Arc<Source>,
    gate: tokio::sync::Semaphore,
}

impl RangeSource for Gated {
    fn fetch(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<Bytes, SourceError>> {
        self.inner.fetch(offset, len)
    }
    fn fetch_streamed(
        &self,
        offset: u64,
        len: u64,
        sink: Sink,
    ) -> BoxFuture<'_, Result<Bytes, SourceError>> {
        Box::pin(async move {
            let b = self.inner.fetch(offset, len).await?;
            let half = b.len() / 2;
            let _ = sink.send((offset, b.slice(..half)));
            let _permit = self.gate.acquire().await.unwrap();
            let _ = sink.send((offset + half as u64, b.slice(half..)));
            Ok(b)
        })
    }
    fn name(&self) -> &str {
        "gated-source"
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_chunk_is_served_as_soon_as_it_is_in_not_when_its_merged_request_ends() {
    let (src, toc, chunks) = setup(0);
    assert!(
        chunks.len() >= 4,
        "the fixture's big file has several chunks"
    );
    let (_d, f) = fetcher();
    let gated = Arc::new(Gated {
        inner: src.clone(),
        gate: tokio::sync::Semaphore::new(0),
    });
    let compression = toc.compression;
    let leader = {
        let (f, g, all) = (f.clone(), gated.clone(), chunks.clone());
        tokio::spawn(async move {
            f.get(&Router::new(g.clone()), compression, "layer", &all)
                .await
        })
    };
    while src.requests.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    // The first chunk lies in the half already sent: a reader gets it (from
    // the leader's request, not a new one) while the request is held open.
    let (first, led) = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        f.get_on_demand(
            &Router::new(gated.clone()),
            compression,
            "layer",
            &chunks[..1],
        ),
    )
    .await
    .expect("the first chunk must not wait for the end of the merged request")
    .unwrap();
    assert_eq!(Sha256::digest(&first[0]).as_slice(), chunks[0].digest);
    // Waiting for a chunk another fetch has under way is not an on-demand
    // fetch (it would make that very fetch's later batches give way).
    assert_eq!(led, 0);
    assert_eq!(f.stats.fetched_on_demand.load(Ordering::SeqCst), 0);
    assert!(
        !leader.is_finished(),
        "the merged request is still held open"
    );
    assert_eq!(src.requests.load(Ordering::SeqCst), 1);
    gated.gate.add_permits(1);
    let all = leader.await.unwrap().unwrap();
    assert_eq!(all.len(), chunks.len());
    for (b, c) in all.iter().zip(&chunks) {
        assert_eq!(Sha256::digest(b).as_slice(), c.digest);
    }
    assert_eq!(
        src.requests.load(Ordering::SeqCst),
        1,
        "one merged request in all"
    );
}

#[tokio::test]
async fn a_read_that_fetches_for_itself_counts_as_on_demand() {
    let (src, toc, chunks) = setup(0);
    let (_d, f) = fetcher();
    let want: u64 = chunks[..2].iter().map(|c| c.len).sum();
    let (_, led) = f
        .get_on_demand(
            &Router::new(src.clone()),
            toc.compression,
            "layer",
            &chunks[..2],
        )
        .await
        .unwrap();
    assert_eq!(led, want);
    // Now local: nothing more to fetch.
    let (_, led) = f
        .get_on_demand(
            &Router::new(src.clone()),
            toc.compression,
            "layer",
            &chunks[..2],
        )
        .await
        .unwrap();
    assert_eq!(led, 0);
    assert_eq!(f.stats.fetched_on_demand.load(Ordering::SeqCst), want);
}

/// Chunks of `chunks` whose bytes lie wholly below blob offset `end`.
fn below(chunks: &[Chunk], end: u64) -> Vec<Chunk> {
    chunks
        .iter()
        .filter(|c| c.blob_end <= end)
        .copied()
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_primed_window_serves_the_startup_fetch_from_its_one_early_request() {
    use shoal::remote::fetch::primed::PrimedSource;
    let (src, toc, chunks) = setup(0);
    let (_d, f) = fetcher();
    let end = chunks[chunks.len() / 2].blob_end;
    let early = below(&chunks, end);
    assert!(early.len() >= 2 && early.len() < chunks.len());
    let primed = PrimedSource::start(src.clone(), end, &tokio::runtime::Handle::current());
    let routed = Router::new(src.clone()).with_primed(Some(primed.clone()));
    // The startup fetch, as merged streamed requests inside the window.
    let got = f
        .get(&routed, toc.compression, "layer", &early)
        .await
        .unwrap();
    for (b, c) in got.iter().zip(&early) {
        assert_eq!(Sha256::digest(b).as_slice(), c.digest);
    }
    assert_eq!(
        src.requests.load(Ordering::SeqCst),
        1,
        "only the early request"
    );
    // Accounted to the window, not to the registry.
    let early_bytes = early.last().unwrap().blob_end - early[0].blob_offset;
    assert_eq!(f.stats.by_source.get(SourceKind::Primed), early_bytes);
    assert_eq!(f.stats.by_source.get(SourceKind::Registry), 0);
    // Past the window: the registry.
    let rest = &chunks[early.len()..];
    f.get(&routed, toc.compression, "layer", rest)
        .await
        .unwrap();
    assert_eq!(src.requests.load(Ordering::SeqCst), 2);
    assert_eq!(
        f.stats.by_source.get(SourceKind::Registry),
        rest.last().unwrap().blob_end - rest[0].blob_offset
    );
    assert_eq!(f.stats.by_source.get(SourceKind::Primed), early_bytes);
    // Across the window's end: the head from the window, the tail asked for.
    let (_d3, f3) = fetcher();
    let across = &chunks[early.len() - 1..=early.len()];
    let got = f3
        .get(&routed, toc.compression, "layer", across)
        .await
        .unwrap();
    for (b, c) in got.iter().zip(across) {
        assert_eq!(Sha256::digest(b).as_slice(), c.digest);
    }
    assert_eq!(
        src.requests.load(Ordering::SeqCst),
        3,
        "one request for the tail"
    );
    // Once finished, the window is gone: a range inside it is requested.
    primed.finish();
    let (_d2, f2) = fetcher();
    f2.get(&routed, toc.compression, "layer", &early[..1])
        .await
        .unwrap();
    assert_eq!(src.requests.load(Ordering::SeqCst), 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lying_early_request_is_caught_and_the_bad_chunk_refetched_from_the_source() {
    use shoal::remote::fetch::primed::PrimedSource;
    // The first response (the early request) has one byte flipped.
    let (src, toc, chunks) = setup(1);
    let (_d, f) = fetcher();
    let end = chunks[chunks.len() / 2].blob_end;
    let early = below(&chunks, end);
    let primed = PrimedSource::start(src.clone(), end, &tokio::runtime::Handle::current());
    let routed = Router::new(src.clone()).with_primed(Some(primed.clone()));
    let got = f
        .get(&routed, toc.compression, "layer", &early)
        .await
        .unwrap();
    for (b, c) in got.iter().zip(&early) {
        assert_eq!(Sha256::digest(b).as_slice(), c.digest);
    }
    assert_eq!(f.stats.verify_failures.load(Ordering::SeqCst), 1);
    // The early request, then the one bad chunk again, from the source.
    assert_eq!(src.requests.load(Ordering::SeqCst), 2);
}

/// A source whose first request (the early one) waits for `release`, then
/// fails; later requests go to `inner`.
struct DropsEarly {
    inner: Arc<Source>,
    release: tokio::sync::Notify,
    first: std::sync::atomic::AtomicBool,
}

impl RangeSource for DropsEarly {
    fn fetch(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<Bytes, SourceError>> {
        Box::pin(async move {
            if self.first.swap(false, Ordering::SeqCst) {
                self.release.notified().await;
                return Err(SourceError::Transient("test: early request dropped".into()));
            }
            self.inner.fetch(offset, len).await
        })
    }
    fn name(&self) -> &str {
        "drops-early"
    }
}

/// The router sends chunks inside a live window to it; when the early
/// request then fails, the window answers NotFound and the router takes
/// the range to the registry: the read succeeds, no error is counted, and
/// the bytes are accounted to the registry.
#[tokio::test(flavor = "multi_thread")]
async fn chunks_routed_to_a_window_whose_request_fails_fall_back_to_the_registry() {
    use shoal::remote::fetch::primed::PrimedSource;
    use shoal::remote::fetch::Route;
    let (src, toc, chunks) = setup(0);
    let (_d, f) = fetcher();
    let end = chunks[chunks.len() / 2].blob_end;
    let early = below(&chunks, end);
    let source = Arc::new(DropsEarly {
        inner: src.clone(),
        release: tokio::sync::Notify::new(),
        first: true.into(),
    });
    let primed = PrimedSource::start(source.clone(), end, &tokio::runtime::Handle::current());
    let routed = Router::new(source.clone()).with_primed(Some(primed.clone()));
    assert_eq!(routed.route(&early[0]), Route::Primed);
    assert_eq!(routed.route(chunks.last().unwrap()), Route::Registry);
    let (f2, routed) = (f.clone(), Arc::new(routed));
    let (r2, early2, compression) = (routed.clone(), early.clone(), toc.compression);
    let read = tokio::spawn(async move { f2.get(&r2, compression, "layer", &early2).await });
    // The read waits on the window; then the early request fails.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert!(!read.is_finished(), "the read waits for the window");
    source.release.notify_one();
    let got = read.await.unwrap().unwrap();
    for (b, c) in got.iter().zip(&early) {
        assert_eq!(Sha256::digest(b).as_slice(), c.digest);
    }
    assert_eq!(
        src.requests.load(Ordering::SeqCst),
        1,
        "one registry request"
    );
    assert_eq!(f.stats.source_errors.load(Ordering::SeqCst), 0);
    assert_eq!(f.stats.by_source.get(SourceKind::Primed), 0);
    assert_eq!(
        f.stats.by_source.get(SourceKind::Registry),
        early.last().unwrap().blob_end - early[0].blob_offset
    );
    // The window is gone: nothing routes to it any more.
    assert_eq!(routed.route(&early[0]), Route::Registry);
}

/// Decoding and the store's write (write, fsync, rename) run off the async
/// runtime: while a chunk's write is stuck (its temp file is a FIFO that
/// nobody reads yet), a runtime with a single thread still runs its other
/// tasks. Once the write goes on, the read completes.
#[test]
fn a_stuck_chunk_write_does_not_stall_the_runtime() {
    use std::io::Read as _;
    use std::time::Duration;

    let (src, toc, chunks) = setup(0);
    let (dir, f) = fetcher();
    let c = chunks[0];
    // The store's first write names its temp file `HEX8-0`.
    let fifo = dir
        .path()
        .join("tmp")
        .join(format!("{}-0", hex::encode(&c.digest[..8])));
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let (alive_tx, alive) = std::sync::mpsc::channel();
    let (done_tx, done) = std::sync::mpsc::channel();
    let compression = toc.compression;
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let fetch = tokio::spawn(async move {
                f.get(&Router::new(src.clone()), compression, "layer", &[c])
                    .await
            });
            // The source answers after 20 ms; the write is stuck by then.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let _ = alive_tx.send(fetch.is_finished());
            let _ = done_tx.send(fetch.await.unwrap());
        });
    });
    let alive = alive.recv_timeout(Duration::from_secs(5));
    // Let the write go on (also when the runtime was stuck).
    let mut drained = Vec::new();
    std::fs::File::open(&fifo)
        .unwrap()
        .read_to_end(&mut drained)
        .unwrap();
    assert_eq!(
        alive,
        Ok(false),
        "the runtime must run other tasks while the fetch's write is stuck"
    );
    let got = done.recv_timeout(Duration::from_secs(10)).unwrap().unwrap();
    assert_eq!(Sha256::digest(&got[0]).as_slice(), c.digest);
    assert!(drained.len() as u64 > c.len, "header and data were written");
}
