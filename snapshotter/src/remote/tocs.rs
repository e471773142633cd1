//! Kept TOCs: the verified TOCs under `ROOT/tocs/`, which let a layer mount
//! again without the network, and per TOC the layer digest and image
//! references it was mounted for (redb table `cache_tocs` in
//! `metadata.redb`). With these a pin keeps the chunks of a layer that is no
//! longer mounted, and GC removes the TOCs that nothing needs any more.
//!
//! Invariants:
//! - A TOC is the pair `<alg>-<hex>.toc` + `<alg>-<hex>.footer.json`; the
//!   footer is written last and removed first, so a footer file means a
//!   complete pair. Each file is written to a unique temp file, fsynced and
//!   renamed, and the directory fsynced, so this holds across power cuts.
//! - A kept TOC is verified each time it is read; one that fails is removed
//!   ([`KeptTocs::discard`]) and fetched again.
//! - Every layer that was mounted has a record naming its layer digest and
//!   images, so a pin still finds it after the layer is unmounted, its
//!   snapshot removed, or the daemon restarted. The record is written
//!   (durably) when the layer is unmounted, and by each GC run for the
//!   layers mounted or referenced then; never at mount time, which runs
//!   inside the snapshot's redb write transaction.
//! - A TOC is removed only if no snapshot references it, no mounted layer
//!   uses it, no pin covers it, and it has been unreferenced for the TTL:
//!   `unreferenced_since` is set by the first GC run that finds it
//!   unreferenced and cleared by one that finds it referenced. Reading a
//!   local TOC (a Prepare or a remount) counts as a use, under the same lock
//!   as removal, so a TOC is never removed between being read and mounted.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, Weak};

use parking_lot::Mutex;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::toc::{parse_digest, Footer, Toc, TocLimits};
use crate::metadata::RemoteRef;

const TOCS: TableDefinition<&str, &[u8]> = TableDefinition::new("cache_tocs");
/// Temp files start with a dot, so no digest is read from their names.
const TEMP_PREFIX: &str = ".";
/// And end so (`<digest>.tmp` and `<digest>.footer.tmp` in earlier versions).
const TEMP_SUFFIX: &str = ".tmp";

/// What is known of one kept TOC.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TocRecord {
    /// Layer blob digest; empty if the TOC was never mounted by this version.
    #[serde(default)]
    pub layer_digest: String,
    /// Image references it was mounted for.
    #[serde(default)]
    pub images: BTreeSet<String>,
    /// When GC first found it unreferenced (clock seconds); 0: referenced at
    /// the last run.
    #[serde(default)]
    pub unreferenced_since: u64,
}

impl TocRecord {
    /// Adds what `r` says of the layer; the layer is in use.
    fn merge(&mut self, r: &RemoteRef) {
        self.layer_digest.clone_from(&r.layer_digest);
        self.images.insert(r.image_ref.clone());
        self.unreferenced_since = 0;
    }

    /// Whether this layer claims (by the labels it was mounted with) to be
    /// one that a pin in `pins` names. A claim only: [`super::cache::Cache::pin`]
    /// binds pins to TOC digests, and GC goes by those.
    pub fn pinned_by(&self, pins: &HashSet<String>) -> bool {
        (!self.layer_digest.is_empty() && pins.contains(&self.layer_digest))
            || self.images.iter().any(|i| pins.contains(i))
    }
}

/// What [`plan`] decided about the TOCs on disk.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TocPlan {
    /// TOC digests to remove (files and record).
    pub remove: Vec<String>,
    /// Records to write (a new `unreferenced_since`, or a new record).
    pub write: Vec<(String, TocRecord)>,
    /// Records whose TOC files are gone, to drop.
    pub forget: Vec<String>,
    /// TOCs left on disk.
    pub kept: u64,
    /// Of which covered by a pin.
    pub pinned: Vec<String>,
}

/// The inputs of [`plan`] that are not the TOCs themselves.
pub struct TocInputs<'a> {
    /// Layers referenced by a snapshot or mounted.
    pub referenced: &'a [RemoteRef],
    /// TOC digests of pinned layers (pins bound to verified TOCs).
    pub pins: &'a HashSet<String>,
    /// Last local read per TOC in this process.
    pub used: &'a HashMap<String, u64>,
    /// Seconds an unreferenced TOC is kept.
    pub ttl: u64,
    /// Now (clock seconds).
    pub now: u64,
}

/// Decides which TOCs to remove (see the module doc). Pure.
pub fn plan(
    on_disk: &BTreeSet<String>,
    records: &BTreeMap<String, TocRecord>,
    inp: &TocInputs<'_>,
) -> TocPlan {
    let mut out = TocPlan::default();
    let mut referenced: HashMap<&str, Vec<&RemoteRef>> = HashMap::new();
    for r in inp.referenced {
        referenced.entry(&r.toc_digest).or_default().push(r);
    }
    for d in on_disk {
        let known = records.get(d);
        let mut rec = known.cloned().unwrap_or_default();
        if let Some(refs) = referenced.get(d.as_str()) {
            rec.unreferenced_since = 0;
            for r in refs {
                rec.merge(r);
            }
            if inp.pins.contains(d) {
                out.pinned.push(d.clone());
            }
            if known != Some(&rec) {
                out.write.push((d.clone(), rec));
            }
            out.kept += 1;
            continue;
        }
        if known.is_none() || rec.unreferenced_since == 0 {
            rec.unreferenced_since = inp.now;
            out.write.push((d.clone(), rec.clone()));
        }
        if inp.pins.contains(d) {
            out.kept += 1;
            out.pinned.push(d.clone());
            continue;
        }
        let last = rec
            .unreferenced_since
            .max(inp.used.get(d).copied().unwrap_or(0));
        if inp.now >= last.saturating_add(inp.ttl) {
            out.remove.push(d.clone());
        } else {
            out.kept += 1;
        }
    }
    out.forget = records
        .keys()
        .filter(|d| !on_disk.contains(*d) && !referenced.contains_key(d.as_str()))
        .cloned()
        .collect();
    out
}

/// See the module doc.
pub struct KeptTocs {
    dir: PathBuf,
    db: OnceLock<Weak<Database>>,
    /// Last local read per TOC in this process; also the lock that orders
    /// reads against removal.
    used: Mutex<HashMap<String, u64>>,
    /// Chunk digests of unmounted pinned layers, read once per TOC.
    chunks: Mutex<HashMap<String, Arc<Vec<[u8; 32]>>>>,
    /// What a kept TOC may be when it is read again.
    limits: TocLimits,
}

/// The result of [`KeptTocs::collect`].
#[derive(Debug, Default)]
pub struct Collected {
    /// TOCs removed (or that would be, in a dry run).
    pub removed: u64,
    /// TOCs left.
    pub kept: u64,
    /// Pinned layers that are not mounted, with their chunks.
    pub pinned: Vec<(TocRecord, Arc<Vec<[u8; 32]>>)>,
}

fn file_digest(name: &str) -> Option<String> {
    let stem = name.split('.').next()?;
    let d = stem.replacen('-', ":", 1);
    parse_digest(&d).map(|_| d)
}

impl KeptTocs {
    /// TOCs kept in `dir`, created (mode 0700) if missing; temp files a
    /// crash left there are removed.
    ///
    /// # Errors
    /// `dir` cannot be created.
    pub fn new(dir: PathBuf) -> io::Result<KeptTocs> {
        std::os::unix::fs::DirBuilderExt::mode(fs::DirBuilder::new().recursive(true), 0o700)
            .create(&dir)?;
        let k = KeptTocs {
            dir,
            db: OnceLock::new(),
            used: Mutex::new(HashMap::new()),
            chunks: Mutex::new(HashMap::new()),
            limits: TocLimits::default(),
        };
        k.remove_stale_temp();
        Ok(k)
    }

    /// Reads kept TOCs within `limits` (those the layers were mounted with).
    #[must_use]
    pub fn with_limits(mut self, limits: TocLimits) -> KeptTocs {
        self.limits = limits;
        self
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The TOC and footer files of `toc_digest` (a checked digest).
    pub fn paths(&self, toc_digest: &str) -> (PathBuf, PathBuf) {
        let name = toc_digest.replace(':', "-");
        (
            self.dir.join(format!("{name}.toc")),
            self.dir.join(format!("{name}.footer.json")),
        )
    }

    /// Attaches the database (once, at start).
    ///
    /// # Errors
    /// The database failed.
    pub fn attach(&self, db: &Arc<Database>) -> Result<(), redb::Error> {
        let txn = db.begin_write()?;
        txn.open_table(TOCS)?;
        txn.commit()?;
        let _ = self.db.set(Arc::downgrade(db));
        Ok(())
    }

    fn db(&self) -> Option<Arc<Database>> {
        self.db.get().and_then(Weak::upgrade)
    }

    /// Reads the local copy of `toc_digest` (footer, compressed TOC), if
    /// complete, and notes the use at `now`.
    pub fn read_local(&self, toc_digest: &str, now: u64) -> Option<(Footer, Vec<u8>)> {
        let mut used = self.used.lock();
        used.insert(toc_digest.to_owned(), now);
        let (toc, footer) = self.paths(toc_digest);
        let footer: Footer = serde_json::from_slice(&fs::read(footer).ok()?).ok()?;
        Some((footer, fs::read(toc).ok()?))
    }

    /// Keeps a verified TOC, durably: TOC first, footer last, each written
    /// to a temp file of its own (concurrent writers of one TOC never share
    /// one), fsynced, renamed into place, and the directory fsynced after
    /// each rename, so a footer on disk means a complete TOC even after a
    /// power cut.
    ///
    /// # Errors
    /// A write failed.
    pub fn write(&self, toc_digest: &str, footer: &Footer, compressed: &[u8]) -> io::Result<()> {
        let (toc_path, footer_path) = self.paths(toc_digest);
        self.write_durably(&toc_path, compressed)?;
        self.write_durably(
            &footer_path,
            &serde_json::to_vec(footer).map_err(io::Error::other)?,
        )
    }

    fn write_durably(&self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        let mut tmp = tempfile::Builder::new()
            .prefix(TEMP_PREFIX)
            .suffix(TEMP_SUFFIX)
            .tempfile_in(&self.dir)?;
        io::Write::write_all(&mut tmp, bytes)?;
        tmp.as_file().sync_all()?;
        tmp.persist(path).map_err(|e| e.error)?;
        fs::File::open(&self.dir)?.sync_all()
    }

    /// Removes a kept TOC that failed verification (a torn or corrupted
    /// copy), so that it is fetched and written again.
    pub fn discard(&self, toc_digest: &str) {
        // Under the lock that orders reads against removal.
        let _used = self.used.lock();
        self.chunks.lock().remove(toc_digest);
        if let Err(e) = self.remove_files(toc_digest) {
            warn!(toc = %toc_digest, error = %e, "cannot remove a kept TOC that does not verify");
        }
    }

    /// Removes the temp files a process that died mid-write left behind
    /// (of this version and of earlier ones).
    fn remove_stale_temp(&self) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.ends_with(TEMP_SUFFIX) {
                let _ = fs::remove_file(e.path());
            }
        }
    }

    /// Records that `r` was mounted, if the record does not say so already
    /// (a durable write only for a new layer or image). A no-op before
    /// [`KeptTocs::attach`]. Never call it inside a redb write transaction.
    ///
    /// # Errors
    /// The database failed.
    pub fn note_mounted(&self, r: &RemoteRef) -> Result<(), redb::Error> {
        let Some(db) = self.db() else { return Ok(()) };
        let known = {
            let txn = db.begin_read()?;
            let t = txn.open_table(TOCS)?;
            t.get(r.toc_digest.as_str())?
                .and_then(|v| serde_json::from_slice::<TocRecord>(v.value()).ok())
        };
        let mut rec = known.clone().unwrap_or_default();
        rec.merge(r);
        if known.as_ref() == Some(&rec) {
            return Ok(());
        }
        let txn = db.begin_write()?;
        txn.open_table(TOCS)?.insert(
            r.toc_digest.as_str(),
            serde_json::to_vec(&rec).unwrap_or_default().as_slice(),
        )?;
        txn.commit()?;
        Ok(())
    }

    /// Every record.
    ///
    /// # Errors
    /// The database failed.
    pub fn records(&self) -> Result<BTreeMap<String, TocRecord>, redb::Error> {
        let Some(db) = self.db() else {
            return Ok(BTreeMap::new());
        };
        let txn = db.begin_read()?;
        let t = txn.open_table(TOCS)?;
        let mut out = BTreeMap::new();
        for row in t.iter()? {
            let (k, v) = row?;
            let rec = serde_json::from_slice(v.value()).unwrap_or_default();
            out.insert(k.value().to_owned(), rec);
        }
        Ok(out)
    }

    /// Digests of the TOCs with any file in the directory (complete or not).
    ///
    /// # Errors
    /// The directory cannot be read.
    pub fn on_disk(&self) -> io::Result<BTreeSet<String>> {
        let mut out = BTreeSet::new();
        for e in fs::read_dir(&self.dir)? {
            if let Some(d) = e?.file_name().to_str().and_then(file_digest) {
                out.insert(d);
            }
        }
        Ok(out)
    }

    /// The distinct chunk digests of a kept TOC, verified against its digest.
    ///
    /// # Errors
    /// The TOC is missing or does not verify.
    pub fn chunk_digests(&self, toc_digest: &str) -> Result<Arc<Vec<[u8; 32]>>, String> {
        if let Some(c) = self.chunks.lock().get(toc_digest) {
            return Ok(c.clone());
        }
        let (toc_path, footer_path) = self.paths(toc_digest);
        let footer: Footer = fs::read(&footer_path)
            .map_err(|e| format!("{}: {e}", footer_path.display()))
            .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))?;
        let compressed = fs::read(&toc_path).map_err(|e| format!("{}: {e}", toc_path.display()))?;
        let toc = Toc::parse_with(&compressed, &footer, toc_digest, &self.limits)
            .map_err(|e| e.to_string())?;
        let mut v: Vec<[u8; 32]> = toc.files.iter().flatten().map(|c| c.digest).collect();
        v.sort_unstable();
        v.dedup();
        let v = Arc::new(v);
        self.chunks.lock().insert(toc_digest.to_owned(), v.clone());
        Ok(v)
    }

    fn remove_files(&self, toc_digest: &str) -> io::Result<()> {
        let (toc_path, footer_path) = self.paths(toc_digest);
        let gone = |r: io::Result<()>| match r {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        };
        // Footer first: a footer file always means a complete pair.
        gone(fs::remove_file(&footer_path))?;
        gone(fs::remove_file(footer_path.with_extension("tmp")))?;
        gone(fs::remove_file(&toc_path))?;
        gone(fs::remove_file(toc_path.with_extension("tmp")))
    }

    /// GC of the TOCs (see the module doc): `mounted` are the mounted
    /// layers; snapshots are read from the database. A dry run changes
    /// nothing. Blocking.
    pub fn collect(
        &self,
        mounted: &[RemoteRef],
        pins: &HashSet<String>,
        ttl: u64,
        now: u64,
        dry_run: bool,
    ) -> Collected {
        let mut referenced = mounted.to_vec();
        let Some(db) = self.db() else {
            return Collected::default();
        };
        match crate::metadata::remotes_in(&db) {
            Ok(r) => referenced.extend(r.into_iter().map(|(_, _, r)| r)),
            Err(e) => {
                warn!(error = %e, "cannot read the snapshots; no TOC is collected this run");
                return Collected::default();
            }
        }
        let (records, on_disk) = match (self.records(), self.on_disk()) {
            (Ok(r), Ok(d)) => (r, d),
            (Err(e), _) => {
                warn!(error = %e, "cannot read the TOC records; no TOC is collected this run");
                return Collected::default();
            }
            (_, Err(e)) => {
                warn!(dir = %self.dir.display(), error = %e, "cannot list the kept TOCs");
                return Collected::default();
            }
        };
        let mut out = Collected::default();
        {
            // Held from the plan to the last removal: a read of a TOC
            // (read_local) happens wholly before or after.
            let mut used = self.used.lock();
            let p = plan(
                &on_disk,
                &records,
                &TocInputs {
                    referenced: &referenced,
                    pins,
                    used: &used,
                    ttl,
                    now,
                },
            );
            out.kept = p.kept;
            out.removed = p.remove.len() as u64;
            for d in &p.pinned {
                if mounted.iter().any(|r| r.toc_digest == *d) {
                    continue;
                }
                match self.chunk_digests(d) {
                    Ok(c) => out
                        .pinned
                        .push((records.get(d).cloned().unwrap_or_default(), c)),
                    Err(e) => warn!(toc = %d, error = %e,
                        "cannot read a pinned layer's kept TOC; GC cannot protect its chunks"),
                }
            }
            if dry_run {
                return out;
            }
            let mut removed = Vec::new();
            for d in &p.remove {
                match self.remove_files(d) {
                    Ok(()) => removed.push(d.clone()),
                    Err(e) => {
                        warn!(toc = %d, error = %e, "cannot remove a kept TOC");
                        out.removed -= 1;
                        out.kept += 1;
                    }
                }
            }
            self.chunks.lock().retain(|d, _| !removed.contains(d));
            used.retain(|d, _| !removed.contains(d));
            if let Err(e) = self.apply(&p.write, removed.iter().chain(&p.forget)) {
                warn!(error = %e, "cannot update the TOC records");
            }
            if !removed.is_empty() {
                info!(
                    count = removed.len(),
                    "removed kept TOCs no snapshot or pin needs"
                );
            }
        }
        out
    }

    fn apply<'a>(
        &self,
        write: &[(String, TocRecord)],
        drop: impl Iterator<Item = &'a String>,
    ) -> Result<(), redb::Error> {
        let Some(db) = self.db() else { return Ok(()) };
        let txn = db.begin_write()?;
        {
            let mut t = txn.open_table(TOCS)?;
            for (d, rec) in write {
                t.insert(
                    d.as_str(),
                    serde_json::to_vec(rec).unwrap_or_default().as_slice(),
                )?;
            }
            for d in drop {
                t.remove(d.as_str())?;
            }
        }
        txn.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: u8) -> String {
        format!("sha256:{}", hex::encode([n; 32]))
    }

    fn rec(layer: &str, image: &str, since: u64) -> TocRecord {
        TocRecord {
            layer_digest: layer.into(),
            images: BTreeSet::from([image.to_owned()]),
            unreferenced_since: since,
        }
    }

    #[test]
    fn file_names_map_back_to_digests() {
        let x = d(7);
        let name = x.replace(':', "-");
        for suffix in [".toc", ".footer.json", ".tmp", ".footer.tmp"] {
            assert_eq!(file_digest(&format!("{name}{suffix}")), Some(x.clone()));
        }
        assert_eq!(file_digest("sha256-zz.toc"), None);
        assert_eq!(file_digest("lost+found"), None);
    }

    #[test]
    fn unreferenced_tocs_go_after_the_ttl_unless_pinned_or_used() {
        let on_disk = BTreeSet::from([d(1), d(2), d(3), d(4), d(5)]);
        let records = BTreeMap::from([
            (d(1), rec("sha256:l1", "img:a", 0)),   // referenced
            (d(2), rec("sha256:l2", "img:b", 0)),   // newly unreferenced
            (d(3), rec("sha256:l3", "img:c", 100)), // unreferenced since 100
            (d(4), rec("sha256:l4", "img:p", 100)), // pinned by image
            (d(9), rec("sha256:l9", "img:x", 100)), // files gone
        ]);
        let referenced = [RemoteRef {
            image_ref: "img:a".into(),
            layer_digest: "sha256:l1".into(),
            toc_digest: d(1),
            anonymous: false,
        }];
        // Pins are TOC digests (bound to them when pinned).
        let pins = HashSet::from([d(4)]);
        let used = HashMap::new();
        let inp = |now, used| TocInputs {
            referenced: &referenced,
            pins: &pins,
            used,
            ttl: 50,
            now,
        };
        let p = plan(&on_disk, &records, &inp(149, &used));
        assert!(p.remove.is_empty(), "{p:?}");
        // d(2) and d(5) (no record) start their TTL now.
        let since: Vec<_> = p
            .write
            .iter()
            .map(|(d, r)| (d.clone(), r.unreferenced_since))
            .collect();
        assert_eq!(since, vec![(d(2), 149), (d(5), 149)]);
        assert_eq!(p.forget, vec![d(9)]);
        assert_eq!(p.pinned, vec![d(4)]);
        assert_eq!(p.kept, 5);
        let p = plan(&on_disk, &records, &inp(150, &used));
        assert_eq!(p.remove, vec![d(3)]);
        assert_eq!(p.kept, 4);
        // A local read resets the clock.
        let used = HashMap::from([(d(3), 120)]);
        assert!(plan(&on_disk, &records, &inp(150, &used)).remove.is_empty());
        assert_eq!(
            plan(&on_disk, &records, &inp(170, &used)).remove,
            vec![d(3)]
        );
        // Referenced again (from another image too): the mark is cleared.
        let referenced = [RemoteRef {
            image_ref: "img:c".into(),
            layer_digest: "sha256:l3".into(),
            toc_digest: d(3),
            anonymous: false,
        }];
        let p = plan(
            &on_disk,
            &records,
            &TocInputs {
                referenced: &referenced,
                ..inp(999, &used)
            },
        );
        assert!(p.write.contains(&(d(3), rec("sha256:l3", "img:c", 0))));
        assert!(!p.remove.contains(&d(3)));
    }

    #[test]
    fn concurrent_writers_of_one_toc_never_collide_and_leave_no_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let k = Arc::new(KeptTocs::new(dir.path().join("tocs")).unwrap());
        let footer = Footer::zstd_at(100, 5000).unwrap();
        let body = vec![7u8; 5000];
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (k, body) = (k.clone(), body.clone());
                std::thread::spawn(move || {
                    for _ in 0..40 {
                        k.write(&d(1), &footer, &body).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let names: BTreeSet<String> = fs::read_dir(k.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        let stem = d(1).replace(':', "-");
        assert_eq!(
            names,
            BTreeSet::from([format!("{stem}.toc"), format!("{stem}.footer.json")])
        );
        assert_eq!(k.read_local(&d(1), 0), Some((footer, body)));
        // A crash mid-write leaves a temp file: the next start removes it.
        fs::write(k.dir().join(".abc.tmp"), b"torn").unwrap();
        fs::write(k.dir().join(format!("{stem}.footer.tmp")), b"torn").unwrap();
        let k2 = KeptTocs::new(k.dir().to_owned()).unwrap();
        assert_eq!(k2.on_disk().unwrap(), BTreeSet::from([d(1)]));
        assert_eq!(fs::read_dir(k2.dir()).unwrap().count(), 2);
        k2.discard(&d(1));
        assert_eq!(fs::read_dir(k2.dir()).unwrap().count(), 0);
    }

    #[test]
    fn records_survive_reopening_and_merge_images() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(Database::create(dir.path().join("m.redb")).unwrap());
        let k = KeptTocs::new(dir.path().join("tocs")).unwrap();
        k.attach(&db).unwrap();
        let r = |image: &str| RemoteRef {
            image_ref: image.into(),
            layer_digest: "sha256:l".into(),
            toc_digest: d(1),
            anonymous: false,
        };
        k.note_mounted(&r("a:1")).unwrap();
        k.note_mounted(&r("a:2")).unwrap();
        k.note_mounted(&r("a:1")).unwrap();
        let k2 = KeptTocs::new(dir.path().join("tocs")).unwrap();
        k2.attach(&db).unwrap();
        let recs = k2.records().unwrap();
        assert_eq!(recs.len(), 1);
        assert_eq!(
            recs[&d(1)].images,
            BTreeSet::from(["a:1".to_owned(), "a:2".to_owned()])
        );
        assert!(recs[&d(1)].pinned_by(&HashSet::from(["sha256:l".to_owned()])));
        assert!(!recs[&d(1)].pinned_by(&HashSet::from(["a:3".to_owned()])));
    }
}
