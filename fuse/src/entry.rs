//! The format-neutral TOC entry, the errors of [`Tree::build`](crate::Tree::build),
//! and path normalisation.
//!
//! Invariants kept here: a normalised path is a list of components, none of
//! them empty, `.`, `..`, longer than [`NAME_MAX`] bytes, or containing `/` or
//! NUL. `..` is resolved lexically and may never climb above the layer root.

use thiserror::Error;

/// Longest file name component the kernel accepts (Linux `NAME_MAX`).
pub const NAME_MAX: usize = 255;

/// One TOC entry, format-neutral. The snapshotter converts eStargz,
/// zstd:chunked and Shoal TOCs into these.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Entry {
    /// Path as in the tar: `a/b/c`, optionally starting with `./` or `/`.
    pub path: String,
    pub kind: EntryKind,
    /// Permission bits including setuid, setgid and sticky (`0o7777`); any
    /// file-type bits are ignored.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
    /// Size in bytes (regular files only).
    pub size: u64,
    /// Symlink target (verbatim), or for [`EntryKind::Hardlink`] the path of
    /// the entry it links to (normalised like `path`).
    pub link_target: String,
    pub dev_major: u32,
    pub dev_minor: u32,
    /// Extended attributes. `trusted.overlay.*` and `user.overlay.*` are
    /// dropped: only OCI whiteout markers may steer overlayfs.
    pub xattrs: Vec<(String, Vec<u8>)>,
    /// Opaque handle passed back to [`ChunkSource::read`](crate::ChunkSource::read)
    /// for regular files.
    pub data_id: u64,
}

/// What a TOC entry is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum EntryKind {
    #[default]
    File,
    Dir,
    Symlink,
    Hardlink,
    CharDev,
    BlockDev,
    Fifo,
}

/// Why a TOC cannot be served. Every variant names the offending entry path.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum TreeError {
    #[error("entry {path:?}: path escapes the layer root")]
    Escapes { path: String },
    #[error("entry {path:?}: NUL byte in {field}")]
    Nul { path: String, field: &'static str },
    #[error("entry {path:?}: name component longer than {NAME_MAX} bytes")]
    NameTooLong { path: String },
    #[error("entry {path:?}: parent {parent:?} is not a directory")]
    NotADirectory { path: String, parent: String },
    #[error("entry {path:?}: hardlink target {target:?} does not exist")]
    HardlinkMissing { path: String, target: String },
    #[error("entry {path:?}: hardlink target {target:?} is a directory")]
    HardlinkToDir { path: String, target: String },
    #[error("entry {path:?}: the layer root must be a directory")]
    RootNotDir { path: String },
    #[error("entry {path:?}: invalid whiteout")]
    BadWhiteout { path: String },
    #[error("entry {path:?}: symlink with an empty target")]
    EmptySymlink { path: String },
    #[error("layer has more than {max} inodes or {what} bytes overflow")]
    TooLarge { max: u32, what: &'static str },
}

/// Splits `path` into components, resolving `.` and non-escaping `..`.
/// An empty result names the layer root.
pub(crate) fn normalise<'a>(path: &'a str, entry: &str) -> Result<Vec<&'a str>, TreeError> {
    if path.contains('\0') {
        return Err(TreeError::Nul {
            path: entry.to_owned(),
            field: "path",
        });
    }
    let mut out: Vec<&str> = Vec::new();
    for comp in path.split('/') {
        match comp {
            "" | "." => {}
            ".." => {
                if out.pop().is_none() {
                    return Err(TreeError::Escapes {
                        path: entry.to_owned(),
                    });
                }
            }
            c if c.len() > NAME_MAX => {
                return Err(TreeError::NameTooLong {
                    path: entry.to_owned(),
                });
            }
            c => out.push(c),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(p: &str) -> Result<Vec<&str>, TreeError> {
        normalise(p, p)
    }

    #[test]
    fn normalises_prefixes_and_dots() {
        assert_eq!(n("./a/b").unwrap(), ["a", "b"]);
        assert_eq!(n("/a//b/").unwrap(), ["a", "b"]);
        assert_eq!(n("a/./b/../c").unwrap(), ["a", "c"]);
        assert!(n("./").unwrap().is_empty());
        assert!(n("").unwrap().is_empty());
    }

    #[test]
    fn rejects_escapes_nul_and_long_names() {
        assert!(matches!(n("../x"), Err(TreeError::Escapes { .. })));
        assert!(matches!(n("/../x"), Err(TreeError::Escapes { .. })));
        assert!(matches!(n("a/../../x"), Err(TreeError::Escapes { .. })));
        assert!(matches!(n("a\0b"), Err(TreeError::Nul { .. })));
        let long = "x".repeat(NAME_MAX + 1);
        assert!(matches!(n(&long), Err(TreeError::NameTooLong { .. })));
        assert_eq!(n(&"y".repeat(NAME_MAX)).unwrap().len(), 1);
    }

    #[test]
    fn error_names_the_entry() {
        let e = n("../etc/passwd").unwrap_err();
        assert_eq!(
            e.to_string(),
            "entry \"../etc/passwd\": path escapes the layer root"
        );
    }
}
