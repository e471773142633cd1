//! Whole-file objects: the verified chunks of one large file laid end to end
//! in one plain file, so the kernel can serve the file by passthrough
//! (reads go straight to the backing file, at the speed of the local disk
//! and its page cache, without a round trip through the daemon).
//!
//! An object lives under `ROOT/chunks/files/xx/KEY` with a map `KEY.map`
//! beside it (each chunk's digest, offset, length and crc32). `KEY` is the
//! sha256 of the file's chunk list (digests, offsets, lengths), so one file
//! in two layers or images is one object. Its chunks leave the per-chunk
//! files (see [`super::store::ChunkStore::consolidate`]): the store reads
//! them from the object, checking the crc32 from the map, and dedup by chunk
//! digest still holds.
//!
//! Invariants:
//! - An object is written from chunks read back verified, fsync'd, and its
//!   map renamed into place before the object: a crash leaves either nothing
//!   visible or a whole object (a map without its object is removed at load).
//! - An object's bytes never change once visible; it is only ever removed
//!   whole, and never while a mounted layer holds it (a passthrough inode's
//!   backing file must outlive the mount: see `shoal_fuse`'s `iomode.rs`).
//! - Unlinking an object that the kernel still has open leaves those opens
//!   reading the same bytes; only new opens miss it.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use sha2::{Digest as _, Sha256};
use tracing::warn;

const MAP_MAGIC: &[u8; 4] = b"SHO1";
const MAP_ENTRY: usize = 32 + 8 + 8 + 4;

/// One chunk's place in an object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placed {
    /// Uncompressed sha256.
    pub digest: [u8; 32],
    /// Offset in the object (= in the file).
    pub offset: u64,
    /// Length.
    pub len: u64,
    /// crc32 of the bytes.
    pub crc: u32,
}

/// A visible object.
#[derive(Debug)]
pub struct Object {
    /// Its key.
    pub key: [u8; 32],
    /// The file.
    pub path: PathBuf,
    /// Its chunks, in offset order, end to end from 0.
    pub chunks: Vec<Placed>,
}

impl Object {
    /// Bytes in the object.
    pub fn size(&self) -> u64 {
        self.chunks.last().map_or(0, |c| c.offset + c.len)
    }
}

#[derive(Default)]
struct Inner {
    objects: HashMap<[u8; 32], Arc<Object>>,
    /// Chunk digest → objects holding it, with the chunk's index there.
    by_chunk: HashMap<[u8; 32], Vec<([u8; 32], usize)>>,
    /// Mounted layers holding an object as a passthrough backing file.
    held: HashMap<[u8; 32], u32>,
    /// Objects whose every crc32 checked out since this process started.
    verified: std::collections::HashSet<[u8; 32]>,
}

/// Why an object was not removed.
#[derive(Debug, PartialEq, Eq)]
pub enum NotRemoved {
    /// A mounted layer holds it.
    Held,
    /// No such object.
    Missing,
}

/// The objects of one store.
pub struct Objects {
    dir: PathBuf,
    inner: Mutex<Inner>,
    /// Held for the whole of one [`Objects::write`]: two layers sharing a
    /// file may lay it out at the same moment, and must not interleave.
    writing: Mutex<()>,
}

/// The key of the object holding `chunks` (digest, file offset, length) of
/// one file.
pub fn key(chunks: impl IntoIterator<Item = ([u8; 32], u64, u64)>) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"shoal-object-v1");
    for (d, off, len) in chunks {
        h.update(d);
        h.update(off.to_le_bytes());
        h.update(len.to_le_bytes());
    }
    h.finalize().into()
}

fn encode_map(chunks: &[Placed]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + chunks.len() * MAP_ENTRY);
    out.extend_from_slice(MAP_MAGIC);
    out.extend_from_slice(&(chunks.len() as u32).to_le_bytes());
    for c in chunks {
        out.extend_from_slice(&c.digest);
        out.extend_from_slice(&c.offset.to_le_bytes());
        out.extend_from_slice(&c.len.to_le_bytes());
        out.extend_from_slice(&c.crc.to_le_bytes());
    }
    out
}

fn decode_map(b: &[u8]) -> Option<Vec<Placed>> {
    if b.len() < 8 || &b[..4] != MAP_MAGIC {
        return None;
    }
    let n = u32::from_le_bytes(b[4..8].try_into().ok()?) as usize;
    if b.len() != 8 + n * MAP_ENTRY {
        return None;
    }
    let mut out = Vec::with_capacity(n);
    let mut next = 0u64;
    for e in b[8..].chunks_exact(MAP_ENTRY) {
        let c = Placed {
            digest: e[..32].try_into().ok()?,
            offset: u64::from_le_bytes(e[32..40].try_into().ok()?),
            len: u64::from_le_bytes(e[40..48].try_into().ok()?),
            crc: u32::from_le_bytes(e[48..52].try_into().ok()?),
        };
        // End to end from 0, or it is not an object of ours.
        if c.offset != next {
            return None;
        }
        next = c.offset.checked_add(c.len)?;
        out.push(c);
    }
    Some(out)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Objects {
    /// Opens the objects under `dir`, dropping incomplete ones (a map
    /// without its object, an object without its map, a size that does not
    /// match).
    ///
    /// # Errors
    /// `dir` cannot be created.
    pub fn open(dir: &Path) -> io::Result<Objects> {
        fs::create_dir_all(dir)?;
        let objects = Objects {
            dir: dir.to_owned(),
            inner: Mutex::new(Inner::default()),
            writing: Mutex::new(()),
        };
        let mut inner = Inner::default();
        for sub in fs::read_dir(dir)?.flatten() {
            let Ok(files) = fs::read_dir(sub.path()) else {
                continue;
            };
            for f in files.flatten() {
                let path = f.path();
                let name = f.file_name().to_string_lossy().into_owned();
                let (hex, is_map) = match name.strip_suffix(".map") {
                    Some(h) => (h.to_owned(), true),
                    None => (name.clone(), false),
                };
                let mut key = [0u8; 32];
                if hex::decode_to_slice(&hex, &mut key).is_err() {
                    continue;
                }
                let obj_path = objects.path(&key);
                let map_path = obj_path.with_extension("map");
                if is_map {
                    if !obj_path.exists() {
                        let _ = fs::remove_file(&map_path);
                    }
                    continue;
                }
                let chunks = fs::read(&map_path).ok().and_then(|b| decode_map(&b));
                let size_ok = |cs: &Vec<Placed>| {
                    let want = cs.last().map_or(0, |c| c.offset + c.len);
                    f.metadata().map(|m| m.len() == want).unwrap_or(false)
                };
                match chunks.filter(size_ok) {
                    Some(chunks) => {
                        let o = Arc::new(Object {
                            key,
                            path: obj_path,
                            chunks,
                        });
                        for (i, c) in o.chunks.iter().enumerate() {
                            inner.by_chunk.entry(c.digest).or_default().push((key, i));
                        }
                        inner.objects.insert(key, o);
                    }
                    None => {
                        warn!(object = %path.display(), "incomplete file object; removing it");
                        let _ = fs::remove_file(&path);
                        let _ = fs::remove_file(&map_path);
                    }
                }
            }
        }
        *objects.inner.lock() = inner;
        Ok(objects)
    }

    fn path(&self, key: &[u8; 32]) -> PathBuf {
        let hex = hex::encode(key);
        self.dir.join(&hex[..2]).join(hex)
    }

    /// The object `key`, if visible.
    pub fn get(&self, key: &[u8; 32]) -> Option<Arc<Object>> {
        self.inner.lock().objects.get(key).cloned()
    }

    /// An object holding chunk `digest`, and the chunk's place in it.
    pub fn locate(&self, digest: &[u8; 32]) -> Option<(Arc<Object>, Placed)> {
        let inner = self.inner.lock();
        let (key, i) = inner.by_chunk.get(digest)?.first()?;
        let o = inner.objects.get(key)?.clone();
        let p = *o.chunks.get(*i)?;
        Some((o, p))
    }

    /// Reads chunk `p` of `o` and checks its crc32: `Ok(None)` if it does
    /// not check out.
    ///
    /// # Errors
    /// The read failed (e.g. the object was removed meanwhile).
    pub fn read(&self, o: &Object, p: &Placed) -> io::Result<Option<Bytes>> {
        let f = File::open(&o.path)?;
        let mut buf = vec![0u8; p.len as usize];
        f.read_exact_at(&mut buf, p.offset)?;
        Ok((crc32fast::hash(&buf) == p.crc).then(|| Bytes::from(buf)))
    }

    /// Whether object `key` checked out since this process started.
    pub fn verified(&self, key: &[u8; 32]) -> bool {
        self.inner.lock().verified.contains(key)
    }

    /// Checks every chunk's crc32 once per process (the kernel reads a
    /// passthrough file without asking us, so bit rot or a stray write since
    /// the last start is caught here, before the first open is answered).
    /// `Ok(false)`: some chunk does not check out.
    ///
    /// # Errors
    /// The object cannot be read.
    pub fn verify_once(&self, o: &Object) -> io::Result<bool> {
        if self.inner.lock().verified.contains(&o.key) {
            return Ok(true);
        }
        let f = File::open(&o.path)?;
        let mut buf = Vec::new();
        for c in &o.chunks {
            buf.resize(c.len as usize, 0);
            f.read_exact_at(&mut buf, c.offset)?;
            if crc32fast::hash(&buf) != c.crc {
                return Ok(false);
            }
        }
        self.inner.lock().verified.insert(o.key);
        Ok(true)
    }

    /// Objects and their bytes.
    pub fn totals(&self) -> (u64, u64) {
        let inner = self.inner.lock();
        let bytes = inner.objects.values().map(|o| o.size()).sum();
        (inner.objects.len() as u64, bytes)
    }

    /// Every chunk held in an object, with its length (for the index scan).
    pub fn chunks(&self) -> Vec<([u8; 32], u64)> {
        let inner = self.inner.lock();
        inner
            .objects
            .values()
            .flat_map(|o| o.chunks.iter().map(|c| (c.digest, c.len)))
            .collect()
    }

    /// Writes object `key` from `parts` (each chunk's digest, offset,
    /// length and verified bytes, end to end from 0) through `tmp`, and
    /// makes it visible.
    ///
    /// # Errors
    /// I/O (nothing is left visible), or parts that are not end to end.
    pub fn write(
        &self,
        key: [u8; 32],
        parts: &[([u8; 32], u64, Bytes)],
        tmp: &Path,
    ) -> io::Result<Arc<Object>> {
        let mut chunks = Vec::with_capacity(parts.len());
        let mut next = 0u64;
        for (digest, offset, data) in parts {
            if *offset != next {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "chunks of a file object must be end to end",
                ));
            }
            next += data.len() as u64;
            chunks.push(Placed {
                digest: *digest,
                offset: *offset,
                len: data.len() as u64,
                crc: crc32fast::hash(data),
            });
        }
        let _writing = self.writing.lock();
        // Written meanwhile by another layer sharing the file.
        if let Some(o) = self.get(&key).filter(|o| o.path.exists()) {
            return Ok(o);
        }
        let path = self.path(&key);
        let map_path = path.with_extension("map");
        let hex = hex::encode(&key[..8]);
        let (tmp_obj, tmp_map) = (
            tmp.join(format!("obj-{hex}-{}", std::process::id())),
            tmp.join(format!("map-{hex}-{}", std::process::id())),
        );
        let mut map_placed = false;
        let res = (|| {
            let mut f = File::create(&tmp_obj)?;
            for (_, _, data) in parts {
                f.write_all(data)?;
            }
            f.sync_data()?;
            let mut m = File::create(&tmp_map)?;
            m.write_all(&encode_map(&chunks))?;
            m.sync_data()?;
            let parent = path.parent().unwrap();
            fs::create_dir_all(parent)?;
            fs::rename(&tmp_map, &map_path)?;
            map_placed = true;
            fs::rename(&tmp_obj, &path)?;
            sync_dir(parent)
        })();
        if let Err(e) = res {
            let _ = fs::remove_file(&tmp_obj);
            let _ = fs::remove_file(&tmp_map);
            // Only a map this call put there (never another writer's).
            if map_placed && !path.exists() {
                let _ = fs::remove_file(&map_path);
            }
            return Err(e);
        }
        let o = Arc::new(Object { key, path, chunks });
        let mut inner = self.inner.lock();
        for (i, c) in o.chunks.iter().enumerate() {
            let keys = inner.by_chunk.entry(c.digest).or_default();
            if !keys.iter().any(|(k, _)| *k == key) {
                keys.push((key, i));
            }
        }
        inner.objects.insert(key, o.clone());
        // Written from verified bytes just now.
        inner.verified.insert(key);
        Ok(o)
    }

    /// Notes that a mounted layer uses object `key` as a backing file.
    pub fn hold(&self, key: [u8; 32]) {
        *self.inner.lock().held.entry(key).or_insert(0) += 1;
    }

    /// Ends one [`Objects::hold`].
    pub fn release(&self, key: &[u8; 32]) {
        let mut inner = self.inner.lock();
        if let Some(n) = inner.held.get_mut(key) {
            *n -= 1;
            if *n == 0 {
                inner.held.remove(key);
            }
        }
    }

    /// Whether a mounted layer holds object `key`.
    pub fn is_held(&self, key: &[u8; 32]) -> bool {
        self.inner.lock().held.contains_key(key)
    }

    /// Removes object `key` unless held; returns it (its chunks are then
    /// no longer stored there).
    ///
    /// # Errors
    /// Held or missing.
    pub fn remove(&self, key: &[u8; 32]) -> Result<Arc<Object>, NotRemoved> {
        let mut inner = self.inner.lock();
        if inner.held.contains_key(key) {
            return Err(NotRemoved::Held);
        }
        let o = inner.objects.remove(key).ok_or(NotRemoved::Missing)?;
        inner.verified.remove(key);
        for c in &o.chunks {
            if let Some(keys) = inner.by_chunk.get_mut(&c.digest) {
                keys.retain(|(k, _)| k != key);
                if keys.is_empty() {
                    inner.by_chunk.remove(&c.digest);
                }
            }
        }
        drop(inner);
        let _ = fs::remove_file(&o.path);
        let _ = fs::remove_file(o.path.with_extension("map"));
        Ok(o)
    }

    /// Keys of the objects holding chunk `digest`.
    pub fn holding(&self, digest: &[u8; 32]) -> Vec<[u8; 32]> {
        self.inner
            .lock()
            .by_chunk
            .get(digest)
            .map(|v| v.iter().map(|(k, _)| *k).collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(sizes: &[usize]) -> Vec<([u8; 32], u64, Bytes)> {
        let mut off = 0u64;
        sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let data = Bytes::from(vec![i as u8 + 1; n]);
                let d: [u8; 32] = Sha256::digest(&data).into();
                let p = (d, off, data);
                off += n as u64;
                p
            })
            .collect()
    }

    #[test]
    fn two_layers_laying_out_one_file_at_once_leave_one_whole_object() {
        // Two writers of the same key at the same moment (two layers that
        // share a large file): both succeed, and the object and its map
        // survive a reload, whole. Racy by nature, so many rounds.
        let ps = Arc::new(parts(&[300_000, 300_000, 7]));
        let k = key(ps.iter().map(|(d, o, b)| (*d, *o, b.len() as u64)));
        for round in 0..40 {
            let dir = tempfile::tempdir().unwrap();
            let tmp = dir.path().join("tmp");
            fs::create_dir_all(&tmp).unwrap();
            let objs = Arc::new(Objects::open(&dir.path().join("files")).unwrap());
            let go = Arc::new(std::sync::Barrier::new(2));
            let writers: Vec<_> = (0..2)
                .map(|_| {
                    let (objs, ps, tmp, go) = (objs.clone(), ps.clone(), tmp.clone(), go.clone());
                    std::thread::spawn(move || {
                        go.wait();
                        objs.write(k, &ps, &tmp).map(|o| o.size())
                    })
                })
                .collect();
            for w in writers {
                assert_eq!(w.join().unwrap().unwrap(), 600_007, "round {round}");
            }
            let again = Objects::open(&dir.path().join("files")).unwrap();
            let o = again
                .get(&k)
                .unwrap_or_else(|| panic!("round {round}: object lost"));
            assert!(again.verify_once(&o).unwrap(), "round {round}: object torn");
            assert_eq!(fs::read_dir(&tmp).unwrap().count(), 0, "round {round}");
        }
    }

    #[test]
    fn write_reload_read_and_remove() {
        let dir = tempfile::tempdir().unwrap();
        let tmp = dir.path().join("tmp");
        fs::create_dir_all(&tmp).unwrap();
        let objs = Objects::open(&dir.path().join("files")).unwrap();
        let ps = parts(&[1000, 2000, 5]);
        let k = key(ps.iter().map(|(d, o, b)| (*d, *o, b.len() as u64)));
        let o = objs.write(k, &ps, &tmp).unwrap();
        assert_eq!(o.size(), 3005);
        assert_eq!(fs::read(&o.path).unwrap().len(), 3005);
        // Reloaded from disk: same chunks, each readable and checked.
        let again = Objects::open(&dir.path().join("files")).unwrap();
        let (o2, p) = again.locate(&ps[1].0).unwrap();
        assert_eq!(o2.chunks, o.chunks);
        assert_eq!(again.read(&o2, &p).unwrap().unwrap(), ps[1].2);
        // A flipped bit fails the crc.
        let mut bytes = fs::read(&o.path).unwrap();
        bytes[1500] ^= 1;
        fs::write(&o.path, &bytes).unwrap();
        assert_eq!(again.read(&o2, &p).unwrap(), None);
        assert!(!again.verify_once(&o2).unwrap(), "a fresh process checks");
        assert!(
            objs.verify_once(&o).unwrap(),
            "the writer trusts what it wrote"
        );
        // Held objects stay; released ones go, with their map.
        again.hold(k);
        assert_eq!(again.remove(&k).unwrap_err(), NotRemoved::Held);
        again.release(&k);
        again.remove(&k).unwrap();
        assert!(!o.path.exists() && !o.path.with_extension("map").exists());
        assert!(again.locate(&ps[0].0).is_none());
    }

    #[test]
    fn incomplete_objects_are_dropped_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let tmp = dir.path().join("tmp");
        fs::create_dir_all(&tmp).unwrap();
        let files = dir.path().join("files");
        let objs = Objects::open(&files).unwrap();
        let ps = parts(&[100, 100]);
        let k = key(ps.iter().map(|(d, o, b)| (*d, *o, b.len() as u64)));
        let o = objs.write(k, &ps, &tmp).unwrap();
        // Truncated object (size no longer matches its map).
        let f = fs::OpenOptions::new().write(true).open(&o.path).unwrap();
        f.set_len(150).unwrap();
        let again = Objects::open(&files).unwrap();
        assert!(again.get(&k).is_none());
        assert!(!o.path.exists());
        // A map whose object never made it.
        let o = objs.write(k, &ps, &tmp).unwrap();
        fs::remove_file(&o.path).unwrap();
        let _ = Objects::open(&files).unwrap();
        assert!(!o.path.with_extension("map").exists());
    }
}
