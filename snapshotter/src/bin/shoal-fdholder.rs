//! `shoal-fdholder SOCKET PIDFILE`: keeps the `/dev/fuse` fds of Shoal's lazy
//! layers while `shoal-snapshotter` restarts, when systemd's fd store is not
//! available. `shoal-snapshotter` starts it on first need; it does nothing
//! but keep fds, so it has nothing that can crash.
//!
//! It serves `SOCKET` (a `SOCK_SEQPACKET` Unix socket, mode 0600 from the
//! moment it exists) one connection at a time, to root or its own user only
//! (`SO_PEERCRED`; anyone else is answered `ERR permission denied`), with
//! the requests of `shoal::handover::wire` (compiled in from the same file),
//! and writes its pid to `PIDFILE`. Once a REMOVE leaves it keeping nothing, it
//! removes the socket and pid file, answers, and exits (the daemon starts a
//! new one when it next stores a fd). It ignores SIGHUP, SIGINT and SIGPIPE;
//! SIGTERM or SIGKILL end it and close every kept fd: the kernel then aborts
//! the FUSE connections whose mounts no daemon serves.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use nix::sys::socket::{
    accept, bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr,
};
// The wire format is shared with the daemon as source, not through the
// `shoal` library: the holder links only std, libc and nix.
#[path = "../sockbind.rs"]
mod sockbind;
#[path = "../handover/wire.rs"]
mod wire;

fn main() -> ExitCode {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let [sock, pidfile] = args.as_slice() else {
        eprintln!("usage: shoal-fdholder SOCKET PIDFILE");
        return ExitCode::from(2);
    };
    // SAFETY: installing SIG_IGN for these signals has no preconditions.
    unsafe {
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    match run(sock, pidfile) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shoal-fdholder: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(sock: &PathBuf, pidfile: &PathBuf) -> io::Result<()> {
    let Some(listener) = claim(sock)? else {
        // A live holder serves the socket.
        return Ok(());
    };
    std::fs::write(pidfile, format!("{}\n", std::process::id()))?;
    let mut kept: HashMap<String, OwnedFd> = HashMap::new();
    loop {
        let conn = match accept(listener.as_raw_fd()) {
            // SAFETY: accept returned a new fd that nothing else owns.
            Ok(fd) => unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) },
            Err(nix::errno::Errno::EINTR | nix::errno::Errno::ECONNABORTED) => continue,
            Err(e) => return Err(e.into()),
        };
        let conn = UnixStream::from(conn);
        // Whoever talks to the holder gets every kept FUSE fd: only root or
        // the daemon's own user (the holder's) may.
        if !sockbind::peer_is_trusted(&conn).unwrap_or(false) {
            let _ = wire::send(conn.as_fd(), "ERR permission denied", None);
            continue;
        }
        // A client that stops talking must not block the others for long.
        let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = conn.set_write_timeout(Some(Duration::from_secs(5)));
        if serve(conn.as_fd(), &mut kept, sock, pidfile) == Done::Exit {
            return Ok(());
        }
    }
}

/// Binds and listens on `sock` (mode 0600 from the start, see
/// `sockbind`). `None`: a live holder already serves it; a stale socket
/// file is replaced.
fn claim(sock: &Path) -> io::Result<Option<OwnedFd>> {
    let listen_at = |p: &Path| -> io::Result<OwnedFd> {
        let l = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        bind(l.as_raw_fd(), &UnixAddr::new(p)?)?;
        listen(&l, Backlog::new(16)?)?;
        Ok(l)
    };
    match sockbind::bind_private(sock, 0o600, listen_at) {
        Ok(l) => return Ok(Some(l)),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let probe = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    if nix::sys::socket::connect(probe.as_raw_fd(), &UnixAddr::new(sock)?).is_ok() {
        return Ok(None);
    }
    std::fs::remove_file(sock)?;
    sockbind::bind_private(sock, 0o600, listen_at).map(Some)
}

#[derive(PartialEq)]
enum Done {
    Connection,
    Exit,
}

/// Answers the requests of one connection until it ends or misbehaves.
fn serve(
    conn: std::os::fd::BorrowedFd<'_>,
    kept: &mut HashMap<String, OwnedFd>,
    sock: &PathBuf,
    pidfile: &PathBuf,
) -> Done {
    while let Ok(Some((text, fd))) = wire::recv(conn) {
        let (verb, name) = text.split_once(' ').unwrap_or((text.as_str(), ""));
        let answer = match (verb, fd) {
            ("STORE", Some(fd)) if wire::valid_name(name) => {
                kept.insert(name.to_owned(), fd);
                "OK".to_owned()
            }
            ("REMOVE", None) if wire::valid_name(name) => {
                kept.remove(name);
                if kept.is_empty() {
                    // Gone before the answer, so the daemon's next STORE
                    // finds no socket and starts a new holder.
                    let _ = std::fs::remove_file(sock);
                    let _ = std::fs::remove_file(pidfile);
                    let _ = wire::send(conn, "OK", None);
                    return Done::Exit;
                }
                "OK".to_owned()
            }
            ("LIST", None) if name.is_empty() => {
                for (n, fd) in kept.iter() {
                    if wire::send(conn, &format!("FD {n}"), Some(fd.as_fd())).is_err() {
                        return Done::Connection;
                    }
                }
                "END".to_owned()
            }
            _ => format!(
                "ERR bad request {:?}",
                text.chars().take(64).collect::<String>()
            ),
        };
        if wire::send(conn, &answer, None).is_err() {
            return Done::Connection;
        }
    }
    Done::Connection
}
