//! A restarted daemon serves a kept FUSE connection with a tree rebuilt from
//! the same TOC; the kernel has cached its nodeids. So inode numbers must
//! depend only on the entries, never on build order or anything else.

mod common;

use common::{dir, file};
use shoal_fuse::{Entry, Tree};

fn paths() -> Vec<Entry> {
    let mut v = vec![
        dir("etc", 0o755),
        dir("usr/bin", 0o755),
        dir("a/b/c", 0o700),
    ];
    for (i, p) in [
        "etc/passwd",
        "usr/bin/sh",
        "a/b/c/d",
        "a/z",
        "usr/lib/x.so",
        "top",
    ]
    .into_iter()
    .enumerate()
    {
        v.push(file(p, 0o644, 10 + i as u64, i as u64));
    }
    v
}

fn inos(t: &Tree) -> Vec<(String, u64)> {
    let all = [
        "etc",
        "usr",
        "usr/bin",
        "usr/lib",
        "a",
        "a/b",
        "a/b/c",
        "etc/passwd",
        "usr/bin/sh",
        "a/b/c/d",
        "a/z",
        "usr/lib/x.so",
        "top",
    ];
    all.iter()
        .map(|p| {
            (
                p.to_string(),
                t.lookup_path(p).unwrap_or_else(|| panic!("{p}")).ino(),
            )
        })
        .collect()
}

#[test]
fn inode_numbers_depend_only_on_the_entries() {
    let a = Tree::build(paths()).unwrap();
    let b = Tree::build(paths()).unwrap();
    let mut rev = paths();
    rev.reverse();
    let c = Tree::build(rev).unwrap();
    assert_eq!(inos(&a), inos(&b));
    assert_eq!(inos(&a), inos(&c), "build order changed inode numbers");
    assert_eq!(a.root().ino(), 1);
}
