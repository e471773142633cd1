//! Remote layers after a restart: served again before the socket is bound
//! from what is on this node alone, and in the background afterwards when
//! their TOC must come from the network.
//!
//! Invariants:
//! - Nothing here touches the network before the daemon serves: a layer
//!   whose kept TOC is missing or fails verification waits
//!   ([`Waiting`]) for [`Snapshotter::remount_waiting`], which the daemon
//!   starts once its socket is bound. The unit thus starts (and does not
//!   crash-loop) while the registry is down.
//! - A kept FUSE connection is resumed or dropped, never left kept without a
//!   server: dropped (closed here and removed from the fd store), the
//!   kernel aborts it, and its readers get `ENOTCONN` instead of hanging.
//! - A waiting layer's `fs` directory is removed (and nothing is mounted
//!   there), so a container that uses it before it is back fails to mount
//!   (`ENOENT`) rather than seeing an empty layer.
//! - A layer is mounted in the background under the store's write lock, and
//!   only if its snapshot still exists, so it cannot race a Remove.

use std::os::unix::fs::DirBuilderExt;
use std::path::Path;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tracing::{error, info, warn};

use super::{detach, Snapshotter};
use crate::error::Result;
use crate::metadata::RemoteRef;

/// First wait before fetching the waiting layers' TOCs again.
const RETRY_FIRST: Duration = Duration::from_secs(1);
/// Longest wait between rounds.
const RETRY_MAX: Duration = Duration::from_secs(60);

/// A remote layer left unmounted at start until its TOC is fetched.
#[derive(Debug, Clone)]
pub(crate) struct Waiting {
    name: String,
    id: u64,
    rref: RemoteRef,
}

impl Snapshotter {
    /// Serves every remote snapshot again after a restart, without the
    /// network: resumes the FUSE connection an earlier process kept in the
    /// fd store if its mount is still there, else detaches whatever is left
    /// on the mount point and mounts it afresh, from the kept TOC. Layers
    /// without a kept TOC that verifies wait for
    /// [`Snapshotter::remount_waiting`].
    pub(super) fn remount_remotes(&self) -> Result<()> {
        let remotes = self.store.remotes()?;
        let Some(remote) = &self.remote else {
            if !remotes.is_empty() {
                warn!(
                    count = remotes.len(),
                    "remote layers recorded but remote support is off; they will read empty"
                );
            }
            return Ok(());
        };
        // mountinfo names canonical paths; the snapshots directory is local
        // disk, so canonicalizing it never waits on a FUSE server.
        let snapshots = self
            .snapshots_dir()
            .canonicalize()
            .unwrap_or_else(|_| self.snapshots_dir());
        let mut waiting = Vec::new();
        for (name, id, rref) in remotes {
            let mp = self.upper_path(id);
            // Layers mounted by a version without identity checks.
            if let Ok((info, _, _)) = self.store.get(&name) {
                remote.claim(&name, info.parent.as_deref());
            }
            let resolved = match remote.resolve_local(&rref) {
                Ok(r) => r,
                Err(e) => {
                    error!(snapshot = %name, id, error = %e,
                        "cannot mount remote layer again; containers using it will fail to read");
                    None
                }
            };
            if let Some(fd) = remote.take_kept(id) {
                let canonical = snapshots.join(id.to_string()).join("fs");
                match &resolved {
                    Some(r) if crate::handover::shoal_fuse_mounted_at(&canonical) => {
                        match remote.resume(id, &name, &rref, r, &canonical, fd) {
                            Ok(()) => {
                                remote.start_background(id);
                                continue;
                            }
                            // The kept copy is gone too: readers get errors.
                            Err(e) => warn!(snapshot = %name, id, error = %e,
                                "cannot resume the kept FUSE connection; its readers get errors; mounting again"),
                        }
                    }
                    _ => remote.discard_kept(id, fd),
                }
            }
            detach(&mp);
            match resolved {
                Some(resolved) => match remote.mount(id, &name, &rref, &resolved, &mp) {
                    Ok(()) => remote.start_background(id),
                    Err(e) => {
                        error!(snapshot = %name, id, layer = %rref.layer_digest, error = %e,
                            "cannot mount remote layer again; containers using it will fail to read")
                    }
                },
                None if parse_ok(&rref) => {
                    hide(&mp);
                    info!(snapshot = %name, id, layer = %rref.layer_digest,
                        "no kept TOC for a remote layer; mounting it once the daemon serves");
                    waiting.push(Waiting { name, id, rref });
                }
                None => {}
            }
        }
        remote.discard_unclaimed();
        if let Ok(mut w) = self.waiting.lock() {
            *w = waiting;
        }
        Ok(())
    }

    /// Remote layers waiting for their TOC (see the module doc).
    pub fn waiting_remounts(&self) -> usize {
        self.waiting.lock().map(|w| w.len()).unwrap_or(0)
    }

    /// Fetches the TOCs of the layers that could not be mounted at start
    /// and mounts them, in a thread of its own, retrying with backoff
    /// (1 s doubling to 60 s) until each is mounted or its snapshot is
    /// removed. Call once the socket is bound. Returns the thread, if any.
    pub fn remount_waiting(self: &Arc<Self>) -> Option<std::thread::JoinHandle<()>> {
        let waiting = self
            .waiting
            .lock()
            .map(|mut w| std::mem::take(&mut *w))
            .unwrap_or_default();
        if waiting.is_empty() {
            return None;
        }
        let sn = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("shoal-remount".into())
            .spawn(move || remount_loop(&sn, waiting))
            .map_err(|e| error!(error = %e, "cannot start the remount thread"))
            .ok()
    }

    /// One try at a waiting layer: `true` once it needs no more tries.
    fn remount_one(&self, w: &Waiting) -> bool {
        let Some(remote) = &self.remote else {
            return true;
        };
        let resolved = match remote.resolve(&w.rref) {
            Ok(r) => r,
            Err(e) => {
                warn!(snapshot = %w.name, id = w.id, layer = %w.rref.layer_digest, error = %e,
                    "cannot fetch a remote layer's TOC yet; will retry");
                return false;
            }
        };
        let mp = self.upper_path(w.id);
        let done = self.store.exclusive(|ids| {
            if !ids.contains(&w.id) {
                return Ok(true);
            }
            std::fs::DirBuilder::new()
                .mode(0o755)
                .create(&mp)
                .or_else(|e| match e.kind() {
                    std::io::ErrorKind::AlreadyExists => Ok(()),
                    _ => Err(e),
                })
                .map_err(|e| crate::error::Error::io(format!("create {}", mp.display()), e))?;
            remote
                .mount(w.id, &w.name, &w.rref, &resolved, &mp)
                .map_err(crate::error::Error::Remote)?;
            Ok(true)
        });
        match done {
            Ok(true) if self.remote.as_ref().is_some_and(|r| r.is_mounted(w.id)) => {
                remote.start_background(w.id);
                info!(snapshot = %w.name, id = w.id, layer = %w.rref.layer_digest,
                    "remote layer mounted again");
                true
            }
            Ok(_) => true,
            Err(e) => {
                warn!(snapshot = %w.name, id = w.id, error = %e,
                    "cannot mount a remote layer again yet; will retry");
                false
            }
        }
    }
}

fn remount_loop(sn: &Weak<Snapshotter>, mut waiting: Vec<Waiting>) {
    let mut delay = Duration::ZERO;
    while !waiting.is_empty() {
        std::thread::sleep(delay);
        delay = (delay * 2).clamp(RETRY_FIRST, RETRY_MAX);
        // Not kept between rounds: the daemon may be shutting down.
        let Some(sn) = sn.upgrade() else { return };
        waiting.retain(|w| !sn.remount_one(w));
    }
}

/// The TOC digest names local files only if it is a digest; otherwise the
/// layer can never be mounted (already logged).
fn parse_ok(r: &RemoteRef) -> bool {
    crate::remote::toc::parse_digest(&r.toc_digest).is_some()
}

/// Removes the (empty, unmounted) mount point, so nothing can use the
/// layer before it is back.
fn hide(mp: &Path) {
    match std::fs::remove_dir(mp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => warn!(path = %mp.display(), error = %e,
            "cannot remove the mount point of a layer waiting for its TOC"),
    }
}
