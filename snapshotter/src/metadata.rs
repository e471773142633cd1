//! Snapshot metadata in an embedded, crash-safe store (redb).
//!
//! One database file, `ROOT/metadata.redb`, holds:
//! - `snapshots`: key or name → a JSON [`Record`] (id, kind, parent, labels,
//!   timestamps, usage at commit);
//! - `children`: parent name → child keys, so Remove can refuse a snapshot
//!   with children without a scan;
//! - `meta`: counters (`next_id`).
//!
//! Invariants:
//! - Every write is one redb transaction, committed with immediate
//!   durability: after `commit` returns, a `kill -9` or power cut cannot lose
//!   it, and a crash before it leaves the previous state intact.
//! - Write operations take a closure that runs inside the transaction, before
//!   the commit, to do their filesystem work. The on-disk directory therefore
//!   exists before the metadata that names it, and a failed closure aborts the
//!   transaction.
//! - A snapshot's id never changes: Commit turns an active snapshot into a
//!   committed one under a new name but keeps its id, and so its directory.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use redb::{
    Database, MultimapTableDefinition, ReadableDatabase, ReadableMultimapTable, ReadableTable,
    TableDefinition, WriteTransaction,
};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
const CHILDREN: MultimapTableDefinition<&str, &str> = MultimapTableDefinition::new("children");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const NEXT_ID: &str = "next_id";

/// The kind of a snapshot, as containerd defines it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Read-only view of a committed parent.
    View,
    /// Writable snapshot being prepared.
    Active,
    /// Immutable snapshot, usable as a parent.
    Committed,
}

impl Kind {
    /// The name containerd's filters use (`kind==active`).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::View => "view",
            Kind::Active => "active",
            Kind::Committed => "committed",
        }
    }
}

/// Disk usage of a snapshot's own layer (not its parents).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Bytes allocated on disk.
    pub size: i64,
    /// Distinct inodes.
    pub inodes: i64,
}

/// What containerd sees of a snapshot (`snapshots.Info`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Info {
    /// Key (active, view) or name (committed).
    pub name: String,
    /// Name of the committed parent, if any.
    pub parent: Option<String>,
    /// Kind.
    pub kind: Kind,
    /// Creation time (for committed snapshots: the commit time).
    pub created: SystemTime,
    /// Last update time.
    pub updated: SystemTime,
    /// Labels.
    pub labels: BTreeMap<String, String>,
}

/// What the snapshotter needs to build mounts: the snapshot's id and the ids
/// of its parent chain, nearest first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// Stable numeric id; names the snapshot's directory.
    pub id: u64,
    /// Kind.
    pub kind: Kind,
    /// Ids of the parent chain, nearest parent first.
    pub parent_ids: Vec<u64>,
    /// Set for a lazily pulled layer.
    pub remote: Option<RemoteRef>,
}

/// Where a lazily pulled (remote) committed snapshot's bytes come from. The
/// layer is served through FUSE from its TOC; nothing is unpacked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteRef {
    /// Image reference the layer was pulled for (`host/repo:tag`).
    pub image_ref: String,
    /// Layer blob digest (`sha256:…`).
    pub layer_digest: String,
    /// TOC digest the manifest vouches for (`sha256:…`).
    pub toc_digest: String,
    /// Fetch without credentials: `image_ref` came from an image
    /// annotation, not from the client (see `remote::annotations`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub anonymous: bool,
}

/// The stored form of a snapshot. New fields must be `#[serde(default)]` so
/// that older databases still load.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Record {
    id: u64,
    kind: Kind,
    #[serde(default)]
    parent: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    created: SystemTime,
    updated: SystemTime,
    #[serde(default)]
    usage: Usage,
    #[serde(default)]
    remote: Option<RemoteRef>,
}

impl Record {
    fn info(&self, name: &str) -> Info {
        Info {
            name: name.to_owned(),
            parent: self.parent.clone(),
            kind: self.kind,
            created: self.created,
            updated: self.updated,
            labels: self.labels.clone(),
        }
    }
}

fn decode(key: &str, bytes: &[u8]) -> Result<Record> {
    serde_json::from_slice(bytes).map_err(|cause| Error::Corrupt {
        key: key.to_owned(),
        cause,
    })
}

/// Every remote snapshot in `db`: `(name, id, remote)`. For readers that
/// hold only the database (the TOC GC).
///
/// # Errors
/// Store errors.
pub fn remotes_in(db: &Database) -> Result<Vec<(String, u64, RemoteRef)>> {
    let txn = db.begin_read()?;
    let table = txn.open_table(SNAPSHOTS)?;
    let mut out = Vec::new();
    for entry in table.iter()? {
        let (k, v) = entry?;
        let rec = decode(k.value(), v.value())?;
        if let Some(r) = rec.remote {
            out.push((k.value().to_owned(), rec.id, r));
        }
    }
    Ok(out)
}

fn encode(record: &Record) -> Vec<u8> {
    serde_json::to_vec(record).expect("a Record always serialises")
}

fn load(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<Option<Record>> {
    match table.get(key)? {
        Some(v) => decode(key, v.value()).map(Some),
        None => Ok(None),
    }
}

/// Ids of `parent` and its ancestors, nearest first.
fn parent_chain(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    mut parent: Option<String>,
) -> Result<Vec<u64>> {
    let mut ids = Vec::new();
    while let Some(name) = parent {
        let rec = load(table, &name)?
            .ok_or_else(|| Error::NotFound(format!("parent snapshot {name:?}")))?;
        ids.push(rec.id);
        parent = rec.parent;
    }
    Ok(ids)
}

/// Inserts a new snapshot record under `key` with a fresh id.
fn insert_new(
    txn: &WriteTransaction,
    key: &str,
    kind: Kind,
    parent: Option<&str>,
    labels: BTreeMap<String, String>,
    usage: Usage,
    remote: Option<RemoteRef>,
) -> Result<Snapshot> {
    let mut table = txn.open_table(SNAPSHOTS)?;
    if table.get(key)?.is_some() {
        return Err(Error::AlreadyExists(format!("snapshot {key:?}")));
    }
    if let Some(p) = parent {
        let prec =
            load(&table, p)?.ok_or_else(|| Error::NotFound(format!("parent snapshot {p:?}")))?;
        if prec.kind != Kind::Committed {
            return Err(Error::InvalidArgument(format!(
                "parent {p:?} is not a committed snapshot"
            )));
        }
    }
    let parent_ids = parent_chain(&table, parent.map(str::to_owned))?;
    let mut meta = txn.open_table(META)?;
    let id = meta.get(NEXT_ID)?.map_or(1, |v| v.value());
    meta.insert(NEXT_ID, id + 1)?;
    let now = SystemTime::now();
    let rec = Record {
        id,
        kind,
        parent: parent.map(str::to_owned),
        labels,
        created: now,
        updated: now,
        usage,
        remote: remote.clone(),
    };
    table.insert(key, encode(&rec).as_slice())?;
    if let Some(p) = parent {
        txn.open_multimap_table(CHILDREN)?.insert(p, key)?;
    }
    Ok(Snapshot {
        id,
        kind,
        parent_ids,
        remote,
    })
}

/// The metadata store.
pub struct MetaStore {
    db: Arc<Database>,
}

impl MetaStore {
    /// Opens (or creates) the store at `path` and makes sure its tables exist.
    ///
    /// # Errors
    /// Fails if the file cannot be opened or is not a redb database.
    pub fn open(path: &Path) -> Result<Self> {
        let db = Database::create(path)?;
        let txn = db.begin_write()?;
        txn.open_table(SNAPSHOTS)?;
        txn.open_multimap_table(CHILDREN)?;
        txn.open_table(META)?;
        txn.commit()?;
        Ok(MetaStore { db: Arc::new(db) })
    }

    /// The database, shared with the chunk index (`remote::index`), whose
    /// tables live in the same file.
    pub fn database(&self) -> Arc<Database> {
        self.db.clone()
    }

    fn write<T>(&self, f: impl FnOnce(&WriteTransaction) -> Result<T>) -> Result<T> {
        let txn = self.db.begin_write()?;
        let out = f(&txn)?;
        txn.commit()?;
        Ok(out)
    }

    /// Info, mount data and recorded usage of `key`.
    ///
    /// # Errors
    /// [`Error::NotFound`] if there is no such snapshot.
    pub fn get(&self, key: &str) -> Result<(Info, Snapshot, Usage)> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(SNAPSHOTS)?;
        let rec = load(&table, key)?.ok_or_else(|| Error::NotFound(format!("snapshot {key:?}")))?;
        let snapshot = Snapshot {
            id: rec.id,
            kind: rec.kind,
            parent_ids: parent_chain(&table, rec.parent.clone())?,
            remote: rec.remote.clone(),
        };
        Ok((rec.info(key), snapshot, rec.usage))
    }

    /// Every snapshot's info, in key order.
    pub fn list(&self) -> Result<Vec<Info>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(SNAPSHOTS)?;
        let mut out = Vec::new();
        for entry in table.iter()? {
            let (k, v) = entry?;
            out.push(decode(k.value(), v.value())?.info(k.value()));
        }
        Ok(out)
    }

    /// Runs `f` with the ids of every snapshot while holding the write lock,
    /// so that no snapshot is created or removed meanwhile. Changes nothing in
    /// the store.
    ///
    /// # Errors
    /// Store errors, or what `f` returns.
    pub fn exclusive<T>(&self, f: impl FnOnce(&HashSet<u64>) -> Result<T>) -> Result<T> {
        let txn = self.db.begin_write()?;
        let ids = {
            let table = txn.open_table(SNAPSHOTS)?;
            let mut ids = HashSet::new();
            for entry in table.iter()? {
                let (k, v) = entry?;
                ids.insert(decode(k.value(), v.value())?.id);
            }
            ids
        };
        let out = f(&ids);
        txn.abort()?;
        out
    }

    /// Creates an active or view snapshot. `on_disk` runs inside the
    /// transaction, after the id is allocated and before the commit; it must
    /// create the snapshot's directory.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an empty key, a committed kind or a
    /// parent that is not committed; [`Error::AlreadyExists`] if the key is
    /// taken; [`Error::NotFound`] if the parent does not exist; and whatever
    /// `on_disk` returns.
    pub fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: Option<&str>,
        labels: BTreeMap<String, String>,
        on_disk: impl FnOnce(&Snapshot) -> Result<()>,
    ) -> Result<Snapshot> {
        if key.is_empty() {
            return Err(Error::InvalidArgument(
                "snapshot key must not be empty".into(),
            ));
        }
        if kind == Kind::Committed {
            return Err(Error::InvalidArgument(
                "only active or view snapshots can be created".into(),
            ));
        }
        self.write(|txn| {
            let snapshot = insert_new(txn, key, kind, parent, labels, Usage::default(), None)?;
            on_disk(&snapshot)?;
            Ok(snapshot)
        })
    }

    /// Creates committed snapshot `name` for a remote layer, directly (no
    /// active phase). `on_disk` runs inside the transaction, before the commit;
    /// it must create the directory and mount the layer.
    ///
    /// # Errors
    /// As [`MetaStore::create`].
    pub fn create_remote(
        &self,
        name: &str,
        parent: Option<&str>,
        labels: BTreeMap<String, String>,
        remote: RemoteRef,
        usage: Usage,
        on_disk: impl FnOnce(&Snapshot) -> Result<()>,
    ) -> Result<Snapshot> {
        self.write(|txn| {
            let snapshot = insert_new(
                txn,
                name,
                Kind::Committed,
                parent,
                labels,
                usage,
                Some(remote),
            )?;
            on_disk(&snapshot)?;
            Ok(snapshot)
        })
    }

    /// Every remote snapshot: `(name, id, remote)`, to mount again at start.
    ///
    /// # Errors
    /// Store errors.
    pub fn remotes(&self) -> Result<Vec<(String, u64, RemoteRef)>> {
        remotes_in(&self.db)
    }

    /// Turns active snapshot `key` (whose id must be `id`) into committed
    /// snapshot `name` with `labels` (replacing, not merging) and `usage`.
    ///
    /// # Errors
    /// [`Error::AlreadyExists`] if `name` is taken, [`Error::NotFound`] if
    /// `key` does not exist, [`Error::FailedPrecondition`] if it is not active
    /// or was replaced since `id` was read.
    pub fn commit(
        &self,
        key: &str,
        id: u64,
        name: &str,
        labels: BTreeMap<String, String>,
        usage: Usage,
    ) -> Result<()> {
        if name.is_empty() {
            return Err(Error::InvalidArgument(
                "snapshot name must not be empty".into(),
            ));
        }
        self.write(|txn| {
            let mut table = txn.open_table(SNAPSHOTS)?;
            if table.get(name)?.is_some() {
                return Err(Error::AlreadyExists(format!("committed snapshot {name:?}")));
            }
            let mut rec =
                load(&table, key)?.ok_or_else(|| Error::NotFound(format!("snapshot {key:?}")))?;
            if rec.kind != Kind::Active {
                return Err(Error::FailedPrecondition(format!(
                    "snapshot {key:?} is not active"
                )));
            }
            if rec.id != id {
                return Err(Error::FailedPrecondition(format!(
                    "snapshot {key:?} changed while it was being committed"
                )));
            }
            let now = SystemTime::now();
            rec.kind = Kind::Committed;
            rec.created = now;
            rec.updated = now;
            rec.labels = labels;
            rec.usage = usage;
            table.remove(key)?;
            table.insert(name, encode(&rec).as_slice())?;
            if let Some(p) = &rec.parent {
                let mut children = txn.open_multimap_table(CHILDREN)?;
                children.remove(p.as_str(), key)?;
                children.insert(p.as_str(), name)?;
            }
            Ok(())
        })
    }

    /// Removes `key` and returns its id. `on_disk` runs inside the
    /// transaction, before the commit.
    ///
    /// # Errors
    /// [`Error::NotFound`] if there is no such snapshot,
    /// [`Error::FailedPrecondition`] if other snapshots have it as parent.
    pub fn remove(&self, key: &str, on_disk: impl FnOnce(u64) -> Result<()>) -> Result<u64> {
        self.write(|txn| {
            let mut table = txn.open_table(SNAPSHOTS)?;
            let rec =
                load(&table, key)?.ok_or_else(|| Error::NotFound(format!("snapshot {key:?}")))?;
            let mut children = txn.open_multimap_table(CHILDREN)?;
            if children.get(key)?.next().is_some() {
                return Err(Error::FailedPrecondition(format!(
                    "cannot remove snapshot {key:?}: it has children"
                )));
            }
            table.remove(key)?;
            if let Some(p) = &rec.parent {
                children.remove(p.as_str(), key)?;
            }
            on_disk(rec.id)?;
            Ok(rec.id)
        })
    }

    /// Updates the labels of `info.name`, as containerd's `UpdateInfo` does:
    /// with no field paths, all labels are replaced; `labels` replaces all;
    /// `labels.K` sets (or, if absent from `info`, deletes) one label. Other
    /// fields are immutable.
    ///
    /// # Errors
    /// [`Error::NotFound`] if there is no such snapshot,
    /// [`Error::InvalidArgument`] for a path naming an immutable field.
    pub fn update(&self, info: &Info, paths: &[String]) -> Result<Info> {
        self.write(|txn| {
            let mut table = txn.open_table(SNAPSHOTS)?;
            let key = info.name.as_str();
            let mut rec =
                load(&table, key)?.ok_or_else(|| Error::NotFound(format!("snapshot {key:?}")))?;
            if paths.is_empty() {
                rec.labels = info.labels.clone();
            }
            for path in paths {
                if let Some(label) = path.strip_prefix("labels.") {
                    match info.labels.get(label) {
                        Some(v) => rec.labels.insert(label.to_owned(), v.clone()),
                        None => rec.labels.remove(label),
                    };
                } else if path == "labels" {
                    rec.labels = info.labels.clone();
                } else {
                    return Err(Error::InvalidArgument(format!(
                        "cannot update {path:?} field on snapshot {key:?}"
                    )));
                }
            }
            rec.updated = SystemTime::now();
            table.insert(key, encode(&rec).as_slice())?;
            Ok(rec.info(key))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, MetaStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = MetaStore::open(&dir.path().join("m.redb")).unwrap();
        (dir, store)
    }

    fn ok(_: &Snapshot) -> Result<()> {
        Ok(())
    }

    #[test]
    fn create_commit_chain_and_errors() {
        let (_d, s) = store();
        let a = s
            .create(Kind::Active, "a", None, BTreeMap::new(), ok)
            .unwrap();
        assert!(matches!(
            s.create(Kind::Active, "a", None, BTreeMap::new(), ok),
            Err(Error::AlreadyExists(_))
        ));
        assert!(matches!(
            s.create(Kind::Active, "b", Some("a"), BTreeMap::new(), ok),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            s.create(Kind::Active, "b", Some("nope"), BTreeMap::new(), ok),
            Err(Error::NotFound(_))
        ));
        s.commit("a", a.id, "c1", BTreeMap::new(), Usage::default())
            .unwrap();
        assert!(matches!(s.get("a"), Err(Error::NotFound(_))));
        let b = s
            .create(Kind::Active, "b", Some("c1"), BTreeMap::new(), ok)
            .unwrap();
        assert_eq!(b.parent_ids, vec![a.id]);
        s.commit("b", b.id, "c2", BTreeMap::new(), Usage::default())
            .unwrap();
        let v = s
            .create(Kind::View, "v", Some("c2"), BTreeMap::new(), ok)
            .unwrap();
        assert_eq!(v.parent_ids, vec![b.id, a.id]);
        assert!(matches!(
            s.commit("v", v.id, "c3", BTreeMap::new(), Usage::default()),
            Err(Error::FailedPrecondition(_))
        ));
        assert!(matches!(
            s.remove("c1", |_| Ok(())),
            Err(Error::FailedPrecondition(_))
        ));
        s.remove("v", |_| Ok(())).unwrap();
        s.remove("c2", |_| Ok(())).unwrap();
        s.remove("c1", |_| Ok(())).unwrap();
        assert!(s.exclusive(|ids| Ok(ids.is_empty())).unwrap());
    }

    #[test]
    fn failed_disk_work_aborts_the_transaction() {
        let (_d, s) = store();
        let r = s.create(Kind::Active, "a", None, BTreeMap::new(), |_| {
            Err(Error::io("mkdir", std::io::Error::other("disk full")))
        });
        assert!(matches!(r, Err(Error::Io { .. })));
        assert!(matches!(s.get("a"), Err(Error::NotFound(_))));
    }

    #[test]
    fn update_follows_containerd_field_paths() {
        let (_d, s) = store();
        let labels = BTreeMap::from([
            ("l1".to_owned(), "v1".to_owned()),
            ("l2".into(), "v2".into()),
        ]);
        s.create(Kind::Active, "a", None, labels, ok).unwrap();
        let (mut info, _, _) = s.get("a").unwrap();
        info.labels = BTreeMap::from([
            ("l1".to_owned(), "new".to_owned()),
            ("l4".into(), "x".into()),
        ]);
        let got = s
            .update(&info, &["labels.l1".into(), "labels.l2".into()])
            .unwrap();
        assert_eq!(
            got.labels,
            BTreeMap::from([("l1".to_owned(), "new".to_owned())])
        );
        assert!(got.updated > got.created);
        assert!(matches!(
            s.update(&info, &["parent".into()]),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn data_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.redb");
        {
            let s = MetaStore::open(&path).unwrap();
            let a = s
                .create(Kind::Active, "a", None, BTreeMap::new(), ok)
                .unwrap();
            s.commit(
                "a",
                a.id,
                "c",
                BTreeMap::new(),
                Usage {
                    size: 4096,
                    inodes: 2,
                },
            )
            .unwrap();
        }
        let s = MetaStore::open(&path).unwrap();
        let (info, snap, usage) = s.get("c").unwrap();
        assert_eq!(info.kind, Kind::Committed);
        assert_eq!(snap.id, 1);
        assert_eq!(
            usage,
            Usage {
                size: 4096,
                inodes: 2
            }
        );
        // Ids are never reused after a restart.
        assert_eq!(
            s.create(Kind::Active, "b", None, BTreeMap::new(), ok)
                .unwrap()
                .id,
            2
        );
    }
}
