//! Turns a stream of TOC [`Entry`]s into a [`Tree`], applying tar semantics.
//!
//! The builder keeps a mutable, pointer-rich tree only while the layer is
//! being built; [`Builder::finish`] compacts it into the flat [`Tree`].
//!
//! Rules (those of containerd's tar applier, plus the overlayfs whiteout form):
//! - A later entry for a path replaces the earlier one. A directory replacing a
//!   directory only updates attributes and xattrs (children and opaqueness
//!   stay); anything else replaces the whole subtree.
//! - Missing parents are created as implicit directories (0755, root:root,
//!   mtime 0). A path under a non-directory is an error.
//! - `.wh.NAME` becomes a char device 0:0 named `NAME`, unless a real entry
//!   `NAME` exists in the same layer (before or after): real entries win, as
//!   the OCI spec says a whiteout only applies to lower layers.
//!   `.wh..wh..opq` marks its directory opaque. Other `.wh..wh.*` names (aufs
//!   metadata) are ignored. Whiteout names never appear in the tree.
//! - A hardlink binds to the node its target names *at that point* of the
//!   stream (a later replacement of the target leaves the link alone); the
//!   target must exist and must not be a directory or a whiteout.

use std::collections::BTreeMap;

use crate::entry::{normalise, Entry, EntryKind, TreeError};
use crate::tree::{encode_rdev, Dirent, Inode, NodeKind, Tree, XattrRef};

const ROOT: usize = 0;
const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";
const AUFS_META_PREFIX: &str = ".wh..wh.";
/// Xattrs that steer overlayfs; entries may not set them, only whiteouts may.
const RESERVED_XATTR_PREFIXES: [&str; 2] = ["trusted.overlay.", "user.overlay."];
pub(crate) const OPAQUE_XATTRS: [&str; 2] = ["trusted.overlay.opaque", "user.overlay.opaque"];

struct BNode {
    kind: NodeKind,
    whiteout: bool,
    opaque: bool,
    mode: u16,
    uid: u32,
    gid: u32,
    mtime: i64,
    size: u64,
    data_id: u64,
    rdev: u32,
    target: Box<str>,
    xattrs: Vec<(String, Vec<u8>)>,
    children: BTreeMap<Box<str>, usize>,
}

impl BNode {
    fn implicit_dir() -> BNode {
        BNode {
            kind: NodeKind::Dir,
            whiteout: false,
            opaque: false,
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime: 0,
            size: 0,
            data_id: 0,
            rdev: 0,
            target: Box::from(""),
            xattrs: Vec::new(),
            children: BTreeMap::new(),
        }
    }

    fn from_entry(e: &Entry, kind: NodeKind) -> BNode {
        let mut n = BNode::implicit_dir();
        n.kind = kind;
        n.set_attrs(e);
        match kind {
            NodeKind::File => {
                n.size = e.size;
                n.data_id = e.data_id;
            }
            NodeKind::Symlink => n.target = e.link_target.as_str().into(),
            NodeKind::CharDev | NodeKind::BlockDev => {
                n.rdev = encode_rdev(e.dev_major, e.dev_minor)
            }
            NodeKind::Dir | NodeKind::Fifo => {}
        }
        n
    }

    fn whiteout(e: &Entry) -> BNode {
        let mut n = BNode::implicit_dir();
        n.kind = NodeKind::CharDev;
        n.whiteout = true;
        n.mode = 0;
        n.uid = e.uid;
        n.gid = e.gid;
        n.mtime = e.mtime;
        n
    }

    fn set_attrs(&mut self, e: &Entry) {
        self.mode = (e.mode & 0o7777) as u16;
        self.uid = e.uid;
        self.gid = e.gid;
        self.mtime = e.mtime;
        self.xattrs = e
            .xattrs
            .iter()
            .filter(|(k, _)| {
                !k.is_empty() && !RESERVED_XATTR_PREFIXES.iter().any(|p| k.starts_with(p))
            })
            .cloned()
            .collect();
    }

    fn is_real_dir(&self) -> bool {
        self.kind == NodeKind::Dir && !self.whiteout
    }
}

pub(crate) struct Builder {
    nodes: Vec<BNode>,
}

impl Builder {
    pub(crate) fn new() -> Builder {
        Builder {
            nodes: vec![BNode::implicit_dir()],
        }
    }

    pub(crate) fn add(&mut self, e: &Entry) -> Result<(), TreeError> {
        check_nul(e)?;
        let comps = normalise(&e.path, &e.path)?;
        let Some((&name, parents)) = comps.split_last() else {
            if e.kind != EntryKind::Dir {
                return Err(TreeError::RootNotDir {
                    path: e.path.clone(),
                });
            }
            self.nodes[ROOT].set_attrs(e);
            return Ok(());
        };
        let dir = self.ensure_dir(parents, &e.path)?;

        if name == OPAQUE_MARKER {
            self.nodes[dir].opaque = true;
            return Ok(());
        }
        if name.starts_with(AUFS_META_PREFIX) {
            return Ok(());
        }
        if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
            if hidden.is_empty() || hidden == "." || hidden == ".." {
                return Err(TreeError::BadWhiteout {
                    path: e.path.clone(),
                });
            }
            match self.nodes[dir].children.get(hidden) {
                Some(&id) if !self.nodes[id].whiteout => {} // a real entry wins
                _ => {
                    let id = self.push(BNode::whiteout(e));
                    self.nodes[dir].children.insert(hidden.into(), id);
                }
            }
            return Ok(());
        }

        let id = match e.kind {
            EntryKind::Hardlink => self.resolve_hardlink(e)?,
            EntryKind::Dir => match self.nodes[dir].children.get(name) {
                Some(&id) if self.nodes[id].is_real_dir() => {
                    self.nodes[id].set_attrs(e);
                    return Ok(());
                }
                _ => self.push(BNode::from_entry(e, NodeKind::Dir)),
            },
            EntryKind::Symlink => {
                if e.link_target.is_empty() {
                    return Err(TreeError::EmptySymlink {
                        path: e.path.clone(),
                    });
                }
                self.push(BNode::from_entry(e, NodeKind::Symlink))
            }
            EntryKind::File => self.push(BNode::from_entry(e, NodeKind::File)),
            EntryKind::CharDev => self.push(BNode::from_entry(e, NodeKind::CharDev)),
            EntryKind::BlockDev => self.push(BNode::from_entry(e, NodeKind::BlockDev)),
            EntryKind::Fifo => self.push(BNode::from_entry(e, NodeKind::Fifo)),
        };
        self.nodes[dir].children.insert(name.into(), id);
        Ok(())
    }

    fn push(&mut self, n: BNode) -> usize {
        self.nodes.push(n);
        self.nodes.len() - 1
    }

    /// Walks `parents` from the root, creating implicit directories and
    /// replacing whiteouts on the way.
    fn ensure_dir(&mut self, parents: &[&str], path: &str) -> Result<usize, TreeError> {
        let mut cur = ROOT;
        for (i, &comp) in parents.iter().enumerate() {
            if comp.starts_with(WHITEOUT_PREFIX) {
                return Err(TreeError::BadWhiteout {
                    path: path.to_owned(),
                });
            }
            cur = match self.nodes[cur].children.get(comp) {
                Some(&id) if self.nodes[id].is_real_dir() => id,
                Some(&id) if !self.nodes[id].whiteout => {
                    return Err(TreeError::NotADirectory {
                        path: path.to_owned(),
                        parent: parents[..=i].join("/"),
                    });
                }
                _ => {
                    let id = self.push(BNode::implicit_dir());
                    self.nodes[cur].children.insert(comp.into(), id);
                    id
                }
            };
        }
        Ok(cur)
    }

    fn resolve_hardlink(&self, e: &Entry) -> Result<usize, TreeError> {
        let missing = || TreeError::HardlinkMissing {
            path: e.path.clone(),
            target: e.link_target.clone(),
        };
        let comps = normalise(&e.link_target, &e.path)?;
        let mut cur = ROOT;
        for comp in comps {
            cur = *self.nodes[cur].children.get(comp).ok_or_else(missing)?;
        }
        let n = &self.nodes[cur];
        if n.whiteout {
            return Err(missing());
        }
        if n.kind == NodeKind::Dir {
            return Err(TreeError::HardlinkToDir {
                path: e.path.clone(),
                target: e.link_target.clone(),
            });
        }
        Ok(cur)
    }

    /// Compacts the reachable nodes into a [`Tree`]. Inode numbers follow a
    /// breadth-first walk from the root (ino 1); hardlinked nodes get one.
    pub(crate) fn finish(mut self) -> Result<Tree, TreeError> {
        let too_large = |what| TreeError::TooLarge {
            max: u32::MAX - 1,
            what,
        };
        // ino_of[node] is 0 until the walk reaches the node.
        let mut ino_of = vec![0u32; self.nodes.len()];
        let mut links = vec![0u32; self.nodes.len()];
        let mut order = vec![ROOT];
        ino_of[ROOT] = 1;
        let mut parent_ino = vec![1u32];
        let mut i = 0;
        while i < order.len() {
            let node = order[i];
            let my_ino = ino_of[node];
            for &child in self.nodes[node].children.values() {
                links[child] += 1;
                if ino_of[child] == 0 {
                    let ino = u32::try_from(order.len() + 1)
                        .ok()
                        .filter(|&n| n < u32::MAX)
                        .ok_or_else(|| too_large("inode"))?;
                    ino_of[child] = ino;
                    order.push(child);
                    parent_ino.push(my_ino);
                }
            }
            i += 1;
        }

        let mut t = Tree::empty();
        t.inodes.reserve_exact(order.len());
        let ndirents: usize = order.iter().map(|&n| self.nodes[n].children.len()).sum();
        t.dirents.reserve_exact(ndirents);
        for (idx, &node) in order.iter().enumerate() {
            let n = &mut self.nodes[node];
            let mut inode = Inode {
                mtime: n.mtime,
                a: 0,
                b: 0,
                uid: n.uid,
                gid: n.gid,
                nlink: links[node].max(1),
                parent: parent_ino[idx],
                xattr_start: 0,
                xattr_count: 0,
                mode: n.mode,
                kind: n.kind,
            };
            match n.kind {
                NodeKind::File => {
                    inode.a = n.size;
                    inode.b = n.data_id;
                    t.file_bytes = t.file_bytes.saturating_add(n.size);
                }
                NodeKind::Dir => {
                    inode.a = t.dirents.len() as u64;
                    inode.b = n.children.len() as u64;
                    for (name, &child) in &n.children {
                        let name_off =
                            u32::try_from(t.names.len()).map_err(|_| too_large("name arena"))?;
                        t.names.extend_from_slice(name.as_bytes());
                        t.dirents.push(Dirent {
                            name_off,
                            ino: ino_of[child],
                            name_len: name.len() as u8,
                        });
                    }
                }
                NodeKind::Symlink => {
                    inode.a = t.names.len() as u64;
                    inode.b = n.target.len() as u64;
                    t.names.extend_from_slice(n.target.as_bytes());
                }
                NodeKind::CharDev | NodeKind::BlockDev => inode.a = u64::from(n.rdev),
                NodeKind::Fifo => {}
            }
            let mut xattrs = std::mem::take(&mut n.xattrs);
            if n.opaque {
                xattrs.retain(|(k, _)| !OPAQUE_XATTRS.contains(&k.as_str()));
                xattrs.extend(OPAQUE_XATTRS.iter().map(|k| (k.to_string(), b"y".to_vec())));
            }
            if !xattrs.is_empty() {
                // Sorted, last value wins for a repeated name.
                xattrs.reverse();
                xattrs.sort_by(|a, b| a.0.cmp(&b.0));
                xattrs.dedup_by(|a, b| a.0 == b.0);
                inode.xattr_start =
                    u32::try_from(t.xattrs.len()).map_err(|_| too_large("xattr table"))?;
                inode.xattr_count =
                    u16::try_from(xattrs.len()).map_err(|_| too_large("xattr count"))?;
                for (k, v) in xattrs {
                    let name_off =
                        u32::try_from(t.xattr_arena.len()).map_err(|_| too_large("xattr arena"))?;
                    t.xattr_arena.extend_from_slice(k.as_bytes());
                    t.xattr_arena.extend_from_slice(&v);
                    t.xattrs.push(XattrRef {
                        off: name_off,
                        name_len: u32::try_from(k.len()).map_err(|_| too_large("xattr"))?,
                        value_len: u32::try_from(v.len()).map_err(|_| too_large("xattr"))?,
                    });
                }
            }
            n.children = BTreeMap::new();
            t.inodes.push(inode);
        }
        // Directory link counts: 2 + subdirectories (a dir is reached once).
        for idx in 0..t.inodes.len() {
            if t.inodes[idx].kind == NodeKind::Dir {
                let (start, count) = (t.inodes[idx].a as usize, t.inodes[idx].b as usize);
                let subdirs = t.dirents[start..start + count]
                    .iter()
                    .filter(|d| t.inodes[d.ino as usize - 1].kind == NodeKind::Dir)
                    .count();
                t.inodes[idx].nlink = 2 + subdirs as u32;
            }
        }
        t.shrink();
        Ok(t)
    }
}

fn check_nul(e: &Entry) -> Result<(), TreeError> {
    let nul = |field| TreeError::Nul {
        path: e.path.clone(),
        field,
    };
    if e.link_target.contains('\0') {
        return Err(nul("link target"));
    }
    if e.xattrs.iter().any(|(k, _)| k.contains('\0')) {
        return Err(nul("xattr name"));
    }
    Ok(())
}
