//! A test-only writer of eStargz and zstd:chunked layer blobs.
//!
//! It follows the reference writer (stargz-snapshotter `estargz/estargz.go`
//! `appendTar`, `gzip.go`, `zstdchunked/zstdchunked.go`): the layer is one tar
//! stream cut into independently compressed members (gzip members or zstd
//! frames). A regular file's content starts a new member at every chunk
//! boundary, and the TOC `offset` of that chunk is the member's blob offset;
//! tar headers and padding ride in the member before or after. The TOC JSON
//! follows, as a gzip member holding a tar with `stargz.index.json` (eStargz)
//! or as a zstd frame inside a skippable frame (zstd:chunked), then the footer.
//!
//! What tests need that the reference writer does not give: the TOC is a
//! plain [`serde_json::Value`] the test may edit before the blob is finished,
//! or replace with arbitrary bytes ([`Layer::blob_with_toc`]), so hostile TOCs
//! can lie about names, offsets, sizes and digests while every byte of the
//! blob is still validly compressed. Tar names are written raw (GNU long-name
//! records past 100 bytes), so a hostile name such as `../x` can appear in the
//! tar stream too, as it would in a real hostile layer.

use std::io::Write;

use base64::Engine as _;
use serde_json::{json, Map, Value};
use sha2::{Digest as _, Sha256};

/// Member compression of the blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// gzip members, 51-byte gzip footer.
    Estargz,
    /// zstd frames, 48-byte skippable-frame footer.
    ZstdChunked,
}

/// Chunk size of the reference writer's default (`--estargz-chunk-size`).
pub const DEFAULT_CHUNK: usize = 4 << 20;

/// Name of the TOC's tar entry (eStargz).
pub const TOC_TAR_NAME: &str = "stargz.index.json";

/// The modification time every entry gets.
pub const MTIME: &str = "2024-01-02T03:04:05Z";
const MTIME_SECS: u64 = 1_704_164_645;

/// One tar entry to write.
#[derive(Clone, Debug)]
pub struct Entry {
    /// Name as in the tar and the TOC (`dir/`, `a/b`).
    pub name: String,
    /// TOC type: `reg`, `dir`, `symlink`, `hardlink`, `char`, `block`, `fifo`.
    pub kind: &'static str,
    /// Content (`reg`).
    pub data: Vec<u8>,
    /// Symlink target or hardlink target.
    pub link: String,
    /// Permission bits.
    pub mode: u32,
    /// Extended attributes (PAX `SCHILY.xattr.*` in the tar, base64 in the TOC).
    pub xattrs: Vec<(String, Vec<u8>)>,
    /// Device numbers (`char`, `block`).
    pub dev: (u32, u32),
}

impl Entry {
    fn new(name: &str, kind: &'static str, mode: u32) -> Entry {
        Entry {
            name: name.to_owned(),
            kind,
            data: Vec::new(),
            link: String::new(),
            mode,
            xattrs: Vec::new(),
            dev: (0, 0),
        }
    }
    /// A directory, mode 0755.
    pub fn dir(name: &str) -> Entry {
        Entry::new(name, "dir", 0o755)
    }
    /// A regular file, mode 0644.
    pub fn file(name: &str, data: impl Into<Vec<u8>>) -> Entry {
        Entry {
            data: data.into(),
            ..Entry::new(name, "reg", 0o644)
        }
    }
    /// A symlink to `target` (verbatim).
    pub fn symlink(name: &str, target: &str) -> Entry {
        Entry {
            link: target.to_owned(),
            ..Entry::new(name, "symlink", 0o777)
        }
    }
    /// A hardlink to the entry named `target`.
    pub fn hardlink(name: &str, target: &str) -> Entry {
        Entry {
            link: target.to_owned(),
            ..Entry::new(name, "hardlink", 0o644)
        }
    }
    /// A fifo.
    pub fn fifo(name: &str) -> Entry {
        Entry::new(name, "fifo", 0o644)
    }
    /// A character device.
    pub fn char_dev(name: &str, major: u32, minor: u32) -> Entry {
        Entry {
            dev: (major, minor),
            ..Entry::new(name, "char", 0o644)
        }
    }
    /// With permission bits `mode`.
    pub fn mode(mut self, mode: u32) -> Entry {
        self.mode = mode;
        self
    }
    /// With an extended attribute.
    pub fn xattr(mut self, name: &str, value: &[u8]) -> Entry {
        self.xattrs.push((name.to_owned(), value.to_vec()));
        self
    }
}

/// A layer whose payload (the compressed tar stream) is written and whose
/// TOC may still be edited.
#[derive(Clone, Debug)]
pub struct Layer {
    /// Compression.
    pub format: Format,
    /// The chunk members, up to where the TOC starts.
    pub payload: Vec<u8>,
    /// `{"version": 1, "entries": [...]}`, as the reference writer makes it.
    pub toc: Value,
}

/// `sha256:HEX` of `b`.
pub fn sha256(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

/// One gzip member or zstd frame holding `data`.
pub fn compress(format: Format, data: &[u8]) -> Vec<u8> {
    match format {
        Format::Estargz => {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(data).unwrap();
            gz.finish().unwrap()
        }
        Format::ZstdChunked => zstd::bulk::compress(data, 1).unwrap(),
    }
}

/// The 51-byte eStargz footer: an empty gzip member whose extra field `SG`
/// holds the TOC offset as 16 hex digits followed by `STARGZ`.
pub fn gzip_footer(toc_offset: u64) -> Vec<u8> {
    let mut f = vec![0x1f, 0x8b, 0x08, 0x04, 0, 0, 0, 0, 0, 0xff];
    f.extend_from_slice(&26u16.to_le_bytes());
    f.extend_from_slice(b"SG");
    f.extend_from_slice(&22u16.to_le_bytes());
    f.extend_from_slice(format!("{toc_offset:016x}STARGZ").as_bytes());
    // An empty final stored block, then CRC32 and ISIZE of nothing.
    f.extend_from_slice(&[0x01, 0x00, 0x00, 0xff, 0xff]);
    f.extend_from_slice(&[0; 8]);
    assert_eq!(f.len(), 51);
    f
}

const SKIPPABLE_MAGIC: [u8; 4] = [0x50, 0x2a, 0x4d, 0x18];

fn skippable(payload: &[u8]) -> Vec<u8> {
    let mut f = SKIPPABLE_MAGIC.to_vec();
    f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    f.extend_from_slice(payload);
    f
}

/// The 48-byte zstd:chunked footer: a skippable frame holding the TOC offset
/// (just past the TOC's own skippable-frame header), its compressed and raw
/// lengths, the manifest type (1, CRFS) and `GnUlInUx`.
pub fn zstd_footer(toc_offset: u64, toc_len: u64, toc_raw_len: u64) -> Vec<u8> {
    let mut p = Vec::with_capacity(40);
    for v in [toc_offset, toc_len, toc_raw_len, 1] {
        p.extend_from_slice(&v.to_le_bytes());
    }
    p.extend_from_slice(b"GnUlInUx");
    skippable(&p)
}

/// Appends the TOC (`toc_json`, any bytes) and the footer to `payload`.
/// Returns the blob and `sha256:` of `toc_json`, the digest the manifest
/// annotation would carry.
pub fn finish(format: Format, payload: &[u8], toc_json: &[u8]) -> (Vec<u8>, String) {
    let mut blob = payload.to_vec();
    match format {
        Format::Estargz => {
            let toc_offset = blob.len() as u64;
            // As the reference writer: mode 0, owner 0, mtime 0.
            let mut tar = raw_header(TOC_TAR_NAME, b'0', 0, toc_json.len() as u64, "", 0);
            tar.extend_from_slice(toc_json);
            tar.resize(tar.len().next_multiple_of(512), 0);
            tar.extend_from_slice(&[0; 1024]);
            blob.extend_from_slice(&compress(format, &tar));
            blob.extend_from_slice(&gzip_footer(toc_offset));
        }
        Format::ZstdChunked => {
            let z = compress(format, toc_json);
            let toc_offset = blob.len() as u64 + 8;
            blob.extend_from_slice(&skippable(&z));
            blob.extend_from_slice(&zstd_footer(
                toc_offset,
                z.len() as u64,
                toc_json.len() as u64,
            ));
        }
    }
    (blob, sha256(toc_json))
}

/// A ustar/GNU header block (no long-name records), name and link raw.
fn raw_header(name: &str, typeflag: u8, mode: u32, size: u64, link: &str, mtime: u64) -> Vec<u8> {
    let mut h = tar::Header::new_gnu();
    {
        let old = h.as_old_mut();
        let n = name.len().min(100);
        old.name[..n].copy_from_slice(&name.as_bytes()[..n]);
        let l = link.len().min(100);
        old.linkname[..l].copy_from_slice(&link.as_bytes()[..l]);
    }
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(mtime);
    h.set_size(size);
    h.set_entry_type(tar::EntryType::new(typeflag));
    h.set_cksum();
    h.as_bytes().to_vec()
}

/// A record with data (`L`/`K` long names, `x` PAX), padded to 512.
fn record(name: &str, typeflag: u8, data: &[u8]) -> Vec<u8> {
    let mut out = raw_header(name, typeflag, 0o644, data.len() as u64, "", MTIME_SECS);
    out.extend_from_slice(data);
    out.resize(out.len().next_multiple_of(512), 0);
    out
}

fn pax(records: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in records {
        // "LEN key=value\n", LEN counting itself.
        let body = k.len() + v.len() + 3;
        let mut len = body + 1;
        while len != body + len.to_string().len() {
            len = body + len.to_string().len();
        }
        out.extend_from_slice(format!("{len} {k}=").as_bytes());
        out.extend_from_slice(v);
        out.push(b'\n');
    }
    out
}

/// The tar header records of `e`: long-name, PAX and the header itself.
fn tar_header(e: &Entry) -> Vec<u8> {
    let mut out = Vec::new();
    let with_nul = |s: &str| [s.as_bytes(), b"\0"].concat();
    if e.name.len() > 100 {
        out.extend(record("././@LongLink", b'L', &with_nul(&e.name)));
    }
    if e.link.len() > 100 {
        out.extend(record("././@LongLink", b'K', &with_nul(&e.link)));
    }
    if !e.xattrs.is_empty() {
        let recs: Vec<(String, Vec<u8>)> = e
            .xattrs
            .iter()
            .map(|(k, v)| (format!("SCHILY.xattr.{k}"), v.clone()))
            .collect();
        out.extend(record("PaxHeader", b'x', &pax(&recs)));
    }
    let typeflag = match e.kind {
        "reg" => b'0',
        "hardlink" => b'1',
        "symlink" => b'2',
        "char" => b'3',
        "block" => b'4',
        "dir" => b'5',
        "fifo" => b'6',
        other => panic!("writer: unknown kind {other}"),
    };
    let mut h = raw_header(
        &e.name,
        typeflag,
        e.mode,
        e.data.len() as u64,
        &e.link,
        MTIME_SECS,
    );
    if matches!(e.kind, "char" | "block") {
        let mut hh = tar::Header::from_byte_slice(&h).clone();
        hh.set_device_major(e.dev.0).unwrap();
        hh.set_device_minor(e.dev.1).unwrap();
        hh.set_cksum();
        h = hh.as_bytes().to_vec();
    }
    out.extend(h);
    out
}

/// The compressed stream, cut into members as the reference writer cuts it.
struct Members {
    format: Format,
    out: Vec<u8>,
    open: Option<Vec<u8>>,
}

impl Members {
    fn write(&mut self, b: &[u8]) {
        self.open.get_or_insert_with(Vec::new).extend_from_slice(b);
    }
    fn close(&mut self) {
        if let Some(m) = self.open.take() {
            let c = compress(self.format, &m);
            self.out.extend_from_slice(&c);
        }
    }
    fn offset(&self) -> u64 {
        self.out.len() as u64
    }
}

impl Layer {
    /// Writes `entries` in order, cutting regular files into `chunk_size`
    /// chunks, and builds the TOC the reference writer would.
    pub fn new(format: Format, chunk_size: usize, entries: &[Entry]) -> Layer {
        assert!(chunk_size > 0);
        let mut m = Members {
            format,
            out: Vec::new(),
            open: None,
        };
        let mut toc = Vec::new();
        for e in entries {
            m.write(&tar_header(e));
            let mut ent = Map::new();
            ent.insert("name".into(), json!(e.name));
            ent.insert("type".into(), json!(e.kind));
            if e.kind == "reg" && !e.data.is_empty() {
                ent.insert("size".into(), json!(e.data.len()));
            }
            ent.insert("modtime".into(), json!(MTIME));
            if !e.link.is_empty() {
                ent.insert("linkName".into(), json!(e.link));
            }
            if e.mode != 0 {
                ent.insert("mode".into(), json!(e.mode));
            }
            if matches!(e.kind, "char" | "block") {
                ent.insert("devMajor".into(), json!(e.dev.0));
                ent.insert("devMinor".into(), json!(e.dev.1));
            }
            if !e.xattrs.is_empty() {
                let x: Map<String, Value> = e
                    .xattrs
                    .iter()
                    .map(|(k, v)| {
                        let b64 = base64::engine::general_purpose::STANDARD.encode(v);
                        (k.clone(), json!(b64))
                    })
                    .collect();
                ent.insert("xattrs".into(), Value::Object(x));
            }
            if e.kind != "reg" {
                toc.push(Value::Object(ent));
                continue;
            }
            ent.insert("digest".into(), json!(sha256(&e.data)));
            let mut written = 0;
            while written < e.data.len() {
                let len = chunk_size.min(e.data.len() - written);
                let data = &e.data[written..written + len];
                m.close();
                ent.insert("offset".into(), json!(m.offset()));
                if written > 0 {
                    ent.insert("chunkOffset".into(), json!(written));
                }
                if len == chunk_size {
                    ent.insert("chunkSize".into(), json!(len));
                }
                ent.insert("chunkDigest".into(), json!(sha256(data)));
                m.write(data);
                toc.push(Value::Object(std::mem::take(&mut ent)));
                written += len;
                ent.insert("name".into(), json!(e.name));
                ent.insert("type".into(), json!("chunk"));
            }
            if e.data.is_empty() {
                toc.push(Value::Object(ent));
            }
            let pad = e.data.len().next_multiple_of(512) - e.data.len();
            m.write(&vec![0; pad]);
        }
        m.write(&[0; 1024]);
        m.close();
        Layer {
            format,
            payload: m.out,
            toc: json!({"version": 1, "entries": toc}),
        }
    }

    /// The TOC entries, to edit.
    pub fn entries_mut(&mut self) -> &mut Vec<Value> {
        self.toc["entries"].as_array_mut().unwrap()
    }

    /// The first TOC entry (not `chunk`) named `name`, to edit.
    pub fn entry_mut(&mut self, name: &str) -> &mut Map<String, Value> {
        self.entries_mut()
            .iter_mut()
            .find(|e| e["name"] == name && e["type"] != "chunk")
            .unwrap_or_else(|| panic!("no TOC entry {name:?}"))
            .as_object_mut()
            .unwrap()
    }

    /// The finished blob with the current TOC, and the TOC digest.
    pub fn blob(&self) -> (Vec<u8>, String) {
        self.blob_with_toc(&serde_json::to_vec(&self.toc).unwrap())
    }

    /// The finished blob with `toc_json` (any bytes) as its TOC.
    pub fn blob_with_toc(&self, toc_json: &[u8]) -> (Vec<u8>, String) {
        finish(self.format, &self.payload, toc_json)
    }
}
