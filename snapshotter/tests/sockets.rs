//! The daemon's sockets: the gRPC socket and `fdholder.sock` have mode 0600
//! as soon as their path exists, whatever the umask, and the fd holder
//! answers no one but root and its own user (`SO_PEERCRED`), even when its
//! socket's mode would let them connect.
//!
//! One test per binary changes the umask (process-wide), so they live here,
//! apart from the other tests.

use std::ffi::CString;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use shoal::handover::{FdStore, HOLDER_PID, HOLDER_SOCKET};

const NOBODY: libc::uid_t = 65534;

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

/// Only the named entries are left in `dir` (no private bind directory).
fn only(dir: &Path, names: &[&str]) {
    let mut left: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort_unstable();
    assert_eq!(left, names, "entries of {}", dir.display());
}

/// The holder, killed when the test ends (also on a failed assertion: it
/// would otherwise keep the test's output pipe open).
struct Holder(Child);

impl Holder {
    fn start(dir: &Path) -> Holder {
        Holder(
            Command::new(env!("CARGO_BIN_EXE_shoal-fdholder"))
                .arg(dir.join(HOLDER_SOCKET))
                .arg(dir.join(HOLDER_PID))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        )
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn sockets_have_mode_0600_from_bind_whatever_the_umask() {
    // SAFETY: umask has no preconditions; restored below.
    let old = unsafe { libc::umask(0) };
    let dir = tempfile::tempdir().unwrap();

    // gRPC: server::bind returns right after binding.
    let address = dir.path().join("shoal.sock");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(async { shoal::server::bind(&address) })
        .unwrap();
    assert!(std::fs::symlink_metadata(&address)
        .unwrap()
        .file_type()
        .is_socket());
    assert_eq!(mode(&address), 0o600, "gRPC socket under umask 0");
    only(dir.path(), &["shoal.sock"]);
    // It serves at its final path.
    std::os::unix::net::UnixStream::connect(&address).unwrap();
    drop(listener);

    // The holder, started under umask 0: its socket is 0600 when it appears.
    let sock = dir.path().join(HOLDER_SOCKET);
    let holder = Holder::start(dir.path());
    wait_for("the holder's socket", || sock.exists());
    assert_eq!(mode(&sock), 0o600, "holder socket under umask 0");
    wait_for("the holder's pid file", || {
        dir.path().join(HOLDER_PID).exists()
    });
    only(dir.path(), &[HOLDER_PID, HOLDER_SOCKET, "shoal.sock"]);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    drop(holder);

    // The private bind never replaces what is there.
    let err = shoal::sockbind::bind_private(&address, 0o600, |p| {
        std::os::unix::net::UnixListener::bind(p)
    })
    .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists);
    only(dir.path(), &[HOLDER_PID, HOLDER_SOCKET, "shoal.sock"]);
}

/// In a forked child that becomes `nobody`: connects to `sock`, asks `LIST`
/// and reports by exit status: 0 refused (`ERR ...` or closed), 10 answered
/// (`FD ...` or `END`), 20 no connection, 30 could not become nobody.
/// Only raw system calls run in the child (the test process has threads).
fn list_as_nobody(sock: &Path) -> i32 {
    let path = CString::new(sock.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: sockaddr_un is plain data; zeroed is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(path.as_bytes()) {
        *d = *s as libc::c_char;
    }
    // SAFETY: the child runs only async-signal-safe calls on memory
    // prepared before the fork, then _exit()s.
    unsafe {
        let pid = libc::fork();
        assert!(pid >= 0, "fork");
        if pid == 0 {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(NOBODY) != 0
                || libc::setuid(NOBODY) != 0
            {
                libc::_exit(30);
            }
            let fd = libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET, 0);
            let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
            if fd < 0 || libc::connect(fd, (&raw const addr).cast(), len) != 0 {
                libc::_exit(20);
            }
            let req = b"LIST";
            libc::send(fd, req.as_ptr().cast(), req.len(), libc::MSG_NOSIGNAL);
            let mut buf = [0u8; 512];
            let n = libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0);
            if n >= 3 && (buf.starts_with(b"FD ") || buf.starts_with(b"END")) {
                libc::_exit(10);
            }
            libc::_exit(0);
        }
        let mut status = 0;
        assert_eq!(libc::waitpid(pid, &mut status, 0), pid);
        assert!(libc::WIFEXITED(status), "child status {status:#x}");
        libc::WEXITSTATUS(status)
    }
}

#[test]
fn the_fd_holder_refuses_other_users_even_through_an_open_socket() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "this test needs root");
    let dir = tempfile::tempdir().unwrap();
    // Reachable by nobody, as if the root or socket mode were wrong: the
    // peer check is what refuses.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let sock = dir.path().join(HOLDER_SOCKET);
    let mut holder = Holder::start(dir.path());
    wait_for("the holder's socket", || sock.exists());
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o777)).unwrap();
    let (store, _) = FdStore::open(dir.path()).unwrap();
    let secret = tempfile::tempfile().unwrap();
    store.store("shoal-1", secret.as_fd()).unwrap();

    assert_eq!(
        list_as_nobody(&sock),
        0,
        "nobody was answered by the holder"
    );

    // Root still is, and the holder kept running.
    let (_, kept) = FdStore::open(dir.path()).unwrap();
    assert_eq!(kept.len(), 1);
    assert!(holder.0.try_wait().unwrap().is_none());
    store.remove("shoal-1").unwrap();
    assert!(holder.0.wait().unwrap().success());
}
