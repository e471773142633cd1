//! The real proof: two FUSE layers as overlayfs lowerdirs. The upper FUSE
//! layer deletes a lower file with a whiteout and makes a directory opaque;
//! the merged view must look like the two tar layers applied in order.

mod common;

use std::ffi::CString;
use std::fs;
use std::io::ErrorKind;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use common::*;
use shoal_fuse::test_util::MemSource;
use shoal_fuse::{EntryKind, Tree};

/// An overlayfs mount that is unmounted on drop (also when a test fails).
/// Declared before the FUSE guards in each test so it drops first.
struct OverlayGuard {
    target: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for OverlayGuard {
    fn drop(&mut self) {
        let c = CString::new(self.target.as_os_str().as_bytes()).unwrap();
        // SAFETY: valid path; we only unmount what this guard mounted.
        if unsafe { libc::umount2(c.as_ptr(), 0) } != 0 {
            // SAFETY: as above; lazily, so the FUSE layers below can go.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// Mounts overlayfs with `lowers` (top first) and, if `writable`, an upper
/// and work dir inside a fresh temp dir.
fn overlay(lowers: &[&Path], writable: bool) -> OverlayGuard {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("merged");
    fs::create_dir(&target).unwrap();
    let lowerdir: Vec<String> = lowers.iter().map(|p| p.display().to_string()).collect();
    let mut data = format!("lowerdir={}", lowerdir.join(":"));
    if writable {
        let (upper, work) = (dir.path().join("upper"), dir.path().join("work"));
        fs::create_dir(&upper).unwrap();
        fs::create_dir(&work).unwrap();
        data += &format!(",upperdir={},workdir={}", upper.display(), work.display());
    }
    let (src, fstype) = (
        CString::new("overlay").unwrap(),
        CString::new("overlay").unwrap(),
    );
    let (tgt, cdata) = (
        CString::new(target.as_os_str().as_bytes()).unwrap(),
        CString::new(data.clone()).unwrap(),
    );
    // SAFETY: valid C strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            tgt.as_ptr(),
            fstype.as_ptr(),
            0,
            cdata.as_ptr().cast(),
        )
    };
    assert_eq!(
        rc,
        0,
        "mount overlay {data}: {}",
        std::io::Error::last_os_error()
    );
    OverlayGuard { target, _dir: dir }
}

fn lower_layer() -> (Tree, MemSource) {
    let tree = Tree::build([
        dir("etc", 0o755),
        file("etc/passwd", 0o644, 6, 1),
        file("etc/hosts", 0o644, 6, 2),
        dir("app", 0o755),
        file("app/old.py", 0o644, 3, 3),
        dir("app/lib", 0o755),
        file("app/lib/x.so", 0o755, 3, 4),
        dir("keep", 0o755),
        file("keep/k", 0o600, 1, 5),
        file("gone-dir/inner", 0o644, 1, 6),
    ])
    .unwrap();
    let mut src = MemSource::new();
    src.insert(1, b"lower\n".to_vec())
        .insert(2, b"hosts\n".to_vec())
        .insert(3, b"old".to_vec())
        .insert(4, b"elf".to_vec())
        .insert(5, b"k".to_vec())
        .insert(6, b"i".to_vec());
    (tree, src)
}

fn upper_layer() -> (Tree, MemSource) {
    // Whiteouts both before and after their siblings in the TOC.
    let tree = Tree::build([
        file("etc/.wh.passwd", 0, 0, 0),
        file("etc/motd", 0o644, 3, 1),
        file("app/new.py", 0o644, 3, 2),
        file("app/.wh..wh..opq", 0, 0, 0),
        file(".wh.gone-dir", 0, 0, 0),
        link("etc/hosts2", EntryKind::Symlink, "hosts"),
    ])
    .unwrap();
    let mut src = MemSource::new();
    src.insert(1, b"hi\n".to_vec()).insert(2, b"new".to_vec());
    (tree, src)
}

fn sorted_names(p: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(p)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

fn check_merged(merged: &Path) {
    // the whiteout deletes the lower file, the sibling stays
    assert_eq!(
        fs::metadata(merged.join("etc/passwd")).unwrap_err().kind(),
        ErrorKind::NotFound
    );
    assert_eq!(
        sorted_names(&merged.join("etc")),
        ["hosts", "hosts2", "motd"]
    );
    assert_eq!(fs::read(merged.join("etc/hosts")).unwrap(), b"hosts\n");
    assert_eq!(fs::read(merged.join("etc/hosts2")).unwrap(), b"hosts\n");
    assert_eq!(fs::read(merged.join("etc/motd")).unwrap(), b"hi\n");
    // the opaque dir hides everything below it
    assert_eq!(sorted_names(&merged.join("app")), ["new.py"]);
    assert!(fs::metadata(merged.join("app/old.py")).is_err());
    assert!(fs::metadata(merged.join("app/lib/x.so")).is_err());
    // a whole directory whited out
    assert!(fs::metadata(merged.join("gone-dir")).is_err());
    // untouched lower content
    let k = fs::metadata(merged.join("keep/k")).unwrap();
    assert_eq!(k.mode() & 0o7777, 0o600);
    assert_eq!(fs::read(merged.join("keep/k")).unwrap(), b"k");
    assert_eq!(sorted_names(merged), ["app", "etc", "keep"]);
    // overlayfs must not leak the whiteout or opaque markers
    assert!(fs::metadata(merged.join("etc/.wh.passwd")).is_err());
    assert!(getxattr(&merged.join("app"), "trusted.overlay.opaque").is_err());
}

#[test]
fn overlay_of_two_fuse_layers_applies_whiteouts_and_opaque_dirs() {
    if !fuse_available() {
        return;
    }
    let (lt, ls) = lower_layer();
    let lower = mount_tree(lt, ls, "shoal:sha256:lower");
    let (ut, us) = upper_layer();
    let upper = mount_tree(ut, us, "shoal:sha256:upper");
    let ovl = overlay(&[upper.path(), lower.path()], false);
    check_merged(&ovl.target);
    drop(ovl);
    drop(upper);
    drop(lower);
}

#[test]
fn container_rootfs_over_fuse_layers_is_writable_above_them() {
    if !fuse_available() {
        return;
    }
    let (lt, ls) = lower_layer();
    let lower = mount_tree(lt, ls, "shoal:sha256:lower2");
    let (ut, us) = upper_layer();
    let upper = mount_tree(ut, us, "shoal:sha256:upper2");
    let ovl = overlay(&[upper.path(), lower.path()], true);
    let m = &ovl.target;
    check_merged(m);
    // a container writes, copies up, deletes and recreates over FUSE layers
    fs::write(m.join("etc/passwd"), b"recreated\n").unwrap();
    assert_eq!(fs::read(m.join("etc/passwd")).unwrap(), b"recreated\n");
    fs::write(m.join("keep/k"), b"copied-up").unwrap();
    assert_eq!(fs::read(m.join("keep/k")).unwrap(), b"copied-up");
    fs::remove_file(m.join("etc/hosts")).unwrap();
    assert!(fs::metadata(m.join("etc/hosts")).is_err());
    fs::create_dir(m.join("app/lib")).unwrap();
    assert!(sorted_names(&m.join("app/lib")).is_empty());
    // the FUSE layers themselves are unchanged
    assert_eq!(fs::read(lower.join("keep/k")).unwrap(), b"k");
    assert_eq!(fs::read(lower.join("etc/hosts")).unwrap(), b"hosts\n");
    drop(ovl);
    drop(upper);
    drop(lower);
}

#[test]
fn busy_layer_is_detached_lazily() {
    if !fuse_available() {
        return;
    }
    let (lt, ls) = lower_layer();
    let mut lower = mount_tree(lt, ls, "shoal:sha256:busy");
    let (ut, us) = upper_layer();
    let upper = mount_tree(ut, us, "shoal:sha256:busy-upper");
    let ovl = overlay(&[upper.path(), lower.path()], false);
    // The overlay pins the lower layer: unmount detaches it lazily and the
    // overlay keeps reading through it.
    lower.mounted.take().unwrap().unmount().unwrap();
    assert!(mount_source(lower.path()).is_none());
    assert_eq!(fs::read(ovl.target.join("keep/k")).unwrap(), b"k");
    drop(ovl);
    drop(upper);
}
