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
//! - `handover.rs`: [`resend`], for resuming a connection after a restart.
//! - `iomode.rs`: per-inode kernel passthrough or page cache, fixed per mount.
//! - `lib.rs` (this file): [`mount`], [`attach`], [`MountOptions`], [`Mounted`].
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
//! A panic in any other handler is caught by the vendored fuser's worker
//! loop (`fuse/vendor/fuser/PATCHES.md`): that request is answered `EIO`
//! and the worker goes on.
//!
//! # Passthrough
//! With [`MountOptions::passthrough`], an open of a file for which
//! [`ChunkSource::backing`] supplies a backing file is answered with
//! `FOPEN_PASSTHROUGH`: the kernel reads that file itself and `read` is
//! never called for it. An inode never has opens in both modes at once: it
//! changes from page cache to passthrough only when every open of it has
//! been released. Decisions are logged to [`MountOptions::iomode_log`],
//! which [`attach`] reads back (`iomode.rs` says why).
//!
//! # Restarts
//! Every worker thread reads the same open `/dev/fuse` file (no cloned fds).
//! [`Mounted::fuse_fd`] duplicates it so the snapshotter can keep it outside
//! the process; [`Mounted::hand_over`] leaves the mount in place when the
//! process exits; [`attach`] serves a kept fd again in a new process without
//! a FUSE handshake and asks the kernel to resend what the old process had
//! read but not answered (see `handover.rs`). Inode numbers come from
//! [`Tree::build`] (a breadth-first walk in name order) and file handles are
//! always 0, so the same TOC gives the same ids the kernel has cached.
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
mod handover;
mod iomode;
mod reply;
#[cfg(feature = "test-util")]
pub mod test_util;
mod tree;

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

pub use entry::{Entry, EntryKind, TreeError, NAME_MAX};
pub use fs::TTL;
pub use handover::resend;
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
    /// FUSE worker threads (at least 1), all reading the same `/dev/fuse` fd.
    pub threads: usize,
    /// Offer kernel passthrough for files whose [`ChunkSource::backing`]
    /// gives a backing file (Linux 6.9+, root). Needs `iomode_log`.
    pub passthrough: bool,
    /// Where each inode's I/O mode is logged, so a restarted daemon keeps
    /// the kernel's view (see `iomode.rs`). A fresh mount empties it;
    /// [`attach`] reads it back.
    pub iomode_log: Option<PathBuf>,
}

impl Default for MountOptions {
    fn default() -> MountOptions {
        MountOptions {
            fsname: "shoal".to_owned(),
            allow_other: true,
            threads: DEFAULT_THREADS,
            passthrough: false,
            iomode_log: None,
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
    check_fsname(&opts.fsname)?;
    let canonical = mountpoint.canonicalize()?;
    let mut config = session_config(&opts);
    config.mount_options = vec![
        fuser::MountOption::FSName(opts.fsname),
        fuser::MountOption::RO,
        fuser::MountOption::Dev,
        fuser::MountOption::Suid,
        fuser::MountOption::NoAtime,
        fuser::MountOption::DefaultPermissions,
    ];
    let stats = Arc::new(Stats::default());
    let modes = iomode::IoModes::fresh(opts.passthrough, opts.iomode_log.as_deref());
    let layer = fs::LayerFs::new(tree, source, stats.clone(), modes);
    let mut session = fuser::Session::new(layer, &canonical, &config)?;
    let unmounter = Unmounter::Session(session.unmount_callable());
    let fd = session.as_fd().try_clone_to_owned()?;
    spawn(session, fd, mountpoint, canonical, unmounter, stats)
}

/// Serves `tree` again on `fd`, a `/dev/fuse` connection that an earlier
/// process mounted at `mountpoint` (with [`mount`]) and initialised, then
/// asks the kernel to resend the requests that process had read but not
/// answered. `tree` must be built from the same entries, so inode numbers
/// match what the kernel has cached. Nothing is mounted; the mount point is
/// not touched (a `stat` would wait for this very server).
///
/// # Errors
/// Thread spawn. A kernel without `FUSE_NOTIFY_RESEND` is only logged: the
/// connection is served, but requests in flight at the crash stay unanswered.
pub fn attach(
    tree: Tree,
    source: Arc<dyn ChunkSource>,
    fd: OwnedFd,
    mountpoint: &Path,
    opts: MountOptions,
) -> io::Result<Mounted> {
    let config = session_config(&opts);
    let stats = Arc::new(Stats::default());
    let modes = iomode::IoModes::resumed(opts.iomode_log.as_deref());
    let layer = fs::LayerFs::new(tree, source, stats.clone(), modes);
    let keep = fd.try_clone()?;
    let session = fuser::Session::from_initialized_fd(layer, fd, config.acl, config);
    if let Err(e) = resend(keep.as_fd()) {
        tracing::warn!(mountpoint = %mountpoint.display(), cause = %e,
            "FUSE_NOTIFY_RESEND failed (Linux 6.9+ needed); requests in flight at the restart stay unanswered");
    }
    let path = mountpoint.to_path_buf();
    spawn(
        session,
        keep,
        mountpoint,
        path.clone(),
        Unmounter::Path(path),
        stats,
    )
}

fn check_fsname(fsname: &str) -> io::Result<()> {
    if fsname.is_empty()
        || fsname
            .chars()
            .any(|c| c == ',' || c == '\0' || c.is_whitespace())
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad fsname {fsname:?}"),
        ));
    }
    Ok(())
}

fn session_config(opts: &MountOptions) -> fuser::Config {
    let mut config = fuser::Config::default();
    config.acl = if opts.allow_other {
        fuser::SessionACL::All
    } else {
        fuser::SessionACL::Owner
    };
    config.n_threads = Some(opts.threads.max(1));
    // Never clone the fd: see the crate doc ("Restarts") and handover.rs.
    config.clone_fd = false;
    config
}

fn spawn(
    session: fuser::Session<fs::LayerFs>,
    fd: OwnedFd,
    mountpoint: &Path,
    canonical: PathBuf,
    unmounter: Unmounter,
    stats: Arc<Stats>,
) -> io::Result<Mounted> {
    let (done_tx, done) = mpsc::channel();
    // If spawning fails, the session is dropped with the closure (a mounted
    // one unmounts).
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
        fd,
    })
}

/// How a mount is removed: through fuser's mount handle (made by [`mount`]),
/// or by path (resumed by [`attach`], whose mount an earlier process made).
#[derive(Debug)]
enum Unmounter {
    Session(fuser::SessionUnmounter),
    Path(PathBuf),
}

impl Unmounter {
    fn unmount(&mut self) -> io::Result<()> {
        match self {
            Unmounter::Session(u) => u.unmount(),
            Unmounter::Path(p) => umount(p, 0),
        }
    }
}

/// A mounted layer. Dropping it unmounts (see [`Mounted::unmount`]).
#[derive(Debug)]
pub struct Mounted {
    mountpoint: PathBuf,
    canonical: PathBuf,
    unmounter: Option<Unmounter>,
    thread: Option<JoinHandle<io::Result<()>>>,
    /// Signalled (or disconnected) when the session thread ends.
    done: Receiver<()>,
    stats: Arc<Stats>,
    /// The connection's `/dev/fuse` file (shared with the workers).
    fd: OwnedFd,
}

impl Mounted {
    /// A duplicate of the mount's `/dev/fuse` fd, to keep outside the
    /// process (systemd's fd store, the fd holder) for [`attach`] after a
    /// restart. While any duplicate is open the connection survives this
    /// process; close them all and the kernel aborts it.
    ///
    /// # Errors
    /// `dup(2)`.
    pub fn fuse_fd(&self) -> io::Result<OwnedFd> {
        self.fd.try_clone()
    }

    /// Leaves the layer mounted for the next process (which resumes it with
    /// [`attach`]): nothing is unmounted, and the workers serve on until this
    /// process exits. Call it only when a duplicate of [`Mounted::fuse_fd`]
    /// is kept elsewhere, or the kernel aborts the connection at exit.
    pub fn hand_over(mut self) {
        self.unmounter = None;
        self.thread = None;
    }

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
                umount(&self.canonical, libc::MNT_DETACH)?;
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

fn umount(path: &Path, flags: libc::c_int) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
    if unsafe { libc::umount2(c.as_ptr(), flags) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
