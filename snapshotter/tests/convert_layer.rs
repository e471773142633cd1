//! `shoal convert`'s layer writer against Shoal's own zstd:chunked reader:
//! the converted blob decompresses to the source tar byte for byte, its
//! footer and TOC parse and verify, every chunk decodes to the file's bytes,
//! conversion is reproducible, and hostile tars are refused.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use shoal::convert::chunked::LayerInfo;
use shoal::convert::layer::{convert, SourceCompression};
use shoal::convert::Layout;
use shoal::remote::fetch::decode_chunk;
use shoal::remote::toc::{parse_footer, Toc, FOOTER_FETCH};

mod common;
use common::noise;

const CHUNK: usize = 64 << 10;

/// [`convert`] without a profile or progress.
fn conv(
    src: &Path,
    compression: SourceCompression,
    lazy_source: bool,
    dst: &Path,
    layout: Layout,
) -> Result<LayerInfo, String> {
    convert(
        src,
        compression,
        lazy_source,
        dst,
        layout,
        None,
        &mut |_| {},
    )
}

fn layout() -> Layout {
    Layout {
        chunk_size: CHUNK,
        level: 3,
    }
}

fn header(kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(mode);
    h.set_uid(1000);
    h.set_gid(1001);
    h.set_mtime(1_700_000_000);
    h
}

/// A tar with what a converter must keep: dirs, empty/small/multi-chunk
/// files (one ending exactly on a chunk boundary), a long name, symlink,
/// hardlink, fifo, an xattr; and the file contents by name.
fn sample_tar() -> (Vec<u8>, HashMap<String, Vec<u8>>) {
    let mut b = tar::Builder::new(Vec::new());
    let mut files = HashMap::new();
    b.append_data(
        &mut header(tar::EntryType::Directory, 0, 0o755),
        "./etc/",
        &[][..],
    )
    .unwrap();
    let long = format!("etc/{}/deep.txt", "d".repeat(150));
    for (name, data) in [
        ("etc/empty".to_string(), Vec::new()),
        ("etc/small".to_string(), b"hello\n".to_vec()),
        ("etc/three-chunks".to_string(), noise(2 * CHUNK + 1234, 1)),
        ("etc/exact".to_string(), noise(2 * CHUNK, 2)),
        (long.clone(), noise(777, 3)),
    ] {
        b.append_data(
            &mut header(tar::EntryType::Regular, data.len() as u64, 0o4755),
            &name,
            &data[..],
        )
        .unwrap();
        files.insert(name, data);
    }
    // PAX xattr on a file.
    b.append_pax_extensions([("SCHILY.xattr.user.k", &b"v\0x"[..])])
        .unwrap();
    let data = noise(100, 4);
    b.append_data(
        &mut header(tar::EntryType::Regular, 100, 0o644),
        "etc/xattr",
        &data[..],
    )
    .unwrap();
    files.insert("etc/xattr".into(), data);
    let mut h = header(tar::EntryType::Symlink, 0, 0o777);
    b.append_link(&mut h, "etc/link", "/etc/small").unwrap();
    let mut h = header(tar::EntryType::Link, 0, 0o644);
    b.append_link(&mut h, "etc/hard", "etc/small").unwrap();
    b.append_data(
        &mut header(tar::EntryType::Fifo, 0, 0o600),
        "etc/fifo",
        &[][..],
    )
    .unwrap();
    (b.into_inner().unwrap(), files)
}

fn write(dir: &Path, name: &str, b: &[u8]) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, b).unwrap();
    p
}

fn sha(b: &[u8]) -> String {
    use sha2::Digest as _;
    format!("sha256:{:x}", sha2::Sha256::digest(b))
}

#[test]
fn converted_layer_round_trips_through_the_reader() {
    let dir = tempfile::tempdir().unwrap();
    let (tar, files) = sample_tar();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&tar).unwrap();
    let src = write(dir.path(), "src.tar.gz", &gz.finish().unwrap());
    let out = dir.path().join("out");
    let info = conv(&src, SourceCompression::Gzip, false, &out, layout()).unwrap();
    let blob = std::fs::read(&out).unwrap();
    assert_eq!(info.size, blob.len() as u64);
    assert_eq!(info.digest, sha(&blob));

    // A plain zstd decoder sees the source tar, byte for byte.
    let plain = zstd::stream::decode_all(&blob[..]).unwrap();
    assert!(
        plain == tar,
        "decompressed layer differs from the source tar"
    );
    assert_eq!(info.diff_id, sha(&tar));

    // Shoal's reader: footer, verified TOC, every chunk.
    let tail = &blob[blob.len() - FOOTER_FETCH as usize..];
    let footer = parse_footer(tail, blob.len() as u64).unwrap();
    let toc_bytes =
        &blob[footer.toc_offset as usize..(footer.toc_offset + footer.toc_len) as usize];
    let toc = Toc::parse(toc_bytes, &footer, &info.toc_digest).unwrap();
    assert!(Toc::parse(toc_bytes, &footer, &sha(b"other")).is_err());
    let mut seen = 0;
    let mut chunks = 0;
    for (e, cs) in toc.entries.iter().zip(&toc.files) {
        if e.kind != "reg" {
            continue;
        }
        let want = files
            .get(&e.name)
            .unwrap_or_else(|| panic!("unexpected file {:?}", e.name));
        let mut got = Vec::new();
        for c in cs {
            let bytes = decode_chunk(
                toc.compression,
                &blob[c.blob_offset as usize..c.blob_end as usize],
                c,
            )
            .unwrap();
            assert!(c.len as usize <= CHUNK && c.file_offset % CHUNK as u64 == 0);
            got.extend_from_slice(&bytes);
            chunks += 1;
        }
        assert!(got == *want, "{} differs", e.name);
        seen += 1;
    }
    assert_eq!(seen, files.len());
    assert_eq!(chunks, info.chunks);
    let by = |n: &str| toc.entries.iter().find(|e| e.name == n).unwrap();
    assert_eq!(by("etc/three-chunks").mode & 0o7777, 0o4755);
    assert_eq!((by("etc/small").uid, by("etc/small").gid), (1000, 1001));
    assert_eq!(by("etc/link").link_name, "/etc/small");
    assert_eq!(
        (
            by("etc/hard").kind.as_str(),
            by("etc/hard").link_name.as_str()
        ),
        ("hardlink", "etc/small")
    );
    assert_eq!(by("etc/fifo").kind, "fifo");
    assert_eq!(by("etc").kind, "dir");
    assert_eq!(
        shoal::remote::toc::xattrs(by("etc/xattr")).unwrap(),
        vec![("user.k".to_string(), b"v\0x".to_vec())]
    );
    assert_eq!(shoal::remote::toc::mtime(by("etc/small")), 1_700_000_000);
    // The reader builds a servable tree from it.
    shoal_fuse_tree(&toc);
}

fn shoal_fuse_tree(toc: &Toc) {
    let entries = shoal::remote::layer::entries(toc).unwrap();
    assert!(entries.iter().any(|e| e.path == "etc/hard"));
}

#[test]
fn conversion_is_reproducible_and_independent_of_source_compression() {
    let dir = tempfile::tempdir().unwrap();
    let (tar, _) = sample_tar();
    let plain = write(dir.path(), "src.tar", &tar);
    let zst = write(
        dir.path(),
        "src.tar.zst",
        &zstd::stream::encode_all(&tar[..], 19).unwrap(),
    );
    let a = conv(
        &plain,
        SourceCompression::None,
        false,
        &dir.path().join("a"),
        layout(),
    )
    .unwrap();
    let b = conv(
        &plain,
        SourceCompression::None,
        false,
        &dir.path().join("b"),
        layout(),
    )
    .unwrap();
    let c = conv(
        &zst,
        SourceCompression::Zstd,
        false,
        &dir.path().join("c"),
        layout(),
    )
    .unwrap();
    assert_eq!(a.digest, b.digest);
    assert_eq!(a.digest, c.digest);
    assert_eq!(a.toc_digest, c.toc_digest);
    let other = Layout {
        chunk_size: CHUNK * 2,
        level: 3,
    };
    let d = conv(
        &plain,
        SourceCompression::None,
        false,
        &dir.path().join("d"),
        other,
    )
    .unwrap();
    assert_ne!(a.digest, d.digest, "chunk size is part of the layout");
    assert_eq!(a.diff_id, d.diff_id);
}

#[test]
fn lazy_format_artefacts_are_dropped_only_for_lazy_sources() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = tar::Builder::new(Vec::new());
    for name in [".prefetch.landmark", "app", "stargz.index.json"] {
        b.append_data(
            &mut header(tar::EntryType::Regular, 1, 0o644),
            name,
            &b"x"[..],
        )
        .unwrap();
    }
    let src = write(dir.path(), "src.tar", &b.into_inner().unwrap());
    let lazy = conv(
        &src,
        SourceCompression::None,
        true,
        &dir.path().join("a"),
        layout(),
    )
    .unwrap();
    let plain = conv(
        &src,
        SourceCompression::None,
        false,
        &dir.path().join("b"),
        layout(),
    )
    .unwrap();
    assert_eq!((lazy.files, plain.files), (1, 3));
    let out = zstd::stream::decode_all(&std::fs::read(dir.path().join("a")).unwrap()[..]).unwrap();
    let names: Vec<String> = tar::Archive::new(&out[..])
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().display().to_string())
        .collect();
    assert_eq!(names, ["app"]);
}

/// A raw tar header block with `name`, so the builder's own path checks
/// don't stop the hostile entry.
fn raw_entry(name: &str, kind: u8, link: &str) -> Vec<u8> {
    let mut h = tar::Header::new_old();
    h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
    h.set_size(0);
    h.set_mode(0o644);
    h.as_old_mut().linkflag = [kind];
    h.set_cksum();
    let mut v = h.as_bytes().to_vec();
    v.extend_from_slice(&[0u8; 1024]);
    v
}

#[test]
fn escaping_paths_and_corrupt_tars_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    for (i, (name, kind, link)) in [
        ("../etc/passwd", b'0', ""),
        ("/etc/passwd", b'0', ""),
        ("a/../../x", b'5', ""),
        ("evil", b'1', "../../etc/shadow"),
    ]
    .into_iter()
    .enumerate()
    {
        let src = write(dir.path(), &format!("bad{i}"), &raw_entry(name, kind, link));
        let err = conv(
            &src,
            SourceCompression::None,
            false,
            &dir.path().join("o"),
            layout(),
        )
        .unwrap_err();
        assert!(err.contains("escapes the layer root"), "{name}: {err}");
    }
    // A flipped byte in a header fails its checksum.
    let (mut tar, _) = sample_tar();
    tar[10] ^= 1;
    let src = write(dir.path(), "corrupt", &tar);
    let err = conv(
        &src,
        SourceCompression::None,
        false,
        &dir.path().join("o"),
        layout(),
    )
    .unwrap_err();
    assert!(err.contains("checksum"), "{err}");
    // Truncated content.
    let (tar, _) = sample_tar();
    let src = write(dir.path(), "short", &tar[..3000]);
    let err = conv(
        &src,
        SourceCompression::None,
        false,
        &dir.path().join("o"),
        layout(),
    )
    .unwrap_err();
    assert!(err.contains("ends inside"), "{err}");
}

fn profile(paths: &[&str]) -> shoal::convert::profile::Profile {
    shoal::convert::profile::Profile {
        version: 1,
        image: String::new(),
        paths: paths.iter().map(|p| p.to_string()).collect(),
    }
}

/// name -> (type flag, content) of a tar.
fn tar_map(tar: &[u8]) -> HashMap<String, (u8, Vec<u8>)> {
    let mut m = HashMap::new();
    for e in tar::Archive::new(tar).entries().unwrap() {
        let mut e = e.unwrap();
        let name = e.path().unwrap().display().to_string();
        let kind = e.header().entry_type().as_byte();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut data).unwrap();
        m.insert(name, (kind, data));
    }
    m
}

#[test]
fn a_profile_puts_the_startup_set_first_and_marks_it() {
    let dir = tempfile::tempdir().unwrap();
    let (tar, files) = sample_tar();
    let src = write(dir.path(), "src.tar", &tar);
    let out = dir.path().join("out");
    // Absolute and relative paths, a missing file, a hardlink, a directory:
    // only regular files the layer holds count.
    let p = profile(&[
        "/etc/xattr",
        "etc/three-chunks",
        "etc/missing",
        "etc/hard",
        "etc",
        "etc/xattr",
    ]);
    let info = convert(
        &src,
        SourceCompression::None,
        false,
        &out,
        layout(),
        Some(&p),
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(info.startup_files, 2);
    let blob = std::fs::read(&out).unwrap();
    let tail = &blob[blob.len() - FOOTER_FETCH as usize..];
    let footer = parse_footer(tail, blob.len() as u64).unwrap();
    let toc_bytes =
        &blob[footer.toc_offset as usize..(footer.toc_offset + footer.toc_len) as usize];
    let toc = Toc::parse(toc_bytes, &footer, &info.toc_digest).unwrap();
    let end = toc
        .prefetch_end
        .expect("startup mark read as the prefetch end");
    assert_eq!(end, info.startup_bytes);
    // The TOC position and the startup fetch end the annotations carry: the
    // footer's, and where the reader's last startup chunk ends.
    assert_eq!(
        (info.toc_offset, info.toc_len),
        (footer.toc_offset, footer.toc_len)
    );
    let fetch_end = toc
        .files
        .iter()
        .flatten()
        .filter(|c| c.blob_offset < end)
        .map(|c| c.blob_end)
        .max()
        .unwrap();
    assert_eq!(info.startup_fetch_end, fetch_end);
    let mut order: Vec<(u64, &str)> = Vec::new();
    for (e, cs) in toc.entries.iter().zip(&toc.files) {
        for c in cs {
            let startup = e.name == "etc/xattr" || e.name == "etc/three-chunks";
            assert_eq!(
                c.blob_offset < end,
                startup,
                "{} at {}",
                e.name,
                c.blob_offset
            );
            order.push((c.blob_offset, e.name.as_str()));
            let bytes = decode_chunk(
                toc.compression,
                &blob[c.blob_offset as usize..c.blob_end as usize],
                c,
            )
            .unwrap();
            assert_eq!(
                &bytes[..],
                &files[&e.name][c.file_offset as usize..(c.file_offset + c.len) as usize]
            );
        }
    }
    order.sort();
    assert_eq!(order[0].1, "etc/xattr", "profile order");
    assert_eq!(order[1].1, "etc/three-chunks");
    // Same entries, same contents; only the order (and so the diff ID) changed.
    let plain = zstd::stream::decode_all(&blob[..]).unwrap();
    assert_eq!(tar_map(&plain), tar_map(&tar));
    assert_ne!(info.diff_id, sha(&tar));
    // Reproducible with a profile too.
    let again = convert(
        &src,
        SourceCompression::None,
        false,
        &dir.path().join("again"),
        layout(),
        Some(&p),
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(again.digest, info.digest);
    // An empty or entirely stale profile is no profile.
    let none = conv(
        &src,
        SourceCompression::None,
        false,
        &dir.path().join("none"),
        layout(),
    )
    .unwrap();
    let stale = convert(
        &src,
        SourceCompression::None,
        false,
        &dir.path().join("stale"),
        layout(),
        Some(&profile(&["no/such"])),
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(stale.startup_files, 0);
    assert_eq!(stale.diff_id, none.diff_id);
}

#[test]
fn a_profile_never_moves_what_unpacking_order_depends_on() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |name: &str, data: &[u8]| {
        b.append_data(
            &mut header(tar::EntryType::Regular, data.len() as u64, 0o644),
            name,
            data,
        )
        .unwrap();
    };
    add("filler", b"0");
    add(".wh.recreated", b"");
    add("recreated", b"new");
    add("d/.wh..wh..opq", b"");
    add("d/g", b"g");
    add("twice", b"old");
    add("twice", b"new");
    add("free", b"free");
    let src = write(dir.path(), "src.tar", &b.into_inner().unwrap());
    let p = profile(&["recreated", "d/g", "twice", "free"]);
    let info = convert(
        &src,
        SourceCompression::None,
        false,
        &dir.path().join("o"),
        layout(),
        Some(&p),
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(info.startup_files, 1, "only `free` may move");
    let plain =
        zstd::stream::decode_all(&std::fs::read(dir.path().join("o")).unwrap()[..]).unwrap();
    let names: Vec<String> = tar::Archive::new(&plain[..])
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().display().to_string())
        .collect();
    assert_eq!(
        names,
        [
            "free",
            "filler",
            ".wh.recreated",
            "recreated",
            "d/.wh..wh..opq",
            "d/g",
            "twice",
            "twice"
        ]
    );
}
