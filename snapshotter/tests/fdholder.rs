//! `shoal-fdholder` as a real process, driven through `shoal::handover`:
//! kept fds come back as the same open files, names replace, REMOVE drops,
//! and the holder exits (removing its socket) once it keeps nothing.

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use shoal::handover::{FdStore, HOLDER_PID, HOLDER_SOCKET};

fn pipe() -> (std::fs::File, std::fs::File) {
    let (r, w) = nix::unistd::pipe().unwrap();
    (std::fs::File::from(r), std::fs::File::from(w))
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn holder_keeps_returns_and_drops_fds() {
    let root = tempfile::tempdir().unwrap();
    let sock = root.path().join(HOLDER_SOCKET);
    let mut holder = Command::new(env!("CARGO_BIN_EXE_shoal-fdholder"))
        .arg(&sock)
        .arg(root.path().join(HOLDER_PID))
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    wait_for("the holder's socket", || sock.exists());

    let (store, kept) = FdStore::open(root.path()).unwrap();
    assert!(kept.is_empty());
    let (r1, mut w1) = pipe();
    let (r2, mut w2) = pipe();
    store.store("shoal-1", r1.as_fd()).unwrap();
    store.store("shoal-2", r2.as_fd()).unwrap();
    // Same name again: replaces (the holder closes its copy of r2).
    let (r3, mut w3) = pipe();
    store.store("shoal-2", r3.as_fd()).unwrap();
    drop((r1, r2, r3));

    // A "restarted daemon" takes them back: the same open pipes.
    let (_, mut kept) = FdStore::open(root.path()).unwrap();
    assert_eq!(kept.len(), 2);
    let read = |fd: OwnedFd| {
        let mut b = [0u8; 5];
        std::fs::File::from(fd).read_exact(&mut b).unwrap();
        b
    };
    w1.write_all(b"one..").unwrap();
    w3.write_all(b"three").unwrap();
    assert_eq!(&read(kept.remove("shoal-1").unwrap()), b"one..");
    assert_eq!(&read(kept.remove("shoal-2").unwrap()), b"three");
    // r2 is closed everywhere now: writing to it fails.
    assert!(w2.write_all(b"x").is_err());

    // Bad requests are refused, not fatal.
    assert!(store.store("bad name", w1.as_fd()).is_err());

    store.remove("shoal-1").unwrap();
    assert!(
        holder.try_wait().unwrap().is_none(),
        "holder exited while keeping shoal-2"
    );
    store.remove("shoal-2").unwrap();
    wait_for("the empty holder to exit", || {
        holder.try_wait().unwrap().is_some()
    });
    assert!(holder.wait().unwrap().success());
    assert!(!sock.exists() && !root.path().join(HOLDER_PID).exists());
    // No holder: nothing kept, and removing is a no-op.
    let (store, kept) = FdStore::open(root.path()).unwrap();
    assert!(kept.is_empty());
    store.remove("shoal-9").unwrap();
}
