//! Kernel passthrough on a real FUSE mount: a file with a backing file is
//! read by the kernel without a single `read` reaching the source, the
//! inode's mode is logged, and a handler that panics (here `open`, through
//! `ChunkSource::backing`) fails only that request: the vendored fuser's
//! worker loop catches it (fuse/vendor/fuser/PATCHES.md).

mod common;

use std::fs;
use std::sync::Arc;

use common::*;
use shoal_fuse::test_util::{Behaviour, MemSource};
use shoal_fuse::{MountOptions, Tree};

#[test]
fn passthrough_reads_skip_the_source_and_a_panicking_open_is_one_eio() {
    if !fuse_available() {
        return;
    }
    let state = tempfile::tempdir().unwrap();
    let data = pattern(3 << 20, 11);
    let backing = state.path().join("object");
    fs::write(&backing, &data).unwrap();
    let tree = Tree::build([
        file("pt", 0o644, data.len() as u64, 1),
        file("boom", 0o644, 4, 2),
        file("plain", 0o644, 5, 3),
    ])
    .unwrap();
    let mut src = MemSource::new();
    src.insert_with(1, data.clone(), Behaviour::Backing(backing))
        .insert_with(2, b"nope".to_vec(), Behaviour::PanicOnOpen)
        .insert(3, b"plain".to_vec());
    let src = Arc::new(src);
    let log = state.path().join("iomodes");
    let m = mount_tree_with(
        tree,
        src.clone(),
        MountOptions {
            fsname: "shoal-pt".into(),
            passthrough: true,
            iomode_log: Some(log.clone()),
            ..MountOptions::default()
        },
    );
    assert_eq!(fs::read(m.join("pt")).unwrap(), data);
    assert_eq!(
        src.reads(),
        0,
        "a passthrough file was read through the source"
    );
    assert_eq!(m.mounted().stats().passthrough_opens, 1);
    // The panicking open: EIO for that open only; the mount serves on.
    let err = fs::read(m.join("boom")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert_eq!(fs::read(m.join("plain")).unwrap(), b"plain");
    assert!(src.reads() >= 1);
    assert_eq!(fs::read(m.join("pt")).unwrap(), data);
    let text = fs::read_to_string(&log).unwrap();
    assert!(text.starts_with("passthrough 1\n"), "{text}");
    assert_eq!(
        text.lines().filter(|l| l.starts_with("P ")).count(),
        1,
        "{text}"
    );
    assert_eq!(
        text.lines().filter(|l| l.starts_with("C ")).count(),
        1,
        "{text}"
    );
}

#[test]
fn a_file_goes_passthrough_once_its_page_cache_opens_are_released() {
    if !fuse_available() {
        return;
    }
    let state = tempfile::tempdir().unwrap();
    let data = pattern(2 << 20, 12);
    let backing = state.path().join("object");
    let tree = Tree::build([file("late", 0o644, data.len() as u64, 1)]).unwrap();
    let mut src = MemSource::new();
    // The backing file does not exist yet: the file is not all local.
    src.insert_with(1, data.clone(), Behaviour::Backing(backing.clone()));
    let src = Arc::new(src);
    let m = mount_tree_with(
        tree,
        src.clone(),
        MountOptions {
            fsname: "shoal-pt-late".into(),
            passthrough: true,
            iomode_log: Some(state.path().join("iomodes")),
            ..MountOptions::default()
        },
    );
    // An open that stays alive across the moment the file becomes local.
    let held = fs::File::open(m.join("late")).unwrap();
    assert_eq!(fs::read(m.join("late")).unwrap(), data);
    assert!(src.reads() > 0);
    fs::write(&backing, &data).unwrap();
    // Still cached while `held` is open (mixing modes would fail opens).
    assert_eq!(fs::read(m.join("late")).unwrap(), data);
    assert_eq!(m.mounted().stats().passthrough_opens, 0);
    drop(held);
    // Releases reach the daemon asynchronously; the next open after the
    // last one is released is answered with passthrough.
    let mut tries = 0;
    while m.mounted().stats().passthrough_opens == 0 && tries < 100 {
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(fs::read(m.join("late")).unwrap(), data);
        tries += 1;
    }
    assert_eq!(
        m.mounted().stats().passthrough_opens,
        1,
        "after {tries} tries"
    );
    let reads = src.reads();
    assert_eq!(fs::read(m.join("late")).unwrap(), data);
    assert_eq!(src.reads(), reads, "passthrough reads reached the source");
}

#[test]
fn a_slow_first_check_of_a_backing_file_holds_up_only_its_own_open() {
    if !fuse_available() {
        return;
    }
    let state = tempfile::tempdir().unwrap();
    let data = pattern(2 << 20, 13);
    let backing = state.path().join("object");
    fs::write(&backing, &data).unwrap();
    let tree = Tree::build([
        file("slow", 0o644, data.len() as u64, 1),
        file("other", 0o644, 5, 2),
    ])
    .unwrap();
    let gate = Arc::new(shoal_fuse::test_util::Gate::default());
    let mut src = MemSource::new();
    src.insert_with(
        1,
        data.clone(),
        Behaviour::SlowBacking(backing, gate.clone()),
    )
    .insert(2, b"other".to_vec());
    let m = mount_tree_with(
        tree,
        Arc::new(src),
        MountOptions {
            fsname: "shoal-pt-slow".into(),
            passthrough: true,
            threads: 2,
            iomode_log: Some(state.path().join("iomodes")),
            ..MountOptions::default()
        },
    );
    let slow = {
        let p = m.join("slow");
        std::thread::spawn(move || fs::read(p))
    };
    for _ in 0..2000 {
        if gate.arrived.load(std::sync::atomic::Ordering::SeqCst) > 0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    if gate.arrived.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        gate.open();
        panic!("the open never asked the source to prepare its backing file");
    }
    // The slow open waits at the gate; another file opens and reads meanwhile
    // (the check runs outside the mount's open-decision lock).
    let (tx, rx) = std::sync::mpsc::channel();
    let other = m.join("other");
    std::thread::spawn(move || tx.send(fs::read(other)));
    let got = rx.recv_timeout(std::time::Duration::from_secs(10));
    gate.open();
    assert_eq!(
        got.expect("an open waited for another file's backing check")
            .unwrap(),
        b"other"
    );
    assert_eq!(slow.join().unwrap().unwrap(), data);
    assert_eq!(m.mounted().stats().passthrough_opens, 1);
}
