//! The local chunk store: verified, uncompressed chunks keyed by their
//! sha256, on disk under `ROOT/chunks/` with a bounded in-memory LRU in front,
//! and an index (size, last access, pins) in the snapshots' redb database
//! ([`super::index`]).
//!
//! Invariants:
//! - Only bytes whose sha256 equals their key are ever inserted; callers
//!   verify before [`ChunkStore::put`], and `put` re-checks nothing (hashing
//!   twice costs a full pass).
//! - A chunk becomes visible on disk only by `rename` of a fully written and
//!   fsync'd temp file, so readers never see a partial file under a final
//!   name.
//! - Each file is a 16-byte header (`SHC1`, crc32 of the data, data length)
//!   and the data. [`ChunkStore::get`] checks length and crc32 of what it
//!   reads from disk (not from memory): a torn write after a power cut, or bit
//!   rot, turns into a miss and the chunk is fetched again. A file without
//!   the header (written by an older version) is checked by its sha256.
//!   docs/ARCHITECTURE.md gives the measurements behind this choice.
//! - A full disk (or a cache at `max_bytes`) is not an error for readers:
//!   `put` reports it, the chunk is still served from memory, and the caller
//!   counts it; the store logs it loudly at most every [`FULL_LOG_EVERY`].
//! - [`ChunkStore::evict`] never removes a chunk while a reader is reading its
//!   file (the `busy` guard).

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use lru::LruCache;
use parking_lot::Mutex;
use sha2::{Digest as _, Sha256};
use tracing::{error, warn};

use super::clock::{Clock, SystemClock};
use super::index::ChunkIndex;
use super::objects::{self, Objects};

/// Default byte budget of the in-memory chunk cache.
pub const DEFAULT_MEMORY_BYTES: u64 = 256 << 20;
/// Bytes of the header in front of each chunk file.
pub const HEADER_LEN: usize = 16;
const MAGIC: &[u8; 4] = b"SHC1";
/// Shortest interval between two "cannot cache" log lines.
pub const FULL_LOG_EVERY: u64 = 10;

/// Counters, readable at any time.
#[derive(Debug, Default)]
pub struct StoreStats {
    /// Chunks served from memory.
    pub memory_hits: AtomicU64,
    /// Chunks served from disk (after re-verification).
    pub disk_hits: AtomicU64,
    /// Lookups that found nothing usable.
    pub misses: AtomicU64,
    /// Disk files that failed re-verification and were dropped.
    pub corrupt_on_disk: AtomicU64,
    /// Chunks that could not be written (I/O error, e.g. disk full).
    pub write_failures: AtomicU64,
    /// Chunks not written because the cache was at `max_bytes`.
    pub at_limit: AtomicU64,
    /// Chunks removed by GC.
    pub evicted: AtomicU64,
    /// Bytes removed by GC.
    pub evicted_bytes: AtomicU64,
}

/// Capacity limits in bytes; `max_bytes == 0` means no limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    /// The cache never grows past this: chunks beyond it are served
    /// uncached.
    pub max_bytes: u64,
    /// Crossing this wakes GC.
    pub high_bytes: u64,
    /// GC evicts down to this.
    pub low_bytes: u64,
}

/// What [`ChunkStore::evict`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Evicted {
    /// Removed; this many bytes freed.
    Freed(u64),
    /// A reader is reading it; left alone.
    Busy,
    /// Not stored.
    Missing,
}

struct Memory {
    lru: LruCache<[u8; 32], Bytes>,
    bytes: u64,
}

/// Content-addressed chunk store.
pub struct ChunkStore {
    dir: PathBuf,
    tmp: PathBuf,
    memory: Mutex<Memory>,
    memory_limit: u64,
    seq: AtomicU64,
    /// Bytes of chunks being written: counted against `max_bytes` from the
    /// check until the index holds them, so concurrent writers cannot
    /// together overshoot the limit.
    writing: Mutex<u64>,
    index: ChunkIndex,
    clock: Arc<dyn Clock>,
    limits: Mutex<Limits>,
    /// Readers per chunk currently reading its file.
    busy: Mutex<HashMap<[u8; 32], u32>>,
    /// When the cache was last found full (disk ENOSPC or `max_bytes`).
    last_full: AtomicU64,
    /// When a write last failed with ENOSPC (the disk truly full).
    last_enospc: AtomicU64,
    last_full_log: AtomicU64,
    /// Woken when usage crosses the high watermark or the disk is full.
    pub gc_wake: tokio::sync::Notify,
    /// Whole-file objects (passthrough backing files); their chunks are
    /// read from there.
    objects: Objects,
    /// Counters.
    pub stats: StoreStats,
}

/// Decrements a chunk's reader count when the read is over.
struct ReadGuard<'a> {
    store: &'a ChunkStore,
    digest: [u8; 32],
}

impl Drop for ReadGuard<'_> {
    fn drop(&mut self) {
        let mut b = self.store.busy.lock();
        if let Some(n) = b.get_mut(&self.digest) {
            *n -= 1;
            if *n == 0 {
                b.remove(&self.digest);
            }
        }
    }
}

/// The chunk in a file's bytes, if they check out against `digest`.
fn verify_file(data: Vec<u8>, digest: &[u8; 32]) -> Option<Bytes> {
    if data.len() >= HEADER_LEN && &data[..4] == MAGIC {
        let crc = u32::from_le_bytes(data[4..8].try_into().unwrap());
        let len = u64::from_le_bytes(data[8..16].try_into().unwrap());
        if len == (data.len() - HEADER_LEN) as u64 && crc32fast::hash(&data[HEADER_LEN..]) == crc {
            return Some(Bytes::from(data).slice(HEADER_LEN..));
        }
    }
    // No valid header: a chunk from before the header, checked in full.
    (Sha256::digest(&data).as_slice() == digest).then(|| Bytes::from(data))
}

fn header(data: &[u8]) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..4].copy_from_slice(MAGIC);
    h[4..8].copy_from_slice(&crc32fast::hash(data).to_le_bytes());
    h[8..].copy_from_slice(&(data.len() as u64).to_le_bytes());
    h
}

impl ChunkStore {
    /// Opens the store in `dir` (created private, mode 0700). Temp files a
    /// crash left behind are removed by [`ChunkStore::remove_stale_temp`],
    /// which the caller runs once it holds the root lock.
    ///
    /// # Errors
    /// The directories cannot be created.
    pub fn open(dir: &Path, memory_limit: u64) -> io::Result<ChunkStore> {
        Self::open_with_clock(dir, memory_limit, Arc::new(SystemClock))
    }

    /// [`ChunkStore::open`] with the clock that stamps accesses.
    ///
    /// # Errors
    /// The directories cannot be created.
    pub fn open_with_clock(
        dir: &Path,
        memory_limit: u64,
        clock: Arc<dyn Clock>,
    ) -> io::Result<ChunkStore> {
        let tmp = dir.join("tmp");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&tmp)?;
        let objects = Objects::open(&dir.join("files"))?;
        Ok(ChunkStore {
            objects,
            dir: dir.to_owned(),
            tmp,
            memory: Mutex::new(Memory {
                lru: LruCache::unbounded(),
                bytes: 0,
            }),
            memory_limit,
            seq: AtomicU64::new(0),
            writing: Mutex::new(0),
            index: ChunkIndex::default(),
            clock,
            limits: Mutex::new(Limits::default()),
            busy: Mutex::new(HashMap::new()),
            last_full: AtomicU64::new(0),
            last_enospc: AtomicU64::new(0),
            last_full_log: AtomicU64::new(0),
            gc_wake: tokio::sync::Notify::new(),
            stats: StoreStats::default(),
        })
    }

    /// Sets the capacity limits.
    pub fn set_limits(&self, limits: Limits) {
        *self.limits.lock() = limits;
    }

    /// The capacity limits.
    pub fn limits(&self) -> Limits {
        *self.limits.lock()
    }

    /// The index (sizes, access times, pins).
    pub fn index(&self) -> &ChunkIndex {
        &self.index
    }

    /// The clock.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// When the cache was last found full (seconds since the epoch; 0:
    /// never).
    pub fn last_full(&self) -> u64 {
        self.last_full.load(Ordering::Relaxed)
    }

    /// When a write last failed because the disk was full (0: never).
    pub fn last_enospc(&self) -> u64 {
        self.last_enospc.load(Ordering::Relaxed)
    }

    /// Removes partially written chunks left by a process that died. Only
    /// call with the root lock held: a live daemon's writes are in there.
    pub fn remove_stale_temp(&self) {
        if let Ok(entries) = fs::read_dir(&self.tmp) {
            for e in entries.flatten() {
                let _ = fs::remove_file(e.path());
            }
        }
    }

    /// Every chunk file on disk: digest and file size. Names that are not a
    /// digest in the right directory are ignored.
    pub fn scan(&self) -> Vec<([u8; 32], u64)> {
        let mut out = Vec::new();
        let Ok(dirs) = fs::read_dir(&self.dir) else {
            return out;
        };
        for d in dirs.flatten() {
            let name = d.file_name();
            let Some(prefix) = name.to_str().filter(|n| n.len() == 2) else {
                continue;
            };
            let Ok(files) = fs::read_dir(d.path()) else {
                continue;
            };
            for f in files.flatten() {
                let Some(hex) = f.file_name().to_str().map(str::to_owned) else {
                    continue;
                };
                let mut digest = [0u8; 32];
                if !hex.starts_with(prefix) || hex::decode_to_slice(&hex, &mut digest).is_err() {
                    continue;
                }
                if let Ok(md) = f.metadata() {
                    out.push((digest, md.len()));
                }
            }
        }
        // Chunks in whole-file objects count as if in their own file.
        out.extend(
            self.objects
                .chunks()
                .into_iter()
                .map(|(d, len)| (d, len + HEADER_LEN as u64)),
        );
        out
    }

    /// Scans the disk and attaches the index to `db` (once, at start, with
    /// the root lock held).
    ///
    /// # Errors
    /// The database failed.
    pub fn attach_index(&self, db: Arc<redb::Database>) -> Result<(), redb::Error> {
        let on_disk = self.scan();
        self.index.attach(db, on_disk, self.clock.now())
    }

    fn path(&self, digest: &[u8; 32]) -> PathBuf {
        let hex = hex::encode(digest);
        self.dir.join(&hex[..2]).join(hex)
    }

    /// The verified chunk `digest`, if present in memory or on disk.
    pub fn get(&self, digest: &[u8; 32]) -> Option<Bytes> {
        if let Some(b) = self.memory.lock().lru.get(digest) {
            self.stats.memory_hits.fetch_add(1, Ordering::Relaxed);
            let b = b.clone();
            self.index.touch(digest, self.clock.now());
            return Some(b);
        }
        if let Some(b) = self.get_from_object(digest) {
            return Some(b);
        }
        let path = self.path(digest);
        let read = self.reading(digest, || fs::read(&path));
        // Moved into an object between the two looks (see `consolidate`).
        let read = match read {
            Err(e) if e.kind() == io::ErrorKind::NotFound => match self.get_from_object(digest) {
                Some(b) => return Some(b),
                None => Err(e),
            },
            r => r,
        };
        match read.map(|data| verify_file(data, digest)) {
            Ok(Some(b)) => Some(self.disk_hit(digest, b)),
            Ok(None) => {
                self.stats.corrupt_on_disk.fetch_add(1, Ordering::Relaxed);
                warn!(chunk = %hex::encode(digest), path = %path.display(),
                      "cached chunk failed verification; dropping it");
                let _ = fs::remove_file(&path);
                self.index.remove(digest);
                self.stats.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
            Err(_) => {
                self.stats.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Counts a verified chunk read from disk, notes the access, keeps it
    /// in memory.
    fn disk_hit(&self, digest: &[u8; 32], b: Bytes) -> Bytes {
        self.stats.disk_hits.fetch_add(1, Ordering::Relaxed);
        self.index.touch(digest, self.clock.now());
        self.remember(*digest, b.clone());
        b
    }

    /// Runs `f` (a disk read of chunk `digest`) with the reader guard
    /// held, so GC leaves the chunk alone meanwhile.
    fn reading<T>(&self, digest: &[u8; 32], f: impl FnOnce() -> T) -> T {
        *self.busy.lock().entry(*digest).or_insert(0) += 1;
        let _guard = ReadGuard {
            store: self,
            digest: *digest,
        };
        f()
    }

    /// Whether `digest` is stored (without reading it).
    pub fn contains(&self, digest: &[u8; 32]) -> bool {
        self.memory.lock().lru.contains(digest) || self.on_disk(digest)
    }

    /// Whether the store's records (memory, index, objects) hold `digest`:
    /// no file IO, so callers may ask under their own locks.
    pub fn known(&self, digest: &[u8; 32]) -> bool {
        self.memory.lock().lru.contains(digest)
            || self.index.contains(digest)
            || self.objects.locate(digest).is_some()
    }

    /// Whether `digest` is stored on disk (not just in memory).
    pub fn on_disk(&self, digest: &[u8; 32]) -> bool {
        self.index.contains(digest)
            || self.objects.locate(digest).is_some()
            || self.path(digest).exists()
    }

    /// The whole-file objects.
    pub fn objects(&self) -> &Objects {
        &self.objects
    }

    /// Chunk `digest` read from a whole-file object (crc32-checked), if one
    /// holds it. An object that fails the check is removed whole (unless a
    /// mounted layer holds it as a backing file: then only this read
    /// misses, and the error is logged).
    fn get_from_object(&self, digest: &[u8; 32]) -> Option<Bytes> {
        let (o, p) = self.objects.locate(digest)?;
        let read = self.reading(digest, || self.objects.read(&o, &p));
        match read {
            Ok(Some(b)) => Some(self.disk_hit(digest, b)),
            Ok(None) => {
                self.stats.corrupt_on_disk.fetch_add(1, Ordering::Relaxed);
                error!(chunk = %hex::encode(digest), object = %o.path.display(),
                       "chunk in a file object failed its crc32; dropping the object");
                if self.objects.remove(&o.key).is_ok() {
                    self.forget_object_chunks(&o);
                }
                self.stats.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
            Err(_) => None,
        }
    }

    /// A whole-file object to hand to the kernel as a passthrough backing
    /// file: its crc32s are checked once per process first; one that fails
    /// is removed whole (its chunks are fetched again on demand).
    pub fn backing_object(&self, key: &[u8; 32]) -> Option<Arc<objects::Object>> {
        let o = self.objects.get(key)?;
        match self.objects.verify_once(&o) {
            Ok(true) => Some(o),
            Ok(false) => {
                self.stats.corrupt_on_disk.fetch_add(1, Ordering::Relaxed);
                error!(object = %o.path.display(),
                       "file object failed its crc32 check; dropping it");
                if self.objects.remove(&o.key).is_ok() {
                    self.forget_object_chunks(&o);
                }
                None
            }
            Err(e) => {
                warn!(object = %o.path.display(), error = %e, "cannot check a file object");
                None
            }
        }
    }

    /// Drops index and memory entries of a removed object's chunks that no
    /// longer live anywhere on disk; returns the index bytes freed.
    fn forget_object_chunks(&self, o: &objects::Object) -> u64 {
        let mut freed = 0;
        for c in &o.chunks {
            if self.objects.locate(&c.digest).is_some() || self.path(&c.digest).exists() {
                continue;
            }
            if let Some(e) = self.index.remove(&c.digest) {
                freed += e.size;
            }
            let mut m = self.memory.lock();
            if let Some(b) = m.lru.pop(&c.digest) {
                m.bytes -= b.len() as u64;
            }
        }
        freed
    }

    /// Lays the chunks of one file (digest, file offset, length; end to end
    /// from 0) out as a whole-file object, then drops their per-chunk files.
    /// Returns the object, or `None` if some chunk is not stored or the
    /// cache has no room for the moment's second copy. Already laid out:
    /// returns the existing object.
    ///
    /// # Errors
    /// Writing the object failed (the chunks stay where they were).
    pub fn consolidate(
        &self,
        chunks: &[([u8; 32], u64, u64)],
    ) -> io::Result<Option<Arc<objects::Object>>> {
        let key = objects::key(chunks.iter().copied());
        if let Some(o) = self.objects.get(&key) {
            return Ok(Some(o));
        }
        // The object is written before the chunk files go: room for a
        // second copy of the file, for a moment, within max_bytes.
        let size: u64 = chunks.iter().map(|c| c.2).sum();
        let max = self.limits().max_bytes;
        if max > 0 && self.index.used().saturating_add(size) > max {
            return Ok(None);
        }
        let mut parts = Vec::with_capacity(chunks.len());
        for &(d, off, len) in chunks {
            match self.get(&d) {
                Some(b) if b.len() as u64 == len => parts.push((d, off, b)),
                _ => return Ok(None),
            }
        }
        let o = self.objects.write(key, &parts, &self.tmp)?;
        let now = self.clock.now();
        for (d, _, b) in &parts {
            // GC may have dropped the index entry while we read.
            if !self.index.contains(d) {
                self.index.insert(*d, (b.len() + HEADER_LEN) as u64, now);
            }
            // Readers look in objects first, and again on NotFound.
            let _ = fs::remove_file(self.path(d));
        }
        Ok(Some(o))
    }

    /// Stores a chunk the caller has verified. It is always kept in memory;
    /// the disk write may be refused (cache at `max_bytes`) or fail (disk
    /// full), which is returned for the caller to count; no partial file is
    /// left behind, and GC is woken.
    ///
    /// # Errors
    /// The chunk was not written to disk.
    pub fn put(&self, digest: [u8; 32], data: Bytes) -> io::Result<()> {
        self.remember(digest, data.clone());
        let now = self.clock.now();
        if self.index.contains(&digest) {
            self.index.touch(&digest, now);
            return Ok(());
        }
        let path = self.path(&digest);
        if let Ok(md) = fs::metadata(&path) {
            self.index.insert(digest, md.len(), now);
            return Ok(());
        }
        let size = (HEADER_LEN + data.len()) as u64;
        let limits = self.limits();
        {
            // Check and reserve under one lock; the reservation is released
            // once the index counts the chunk (or the write failed).
            let mut writing = self.writing.lock();
            if limits.max_bytes > 0
                && self
                    .index
                    .used()
                    .saturating_add(*writing)
                    .saturating_add(size)
                    > limits.max_bytes
            {
                drop(writing);
                self.stats.at_limit.fetch_add(1, Ordering::Relaxed);
                self.note_full(now);
                return Err(io::Error::new(
                    io::ErrorKind::StorageFull,
                    format!("chunk cache is at max_bytes ({})", limits.max_bytes),
                ));
            }
            *writing += size;
        }
        let tmp = self.tmp.join(format!(
            "{}-{}",
            hex::encode(&digest[..8]),
            self.seq.fetch_add(1, Ordering::Relaxed)
        ));
        let res = (|| {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(&header(&data))?;
            f.write_all(&data)?;
            f.sync_data()?;
            fs::create_dir_all(path.parent().unwrap())?;
            fs::rename(&tmp, &path)
        })();
        if res.is_ok() {
            self.index.insert(digest, size, now);
        }
        *self.writing.lock() -= size;
        match &res {
            Ok(()) => {
                if limits.high_bytes > 0 && self.index.used() > limits.high_bytes {
                    self.gc_wake.notify_one();
                }
            }
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                self.stats.write_failures.fetch_add(1, Ordering::Relaxed);
                if e.raw_os_error() == Some(libc::ENOSPC) || e.raw_os_error() == Some(libc::EDQUOT)
                {
                    self.last_enospc.store(now, Ordering::Relaxed);
                    self.note_full(now);
                }
            }
        }
        res
    }

    fn note_full(&self, now: u64) {
        self.last_full.store(now, Ordering::Relaxed);
        self.gc_wake.notify_one();
    }

    /// Logs that a verified chunk is served without being cached; at most
    /// once every [`FULL_LOG_EVERY`] seconds, with the count since.
    pub fn log_not_cached(&self, layer: &str, digest: &[u8; 32], err: &io::Error) {
        let now = self.clock.now();
        let last = self.last_full_log.load(Ordering::Relaxed);
        if now >= last + FULL_LOG_EVERY
            && self
                .last_full_log
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let s = &self.stats;
            error!(layer, chunk = %hex::encode(digest), error = %err,
                   used_bytes = self.index.used(),
                   at_limit_total = s.at_limit.load(Ordering::Relaxed),
                   write_failures_total = s.write_failures.load(Ordering::Relaxed),
                   "CHUNK CACHE FULL: serving verified chunks without caching them");
        }
    }

    /// Removes chunk `digest` from disk and memory, unless a reader is
    /// reading its file.
    pub fn evict(&self, digest: &[u8; 32]) -> Evicted {
        self.evict_keeping(digest, &HashSet::new())
    }

    /// [`ChunkStore::evict`], except that a whole-file object holding
    /// `digest` is left alone (`Busy`) if it also holds a chunk in `keep`:
    /// an object is only ever removed whole.
    pub fn evict_keeping(&self, digest: &[u8; 32], keep: &HashSet<[u8; 32]>) -> Evicted {
        let busy = self.busy.lock();
        if busy.contains_key(digest) {
            return Evicted::Busy;
        }
        let path = self.path(digest);
        if !path.exists() && self.objects.locate(digest).is_some() {
            // In whole-file objects: they go whole, unless held.
            let mut freed = 0;
            let keys = self.objects.holding(digest);
            let keeps = |key: &[u8; 32]| {
                self.objects.get(key).is_some_and(|o| {
                    o.chunks
                        .iter()
                        .any(|c| &c.digest != digest && keep.contains(&c.digest))
                })
            };
            if keys.iter().any(keeps) {
                return Evicted::Busy;
            }
            for key in keys {
                match self.objects.remove(&key) {
                    Ok(o) => freed += self.forget_object_chunks(&o),
                    Err(objects::NotRemoved::Held) => return Evicted::Busy,
                    Err(objects::NotRemoved::Missing) => {}
                }
            }
            drop(busy);
            self.stats.evicted.fetch_add(1, Ordering::Relaxed);
            self.stats.evicted_bytes.fetch_add(freed, Ordering::Relaxed);
            return Evicted::Freed(freed);
        }
        let size = self.index.remove(digest);
        let removed = fs::remove_file(&path).is_ok();
        drop(busy);
        {
            let mut m = self.memory.lock();
            if let Some(b) = m.lru.pop(digest) {
                m.bytes -= b.len() as u64;
            }
        }
        match (size, removed) {
            (Some(e), _) => {
                self.stats.evicted.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .evicted_bytes
                    .fetch_add(e.size, Ordering::Relaxed);
                Evicted::Freed(e.size)
            }
            (None, true) => Evicted::Freed(0),
            (None, false) => Evicted::Missing,
        }
    }

    fn remember(&self, digest: [u8; 32], data: Bytes) {
        let mut m = self.memory.lock();
        let len = data.len() as u64;
        if len > self.memory_limit {
            return;
        }
        if let Some(old) = m.lru.put(digest, data) {
            m.bytes -= old.len() as u64;
        }
        m.bytes += len;
        while m.bytes > self.memory_limit {
            match m.lru.pop_lru() {
                Some((_, b)) => m.bytes -= b.len() as u64,
                None => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(b: &[u8]) -> [u8; 32] {
        Sha256::digest(b).into()
    }

    #[test]
    fn put_get_and_corruption_on_disk_is_a_miss() {
        let dir = tempfile::tempdir().unwrap();
        let s = ChunkStore::open(dir.path(), 1 << 20).unwrap();
        let data = Bytes::from_static(b"hello chunk");
        let d = digest(&data);
        assert!(s.get(&d).is_none());
        s.put(d, data.clone()).unwrap();
        assert_eq!(s.get(&d).unwrap(), data);
        // A fresh store (no memory) reads from disk and re-verifies.
        let s2 = ChunkStore::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(s2.get(&d).unwrap(), data);
        assert_eq!(s2.stats.disk_hits.load(Ordering::Relaxed), 1);
        fs::write(s2.path(&d), b"hello chunK").unwrap();
        let s3 = ChunkStore::open(dir.path(), 1 << 20).unwrap();
        assert!(s3.get(&d).is_none(), "corrupt file must not be served");
        assert_eq!(s3.stats.corrupt_on_disk.load(Ordering::Relaxed), 1);
        assert!(!s3.path(&d).exists());
    }

    /// A panic while a store lock is held (in any thread) must not break
    /// later reads: the locks do not poison.
    #[test]
    fn a_panic_under_a_store_lock_leaves_reads_working() {
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(ChunkStore::open(dir.path(), 1 << 20).unwrap());
        let (a, b) = (Bytes::from(vec![1u8; 300]), Bytes::from(vec![2u8; 200]));
        s.put(digest(&a), a.clone()).unwrap();
        s.put(digest(&b), b.clone()).unwrap();
        s.memory.lock().lru.pop(&digest(&b)); // b only on disk now
        let held = Arc::clone(&s);
        let panicked = std::thread::spawn(move || {
            let _memory = held.memory.lock();
            let _busy = held.busy.lock();
            let _writing = held.writing.lock();
            panic!("a bug while the store locks are held");
        })
        .join();
        assert!(panicked.is_err());
        assert_eq!(s.get(&digest(&a)).unwrap(), a, "memory hit");
        assert_eq!(s.get(&digest(&b)).unwrap(), b, "disk hit");
        let c = Bytes::from(vec![3u8; 100]);
        s.put(digest(&c), c.clone()).unwrap();
        assert_eq!(s.get(&digest(&c)).unwrap(), c);
    }

    #[test]
    fn memory_is_bounded_by_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let s = ChunkStore::open(dir.path(), 100).unwrap();
        for i in 0..10u8 {
            let data = Bytes::from(vec![i; 40]);
            s.put(digest(&data), data).unwrap();
        }
        assert!(s.memory.lock().bytes <= 100);
    }

    #[test]
    fn torn_or_rotted_files_are_misses_and_old_headerless_files_still_serve() {
        let dir = tempfile::tempdir().unwrap();
        let s = ChunkStore::open(dir.path(), 0).unwrap();
        let data = Bytes::from(vec![7u8; 10000]);
        let d = digest(&data);
        s.put(d, data.clone()).unwrap();
        let on_disk = fs::read(s.path(&d)).unwrap();
        assert_eq!(on_disk.len(), HEADER_LEN + 10000);
        // Torn: only part of the file made it.
        fs::write(s.path(&d), &on_disk[..5000]).unwrap();
        assert!(s.get(&d).is_none());
        assert!(!s.path(&d).exists(), "a bad file is dropped");
        // Rot: one bit flipped in the data.
        let mut rotted = on_disk.clone();
        rotted[HEADER_LEN + 1234] ^= 1;
        fs::create_dir_all(s.path(&d).parent().unwrap()).unwrap();
        fs::write(s.path(&d), &rotted).unwrap();
        assert!(s.get(&d).is_none());
        assert_eq!(s.stats.corrupt_on_disk.load(Ordering::Relaxed), 2);
        // Headerless (written before the header existed): checked by sha256.
        fs::write(s.path(&d), &data).unwrap();
        assert_eq!(s.get(&d).unwrap(), data);
        // Stale temp files of a dead process go away.
        fs::write(s.tmp.join("x-1"), b"partial").unwrap();
        s.remove_stale_temp();
        assert_eq!(fs::read_dir(&s.tmp).unwrap().count(), 0);
    }

    #[test]
    fn max_bytes_refuses_writes_and_evict_respects_readers() {
        let dir = tempfile::tempdir().unwrap();
        let s = ChunkStore::open(dir.path(), 1 << 20).unwrap();
        let one = (HEADER_LEN + 100) as u64;
        s.set_limits(Limits {
            max_bytes: 2 * one,
            high_bytes: one,
            low_bytes: 0,
        });
        let chunks: Vec<Bytes> = (0..3u8).map(|i| Bytes::from(vec![i; 100])).collect();
        s.put(digest(&chunks[0]), chunks[0].clone()).unwrap();
        s.put(digest(&chunks[1]), chunks[1].clone()).unwrap();
        let e = s.put(digest(&chunks[2]), chunks[2].clone()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::StorageFull);
        assert!(s.last_full() > 0);
        assert_eq!(s.index().used(), 2 * one);
        // Still served (from memory), never from a partial file.
        assert_eq!(s.get(&digest(&chunks[2])).unwrap(), chunks[2]);
        assert!(!s.on_disk(&digest(&chunks[2])));
        // A chunk being read is not evicted.
        let d0 = digest(&chunks[0]);
        s.busy.lock().insert(d0, 1);
        assert_eq!(s.evict(&d0), Evicted::Busy);
        s.busy.lock().clear();
        assert_eq!(s.evict(&d0), Evicted::Freed(one));
        assert_eq!(s.evict(&d0), Evicted::Missing);
        assert_eq!(s.index().used(), one);
        assert!(s.get(&d0).is_none());
    }

    #[test]
    fn an_object_goes_whole_and_never_takes_a_kept_chunk_along() {
        let dir = tempfile::tempdir().unwrap();
        let s = ChunkStore::open(dir.path(), 0).unwrap();
        let (a, b) = (Bytes::from(vec![1u8; 3000]), Bytes::from(vec![2u8; 2000]));
        let (da, db) = (digest(&a), digest(&b));
        s.put(da, a.clone()).unwrap();
        s.put(db, b.clone()).unwrap();
        let o = s
            .consolidate(&[(da, 0, 3000), (db, 3000, 2000)])
            .unwrap()
            .unwrap();
        assert!(!s.path(&da).exists(), "chunk files go once laid out");
        assert_eq!(s.get(&db).unwrap(), b, "served from the object");
        // b must stay (say, pinned by another layer): evicting a is refused.
        let keep: HashSet<[u8; 32]> = [db].into_iter().collect();
        assert_eq!(s.evict_keeping(&da, &keep), Evicted::Busy);
        assert!(o.path.exists());
        assert_eq!(s.get(&da).unwrap(), a);
        // Nothing to keep: the object goes whole, both chunks with it.
        assert!(matches!(s.evict(&da), Evicted::Freed(n) if n > 0));
        assert!(!o.path.exists());
        assert!(s.get(&da).is_none() && s.get(&db).is_none());
        assert!(!s.on_disk(&db));
        assert_eq!(s.index().used(), 0);
    }
}
