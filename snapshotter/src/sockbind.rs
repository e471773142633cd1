//! Unix sockets that are never reachable with a mode the umask chose, and
//! the peer check of the fd holder's socket. Shared as source by the daemon
//! (`server.rs`, `handover`) and `shoal-fdholder`, which links only std,
//! libc and nix.
//!
//! [`bind_private`] binds in a fresh directory of mode 0700 beside the final
//! path, sets the socket's mode there, then moves it into place with
//! `renameat2(RENAME_NOREPLACE)`: from the moment the path exists the socket
//! has its final mode, whatever the process umask, and no other thread's
//! file creation is touched (a umask change would be process-wide). The
//! socket is listening before it is moved, so a probe of the path never
//! mistakes a just-bound socket for a stale one.

use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{renameat2, RenameFlags, AT_FDCWD};

/// Binds a socket with `bind` in a private directory beside `path`, gives it
/// `mode`, and moves it to `path`, which must not exist.
///
/// # Errors
/// `AlreadyExists` if `path` exists (nothing is replaced); the errors of
/// `bind`, of the directory's creation, or of the move.
pub fn bind_private<T>(
    path: &Path,
    mode: u32,
    bind: impl FnOnce(&Path) -> io::Result<T>,
) -> io::Result<T> {
    let dir = private_dir(path)?;
    let result = (|| {
        let tmp = dir.join("s");
        let sock = bind(&tmp)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
        renameat2(
            AT_FDCWD,
            &tmp,
            AT_FDCWD,
            path,
            RenameFlags::RENAME_NOREPLACE,
        )?;
        Ok(sock)
    })();
    let _ = std::fs::remove_file(dir.join("s"));
    let _ = std::fs::remove_dir(&dir);
    result
}

/// A new directory of mode 0700 next to `path` (same file system, so the
/// rename is atomic), named after `path` and this process.
fn private_dir(path: &Path) -> io::Result<PathBuf> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::other(format!("{}: no file name", path.display())))?;
    let parent = path.parent().unwrap_or(Path::new("."));
    for n in 0u32..100 {
        let mut dname = std::ffi::OsString::from(".");
        dname.push(name);
        dname.push(format!(".bind-{}-{n}", std::process::id()));
        let dir = parent.join(dname);
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                // Left by a process that died mid-bind with this pid: stale.
                let _ = std::fs::remove_file(dir.join("s"));
                let _ = std::fs::remove_dir(&dir);
            }
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::other(format!(
        "cannot create a private directory beside {}",
        path.display()
    )))
}

/// Whether the process at the other end of the Unix socket `conn` runs as
/// root or as this process's user (`SO_PEERCRED`, taken at `connect`).
///
/// # Errors
/// `getsockopt(2)`.
pub fn peer_is_trusted(conn: &impl AsFd) -> io::Result<bool> {
    let cred = nix::sys::socket::getsockopt(conn, nix::sys::socket::sockopt::PeerCredentials)?;
    Ok(trusted_uid(cred.uid()))
}

/// Root, or this process's effective user.
pub fn trusted_uid(uid: libc::uid_t) -> bool {
    // SAFETY: geteuid has no preconditions.
    uid == 0 || uid == unsafe { libc::geteuid() }
}
