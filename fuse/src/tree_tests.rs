//! Unit tests of [`Tree::build`]: normalisation, tar semantics, whiteouts,
//! hardlinks, and the memory bound.

use super::*;
use crate::entry::EntryKind;

fn dir(path: &str) -> Entry {
    Entry {
        path: path.into(),
        kind: EntryKind::Dir,
        mode: 0o755,
        ..Entry::default()
    }
}

fn file(path: &str, size: u64, data_id: u64) -> Entry {
    Entry {
        path: path.into(),
        kind: EntryKind::File,
        mode: 0o644,
        size,
        data_id,
        ..Entry::default()
    }
}

fn link(path: &str, kind: EntryKind, target: &str) -> Entry {
    Entry {
        path: path.into(),
        kind,
        mode: 0o777,
        link_target: target.into(),
        ..Entry::default()
    }
}

fn names(t: &Tree, path: &str) -> Vec<String> {
    t.lookup_path(path)
        .unwrap()
        .children()
        .map(|(n, _, _)| String::from_utf8(n.to_vec()).unwrap())
        .collect()
}

#[test]
fn normalises_paths_and_creates_implicit_parents() {
    let t = Tree::build([
        file("./a/b/c.txt", 3, 1),
        file("/a/d", 0, 2),
        file("e/./f/../g", 1, 3),
    ])
    .unwrap();
    assert_eq!(names(&t, ""), ["a", "e"]);
    assert_eq!(names(&t, "a"), ["b", "d"]);
    // `..` is resolved lexically: `f` is never created
    assert_eq!(names(&t, "e"), ["g"]);
    let b = t.lookup_path("a/b").unwrap();
    assert_eq!(
        (b.kind(), b.mode(), b.uid(), b.gid()),
        (NodeKind::Dir, 0o755, 0, 0)
    );
    assert_eq!(t.lookup_path("a/b/c.txt").unwrap().size(), 3);
    assert_eq!(t.lookup_path("a/b/c.txt").unwrap().data_id(), Some(1));
    // root, a, a/b, c.txt, d, e, g
    assert_eq!(t.len(), 7);
}

#[test]
fn rejects_escapes_with_the_entry_named() {
    for p in ["../x", "/../x", "a/../../x", "./../etc/passwd"] {
        let err = Tree::build([file(p, 0, 0)]).unwrap_err();
        assert_eq!(err, TreeError::Escapes { path: p.into() }, "{p}");
        assert!(err.to_string().contains(p));
    }
    let err = Tree::build([file("ok", 0, 0), link("l", EntryKind::Hardlink, "../ok")]).unwrap_err();
    assert_eq!(err, TreeError::Escapes { path: "l".into() });
}

#[test]
fn rejects_nul_bytes() {
    let e = Tree::build([file("a\0b", 0, 0)]).unwrap_err();
    assert!(matches!(e, TreeError::Nul { field: "path", .. }));
    let e = Tree::build([link("s", EntryKind::Symlink, "x\0y")]).unwrap_err();
    assert!(matches!(
        e,
        TreeError::Nul {
            field: "link target",
            ..
        }
    ));
    let mut f = file("f", 0, 0);
    f.xattrs.push(("user.a\0".into(), b"v".to_vec()));
    let e = Tree::build([f]).unwrap_err();
    assert!(matches!(
        e,
        TreeError::Nul {
            field: "xattr name",
            ..
        }
    ));
}

#[test]
fn rejects_entries_under_non_directories() {
    let e = Tree::build([file("a", 0, 0), file("a/b", 0, 0)]).unwrap_err();
    assert_eq!(
        e,
        TreeError::NotADirectory {
            path: "a/b".into(),
            parent: "a".into()
        }
    );
    let e = Tree::build([link("s", EntryKind::Symlink, "/etc"), file("s/x/y", 0, 0)]).unwrap_err();
    assert!(matches!(e, TreeError::NotADirectory { .. }));
    let e = Tree::build([file("./", 0, 0)]).unwrap_err();
    assert!(matches!(e, TreeError::RootNotDir { .. }));
}

#[test]
fn root_entry_sets_root_attributes() {
    let mut root = dir("./");
    root.mode = 0o1777;
    root.uid = 5;
    root.mtime = 1234;
    let t = Tree::build([file("x", 0, 0), root]).unwrap();
    let r = t.root();
    assert_eq!(
        (r.ino(), r.mode(), r.uid(), r.mtime()),
        (1, 0o1777, 5, 1234)
    );
    assert_eq!(r.parent(), 1);
    assert_eq!(names(&t, ""), ["x"]);
}

#[test]
fn later_duplicates_replace_earlier_ones() {
    let mut d2 = dir("d");
    d2.mode = 0o700;
    let t = Tree::build([
        file("f", 1, 1),
        file("f", 2, 2),
        dir("d"),
        file("d/keep", 0, 3),
        d2,
        dir("x"),
        file("x/gone", 0, 4),
        file("x", 7, 5),
    ])
    .unwrap();
    let f = t.lookup_path("f").unwrap();
    assert_eq!((f.size(), f.data_id()), (2, Some(2)));
    // dir over dir: attributes change, children stay
    assert_eq!(t.lookup_path("d").unwrap().mode(), 0o700);
    assert_eq!(names(&t, "d"), ["keep"]);
    // file over dir: the subtree goes
    assert_eq!(t.lookup_path("x").unwrap().kind(), NodeKind::File);
    assert!(t.lookup_path("x/gone").is_none());
    // unreachable nodes are not in the table: root, f, d, keep, x
    assert_eq!(t.len(), 5);
}

#[test]
fn modes_keep_special_bits_and_drop_type_bits() {
    let mut f = file("su", 0, 0);
    f.mode = 0o104755; // S_IFREG | setuid | 0755
    let mut d = dir("tmp");
    d.mode = 0o41777;
    let mut g = file("sg", 0, 0);
    g.mode = 0o2711;
    let t = Tree::build([f, d, g]).unwrap();
    assert_eq!(t.lookup_path("su").unwrap().mode(), 0o4755);
    assert_eq!(t.lookup_path("tmp").unwrap().mode(), 0o1777);
    assert_eq!(t.lookup_path("sg").unwrap().mode(), 0o2711);
}

#[test]
fn hardlinks_share_an_inode_and_count_links() {
    let t = Tree::build([
        file("bin/a", 10, 7),
        link("bin/b", EntryKind::Hardlink, "bin/a"),
        link("c", EntryKind::Hardlink, "./bin/a"),
    ])
    .unwrap();
    let a = t.lookup_path("bin/a").unwrap();
    let b = t.lookup_path("bin/b").unwrap();
    let c = t.lookup_path("c").unwrap();
    assert_eq!(a.ino(), b.ino());
    assert_eq!(a.ino(), c.ino());
    assert_eq!(a.nlink(), 3);
    assert_eq!(c.data_id(), Some(7));
    // root, bin, the file
    assert_eq!(t.len(), 3);
    assert_eq!(t.dirent_count(), 4);
    assert_eq!(t.file_bytes(), 10);
}

#[test]
fn hardlink_binds_to_the_target_at_that_point() {
    let t = Tree::build([
        file("a", 1, 1),
        link("b", EntryKind::Hardlink, "a"),
        file("a", 2, 2),
    ])
    .unwrap();
    let (a, b) = (t.lookup_path("a").unwrap(), t.lookup_path("b").unwrap());
    assert_ne!(a.ino(), b.ino());
    assert_eq!((a.data_id(), b.data_id()), (Some(2), Some(1)));
    assert_eq!((a.nlink(), b.nlink()), (1, 1));
}

#[test]
fn hardlink_errors() {
    let e = Tree::build([link("b", EntryKind::Hardlink, "nope")]).unwrap_err();
    assert_eq!(
        e,
        TreeError::HardlinkMissing {
            path: "b".into(),
            target: "nope".into()
        }
    );
    let e = Tree::build([dir("d"), link("b", EntryKind::Hardlink, "d")]).unwrap_err();
    assert!(matches!(e, TreeError::HardlinkToDir { .. }));
    // a whiteout is not a real target
    let e = Tree::build([file(".wh.w", 0, 0), link("b", EntryKind::Hardlink, "w")]).unwrap_err();
    assert!(matches!(e, TreeError::HardlinkMissing { .. }));
    // hardlinks to other non-directories are what an unpacked tar gives
    let t = Tree::build([
        link("s", EntryKind::Symlink, "target"),
        link("s2", EntryKind::Hardlink, "s"),
    ])
    .unwrap();
    assert_eq!(
        t.lookup_path("s2").unwrap().symlink_target(),
        Some(&b"target"[..])
    );
    assert_eq!(t.lookup_path("s").unwrap().nlink(), 2);
}

#[test]
fn whiteouts_become_char_devices_in_either_order() {
    let mut wh = file("etc/.wh.passwd", 0, 0);
    wh.uid = 3;
    let t = Tree::build([
        wh,
        dir("etc"),
        file("etc/hosts", 0, 1),
        file("a/.wh.b", 0, 0),
    ])
    .unwrap();
    assert_eq!(names(&t, "etc"), ["hosts", "passwd"]);
    let w = t.lookup_path("etc/passwd").unwrap();
    assert_eq!(
        (w.kind(), w.device(), w.rdev()),
        (NodeKind::CharDev, (0, 0), 0)
    );
    assert_eq!(w.uid(), 3);
    assert!(t.lookup_path("etc/.wh.passwd").is_none());
    assert_eq!(names(&t, "a"), ["b"]);
}

#[test]
fn real_entries_win_over_whiteouts_in_the_same_layer() {
    let t = Tree::build([
        file(".wh.f", 0, 0),
        file("f", 4, 1),
        file("g", 5, 2),
        file(".wh.g", 0, 0),
        file(".wh.d", 0, 0),
        file("d/x", 0, 3),
    ])
    .unwrap();
    assert_eq!(t.lookup_path("f").unwrap().kind(), NodeKind::File);
    assert_eq!(t.lookup_path("g").unwrap().size(), 5);
    assert_eq!(t.lookup_path("d").unwrap().kind(), NodeKind::Dir);
    assert_eq!(names(&t, ""), ["d", "f", "g"]);
}

#[test]
fn opaque_marker_sets_xattrs_in_either_order() {
    let t = Tree::build([
        file("o1/.wh..wh..opq", 0, 0),
        dir("o1"),
        file("o1/new", 0, 1),
        dir("o2"),
        file("o2/.wh..wh..opq", 0, 0),
        file("plain/.wh..wh.plnk", 0, 0),
    ])
    .unwrap();
    for d in ["o1", "o2"] {
        let n = t.lookup_path(d).unwrap();
        assert_eq!(n.xattr(b"trusted.overlay.opaque"), Some(&b"y"[..]));
        assert_eq!(n.xattr(b"user.overlay.opaque"), Some(&b"y"[..]));
    }
    assert_eq!(names(&t, "o1"), ["new"]);
    assert!(names(&t, "o2").is_empty());
    assert!(names(&t, "plain").is_empty());
    assert_eq!(t.lookup_path("plain").unwrap().xattrs().count(), 0);
}

#[test]
fn bad_whiteouts_are_rejected() {
    for p in [".wh.", "a/.wh..", ".wh.x/y"] {
        let e = Tree::build([file(p, 0, 0)]).unwrap_err();
        assert!(matches!(e, TreeError::BadWhiteout { .. }), "{p}: {e}");
    }
}

#[test]
fn xattrs_are_kept_sorted_and_overlay_ones_dropped() {
    let mut f = file("f", 0, 0);
    f.xattrs = vec![
        ("user.b".into(), b"2".to_vec()),
        ("security.capability".into(), vec![1, 0, 0, 2]),
        ("trusted.overlay.redirect".into(), b"/etc".to_vec()),
        ("user.overlay.opaque".into(), b"y".to_vec()),
        ("user.a".into(), Vec::new()),
        ("user.b".into(), b"3".to_vec()),
    ];
    let t = Tree::build([f]).unwrap();
    let n = t.lookup_path("f").unwrap();
    let got: Vec<(Vec<u8>, Vec<u8>)> = n.xattrs().map(|(k, v)| (k.to_vec(), v.to_vec())).collect();
    assert_eq!(
        got,
        vec![
            (b"security.capability".to_vec(), vec![1, 0, 0, 2]),
            (b"user.a".to_vec(), vec![]),
            (b"user.b".to_vec(), b"3".to_vec()),
        ]
    );
}

#[test]
fn devices_symlinks_and_nlink_of_dirs() {
    let mut c = file("dev/null", 0, 0);
    c.kind = EntryKind::CharDev;
    (c.dev_major, c.dev_minor) = (1, 3);
    let mut b = file("dev/big", 0, 0);
    b.kind = EntryKind::BlockDev;
    (b.dev_major, b.dev_minor) = (259, 70000);
    let mut p = file("dev/fifo", 0, 0);
    p.kind = EntryKind::Fifo;
    let t = Tree::build([
        c,
        b,
        p,
        dir("dev/sub1"),
        dir("dev/sub2"),
        link("dev/stdin", EntryKind::Symlink, "/proc/self/fd/0"),
    ])
    .unwrap();
    assert_eq!(t.lookup_path("dev/null").unwrap().device(), (1, 3));
    assert_eq!(t.lookup_path("dev/big").unwrap().device(), (259, 70000));
    assert_eq!(t.lookup_path("dev/big").unwrap().kind(), NodeKind::BlockDev);
    assert_eq!(t.lookup_path("dev/fifo").unwrap().kind(), NodeKind::Fifo);
    let s = t.lookup_path("dev/stdin").unwrap();
    assert_eq!(s.symlink_target(), Some(&b"/proc/self/fd/0"[..]));
    assert_eq!(s.size(), 15);
    let dev = t.lookup_path("dev").unwrap();
    assert_eq!(dev.nlink(), 4);
    assert_eq!(t.root().nlink(), 3);
    assert_eq!(t.lookup_path("dev/sub1").unwrap().parent(), dev.ino());
    let e = Tree::build([link("s", EntryKind::Symlink, "")]).unwrap_err();
    assert!(matches!(e, TreeError::EmptySymlink { .. }));
}

#[test]
fn inode_numbers_are_dense_and_lookup_works_by_ino() {
    let t = Tree::build([file("a/b", 0, 0), file("c", 0, 0)]).unwrap();
    for ino in 1..=t.len() as u64 {
        assert_eq!(t.get(ino).unwrap().ino(), ino);
    }
    assert!(t.get(0).is_none());
    assert!(t.get(t.len() as u64 + 1).is_none());
    let a = t.lookup(1, b"a").unwrap();
    assert_eq!(t.lookup(a.ino(), b"b").unwrap().kind(), NodeKind::File);
    assert!(t.lookup(1, b"zz").is_none());
}

/// 100k entries in a realistic shape: 1k directories of 100 files with
/// typical name lengths. Prints the figure; asserts the budget.
#[test]
fn hundred_thousand_entries_fit_the_memory_budget() {
    let mut entries = Vec::with_capacity(101_000);
    for d in 0..1000 {
        entries.push(dir(&format!("usr/lib/python3/site-packages/pkg{d:04}")));
        for f in 0..100 {
            entries.push(file(
                &format!("usr/lib/python3/site-packages/pkg{d:04}/module_{f:03}.py"),
                4096,
                d * 100 + f,
            ));
        }
    }
    let n = entries.len();
    let t = Tree::build(entries).unwrap();
    let per_entry = t.heap_bytes() as f64 / n as f64;
    println!(
        "tree of {n} entries: {} inodes, {} heap bytes, {per_entry:.1} bytes/entry",
        t.len(),
        t.heap_bytes()
    );
    assert!(per_entry < 200.0, "{per_entry} bytes/entry");
}
