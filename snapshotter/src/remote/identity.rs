//! Layer identity: whether a lazily mounted layer's content is the layer its
//! chain ID names.
//!
//! containerd names a committed layer by its chain ID, derived from the
//! image config's `diff_ids` (the sha256 of each layer's uncompressed tar).
//! containerd's own unpacker checks each diffID as it extracts; a lazy layer
//! is mounted before its bytes are here, so its chain ID is at first only a
//! claim of the image that pulled it. An image that copies a popular base's
//! `diff_ids` over its own layer would otherwise have its files served to
//! every later image that shares the base (issue 12 §1; BRIEF §6.10).
//!
//! This module:
//! - checks the claim ([`diff_id_pass`]): one sequential pass over the blob
//!   decompresses it and hashes the tar stream; the chain ID recomputed from
//!   that diffID and the parent's chain ID must equal the snapshot's name.
//!   The same pass stores every chunk it carries (each verified against the
//!   TOC), so the background fetch that follows has nothing to download and
//!   the check costs no second copy of the blob;
//! - keeps the verdict per snapshot name ([`Checks`], table `layer_checks`
//!   in `metadata.redb`), with the parent chain ID it was claimed under.
//!
//! Invariants (enforced by `overlay` and `layers`):
//! - a [`Check::Quarantined`] layer is never handed out again: `Stat`, a
//!   `Prepare`/`View` with it in the parent chain, and `Mounts` fail with
//!   `FAILED_PRECONDITION`, and its FUSE reads answer EIO;
//! - an [`Check::Unverified`] layer is adopted by another image's `Prepare`
//!   only if that Prepare names the same blob and TOC; otherwise that image
//!   falls back to a normal pull, which containerd checks itself.

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};

use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::fetch::{decode_chunk, Fetcher, RangeSource, MAX_MERGED_BYTES};
use super::store::ChunkStore;
use super::toc::{Chunk, Compression, Toc};

const CHECKS: TableDefinition<&str, &[u8]> = TableDefinition::new("layer_checks");

/// The chain ID of a layer with uncompressed digest `diff_id` on top of the
/// chain `parent` (containerd's `identity.ChainID`).
pub fn chain_id(parent: Option<&str>, diff_id: &str) -> String {
    match parent {
        None => diff_id.to_owned(),
        Some(p) => format!(
            "sha256:{}",
            hex::encode(Sha256::digest(format!("{p} {diff_id}")))
        ),
    }
}

/// The chain ID in a backend snapshot key: containerd names committed
/// layers `NAMESPACE/ID/CHAINID`, lazy ones are committed as `CHAINID`.
pub fn chain_of_key(key: &str) -> &str {
    key.rsplit('/').next().unwrap_or(key)
}

/// The verdict on one lazily mounted layer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", content = "reason", rename_all = "snake_case")]
pub enum Check {
    /// Mounted, not checked yet (the check runs with the background pass).
    Unverified,
    /// Its content's diffID gives its chain ID.
    Verified,
    /// Its content does not match its chain ID (the reason says how).
    Quarantined(String),
}

impl Check {
    /// Short name for status output and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Check::Unverified => "unverified",
            Check::Verified => "verified",
            Check::Quarantined(_) => "quarantined",
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Record {
    check: Check,
    /// Chain ID of the parent the layer was claimed on (`None`: a base layer).
    parent: Option<String>,
}

/// Verdicts per snapshot name, in memory and in `metadata.redb`.
#[derive(Default)]
pub struct Checks {
    db: OnceLock<Weak<Database>>,
    records: Mutex<HashMap<String, Record>>,
    /// Layers whose diffID check passed (since start).
    pub verified: AtomicU64,
    /// Layers quarantined (since start).
    pub quarantined: AtomicU64,
}

impl Checks {
    /// Loads the stored verdicts and writes through to `db` from now on.
    ///
    /// # Errors
    /// The table cannot be created or read.
    pub fn attach(&self, db: &Arc<Database>) -> Result<(), redb::Error> {
        let txn = db.begin_write()?;
        txn.open_table(CHECKS)?;
        txn.commit()?;
        let txn = db.begin_read()?;
        let table = txn.open_table(CHECKS)?;
        let mut records = lock(&self.records);
        for row in table.iter()? {
            let (k, v) = row?;
            // A record that does not decode is dropped: the layer is then
            // unverified, the safe side.
            if let Ok(r) = serde_json::from_slice::<Record>(v.value()) {
                records.insert(k.value().to_owned(), r);
            }
        }
        let _ = self.db.set(Arc::downgrade(db));
        Ok(())
    }

    /// The verdict on `name` (unknown names are unverified).
    pub fn get(&self, name: &str) -> Check {
        lock(&self.records)
            .get(name)
            .map_or(Check::Unverified, |r| r.check.clone())
    }

    /// Whether any layer is quarantined (a fast path for the common case).
    pub fn any_quarantined(&self) -> bool {
        lock(&self.records)
            .values()
            .any(|r| matches!(r.check, Check::Quarantined(_)))
    }

    /// The parent chain ID `name` was claimed on, if recorded.
    pub fn parent(&self, name: &str) -> Option<Option<String>> {
        lock(&self.records).get(name).map(|r| r.parent.clone())
    }

    /// Records a fresh claim: `name` mounted lazily on `parent`.
    pub fn claim(&self, name: &str, parent: Option<&str>) {
        self.put(
            name,
            Record {
                check: Check::Unverified,
                parent: parent.map(str::to_owned),
            },
        );
    }

    /// Records the verdict on `name`.
    pub fn set(&self, name: &str, check: Check) {
        match &check {
            Check::Verified => self.verified.fetch_add(1, Ordering::Relaxed),
            Check::Quarantined(_) => self.quarantined.fetch_add(1, Ordering::Relaxed),
            Check::Unverified => 0,
        };
        let parent = self.parent(name).flatten();
        self.put(name, Record { check, parent });
    }

    /// Forgets `name` (its snapshot was removed).
    pub fn forget(&self, name: &str) {
        lock(&self.records).remove(name);
        if let Some(db) = self.db.get().and_then(Weak::upgrade) {
            let res = (|| -> Result<(), redb::Error> {
                let txn = db.begin_write()?;
                txn.open_table(CHECKS)?.remove(name)?;
                txn.commit()?;
                Ok(())
            })();
            if let Err(e) = res {
                tracing::warn!(snapshot = name, error = %e, "cannot forget the layer check");
            }
        }
    }

    fn put(&self, name: &str, r: Record) {
        let bytes = serde_json::to_vec(&r).unwrap_or_default();
        lock(&self.records).insert(name.to_owned(), r);
        if let Some(db) = self.db.get().and_then(Weak::upgrade) {
            let res = (|| -> Result<(), redb::Error> {
                let txn = db.begin_write()?;
                txn.open_table(CHECKS)?.insert(name, bytes.as_slice())?;
                txn.commit()?;
                Ok(())
            })();
            if let Err(e) = res {
                // Memory still holds the verdict; a quarantine lost on a
                // restart is found again by the next check.
                tracing::error!(snapshot = name, error = %e, "cannot store the layer check");
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> parking_lot::MutexGuard<'_, T> {
    m.lock()
}

/// What one pass over a blob found.
#[derive(Debug)]
pub struct PassResult {
    /// sha256 of the uncompressed blob (`sha256:…`).
    pub diff_id: String,
    /// Chunks the pass verified and stored (they were not local).
    pub chunks_stored: u64,
    /// Compressed bytes read.
    pub bytes: u64,
}

/// Streaming decompressor feeding a sha256.
enum Unpacker {
    Gzip(flate2::write::MultiGzDecoder<HashWriter>),
    Zstd(zstd::stream::write::Decoder<'static, HashWriter>),
}

struct HashWriter(Sha256);

impl Write for HashWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Unpacker {
    fn new(c: Compression) -> std::io::Result<Unpacker> {
        let h = HashWriter(Sha256::new());
        Ok(match c {
            Compression::Gzip => Unpacker::Gzip(flate2::write::MultiGzDecoder::new(h)),
            Compression::Zstd => Unpacker::Zstd(zstd::stream::write::Decoder::new(h)?),
        })
    }

    fn write_all(&mut self, b: &[u8]) -> std::io::Result<()> {
        match self {
            Unpacker::Gzip(d) => d.write_all(b),
            Unpacker::Zstd(d) => d.write_all(b),
        }
    }

    fn finish(self) -> std::io::Result<[u8; 32]> {
        let h = match self {
            Unpacker::Gzip(d) => d.finish()?,
            Unpacker::Zstd(mut d) => {
                d.flush()?;
                d.into_inner()
            }
        };
        Ok(h.0.finalize().into())
    }
}

/// Every chunk of `toc` once, in blob order.
fn chunks_by_offset(toc: &Toc) -> Vec<Chunk> {
    let mut all: Vec<Chunk> = toc.files.iter().flatten().copied().collect();
    all.sort_by_key(|c| (c.blob_offset, c.blob_end));
    all.dedup_by_key(|c| c.blob_offset);
    all
}

/// Reads the whole blob (`size` bytes) from `source` once, in order and in
/// windows of at most [`MAX_MERGED_BYTES`] (each after the background turn
/// of the fetcher's priority gate, so reads of starting containers go
/// first), hashing its uncompressed stream, and stores each chunk of `toc`
/// that is not local yet and verifies. Requests and bytes count in the
/// fetcher's stats. `stop` is polled between windows.
///
/// Memory: one window plus the largest chunk that straddles windows.
///
/// # Errors
/// A fetch or decompression failure (the blob's bytes are then unchecked,
/// not wrong): the caller leaves the layer unverified.
pub async fn diff_id_pass(
    source: Arc<dyn RangeSource>,
    size: u64,
    toc: &Toc,
    fetcher: &Fetcher,
    stop: &(dyn Fn() -> bool + Send + Sync),
) -> Result<PassResult, String> {
    let (store, priority) = (fetcher.store(), fetcher.priority());
    let chunks = chunks_by_offset(toc);
    let mut next_chunk = 0usize;
    let mut unpacker = Some(Unpacker::new(toc.compression).map_err(|e| e.to_string())?);
    // Bytes of the blob from `buf_at`, kept while a chunk still needs them.
    let mut buf = BytesMut::new();
    let mut buf_at = 0u64;
    let mut pos = 0u64;
    let mut stored = 0u64;
    while pos < size {
        if stop() {
            return Err("layer unmounted".into());
        }
        priority.background_turn().await;
        let len = (size - pos).min(MAX_MERGED_BYTES);
        fetcher.stats.requests.fetch_add(1, Ordering::Relaxed);
        let window = source.fetch(pos, len).await.map_err(|e| {
            fetcher.stats.source_errors.fetch_add(1, Ordering::Relaxed);
            e.to_string()
        })?;
        fetcher
            .stats
            .bytes_fetched
            .fetch_add(window.len() as u64, Ordering::Relaxed);
        if window.len() as u64 != len {
            return Err(format!("asked {len} bytes at {pos}, got {}", window.len()));
        }
        buf.extend_from_slice(&window);
        pos += len;
        // Decompression, hashing and chunk writes are CPU and disk work:
        // off the runtime's workers.
        let (c, st) = (toc.compression, store.clone());
        let ready: Vec<Chunk> = chunks[next_chunk..]
            .iter()
            .take_while(|c| c.blob_end <= pos)
            .copied()
            .collect();
        next_chunk += ready.len();
        let held = buf.clone().freeze();
        let mut u = unpacker.take().ok_or("pass state lost")?;
        let (u, n) = tokio::task::spawn_blocking(move || {
            u.write_all(&window)
                .map_err(|e| format!("decompression failed at {pos}: {e}"))?;
            Ok::<_, String>((u, store_chunks(&st, c, &held, buf_at, &ready)))
        })
        .await
        .map_err(|e| e.to_string())??;
        unpacker = Some(u);
        stored += n;
        // Keep only what the next unfinished chunk needs.
        let keep_from = chunks
            .get(next_chunk)
            .map_or(pos, |c| c.blob_offset.max(buf_at));
        let drop = usize::try_from(keep_from.min(pos) - buf_at).unwrap_or(buf.len());
        let _ = buf.split_to(drop.min(buf.len()));
        buf_at += drop as u64;
    }
    let u = unpacker.take().ok_or("pass state lost")?;
    let digest = tokio::task::spawn_blocking(move || u.finish())
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("decompression failed at the end: {e}"))?;
    Ok(PassResult {
        diff_id: format!("sha256:{}", hex::encode(digest)),
        chunks_stored: stored,
        bytes: size,
    })
}

/// Stores the chunks in `ready` that verify and are not local; returns how
/// many. A chunk that does not verify is skipped: the fetcher's own path
/// fetches and reports it when it is read.
fn store_chunks(store: &ChunkStore, c: Compression, held: &Bytes, at: u64, ready: &[Chunk]) -> u64 {
    let mut n = 0;
    for ch in ready {
        if store.contains(&ch.digest) || ch.blob_offset < at {
            continue;
        }
        let (from, to) = ((ch.blob_offset - at) as usize, (ch.blob_end - at) as usize);
        let Some(raw) = held.get(from..to) else {
            continue;
        };
        if let Ok(data) = decode_chunk(c, raw, ch) {
            if store.put(ch.digest, data).is_ok() {
                n += 1;
            }
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_match_containerd() {
        // From containerd's identity package tests (ChainID of two layers).
        let a = "sha256:a9f0a33ec1ffe1b6af1ef1cb9e3f52ad1a3a02e5e0d5d8b16c8f2c3eaa2e7a0c";
        assert_eq!(chain_id(None, a), a);
        let b = "sha256:0000000000000000000000000000000000000000000000000000000000000001";
        let expected = format!("sha256:{}", hex::encode(Sha256::digest(format!("{a} {b}"))));
        assert_eq!(chain_id(Some(a), b), expected);
        assert_ne!(chain_id(Some(a), b), chain_id(Some(b), a));
    }

    #[test]
    fn chain_of_backend_keys() {
        assert_eq!(chain_of_key("default/12/sha256:ab"), "sha256:ab");
        assert_eq!(chain_of_key("sha256:ab"), "sha256:ab");
    }

    #[test]
    fn checks_persist_and_forget() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(Database::create(dir.path().join("m.redb")).unwrap());
        let c = Checks::default();
        c.attach(&db).unwrap();
        c.claim("sha256:x", Some("sha256:p"));
        c.set("sha256:x", Check::Quarantined("diffID mismatch".into()));
        c.claim("sha256:y", None);
        c.set("sha256:y", Check::Verified);
        c.claim("sha256:z", None);
        let again = Checks::default();
        again.attach(&db).unwrap();
        assert_eq!(
            again.get("sha256:x"),
            Check::Quarantined("diffID mismatch".into())
        );
        assert_eq!(again.parent("sha256:x"), Some(Some("sha256:p".into())));
        assert_eq!(again.get("sha256:y"), Check::Verified);
        assert_eq!(again.get("sha256:z"), Check::Unverified);
        again.forget("sha256:x");
        let third = Checks::default();
        third.attach(&db).unwrap();
        assert_eq!(third.get("sha256:x"), Check::Unverified);
        assert_eq!(third.parent("sha256:x"), None);
    }
}
