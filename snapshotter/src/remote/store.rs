//! The local chunk store: verified, uncompressed chunks keyed by their
//! sha256, on disk under `ROOT/chunks/` with a bounded in-memory LRU in front.
//!
//! Invariants:
//! - Only bytes whose sha256 equals their key are ever inserted; callers
//!   verify before [`ChunkStore::put`], and `put` re-checks nothing (hashing
//!   twice costs a full pass).
//! - A chunk becomes visible on disk only by `rename` of a fully written temp
//!   file, so readers never see a partial file under a final name.
//! - [`ChunkStore::get`] re-hashes what it reads from disk (not from memory):
//!   a torn write after a power cut, or bit rot, turns into a miss and the
//!   chunk is fetched again. Unverified bytes never leave this module.
//! - A full disk is not an error for readers: `put` reports it, the chunk is
//!   still served from memory, and the caller logs and counts it.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use bytes::Bytes;
use lru::LruCache;
use sha2::{Digest as _, Sha256};
use tracing::warn;

/// Default byte budget of the in-memory chunk cache.
pub const DEFAULT_MEMORY_BYTES: u64 = 256 << 20;

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
    /// Chunks that could not be written (e.g. disk full).
    pub write_failures: AtomicU64,
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
    /// Counters.
    pub stats: StoreStats,
}

impl ChunkStore {
    /// Opens the store in `dir` (created private, mode 0700). Temp files a
    /// crash left behind are removed by [`ChunkStore::remove_stale_temp`],
    /// which the caller runs once it holds the root lock.
    ///
    /// # Errors
    /// The directories cannot be created.
    pub fn open(dir: &Path, memory_limit: u64) -> io::Result<ChunkStore> {
        let tmp = dir.join("tmp");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&tmp)?;
        Ok(ChunkStore {
            dir: dir.to_owned(),
            tmp,
            memory: Mutex::new(Memory {
                lru: LruCache::unbounded(),
                bytes: 0,
            }),
            memory_limit,
            seq: AtomicU64::new(0),
            stats: StoreStats::default(),
        })
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

    fn path(&self, digest: &[u8; 32]) -> PathBuf {
        let hex = hex::encode(digest);
        self.dir.join(&hex[..2]).join(hex)
    }

    /// The verified chunk `digest`, if present in memory or on disk.
    pub fn get(&self, digest: &[u8; 32]) -> Option<Bytes> {
        if let Some(b) = self.memory.lock().unwrap().lru.get(digest) {
            self.stats.memory_hits.fetch_add(1, Ordering::Relaxed);
            return Some(b.clone());
        }
        let path = self.path(digest);
        match fs::read(&path) {
            Ok(data) if Sha256::digest(&data).as_slice() == digest => {
                self.stats.disk_hits.fetch_add(1, Ordering::Relaxed);
                let b = Bytes::from(data);
                self.remember(*digest, b.clone());
                Some(b)
            }
            Ok(_) => {
                self.stats.corrupt_on_disk.fetch_add(1, Ordering::Relaxed);
                warn!(chunk = %hex::encode(digest), path = %path.display(),
                      "cached chunk failed verification; dropping it");
                let _ = fs::remove_file(&path);
                self.stats.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
            Err(_) => {
                self.stats.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Whether `digest` is on disk (without reading it).
    pub fn contains(&self, digest: &[u8; 32]) -> bool {
        self.memory.lock().unwrap().lru.contains(digest) || self.path(digest).exists()
    }

    /// Stores a chunk the caller has verified. It is always kept in memory;
    /// the disk write may fail (full disk), which is returned for the caller
    /// to log and count, and leaves no partial file behind.
    ///
    /// # Errors
    /// The disk write failed.
    pub fn put(&self, digest: [u8; 32], data: Bytes) -> io::Result<()> {
        self.remember(digest, data.clone());
        let path = self.path(&digest);
        if path.exists() {
            return Ok(());
        }
        let tmp = self.tmp.join(format!(
            "{}-{}",
            hex::encode(&digest[..8]),
            self.seq.fetch_add(1, Ordering::Relaxed)
        ));
        let res = (|| {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(&data)?;
            f.sync_data()?;
            fs::create_dir_all(path.parent().unwrap())?;
            fs::rename(&tmp, &path)
        })();
        if res.is_err() {
            let _ = fs::remove_file(&tmp);
            self.stats.write_failures.fetch_add(1, Ordering::Relaxed);
        }
        res
    }

    fn remember(&self, digest: [u8; 32], data: Bytes) {
        let mut m = self.memory.lock().unwrap();
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

    #[test]
    fn memory_is_bounded_by_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let s = ChunkStore::open(dir.path(), 100).unwrap();
        for i in 0..10u8 {
            let data = Bytes::from(vec![i; 40]);
            s.put(digest(&data), data).unwrap();
        }
        assert!(s.memory.lock().unwrap().bytes <= 100);
    }
}
