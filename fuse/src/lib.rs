//! Shoal's FUSE layer filesystem.
//!
//! Serves ONE read-only container image layer per mount, from the layer's
//! table of contents, with the semantics of an unpacked tar layer as
//! overlayfs expects it from a `lowerdir`. File bytes come through
//! [`ChunkSource`], which the snapshotter implements. This crate never depends
//! on tokio, tonic or HTTP; the dependency direction is `snapshotter` → `fuse`.
//!
//! # Layout
//! - `entry.rs`: [`Entry`], [`EntryKind`], [`TreeError`], path normalisation.
//! - `builder.rs`: tar semantics (duplicates, implicit parents, hardlinks,
//!   OCI whiteouts → overlayfs whiteouts and opaque xattrs).
//! - `tree.rs`: the compact immutable inode table [`Tree`] and its [`Node`] view.
//! - `reply.rs`: the read contract, [`ChunkSource`] and [`ReadReply`], and [`Stats`].
//! - `fs.rs`: the `fuser::Filesystem` implementation.
//! - `lib.rs` (this file): [`mount`], [`MountOptions`], [`Mounted`].
//! - `test_util.rs` (feature `test-util`): in-memory `ChunkSource` doubles.
//!
//! # Mounting
//! `fuser` is built with default features off, so it uses its pure-Rust mount
//! path: no libfuse at build or run time. As root (the snapshotter's case) it
//! calls `mount(2)` directly on an open `/dev/fuse`; otherwise it falls back to
//! the setuid `fusermount3` helper. Mounts are `ro,dev,suid` with
//! `default_permissions` (the kernel enforces modes, as on an unpacked layer).
//!
//! # Read path and panics
//! FUSE worker threads never wait on the network: `read` hands its reply to
//! [`ChunkSource::read`] and returns. That call runs inside `catch_unwind`: a
//! panicking source answers the read with `EIO` (its dropped [`ReadReply`]
//! does so), is counted in [`Stats::source_panics`], and the mount lives on.
//!
//! # Unmounting
//! [`Mounted::unmount`] (or drop) removes the mount point; a busy mount is
//! detached lazily (`MNT_DETACH`). Either way the kernel keeps the FUSE
//! connection while anything still references the superblock: an overlayfs
//! holds a private clone of each lowerdir, and container mount namespaces hold
//! copies. So the workers are waited for only [`UNMOUNT_GRACE`]; if the layer
//! is still in use they go on serving it in the background and exit when the
//! kernel releases it. A layer is never yanked from under a running container.

mod builder;
mod entry;
mod fs;
mod reply;
#[cfg(feature = "test-util")]
pub mod test_util;
mod tree;

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

pub use entry::{Entry, EntryKind, TreeError, NAME_MAX};
pub use fs::TTL;
pub use reply::{ChunkSource, ReadReply, Stats, StatsSnapshot};
pub use tree::{Node, NodeKind, Tree};

/// Default number of FUSE worker threads. Workers never block on I/O, so a
/// few suffice.
pub const DEFAULT_THREADS: usize = 2;

/// How long unmounting waits for the workers to see the connection end.
pub const UNMOUNT_GRACE: Duration = Duration::from_secs(2);

/// How to mount a layer.
#[derive(Clone, Debug)]
pub struct MountOptions {
    /// Source shown in `/proc/mounts`, e.g. `shoal:sha256:abcd…`. Must not
    /// contain commas, whitespace or NUL.
    pub fsname: String,
    /// Let every user (not only the mounter) reach the mount. Modes are still
    /// enforced by the kernel (`default_permissions`).
    pub allow_other: bool,
    /// FUSE worker threads (at least 1); each gets its own `/dev/fuse` clone.
    pub threads: usize,
}

impl Default for MountOptions {
    fn default() -> MountOptions {
        MountOptions {
            fsname: "shoal".to_owned(),
            allow_other: true,
            threads: DEFAULT_THREADS,
        }
    }
}

/// Mounts `tree` at `mountpoint` (an existing directory) and serves it from
/// background threads until [`Mounted::unmount`] or drop.
///
/// # Errors
/// `InvalidInput` for a bad `fsname`; otherwise the error of opening
/// `/dev/fuse`, `mount(2)`/`fusermount3`, the FUSE handshake or thread spawn.
pub fn mount(
    tree: Tree,
    source: Arc<dyn ChunkSource>,
    mountpoint: &Path,
    opts: MountOptions,
) -> io::Result<Mounted> {
    if opts.fsname.is_empty()
        || opts
            .fsname
            .chars()
            .any(|c| c == ',' || c == '\0' || c.is_whitespace())
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad fsname {:?}", opts.fsname),
        ));
    }
    let canonical = mountpoint.canonicalize()?;
    let threads = opts.threads.max(1);
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName(opts.fsname),
        fuser::MountOption::RO,
        fuser::MountOption::Dev,
        fuser::MountOption::Suid,
        fuser::MountOption::NoAtime,
        fuser::MountOption::DefaultPermissions,
    ];
    config.acl = if opts.allow_other {
        fuser::SessionACL::All
    } else {
        fuser::SessionACL::Owner
    };
    config.n_threads = Some(threads);
    config.clone_fd = threads > 1;

    let stats = Arc::new(Stats::default());
    let layer = fs::LayerFs::new(tree, source, stats.clone());
    let mut session = fuser::Session::new(layer, &canonical, &config)?;
    let unmounter = session.unmount_callable();
    let (done_tx, done) = mpsc::channel();
    // If spawning fails, the session is dropped with the closure and unmounts.
    let thread = std::thread::Builder::new()
        .name("shoal-fuse".to_owned())
        .spawn(move || {
            let res = session.run();
            let _ = done_tx.send(());
            res
        })?;
    Ok(Mounted {
        mountpoint: mountpoint.to_path_buf(),
        canonical,
        unmounter: Some(unmounter),
        thread: Some(thread),
        done,
        stats,
    })
}

/// A mounted layer. Dropping it unmounts (see [`Mounted::unmount`]).
#[derive(Debug)]
pub struct Mounted {
    mountpoint: PathBuf,
    canonical: PathBuf,
    unmounter: Option<fuser::SessionUnmounter>,
    thread: Option<JoinHandle<io::Result<()>>>,
    /// Signalled (or disconnected) when the session thread ends.
    done: Receiver<()>,
    stats: Arc<Stats>,
}

impl Mounted {
    /// The mount point as given to [`mount`].
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// The mount's counters so far.
    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    /// Removes the mount point (lazily if busy) and waits up to
    /// [`UNMOUNT_GRACE`] for the workers; see the crate doc.
    ///
    /// # Errors
    /// The `umount(2)` error, other than `EBUSY`.
    pub fn unmount(mut self) -> io::Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> io::Result<()> {
        let Some(mut unmounter) = self.unmounter.take() else {
            return Ok(());
        };
        match unmounter.unmount() {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                tracing::info!(mountpoint = %self.canonical.display(), "layer mount busy; detaching lazily");
                lazy_unmount(&self.canonical)?;
            }
            Err(e) => return Err(e),
        }
        match self.done.recv_timeout(UNMOUNT_GRACE) {
            Ok(()) | Err(RecvTimeoutError::Disconnected) => {
                if let Some(thread) = self.thread.take() {
                    match thread.join() {
                        Ok(Err(e)) => tracing::warn!(cause = %e, "FUSE session ended with error"),
                        Err(_) => tracing::warn!("FUSE session thread panicked"),
                        Ok(Ok(())) => {}
                    }
                }
            }
            Err(RecvTimeoutError::Timeout) => {
                tracing::info!(
                    mountpoint = %self.canonical.display(),
                    "layer still referenced (e.g. by an overlay); serving it until released"
                );
                self.thread.take();
            }
        }
        Ok(())
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::warn!(cause = %e, mountpoint = %self.canonical.display(), "unmount failed");
        }
    }
}

fn lazy_unmount(path: &Path) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
