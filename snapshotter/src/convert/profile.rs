//! Startup profiles in `shoal convert`: which files of a layer go first.
//!
//! A profile file is JSON, `{"version": 1, "paths": ["usr/bin/python3.11",
//! ...]}`: the image's files in the order a container first read them
//! (image-wide; a leading `/` is ignored). For each layer, the startup set is
//! the profile's paths that the layer holds as non-empty regular files, in
//! profile order. Paths a layer doesn't hold are ignored, so a stale profile
//! means less prefetch, never an error.
//!
//! Invariants: moving an entry forward never changes what unpacking the
//! layer produces. So a file is left in place when the same layer has a
//! whiteout for it or an opaque-directory marker above it (a whiteout
//! unpacked after the file would delete it), and hardlinks are never moved
//! (their target must come first; moving the target forward is safe), and
//! a name with several entries in the layer stays where it is.

use std::collections::HashSet;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::tarstream::{clean, Item, TarStream};

/// Largest profile file read.
pub const MAX_PROFILE_BYTES: u64 = 64 << 20;

/// A startup profile.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Profile {
    /// Format version (1).
    pub version: u32,
    /// Image the profile was recorded on, if known (informational).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub image: String,
    /// Files in first-read order, relative to the image root.
    pub paths: Vec<String>,
}

impl Profile {
    /// Reads a profile file.
    ///
    /// # Errors
    /// Unreadable, too large, not JSON of this shape, or an unknown version.
    pub fn load(path: &Path) -> Result<Profile, String> {
        let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut b = Vec::new();
        f.take(MAX_PROFILE_BYTES + 1)
            .read_to_end(&mut b)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if b.len() as u64 > MAX_PROFILE_BYTES {
            return Err(format!(
                "{}: larger than {MAX_PROFILE_BYTES} bytes",
                path.display()
            ));
        }
        let p: Profile =
            serde_json::from_slice(&b).map_err(|e| format!("{}: {e}", path.display()))?;
        if p.version != 1 {
            return Err(format!(
                "{}: profile version {} (expected 1)",
                path.display(),
                p.version
            ));
        }
        Ok(p)
    }

    /// The paths, cleaned; paths that cannot be in a layer are dropped.
    fn cleaned(&self) -> Vec<String> {
        self.paths
            .iter()
            .filter_map(|p| clean(p.trim_start_matches('/')).ok())
            .filter(|p| !p.is_empty())
            .collect()
    }
}

/// One tar entry's place in the uncompressed layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// Offset of its first header block.
    pub start: u64,
    /// Offset just past its padding.
    pub end: u64,
}

/// Where the startup entries of a layer are, in profile order.
#[derive(Debug, Default)]
pub struct Plan {
    /// Startup entries in the order to write them.
    pub startup: Vec<Region>,
    /// Starts of the same entries, to skip them in the second pass.
    pub moved: HashSet<u64>,
}

struct Counting<R> {
    r: R,
    n: u64,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        let k = self.r.read(b)?;
        self.n += k as u64;
        Ok(k)
    }
}

/// Reads the uncompressed tar in `file` once and picks its startup entries.
///
/// # Errors
/// A malformed tar (with the reason).
pub fn plan<F: Read + Seek>(file: &mut F, profile: &Profile) -> Result<Plan, String> {
    file.seek(SeekFrom::Start(0)).map_err(|e| e.to_string())?;
    let mut tar = TarStream::new(Counting {
        r: std::io::BufReader::with_capacity(1 << 20, &mut *file),
        n: 0,
    });
    // name -> region of its last regular, non-empty entry.
    let mut regular: std::collections::HashMap<String, Region> = std::collections::HashMap::new();
    let mut whiteouts: HashSet<String> = HashSet::new();
    let mut opaque: HashSet<String> = HashSet::new();
    // Names with more than one entry: moving the last one ahead of the
    // others would let them overwrite it.
    let mut seen: HashSet<String> = HashSet::new();
    let mut dups: HashSet<String> = HashSet::new();
    let mut skip = vec![0u8; 1 << 16];
    loop {
        let start = tar.get_ref().n;
        match tar.next_item().map_err(|e| e.to_string())? {
            Item::End(_) => break,
            Item::Entry { entry, .. } => {
                while tar.read_data(&mut skip).map_err(|e| e.to_string())? > 0 {}
                tar.padding(entry.size).map_err(|e| e.to_string())?;
                let end = tar.get_ref().n;
                if !seen.insert(entry.name.clone()) {
                    dups.insert(entry.name.clone());
                }
                let (dir, base) = match entry.name.rsplit_once('/') {
                    Some((d, b)) => (d.to_string(), b),
                    None => (String::new(), entry.name.as_str()),
                };
                if base == ".wh..wh..opq" {
                    opaque.insert(dir);
                } else if let Some(target) = base.strip_prefix(".wh.") {
                    whiteouts.insert(if dir.is_empty() {
                        target.to_string()
                    } else {
                        format!("{dir}/{target}")
                    });
                } else if matches!(entry.typeflag, b'0' | b'7') && entry.size > 0 {
                    regular.insert(entry.name.clone(), Region { start, end });
                } else {
                    regular.remove(&entry.name);
                }
            }
        }
    }
    let shadowed = |p: &str| {
        whiteouts.contains(p)
            || dups.contains(p)
            || opaque.contains("")
            || p.match_indices('/').any(|(i, _)| opaque.contains(&p[..i]))
    };
    let mut out = Plan::default();
    for p in profile.cleaned() {
        if let Some(r) = regular.get(&p) {
            if !shadowed(&p) && out.moved.insert(r.start) {
                out.startup.push(*r);
            }
        }
    }
    Ok(out)
}
