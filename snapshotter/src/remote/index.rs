//! The chunk store's index: per chunk its size on disk and last access, the
//! pins, and the last GC result, kept in the same redb database as the
//! snapshots (`ROOT/metadata.redb`).
//!
//! Invariants:
//! - The in-memory map is the truth while the daemon runs; redb holds a copy
//!   that [`ChunkIndex::flush`] brings up to date in one write transaction.
//!   Reads only mark an entry dirty in memory: no write per read.
//! - The files are the truth across a crash: [`ChunkIndex::attach`] scans
//!   `chunks/` and rebuilds the map from it, taking last-access times from
//!   redb where it has them (a chunk it does not know counts as accessed
//!   now), and drops redb rows whose file is gone.
//! - `used` is the sum of `size` over the map, under the same lock.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, OnceLock, Weak};

use parking_lot::Mutex;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

const CHUNKS: TableDefinition<&[u8], (u64, u64)> = TableDefinition::new("cache_chunks");
const PINS: TableDefinition<&str, u64> = TableDefinition::new("cache_pins");
/// Per pin target, the TOC digests it was bound to when pinned (JSON list).
const PIN_TOCS: TableDefinition<&str, &[u8]> = TableDefinition::new("cache_pin_tocs");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("cache_meta");
const LAST_GC: &str = "last_gc";

/// One stored chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Bytes of its file (header included).
    pub size: u64,
    /// Last read or write, seconds since the Unix epoch.
    pub last_access: u64,
}

#[derive(Default)]
struct State {
    entries: HashMap<[u8; 32], Entry>,
    used: u64,
    dirty: HashSet<[u8; 32]>,
}

/// See the module doc.
#[derive(Default)]
pub struct ChunkIndex {
    /// Weak: the database lives as long as the snapshots' store, not longer.
    db: OnceLock<Weak<Database>>,
    state: Mutex<State>,
}

impl ChunkIndex {
    /// Records a chunk written now.
    pub fn insert(&self, digest: [u8; 32], size: u64, now: u64) {
        let mut s = self.state.lock();
        let e = Entry {
            size,
            last_access: now,
        };
        if let Some(old) = s.entries.insert(digest, e) {
            s.used -= old.size;
        }
        s.used += size;
        s.dirty.insert(digest);
    }

    /// Notes a read of `digest` at `now` (memory only until the next flush).
    pub fn touch(&self, digest: &[u8; 32], now: u64) {
        let mut s = self.state.lock();
        if let Some(e) = s.entries.get_mut(digest) {
            if e.last_access < now {
                e.last_access = now;
                s.dirty.insert(*digest);
            }
        }
    }

    /// Forgets `digest`; returns its entry if it had one.
    pub fn remove(&self, digest: &[u8; 32]) -> Option<Entry> {
        let mut s = self.state.lock();
        let e = s.entries.remove(digest)?;
        s.used -= e.size;
        s.dirty.insert(*digest);
        Some(e)
    }

    /// Whether `digest` is stored.
    pub fn contains(&self, digest: &[u8; 32]) -> bool {
        self.state.lock().entries.contains_key(digest)
    }

    /// Bytes stored.
    pub fn used(&self) -> u64 {
        self.state.lock().used
    }

    /// Chunks stored.
    pub fn len(&self) -> usize {
        self.state.lock().entries.len()
    }

    /// Whether nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A copy of every entry.
    pub fn snapshot(&self) -> Vec<([u8; 32], Entry)> {
        let s = self.state.lock();
        s.entries.iter().map(|(d, e)| (*d, *e)).collect()
    }

    /// Attaches the database and rebuilds the map from `on_disk` (digest and
    /// file size of every chunk file found), keeping known last-access times.
    /// Called once, at start, with the root lock held.
    ///
    /// # Errors
    /// The database failed.
    pub fn attach(
        &self,
        db: Arc<Database>,
        on_disk: Vec<([u8; 32], u64)>,
        now: u64,
    ) -> Result<(), redb::Error> {
        let known: HashMap<Vec<u8>, (u64, u64)> = {
            let txn = db.begin_write()?;
            txn.open_table(CHUNKS)?;
            txn.open_table(PINS)?;
            txn.open_table(PIN_TOCS)?;
            txn.open_table(META)?;
            txn.commit()?;
            let txn = db.begin_read()?;
            let t = txn.open_table(CHUNKS)?;
            let mut m = HashMap::new();
            for row in t.iter()? {
                let (k, v) = row?;
                m.insert(k.value().to_vec(), v.value());
            }
            m
        };
        {
            let mut guard = self.state.lock();
            let s = &mut *guard;
            let mut on_disk_set = HashSet::new();
            for (d, size) in on_disk {
                let last_access = known.get(d.as_slice()).map_or(now, |&(_, a)| a);
                // Entries written by this process before attach win.
                if let std::collections::hash_map::Entry::Vacant(v) = s.entries.entry(d) {
                    v.insert(Entry { size, last_access });
                    s.used += size;
                    s.dirty.insert(d);
                }
                on_disk_set.insert(d);
            }
            for k in known.keys() {
                if let Ok(d) = <[u8; 32]>::try_from(k.as_slice()) {
                    if !on_disk_set.contains(&d) && !s.entries.contains_key(&d) {
                        s.dirty.insert(d);
                    }
                }
            }
        }
        let _ = self.db.set(Arc::downgrade(&db));
        self.flush()
    }

    /// Writes the dirty entries to the database in one transaction. A no-op
    /// before [`ChunkIndex::attach`].
    ///
    /// # Errors
    /// The database failed; the entries stay dirty.
    pub fn flush(&self) -> Result<(), redb::Error> {
        let Some(db) = self.db.get().and_then(Weak::upgrade) else {
            return Ok(());
        };
        let batch: Vec<([u8; 32], Option<Entry>)> = {
            let mut s = self.state.lock();
            let dirty = std::mem::take(&mut s.dirty);
            dirty
                .into_iter()
                .map(|d| (d, s.entries.get(&d).copied()))
                .collect()
        };
        if batch.is_empty() {
            return Ok(());
        }
        let res = (|| -> Result<(), redb::Error> {
            let txn = db.begin_write()?;
            {
                let mut t = txn.open_table(CHUNKS)?;
                for (d, e) in &batch {
                    match e {
                        Some(e) => {
                            t.insert(d.as_slice(), (e.size, e.last_access))?;
                        }
                        None => {
                            t.remove(d.as_slice())?;
                        }
                    }
                }
            }
            txn.commit()?;
            Ok(())
        })();
        if res.is_err() {
            let mut s = self.state.lock();
            s.dirty.extend(batch.into_iter().map(|(d, _)| d));
        }
        res
    }

    fn db(&self) -> Result<Arc<Database>, redb::Error> {
        self.db
            .get()
            .and_then(Weak::upgrade)
            .ok_or_else(|| redb::Error::Io(std::io::Error::other("chunk index is not attached")))
    }

    /// Pins `target` (an image reference or a layer digest); returns false if
    /// it was pinned already.
    ///
    /// # Errors
    /// The database failed.
    pub fn pin(&self, target: &str, now: u64) -> Result<bool, redb::Error> {
        let txn = self.db()?.begin_write()?;
        let new = txn.open_table(PINS)?.insert(target, now)?.is_none();
        txn.commit()?;
        Ok(new)
    }

    /// Unpins `target`; returns false if it was not pinned.
    ///
    /// # Errors
    /// The database failed.
    pub fn unpin(&self, target: &str) -> Result<bool, redb::Error> {
        let txn = self.db()?.begin_write()?;
        let had = txn.open_table(PINS)?.remove(target)?.is_some();
        txn.open_table(PIN_TOCS)?.remove(target)?;
        txn.commit()?;
        Ok(had)
    }

    /// Binds pin `target` to the layers with these TOC digests too (kept
    /// with the ones bound before).
    ///
    /// # Errors
    /// The database failed.
    pub fn bind_pin(&self, target: &str, tocs: &BTreeSet<String>) -> Result<(), redb::Error> {
        let txn = self.db()?.begin_write()?;
        {
            let mut t = txn.open_table(PIN_TOCS)?;
            let mut all: BTreeSet<String> = t
                .get(target)?
                .and_then(|v| serde_json::from_slice(v.value()).ok())
                .unwrap_or_default();
            all.extend(tocs.iter().cloned());
            t.insert(
                target,
                serde_json::to_vec(&all).unwrap_or_default().as_slice(),
            )?;
        }
        txn.commit()?;
        Ok(())
    }

    /// The TOC digests each pin is bound to (pins bound to none included).
    ///
    /// # Errors
    /// The database failed.
    pub fn pin_bindings(&self) -> Result<HashMap<String, BTreeSet<String>>, redb::Error> {
        let Some(db) = self.db.get().and_then(Weak::upgrade) else {
            return Ok(HashMap::new());
        };
        let txn = db.begin_read()?;
        let pins = txn.open_table(PINS)?;
        // Absent in a database written before pins were bound.
        let tocs = match txn.open_table(PIN_TOCS) {
            Ok(t) => Some(t),
            Err(redb::TableError::TableDoesNotExist(_)) => None,
            Err(e) => return Err(e.into()),
        };
        let mut out = HashMap::new();
        for row in pins.iter()? {
            let target = row?.0.value().to_owned();
            let bound = match &tocs {
                Some(t) => t
                    .get(target.as_str())?
                    .and_then(|v| serde_json::from_slice(v.value()).ok())
                    .unwrap_or_default(),
                None => BTreeSet::new(),
            };
            out.insert(target, bound);
        }
        Ok(out)
    }

    /// Every pin.
    ///
    /// # Errors
    /// The database failed.
    pub fn pins(&self) -> Result<HashSet<String>, redb::Error> {
        let Some(db) = self.db.get().and_then(Weak::upgrade) else {
            return Ok(HashSet::new());
        };
        let txn = db.begin_read()?;
        let t = txn.open_table(PINS)?;
        let mut out = HashSet::new();
        for row in t.iter()? {
            out.insert(row?.0.value().to_owned());
        }
        Ok(out)
    }

    /// Stores the last GC result (JSON).
    ///
    /// # Errors
    /// The database failed.
    pub fn set_last_gc(&self, json: &[u8]) -> Result<(), redb::Error> {
        let txn = self.db()?.begin_write()?;
        txn.open_table(META)?.insert(LAST_GC, json)?;
        txn.commit()?;
        Ok(())
    }

    /// The last GC result (JSON), if any.
    ///
    /// # Errors
    /// The database failed.
    pub fn last_gc(&self) -> Result<Option<Vec<u8>>, redb::Error> {
        let Some(db) = self.db.get().and_then(Weak::upgrade) else {
            return Ok(None);
        };
        let txn = db.begin_read()?;
        let t = txn.open_table(META)?;
        Ok(t.get(LAST_GC)?.map(|v| v.value().to_vec()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flush_and_reattach_keep_access_times_and_follow_the_files() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(Database::create(dir.path().join("m.redb")).unwrap());
        let a = [1u8; 32];
        let b = [2u8; 32];
        let i = ChunkIndex::default();
        i.attach(db.clone(), vec![], 100).unwrap();
        i.insert(a, 10, 100);
        i.insert(b, 20, 100);
        i.touch(&a, 500);
        i.flush().unwrap();
        assert_eq!(i.used(), 30);
        // Restart: b's file is gone (crash before the flush of its removal),
        // c's file is unknown to the index (crash before the flush of its put).
        let c = [3u8; 32];
        let j = ChunkIndex::default();
        j.attach(db.clone(), vec![(a, 10), (c, 5)], 900).unwrap();
        let mut e = j.snapshot();
        e.sort_by_key(|(d, _)| *d);
        assert_eq!(
            e,
            vec![
                (
                    a,
                    Entry {
                        size: 10,
                        last_access: 500
                    }
                ),
                (
                    c,
                    Entry {
                        size: 5,
                        last_access: 900
                    }
                ),
            ]
        );
        assert_eq!(j.used(), 15);
        assert!(j.pin("sha256:x", 1).unwrap());
        assert!(!j.pin("sha256:x", 2).unwrap());
        assert!(j.pins().unwrap().contains("sha256:x"));
        assert!(j.unpin("sha256:x").unwrap());
        assert!(!j.unpin("sha256:x").unwrap());
    }
}
