//! Fetching chunks: merged Range requests, decompression, verification and
//! single flight.
//!
//! Invariants:
//! - A chunk's bytes are handed out (to readers, waiters or the store) only
//!   after their length and sha256 match the TOC's `chunkDigest`.
//! - A mismatch drops the bytes, counts the failure, logs layer, chunk and
//!   source, and fetches the chunk once more; a second failure is an error
//!   (the reader gets EIO).
//! - Single flight: the first caller that misses a chunk leads its fetch;
//!   concurrent callers wait on a watch channel and re-check the store if the
//!   leader goes away without an answer.
//! - Adjacent missing chunks (contiguous in the blob) are merged into one
//!   Range request of at most [`MAX_MERGED_BYTES`].

use std::collections::HashMap;
use std::future::Future;
use std::io::Read;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use sha2::{Digest as _, Sha256};
use tokio::sync::watch;
use tracing::{debug, error, warn};

use super::priority::Priority;
use super::store::ChunkStore;
use super::toc::{Chunk, Compression};

/// Largest merged Range request.
pub const MAX_MERGED_BYTES: u64 = 4 << 20;

/// A boxed future, for object-safe async traits.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Somewhere a layer blob's bytes can be read from (the registry; later,
/// peers). Nothing it returns is trusted.
pub trait RangeSource: Send + Sync {
    /// Exactly `len` bytes of the blob at `offset`.
    ///
    /// # Errors
    /// Any failure, as a message naming the source.
    fn fetch(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<Bytes, String>>;
    /// Name for logs and metrics (`registry`, a peer address).
    fn name(&self) -> &str;
}

/// Why a chunk could not be produced.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FetchError {
    /// The source failed.
    #[error("fetch from {source_name} failed: {message}")]
    Source {
        /// Source name.
        source_name: String,
        /// What happened.
        message: String,
    },
    /// The bytes did not verify, twice.
    #[error("chunk {chunk} failed verification from {source_name}: {problem}")]
    Verify {
        /// Chunk digest (hex).
        chunk: String,
        /// Source name.
        source_name: String,
        /// Length or digest problem.
        problem: String,
    },
    /// A waiter's leader vanished too often.
    #[error("chunk {0}: fetch abandoned")]
    Abandoned(String),
}

/// Fetch latency histograms, labelled by source.
pub type LatencyFamily = Family<Vec<(String, String)>, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 1 ms .. ~33 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// Counters for status and metrics.
#[derive(Debug)]
pub struct FetchStats {
    /// Compressed bytes received from sources.
    pub bytes_fetched: AtomicU64,
    /// Range requests issued.
    pub requests: AtomicU64,
    /// Chunks that failed verification (each attempt counts).
    pub verify_failures: AtomicU64,
    /// Source errors.
    pub source_errors: AtomicU64,
    /// Chunks stored to memory but not to disk (disk full or failing).
    pub not_cached: AtomicU64,
    /// Fetches in flight now.
    pub in_flight: AtomicU64,
    /// Bytes served to FUSE readers straight from the store.
    pub served_from_cache: AtomicU64,
    /// Bytes served to FUSE readers after a fetch from a source.
    pub served_after_fetch: AtomicU64,
    /// Files handed to the kernel for passthrough (once per inode and
    /// mount); their reads never reach the daemon.
    pub passthrough_files: AtomicU64,
    /// Seconds per Range request, by source.
    pub latency: Arc<LatencyFamily>,
}

impl Default for FetchStats {
    fn default() -> Self {
        FetchStats {
            bytes_fetched: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            verify_failures: AtomicU64::new(0),
            source_errors: AtomicU64::new(0),
            not_cached: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            served_from_cache: AtomicU64::new(0),
            served_after_fetch: AtomicU64::new(0),
            passthrough_files: AtomicU64::new(0),
            latency: Arc::new(Family::new_with_constructor(latency_histogram)),
        }
    }
}

/// What a waiter sees: nothing yet, then the leader's result.
type Outcome = Option<Result<Bytes, FetchError>>;
type Slot = watch::Receiver<Outcome>;
type Lead = watch::Sender<Outcome>;

/// Fetches and verifies chunks into a [`ChunkStore`].
pub struct Fetcher {
    store: Arc<ChunkStore>,
    inflight: Mutex<HashMap<[u8; 32], Slot>>,
    priority: Arc<Priority>,
    /// Counters.
    pub stats: FetchStats,
}

/// Removes led chunks from the in-flight map however the leader exits.
struct LeadGuard<'a> {
    fetcher: &'a Fetcher,
    keys: Vec<[u8; 32]>,
}

impl Drop for LeadGuard<'_> {
    fn drop(&mut self) {
        let mut m = self.fetcher.inflight.lock().unwrap();
        for k in &self.keys {
            m.remove(k);
        }
    }
}

/// Decompresses one chunk and checks its length and digest.
///
/// # Errors
/// A message saying what did not match.
pub fn decode_chunk(c: Compression, compressed: &[u8], chunk: &Chunk) -> Result<Bytes, String> {
    let mut out = Vec::with_capacity(chunk.len as usize);
    let res = match c {
        Compression::Gzip => flate2::read::MultiGzDecoder::new(compressed)
            .take(chunk.len)
            .read_to_end(&mut out),
        Compression::Zstd => zstd::stream::read::Decoder::new(compressed)
            .and_then(|d| d.take(chunk.len).read_to_end(&mut out)),
    };
    res.map_err(|e| format!("decompression failed: {e}"))?;
    if out.len() as u64 != chunk.len {
        return Err(format!(
            "decompressed {} bytes, TOC says {}",
            out.len(),
            chunk.len
        ));
    }
    if Sha256::digest(&out).as_slice() != chunk.digest {
        return Err("sha256 does not match chunkDigest".into());
    }
    Ok(Bytes::from(out))
}

impl Fetcher {
    /// A fetcher storing into `store`.
    pub fn new(store: Arc<ChunkStore>) -> Fetcher {
        Fetcher {
            store,
            inflight: Mutex::new(HashMap::new()),
            priority: Arc::default(),
            stats: FetchStats::default(),
        }
    }

    /// The gate between on-demand, startup and background fetches.
    pub fn priority(&self) -> &Arc<Priority> {
        &self.priority
    }

    /// The store.
    pub fn store(&self) -> &Arc<ChunkStore> {
        &self.store
    }

    /// Verified bytes of `chunks` (in the given order), fetching what is
    /// missing from `source`. `layer` names the layer in logs.
    ///
    /// # Errors
    /// [`FetchError`] if any chunk cannot be fetched and verified.
    pub async fn get(
        &self,
        source: &dyn RangeSource,
        compression: Compression,
        layer: &str,
        chunks: &[Chunk],
    ) -> Result<Vec<Bytes>, FetchError> {
        let mut out: Vec<Option<Bytes>> = vec![None; chunks.len()];
        for _attempt in 0..3 {
            let (waits, leads) = self.plan(chunks, &mut out);
            if !leads.is_empty() {
                let guard = LeadGuard {
                    fetcher: self,
                    keys: leads.iter().map(|(i, _)| chunks[*i].digest).collect(),
                };
                let mut first_err = None;
                for run in runs(chunks, &leads) {
                    let result = self
                        .fetch_run(source, compression, layer, chunks, &leads[run.clone()])
                        .await;
                    for ((i, tx), r) in leads[run].iter().zip(result) {
                        match &r {
                            Ok(b) => out[*i] = Some(b.clone()),
                            Err(e) => {
                                first_err.get_or_insert_with(|| e.clone());
                            }
                        }
                        let _ = tx.send(Some(r));
                    }
                }
                drop(guard);
                if let Some(e) = first_err {
                    return Err(e);
                }
            }
            let mut abandoned = false;
            for (i, mut rx) in waits {
                match rx.wait_for(Option::is_some).await {
                    Ok(v) => match v.as_ref().unwrap() {
                        Ok(b) => out[i] = Some(b.clone()),
                        Err(e) => return Err(e.clone()),
                    },
                    // The leader went away without an answer: re-plan.
                    Err(_) => abandoned = true,
                }
            }
            if !abandoned {
                break;
            }
        }
        out.into_iter()
            .zip(chunks)
            .map(|(b, c)| b.ok_or_else(|| FetchError::Abandoned(hex::encode(c.digest))))
            .collect()
    }

    /// Decides, for every chunk of `chunks` not yet in `out`, whether it is
    /// ready (filled in), being fetched by another reader (wait), or ours to
    /// fetch (lead). All decisions are taken under one hold of the in-flight
    /// lock, so two readers of the same chunks never split them between
    /// them: one leads every missing chunk (as merged runs), the other waits.
    #[allow(clippy::type_complexity)]
    fn plan(
        &self,
        chunks: &[Chunk],
        out: &mut [Option<Bytes>],
    ) -> (Vec<(usize, Slot)>, Vec<(usize, Lead)>) {
        // The store first, without the lock (disk reads).
        for (i, c) in chunks.iter().enumerate() {
            if out[i].is_none() {
                out[i] = self.store.get(&c.digest);
            }
        }
        let (mut waits, mut leads) = (Vec::new(), Vec::new());
        let mut m = self.inflight.lock().unwrap();
        for (i, c) in chunks.iter().enumerate() {
            if out[i].is_some() {
                continue;
            }
            if let Some(rx) = m.get(&c.digest) {
                waits.push((i, rx.clone()));
                continue;
            }
            // Re-check under the lock: a leader may have finished between
            // the store lookup and taking the lock.
            if let Some(b) = self.store.get(&c.digest) {
                out[i] = Some(b);
                continue;
            }
            let (tx, rx) = watch::channel(None);
            m.insert(c.digest, rx);
            leads.push((i, tx));
        }
        (waits, leads)
    }

    /// Fetches one merged run and returns a result per chunk.
    async fn fetch_run(
        &self,
        source: &dyn RangeSource,
        compression: Compression,
        layer: &str,
        chunks: &[Chunk],
        run: &[(usize, Lead)],
    ) -> Vec<Result<Bytes, FetchError>> {
        let first = &chunks[run[0].0];
        let last = &chunks[run[run.len() - 1].0];
        let (start, end) = (first.blob_offset, last.blob_end);
        let data = match self.fetch_range(source, layer, start, end - start).await {
            Ok(d) => d,
            Err(e) => return run.iter().map(|_| Err(e.clone())).collect(),
        };
        let mut results = Vec::with_capacity(run.len());
        for (i, _) in run {
            let c = &chunks[*i];
            let slice = &data[(c.blob_offset - start) as usize..(c.blob_end - start) as usize];
            let r = match decode_chunk(compression, slice, c) {
                Ok(b) => Ok(b),
                Err(problem) => {
                    self.note_verify_failure(layer, c, source.name(), &problem);
                    // Once more, this chunk alone.
                    match self
                        .fetch_range(source, layer, c.blob_offset, c.blob_end - c.blob_offset)
                        .await
                    {
                        Ok(again) => decode_chunk(compression, &again, c).map_err(|problem| {
                            self.note_verify_failure(layer, c, source.name(), &problem);
                            FetchError::Verify {
                                chunk: hex::encode(c.digest),
                                source_name: source.name().to_owned(),
                                problem,
                            }
                        }),
                        Err(e) => Err(e),
                    }
                }
            };
            if let Ok(b) = &r {
                if let Err(e) = self.store.put(c.digest, b.clone()) {
                    self.stats.not_cached.fetch_add(1, Ordering::Relaxed);
                    self.store.log_not_cached(layer, &c.digest, &e);
                }
            }
            results.push(r);
        }
        results
    }

    async fn fetch_range(
        &self,
        source: &dyn RangeSource,
        layer: &str,
        offset: u64,
        len: u64,
    ) -> Result<Bytes, FetchError> {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        self.stats.in_flight.fetch_add(1, Ordering::Relaxed);
        let started = std::time::Instant::now();
        let r = source.fetch(offset, len).await;
        self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.stats
            .latency
            .get_or_create(&vec![("source".to_owned(), source.name().to_owned())])
            .observe(started.elapsed().as_secs_f64());
        match r {
            Ok(b) if b.len() as u64 == len => {
                self.stats.bytes_fetched.fetch_add(len, Ordering::Relaxed);
                debug!(
                    source = source.name(),
                    layer,
                    offset,
                    len,
                    ms = started.elapsed().as_millis() as u64,
                    "fetched"
                );
                Ok(b)
            }
            Ok(b) => {
                self.stats.source_errors.fetch_add(1, Ordering::Relaxed);
                Err(FetchError::Source {
                    source_name: source.name().to_owned(),
                    message: format!(
                        "returned {} bytes for a {len}-byte range at {offset}",
                        b.len()
                    ),
                })
            }
            Err(message) => {
                self.stats.source_errors.fetch_add(1, Ordering::Relaxed);
                warn!(source = source.name(), offset, len, error = %message, "range fetch failed");
                Err(FetchError::Source {
                    source_name: source.name().to_owned(),
                    message,
                })
            }
        }
    }

    fn note_verify_failure(&self, layer: &str, c: &Chunk, source: &str, problem: &str) {
        self.stats.verify_failures.fetch_add(1, Ordering::Relaxed);
        error!(layer, chunk = %hex::encode(c.digest), file_offset = c.file_offset,
               blob_offset = c.blob_offset, source, problem, "chunk verification failed; bytes dropped");
    }
}

/// Splits `leads` (indices into `chunks`, ascending) into runs of chunks that
/// are adjacent in the blob, each at most [`MAX_MERGED_BYTES`] long.
fn runs<T>(chunks: &[Chunk], leads: &[(usize, T)]) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    for k in 1..=leads.len() {
        let split = k == leads.len() || {
            let prev = &chunks[leads[k - 1].0];
            let cur = &chunks[leads[k].0];
            let first = &chunks[leads[start].0];
            prev.blob_end != cur.blob_offset || cur.blob_end - first.blob_offset > MAX_MERGED_BYTES
        };
        if split {
            out.push(start..k);
            start = k;
        }
    }
    out
}
