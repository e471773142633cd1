//! One mounted remote layer: the bridge from FUSE reads to verified chunks.
//!
//! [`LayerReader`] implements `shoal_fuse::ChunkSource`. A read whose chunks
//! are all in the store is answered right on the FUSE worker; otherwise the
//! reply moves into a task on the tokio runtime, which fetches (merged,
//! single-flight, verified) and answers from there. A FUSE worker never waits
//! on the network.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use shoal_fuse::{ChunkSource, Entry, EntryKind, ReadReply};
use tokio::runtime::Handle;
use tracing::{debug, error, info};

use super::fetch::{Fetcher, Router, MAX_MERGED_BYTES};
use super::toc::{mtime, xattrs, Chunk, Compression, Toc, TocError, TOC_TAR_NAME};

/// Bytes served to FUSE, by where they came from.
#[derive(Debug, Default)]
pub struct ServedStats {
    /// Served from the local store without waiting.
    pub from_cache: AtomicU64,
    /// Served after a fetch.
    pub after_fetch: AtomicU64,
    /// Reads answered with EIO.
    pub errors: AtomicU64,
    /// Uncompressed chunk bytes that reads fetched themselves: not local,
    /// and not already on their way in a startup or background fetch.
    pub fetched_on_demand: AtomicU64,
}

/// Converts a verified TOC into FUSE entries. `data_id` is the entry's index
/// in `toc.entries` (and so in `toc.files`); the eStargz TOC file itself, if
/// any, comes last with `data_id == toc.entries.len()`.
///
/// # Errors
/// An entry with an unknown type or malformed xattrs.
pub fn entries(toc: &Toc) -> Result<Vec<Entry>, TocError> {
    entries_iter(toc).collect()
}

/// [`entries`] one at a time, for [`tree`]: the tree is built without a
/// second copy of every entry.
pub fn entries_iter(toc: &Toc) -> impl Iterator<Item = Result<Entry, TocError>> + '_ {
    layer_entries(toc).chain(toc.toc_file.as_ref().map(|f| {
        Ok(Entry {
            path: TOC_TAR_NAME.to_owned(),
            kind: EntryKind::File,
            mode: f.mode,
            uid: f.uid,
            gid: f.gid,
            mtime: f.mtime,
            size: f.json.len() as u64,
            data_id: toc.entries.len() as u64,
            ..Entry::default()
        })
    }))
}

/// The FUSE inode tree of a verified TOC, built entry by entry.
///
/// # Errors
/// An entry [`entries`] refuses, or one the tree refuses.
pub fn tree(toc: &Toc) -> Result<shoal_fuse::Tree, String> {
    let mut refused = None;
    let tree = shoal_fuse::Tree::build(
        entries_iter(toc).map_while(|r| r.map_err(|e| refused = Some(e)).ok()),
    );
    match refused {
        Some(e) => Err(e.to_string()),
        None => tree.map_err(|e| e.to_string()),
    }
}

fn layer_entries(toc: &Toc) -> impl Iterator<Item = Result<Entry, TocError>> + '_ {
    toc.entries.iter().enumerate().map(|(i, e)| {
        let kind = match e.kind.as_str() {
            "reg" => EntryKind::File,
            "dir" => EntryKind::Dir,
            "symlink" => EntryKind::Symlink,
            "hardlink" => EntryKind::Hardlink,
            "char" => EntryKind::CharDev,
            "block" => EntryKind::BlockDev,
            "fifo" => EntryKind::Fifo,
            other => {
                return Err(TocError::Entry {
                    name: e.name.clone(),
                    problem: format!("unknown entry type {other:?}"),
                })
            }
        };
        Ok(Entry {
            path: e.name.clone(),
            kind,
            mode: (e.mode & 0o7777) as u32,
            uid: e.uid,
            gid: e.gid,
            mtime: mtime(e),
            size: e.size,
            link_target: e.link_name.clone(),
            dev_major: e.dev_major,
            dev_minor: e.dev_minor,
            xattrs: xattrs(e)?,
            data_id: i as u64,
        })
    })
}

/// Serves one layer's file bytes.
pub struct LayerReader {
    /// Layer digest, for logs.
    pub layer: String,
    toc: Arc<Toc>,
    fetcher: Arc<Fetcher>,
    router: Arc<Router>,
    rt: Handle,
    stopped: AtomicBool,
    /// Quarantined (see [`super::identity`]): every read answers EIO.
    poisoned: AtomicBool,
    /// Counters.
    pub served: Arc<ServedStats>,
    /// First reads of files, for the startup profile.
    pub recorder: super::recorder::Recorder,
    /// Offer kernel passthrough for files laid out as whole-file objects.
    passthrough: bool,
    /// Objects this mount handed to the kernel as backing files.
    held: parking_lot::Mutex<std::collections::HashSet<[u8; 32]>>,
    /// Compressed bytes of following chunks a fetching read takes along.
    fetch_ahead: u64,
    /// Every chunk in blob order (built on the first read that fetches).
    by_offset: std::sync::OnceLock<Vec<Chunk>>,
}

/// Files at least this large are laid out as whole-file objects once all
/// their chunks are local, and then served by kernel passthrough. Smaller
/// files are cheap through the page cache, and a per-file object would cost
/// an inode and a copy each.
pub const PASSTHROUGH_MIN_BYTES: u64 = 1 << 20;

impl LayerReader {
    /// A reader for `toc`, fetching from the sources `router` picks on
    /// runtime `rt`, noting
    /// first reads in `recorder`.
    pub fn new(
        layer: String,
        toc: Arc<Toc>,
        fetcher: Arc<Fetcher>,
        router: Arc<Router>,
        rt: Handle,
        recorder: super::recorder::Recorder,
    ) -> LayerReader {
        LayerReader {
            layer,
            fetcher,
            router,
            rt,
            stopped: AtomicBool::new(false),
            poisoned: AtomicBool::new(false),
            passthrough: false,
            held: Default::default(),
            fetch_ahead: 0,
            by_offset: std::sync::OnceLock::new(),
            served: Arc::default(),
            recorder,
            toc,
        }
    }

    /// The layer's TOC.
    pub fn toc(&self) -> &Arc<Toc> {
        &self.toc
    }

    /// A read that has to fetch also takes along the chunks that follow its
    /// own in the blob, contiguous and not yet local, up to `bytes`
    /// compressed bytes, in the same request: the next files in the layer's
    /// order are often read next (a directory of modules), and on a link
    /// with latency one request for them beats one each.
    pub fn with_fetch_ahead(mut self, bytes: u64) -> LayerReader {
        self.fetch_ahead = bytes;
        self
    }

    /// The chunks a fetching read of `needed` takes along (see
    /// [`LayerReader::with_fetch_ahead`]).
    fn ahead(&self, needed: &[Chunk]) -> Vec<Chunk> {
        let Some(mut at) = needed.iter().map(|c| c.blob_end).max() else {
            return Vec::new();
        };
        if self.fetch_ahead == 0 {
            return Vec::new();
        }
        let all = self.by_offset.get_or_init(|| self.all_chunks());
        let store = self.fetcher.store();
        let start = at;
        let mut out = Vec::new();
        for c in &all[all.partition_point(|c| c.blob_offset < at)..] {
            if c.blob_offset != at
                || c.blob_end - start > self.fetch_ahead
                || store.contains(&c.digest)
            {
                break;
            }
            out.push(*c);
            at = c.blob_end;
        }
        out
    }

    /// Offers kernel passthrough for large files that are all local.
    pub fn with_passthrough(mut self, on: bool) -> LayerReader {
        self.passthrough = on;
        self
    }

    /// Asks background work for this layer to stop (on unmount), and lets
    /// GC have the objects it held as backing files.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Relaxed);
        let objects = self.fetcher.store().objects();
        for key in self.held.lock().drain() {
            objects.release(&key);
        }
    }

    /// Answers EIO for a read whose stored chunk has another length than
    /// this TOC says (see [`lengths_match`]), and counts it.
    fn length_mismatch(&self, data_id: u64, reply: ReadReply) {
        self.served.errors.fetch_add(1, Ordering::Relaxed);
        self.fetcher
            .stats
            .verify_failures
            .fetch_add(1, Ordering::Relaxed);
        error!(layer = %self.layer, data_id, "a stored chunk's length differs from the TOC's: EIO");
        reply.error(libc::EIO)
    }

    /// Whether the layer was unmounted.
    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Relaxed)
    }

    /// Stops serving bytes for good: the layer's content does not match the
    /// chain ID it was mounted under. Every later read answers EIO, and no
    /// backing file is handed out.
    pub fn poison(&self) {
        self.poisoned.store(true, Ordering::SeqCst);
        self.stop();
    }

    /// Whether [`LayerReader::poison`] was called.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::SeqCst)
    }

    /// A file's chunks as (digest, file offset, length), if it is large
    /// enough for a whole-file object.
    fn object_chunks(&self, data_id: usize) -> Option<Vec<([u8; 32], u64, u64)>> {
        let chunks = self.toc.files.get(data_id)?;
        let size: u64 = chunks.iter().map(|c| c.len).sum();
        (size >= PASSTHROUGH_MIN_BYTES).then(|| {
            chunks
                .iter()
                .map(|c| (c.digest, c.file_offset, c.len))
                .collect()
        })
    }

    /// Fetches every chunk not yet local (`background`: one request at a
    /// time, only while on-demand reads are quiet), then, with passthrough
    /// on, lays the large files out as whole-file objects.
    ///
    /// # Errors
    /// The first fetch error.
    pub async fn fetch_and_lay_out(self: Arc<Self>, background: bool) -> Result<(), String> {
        let started = std::time::Instant::now();
        self.fetch_all(self.all_chunks(), 1, background).await?;
        if self.stopped.load(Ordering::Relaxed) {
            return Ok(());
        }
        info!(layer = %self.layer, ms = started.elapsed().as_millis() as u64,
              "background fetch complete: layer fully local");
        if self.passthrough {
            let started = std::time::Instant::now();
            let me = self.clone();
            if let Ok((files, bytes)) =
                tokio::task::spawn_blocking(move || me.consolidate_all()).await
            {
                info!(layer = %self.layer, files, bytes, ms = started.elapsed().as_millis() as u64,
                      "large files laid out for kernel passthrough");
            }
        }
        Ok(())
    }

    /// Lays out every large file whose chunks are all local as a whole-file
    /// object (blocking disk I/O: run it off the runtime's workers).
    /// Returns files and bytes laid out.
    pub fn consolidate_all(&self) -> (u64, u64) {
        let (mut files, mut bytes) = (0, 0);
        let store = self.fetcher.store();
        for i in 0..self.toc.files.len() {
            if self.stopped.load(Ordering::Relaxed) {
                break;
            }
            let Some(chunks) = self.object_chunks(i) else {
                continue;
            };
            match store.consolidate(&chunks) {
                Ok(Some(o)) => {
                    files += 1;
                    bytes += o.size();
                }
                Ok(None) => {}
                Err(e) => {
                    error!(layer = %self.layer, error = %e, "cannot lay out a file object; it stays on the page-cache path");
                    break;
                }
            }
        }
        (files, bytes)
    }

    /// Fetches every chunk in `chunks` (in blob order), as merged requests,
    /// `parallel` at a time. Stops early when the layer is unmounted.
    ///
    /// # Errors
    /// The first fetch error.
    pub async fn fetch_all(
        &self,
        chunks: Vec<Chunk>,
        parallel: usize,
        background: bool,
    ) -> Result<(), String> {
        let mut batches: Vec<Vec<Chunk>> = Vec::new();
        for c in chunks {
            if self.fetcher.store().contains(&c.digest) {
                continue;
            }
            match batches.last_mut() {
                Some(b)
                    if b.last().unwrap().blob_end == c.blob_offset
                        && c.blob_end - b[0].blob_offset <= MAX_MERGED_BYTES =>
                {
                    b.push(c)
                }
                _ => batches.push(vec![c]),
            }
        }
        let sem = Arc::new(tokio::sync::Semaphore::new(parallel.max(1)));
        let mut set = tokio::task::JoinSet::new();
        for b in batches {
            let permit = sem.clone().acquire_owned().await.unwrap();
            // On-demand reads pre-empt both; every startup set goes before
            // any background batch (see `super::priority`). Asked after the
            // slot is ours, so the answer is fresh when the batch starts.
            if background {
                self.fetcher.priority().background_turn().await;
            } else {
                self.fetcher.priority().startup_turn().await;
            }
            if self.stopped.load(Ordering::Relaxed) {
                break;
            }
            let (fetcher, router, compression, layer) = (
                self.fetcher.clone(),
                self.router.clone(),
                self.toc.compression,
                self.layer.clone(),
            );
            set.spawn(async move {
                let r = fetcher.get(&router, compression, &layer, &b).await;
                drop(permit);
                r.map(drop).map_err(|e| e.to_string())
            });
        }
        let mut first_err = None;
        while let Some(r) = set.join_next().await {
            if let Ok(Err(e)) = r {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Chunks of the prefetch set (entries before the landmark), or none.
    pub fn prefetch_chunks(&self) -> Vec<Chunk> {
        let end = self.toc.prefetch_end.unwrap_or(0);
        self.all_chunks()
            .into_iter()
            .filter(|c| c.blob_offset < end)
            .collect()
    }

    /// Every chunk, in blob order.
    pub fn all_chunks(&self) -> Vec<Chunk> {
        let mut v: Vec<Chunk> = self.toc.files.iter().flatten().copied().collect();
        v.sort_by_key(|c| c.blob_offset);
        v.dedup_by_key(|c| c.blob_offset);
        v
    }

    /// Starts fetching the whole layer at low priority: after `delay`, one
    /// request at a time, and only when no startup set is in flight on any
    /// layer and on-demand reads are quiet (see [`super::priority`]), so a
    /// starting container's reads never queue behind it.
    pub fn spawn_background(self: &Arc<Self>, delay: std::time::Duration) {
        let me = self.clone();
        self.rt.spawn(async move {
            tokio::time::sleep(delay).await;
            match me.clone().fetch_and_lay_out(true).await {
                Ok(()) if !me.stopped.load(Ordering::Relaxed) => {}
                Ok(()) => debug!(layer = %me.layer, "background fetch stopped"),
                Err(e) => error!(layer = %me.layer, error = %e, "background fetch failed; reads will fetch on demand"),
            }
        });
    }
}

/// Whether each buffer has the length the TOC gives its chunk. A chunk is
/// stored by digest, so a hostile or broken TOC can name another layer's
/// chunk with a wrong length: the read then fails (EIO), it never slices
/// out of bounds.
fn lengths_match(chunks: &[Chunk], bufs: &[Bytes]) -> bool {
    chunks.len() == bufs.len()
        && chunks
            .iter()
            .zip(bufs)
            .all(|(c, b)| b.len() as u64 == c.len)
}

/// Copies `[offset, end)` of the file out of its chunks' bytes (whose
/// lengths [`lengths_match`] checked).
fn assemble(chunks: &[Chunk], bufs: &[Bytes], offset: u64, end: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity((end - offset) as usize);
    for (c, b) in chunks.iter().zip(bufs) {
        let from = offset.max(c.file_offset) - c.file_offset;
        let to = end.min(c.file_offset + c.len) - c.file_offset;
        out.extend_from_slice(&b[from as usize..to as usize]);
    }
    out
}

/// Counts `bytes` served to FUSE in the layer's counters and the daemon's
/// (which outlive the layer, for metrics).
fn count_served(layer: &ServedStats, fetcher: &Fetcher, cached: bool, bytes: u64) {
    let (mine, all) = if cached {
        (&layer.from_cache, &fetcher.stats.served_from_cache)
    } else {
        (&layer.after_fetch, &fetcher.stats.served_after_fetch)
    };
    mine.fetch_add(bytes, Ordering::Relaxed);
    all.fetch_add(bytes, Ordering::Relaxed);
}

impl ChunkSource for LayerReader {
    fn backing(&self, data_id: u64) -> Option<std::os::fd::OwnedFd> {
        if !self.passthrough || self.is_poisoned() {
            return None;
        }
        let chunks = self.object_chunks(usize::try_from(data_id).ok()?)?;
        let store = self.fetcher.store();
        let key = super::objects::key(chunks.iter().copied());
        let o = store.backing_object(&key)?;
        let f = std::fs::File::open(&o.path).ok()?;
        if self.held.lock().insert(key) {
            store.objects().hold(key);
        }
        self.fetcher
            .stats
            .passthrough_files
            .fetch_add(1, Ordering::Relaxed);
        Some(f.into())
    }

    /// Checks the file's object (once per process) before the mode
    /// decision, on the blocking pool when it is not checked yet: the check
    /// of a large object holds up only this open, never a FUSE worker. The
    /// open is answered once the check is over, so the kernel reads no
    /// unchecked object.
    fn prepare_backing(&self, data_id: u64, answer: Box<dyn FnOnce() + Send>) {
        let key = usize::try_from(data_id)
            .ok()
            .filter(|_| self.passthrough)
            .and_then(|i| self.object_chunks(i))
            .map(|chunks| super::objects::key(chunks.iter().copied()));
        let store = self.fetcher.store();
        match key {
            Some(key) if store.objects().get(&key).is_some() && !store.objects().verified(&key) => {
                let store = store.clone();
                // A runtime shut down drops `answer`: the open fails (EIO).
                self.rt.spawn_blocking(move || {
                    let _ = store.backing_object(&key);
                    answer();
                });
            }
            _ => answer(),
        }
    }

    fn read(&self, data_id: u64, file_size: u64, offset: u64, size: u32, reply: ReadReply) {
        if self.is_poisoned() {
            self.served.errors.fetch_add(1, Ordering::Relaxed);
            return reply.error(libc::EIO);
        }
        self.recorder.touch(data_id);
        if let (Some(f), true) = (&self.toc.toc_file, data_id == self.toc.entries.len() as u64) {
            let end = offset
                .saturating_add(u64::from(size))
                .min(f.json.len() as u64);
            let start = offset.min(end);
            count_served(&self.served, &self.fetcher, true, end - start);
            return reply.data(&f.json[start as usize..end as usize]);
        }
        let Some(chunks) = self.toc.files.get(data_id as usize) else {
            self.served.errors.fetch_add(1, Ordering::Relaxed);
            return reply.error(libc::EIO);
        };
        let end = offset.saturating_add(u64::from(size)).min(file_size);
        if offset >= end {
            return reply.data(&[]);
        }
        let first = chunks.partition_point(|c| c.file_offset + c.len <= offset);
        let last = chunks.partition_point(|c| c.file_offset < end);
        let needed = &chunks[first..last];
        let store = self.fetcher.store();
        if let Some(bufs) = needed
            .iter()
            .map(|c| store.get(&c.digest))
            .collect::<Option<Vec<_>>>()
        {
            if !lengths_match(needed, &bufs) {
                return self.length_mismatch(data_id, reply);
            }
            count_served(&self.served, &self.fetcher, true, end - offset);
            return match (needed, &bufs[..]) {
                // One chunk: reply straight from its buffer, no copy.
                ([c], [b]) => reply
                    .data(&b[(offset - c.file_offset) as usize..(end - c.file_offset) as usize]),
                _ => reply.data(&assemble(needed, &bufs, offset, end)),
            };
        }
        let needed = needed.to_vec();
        let ahead = self.ahead(&needed);
        let (fetcher, router, compression, layer) = (
            self.fetcher.clone(),
            self.router.clone(),
            self.toc.compression,
            self.layer.clone(),
        );
        let served = self.served.clone();
        let toc = self.toc.clone();
        self.rt.spawn(async move {
            let mut led = 0;
            if !ahead.is_empty() {
                // One request for the read's chunks and those that follow;
                // the read waits for its own only.
                let mut run = needed.clone();
                run.extend(ahead);
                run.sort_by_key(|c| c.blob_offset);
                led = fetcher.spawn_lead(router.clone(), compression, layer.clone(), run);
            }
            let result = fetcher
                .get_on_demand(&router, compression, &layer, &needed)
                .await;
            match result {
                Ok((bufs, _)) if !lengths_match(&needed, &bufs) => {
                    served.errors.fetch_add(1, Ordering::Relaxed);
                    fetcher.stats.verify_failures.fetch_add(1, Ordering::Relaxed);
                    error!(layer = %layer, data_id, "a stored chunk's length differs from the TOC's: EIO");
                    reply.error(libc::EIO);
                }
                Ok((bufs, more)) => {
                    served
                        .fetched_on_demand
                        .fetch_add(led + more, Ordering::Relaxed);
                    count_served(&served, &fetcher, false, end - offset);
                    reply.data(&assemble(&needed, &bufs, offset, end));
                }
                Err(e) => {
                    served.errors.fetch_add(1, Ordering::Relaxed);
                    let file = toc
                        .entries
                        .get(data_id as usize)
                        .map_or("?", |e| e.name.as_str());
                    error!(layer = %layer, file, offset, error = %e, "read failed: EIO");
                    reply.error(libc::EIO);
                }
            }
        });
    }
}

/// Compression of a layer, for logs.
pub fn compression_name(c: Compression) -> &'static str {
    match c {
        Compression::Gzip => "estargz",
        Compression::Zstd => "zstd:chunked",
    }
}
