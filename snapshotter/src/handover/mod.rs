//! Keeping each lazy layer's `/dev/fuse` fd outside the daemon, so that a
//! restart (crash, `systemctl restart`, upgrade) resumes the mounts instead of
//! breaking them.
//!
//! Two keepers, chosen at start:
//! - **systemd's fd store**, when the daemon runs under systemd
//!   (`NOTIFY_SOCKET` is set; the unit sets `FileDescriptorStoreMax=`):
//!   `FDSTORE=1` + `FDNAME=shoal-ID` keeps a fd, `FDSTOREREMOVE=1` drops it,
//!   and systemd passes the kept fds back at start (`LISTEN_FDS`,
//!   `LISTEN_FDNAMES`).
//! - **`shoal-fdholder`** otherwise: a tiny process that keeps fds sent over
//!   `ROOT/fdholder.sock` and does nothing else (see `wire.rs`). The socket
//!   has mode 0600 from the start, and each side checks the other's user
//!   (`SO_PEERCRED`: root or the daemon's own). The daemon
//!   starts it detached (`setsid`), from its own directory, when it first
//!   stores a fd; it exits once it keeps none, so a daemon without lazy
//!   layers never leaves one behind.
//!
//! Invariant: a name is stored at most once. Storing first removes any fd
//! kept under the same name (systemd would otherwise keep both).

pub mod wire;

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
use tracing::{info, warn};

/// The holder's socket, under the root.
pub const HOLDER_SOCKET: &str = "fdholder.sock";
/// The holder's pid file, under the root.
pub const HOLDER_PID: &str = "fdholder.pid";
/// The holder binary, looked for next to the daemon's executable.
pub const HOLDER_BIN: &str = "shoal-fdholder";
/// How long start-up waits for a newly started holder's socket.
const HOLDER_START: Duration = Duration::from_secs(5);

/// The name a snapshot's fd is kept under.
pub fn fd_name(id: u64) -> String {
    format!("shoal-{id}")
}

/// Where the fds are kept.
#[derive(Debug)]
pub enum FdStore {
    /// systemd's fd store.
    Systemd,
    /// `shoal-fdholder`, serving `ROOT/fdholder.sock`.
    Holder {
        /// The daemon's root.
        root: PathBuf,
    },
}

impl FdStore {
    /// Picks the keeper (see the module doc) and takes back every fd it
    /// kept, by name. A holder that does not run keeps nothing.
    ///
    /// # Errors
    /// The keeper answered wrongly.
    pub fn open(root: &Path) -> io::Result<(FdStore, HashMap<String, OwnedFd>)> {
        if std::env::var_os("NOTIFY_SOCKET").is_some() {
            let kept = systemd_take()?;
            info!(count = kept.len(), "fd store: systemd");
            return Ok((FdStore::Systemd, kept));
        }
        let store = FdStore::Holder {
            root: root.to_owned(),
        };
        let kept = store.holder_list()?;
        info!(count = kept.len(), "fd store: shoal-fdholder");
        Ok((store, kept))
    }

    /// Keeps a duplicate of `fd` under `name`, replacing any fd of that name.
    ///
    /// # Errors
    /// The keeper refused or is unreachable.
    pub fn store(&self, name: &str, fd: BorrowedFd<'_>) -> io::Result<()> {
        match self {
            FdStore::Systemd => {
                self.remove(name)?;
                systemd_store(name, fd)
            }
            FdStore::Holder { root } => {
                let sock = root.join(HOLDER_SOCKET);
                if holder_connect(&sock).is_err() {
                    start_holder(root, &sock)?;
                }
                holder_call(&sock, &format!("STORE {name}"), Some(fd))
            }
        }
    }

    /// Drops the fd kept under `name`, if any.
    ///
    /// # Errors
    /// The keeper is unreachable.
    pub fn remove(&self, name: &str) -> io::Result<()> {
        match self {
            FdStore::Systemd => sd_notify::notify(&[
                sd_notify::NotifyState::Custom("FDSTOREREMOVE=1"),
                sd_notify::NotifyState::Custom(&format!("FDNAME={name}")),
            ]),
            FdStore::Holder { root } => {
                match holder_call(&root.join(HOLDER_SOCKET), &format!("REMOVE {name}"), None) {
                    // No holder: it keeps nothing.
                    Err(e)
                        if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ECONNREFUSED)) =>
                    {
                        Ok(())
                    }
                    other => other,
                }
            }
        }
    }

    fn holder_list(&self) -> io::Result<HashMap<String, OwnedFd>> {
        let FdStore::Holder { root } = self else {
            return Ok(HashMap::new());
        };
        let conn = match holder_connect(&root.join(HOLDER_SOCKET)) {
            Ok(c) => c,
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ECONNREFUSED)) => {
                return Ok(HashMap::new())
            }
            Err(e) => return Err(e),
        };
        wire::send(conn.as_fd(), "LIST", None)?;
        let mut kept = HashMap::new();
        loop {
            match wire::recv(conn.as_fd())? {
                Some((t, _)) if t == "END" => return Ok(kept),
                Some((t, Some(fd))) if t.starts_with("FD ") => {
                    kept.insert(t[3..].to_owned(), fd);
                }
                Some((t, _)) => {
                    return Err(io::Error::other(format!("fd holder: unexpected {t:?}")))
                }
                None => return Err(io::Error::other("fd holder closed the connection")),
            }
        }
    }
}

/// `FDSTORE=1` + `FDNAME=` with `fd` attached, on `NOTIFY_SOCKET` (a path,
/// or an abstract address written `@NAME`). The sd-notify crate can do this
/// only with an extra dependency (`sendfd`), so it is done here.
fn systemd_store(name: &str, fd: BorrowedFd<'_>) -> io::Result<()> {
    let path = std::env::var_os("NOTIFY_SOCKET")
        .ok_or_else(|| io::Error::other("NOTIFY_SOCKET is not set"))?;
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
    let addr = match bytes.strip_prefix(b"@") {
        Some(abs) => UnixAddr::new_abstract(abs)?,
        None => UnixAddr::new(Path::new(&path))?,
    };
    let sock = socket(
        AddressFamily::Unix,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let msg = format!("FDSTORE=1\nFDNAME={name}\n");
    let raw = [std::os::fd::AsRawFd::as_raw_fd(&fd)];
    nix::sys::socket::sendmsg(
        std::os::fd::AsRawFd::as_raw_fd(&sock),
        &[std::io::IoSlice::new(msg.as_bytes())],
        &[nix::sys::socket::ControlMessage::ScmRights(&raw)],
        nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
        Some(&addr),
    )?;
    Ok(())
}

/// The fds systemd passed back (`LISTEN_FDS`, named by `LISTEN_FDNAMES`).
fn systemd_take() -> io::Result<HashMap<String, OwnedFd>> {
    let mut kept = HashMap::new();
    for (raw, name) in sd_notify::listen_fds_with_names()? {
        // SAFETY: systemd passed these fds to this process (LISTEN_PID was
        // checked) and nothing else in the daemon takes them.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        if let Some(old) = kept.insert(name.clone(), fd) {
            // Two fds under one name (a crash between remove and store):
            // the later one is the newer mount.
            drop(old);
            warn!(name, "two kept fds of one name; using the later");
        }
    }
    Ok(kept)
}

fn holder_connect(sock: &Path) -> io::Result<OwnedFd> {
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &UnixAddr::new(sock)?)?;
    // FUSE fds go only to a holder run by root or by this daemon's user.
    if !crate::sockbind::peer_is_trusted(&fd)? {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("{} is served by another user", sock.display()),
        ));
    }
    // Never hang start-up or a Remove on a stuck holder.
    let s = UnixStream::from(fd);
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    Ok(OwnedFd::from(s))
}

fn holder_call(sock: &Path, req: &str, fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
    let conn = holder_connect(sock)?;
    wire::send(conn.as_fd(), req, fd)?;
    match wire::recv(conn.as_fd())? {
        Some((t, _)) if t == "OK" => Ok(()),
        Some((t, _)) => Err(io::Error::other(format!("fd holder: {t}"))),
        None => Err(io::Error::other("fd holder closed the connection")),
    }
}

/// Starts `shoal-fdholder` from the daemon's directory, detached in its own
/// session so it outlives the daemon, and waits for its socket.
fn start_holder(root: &Path, sock: &Path) -> io::Result<()> {
    let exe = std::env::current_exe()?;
    let bin = exe
        .parent()
        .map(|d| d.join(HOLDER_BIN))
        .ok_or_else(|| io::Error::other("no directory for the daemon's executable"))?;
    let mut cmd = Command::new(&bin);
    cmd.arg(sock)
        .arg(root.join(HOLDER_PID))
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: setsid is async-signal-safe; it only detaches the child from
    // the daemon's session and process group.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| io::Error::new(e.kind(), format!("start {}: {e}", bin.display())))?;
    let started = Instant::now();
    loop {
        if holder_connect(sock).is_ok() {
            info!(pid = child.id(), "started shoal-fdholder");
            // The holder lives on: it is reaped by init once the daemon exits.
            std::thread::spawn(move || child.wait());
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            return Err(io::Error::other(format!(
                "{} exited: {status}",
                bin.display()
            )));
        }
        if started.elapsed() > HOLDER_START {
            return Err(io::Error::other(format!(
                "{} did not open {}",
                bin.display(),
                sock.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether the topmost mount at `path` (absolute, canonical) is a Shoal FUSE
/// layer. Reads `/proc/self/mountinfo` and never touches `path` itself: a
/// `stat` there would wait for the FUSE server that is about to resume it.
pub fn shoal_fuse_mounted_at(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = path.as_os_str().as_encoded_bytes();
    let mut found = false;
    for line in info.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(sep) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        let (Some(mp), Some(fstype), Some(source)) =
            (fields.get(4), fields.get(sep + 1), fields.get(sep + 2))
        else {
            continue;
        };
        if unescape(mp) == want {
            // Later lines are mounted on top of earlier ones.
            found = fstype.starts_with("fuse") && source.starts_with("shoal:");
        }
    }
    found
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = b[i + 1..i + 4]
                .iter()
                .fold(0u16, |v, c| v * 8 + u16::from(c - b'0'));
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes_mountinfo_paths() {
        assert_eq!(unescape("/a\\040b/fs"), b"/a b/fs");
        assert_eq!(unescape("/plain"), b"/plain");
        assert_eq!(unescape("/end\\04"), b"/end\\04");
    }

    #[test]
    fn names_are_checked() {
        assert!(wire::valid_name(&fd_name(17)));
        assert!(!wire::valid_name("a b"));
        assert!(!wire::valid_name(""));
        assert!(!wire::valid_name(&"x".repeat(256)));
    }
}
