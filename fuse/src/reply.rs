//! The read contract between the filesystem and the snapshotter:
//! [`ChunkSource`] supplies bytes, [`ReadReply`] carries them to the kernel.
//!
//! Invariants: a `ReadReply` answers its request exactly once. Dropping it
//! unanswered (including while a panic unwinds) answers `EIO`, so a lost
//! reply can never hang a reader. A data reply must have exactly the length
//! the kernel expects (`min(size, file_size - offset)`): FUSE takes a short
//! read as end of file and would shrink the cached file size, so a wrong
//! length is answered with `EIO` instead.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use fuser::{Errno, ReplyData};

/// Supplies file bytes. Implemented by the snapshotter.
///
/// Implementations must verify data before replying, and may reply from any
/// thread. `read` runs on a FUSE worker thread: it must return quickly and
/// never wait on the network there (serve a cache hit inline; on a miss, move
/// `reply` to another thread or task and answer from there).
///
/// A panic inside `read` is caught by the filesystem and answered with `EIO`;
/// it does not take the mount down, but it is counted in
/// [`Stats::source_panics`].
pub trait ChunkSource: Send + Sync + 'static {
    /// Reads `size` bytes at `offset` of the file with `data_id` (whose size is
    /// `file_size`) and answers `reply` exactly once, possibly later and from
    /// another thread. The filesystem only calls this with
    /// `offset < file_size` and `size > 0`; the reply must carry exactly
    /// [`ReadReply::expected_len`] bytes.
    ///
    /// # Errors
    /// Answer `reply.error(libc::EIO)` for failed or unverifiable data.
    fn read(&self, data_id: u64, file_size: u64, offset: u64, size: u32, reply: ReadReply);

    /// A read-only file holding exactly the verified bytes of file `data_id`
    /// (same size), for kernel passthrough: the kernel then reads it
    /// directly, without calling [`ChunkSource::read`]. `None` (the default)
    /// serves the file through `read` and the page cache. Called on a FUSE
    /// worker at most once per inode and mount (see `iomode.rs`); it must not
    /// block on the network. The file's bytes must never change while the
    /// mount lives.
    fn backing(&self, _data_id: u64) -> Option<std::os::fd::OwnedFd> {
        None
    }

    /// Called on every open of file `data_id` while passthrough is on, with
    /// the rest of the open: `answer` decides the I/O mode (outside and
    /// before which nothing is locked) and replies. Slow work that
    /// [`ChunkSource::backing`] would otherwise do under the decision lock
    /// (such as checking the backing file once) belongs here, off the FUSE
    /// worker: do it on another thread and call `answer` there when done,
    /// so that it holds up only this open, not the mount's workers. The
    /// default answers right away, on the worker.
    fn prepare_backing(&self, _data_id: u64, answer: Box<dyn FnOnce() + Send>) {
        answer();
    }
}

/// Counters of one mount, cheap enough for the read path.
#[derive(Debug, Default)]
pub struct Stats {
    /// `read` requests handed to the source.
    pub reads: AtomicU64,
    /// Bytes answered to the kernel.
    pub read_bytes: AtomicU64,
    /// Reads answered with an error (by the source or for a wrong length).
    pub read_errors: AtomicU64,
    /// Panics caught around [`ChunkSource::read`].
    pub source_panics: AtomicU64,
    /// Opens answered with kernel passthrough (reads then bypass the daemon).
    pub passthrough_opens: AtomicU64,
}

/// A snapshot of [`Stats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub reads: u64,
    pub read_bytes: u64,
    pub read_errors: u64,
    pub source_panics: u64,
    pub passthrough_opens: u64,
}

impl Stats {
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            reads: self.reads.load(Ordering::Relaxed),
            read_bytes: self.read_bytes.load(Ordering::Relaxed),
            read_errors: self.read_errors.load(Ordering::Relaxed),
            source_panics: self.source_panics.load(Ordering::Relaxed),
            passthrough_opens: self.passthrough_opens.load(Ordering::Relaxed),
        }
    }
}

/// The answer to one FUSE read. Wraps [`fuser::ReplyData`]; `Send`, so it may
/// be moved to another thread.
#[derive(Debug)]
pub struct ReadReply {
    inner: Option<ReplyData>,
    expected: u32,
    stats: Arc<Stats>,
}

impl ReadReply {
    pub(crate) fn new(inner: ReplyData, expected: u32, stats: Arc<Stats>) -> ReadReply {
        ReadReply {
            inner: Some(inner),
            expected,
            stats,
        }
    }

    /// The exact number of bytes [`ReadReply::data`] must carry.
    pub fn expected_len(&self) -> u32 {
        self.expected
    }

    /// Answers with `bytes`, which must be exactly [`Self::expected_len`]
    /// long; any other length answers `EIO` (see the module doc).
    pub fn data(mut self, bytes: &[u8]) {
        let Some(inner) = self.inner.take() else {
            return;
        };
        if bytes.len() != self.expected as usize {
            tracing::warn!(
                got = bytes.len(),
                expected = self.expected,
                "chunk source answered a read with the wrong length"
            );
            self.count(|s| &s.read_errors, 1);
            inner.error(Errno::EIO);
            return;
        }
        self.count(|s| &s.read_bytes, bytes.len() as u64);
        inner.data(bytes);
    }

    /// Answers with the error number `errno` (e.g. `libc::EIO`).
    pub fn error(mut self, errno: i32) {
        if let Some(inner) = self.inner.take() {
            self.count(|s| &s.read_errors, 1);
            inner.error(Errno::from_i32(errno));
        }
    }

    fn count(&self, field: impl Fn(&Stats) -> &AtomicU64, n: u64) {
        field(&self.stats).fetch_add(n, Ordering::Relaxed);
    }
}

impl Drop for ReadReply {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.take() {
            self.count(|s| &s.read_errors, 1);
            inner.error(Errno::EIO);
        }
    }
}
