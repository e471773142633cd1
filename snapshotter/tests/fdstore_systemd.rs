//! The systemd fd-store messages, received on a socket standing in for
//! systemd's `NOTIFY_SOCKET` (systemd cannot run as PID 1 on the test
//! machines): `FDSTORE=1` + `FDNAME=` with the fd attached, preceded by an
//! `FDSTOREREMOVE=1` of the same name so a name is never stored twice.
//! Taking fds back (`LISTEN_FDS`) is sd-notify's `listen_fds_with_names`.

use std::io::{IoSliceMut, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;

use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixAddr};
use shoal::handover::FdStore;

fn recv(sock: &UnixDatagram) -> (String, Vec<OwnedFd>) {
    let mut buf = [0u8; 512];
    let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 2]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<UnixAddr>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::empty(),
    )
    .unwrap();
    let mut fds = Vec::new();
    for c in msg.cmsgs().unwrap() {
        if let ControlMessageOwned::ScmRights(r) = c {
            // SAFETY: just received; owned by nobody else.
            fds.extend(r.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }));
        }
    }
    let n = msg.bytes;
    (String::from_utf8(buf[..n].to_vec()).unwrap(), fds)
}

#[test]
fn store_and_remove_messages() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify");
    let systemd = UnixDatagram::bind(&path).unwrap();
    // SAFETY: this test binary runs this one test; nothing reads the
    // environment concurrently.
    unsafe { std::env::set_var("NOTIFY_SOCKET", &path) };
    let (store, kept) = FdStore::open(dir.path()).unwrap();
    assert!(matches!(store, FdStore::Systemd));
    assert!(kept.is_empty(), "no LISTEN_FDS for this process");

    let (r, w) = nix::unistd::pipe().unwrap();
    store.store("shoal-7", r.as_fd()).unwrap();
    let (text, fds) = recv(&systemd);
    assert_eq!(text, "FDSTOREREMOVE=1\nFDNAME=shoal-7\n");
    assert!(fds.is_empty());
    let (text, mut fds) = recv(&systemd);
    assert_eq!(text, "FDSTORE=1\nFDNAME=shoal-7\n");
    assert_eq!(fds.len(), 1);
    // The fd systemd got is the same pipe.
    std::fs::File::from(w).write_all(b"fuse").unwrap();
    let mut b = [0u8; 4];
    std::fs::File::from(fds.remove(0))
        .read_exact(&mut b)
        .unwrap();
    assert_eq!(&b, b"fuse");

    store.remove("shoal-7").unwrap();
    let (text, fds) = recv(&systemd);
    assert_eq!(text, "FDSTOREREMOVE=1\nFDNAME=shoal-7\n");
    assert!(fds.is_empty());
}
