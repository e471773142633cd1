//! The compact, immutable inode table of one layer.
//!
//! Layout (about 70 bytes per entry plus names, see [`Tree::heap_bytes`]):
//! - `inodes`: one fixed-size [`Inode`] per inode, indexed by `ino - 1`
//!   (the root is ino 1, FUSE's root id). Hardlinked names share one inode.
//! - `dirents`: every directory's children, contiguous and sorted by name
//!   bytes, so lookup is a binary search and a readdir offset is an index.
//! - `names`: one byte arena for dirent names and symlink targets.
//! - `xattrs` + `xattr_arena`: only inodes that have xattrs use them.
//!
//! Invariants: the tree never changes after [`Tree::build`], so inode numbers,
//! dirent order and readdir offsets are stable for the life of a mount.

use std::mem::size_of;

use crate::builder::Builder;
use crate::entry::{Entry, TreeError};

/// What an inode is. OCI whiteouts are served as `CharDev` 0:0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NodeKind {
    File,
    Dir,
    Symlink,
    CharDev,
    BlockDev,
    Fifo,
}

/// Fixed-size inode record. Field meaning of `a`/`b` depends on `kind`:
/// File: size / data_id; Dir: first dirent / child count;
/// Symlink: target offset in `names` / target length; devices: rdev / -.
#[derive(Clone, Debug)]
pub(crate) struct Inode {
    pub(crate) mtime: i64,
    pub(crate) a: u64,
    pub(crate) b: u64,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) nlink: u32,
    /// Parent directory's ino (dirs only; the root is its own parent).
    pub(crate) parent: u32,
    pub(crate) xattr_start: u32,
    pub(crate) xattr_count: u16,
    pub(crate) mode: u16,
    pub(crate) kind: NodeKind,
}

#[derive(Clone, Debug)]
pub(crate) struct Dirent {
    pub(crate) name_off: u32,
    pub(crate) ino: u32,
    pub(crate) name_len: u8,
}

/// Name bytes then value bytes, starting at `off` in `xattr_arena`.
#[derive(Clone, Debug)]
pub(crate) struct XattrRef {
    pub(crate) off: u32,
    pub(crate) name_len: u32,
    pub(crate) value_len: u32,
}

/// The in-memory inode table of one layer. Build it with [`Tree::build`].
#[derive(Debug)]
pub struct Tree {
    pub(crate) inodes: Vec<Inode>,
    pub(crate) dirents: Vec<Dirent>,
    pub(crate) names: Vec<u8>,
    pub(crate) xattrs: Vec<XattrRef>,
    pub(crate) xattr_arena: Vec<u8>,
    /// Sum of regular file sizes (each inode once).
    pub(crate) file_bytes: u64,
}

/// Linux's `new_encode_dev`, the form FUSE's `fuse_attr.rdev` carries.
pub(crate) fn encode_rdev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12)
}

fn decode_rdev(rdev: u32) -> (u32, u32) {
    (
        (rdev & 0xfff00) >> 8,
        (rdev & 0xff) | ((rdev >> 12) & 0xfff00),
    )
}

impl Tree {
    /// Builds the inode table from TOC entries, in TOC order.
    ///
    /// # Errors
    /// A [`TreeError`] naming the first entry that cannot be served: a path
    /// escaping the root, NUL bytes, an entry under a non-directory, a
    /// hardlink to a missing entry or a directory, a bad whiteout name.
    pub fn build(entries: impl IntoIterator<Item = Entry>) -> Result<Tree, TreeError> {
        let mut b = Builder::new();
        for e in entries {
            b.add(&e)?;
        }
        b.finish()
    }

    pub(crate) fn empty() -> Tree {
        Tree {
            inodes: Vec::new(),
            dirents: Vec::new(),
            names: Vec::new(),
            xattrs: Vec::new(),
            xattr_arena: Vec::new(),
            file_bytes: 0,
        }
    }

    pub(crate) fn shrink(&mut self) {
        self.inodes.shrink_to_fit();
        self.dirents.shrink_to_fit();
        self.names.shrink_to_fit();
        self.xattrs.shrink_to_fit();
        self.xattr_arena.shrink_to_fit();
    }

    /// Number of inodes, the root included (hardlinks count once).
    pub fn len(&self) -> usize {
        self.inodes.len()
    }

    /// Always false: a tree has at least its root.
    pub fn is_empty(&self) -> bool {
        self.inodes.is_empty()
    }

    /// Number of directory entries (names), hardlinks counted per name.
    pub fn dirent_count(&self) -> usize {
        self.dirents.len()
    }

    /// Sum of regular file sizes, each hardlinked file once.
    pub fn file_bytes(&self) -> u64 {
        self.file_bytes
    }

    /// Heap memory held by the tree, in bytes (capacities, not lengths).
    pub fn heap_bytes(&self) -> usize {
        self.inodes.capacity() * size_of::<Inode>()
            + self.dirents.capacity() * size_of::<Dirent>()
            + self.names.capacity()
            + self.xattrs.capacity() * size_of::<XattrRef>()
            + self.xattr_arena.capacity()
    }

    /// The inode `ino`, if it exists.
    pub fn get(&self, ino: u64) -> Option<Node<'_>> {
        let idx = usize::try_from(ino.checked_sub(1)?).ok()?;
        let inode = self.inodes.get(idx)?;
        Some(Node {
            tree: self,
            ino,
            inode,
        })
    }

    /// The root directory (ino 1).
    pub fn root(&self) -> Node<'_> {
        self.get(1).expect("a tree always has a root")
    }

    /// Looks `name` up in directory `parent`.
    pub fn lookup(&self, parent: u64, name: &[u8]) -> Option<Node<'_>> {
        let dir = self.get(parent)?;
        let children = dir.dirents()?;
        let i = children
            .binary_search_by(|d| self.dirent_name(d).cmp(name))
            .ok()?;
        self.get(u64::from(children[i].ino))
    }

    /// Resolves a path from the root, without following symlinks.
    pub fn lookup_path(&self, path: &str) -> Option<Node<'_>> {
        let mut cur = self.root();
        for comp in path.split('/').filter(|c| !c.is_empty() && *c != ".") {
            cur = self.lookup(cur.ino, comp.as_bytes())?;
        }
        Some(cur)
    }

    pub(crate) fn dirent_name(&self, d: &Dirent) -> &[u8] {
        let off = d.name_off as usize;
        &self.names[off..off + usize::from(d.name_len)]
    }
}

/// A borrowed view of one inode.
#[derive(Clone, Copy, Debug)]
pub struct Node<'a> {
    tree: &'a Tree,
    ino: u64,
    inode: &'a Inode,
}

impl<'a> Node<'a> {
    pub fn ino(&self) -> u64 {
        self.ino
    }
    pub fn kind(&self) -> NodeKind {
        self.inode.kind
    }
    /// Permission bits (`0o7777`).
    pub fn mode(&self) -> u32 {
        u32::from(self.inode.mode)
    }
    pub fn uid(&self) -> u32 {
        self.inode.uid
    }
    pub fn gid(&self) -> u32 {
        self.inode.gid
    }
    pub fn mtime(&self) -> i64 {
        self.inode.mtime
    }
    pub fn nlink(&self) -> u32 {
        self.inode.nlink
    }

    /// `st_size`: file length, symlink target length, 4096 for directories.
    pub fn size(&self) -> u64 {
        match self.inode.kind {
            NodeKind::File | NodeKind::Symlink => self.file_size_or_target_len(),
            NodeKind::Dir => 4096,
            _ => 0,
        }
    }

    fn file_size_or_target_len(&self) -> u64 {
        match self.inode.kind {
            NodeKind::File => self.inode.a,
            NodeKind::Symlink => self.inode.b,
            _ => 0,
        }
    }

    /// The `data_id` of a regular file, for [`ChunkSource::read`](crate::ChunkSource::read).
    pub fn data_id(&self) -> Option<u64> {
        (self.inode.kind == NodeKind::File).then_some(self.inode.b)
    }

    /// Encoded device number as FUSE carries it (0 unless a device).
    pub fn rdev(&self) -> u32 {
        match self.inode.kind {
            NodeKind::CharDev | NodeKind::BlockDev => self.inode.a as u32,
            _ => 0,
        }
    }

    /// `(major, minor)` of a device node.
    pub fn device(&self) -> (u32, u32) {
        decode_rdev(self.rdev())
    }

    /// The parent directory's ino (directories only; the root's is itself).
    pub fn parent(&self) -> u64 {
        u64::from(self.inode.parent)
    }

    /// The symlink target, verbatim.
    pub fn symlink_target(&self) -> Option<&'a [u8]> {
        (self.inode.kind == NodeKind::Symlink).then(|| {
            let off = self.inode.a as usize;
            &self.tree.names[off..off + self.inode.b as usize]
        })
    }

    pub(crate) fn dirents(&self) -> Option<&'a [Dirent]> {
        (self.inode.kind == NodeKind::Dir).then(|| {
            let start = self.inode.a as usize;
            &self.tree.dirents[start..start + self.inode.b as usize]
        })
    }

    /// Number of children (directories only).
    pub fn child_count(&self) -> usize {
        self.dirents().map_or(0, <[Dirent]>::len)
    }

    /// Children as `(name, ino, kind)`, sorted by name (empty unless a directory).
    pub fn children(&self) -> impl Iterator<Item = (&'a [u8], u64, NodeKind)> + 'a {
        let tree = self.tree;
        self.dirents().unwrap_or(&[]).iter().map(move |d| {
            let kind = tree.inodes[d.ino as usize - 1].kind;
            (tree.dirent_name(d), u64::from(d.ino), kind)
        })
    }

    /// Extended attributes as `(name, value)`, sorted by name.
    pub fn xattrs(&self) -> impl Iterator<Item = (&'a [u8], &'a [u8])> + 'a {
        let tree = self.tree;
        let start = self.inode.xattr_start as usize;
        let refs = &tree.xattrs[start..start + usize::from(self.inode.xattr_count)];
        refs.iter().map(move |x| {
            let off = x.off as usize;
            let name_end = off + x.name_len as usize;
            (
                &tree.xattr_arena[off..name_end],
                &tree.xattr_arena[name_end..name_end + x.value_len as usize],
            )
        })
    }

    /// The value of xattr `name`.
    pub fn xattr(&self, name: &[u8]) -> Option<&'a [u8]> {
        self.xattrs().find(|(k, _)| *k == name).map(|(_, v)| v)
    }
}

#[cfg(test)]
#[path = "tree_tests.rs"]
mod tests;
