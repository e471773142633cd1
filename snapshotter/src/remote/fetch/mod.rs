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
//! - Adjacent missing chunks (contiguous in the blob) that the
//!   [`Router`] sends to the same source are merged into one Range request
//!   of at most [`MAX_MERGED_BYTES`].
//!
//! # Layout
//! - [`source`]: the [`RangeSource`] trait and its typed [`SourceError`].
//! - [`router`]: which source each chunk comes from, and what happens on
//!   each error ([`Router`]).
//! - [`registry`]: the registry source; [`primed`]: the startup window.
//! - [`decode`]: decompression, verification and the store's write, on the
//!   blocking pool.
//! - [`priority`]: the gate between on-demand, startup and background
//!   fetches.
//! - [`stats`]: counters for status and metrics.

pub mod decode;
pub mod primed;
pub mod priority;
pub mod registry;
pub mod router;
mod runs;
pub mod source;
pub mod stats;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::watch;
use tracing::{debug, error, warn};

pub use decode::decode_chunk;
use decode::{decode_and_keep_async, Decoder, Kept, Settled};
use priority::Priority;
pub use router::{Route, Router};
pub(crate) use runs::extend_contiguous;
use runs::runs;
pub use source::{BoxFuture, RangeSource, Sink, SourceError, SourceKind};
pub use stats::{FetchStats, LatencyFamily, SourceBytes};

use super::store::ChunkStore;
use super::toc::{Chunk, Compression};

/// Largest merged Range request.
pub const MAX_MERGED_BYTES: u64 = 4 << 20;

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
        let mut m = self.fetcher.inflight.lock();
        for k in &self.keys {
            m.remove(k);
        }
    }
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
    /// missing from the sources `router` picks. `layer` names the layer in
    /// logs.
    ///
    /// # Errors
    /// [`FetchError`] if any chunk cannot be fetched and verified.
    pub async fn get(
        &self,
        router: &Router,
        compression: Compression,
        layer: &str,
        chunks: &[Chunk],
    ) -> Result<Vec<Bytes>, FetchError> {
        self.fetch(router, compression, layer, chunks, false)
            .await
            .map(|(bufs, _)| bufs)
    }

    /// [`Fetcher::get`] for a reader that is waiting: a fetch it leads
    /// itself counts as on-demand (startup and background batches give way
    /// to it, see [`Priority`]); waiting for chunks another fetch already
    /// has under way does not. Also returns the uncompressed bytes of the
    /// chunks it fetched itself.
    ///
    /// # Errors
    /// As [`Fetcher::get`].
    pub async fn get_on_demand(
        &self,
        router: &Router,
        compression: Compression,
        layer: &str,
        chunks: &[Chunk],
    ) -> Result<(Vec<Bytes>, u64), FetchError> {
        self.fetch(router, compression, layer, chunks, true).await
    }

    /// Starts fetching, for a reader, every chunk of `chunks` (in blob
    /// order) that is neither local nor already on its way, in a task; the
    /// reader then waits for the chunks it needs with
    /// [`Fetcher::get_on_demand`], and each arrives as soon as it is in
    /// (the rest of the run keeps streaming). Counts as on-demand. Returns
    /// the uncompressed bytes it took the lead for.
    pub fn spawn_lead(
        self: &Arc<Self>,
        router: Arc<Router>,
        compression: Compression,
        layer: String,
        chunks: Vec<Chunk>,
    ) -> u64 {
        let mut out: Vec<Option<Bytes>> = vec![None; chunks.len()];
        let (_, leads) = self.plan(&chunks, &mut out);
        if leads.is_empty() {
            return 0;
        }
        let led: u64 = leads.iter().map(|(i, _)| chunks[*i].len).sum();
        self.stats
            .fetched_on_demand
            .fetch_add(led, Ordering::Relaxed);
        let demand = self.priority.demand();
        let me = self.clone();
        tokio::spawn(async move {
            me.lead(&router, compression, &layer, &chunks, &leads).await;
            drop(demand);
        });
        led
    }

    /// Fetches the chunks this caller leads, merged run by run (runs are
    /// cut where the router's route changes); each chunk's waiters are
    /// answered as it arrives (in `fetch_run`), and the in-flight entries go
    /// when this returns. Runs from the primed window are read alongside the
    /// others (its bytes are on their way already). Returns (index into
    /// `chunks`, result) per led chunk.
    async fn lead(
        &self,
        router: &Router,
        compression: Compression,
        layer: &str,
        chunks: &[Chunk],
        leads: &[(usize, Lead)],
    ) -> Vec<(usize, Result<Bytes, FetchError>)> {
        let _guard = LeadGuard {
            fetcher: self,
            keys: leads.iter().map(|(i, _)| chunks[*i].digest).collect(),
        };
        let routes: Vec<Route> = leads
            .iter()
            .map(|(i, _)| router.route(&chunks[*i]))
            .collect();
        let (primed, rest): (Vec<_>, Vec<_>) = runs(chunks, leads, &routes)
            .into_iter()
            .partition(|run| routes[run.start] == Route::Primed);
        let routes = &routes;
        let go = |runs: Vec<std::ops::Range<usize>>| async move {
            let mut out = Vec::new();
            for run in runs {
                let route = routes[run.start];
                let result = self
                    .fetch_run(
                        router,
                        route,
                        compression,
                        layer,
                        chunks,
                        &leads[run.clone()],
                    )
                    .await;
                out.extend(leads[run].iter().map(|(i, _)| *i).zip(result));
            }
            out
        };
        let (mut a, b) = tokio::join!(go(primed), go(rest));
        a.extend(b);
        a
    }

    async fn fetch(
        &self,
        router: &Router,
        compression: Compression,
        layer: &str,
        chunks: &[Chunk],
        on_demand: bool,
    ) -> Result<(Vec<Bytes>, u64), FetchError> {
        let mut out: Vec<Option<Bytes>> = vec![None; chunks.len()];
        let mut led_bytes = 0;
        for _attempt in 0..3 {
            let (waits, leads) = self.plan(chunks, &mut out);
            if !leads.is_empty() {
                let _demand = on_demand.then(|| self.priority.demand());
                led_bytes += leads.iter().map(|(i, _)| chunks[*i].len).sum::<u64>();
                let mut first_err = None;
                for (i, r) in self.lead(router, compression, layer, chunks, &leads).await {
                    match r {
                        Ok(b) => out[i] = Some(b),
                        Err(e) => {
                            first_err.get_or_insert(e);
                        }
                    }
                }
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
        let bufs = out
            .into_iter()
            .zip(chunks)
            .map(|(b, c)| b.ok_or_else(|| FetchError::Abandoned(hex::encode(c.digest))))
            .collect::<Result<_, _>>()?;
        if on_demand {
            self.stats
                .fetched_on_demand
                .fetch_add(led_bytes, Ordering::Relaxed);
        }
        Ok((bufs, led_bytes))
    }

    /// Decides, for every chunk of `chunks` not yet in `out`, whether it is
    /// ready (filled in), being fetched by another reader (wait), or ours to
    /// fetch (lead). The decisions are taken under one hold of the in-flight
    /// lock, so two readers of the same chunks never split them between
    /// them: one leads every missing chunk (as merged runs), the other waits.
    /// No file is read under the lock: a chunk that the store's records
    /// hold by then (its leader just finished) is read after the lock goes,
    /// and led in a second pass only if that read misses.
    #[allow(clippy::type_complexity)]
    fn plan(
        &self,
        chunks: &[Chunk],
        out: &mut [Option<Bytes>],
    ) -> (Vec<(usize, Slot)>, Vec<(usize, Lead)>) {
        let (mut waits, mut leads) = (Vec::new(), Vec::new());
        let mut todo: Vec<usize> = (0..chunks.len()).filter(|&i| out[i].is_none()).collect();
        for pass in 0..2 {
            // The store first, without the lock (disk reads).
            for &i in &todo {
                out[i] = self.store.get(&chunks[i].digest);
            }
            let mut again = Vec::new();
            let mut m = self.inflight.lock();
            for &i in &todo {
                let c = &chunks[i];
                if out[i].is_some() {
                    continue;
                }
                if let Some(rx) = m.get(&c.digest) {
                    waits.push((i, rx.clone()));
                    continue;
                }
                // A leader may have finished between the store lookup and
                // taking the lock.
                if pass == 0 && self.store.known(&c.digest) {
                    again.push(i);
                    continue;
                }
                let (tx, rx) = watch::channel(None);
                m.insert(c.digest, rx);
                leads.push((i, tx));
            }
            drop(m);
            if again.is_empty() {
                break;
            }
            todo = again;
        }
        // Runs are cut from leads in chunk order.
        leads.sort_by_key(|(i, _)| *i);
        (waits, leads)
    }

    /// Fetches one merged run and returns a result per chunk. The range is
    /// streamed: each chunk is verified, stored and handed to its waiters as
    /// soon as its last byte is in, so a reader of the run's first chunk
    /// does not wait for the run's end. Decoding and the store's write run
    /// on the blocking pool ([`Decoder`]), overlapping the transfer.
    #[allow(clippy::too_many_arguments)]
    async fn fetch_run(
        &self,
        router: &Router,
        route: Route,
        compression: Compression,
        layer: &str,
        chunks: &[Chunk],
        run: &[(usize, Lead)],
    ) -> Vec<Result<Bytes, FetchError>> {
        let first = &chunks[run[0].0];
        let last = &chunks[run[run.len() - 1].0];
        let (start, end) = (first.blob_offset, last.blob_end);
        let mut results: Vec<Option<Result<Bytes, FetchError>>> = vec![None; run.len()];
        let mut failed = Vec::new();
        let mut next = 0;
        let mut decoder = Decoder::new(Arc::clone(&self.store), compression);
        // The run's bytes so far: blob offsets [start, start + have.len()).
        let mut have: Vec<u8> = Vec::new();
        let (sink, mut pieces) = tokio::sync::mpsc::unbounded_channel();
        let fetch = self.fetch_range(router, route, layer, start, end - start, Some(sink));
        tokio::pin!(fetch);
        let outcome = loop {
            tokio::select! {
                r = &mut fetch => break r,
                Some(p) = pieces.recv() => {
                    extend_contiguous(&mut have, start, p);
                    while next < run.len() && chunks[run[next].0].blob_end - start <= have.len() as u64 {
                        let c = chunks[run[next].0];
                        let span = (c.blob_offset - start) as usize..(c.blob_end - start) as usize;
                        decoder.send(next, c, Bytes::copy_from_slice(&have[span]));
                        next += 1;
                    }
                }
                Some(s) = decoder.next(), if decoder.pending() > 0 => {
                    self.settle(layer, router.source(route).name(), chunks, run, s, &mut results, &mut failed);
                }
            }
        };
        match outcome {
            Ok(data) => {
                for k in next..run.len() {
                    let c = chunks[run[k].0];
                    let span = (c.blob_offset - start) as usize..(c.blob_end - start) as usize;
                    decoder.send(k, c, data.slice(span));
                }
            }
            Err(e) => {
                for k in next..run.len() {
                    let _ = run[k].1.send(Some(Err(e.clone())));
                    results[k] = Some(Err(e.clone()));
                }
            }
        }
        while let Some(s) = decoder.next().await {
            self.settle(
                layer,
                router.source(route).name(),
                chunks,
                run,
                s,
                &mut results,
                &mut failed,
            );
        }
        drop(decoder);
        // A decoder that died settled nothing more: refetch those too.
        for (k, r) in results.iter().enumerate() {
            if r.is_none() && !failed.contains(&k) {
                failed.push(k);
            }
        }
        // Chunks that did not verify: once more each, alone, from where the
        // router sends re-fetches.
        let again = router.refetch_route(route);
        let source = router.source(again);
        for k in failed {
            let c = chunks[run[k].0];
            let r = match self
                .fetch_range(
                    router,
                    again,
                    layer,
                    c.blob_offset,
                    c.blob_end - c.blob_offset,
                    None,
                )
                .await
            {
                Ok(again) => {
                    let store = Arc::clone(&self.store);
                    match decode_and_keep_async(store, compression, c, again).await {
                        Ok(kept) => Ok(self.kept(layer, &c, kept)),
                        Err(problem) => {
                            self.note_verify_failure(layer, &c, source.name(), &problem);
                            Err(FetchError::Verify {
                                chunk: hex::encode(c.digest),
                                source_name: source.name().to_owned(),
                                problem,
                            })
                        }
                    }
                }
                Err(e) => Err(e),
            };
            let _ = run[k].1.send(Some(r.clone()));
            results[k] = Some(r);
        }
        results
            .into_iter()
            .map(|r| r.expect("every chunk of the run settled"))
            .collect()
    }

    /// Takes one decoded chunk of the run: a good chunk (stored by the
    /// decoder) goes to its waiters now, a bad one is noted and left for a
    /// refetch.
    #[allow(clippy::too_many_arguments)]
    fn settle(
        &self,
        layer: &str,
        source: &str,
        chunks: &[Chunk],
        run: &[(usize, Lead)],
        (k, r): Settled,
        results: &mut [Option<Result<Bytes, FetchError>>],
        failed: &mut Vec<usize>,
    ) {
        let c = &chunks[run[k].0];
        match r {
            Ok(kept) => {
                let b = self.kept(layer, c, kept);
                let _ = run[k].1.send(Some(Ok(b.clone())));
                results[k] = Some(Ok(b));
            }
            Err(problem) => {
                self.note_verify_failure(layer, c, source, &problem);
                failed.push(k);
            }
        }
    }

    /// Counts a verified chunk that the store kept in memory only.
    fn kept(&self, layer: &str, c: &Chunk, (b, not_cached): Kept) -> Bytes {
        if let Some(e) = not_cached {
            self.stats.not_cached.fetch_add(1, Ordering::Relaxed);
            self.store.log_not_cached(layer, &c.digest, &e);
        }
        b
    }

    /// One request for blob bytes `[offset, offset + len)` on `route`,
    /// following the router to the next route when it fails.
    async fn fetch_range(
        &self,
        router: &Router,
        mut route: Route,
        layer: &str,
        offset: u64,
        len: u64,
        sink: Option<Sink>,
    ) -> Result<Bytes, FetchError> {
        loop {
            let source = router.source(route);
            match self.request(source, layer, offset, len, sink.clone()).await {
                Err(e) => match router.on_error(route, &e) {
                    Some(next) => {
                        debug!(layer, offset, len, from = source.name(), error = %e,
                               "source could not serve the range; routed on");
                        route = next;
                    }
                    None => {
                        self.stats.source_errors.fetch_add(1, Ordering::Relaxed);
                        warn!(source = source.name(), offset, len, error = %e, "range fetch failed");
                        return Err(FetchError::Source {
                            source_name: source.name().to_owned(),
                            message: e.to_string(),
                        });
                    }
                },
                Ok(b) => return Ok(b),
            }
        }
    }

    /// One request to `source`, counted by its kind.
    async fn request(
        &self,
        source: &dyn RangeSource,
        layer: &str,
        offset: u64,
        len: u64,
        sink: Option<Sink>,
    ) -> Result<Bytes, SourceError> {
        let kind = source.kind();
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        self.stats.in_flight.fetch_add(1, Ordering::Relaxed);
        let started = std::time::Instant::now();
        let r = match sink {
            Some(sink) => source.fetch_streamed(offset, len, sink).await,
            None => source.fetch(offset, len).await,
        };
        self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.stats
            .latency
            .get_or_create(&vec![("source".to_owned(), kind.label().to_owned())])
            .observe(started.elapsed().as_secs_f64());
        match r {
            Ok(b) if b.len() as u64 == len => {
                self.stats.bytes_fetched.fetch_add(len, Ordering::Relaxed);
                self.stats.by_source.add(kind, len);
                debug!(
                    source = kind.label(),
                    from = source.name(),
                    layer,
                    offset,
                    len,
                    ms = started.elapsed().as_millis() as u64,
                    "fetched"
                );
                Ok(b)
            }
            Ok(b) => Err(SourceError::Lied(format!(
                "{} returned {} bytes for a {len}-byte range at {offset}",
                source.name(),
                b.len()
            ))),
            Err(e) => Err(e),
        }
    }

    fn note_verify_failure(&self, layer: &str, c: &Chunk, source: &str, problem: &str) {
        self.stats.verify_failures.fetch_add(1, Ordering::Relaxed);
        error!(layer, chunk = %hex::encode(c.digest), file_offset = c.file_offset,
               blob_offset = c.blob_offset, source, problem, "chunk verification failed; bytes dropped");
    }
}
