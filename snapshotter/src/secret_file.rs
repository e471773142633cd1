//! Writing a small file that must appear whole or not at all, with a mode
//! set from its creation (keys, credentials): a temp file beside it, created
//! with `mode`, written, fsynced, then renamed over the target.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

/// Writes `data` to `path` atomically with `mode`. On failure, returns the
/// path the error is about (the temp file or the target) with the error.
///
/// # Errors
/// The failing path and the IO error.
pub fn write(path: &Path, data: &[u8], mode: u32) -> Result<(), (PathBuf, std::io::Error)> {
    let name = path
        .file_name()
        .map_or_else(Default::default, |n| n.to_string_lossy());
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let at = |p: &Path| {
        let p = p.to_owned();
        move |e| (p, e)
    };
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(at(&tmp))?;
    f.write_all(data).map_err(at(&tmp))?;
    f.sync_all().map_err(at(&tmp))?;
    std::fs::rename(&tmp, path).map_err(at(path))
}
