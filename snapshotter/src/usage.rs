//! Disk usage of a directory tree, counted the way containerd counts it
//! (continuity `fs.DiskUsage`): allocated 512-byte blocks, each inode once, so
//! hardlinks are not counted twice. Symlinks are not followed.

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::metadata::Usage;

/// Walks `root` and sums the blocks of every distinct inode under it.
///
/// # Errors
/// Any I/O error while walking, with the path.
pub fn disk_usage(root: &Path) -> Result<Usage> {
    let mut seen = HashSet::new();
    let mut size: i64 = 0;
    let mut stack: Vec<PathBuf> = vec![root.to_owned()];
    while let Some(path) = stack.pop() {
        let md = fs::symlink_metadata(&path)
            .map_err(|e| Error::io(format!("stat {}", path.display()), e))?;
        if seen.insert((md.dev(), md.ino())) {
            size = size.saturating_add(i64::try_from(md.blocks()).unwrap_or(i64::MAX) * 512);
        }
        if md.is_dir() {
            let entries = fs::read_dir(&path)
                .map_err(|e| Error::io(format!("read directory {}", path.display()), e))?;
            for entry in entries {
                let entry = entry
                    .map_err(|e| Error::io(format!("read directory {}", path.display()), e))?;
                stack.push(entry.path());
            }
        }
    }
    Ok(Usage {
        size,
        inodes: i64::try_from(seen.len()).unwrap_or(i64::MAX),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_hardlinks_once() {
        let dir = tempfile::tempdir().unwrap();
        let base = disk_usage(dir.path()).unwrap();
        assert_eq!(base.inodes, 1);
        fs::write(dir.path().join("a"), vec![7u8; 64 * 1024]).unwrap();
        fs::hard_link(dir.path().join("a"), dir.path().join("b")).unwrap();
        std::os::unix::fs::symlink("a", dir.path().join("c")).unwrap();
        let u = disk_usage(dir.path()).unwrap();
        assert_eq!(u.inodes, 3, "dir, file (twice linked), symlink");
        assert!(u.size >= base.size + 64 * 1024, "{u:?}");
    }
}
