//! Helpers shared by integration tests (`mod common;`).
//!
//! - [`estargz`]: a writer of eStargz / zstd:chunked blobs with editable TOCs.
//! - [`MemBlob`]: one layer blob served from memory, as the registry would.
//! - [`open_snapshotter`], [`labels`]: a [`Snapshotter`] with remote layers,
//!   and the Prepare labels containerd's unpacker sends.
//! - [`capture_logs`]: the log lines a closure emits on this thread, so a test
//!   can assert *why* a layer fell back.

#![allow(dead_code)] // each test crate uses a different subset

pub mod estargz;
pub mod http;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use shoal::metadata::RemoteRef;
use shoal::overlay::Snapshotter;
use shoal::remote::clock::{Clock, SystemClock};
use shoal::remote::fetch::{BoxFuture, Fetcher, RangeSource};
use shoal::remote::layers::{Blobs, RemoteConfig, RemoteLayers};
use shoal::remote::store::ChunkStore;

/// A layer blob in memory. Ranges past the end are an error, as a registry
/// answers 416.
pub struct MemBlob {
    /// The blob.
    pub bytes: Vec<u8>,
    /// Range requests served.
    pub requests: AtomicU64,
    /// Flip a byte in the middle of every answer (a lying source).
    pub lie: AtomicBool,
    /// Refuse every request, size included (the registry unreachable).
    pub offline: AtomicBool,
}

impl MemBlob {
    /// A shared blob.
    pub fn new(bytes: Vec<u8>) -> Arc<MemBlob> {
        Arc::new(MemBlob {
            bytes,
            requests: AtomicU64::new(0),
            lie: AtomicBool::new(false),
            offline: AtomicBool::new(false),
        })
    }
}

impl RangeSource for MemBlob {
    fn fetch(
        &self,
        offset: u64,
        len: u64,
    ) -> BoxFuture<'_, Result<Bytes, shoal::remote::fetch::SourceError>> {
        Box::pin(async move {
            self.requests.fetch_add(1, Ordering::SeqCst);
            if self.offline.load(Ordering::SeqCst) {
                return Err("connection refused (test: offline)".into());
            }
            let end = offset
                .checked_add(len)
                .filter(|&e| e <= self.bytes.len() as u64)
                .ok_or_else(|| format!("range {offset}+{len} not satisfiable"))?;
            let mut b = self.bytes[offset as usize..end as usize].to_vec();
            if self.lie.load(Ordering::SeqCst) && !b.is_empty() {
                let mid = b.len() / 2;
                b[mid] ^= 0x20;
            }
            Ok(Bytes::from(b))
        })
    }
    fn name(&self) -> &str {
        "mem-blob"
    }
}

/// Every layer's blob is the one [`MemBlob`].
pub struct MemBlobs(pub Arc<MemBlob>);

/// Blobs by layer digest: each layer its own [`MemBlob`].
pub struct MemBlobsByDigest(pub std::collections::HashMap<String, Arc<MemBlob>>);

impl MemBlobsByDigest {
    fn get(&self, r: &RemoteRef) -> Arc<MemBlob> {
        self.0
            .get(&r.layer_digest)
            .unwrap_or_else(|| panic!("no test blob for layer {}", r.layer_digest))
            .clone()
    }
}

impl Blobs for MemBlobsByDigest {
    fn source(&self, r: &RemoteRef) -> Arc<dyn RangeSource> {
        self.get(r)
    }
    fn size<'a>(&'a self, r: &'a RemoteRef) -> BoxFuture<'a, Result<u64, String>> {
        let b = self.get(r);
        Box::pin(async move {
            if b.offline.load(Ordering::SeqCst) {
                return Err("offline".into());
            }
            Ok(b.bytes.len() as u64)
        })
    }
}

impl Blobs for MemBlobs {
    fn source(&self, _r: &RemoteRef) -> Arc<dyn RangeSource> {
        self.0.clone()
    }
    fn size<'a>(&'a self, _r: &'a RemoteRef) -> BoxFuture<'a, Result<u64, String>> {
        Box::pin(async move {
            if self.0.offline.load(Ordering::SeqCst) {
                return Err("offline".into());
            }
            Ok(self.0.bytes.len() as u64)
        })
    }
}

/// A snapshotter at `root` whose remote layers all come from `blob`.
pub fn open_snapshotter(
    root: &Path,
    blob: Arc<MemBlob>,
    rt: &tokio::runtime::Runtime,
) -> Snapshotter {
    open_snapshotter_with(root, blob, rt, 64 << 20, Arc::new(SystemClock))
}

/// [`open_snapshotter`] with a memory cache of `memory` bytes and `clock`.
pub fn open_snapshotter_with(
    root: &Path,
    blob: Arc<MemBlob>,
    rt: &tokio::runtime::Runtime,
    memory: u64,
    clock: Arc<dyn Clock>,
) -> Snapshotter {
    open_snapshotter_blobs(root, Arc::new(MemBlobs(blob)), rt, memory, clock)
}

/// [`open_snapshotter_with`] over any [`Blobs`].
pub fn open_snapshotter_blobs(
    root: &Path,
    blobs: Arc<dyn Blobs>,
    rt: &tokio::runtime::Runtime,
    memory: u64,
    clock: Arc<dyn Clock>,
) -> Snapshotter {
    open_snapshotter_config(root, blobs, rt, memory, clock, test_config())
}

/// The remote settings tests run with: Prepare waits for startup sets, no
/// background fetch, no fetch-ahead (so request counts are exact).
pub fn test_config() -> RemoteConfig {
    RemoteConfig {
        prefetch_timeout: Duration::from_secs(5),
        wait_for_startup: true,
        background_fetch: false,
        background_delay: Duration::from_secs(0),
        fuse_threads: 2,
        passthrough: true,
        fetch_ahead_bytes: 0,
        verify_layers: false,
        source: Default::default(),
        toc_limits: Default::default(),
    }
}

/// [`open_snapshotter_blobs`] with other remote settings.
pub fn open_snapshotter_config(
    root: &Path,
    blobs: Arc<dyn Blobs>,
    rt: &tokio::runtime::Runtime,
    memory: u64,
    clock: Arc<dyn Clock>,
    cfg: RemoteConfig,
) -> Snapshotter {
    let store = Arc::new(ChunkStore::open_with_clock(&root.join("chunks"), memory, clock).unwrap());
    let remote = RemoteLayers::new(
        root.join("tocs"),
        blobs,
        Arc::new(Fetcher::new(store)),
        rt.handle().clone(),
        cfg,
    )
    .unwrap();
    Snapshotter::open_with_remote(root, Some(remote)).unwrap()
}

/// Labels of an unpack Prepare for a layer with TOC digest `toc` whose chain
/// ID is `chain`.
pub fn labels(toc: &str, chain: &str) -> BTreeMap<String, String> {
    labels_for(toc, chain, "127.0.0.1:5000/hostile:t", "sha256:hostile")
}

/// [`labels`] for a given image reference and layer digest.
pub fn labels_for(toc: &str, chain: &str, image: &str, layer: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("containerd.io/snapshot.ref".to_owned(), chain.to_owned()),
        (
            "containerd.io/snapshot/stargz/toc.digest".into(),
            toc.into(),
        ),
        ("containerd.io/snapshot/cri.image-ref".into(), image.into()),
        (
            "containerd.io/snapshot/cri.layer-digest".into(),
            layer.into(),
        ),
    ])
}

#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Runs `f` with a subscriber on this thread that records every event at
/// INFO or above; returns `f`'s result and the log text.
pub fn capture_logs<T>(f: impl FnOnce() -> T) -> (T, String) {
    let sink = Sink::default();
    let writer = sink.clone();
    let sub = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .with_writer(move || writer.clone())
        .finish();
    let out = tracing::subscriber::with_default(sub, f);
    let text = String::from_utf8_lossy(&sink.0.lock().unwrap()).into_owned();
    (out, text)
}

/// Deterministic pseudo-random bytes (xorshift), distinct per seed.
pub fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
