//! Remote layers across a daemon restart: each mount's `/dev/fuse` fd is
//! kept in the fd store ([`crate::handover`]) while it is mounted, taken back
//! at start and served again, and left mounted when the daemon stops.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use tracing::{info, warn};

use super::{RemoteLayers, Resolved};
use crate::handover::{fd_name, FdStore};
use crate::metadata::RemoteRef;

impl RemoteLayers {
    /// Keeps mount fds in `store` from now on; `kept` are the fds it gave
    /// back at start, by name, for [`RemoteLayers::take_kept`].
    #[must_use]
    pub fn with_fd_store(mut self, store: FdStore, kept: HashMap<String, OwnedFd>) -> Self {
        self.fd_store = Some(store);
        self.kept = parking_lot::Mutex::new(kept);
        self
    }

    /// Whether mounts survive a restart of this daemon.
    pub fn has_fd_store(&self) -> bool {
        self.fd_store.is_some()
    }

    pub(super) fn keep_fd(&self, id: u64, mount: &shoal_fuse::Mounted) {
        let Some(store) = &self.fd_store else { return };
        if let Err(e) = mount
            .fuse_fd()
            .and_then(|fd| store.store(&fd_name(id), fd.as_fd()))
        {
            warn!(id, error = %e, "cannot keep the layer's FUSE fd; a restart will remount it, breaking its readers");
        }
    }

    pub(super) fn forget_fd(&self, id: u64) {
        let Some(store) = &self.fd_store else { return };
        if let Err(e) = store.remove(&fd_name(id)) {
            warn!(id, error = %e, "cannot drop the layer's kept FUSE fd");
        }
    }

    /// The fd an earlier process kept for snapshot `id`, if any.
    pub fn take_kept(&self, id: u64) -> Option<OwnedFd> {
        self.kept.lock().remove(&fd_name(id))
    }

    /// Drops a kept fd that will not be resumed (its mount is gone), from
    /// the store too, so the kernel can end that connection.
    pub fn discard_kept(&self, id: u64, fd: OwnedFd) {
        drop(fd);
        self.forget_fd(id);
    }

    /// Drops every kept fd that no snapshot claimed (a Remove or a failed
    /// Prepare that the previous process did not finish).
    pub fn discard_unclaimed(&self) {
        let rest: Vec<String> = self.kept.lock().drain().map(|(n, _)| n).collect();
        let Some(store) = &self.fd_store else { return };
        for name in rest {
            info!(name, "dropping a kept FUSE fd that no snapshot owns");
            if let Err(e) = store.remove(&name) {
                warn!(name, error = %e, "cannot drop a kept FUSE fd");
            }
        }
    }

    /// Serves snapshot `id`'s layer again on `fd`, kept by an earlier
    /// process that mounted it at `mountpoint`. On failure the fd is closed
    /// and dropped from the store too: with no copy left, the kernel aborts
    /// the connection, and its readers get `ENOTCONN` instead of waiting
    /// for a server that never comes.
    ///
    /// # Errors
    /// As [`RemoteLayers::mount`].
    pub fn resume(
        &self,
        id: u64,
        name: &str,
        r: &RemoteRef,
        resolved: &Resolved,
        mountpoint: &Path,
        fd: OwnedFd,
    ) -> Result<(), String> {
        let result = self.serve(id, name, r, resolved, mountpoint, Some(fd));
        if result.is_err() {
            self.forget_fd(id);
        }
        result
    }

    /// Leaves every layer mounted for the next daemon, which resumes them
    /// from the fd store. Returns false (and does nothing) without a store:
    /// the mounts are then unmounted as usual when `self` drops.
    pub fn hand_over(&self) -> bool {
        if self.fd_store.is_none() {
            return false;
        }
        let layers: Vec<_> = self.mounted.lock().drain().collect();
        let n = layers.len();
        for (_, m) in layers {
            m.mount.hand_over();
        }
        info!(count = n, "lazy layers left mounted for the next daemon");
        true
    }
}
