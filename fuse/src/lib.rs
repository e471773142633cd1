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
//! [`Mounted::unmount`] (or drop) unmounts and joins the worker threads. If the
//! mount is busy (e.g. an overlayfs still uses it as a lowerdir) it is detached
//! lazily instead (`MNT_DETACH`): it disappears from the namespace at once and
//! its workers keep serving existing users until the kernel releases it.

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
use std::sync::Arc;
use std::thread::JoinHandle;

pub use entry::{Entry, EntryKind, TreeError, NAME_MAX};
pub use fs::TTL;
pub use reply::{ChunkSource, ReadReply, Stats, StatsSnapshot};
pub use tree::{Node, NodeKind, Tree};

/// Default number of FUSE worker threads. Workers never block on I/O, so a
/// few suffice.
pub const DEFAULT_THREADS: usize = 2;

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
    // If spawning fails, the session is dropped with the closure and unmounts.
    let thread = std::thread::Builder::new()
        .name("shoal-fuse".to_owned())
        .spawn(move || session.run())?;
    Ok(Mounted {
        mountpoint: mountpoint.to_path_buf(),
        canonical,
        unmounter: Some(unmounter),
        thread: Some(thread),
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

    /// Unmounts and waits for the worker threads. A busy mount is detached
    /// lazily instead, without waiting (see the crate doc).
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
            Ok(()) => {
                if let Some(thread) = self.thread.take() {
                    match thread.join() {
                        Ok(Err(e)) => tracing::warn!(cause = %e, "FUSE session ended with error"),
                        Err(_) => tracing::warn!("FUSE session thread panicked"),
                        Ok(Ok(())) => {}
                    }
                }
                Ok(())
            }
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                tracing::warn!(
                    mountpoint = %self.canonical.display(),
                    "layer mount busy; detaching lazily"
                );
                // The workers exit once the kernel drops the connection.
                self.thread.take();
                lazy_unmount(&self.canonical)
            }
            Err(e) => Err(e),
        }
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
