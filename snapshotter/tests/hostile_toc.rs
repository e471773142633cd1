//! Hostile layers: TOCs that lie about names, links, offsets, sizes, types,
//! xattrs and digests, and footers that point anywhere.
//!
//! Each must end in a named error from the layer of Shoal whose job it is to
//! catch it (`Toc::parse` for the footer, digest, JSON and chunk table;
//! `layer::entries` for xattr encoding; `Tree::build` for paths and links),
//! and through the snapshotter in a fallback to a normal Prepare. Never a
//! panic, a hang, or a file served from outside the layer. Layers that only
//! *look* hostile (absolute names, symlinks pointing out, duplicates) are
//! legal tar and must be served with tar semantics, contained in the mount.
//!
//! Blobs come from `common::estargz`, a writer following the reference
//! implementation whose TOC the tests edit before finishing the blob, so the
//! compression is always valid and only the TOC lies.

mod common;

use std::collections::BTreeSet;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::estargz::{self, Entry, Format, Layer, DEFAULT_CHUNK};
use common::noise;
use serde_json::json;
use shoal::error::Error;
use shoal::metadata::Kind;
use shoal::remote::fetch::decode_chunk;
use shoal::remote::layer::entries;
use shoal::remote::toc::{
    parse_footer, Compression, Footer, Toc, TocError, FOOTER_FETCH, MAX_CHUNK, MAX_TOC_COMPRESSED,
};
use shoal_fuse::{NodeKind, Tree, TreeError, NAME_MAX};

const FORMATS: [Format; 2] = [Format::Estargz, Format::ZstdChunked];

/// Deterministic, poorly compressible bytes.
fn footer(blob: &[u8]) -> Result<Footer, TocError> {
    let size = blob.len() as u64;
    let tail = &blob[blob.len().saturating_sub(FOOTER_FETCH as usize)..];
    parse_footer(tail, size)
}

/// What the snapshotter does with a blob: footer, then the verified TOC.
fn parse(blob: &[u8], digest: &str) -> Result<Toc, TocError> {
    let f = footer(blob)?;
    Toc::parse(
        &blob[f.toc_offset as usize..(f.toc_offset + f.toc_len) as usize],
        &f,
        digest,
    )
}

/// Which check refused a layer.
#[derive(Debug)]
enum Refused {
    Toc(TocError),
    Tree(TreeError),
}

/// Everything up to the mount: TOC, FUSE entries, inode tree.
fn serve(blob: &[u8], digest: &str) -> Result<(Toc, Tree), Refused> {
    let toc = parse(blob, digest).map_err(Refused::Toc)?;
    let tree = Tree::build(entries(&toc).map_err(Refused::Toc)?).map_err(Refused::Tree)?;
    Ok((toc, tree))
}

fn serve_layer(l: &Layer) -> Result<(Toc, Tree), Refused> {
    let (blob, digest) = l.blob();
    serve(&blob, &digest)
}

/// The tree error a layer must end in; the TOC itself must be acceptable, so
/// the refusal provably comes from the tree.
fn tree_error(l: &Layer) -> TreeError {
    match serve_layer(l) {
        Err(Refused::Tree(e)) => e,
        Err(Refused::Toc(e)) => panic!("expected a tree error, the TOC was refused: {e}"),
        Ok(_) => panic!("expected a tree error, the layer was served"),
    }
}

/// The `(entry name, problem)` of a TOC entry error.
fn entry_error(l: &Layer) -> (String, String) {
    match serve_layer(l) {
        Err(Refused::Toc(TocError::Entry { name, problem })) => (name, problem),
        Err(e) => panic!("expected a TOC entry error, got {e:?}"),
        Ok(_) => panic!("expected a TOC entry error, the layer was served"),
    }
}

fn malformed(blob: &[u8], digest: &str) -> String {
    match parse(blob, digest) {
        Err(TocError::Malformed(m)) => m,
        Err(e) => panic!("expected a malformed TOC, got {e:?}"),
        Ok(_) => panic!("expected a malformed TOC, it parsed"),
    }
}

fn footer_error(blob: &[u8]) -> String {
    match footer(blob) {
        Err(TocError::Footer(m)) => m,
        other => panic!("expected a footer error, got {other:?}"),
    }
}

/// Names in the root, without the eStargz TOC's own entry (which a full
/// unpack of an eStargz layer leaves there, and Shoal may serve the same way).
fn layer_names(t: &Tree) -> Vec<String> {
    t.root()
        .children()
        .map(|(n, _, _)| String::from_utf8_lossy(n).into_owned())
        .filter(|n| n != estargz::TOC_TAR_NAME)
        .collect()
}

fn layer(format: Format, entries: &[Entry]) -> Layer {
    Layer::new(format, DEFAULT_CHUNK, entries)
}

/// The tree of a layer that must be served.
fn tree_of(l: &Layer) -> Tree {
    match serve_layer(l) {
        Ok((_, t)) => t,
        Err(e) => panic!("layer refused: {e:?}"),
    }
}

/// TOC indices of `name`'s reg entry and its chunk entries.
fn chunk_entries(l: &mut Layer, name: &str) -> Vec<usize> {
    l.entries_mut()
        .iter()
        .enumerate()
        .filter(|(_, e)| e["name"] == name && (e["type"] == "reg" || e["type"] == "chunk"))
        .map(|(i, _)| i)
        .collect()
}

/// `big`: 10000 bytes in 4096-byte chunks (three chunk entries).
fn chunked(format: Format) -> Layer {
    Layer::new(
        format,
        4096,
        &[
            Entry::dir("d/"),
            Entry::file("d/small", "hello\n"),
            Entry::file("big", noise(10_000, 1)),
            Entry::file("after", "after\n"),
        ],
    )
}

// ---------------------------------------------------------------------------
// The writer itself.

#[test]
fn the_writer_produces_layers_the_reader_and_other_tools_accept() {
    let big = noise(150_000, 7);
    let files = [
        Entry::dir("etc/"),
        Entry::file("etc/hostname", "shoal\n").mode(0o600),
        Entry::file("big.bin", big.clone()),
        Entry::file("empty", ""),
        Entry::symlink("sh", "busybox"),
        Entry::hardlink("hostname2", "etc/hostname"),
        Entry::fifo("fifo"),
        Entry::char_dev("null", 1, 3),
        Entry::file(&format!("long/{}", "n".repeat(150)), "long name\n"),
        Entry::file("x", "x").xattr("user.k", b"v\0binary"),
    ];
    for format in FORMATS {
        let l = Layer::new(format, 65536, &files);
        let (blob, digest) = l.blob();
        let f = footer(&blob).unwrap();
        assert_eq!(f.payload_end, l.payload.len() as u64, "{format:?}");
        let (toc, tree) = serve(&blob, &digest).unwrap();
        assert_eq!(
            toc.compression,
            match format {
                Format::Estargz => Compression::Gzip,
                Format::ZstdChunked => Compression::Zstd,
            }
        );
        // Every chunk lies in its own member and verifies; files reassemble.
        for (e, chunks) in toc.entries.iter().zip(&toc.files) {
            let mut whole = Vec::new();
            for c in chunks {
                let b = &blob[c.blob_offset as usize..c.blob_end as usize];
                whole.extend_from_slice(&decode_chunk(toc.compression, b, c).unwrap());
            }
            if e.kind == "reg" {
                assert_eq!(estargz::sha256(&whole), e.digest, "{format:?} {}", e.name);
            }
        }
        let i = toc
            .entries
            .iter()
            .position(|e| e.name == "big.bin")
            .unwrap();
        assert_eq!(toc.files[i].len(), 3, "150000 bytes in 64 KiB chunks");
        assert_eq!(tree.lookup_path("null").unwrap().device(), (1, 3));
        assert_eq!(
            tree.lookup_path("hostname2").unwrap().ino(),
            tree.lookup_path("etc/hostname").unwrap().ino()
        );
        assert_eq!(
            tree.lookup_path("x").unwrap().xattr(b"user.k"),
            Some(&b"v\0binary"[..])
        );

        // The whole blob is also a valid tar.gz / tar.zst for runtimes that
        // do not lazy-pull: decompress it and read the tar with `tar`.
        let raw: Box<dyn std::io::Read> = match format {
            Format::Estargz => Box::new(flate2::read::MultiGzDecoder::new(&blob[..])),
            Format::ZstdChunked => Box::new(zstd::stream::read::Decoder::new(&blob[..]).unwrap()),
        };
        let mut ar = tar::Archive::new(raw);
        let mut seen = Vec::new();
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            let name = e.path().unwrap().to_string_lossy().into_owned();
            if name == "big.bin" {
                let mut b = Vec::new();
                std::io::Read::read_to_end(&mut e, &mut b).unwrap();
                assert_eq!(b, big);
            }
            if name == "x" {
                let pax: Vec<_> = e
                    .pax_extensions()
                    .unwrap()
                    .unwrap()
                    .map(|p| p.unwrap().key().unwrap().to_owned())
                    .collect();
                assert_eq!(pax, ["SCHILY.xattr.user.k"]);
            }
            seen.push(name);
        }
        assert_eq!(seen.len(), files.len(), "{format:?}: {seen:?}");
        assert!(seen.contains(&format!("long/{}", "n".repeat(150))));
    }

    // Byte-level: the footer is laid out as the reference writer lays it out
    // (compare with the ctr-remote fixture, which differs only in the offset).
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
    for (ext, format) in [("esgz", Format::Estargz), ("zstd", Format::ZstdChunked)] {
        let fixture = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().and_then(|x| x.to_str()) == Some(ext))
            .map(|p| std::fs::read(p).unwrap())
            .unwrap();
        let (ours, _) = Layer::new(format, 65536, &files).blob();
        let (a, b) = (&fixture[fixture.len() - 51..], &ours[ours.len() - 51..]);
        match format {
            Format::Estargz => {
                assert_eq!(a[..16], b[..16]);
                assert_eq!(a[32..], b[32..]);
            }
            Format::ZstdChunked => {
                assert_eq!(a[3..11], b[3..11]);
                assert_eq!(a[35..], b[35..], "manifest type and magic");
            }
        }
    }

    // An independent reader: Python's gzip (checks every member's CRC) and
    // tarfile, on the eStargz blob.
    let (blob, digest) = Layer::new(Format::Estargz, 65536, &files).blob();
    let tmp = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(tmp.path(), &blob).unwrap();
    let script = r#"
import gzip, hashlib, io, json, sys, tarfile
b = open(sys.argv[1], 'rb').read()
members = tarfile.open(fileobj=io.BytesIO(gzip.decompress(b)), ignore_zeros=True).getmembers()
off = int(b[-51 + 16:-51 + 32], 16)
toc = tarfile.open(fileobj=io.BytesIO(gzip.decompress(b[off:-51]))).extractfile('stargz.index.json').read()
print(len(members), 'sha256:' + hashlib.sha256(toc).hexdigest(), len(json.loads(toc)['entries']))
"#;
    match std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(tmp.path())
        .output()
    {
        Ok(out) => {
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let toc = parse(&blob, &digest).unwrap();
            let chunks = toc.files.iter().map(Vec::len).sum::<usize>();
            let n_chunk_entries = chunks - toc.files.iter().filter(|f| !f.is_empty()).count();
            assert_eq!(
                String::from_utf8_lossy(&out.stdout).trim(),
                format!(
                    "{} {digest} {}",
                    files.len() + 1, // + stargz.index.json
                    toc.entries.len() + n_chunk_entries
                )
            );
        }
        Err(e) => eprintln!("python3 not available ({e}); skipping the independent check"),
    }
}

// ---------------------------------------------------------------------------
// Names.

#[test]
fn names_that_climb_out_of_the_layer_are_refused() {
    for format in FORMATS {
        for name in [
            "../evil",
            "a/../../evil",
            "/../evil",
            "./../../etc/passwd",
            "a/b/../../../x",
        ] {
            let l = layer(format, &[Entry::dir("a/"), Entry::file(name, "x")]);
            assert_eq!(
                tree_error(&l),
                TreeError::Escapes {
                    path: name.to_owned()
                },
                "{format:?} {name}"
            );
        }
        // A hardlink whose target climbs out is refused the same way.
        let l = layer(format, &[Entry::hardlink("h", "../../../etc/shadow")]);
        assert_eq!(tree_error(&l), TreeError::Escapes { path: "h".into() });
        // Lexical `..` that stays inside resolves, as in tar.
        let t = tree_of(&layer(
            format,
            &[Entry::file("a/../b", "b"), Entry::file("c/./d/../e", "e")],
        ));
        assert!(t.lookup_path("b").is_some());
        assert!(t.lookup_path("c/e").is_some());
        assert!(t.lookup_path("a").is_none(), "`a` was never created");
    }
}

#[test]
fn absolute_names_are_relative_to_the_layer_root() {
    let mut l = layer(
        Format::Estargz,
        &[
            Entry::file("/etc/passwd", "root:x:0:0:layer:/:/bin/sh\n"),
            Entry::file("//usr///bin/./env", "env"),
            Entry::dir("/").mode(0o700),
        ],
    );
    let t = tree_of(&l);
    let p = t.lookup_path("etc/passwd").unwrap();
    assert_eq!((p.kind(), p.size()), (NodeKind::File, 27));
    assert!(t.lookup_path("usr/bin/env").is_some());
    assert_eq!(t.root().mode(), 0o700, "`/` names the layer root");
    assert_eq!(layer_names(&t), ["etc", "usr"]);
    // The root may only be a directory.
    l.entry_mut("/").insert("type".into(), json!("reg"));
    assert_eq!(tree_error(&l), TreeError::RootNotDir { path: "/".into() });
}

#[test]
fn paths_through_a_symlink_are_refused_not_followed() {
    let l = layer(
        Format::Estargz,
        &[
            Entry::symlink("etc", "/etc"),
            Entry::file("etc/cron.d/evil", "* * * * * root sh\n"),
        ],
    );
    assert_eq!(
        tree_error(&l),
        TreeError::NotADirectory {
            path: "etc/cron.d/evil".into(),
            parent: "etc".into()
        }
    );
}

#[test]
fn nul_bytes_and_over_long_names_are_refused() {
    let cases: [(Entry, TreeError); 4] = [
        (
            Entry::file("a\0b", "x"),
            TreeError::Nul {
                path: "a\0b".into(),
                field: "path",
            },
        ),
        (
            Entry::symlink("l", "/etc/passwd\0.txt"),
            TreeError::Nul {
                path: "l".into(),
                field: "link target",
            },
        ),
        (
            Entry::file("x", "x").xattr("user.a\0b", b"v"),
            TreeError::Nul {
                path: "x".into(),
                field: "xattr name",
            },
        ),
        (
            Entry::file(&format!("d/{}", "n".repeat(NAME_MAX + 1)), "x"),
            TreeError::NameTooLong {
                path: format!("d/{}", "n".repeat(NAME_MAX + 1)),
            },
        ),
    ];
    for (e, want) in cases {
        let l = layer(Format::ZstdChunked, &[e]);
        // The JSON carries the NUL escaped; the TOC itself parses.
        assert_eq!(tree_error(&l), want);
    }
    // Exactly NAME_MAX is fine, and so is a path far longer than PATH_MAX
    // made of short components (no recursion on depth).
    let deep = vec!["d"; 20_000].join("/");
    let t = tree_of(&layer(
        Format::ZstdChunked,
        &[
            Entry::file(&"n".repeat(NAME_MAX), "x"),
            Entry::file(&format!("{deep}/leaf"), "leaf"),
        ],
    ));
    assert!(t.lookup_path(&"n".repeat(NAME_MAX)).is_some());
    assert!(t.lookup_path(&format!("{deep}/leaf")).is_some());
}

#[test]
fn duplicate_names_follow_tar_the_later_entry_wins() {
    let l = layer(
        Format::Estargz,
        &[
            Entry::file("f", "first"),
            Entry::file("f", "second!"),
            Entry::dir("d/"),
            Entry::file("d/child", "c"),
            Entry::file("d", "now a file"),
            Entry::file("g", "g"),
            Entry::dir("g/"),
        ],
    );
    let (toc, t) = serve_layer(&l).unwrap();
    let f = t.lookup_path("f").unwrap();
    assert_eq!(f.size(), 7);
    assert_eq!(toc.entries[f.data_id().unwrap() as usize].size, 7);
    let d = t.lookup_path("d").unwrap();
    assert_eq!((d.kind(), d.size()), (NodeKind::File, 10));
    assert!(
        t.lookup_path("d/child").is_none(),
        "the subtree went with it"
    );
    assert_eq!(t.lookup_path("g").unwrap().kind(), NodeKind::Dir);
    assert_eq!(layer_names(&t), ["d", "f", "g"]);
}

// ---------------------------------------------------------------------------
// Links.

#[test]
fn symlinks_pointing_out_are_kept_verbatim() {
    let targets = ["/etc/shadow", "../../..", "/", "../../../../proc/self/root"];
    let entries: Vec<Entry> = targets
        .iter()
        .enumerate()
        .map(|(i, t)| Entry::symlink(&format!("l{i}"), t))
        .collect();
    let t = tree_of(&layer(Format::ZstdChunked, &entries));
    for (i, target) in targets.iter().enumerate() {
        let n = t.lookup_path(&format!("l{i}")).unwrap();
        assert_eq!(n.kind(), NodeKind::Symlink);
        assert_eq!(n.symlink_target(), Some(target.as_bytes()));
    }
    // An empty target is not a symlink.
    let l = layer(Format::ZstdChunked, &[Entry::symlink("e", "x")]);
    let mut l2 = l.clone();
    l2.entry_mut("e").insert("linkName".into(), json!(""));
    assert_eq!(
        tree_error(&l2),
        TreeError::EmptySymlink { path: "e".into() }
    );
}

#[test]
fn hardlinks_to_nothing_to_directories_or_in_cycles_are_refused() {
    let missing = |path: &str, target: &str| TreeError::HardlinkMissing {
        path: path.into(),
        target: target.into(),
    };
    let cases: Vec<(Vec<Entry>, TreeError)> = vec![
        (vec![Entry::hardlink("h", "nope")], missing("h", "nope")),
        (vec![Entry::hardlink("h", "h")], missing("h", "h")),
        (
            // A cycle: the first link's target does not exist yet.
            vec![Entry::hardlink("a", "b"), Entry::hardlink("b", "a")],
            missing("a", "b"),
        ),
        (
            // Forward reference: links bind to what exists at that point.
            vec![Entry::hardlink("h", "f"), Entry::file("f", "x")],
            missing("h", "f"),
        ),
        (
            vec![Entry::dir("d/"), Entry::hardlink("h", "d")],
            TreeError::HardlinkToDir {
                path: "h".into(),
                target: "d".into(),
            },
        ),
        (
            vec![Entry::hardlink("h", "")],
            TreeError::HardlinkToDir {
                path: "h".into(),
                target: "".into(),
            },
        ),
        (
            // Through a symlink: lookup does not follow it.
            vec![
                Entry::dir("real/"),
                Entry::file("real/f", "x"),
                Entry::symlink("s", "real"),
                Entry::hardlink("h", "s/f"),
            ],
            missing("h", "s/f"),
        ),
    ];
    for (entries, want) in cases {
        let l = layer(Format::Estargz, &entries);
        assert_eq!(tree_error(&l), want);
    }
    // A chain of links binds to the one file; nlink counts every name.
    let t = tree_of(&layer(
        Format::Estargz,
        &[
            Entry::file("f", "x"),
            Entry::hardlink("h1", "f"),
            Entry::hardlink("h2", "h1"),
            Entry::hardlink("h3", "/./f"),
        ],
    ));
    let f = t.lookup_path("f").unwrap();
    assert_eq!(f.nlink(), 4);
    for h in ["h1", "h2", "h3"] {
        assert_eq!(t.lookup_path(h).unwrap().ino(), f.ino());
    }
}

// ---------------------------------------------------------------------------
// The chunk table.

#[test]
fn chunk_offsets_outside_the_payload_are_refused() {
    for format in FORMATS {
        let base = chunked(format);
        let (blob, _) = base.blob();
        let f = footer(&blob).unwrap();
        let blob_len = blob.len() as u64;
        // (chunk entry of `big` to edit, new offset)
        let cases = [
            (0, blob_len + 4096),   // past the blob
            (0, f.payload_end + 1), // inside the TOC
            (2, f.payload_end),     // the last chunk starts where the TOC does
            (0, 0),                 // a data chunk at offset 0
            (0, u64::MAX),          // overflow bait
        ];
        for (k, offset) in cases {
            let mut l = base.clone();
            let idx = chunk_entries(&mut l, "big")[k];
            l.entries_mut()[idx]["offset"] = json!(offset);
            // Refused at `big`, or at the entry before it when a lying
            // offset ends that entry's chunk past the payload.
            let (name, problem) = entry_error(&l);
            assert!(["d/small", "big"].contains(&name.as_str()), "{name}");
            assert!(
                problem.contains("outside the payload"),
                "{format:?} chunk {k} at {offset}: {problem}"
            );
        }
        // Offsets out of order make an earlier chunk end before it starts.
        let mut l = base.clone();
        let idx = chunk_entries(&mut l, "big");
        let first = l.entries_mut()[idx[0]]["offset"].clone();
        let second = l.entries_mut()[idx[1]]["offset"].clone();
        l.entries_mut()[idx[0]]["offset"] = second;
        l.entries_mut()[idx[1]]["offset"] = first;
        let (_, problem) = entry_error(&l);
        assert!(problem.contains("outside the payload"), "{problem}");
    }
}

#[test]
fn chunks_that_leave_gaps_overlap_or_miscount_the_size_are_refused() {
    for format in FORMATS {
        let base = chunked(format);
        let edit = |f: &dyn Fn(&mut Layer, &[usize])| {
            let mut l = base.clone();
            let idx = chunk_entries(&mut l, "big");
            f(&mut l, &idx);
            entry_error(&l)
        };
        let (name, p) = edit(&|l, idx| l.entries_mut()[idx[1]]["chunkOffset"] = json!(4097));
        assert_eq!(
            (name.as_str(), p.as_str()),
            ("big", "chunks leave a gap or overlap at offset 4096")
        );
        let (_, p) = edit(&|l, idx| l.entries_mut()[idx[1]]["chunkOffset"] = json!(4000));
        assert_eq!(p, "chunks leave a gap or overlap at offset 4096");
        // A missing middle chunk is a gap too.
        let (_, p) = edit(&|l, idx| {
            l.entries_mut().remove(idx[1]);
        });
        assert_eq!(p, "chunks leave a gap or overlap at offset 4096");
        // `size` claiming more than the chunks cover.
        let (_, p) = edit(&|l, idx| {
            l.entries_mut()[idx[2]]["chunkSize"] = json!(10_000 - 8192);
            l.entries_mut()[idx[0]]["size"] = json!(1u64 << 40);
        });
        assert_eq!(
            p,
            format!("chunks cover 10000 bytes of a {}-byte file", 1u64 << 40)
        );
        // A sized last chunk running past `size`.
        let (_, p) = edit(&|l, idx| l.entries_mut()[idx[2]]["chunkSize"] = json!(4096));
        assert_eq!(p, "chunks cover 12288 bytes of a 10000-byte file");
        // The rest-of-file chunk starting past the end.
        let (_, p) = edit(&|l, idx| {
            l.entries_mut()[idx[0]]["size"] = json!(8000);
        });
        assert_eq!(p, "chunk offset past end of file");
        // Without `size`, a file is empty and its `offset` means nothing;
        // chunks after it are content it does not have.
        let mut l = base.clone();
        l.entry_mut("d/small").remove("size");
        tree_of(&l);
        let chunk = json!({"name": "d/small", "type": "chunk", "chunkSize": 6,
                           "offset": l.entry_mut("d/small")["offset"].clone(),
                           "chunkDigest": estargz::sha256(b"hello\n")});
        let at = chunk_entries(&mut l, "d/small")[0] + 1;
        l.entries_mut().insert(at, chunk);
        let (name, p) = entry_error(&l);
        assert_eq!(
            (name.as_str(), p.as_str()),
            ("d/small", "chunks cover 6 bytes of a 0-byte file")
        );
    }
}

#[test]
fn oversized_chunks_are_refused_before_anything_is_allocated() {
    for format in FORMATS {
        let base = chunked(format);
        let mut l = base.clone();
        let idx = chunk_entries(&mut l, "big");
        l.entries_mut()[idx[1]]["chunkSize"] = json!(MAX_CHUNK + 1);
        let (_, p) = entry_error(&l);
        assert_eq!(
            p,
            format!(
                "chunk of {} bytes exceeds the {MAX_CHUNK}-byte limit",
                MAX_CHUNK + 1
            )
        );
        // A single-chunk file whose size alone is over the limit.
        let mut l = base.clone();
        l.entry_mut("d/small")
            .insert("size".into(), json!(1u64 << 40));
        let (name, p) = entry_error(&l);
        assert_eq!(name, "d/small");
        assert!(p.starts_with("chunk of 1099511627776 bytes exceeds"), "{p}");
        // A compressed chunk over the limit needs a huge blob; the check only
        // looks at the footer, so claim one instead of writing it.
        let mut l = base.clone();
        let idx = chunk_entries(&mut l, "big");
        let start = l.entries_mut()[idx[2]]["offset"].as_u64().unwrap();
        let after = start + MAX_CHUNK + (1 << 20) + 1;
        l.entry_mut("after").insert("offset".into(), json!(after));
        let (blob, digest) = l.blob();
        let mut f = footer(&blob).unwrap();
        let toc = &blob[f.toc_offset as usize..(f.toc_offset + f.toc_len) as usize];
        f.payload_end = 1 << 40;
        match Toc::parse(toc, &f, &digest) {
            Err(TocError::Entry { name, problem }) => {
                assert_eq!(name, "big");
                assert_eq!(problem, "compressed chunk larger than the limit");
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn a_toc_that_lies_about_a_chunk_is_caught_by_its_digest() {
    // Consistent in itself, so the TOC is accepted; the bytes give it away.
    let base = chunked(Format::Estargz);
    let mut under = base.clone();
    let idx = chunk_entries(&mut under, "big");
    under.entries_mut()[idx[0]]["size"] = json!(9_999);
    let mut swapped = base.clone();
    swapped.entries_mut()[idx[1]]["chunkDigest"] =
        json!(estargz::sha256(&noise(10_000, 1)[..4096]));
    for (l, want) in [
        (under, "sha256 does not match chunkDigest"),
        (swapped, "sha256 does not match chunkDigest"),
    ] {
        assert!(l.payload == base.payload, "only the TOC differs");
        let (blob, digest) = l.blob();
        let toc = parse(&blob, &digest).unwrap();
        let i = toc.entries.iter().position(|e| e.name == "big").unwrap();
        let errors: Vec<String> = toc.files[i]
            .iter()
            .filter_map(|c| {
                let b = &blob[c.blob_offset as usize..c.blob_end as usize];
                decode_chunk(toc.compression, b, c).err()
            })
            .collect();
        assert_eq!(errors, [want]);
    }
}

// ---------------------------------------------------------------------------
// Types, chunk records, xattrs.

#[test]
fn unknown_types_and_orphan_chunks_are_refused() {
    for kind in ["sock", "whiteout", "REG", ""] {
        let mut l = layer(Format::Estargz, &[Entry::fifo("x")]);
        l.entry_mut("x").insert("type".into(), json!(kind));
        let (name, p) = entry_error(&l);
        assert_eq!(
            (name.as_str(), p),
            ("x", format!("unknown entry type {kind:?}"))
        );
    }
    let mut l = layer(Format::Estargz, &[Entry::fifo("x")]);
    l.entry_mut("x").remove("type");
    let (blob, digest) = l.blob();
    assert!(malformed(&blob, &digest).contains("missing field `type`"));

    let orphan = json!({"name": "big", "type": "chunk", "offset": 10, "chunkOffset": 0,
                        "chunkDigest": estargz::sha256(b"")});
    for before in [None, Some(Entry::dir("d/")), Some(Entry::symlink("s", "t"))] {
        let mut l = layer(Format::Estargz, &before.into_iter().collect::<Vec<_>>());
        l.entries_mut().push(orphan.clone());
        let (name, p) = entry_error(&l);
        assert_eq!(
            (name.as_str(), p.as_str()),
            ("big", "chunk entry does not follow a regular file")
        );
    }
}

#[test]
fn xattrs_that_are_not_base64_are_refused_and_overlay_ones_are_dropped() {
    let mut l = layer(
        Format::Estargz,
        &[Entry::file("x", "x").xattr("user.a", b"v")],
    );
    l.entry_mut("x")
        .insert("xattrs".into(), json!({"user.a": "not base64!"}));
    let (blob, digest) = l.blob();
    let toc = parse(&blob, &digest).expect("the TOC is well formed JSON");
    match entries(&toc) {
        Err(TocError::Entry { name, problem }) => {
            assert_eq!(name, "x");
            assert!(
                problem.starts_with("xattr \"user.a\" is not base64"),
                "{problem}"
            );
        }
        other => panic!("{other:?}"),
    }

    let smuggled = [
        ("trusted.overlay.opaque", &b"y"[..]),
        ("trusted.overlay.redirect", b"/etc"),
        ("trusted.overlay.origin", b"\0\xfb"),
        ("user.overlay.opaque", b"y"),
        ("user.overlay.metacopy", b""),
    ];
    let mut d = Entry::dir("d/").xattr("user.keep", b"kept");
    let mut f = Entry::file("d/f", "x").xattr("security.capability", b"\x01\0\0\x02");
    for (k, v) in smuggled {
        d = d.xattr(k, v);
        f = f.xattr(k, v);
    }
    let t = tree_of(&layer(Format::Estargz, &[d, f, Entry::dir("e/")]));
    let names = |p: &str| -> Vec<String> {
        t.lookup_path(p)
            .unwrap()
            .xattrs()
            .map(|(k, _)| String::from_utf8_lossy(k).into_owned())
            .collect()
    };
    assert_eq!(names("d"), ["user.keep"]);
    assert_eq!(names("d/f"), ["security.capability"]);
    assert!(names("e").is_empty());
}

// ---------------------------------------------------------------------------
// The TOC as a whole: JSON, size, footer, digest.

#[test]
fn a_toc_that_is_not_json_or_not_a_toc_is_refused() {
    for format in FORMATS {
        let l = layer(format, &[Entry::file("f", "x")]);
        for (toc, want) in [
            (&b"{not json"[..], "key must be a string"),
            (b"", "EOF while parsing"),
            (b"null", "invalid type: null"),
            (b"{\"entries\": 5}", "invalid type: integer `5`"),
            (
                b"{\"entries\": [{\"name\": 5, \"type\": \"reg\"}]}",
                "invalid type: integer",
            ),
            (
                b"{\"entries\": [{\"name\": \"f\", \"type\": \"reg\", \"size\": -1}]}",
                "invalid value",
            ),
            (b"\xff\xfe{}", "expected value"),
        ] {
            let (blob, digest) = l.blob_with_toc(toc);
            let m = malformed(&blob, &digest);
            assert!(
                m.contains(want),
                "{format:?} {:?}: {m}",
                String::from_utf8_lossy(toc)
            );
        }
    }
    // eStargz: the TOC tar must hold stargz.index.json, and be gzip at all.
    let l = layer(Format::Estargz, &[Entry::file("f", "x")]);
    let (good, digest) = l.blob();
    let f = footer(&good).unwrap();
    let json = serde_json::to_vec(&l.toc).unwrap();
    let mut tar = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_size(json.len() as u64);
    h.set_cksum();
    tar.append_data(&mut h, "evil.json", &json[..]).unwrap();
    let tar = tar.into_inner().unwrap();
    for (toc, want) in [
        (
            estargz::compress(Format::Estargz, &tar),
            "TOC tar entry is \"evil.json\"",
        ),
        (estargz::compress(Format::Estargz, &[]), "empty TOC tar"),
        (b"plainly not gzip".to_vec(), "invalid gzip header"),
    ] {
        let mut blob = l.payload.clone();
        blob.extend_from_slice(&toc);
        blob.extend_from_slice(&estargz::gzip_footer(f.toc_offset));
        let m = malformed(&blob, &digest);
        assert!(m.contains(want), "{m}");
    }
    let (blob, digest) = Layer::new(Format::ZstdChunked, 1, &[]).blob();
    let mut blob2 = blob.clone();
    let f = footer(&blob).unwrap();
    blob2[f.toc_offset as usize] ^= 0xff; // the zstd frame magic
    assert!(malformed(&blob2, &digest).contains("Unknown frame descriptor"));
}

#[test]
fn footers_pointing_outside_the_blob_are_refused() {
    // eStargz: the offset is all the footer says.
    let l = layer(Format::Estargz, &[Entry::file("f", "x")]);
    let (blob, _) = l.blob();
    let n = blob.len() as u64;
    for toc_offset in [n, n - 50, u64::MAX, 1u64 << 63] {
        let mut b = blob.clone();
        let at = b.len() - 51;
        b.splice(at.., estargz::gzip_footer(toc_offset));
        assert_eq!(
            footer_error(&b),
            "TOC offset beyond the footer",
            "{toc_offset}"
        );
    }
    let mut b = blob.clone();
    let at = b.len() - 51 + 16;
    b[at..at + 16].copy_from_slice(b"00000000000000zz");
    assert_eq!(footer_error(&b), "TOC offset is not hex");
    let mut b = blob.clone();
    let at = b.len() - 51 + 32;
    b[at..at + 6].copy_from_slice(b"STARGY");
    assert_eq!(footer_error(&b), "no eStargz or zstd:chunked footer magic");

    // zstd:chunked: offset and length.
    let l = layer(Format::ZstdChunked, &[Entry::file("f", "x")]);
    let (blob, _) = l.blob();
    let n = blob.len() as u64;
    for (off, len, want) in [
        (n, 1, "TOC extends past the end of the blob"),
        (8, n, "TOC extends past the end of the blob"),
        (u64::MAX, 2, "TOC extends past the end of the blob"),
        (8, u64::MAX, "TOC extends past the end of the blob"),
        (7, 1, "TOC offset < 8"),
        (0, 0, "TOC offset < 8"),
    ] {
        let mut b = blob.clone();
        let at = b.len() - 48;
        b.splice(at.., estargz::zstd_footer(off, len, 0));
        assert_eq!(footer_error(&b), want, "{off} {len}");
    }
    // A TOC longer than the limit, claimed by the footer of a (claimed)
    // large blob: refused before it is fetched.
    let tail = estargz::zstd_footer(8, MAX_TOC_COMPRESSED + 1, 0);
    assert_eq!(
        parse_footer(&[vec![0; 3], tail].concat(), 1 << 30)
            .unwrap_err()
            .to_string(),
        "not an eStargz or zstd:chunked blob: TOC larger than the limit"
    );
    assert_eq!(footer_error(&[0u8; 47]), "blob too small for a footer");
    assert_eq!(
        footer_error(&[0u8; 51]),
        "no eStargz or zstd:chunked footer magic"
    );
}

#[test]
fn a_toc_that_does_not_hash_to_the_annotation_is_refused() {
    for format in FORMATS {
        let l = layer(format, &[Entry::file("f", "x")]);
        let (blob, digest) = l.blob();
        // The annotation of another (honest) layer.
        let (_, other) = layer(format, &[Entry::file("f", "y")]).blob();
        match parse(&blob, &other) {
            Err(TocError::DigestMismatch { expected, actual }) => {
                assert_eq!((expected, actual), (other.clone(), digest.clone()));
            }
            r => panic!("{format:?}: {r:?}"),
        }
        for bad in ["", "sha256:", "md5:abc", "SHA256:00"] {
            assert!(matches!(
                parse(&blob, bad),
                Err(TocError::DigestMismatch { .. })
            ));
        }
    }
}

#[test]
fn two_hundred_thousand_entries_parse_in_bounded_time_and_memory() {
    const DIRS: usize = 1000;
    const PER_DIR: usize = 199;
    let mut json = String::from("{\"version\":1,\"entries\":[");
    for d in 0..DIRS {
        json.push_str(&format!(
            "{{\"name\":\"d{d:04}/\",\"type\":\"dir\",\"mode\":493}},"
        ));
        for f in 0..PER_DIR {
            json.push_str(&format!(
                "{{\"name\":\"d{d:04}/f{f:03}\",\"type\":\"reg\",\"mode\":420,\"modtime\":\"{}\"}},",
                estargz::MTIME
            ));
        }
    }
    json.pop();
    json.push_str("]}");
    let n = DIRS * (PER_DIR + 1);
    let (blob, digest) =
        Layer::new(Format::ZstdChunked, DEFAULT_CHUNK, &[]).blob_with_toc(json.as_bytes());

    let started = Instant::now();
    let toc = parse(&blob, &digest).unwrap();
    let parsed = started.elapsed();
    let tree = Tree::build(entries(&toc).unwrap()).unwrap();
    let total = started.elapsed();
    assert_eq!(toc.entries.len(), n);
    assert_eq!(tree.len(), n + 1);
    assert_eq!(tree.dirent_count(), n);
    let heap = tree.heap_bytes();
    let toc_heap: usize = toc
        .entries
        .iter()
        .map(|e| {
            std::mem::size_of_val(e) + e.name.capacity() + e.mod_time.capacity() + e.kind.capacity()
        })
        .sum::<usize>()
        + toc.files.capacity() * std::mem::size_of::<Vec<()>>();
    println!(
        "{n} entries: TOC JSON {} bytes ({} compressed); parse+verify {parsed:?}, \
         + entries + Tree::build {total:?}; Tree::heap_bytes {heap} ({} per entry); \
         Toc held by the mount about {toc_heap} bytes ({} per entry)",
        json.len(),
        blob.len(),
        heap / n,
        toc_heap / n
    );
    // Bounded: about 70 bytes per entry plus names (tree.rs), nothing
    // quadratic. Generous bounds: this is a debug build on a shared machine.
    assert!(heap < n * 128, "Tree::heap_bytes {heap}");
    assert!(total < Duration::from_secs(30), "{total:?}");
}

// ---------------------------------------------------------------------------
// Through the snapshotter.

/// The root's mounts, from /proc/self/mountinfo.
fn mounts_under(root: &Path) -> Vec<String> {
    let root = root.canonicalize().unwrap();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_owned))
        .filter(|p| Path::new(p).starts_with(&root))
        .collect()
}

#[test]
fn hostile_layers_fall_back_to_a_normal_prepare() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let escaping = layer(Format::Estargz, &[Entry::file("../../etc/cron.d/x", "x")]);
    let dangling = layer(Format::ZstdChunked, &[Entry::hardlink("h", "/etc/shadow")]);
    let mut past = chunked(Format::Estargz);
    let idx = chunk_entries(&mut past, "big");
    past.entries_mut()[idx[1]]["offset"] = json!(1u64 << 40);
    let mut b64 = layer(Format::Estargz, &[Entry::file("x", "x")]);
    b64.entry_mut("x")
        .insert("xattrs".into(), json!({"user.a": "!!"}));
    let mut sizes = layer(Format::Estargz, &[Entry::dir("a/"), Entry::dir("b/")]);
    for n in ["a/", "b/"] {
        // Non-file sizes are meaningless, and must not poison the usage sum.
        sizes
            .entry_mut(n)
            .insert("size".into(), json!(i64::MAX as u64));
    }
    let (mut outside, digest) = layer(Format::Estargz, &[Entry::file("f", "x")]).blob();
    let at = outside.len() - 51;
    outside.splice(at.., estargz::gzip_footer(1 << 50));
    let (honest, _) = layer(Format::ZstdChunked, &[Entry::file("f", "x")]).blob();

    let cases: Vec<(&str, Vec<u8>, String, &str)> = vec![
        {
            let (b, d) = escaping.blob();
            ("escaping name", b, d, "path escapes the layer root")
        },
        {
            let (b, d) = dangling.blob();
            (
                "dangling hardlink",
                b,
                d,
                "hardlink target \\\"/etc/shadow\\\" does not exist",
            )
        },
        {
            let (b, d) = past.blob();
            ("chunk past the blob", b, d, "is outside the payload")
        },
        {
            let (b, d) = b64.blob();
            ("non-base64 xattr", b, d, "is not base64")
        },
        {
            let (b, d) = escaping.blob_with_toc(b"not json");
            ("not JSON", b, d, "malformed TOC")
        },
        (
            "footer outside",
            outside,
            digest,
            "TOC offset beyond the footer",
        ),
        (
            "digest mismatch",
            honest,
            format!("sha256:{}", "a".repeat(64)),
            "TOC digest mismatch",
        ),
        (
            "tiny blob",
            b"\x1f\x8b".to_vec(),
            estargz::sha256(b""),
            "blob is only 2 bytes",
        ),
    ];
    for (what, blob, digest, reason) in cases {
        let dir = tempfile::tempdir().unwrap();
        let blob = common::MemBlob::new(blob);
        let sn = common::open_snapshotter(dir.path(), blob.clone(), &rt);
        let started = Instant::now();
        let (r, logs) = common::capture_logs(|| {
            sn.create(
                Kind::Active,
                "extract-1",
                None,
                common::labels(&digest, "chain-1"),
            )
        });
        let m = r.unwrap_or_else(|e| panic!("{what}: Prepare failed instead of falling back: {e}"));
        assert!(started.elapsed() < Duration::from_secs(2), "{what}");
        assert_eq!(m.len(), 1, "{what}");
        assert_eq!(
            m[0].r#type, "bind",
            "{what}: a directory for containerd to unpack into"
        );
        assert!(
            matches!(sn.stat("chain-1"), Err(Error::NotFound(_))),
            "{what}: no committed target"
        );
        assert_eq!(sn.stat("extract-1").unwrap().kind, Kind::Active, "{what}");
        let remote = sn.remote().unwrap();
        assert_eq!(remote.stats.fallbacks.load(Ordering::Relaxed), 1, "{what}");
        assert_eq!(remote.stats.mounted.load(Ordering::Relaxed), 0, "{what}");
        assert!(
            logs.contains("falling back to a normal pull") && logs.contains(reason),
            "{what}: expected {reason:?} in the log:\n{logs}"
        );
        assert!(mounts_under(dir.path()).is_empty(), "{what}: left a mount");
        // The fallback snapshot behaves like any other.
        sn.remove("extract-1").unwrap();
    }

    // Sizes on directories are not file bytes: the layer mounts, and its
    // usage counts files only.
    let dir = tempfile::tempdir().unwrap();
    let (b, d) = sizes.blob();
    let sn = common::open_snapshotter(dir.path(), common::MemBlob::new(b), &rt);
    let r = sn.create(
        Kind::Active,
        "extract-1",
        None,
        common::labels(&d, "chain-1"),
    );
    assert!(matches!(r, Err(Error::AlreadyExists(_))), "{r:?}");
    assert_eq!(sn.usage("chain-1").unwrap().size, 0);
    sn.remove("chain-1").unwrap();
}

fn xattr_names(p: &Path) -> Vec<String> {
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    let mut buf = vec![0u8; 4096];
    // SAFETY: `c` is NUL-terminated and `buf` is writable for its length.
    let n = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(n >= 0, "{}", std::io::Error::last_os_error());
    buf[..n as usize]
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

/// Every path under `dir`, without following symlinks.
fn walk(dir: &Path, out: &mut BTreeSet<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        out.insert(p.clone());
        if e.file_type().unwrap().is_dir() {
            walk(&p, out);
        }
    }
}

#[test]
fn a_legal_but_hostile_looking_layer_is_served_contained() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut l = layer(
        Format::Estargz,
        &[
            Entry::symlink("link-to-etc-passwd", "/etc/passwd"),
            Entry::symlink("shadow", "/etc/shadow"),
            Entry::symlink("up", "../../.."),
            Entry::file("/etc/passwd", "root:x:0:0:layer:/:/bin/sh\n"),
            Entry::file("dup", "first"),
            Entry::file("dup", "second"),
            Entry::dir("d/")
                .xattr("trusted.overlay.redirect", b"/etc")
                .xattr("trusted.overlay.opaque", b"y")
                .xattr("user.keep", b"kept"),
            Entry::file("lies/digest", "the bytes are honest"),
            Entry::file("lies/size", "0123456789"),
        ],
    );
    l.entry_mut("lies/digest").insert(
        "chunkDigest".into(),
        json!(estargz::sha256(b"something else")),
    );
    l.entry_mut("lies/size").insert("size".into(), json!(9));
    let (blob, digest) = l.blob();
    let sn = common::open_snapshotter(dir.path(), common::MemBlob::new(blob), &rt);
    let r = sn.create(
        Kind::Active,
        "extract-1",
        None,
        common::labels(&digest, "chain-1"),
    );
    assert!(
        matches!(r, Err(Error::AlreadyExists(_))),
        "mounted lazily: {r:?}"
    );
    let m = sn
        .create(Kind::View, "view-1", Some("chain-1"), Default::default())
        .unwrap();
    let mnt = PathBuf::from(&m[0].source);

    // The mount serves the links themselves. Following one from the host
    // (metadata, open) would resolve against the HOST root, as a symlink on
    // any filesystem does; containers only ever see the layer inside their
    // own root, where the kernel resolves the target. So assert only what
    // the mount serves: readlink and lstat.
    for (name, target) in [
        ("link-to-etc-passwd", "/etc/passwd"),
        ("shadow", "/etc/shadow"),
        ("up", "../../.."),
    ] {
        let p = mnt.join(name);
        assert_eq!(std::fs::read_link(&p).unwrap(), Path::new(target));
        let md = std::fs::symlink_metadata(&p).unwrap();
        assert!(md.file_type().is_symlink(), "{name}");
        assert_eq!(md.len(), target.len() as u64, "{name}");
    }
    // An absolute name is served inside the layer, not over the host's file.
    assert_eq!(
        std::fs::read_to_string(mnt.join("etc/passwd")).unwrap(),
        "root:x:0:0:layer:/:/bin/sh\n"
    );
    assert_eq!(std::fs::read_to_string(mnt.join("dup")).unwrap(), "second");
    assert_eq!(xattr_names(&mnt.join("d")), ["user.keep"]);
    // Lies about content are EIO, promptly.
    for name in ["lies/digest", "lies/size"] {
        let started = Instant::now();
        let err = std::fs::read(mnt.join(name)).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{name}: {err}");
        assert!(started.elapsed() < Duration::from_secs(2), "{name}");
    }
    // Nothing else is there, and nothing escapes the mount.
    let mut all = BTreeSet::new();
    walk(&mnt, &mut all);
    let rel: Vec<String> = all
        .iter()
        .map(|p| {
            assert!(p.starts_with(&mnt));
            p.strip_prefix(&mnt).unwrap().to_string_lossy().into_owned()
        })
        .filter(|p| p != estargz::TOC_TAR_NAME)
        .collect();
    assert_eq!(
        rel,
        [
            "d",
            "dup",
            "etc",
            "etc/passwd",
            "lies",
            "lies/digest",
            "lies/size",
            "link-to-etc-passwd",
            "shadow",
            "up"
        ]
    );
    sn.remove("view-1").unwrap();
    sn.remove("chain-1").unwrap();
}

#[test]
fn a_toc_digest_label_is_never_used_as_a_path() {
    // The annotation comes with the image, so a hostile image chooses it.
    // The snapshotter names its local TOC copy after it: an absolute "digest"
    // would make it write fetched (attacker-chosen) bytes anywhere as root.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let outside = dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    let (blob, _) = layer(Format::Estargz, &[Entry::file("f", "x")]).blob();
    let evil = [
        outside.join("evil").to_str().unwrap().to_owned(),
        format!("sha256:/../../../{}", outside.join("evil").display()),
        format!("sha256:{}/x", "a".repeat(64)),
    ];
    for (i, toc) in evil.iter().enumerate() {
        let root = dir.path().join(format!("root-{i}"));
        let sn = common::open_snapshotter(&root, common::MemBlob::new(blob.clone()), &rt);
        let (r, logs) = common::capture_logs(|| {
            sn.create(
                Kind::Active,
                "extract-1",
                None,
                common::labels(toc, "chain-1"),
            )
        });
        assert_eq!(r.unwrap()[0].r#type, "bind", "{toc}: fallback");
        assert_eq!(
            std::fs::read_dir(&outside).unwrap().count(),
            0,
            "{toc}: wrote outside the snapshotter root"
        );
        assert!(logs.contains("is not a sha256 digest"), "{toc}:\n{logs}");
        assert_eq!(std::fs::read_dir(root.join("tocs")).unwrap().count(), 0);
    }
}

#[test]
fn a_toc_that_failed_verification_is_not_kept_to_poison_later_pulls() {
    // A source that once served a wrong TOC (a corrupting proxy, a lying
    // peer) must not make the layer unmountable on this node for good.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let honest = layer(Format::ZstdChunked, &[Entry::file("f", "x")]);
    let (good, digest) = honest.blob();
    let mut tampered = honest.clone();
    tampered.entry_mut("f").insert("mode".into(), json!(0o4755));
    let (bad, _) = tampered.blob();

    let sn = common::open_snapshotter(dir.path(), common::MemBlob::new(bad), &rt);
    let (r, logs) = common::capture_logs(|| {
        sn.create(
            Kind::Active,
            "extract-1",
            None,
            common::labels(&digest, "chain-1"),
        )
    });
    assert_eq!(r.unwrap()[0].r#type, "bind");
    assert!(logs.contains("TOC digest mismatch"), "{logs}");
    sn.remove("extract-1").unwrap();
    drop(sn);
    assert_eq!(
        std::fs::read_dir(dir.path().join("tocs")).unwrap().count(),
        0,
        "an unverified TOC was kept"
    );

    let sn = common::open_snapshotter(dir.path(), common::MemBlob::new(good), &rt);
    let r = sn.create(
        Kind::Active,
        "extract-2",
        None,
        common::labels(&digest, "chain-1"),
    );
    assert!(matches!(r, Err(Error::AlreadyExists(_))), "lazy now: {r:?}");
    sn.remove("chain-1").unwrap();
}
