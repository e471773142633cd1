//! The overlayfs snapshotter: containerd's built-in `overlayfs` semantics on
//! top of [`MetaStore`].
//!
//! On disk, under `ROOT`:
//! - `metadata.redb`: the metadata store;
//! - `snapshots/ID/fs`: the snapshot's own layer (an overlay upperdir, or the
//!   directory containerd unpacks a layer into);
//! - `snapshots/ID/work`: overlay workdir, active snapshots only;
//! - `snapshots/new-ID`: a directory being created; never referenced by
//!   metadata, so a crash leaves only garbage that [`Snapshotter::cleanup`]
//!   removes.
//! - `lock`: held with `flock` for the life of the daemon, so two daemons can
//!   never share a root.
//!
//! Mounts follow containerd's overlay snapshotter exactly: a snapshot without
//! parents is a bind mount of its `fs`; an active snapshot with parents is an
//! overlay with `upperdir`, `workdir` and `lowerdir` (nearest parent first); a
//! view of a single parent is a read-only bind mount of that parent; a view
//! of several is a lowerdir-only overlay.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use shoal_proto::types::Mount;
use tracing::{info, warn};

use crate::error::{Error, Result};
use crate::filter::Filter;
use crate::metadata::{Info, Kind, MetaStore, Snapshot, Usage};
use crate::remote::layers::{FallbackReason, RemoteLayers};
use crate::usage::disk_usage;

mod remount;

/// Whether the running kernel's overlayfs has the `index` feature; if so,
/// mounts pass `index=off`, as containerd does, so that lower layers can be
/// shared between overlays.
fn overlay_supports_index() -> bool {
    Path::new("/sys/module/overlay/parameters/index").exists()
}

/// An overlayfs snapshotter rooted at one directory.
pub struct Snapshotter {
    root: PathBuf,
    // Dropped before `store`: it flushes the chunk index into its database.
    remote: Option<RemoteLayers>,
    store: MetaStore,
    index_off: bool,
    /// Remote layers left unmounted at start until their TOC is fetched
    /// (see `remount`).
    waiting: std::sync::Mutex<Vec<remount::Waiting>>,
    _lock: Flock<File>,
}

impl Snapshotter {
    /// Opens the snapshotter at `root`, creating it if needed, and removes
    /// directories that a crash left behind.
    ///
    /// # Errors
    /// Fails if `root` cannot be created, is locked by another daemon, or the
    /// metadata store cannot be opened.
    pub fn open(root: &Path) -> Result<Self> {
        Self::open_with_remote(root, None)
    }

    /// Like [`Snapshotter::open`], with lazily pulled layers served by
    /// `remote`. Remote snapshots recorded in the store are mounted again.
    ///
    /// # Errors
    /// As [`Snapshotter::open`].
    pub fn open_with_remote(root: &Path, remote: Option<RemoteLayers>) -> Result<Self> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(root.join("snapshots"))
            .and_then(|()| fsync_dir(root))
            .map_err(|e| Error::io(format!("create {}", root.display()), e))?;
        let lock_path = root.join("lock");
        let lock_file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| Error::io(format!("open {}", lock_path.display()), e))?;
        let lock =
            Flock::lock(lock_file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
                Error::io(
                    format!(
                        "lock {} (is another shoal-snapshotter using this root?)",
                        lock_path.display()
                    ),
                    io::Error::from(errno),
                )
            })?;
        let store = MetaStore::open(&root.join("metadata.redb"))?;
        let sn = Snapshotter {
            root: root.to_owned(),
            store,
            index_off: overlay_supports_index(),
            remote,
            waiting: std::sync::Mutex::default(),
            _lock: lock,
        };
        if let Some(r) = &sn.remote {
            r.recover(sn.store.database())?;
        }
        sn.remount_remotes()?;
        let removed = sn.cleanup()?;
        if !removed.is_empty() {
            info!(
                count = removed.len(),
                "removed directories left by an earlier run"
            );
        }
        Ok(sn)
    }

    fn snapshots_dir(&self) -> PathBuf {
        self.root.join("snapshots")
    }

    fn dir(&self, id: u64) -> PathBuf {
        self.snapshots_dir().join(id.to_string())
    }

    /// The directory holding snapshot `id`'s own layer.
    pub fn upper_path(&self, id: u64) -> PathBuf {
        self.dir(id).join("fs")
    }

    fn work_path(&self, id: u64) -> PathBuf {
        self.dir(id).join("work")
    }

    /// Info of a snapshot.
    ///
    /// # Errors
    /// [`Error::NotFound`] if it does not exist.
    pub fn stat(&self, key: &str) -> Result<Info> {
        self.refuse_quarantined(Some(key))?;
        Ok(self.store.get(key)?.0)
    }

    /// Refuses `key` if it or a snapshot in its parent chain is a lazy layer
    /// whose content did not match its chain ID (`remote::identity`): such
    /// a layer is never handed out again.
    ///
    /// # Errors
    /// [`Error::FailedPrecondition`] naming the quarantined layer; store
    /// errors.
    fn refuse_quarantined(&self, key: Option<&str>) -> Result<()> {
        let Some(remote) = self.remote.as_ref().filter(|r| r.any_quarantined()) else {
            return Ok(());
        };
        let mut cur = key.map(str::to_owned);
        while let Some(name) = cur {
            if let Some(why) = remote.quarantined(&name) {
                return Err(Error::FailedPrecondition(format!(
                    "layer {name} is quarantined by shoal: {why}"
                )));
            }
            cur = match self.store.get(&name) {
                Ok((info, _, _)) => info.parent,
                Err(Error::NotFound(_)) => None,
                Err(e) => return Err(e),
            };
        }
        Ok(())
    }

    /// Updates labels; see [`MetaStore::update`].
    ///
    /// # Errors
    /// As [`MetaStore::update`].
    pub fn update(&self, info: &Info, paths: &[String]) -> Result<Info> {
        self.store.update(info, paths)
    }

    /// Usage of an active snapshot is measured now; that of a committed one
    /// was measured at commit.
    ///
    /// # Errors
    /// [`Error::NotFound`] if it does not exist, or an I/O error.
    pub fn usage(&self, key: &str) -> Result<Usage> {
        let (info, snap, usage) = self.store.get(key)?;
        if info.kind == Kind::Active {
            return disk_usage(&self.upper_path(snap.id));
        }
        Ok(usage)
    }

    /// The remote-layer half, if enabled.
    pub fn remote(&self) -> Option<&RemoteLayers> {
        self.remote.as_ref()
    }

    /// Mounts for an existing active snapshot or view.
    ///
    /// # Errors
    /// [`Error::NotFound`] if it does not exist.
    pub fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        self.refuse_quarantined(Some(key))?;
        let (_, snap, _) = self.store.get(key)?;
        Ok(self.mounts_for(&snap))
    }

    /// Creates an active (`Prepare`) or read-only (`View`) snapshot.
    ///
    /// # Errors
    /// See [`MetaStore::create`]; plus I/O errors creating the directories.
    pub fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: Option<&str>,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>> {
        self.refuse_quarantined(parent)?;
        if kind == Kind::Active {
            if let Some(target) = self.try_remote(parent, &labels)? {
                // containerd's contract: the layer exists under its chain ID,
                // so skip the download (BRIEF section 2).
                return Err(Error::AlreadyExists(format!("target snapshot {target:?}")));
            }
        }
        // A container's rootfs (not a layer unpack): its layers' startup
        // sets, fetched in parallel since their Prepares, come first.
        if let (Some(remote), Some(_), false) = (
            &self.remote,
            parent,
            labels.contains_key(crate::remote::layers::LABEL_TARGET),
        ) {
            remote.wait_for_prefetch();
        }
        let snap = self
            .store
            .create(kind, key, parent, labels, |snap| self.make_dirs(snap))?;
        Ok(self.mounts_for(&snap))
    }

    /// If `labels` describe a lazily mountable layer, mounts it as committed
    /// snapshot `target` and returns the target. `None` means: do a normal
    /// Prepare (not remote, or any failure, which is logged as a fallback).
    fn try_remote(
        &self,
        parent: Option<&str>,
        labels: &BTreeMap<String, String>,
    ) -> Result<Option<String>> {
        let Some(remote) = &self.remote else {
            return Ok(None);
        };
        let Some((target, rref)) = remote.detect(labels) else {
            return Ok(None);
        };
        if let Ok((_, existing, _)) = self.store.get(&target) {
            // Another image's lazy layer under this chain ID: adopt it only
            // if it is this image's layer too, or proven to match the chain ID.
            let adopt = match &existing.remote {
                Some(held) => remote.may_adopt(&target, held, &rref),
                None => Ok(()),
            };
            return match adopt {
                Ok(()) => Ok(Some(target)),
                Err(why) => {
                    remote.fallback(&rref.layer_digest, FallbackReason::Conflict, &why);
                    Ok(None)
                }
            };
        }
        let hints = crate::remote::annotations::hints(labels);
        let resolved = match remote.resolve_with(&rref, hints) {
            Ok(r) => r,
            Err(reason) => {
                remote.fallback(&rref.layer_digest, FallbackReason::Toc, &reason);
                return Ok(None);
            }
        };
        remote.claim(&target, parent);
        let mounted = std::cell::Cell::new(None);
        let res = self.store.create_remote(
            &target,
            parent,
            labels.clone(),
            rref.clone(),
            resolved.usage,
            |snap| {
                self.make_dirs(snap)?;
                let mp = self.upper_path(snap.id);
                remote
                    .mount(snap.id, &target, &rref, &resolved, &mp)
                    .map_err(Error::Remote)?;
                mounted.set(Some(snap.id));
                Ok(())
            },
        );
        match res {
            Ok(snap) => {
                remote.start_fetching(snap.id);
                Ok(Some(target))
            }
            // Another Prepare of the same layer won the race.
            Err(Error::AlreadyExists(_)) => Ok(Some(target)),
            Err(e) => {
                if let Some(id) = mounted.get() {
                    remote.unmount(id);
                }
                remote.fallback(&rref.layer_digest, FallbackReason::Mount, &e.to_string());
                Ok(None)
            }
        }
    }

    /// Runs inside the create transaction: builds `new-ID`, fsyncs it, renames
    /// it to `ID` and fsyncs `snapshots/`, so the directory is complete and
    /// durable before metadata names it (the redb commit that follows is
    /// durable too: an acknowledged Prepare survives a power cut). If the
    /// transaction then fails to commit (or the process dies), the directory
    /// is garbage: cleanup removes it, and since the id allocation was rolled
    /// back too, the next create of that id clears it first.
    fn make_dirs(&self, snap: &Snapshot) -> Result<()> {
        let tmp = self.snapshots_dir().join(format!("new-{}", snap.id));
        let result = (|| {
            remove_all(&tmp)?;
            let mut b = fs::DirBuilder::new();
            b.mode(0o700).create(&tmp)?;
            b.mode(0o755).create(tmp.join("fs"))?;
            if snap.kind == Kind::Active {
                b.mode(0o711).create(tmp.join("work"))?;
            }
            // The new layer's root takes the owner of the parent's root, as in
            // containerd: an unprivileged image keeps its root directory owner.
            if let Some(&pid) = snap.parent_ids.first() {
                let md = fs::metadata(self.upper_path(pid))?;
                std::os::unix::fs::lchown(tmp.join("fs"), Some(md.uid()), Some(md.gid()))?;
            }
            fsync_dir(&tmp)?;
            let dst = self.dir(snap.id);
            remove_all(&dst)?;
            fs::rename(&tmp, &dst)?;
            fsync_dir(&self.snapshots_dir())
        })();
        result.map_err(|e| {
            let _ = remove_all(&tmp);
            Error::io(format!("create snapshot directory for {}", snap.id), e)
        })
    }

    /// Commits active snapshot `key` as `name`.
    ///
    /// # Errors
    /// See [`MetaStore::commit`].
    pub fn commit(&self, name: &str, key: &str, labels: BTreeMap<String, String>) -> Result<()> {
        let (info, snap, _) = self.store.get(key)?;
        if info.kind != Kind::Active {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {key:?} is not active"
            )));
        }
        let usage = disk_usage(&self.upper_path(snap.id))?;
        self.store.commit(key, snap.id, name, labels, usage)
    }

    /// Removes a snapshot and its directory.
    ///
    /// # Errors
    /// See [`MetaStore::remove`].
    pub fn remove(&self, key: &str) -> Result<()> {
        let id = self.store.remove(key, |_| Ok(()))?;
        if let Some(remote) = &self.remote {
            remote.unmount(id);
            remote.forget_check(key);
        }
        // The metadata is gone, so the directory is garbage whatever happens
        // next; a failure here is left to cleanup, as containerd does.
        if let Err(e) = remove_all(&self.dir(id)) {
            warn!(key, id, error = %e, "failed to remove snapshot directory; cleanup will retry");
        }
        Ok(())
    }

    /// Infos matching `filter`.
    ///
    /// # Errors
    /// Store errors.
    pub fn list(&self, filter: &Filter) -> Result<Vec<Info>> {
        let mut all = self.store.list()?;
        all.retain(|info| filter.matches(|path| field(info, path)));
        Ok(all)
    }

    /// Removes every directory under `snapshots/` that no snapshot owns, and
    /// returns their paths. Runs under the store's write lock, so it cannot
    /// race a Prepare whose directory exists but whose metadata is not yet
    /// committed.
    ///
    /// # Errors
    /// Store errors, or failure to read `snapshots/`.
    pub fn cleanup(&self) -> Result<Vec<PathBuf>> {
        let dir = self.snapshots_dir();
        self.store.exclusive(|ids| {
            let entries =
                fs::read_dir(&dir).map_err(|e| Error::io(format!("read {}", dir.display()), e))?;
            let mut removed = Vec::new();
            for entry in entries {
                let entry = entry.map_err(|e| Error::io(format!("read {}", dir.display()), e))?;
                let owned = entry
                    .file_name()
                    .to_str()
                    .and_then(|n| n.parse::<u64>().ok())
                    .is_some_and(|id| ids.contains(&id));
                if owned {
                    continue;
                }
                // Never descend into a mount a dead process left behind.
                detach(&entry.path().join("fs"));
                match remove_all(&entry.path()) {
                    Ok(()) => removed.push(entry.path()),
                    Err(e) => warn!(path = %entry.path().display(), error = %e, "cleanup failed"),
                }
            }
            Ok(removed)
        })
    }

    fn mounts_for(&self, snap: &Snapshot) -> Vec<Mount> {
        let path = |p: PathBuf| p.to_string_lossy().into_owned();
        if snap.parent_ids.is_empty() {
            let ro = if snap.kind == Kind::View { "ro" } else { "rw" };
            return vec![bind(path(self.upper_path(snap.id)), ro)];
        }
        let mut options = Vec::new();
        if self.index_off {
            options.push("index=off".to_owned());
        }
        if snap.kind == Kind::Active {
            options.push(format!("workdir={}", path(self.work_path(snap.id))));
            options.push(format!("upperdir={}", path(self.upper_path(snap.id))));
        } else if let [only] = snap.parent_ids[..] {
            return vec![bind(path(self.upper_path(only)), "ro")];
        }
        let lowers: Vec<String> = snap
            .parent_ids
            .iter()
            .map(|&id| path(self.upper_path(id)))
            .collect();
        options.push(format!("lowerdir={}", lowers.join(":")));
        vec![Mount {
            r#type: "overlay".into(),
            source: "overlay".into(),
            target: String::new(),
            options,
        }]
    }
}

fn bind(source: String, ro: &str) -> Mount {
    Mount {
        r#type: "bind".into(),
        source,
        target: String::new(),
        options: vec![ro.into(), "rbind".into()],
    }
}

/// The filter adaptor for a snapshot, as containerd's: `kind`, `name`,
/// `parent` and `labels.KEY`.
fn field(info: &Info, path: &[String]) -> Option<String> {
    match path {
        [f] if f == "kind" => Some(info.kind.as_str().to_owned()),
        [f] if f == "name" => Some(info.name.clone()),
        [f] if f == "parent" => Some(info.parent.clone().unwrap_or_default()),
        [f, rest @ ..] if f == "labels" && !rest.is_empty() => {
            info.labels.get(&rest.join(".")).cloned()
        }
        _ => None,
    }
}

/// Lazily detaches whatever is mounted at `path`, if anything.
fn detach(path: &Path) {
    let _ = nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH);
}

/// Makes `dir`'s entries (creations, renames) durable.
fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn remove_all(path: &Path) -> io::Result<()> {
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}
