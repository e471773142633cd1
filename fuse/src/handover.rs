//! Resuming a FUSE connection that an earlier process initialised.
//!
//! A restarted daemon gets back the `/dev/fuse` fd of each mounted layer (the
//! snapshotter keeps a duplicate in systemd's fd store or in its fd holder)
//! and serves it again with [`crate::attach`]. Requests the kernel queued
//! while no process was reading simply wait in the connection's pending
//! queue. Requests the dead process had read but not answered sit in the
//! processing queue of the open file; [`resend`] asks the kernel (Linux 6.9+,
//! `FUSE_NOTIFY_RESEND`) to move them back to the pending queue, so they are
//! delivered again, with `FUSE_UNIQUE_RESEND` (bit 63) set in `unique`, which
//! the reply echoes unchanged.
//!
//! Invariant: every worker reads the one open file description whose
//! duplicate is kept (no `FUSE_DEV_IOC_CLONE`): the kernel ends the requests
//! of a cloned fd's processing queue with `ECONNABORTED` when that clone is
//! closed, which a dying process does.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// `fuse_notify_code::FUSE_NOTIFY_RESEND` (include/uapi/linux/fuse.h, 7.40).
const FUSE_NOTIFY_RESEND: i32 = 7;

/// Asks the kernel to deliver again every request of this connection that
/// was read but never answered.
///
/// # Errors
/// The `write(2)` error: `EINVAL` on a kernel without `FUSE_NOTIFY_RESEND`
/// (before 6.9), `ENODEV` if the connection was aborted.
pub fn resend(fd: BorrowedFd<'_>) -> io::Result<()> {
    // struct fuse_out_header { u32 len; i32 error; u64 unique; }: a
    // notification has unique 0 and carries its code in `error`.
    let mut msg = [0u8; 16];
    msg[0..4].copy_from_slice(&16u32.to_ne_bytes());
    msg[4..8].copy_from_slice(&FUSE_NOTIFY_RESEND.to_ne_bytes());
    // SAFETY: `msg` is a valid 16-byte buffer and `fd` an open descriptor.
    let n = unsafe { libc::write(fd.as_raw_fd(), msg.as_ptr().cast(), msg.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
