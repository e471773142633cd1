//! Shared helpers for the mount tests: entry constructors, a mount guard that
//! always unmounts (also when a test fails), and thin libc wrappers for what
//! std does not expose (xattrs, statvfs, readdir with `.` and `..`).
#![allow(dead_code)]

use std::ffi::{CStr, CString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use shoal_fuse::test_util::MemSource;
use shoal_fuse::{mount, Entry, EntryKind, MountOptions, Mounted, Tree};

/// Set to `1` (as `make test` does), a test that cannot mount FUSE fails
/// instead of skipping.
pub const REQUIRE_FUSE: &str = "SHOAL_REQUIRE_FUSE";

/// FUSE mounts need root and /dev/fuse; say so and skip otherwise, or panic
/// under `SHOAL_REQUIRE_FUSE=1`.
pub fn fuse_available() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let ok = root && Path::new("/dev/fuse").exists();
    if !ok {
        assert!(
            std::env::var_os(REQUIRE_FUSE).is_none_or(|v| v != "1"),
            "{REQUIRE_FUSE}=1 but this test cannot mount FUSE: needs root and /dev/fuse"
        );
        eprintln!("skipping: needs root and /dev/fuse (set {REQUIRE_FUSE}=1 to fail instead)");
    }
    ok
}

pub fn dir(path: &str, mode: u32) -> Entry {
    Entry {
        path: path.into(),
        kind: EntryKind::Dir,
        mode,
        ..Entry::default()
    }
}

pub fn file(path: &str, mode: u32, size: u64, data_id: u64) -> Entry {
    Entry {
        path: path.into(),
        kind: EntryKind::File,
        mode,
        size,
        data_id,
        ..Entry::default()
    }
}

pub fn link(path: &str, kind: EntryKind, target: &str) -> Entry {
    Entry {
        path: path.into(),
        kind,
        mode: 0o777,
        link_target: target.into(),
        ..Entry::default()
    }
}

/// Deterministic pseudo-random bytes (xorshift), so content bugs show up.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A FUSE mount on its own temp dir. Field order matters: the mount is
/// dropped (unmounted) before the directory is removed.
pub struct MountGuard {
    pub mounted: Option<Mounted>,
    dir: tempfile::TempDir,
}

impl MountGuard {
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn join(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    pub fn mounted(&self) -> &Mounted {
        self.mounted.as_ref().unwrap()
    }
}

pub fn mount_tree(tree: Tree, source: MemSource, fsname: &str) -> MountGuard {
    let opts = MountOptions {
        fsname: fsname.into(),
        ..MountOptions::default()
    };
    mount_tree_with(tree, Arc::new(source), opts)
}

/// [`mount_tree`] with options and a shared source.
pub fn mount_tree_with(tree: Tree, source: Arc<MemSource>, opts: MountOptions) -> MountGuard {
    let dir = tempfile::tempdir().unwrap();
    let mounted = mount(tree, source, dir.path(), opts).expect("mount");
    MountGuard {
        mounted: Some(mounted),
        dir,
    }
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

/// `lgetxattr`, with the size-probe call first as real callers do.
pub fn getxattr(p: &Path, name: &str) -> io::Result<Vec<u8>> {
    let (cp, cn) = (cpath(p), CString::new(name).unwrap());
    // SAFETY: valid C strings; a null buffer with size 0 asks for the size.
    let n = unsafe { libc::lgetxattr(cp.as_ptr(), cn.as_ptr(), std::ptr::null_mut(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; n as usize];
    // SAFETY: buf has buf.len() writable bytes.
    let m =
        unsafe { libc::lgetxattr(cp.as_ptr(), cn.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if m < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(m as usize);
    Ok(buf)
}

/// `lgetxattr` into a buffer of exactly `size` bytes.
pub fn getxattr_sized(p: &Path, name: &str, size: usize) -> io::Result<usize> {
    let (cp, cn) = (cpath(p), CString::new(name).unwrap());
    let mut buf = vec![0u8; size];
    // SAFETY: buf has `size` writable bytes.
    let n = unsafe { libc::lgetxattr(cp.as_ptr(), cn.as_ptr(), buf.as_mut_ptr().cast(), size) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// `llistxattr`, size probe first; returns the names.
pub fn listxattr(p: &Path) -> io::Result<Vec<String>> {
    let cp = cpath(p);
    // SAFETY: null buffer with size 0 asks for the size.
    let n = unsafe { libc::llistxattr(cp.as_ptr(), std::ptr::null_mut(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; n as usize];
    // SAFETY: buf has buf.len() writable bytes.
    let m = unsafe { libc::llistxattr(cp.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if m < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(m as usize);
    Ok(buf
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8(s.to_vec()).unwrap())
        .collect())
}

pub fn statvfs(p: &Path) -> libc::statvfs {
    let cp = cpath(p);
    // SAFETY: zeroed statvfs is a valid out-parameter.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and out-pointer.
    assert_eq!(unsafe { libc::statvfs(cp.as_ptr(), &mut st) }, 0);
    st
}

/// All directory entries including `.` and `..`, as `(name, d_ino)`.
pub fn readdir_all(p: &Path) -> Vec<(String, u64)> {
    let cp = cpath(p);
    // SAFETY: valid path; the stream is closed below.
    let d = unsafe { libc::opendir(cp.as_ptr()) };
    assert!(!d.is_null(), "opendir {}", p.display());
    let mut out = Vec::new();
    loop {
        // SAFETY: d is an open stream.
        let e = unsafe { libc::readdir(d) };
        if e.is_null() {
            break;
        }
        // SAFETY: readdir returned a valid dirent with a NUL-terminated name.
        let (name, ino) = unsafe { (CStr::from_ptr((*e).d_name.as_ptr()), (*e).d_ino) };
        out.push((name.to_string_lossy().into_owned(), ino));
    }
    // SAFETY: d is open and not used afterwards.
    unsafe { libc::closedir(d) };
    out
}

/// The mount source of `mountpoint` in /proc/self/mountinfo, if mounted.
pub fn mount_source(mountpoint: &Path) -> Option<(String, String)> {
    let mp = mountpoint.canonicalize().ok()?;
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        let sep = f.iter().position(|&x| x == "-")?;
        (Path::new(f[4]) == mp).then(|| (f[sep + 1].to_owned(), f[sep + 2].to_owned()))
    })
}
