//! The `fuser::Filesystem` that serves one [`Tree`] read-only.
//!
//! Invariants:
//! - Every handler answers from the immutable tree without blocking, except
//!   `read`, which hands its reply to [`ChunkSource::read`] (inside
//!   `catch_unwind`, so a panicking source answers `EIO` and the worker lives),
//!   and `open`, which hands the rest of the open (mode decision and reply) to
//!   [`ChunkSource::prepare_backing`] while passthrough is on.
//! - Inode numbers are the tree's; attributes and entries (including negative
//!   lookups) are cached by the kernel for [`TTL`], and file pages are kept
//!   across opens (`FOPEN_KEEP_CACHE`): layers never change.
//! - Anything that would modify the filesystem answers `EROFS`.
//! - readdir offsets: 0 is `.`, 1 is `..`, `2 + i` is child `i` in name order;
//!   each entry carries the offset of the next one.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, BsdFileFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenAccMode, OpenFlags, RenameFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use crate::iomode::{Decision, IoModes};
use crate::reply::{ChunkSource, ReadReply, Stats};
use crate::tree::{Node, NodeKind, Tree};

/// How long the kernel may cache attributes and entries. Layers are
/// immutable, so this is only bounded to let memory pressure reclaim.
pub const TTL: Duration = Duration::from_secs(3600);
/// Block size reported by `stat` and `statfs`.
const BLOCK_SIZE: u32 = 4096;
const NAME_MAX: u32 = 255;

pub(crate) struct LayerFs {
    tree: Tree,
    source: Arc<dyn ChunkSource>,
    stats: Arc<Stats>,
    modes: Arc<IoModes>,
}

impl LayerFs {
    pub(crate) fn new(
        tree: Tree,
        source: Arc<dyn ChunkSource>,
        stats: Arc<Stats>,
        modes: IoModes,
    ) -> LayerFs {
        // Inodes an earlier process answered with passthrough: let the
        // source know their backing files are in use again.
        for ino in modes.pending_passthrough() {
            if let Some(id) = tree.get(ino).and_then(|n| n.data_id()) {
                drop(source.backing(id));
            }
        }
        LayerFs {
            tree,
            source,
            stats,
            modes: Arc::new(modes),
        }
    }

    fn node(&self, ino: INodeNo) -> Result<Node<'_>, Errno> {
        self.tree.get(ino.0).ok_or(Errno::ENOENT)
    }
}

/// Decides the I/O mode of an open of `ino` and answers it (on a FUSE
/// worker, or on the thread that finished [`ChunkSource::prepare_backing`]).
fn answer_open(
    modes: &IoModes,
    source: &dyn ChunkSource,
    stats: &Stats,
    ino: u64,
    data_id: Option<u64>,
    reply: ReplyOpen,
) {
    let decision = modes.decide(ino, || {
        let fd = source.backing(data_id?)?;
        Some(reply.open_backing(&fd))
    });
    match decision {
        Decision::Passthrough(id) => {
            stats.passthrough_opens.fetch_add(1, Ordering::Relaxed);
            reply.opened_passthrough(FileHandle(0), FopenFlags::empty(), &id)
        }
        Decision::Cached => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE),
    }
}

fn file_type(kind: NodeKind) -> FileType {
    match kind {
        NodeKind::File => FileType::RegularFile,
        NodeKind::Dir => FileType::Directory,
        NodeKind::Symlink => FileType::Symlink,
        NodeKind::CharDev => FileType::CharDevice,
        NodeKind::BlockDev => FileType::BlockDevice,
        NodeKind::Fifo => FileType::NamedPipe,
    }
}

fn time(secs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

fn attr(n: &Node<'_>) -> FileAttr {
    let size = n.size();
    let blocks = match n.kind() {
        NodeKind::File | NodeKind::Dir => size.div_ceil(512),
        _ => 0,
    };
    let t = time(n.mtime());
    FileAttr {
        ino: INodeNo(n.ino()),
        size,
        blocks,
        atime: t,
        mtime: t,
        ctime: t,
        crtime: t,
        kind: file_type(n.kind()),
        perm: n.mode() as u16,
        nlink: n.nlink(),
        uid: n.uid(),
        gid: n.gid(),
        rdev: n.rdev(),
        blksize: BLOCK_SIZE,
        flags: 0,
    }
}

/// A negative entry (ino 0): the kernel caches the absence for the TTL.
fn negative_attr() -> FileAttr {
    FileAttr {
        ino: INodeNo(0),
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: FileType::RegularFile,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: BLOCK_SIZE,
        flags: 0,
    }
}

/// Answers an xattr request under the size-probe protocol: size 0 asks for
/// the length, a too-small buffer is `ERANGE`.
fn reply_xattr(reply: ReplyXattr, size: u32, value: &[u8]) {
    let Ok(len) = u32::try_from(value.len()) else {
        return reply.error(Errno::E2BIG);
    };
    if size == 0 {
        reply.size(len);
    } else if len > size {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(value);
    }
}

/// `access(2)` against the inode's mode for the caller's uid and primary gid.
fn permitted(n: &Node<'_>, uid: u32, gid: u32, mask: AccessFlags) -> bool {
    let mode = n.mode();
    if uid == 0 {
        // Root may read anything and execute what has any x bit (or search dirs).
        return !mask.contains(AccessFlags::X_OK) || n.kind() == NodeKind::Dir || mode & 0o111 != 0;
    }
    let bits = if uid == n.uid() {
        (mode >> 6) & 7
    } else if gid == n.gid() {
        (mode >> 3) & 7
    } else {
        mode & 7
    };
    let want = (if mask.contains(AccessFlags::R_OK) {
        4
    } else {
        0
    }) | (if mask.contains(AccessFlags::X_OK) {
        1
    } else {
        0
    });
    bits & want == want
}

impl Filesystem for LayerFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Optional speed-ups; an older kernel without them is fine.
        for flag in [
            InitFlags::FUSE_CACHE_SYMLINKS,
            InitFlags::FUSE_PARALLEL_DIROPS,
        ] {
            let _ = config.add_capabilities(flag);
        }
        let passthrough = self.modes.wanted()
            && config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
            && config.set_max_stack_depth(1).is_ok();
        self.modes.set_enabled(passthrough);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let dir = match self.node(parent) {
            Ok(d) if d.kind() == NodeKind::Dir => d,
            Ok(_) => return reply.error(Errno::ENOTDIR),
            Err(e) => return reply.error(e),
        };
        match self.tree.lookup(dir.ino(), name.as_bytes()) {
            Some(n) => reply.entry(&TTL, &attr(&n), Generation(0)),
            None => reply.entry(&TTL, &negative_attr(), Generation(0)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.node(ino) {
            Ok(n) => reply.attr(&TTL, &attr(&n)),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.node(ino).map(|n| n.symlink_target()) {
            Ok(Some(target)) => reply.data(target),
            Ok(None) => reply.error(Errno::EINVAL),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.node(ino) {
            Err(e) => reply.error(e),
            Ok(n) if n.kind() == NodeKind::Dir => reply.error(Errno::EISDIR),
            Ok(_) if flags.acc_mode() != OpenAccMode::O_RDONLY => reply.error(Errno::EROFS),
            Ok(_) if flags.0 & libc::O_TRUNC != 0 => reply.error(Errno::EROFS),
            Ok(n) => {
                let (ino, data_id) = (n.ino(), n.data_id());
                let answer = {
                    let (modes, source) = (self.modes.clone(), self.source.clone());
                    let stats = self.stats.clone();
                    move || answer_open(&modes, &*source, &stats, ino, data_id, reply)
                };
                match (data_id, self.modes.enabled()) {
                    // Outside the decision lock, and maybe off this worker:
                    // a slow check holds up only this open.
                    (Some(id), true) => self.source.prepare_backing(id, Box::new(answer)),
                    _ => answer(),
                }
            }
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let n = match self.node(ino) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        let Some(data_id) = n.data_id() else {
            return reply.error(Errno::EINVAL);
        };
        let file_size = n.size();
        if offset >= file_size || size == 0 {
            return reply.data(&[]);
        }
        // offset < file_size, so the subtraction cannot underflow.
        let len = u64::from(size).min(file_size - offset) as u32;
        self.stats.reads.fetch_add(1, Ordering::Relaxed);
        let reply = ReadReply::new(reply, len, self.stats.clone());
        let source = &self.source;
        // If the source panics, `reply` is dropped while unwinding and answers EIO.
        let res = catch_unwind(AssertUnwindSafe(|| {
            source.read(data_id, file_size, offset, len, reply)
        }));
        if res.is_err() {
            self.stats.source_panics.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                ino = ino.0,
                data_id,
                offset,
                "chunk source panicked; answered EIO"
            );
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _ds: bool, reply: ReplyEmpty) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.modes.released(ino.0);
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.node(ino) {
            Ok(n) if n.kind() == NodeKind::Dir => reply.opened(
                FileHandle(0),
                FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR,
            ),
            Ok(_) => reply.error(Errno::ENOTDIR),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let dir = match self.node(ino) {
            Ok(d) if d.kind() == NodeKind::Dir => d,
            Ok(_) => return reply.error(Errno::ENOTDIR),
            Err(e) => return reply.error(e),
        };
        let dots = [
            (b".".as_slice(), dir.ino(), NodeKind::Dir),
            (b"..".as_slice(), dir.parent(), NodeKind::Dir),
        ];
        let skip = usize::try_from(offset).unwrap_or(usize::MAX);
        let entries = dots
            .into_iter()
            .chain(dir.children())
            .enumerate()
            .skip(skip);
        for (pos, (name, child, kind)) in entries {
            let next = pos as u64 + 1;
            if reply.add(
                INodeNo(child),
                next,
                file_type(kind),
                OsStr::from_bytes(name),
            ) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _ds: bool, r: ReplyEmpty) {
        r.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let blocks = self
            .tree
            .file_bytes()
            .div_ceil(u64::from(BLOCK_SIZE))
            .max(1);
        let files = self.tree.len() as u64;
        reply.statfs(blocks, 0, 0, files, 0, BLOCK_SIZE, NAME_MAX, BLOCK_SIZE);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        match self.node(ino).map(|n| n.xattr(name.as_bytes())) {
            Ok(Some(value)) => reply_xattr(reply, size, value),
            Ok(None) => reply.error(Errno::NO_XATTR),
            Err(e) => reply.error(e),
        }
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let n = match self.node(ino) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        // As on disk filesystems, trusted.* is listed only to root.
        let mut list = Vec::new();
        for (name, _) in n.xattrs() {
            if req.uid() == 0 || !name.starts_with(b"trusted.") {
                list.extend_from_slice(name);
                list.push(0);
            }
        }
        reply_xattr(reply, size, &list);
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        match self.node(ino) {
            Err(e) => reply.error(e),
            Ok(_) if mask.contains(AccessFlags::W_OK) => reply.error(Errno::EROFS),
            Ok(n) if permitted(&n, req.uid(), req.gid(), mask) => reply.ok(),
            Ok(_) => reply.error(Errno::EACCES),
        }
    }

    // Everything below would modify the layer.

    fn setattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        reply.error(Errno::EROFS);
    }

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn mkdir(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn symlink(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _link_name: &OsStr,
        _target: &Path,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn rename(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        reply.error(Errno::EROFS);
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn create(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        reply.error(Errno::EROFS);
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _length: u64,
        _mode: i32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        _fh_in: FileHandle,
        _offset_in: u64,
        _ino_out: INodeNo,
        _fh_out: FileHandle,
        _offset_out: u64,
        _len: u64,
        _flags: fuser::CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        reply.error(Errno::EROFS);
    }
}
