//! Real FUSE mounts of one layer, checked with std::fs and libc as a
//! container would see them: types, modes, owners, sizes, contents, links,
//! xattrs, readdir, statfs, EROFS, EIO, late replies and unmount.

mod common;

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::time::{Duration, Instant};

use common::*;
use shoal_fuse::test_util::{Behaviour, MemSource};
use shoal_fuse::{Entry, EntryKind, Tree};

/// A valid `vfs_cap_data` v2 (effective, cap_net_raw); the kernel parses it.
const CAP_NET_RAW_V2: [u8; 20] = [
    1, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
];
const BIG: usize = 3 * 1024 * 1024 + 12_345;

fn sample() -> (Tree, MemSource) {
    let mut f = file("etc/shadow", 0o640, 11, 1);
    (f.uid, f.gid, f.mtime) = (0, 42, 1_600_000_000);
    f.xattrs = vec![
        ("user.note".into(), b"hello xattr".to_vec()),
        ("security.capability".into(), CAP_NET_RAW_V2.to_vec()),
    ];
    let mut su = file("bin/su", 0o4755, 5, 2);
    su.uid = 0;
    let mut tmp = dir("tmp", 0o1777);
    tmp.mtime = 1_500_000_000;
    let mut sg = dir("srv", 0o2775);
    (sg.uid, sg.gid) = (1000, 1001);
    let mut null = file("dev/null", 0o666, 0, 0);
    null.kind = EntryKind::CharDev;
    (null.dev_major, null.dev_minor) = (1, 3);
    let mut sda = file("dev/sda1", 0o660, 0, 0);
    sda.kind = EntryKind::BlockDev;
    (sda.dev_major, sda.dev_minor) = (8, 1);
    let mut fifo = file("run/initctl", 0o600, 0, 0);
    fifo.kind = EntryKind::Fifo;
    let mut home = dir("home/user", 0o700);
    (home.uid, home.gid) = (1000, 1000);
    let entries: Vec<Entry> = vec![
        dir("./", 0o755),
        f,
        su,
        tmp,
        sg,
        null,
        sda,
        fifo,
        home,
        file("empty", 0o644, 0, 3),
        file("big.bin", 0o644, BIG as u64, 4),
        link("bin/sh", EntryKind::Symlink, "busybox"),
        link("abs", EntryKind::Symlink, "/etc/../etc/shadow"),
        link("bin/su2", EntryKind::Hardlink, "bin/su"),
        link("su3", EntryKind::Hardlink, "/bin/su"),
        file("etc/.wh.motd", 0, 0, 0),
        file("opaque/.wh..wh..opq", 0, 0, 0),
        file("opaque/inside", 0o644, 0, 5),
    ];
    let tree = Tree::build(entries).unwrap();
    let mut src = MemSource::new();
    src.insert(1, b"root:x:0:0\n".to_vec())
        .insert(2, b"SUBIN".to_vec())
        .insert(3, Vec::new())
        .insert(4, pattern(BIG, 7))
        .insert(5, Vec::new());
    (tree, src)
}

#[test]
fn types_modes_owners_and_times() {
    if !fuse_available() {
        return;
    }
    let (tree, src) = sample();
    let m = mount_tree(tree, src, "shoal:sha256:types");
    let md = |p: &str| fs::symlink_metadata(m.join(p)).unwrap();

    let shadow = md("etc/shadow");
    assert!(shadow.file_type().is_file());
    assert_eq!(shadow.mode() & 0o7777, 0o640);
    assert_eq!((shadow.uid(), shadow.gid()), (0, 42));
    assert_eq!(shadow.mtime(), 1_600_000_000);
    assert_eq!(shadow.len(), 11);
    assert_eq!(shadow.blocks(), 1);
    assert_eq!(shadow.nlink(), 1);

    assert_eq!(md("bin/su").mode() & 0o7777, 0o4755);
    assert_eq!(md("tmp").mode() & 0o7777, 0o1777);
    assert_eq!(md("tmp").mtime(), 1_500_000_000);
    let srv = md("srv");
    assert_eq!(
        (srv.mode() & 0o7777, srv.uid(), srv.gid()),
        (0o2775, 1000, 1001)
    );
    assert_eq!(md("home/user").mode() & 0o7777, 0o700);
    // implicit parent
    let home = md("home");
    assert_eq!(
        (home.mode() & 0o7777, home.uid(), home.gid()),
        (0o755, 0, 0)
    );

    let null = md("dev/null");
    assert!(null.file_type().is_char_device());
    assert_eq!(null.rdev(), libc::makedev(1, 3));
    let sda = md("dev/sda1");
    assert!(sda.file_type().is_block_device());
    assert_eq!(sda.rdev(), libc::makedev(8, 1));
    assert!(md("run/initctl").file_type().is_fifo());

    let empty = md("empty");
    assert_eq!((empty.len(), empty.blocks()), (0, 0));
    assert_eq!(md("big.bin").blocks(), (BIG as u64).div_ceil(512));

    // directories: 2 + subdirectories
    let root = md("");
    assert_eq!(root.ino(), 1);
    let subdirs = ["bin", "dev", "etc", "home", "opaque", "run", "srv", "tmp"];
    assert_eq!(root.nlink(), 2 + subdirs.len() as u64);
    assert_eq!(md("home").nlink(), 3);
    assert_eq!(md("tmp").nlink(), 2);

    // fsname shows in mountinfo
    let (fstype, source) = mount_source(m.path()).expect("mounted");
    assert_eq!(
        (fstype.as_str(), source.as_str()),
        ("fuse", "shoal:sha256:types")
    );
}

/// Runs `cmd args` as `uid:gid`; returns stdout on success.
fn run_as(uid: u32, gid: u32, cmd: &str, args: &[&std::path::Path]) -> Option<Vec<u8>> {
    use std::os::unix::process::CommandExt;
    let out = std::process::Command::new(cmd)
        .args(args)
        .uid(uid)
        .gid(gid)
        .output()
        .unwrap();
    out.status.success().then_some(out.stdout)
}

#[test]
fn other_users_get_kernel_enforced_modes() {
    if !fuse_available() {
        return;
    }
    let (tree, src) = sample();
    let m = mount_tree(tree, src, "shoal-perms");
    // allow_other lets them in; default_permissions applies the modes
    assert_eq!(
        run_as(1000, 1000, "cat", &[&m.join("bin/su")]).unwrap(),
        b"SUBIN"
    );
    assert!(run_as(1000, 1000, "cat", &[&m.join("etc/shadow")]).is_none());
    assert_eq!(
        run_as(1000, 42, "cat", &[&m.join("etc/shadow")]).unwrap(),
        b"root:x:0:0\n"
    );
    assert!(run_as(1000, 1000, "ls", &[&m.join("home/user")]).is_some());
    assert!(run_as(1001, 1001, "ls", &[&m.join("home/user")]).is_none());
}

#[test]
fn symlinks_and_hardlinks() {
    if !fuse_available() {
        return;
    }
    let (tree, src) = sample();
    let m = mount_tree(tree, src, "shoal-links");
    assert_eq!(
        fs::read_link(m.join("bin/sh")).unwrap().to_str(),
        Some("busybox")
    );
    assert_eq!(
        fs::read_link(m.join("abs")).unwrap().to_str(),
        Some("/etc/../etc/shadow")
    );
    let sh = fs::symlink_metadata(m.join("bin/sh")).unwrap();
    assert!(sh.file_type().is_symlink());
    assert_eq!(sh.len(), 7);

    let su = fs::metadata(m.join("bin/su")).unwrap();
    let su2 = fs::metadata(m.join("bin/su2")).unwrap();
    let su3 = fs::metadata(m.join("su3")).unwrap();
    assert_eq!(su.ino(), su2.ino());
    assert_eq!(su.ino(), su3.ino());
    assert_eq!(su.nlink(), 3);
    assert_eq!(fs::read(m.join("su3")).unwrap(), b"SUBIN");
}

#[test]
fn contents_at_odd_offsets_and_sizes() {
    if !fuse_available() {
        return;
    }
    let (tree, src) = sample();
    let m = mount_tree(tree, src, "shoal-contents");
    let want = pattern(BIG, 7);
    assert_eq!(fs::read(m.join("etc/shadow")).unwrap(), b"root:x:0:0\n");
    assert!(fs::read(m.join("empty")).unwrap().is_empty());
    assert!(fs::read(m.join("big.bin")).unwrap() == want);

    let f = File::open(m.join("big.bin")).unwrap();
    let cases: [(u64, usize); 7] = [
        (0, 1),
        (1, 4095),
        (4095, 2),
        (131_071, 131_075),
        (1_000_003, 777_777),
        (BIG as u64 - 3, 3),
        (BIG as u64 - 100, 1000), // crosses EOF: short read
    ];
    for (off, len) in cases {
        let mut buf = vec![0u8; len];
        let n = f.read_at(&mut buf, off).unwrap();
        let end = (off as usize + len).min(BIG);
        assert_eq!(n, end - off as usize, "read_at({off}, {len})");
        assert!(
            buf[..n] == want[off as usize..end],
            "content at {off}+{len}"
        );
    }
    let mut buf = [0u8; 16];
    assert_eq!(f.read_at(&mut buf, BIG as u64).unwrap(), 0);
    assert_eq!(f.read_at(&mut buf, BIG as u64 + 10_000).unwrap(), 0);

    let mut g = File::open(m.join("big.bin")).unwrap();
    g.seek(SeekFrom::Start(2_000_001)).unwrap();
    let mut tail = Vec::new();
    g.read_to_end(&mut tail).unwrap();
    assert!(tail == want[2_000_001..]);
}

#[test]
fn readdir_lists_children_and_dots() {
    if !fuse_available() {
        return;
    }
    let (tree, src) = sample();
    let m = mount_tree(tree, src, "shoal-readdir");
    let mut names: Vec<String> = fs::read_dir(m.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    let want = [
        "abs", "big.bin", "bin", "dev", "empty", "etc", "home", "opaque", "run", "srv", "su3",
        "tmp",
    ];
    assert_eq!(names, want);

    let root = readdir_all(m.path());
    assert_eq!(root[0], (".".to_owned(), 1));
    assert_eq!(root[1], ("..".to_owned(), 1));
    assert_eq!(root.len(), want.len() + 2);
    // d_ino matches stat
    for (name, ino) in &root[2..] {
        assert_eq!(
            fs::symlink_metadata(m.join(name)).unwrap().ino(),
            *ino,
            "{name}"
        );
    }
    let home_ino = fs::metadata(m.join("home")).unwrap().ino();
    let user = readdir_all(&m.join("home/user"));
    assert_eq!(user[0].0, ".");
    assert_eq!(user[1], ("..".to_owned(), home_ino));
    assert_eq!(user.len(), 2);
    assert_eq!(
        fs::metadata(m.join("home/user/..")).unwrap().ino(),
        home_ino
    );

    // whiteouts become char devices 0:0 and their markers are hidden
    let etc: Vec<String> = readdir_all(&m.join("etc"))
        .into_iter()
        .map(|e| e.0)
        .collect();
    assert_eq!(etc, [".", "..", "motd", "shadow"]);
    let motd = fs::symlink_metadata(m.join("etc/motd")).unwrap();
    assert!(motd.file_type().is_char_device());
    assert_eq!(motd.rdev(), 0);
    let opaque: Vec<String> = readdir_all(&m.join("opaque"))
        .into_iter()
        .map(|e| e.0)
        .collect();
    assert_eq!(opaque, [".", "..", "inside"]);
    assert_eq!(
        fs::metadata(m.join("nope")).unwrap_err().kind(),
        ErrorKind::NotFound
    );
    // negative entries are cached; asking twice must still say ENOENT
    assert!(fs::metadata(m.join("nope")).is_err());
    assert!(fs::metadata(m.join("etc/.wh.motd")).is_err());
}

#[test]
fn readdir_of_a_large_directory_is_complete() {
    if !fuse_available() {
        return;
    }
    let entries = (0..5000).map(|i| {
        file(
            &format!("many/f{i:05}-{}", "x".repeat(i % 200)),
            0o644,
            0,
            0,
        )
    });
    let tree = Tree::build(entries).unwrap();
    let m = mount_tree(tree, MemSource::new(), "shoal-many");
    let all = readdir_all(&m.join("many"));
    assert_eq!(all.len(), 5002);
    let mut seen: Vec<&str> = all[2..].iter().map(|e| e.0.as_str()).collect();
    seen.dedup();
    assert_eq!(seen.len(), 5000);
}

#[test]
fn xattrs_with_size_probes() {
    if !fuse_available() {
        return;
    }
    let (tree, src) = sample();
    let m = mount_tree(tree, src, "shoal-xattr");
    let p = m.join("etc/shadow");
    assert_eq!(getxattr(&p, "user.note").unwrap(), b"hello xattr");
    assert_eq!(getxattr(&p, "security.capability").unwrap(), CAP_NET_RAW_V2);
    assert_eq!(
        getxattr_sized(&p, "user.note", 3)
            .unwrap_err()
            .raw_os_error(),
        Some(libc::ERANGE)
    );
    assert_eq!(getxattr_sized(&p, "user.note", 64).unwrap(), 11);
    assert_eq!(
        getxattr(&p, "user.missing").unwrap_err().raw_os_error(),
        Some(libc::ENODATA)
    );
    let mut names = listxattr(&p).unwrap();
    names.sort();
    assert_eq!(names, ["security.capability", "user.note"]);
    assert!(listxattr(&m.join("empty")).unwrap().is_empty());

    let o = m.join("opaque");
    assert_eq!(getxattr(&o, "trusted.overlay.opaque").unwrap(), b"y");
    assert_eq!(getxattr(&o, "user.overlay.opaque").unwrap(), b"y");
    let mut names = listxattr(&o).unwrap();
    names.sort();
    assert_eq!(names, ["trusted.overlay.opaque", "user.overlay.opaque"]);
}

#[test]
fn statfs_reports_sizes() {
    if !fuse_available() {
        return;
    }
    let (tree, src) = sample();
    let inodes = tree.len() as u64;
    let m = mount_tree(tree, src, "shoal-statfs");
    let st = statvfs(m.path());
    assert_eq!(st.f_bsize, 4096);
    assert!(st.f_blocks >= (BIG as u64).div_ceil(4096));
    assert_eq!(st.f_files, inodes);
    assert_eq!(st.f_bfree, 0);
    assert_eq!(st.f_namemax, 255);
    assert_ne!(st.f_flag & libc::ST_RDONLY, 0);
}

#[test]
fn writes_fail_with_erofs() {
    if !fuse_available() {
        return;
    }
    let (tree, src) = sample();
    let m = mount_tree(tree, src, "shoal-erofs");
    let erofs = |r: std::io::Result<()>| {
        assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EROFS));
    };
    erofs(File::create(m.join("new")).map(drop));
    erofs(
        OpenOptions::new()
            .write(true)
            .open(m.join("etc/shadow"))
            .map(drop),
    );
    erofs(
        OpenOptions::new()
            .append(true)
            .open(m.join("empty"))
            .map(drop),
    );
    erofs(fs::create_dir(m.join("d")));
    erofs(fs::remove_file(m.join("empty")));
    erofs(fs::remove_dir(m.join("home/user")));
    erofs(fs::rename(m.join("empty"), m.join("empty2")));
    erofs(fs::hard_link(m.join("empty"), m.join("empty3")));
    erofs(std::os::unix::fs::symlink("x", m.join("sl")));
    erofs(fs::set_permissions(
        m.join("empty"),
        fs::Permissions::from_mode(0o600),
    ));
    erofs(std::os::unix::fs::chown(m.join("empty"), Some(1), Some(1)));
}

#[test]
fn source_errors_panics_and_short_replies_are_eio() {
    if !fuse_available() {
        return;
    }
    let tree = Tree::build([
        file("fail", 0o644, 100, 1),
        file("panic", 0o644, 100, 2),
        file("short", 0o644, 100, 3),
        file("ok", 0o644, 4, 4),
        file("enoent-id", 0o644, 4, 99),
    ])
    .unwrap();
    let mut src = MemSource::new();
    src.insert_with(1, vec![1u8; 100], Behaviour::Fail(libc::EIO))
        .insert_with(2, vec![2u8; 100], Behaviour::Panic)
        .insert_with(3, vec![3u8; 100], Behaviour::Short)
        .insert(4, b"fine".to_vec());
    let m = mount_tree(tree, src, "shoal-eio");
    for name in ["fail", "panic", "short", "enoent-id"] {
        let err = fs::read(m.join(name)).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{name}");
    }
    // the mount survives a panicking source
    assert_eq!(fs::read(m.join("ok")).unwrap(), b"fine");
    let stats = m.mounted().stats();
    assert!(stats.source_panics >= 1, "{stats:?}");
    assert!(stats.read_errors >= 4, "{stats:?}");
}

#[test]
fn reply_from_another_thread_after_a_delay() {
    if !fuse_available() {
        return;
    }
    let data = pattern(200_000, 3);
    let tree = Tree::build([
        file("slow", 0o644, data.len() as u64, 1),
        file("fast", 0o644, 2, 2),
    ])
    .unwrap();
    let mut src = MemSource::new();
    src.insert_with(
        1,
        data.clone(),
        Behaviour::Delay(Duration::from_millis(300)),
    )
    .insert(2, b"hi".to_vec());
    let m = mount_tree(tree, src, "shoal-delay");
    let start = Instant::now();
    let slow_path = m.join("slow");
    let reader = std::thread::spawn(move || fs::read(slow_path).unwrap());
    // While the slow read waits, the workers still answer other requests.
    std::thread::sleep(Duration::from_millis(50));
    let t = Instant::now();
    assert_eq!(fs::read(m.join("fast")).unwrap(), b"hi");
    assert!(
        t.elapsed() < Duration::from_millis(250),
        "{:?}",
        t.elapsed()
    );
    assert!(reader.join().unwrap() == data);
    assert!(start.elapsed() >= Duration::from_millis(300));
}

#[test]
fn unmount_removes_the_mount() {
    if !fuse_available() {
        return;
    }
    let (tree, src) = sample();
    let mut m = mount_tree(tree, src, "shoal-unmount");
    assert!(mount_source(m.path()).is_some());
    let mounted = m.mounted.take().unwrap();
    assert_eq!(mounted.mountpoint(), m.path());
    mounted.unmount().unwrap();
    assert!(mount_source(m.path()).is_none());
    assert!(fs::read_dir(m.path()).unwrap().next().is_none());
}

#[test]
fn bad_fsname_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let opts = shoal_fuse::MountOptions {
        fsname: "a,b".into(),
        ..Default::default()
    };
    let tree = Tree::build([]).unwrap();
    let err = shoal_fuse::mount(
        tree,
        std::sync::Arc::new(MemSource::new()),
        dir.path(),
        opts,
    )
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
}
