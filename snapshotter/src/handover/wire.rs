//! The fd holder's wire format, shared by `shoal-fdholder` and the daemon.
//!
//! A `SOCK_SEQPACKET` Unix socket, so every message keeps its boundaries. A
//! message is one line of text (at most [`MAX_MSG`] bytes) and carries at
//! most one fd (`SCM_RIGHTS`):
//!
//! | Request (daemon) | fd | Answer (holder) |
//! | --- | --- | --- |
//! | `STORE NAME` | the fd to keep | `OK` (replaces a kept fd of that name) |
//! | `REMOVE NAME` | - | `OK` (also if there was none) |
//! | `LIST` | - | one `FD NAME` per kept fd, carrying a duplicate of it, then `END` |
//!
//! Anything else is answered `ERR reason`. Names are 1-255 bytes of
//! `[A-Za-z0-9._-]`.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags, UnixAddr};

/// Longest message, name included.
pub const MAX_MSG: usize = 512;

/// Whether `name` may be kept under (see the module doc).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Sends `text`, with `fd` attached if given.
///
/// # Errors
/// `sendmsg(2)`.
pub fn send(sock: BorrowedFd<'_>, text: &str, fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
    let iov = [IoSlice::new(text.as_bytes())];
    let raw = fd.map(|f| [f.as_raw_fd()]);
    let cmsgs: Vec<ControlMessage<'_>> = raw.iter().map(|r| ControlMessage::ScmRights(r)).collect();
    sendmsg::<UnixAddr>(sock.as_raw_fd(), &iov, &cmsgs, MsgFlags::MSG_NOSIGNAL, None)?;
    Ok(())
}

/// Receives one message: its text and the fd it carried. `Ok(None)` at end
/// of stream. Extra fds are closed.
///
/// # Errors
/// `recvmsg(2)`; `InvalidData` for a truncated or non-UTF-8 message.
pub fn recv(sock: BorrowedFd<'_>) -> io::Result<Option<(String, Option<OwnedFd>)>> {
    let mut buf = [0u8; MAX_MSG];
    let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 4]);
    let (n, truncated, fds) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<UnixAddr>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )?;
        let mut fds = Vec::new();
        for c in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(r) = c {
                // SAFETY: the kernel just installed these fds in this process
                // for us; nothing else owns them.
                fds.extend(r.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }));
            }
        }
        let truncated = msg
            .flags
            .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
        (msg.bytes, truncated, fds)
    };
    if n == 0 && fds.is_empty() {
        return Ok(None);
    }
    if truncated {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "message truncated",
        ));
    }
    let text = std::str::from_utf8(&buf[..n])
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "message is not UTF-8"))?;
    Ok(Some((text.to_owned(), fds.into_iter().next())))
}
