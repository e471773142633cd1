//! eStargz and zstd:chunked tables of contents: footer, TOC, chunk table.
//!
//! Both formats end with a footer that locates a JSON TOC (the eStargz
//! `JTOC`); each regular file's content is stored as one or more independently
//! compressed chunks (gzip members or zstd frames) whose blob offsets and
//! uncompressed sha256 (`chunkDigest`) the TOC lists.
//!
//! Trust: [`Toc::parse`] hashes the uncompressed TOC JSON and refuses it
//! unless it equals the digest the manifest annotation vouches for, so every
//! offset and `chunkDigest` used later is anchored in the manifest. The chunk
//! table is validated here (contiguous, in-bounds, bounded sizes), so later
//! code can index it without re-checking.

use std::collections::HashMap;
use std::io::Read;

use base64::Engine as _;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

/// eStargz footer: an empty gzip member whose extra field holds the TOC offset.
pub const GZIP_FOOTER_SIZE: u64 = 51;
/// zstd:chunked footer: a skippable frame (8-byte header + 40-byte payload).
pub const ZSTD_FOOTER_SIZE: u64 = 48;
/// Bytes to fetch from the end of a blob to find either footer.
pub const FOOTER_FETCH: u64 = GZIP_FOOTER_SIZE;
/// Largest compressed TOC any configuration accepts (the footer check; the
/// configured [`TocLimits::max_compressed_bytes`] may only be lower).
pub const MAX_TOC_COMPRESSED: u64 = 64 << 20;
/// Largest uncompressed TOC JSON any configuration accepts.
pub const MAX_TOC_JSON: u64 = 512 << 20;
/// Largest uncompressed chunk accepted; a TOC claiming more is refused, so a
/// hostile TOC cannot make a read allocate without bound.
pub const MAX_CHUNK: u64 = 64 << 20;
/// Name of the landmark file: entries before it form the prefetch set.
pub const PREFETCH_LANDMARK: &str = ".prefetch.landmark";
/// Landmark meaning "prefetch nothing".
pub const NO_PREFETCH_LANDMARK: &str = ".no.prefetch.landmark";

const ZSTD_SKIPPABLE_MAGIC: [u8; 4] = [0x50, 0x2a, 0x4d, 0x18];
const ZSTD_CHUNKED_MAGIC: &[u8; 8] = b"GnUlInUx";

/// How chunks (and the TOC) are compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, Deserialize)]
pub enum Compression {
    /// eStargz: gzip members.
    Gzip,
    /// zstd:chunked: zstd frames.
    Zstd,
}

/// Where the TOC is, from the footer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct Footer {
    /// Compression of chunks and TOC.
    pub compression: Compression,
    /// End of the chunk payload: chunks lie in `[0, payload_end)`.
    pub payload_end: u64,
    /// Offset of the compressed TOC.
    pub toc_offset: u64,
    /// Length of the compressed TOC.
    pub toc_len: u64,
}

impl Footer {
    /// The footer of a zstd:chunked blob whose compressed TOC is `len` bytes
    /// at `offset` (as Shoal's `shoal.toc.position` annotation says), without
    /// reading the blob's real footer.
    ///
    /// # Errors
    /// An offset before the skippable-frame header or a TOC over
    /// [`MAX_TOC_COMPRESSED`].
    pub fn zstd_at(offset: u64, len: u64) -> Result<Footer, TocError> {
        if len > MAX_TOC_COMPRESSED {
            return Err(TocError::Footer(format!(
                "TOC of {len} bytes exceeds {MAX_TOC_COMPRESSED}"
            )));
        }
        Ok(Footer {
            compression: Compression::Zstd,
            payload_end: offset
                .checked_sub(8)
                .ok_or_else(|| TocError::Footer("TOC offset < 8".into()))?,
            toc_offset: offset,
            toc_len: len,
        })
    }
}

/// Errors reading a TOC. Each names what is wrong; a caller adds the layer.
#[derive(Debug, thiserror::Error)]
pub enum TocError {
    /// The footer is neither eStargz nor zstd:chunked.
    #[error("not an eStargz or zstd:chunked blob: {0}")]
    Footer(String),
    /// The TOC does not hash to the digest the manifest vouches for.
    #[error("TOC digest mismatch: manifest says {expected}, TOC hashes to {actual}")]
    DigestMismatch {
        /// From the annotation.
        expected: String,
        /// Computed.
        actual: String,
    },
    /// The TOC could not be decompressed or decoded.
    #[error("malformed TOC: {0}")]
    Malformed(String),
    /// The TOC passes a configured limit ([`TocLimits`]); refused before
    /// the rest of it is read or decoded.
    #[error("TOC refused: {0}")]
    OverLimit(String),
    /// An entry is inconsistent (offsets, sizes, chunk coverage).
    #[error("TOC entry {name:?}: {problem}")]
    Entry {
        /// Entry name.
        name: String,
        /// What is wrong.
        problem: String,
    },
}

/// How large a TOC may be (`[remote]` `toc_max_*`). Peak memory while a TOC
/// is parsed and mounted is bounded by these (see docs/configuration.md):
/// about [`BYTES_PER_ENTRY`] per entry plus twice the JSON bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TocLimits {
    /// Most entries (all of them, `chunk` entries included).
    pub max_entries: u64,
    /// Most bytes of the compressed TOC (checked before it is fetched).
    pub max_compressed_bytes: u64,
    /// Most bytes of the uncompressed JSON (checked while decompressing).
    pub max_json_bytes: u64,
}

impl Default for TocLimits {
    fn default() -> Self {
        use crate::config::{
            DEFAULT_TOC_MAX_COMPRESSED_BYTES, DEFAULT_TOC_MAX_ENTRIES, DEFAULT_TOC_MAX_JSON_BYTES,
        };
        TocLimits {
            max_entries: DEFAULT_TOC_MAX_ENTRIES,
            max_compressed_bytes: DEFAULT_TOC_MAX_COMPRESSED_BYTES,
            max_json_bytes: DEFAULT_TOC_MAX_JSON_BYTES,
        }
    }
}

impl TocLimits {
    /// Refuses a compressed TOC of `len` bytes.
    ///
    /// # Errors
    /// [`TocError::OverLimit`] above `max_compressed_bytes`.
    pub fn check_compressed(&self, len: u64) -> Result<(), TocError> {
        if len > self.max_compressed_bytes {
            return Err(TocError::OverLimit(format!(
                "compressed TOC of {len} bytes exceeds remote.toc_max_compressed_bytes = {}",
                self.max_compressed_bytes
            )));
        }
        Ok(())
    }
}

/// Measured peak memory per TOC entry while a layer is parsed and mounted
/// (the `Toc`, the FUSE tree, and the transient copies of both), for
/// entries with short names; longer names and other strings add about twice
/// their JSON bytes. `tests/toc_limits.rs` measures it (VmHWM of a 2M-entry
/// TOC) and holds the code to it.
pub const BYTES_PER_ENTRY: u64 = 768;

/// Parses a `sha256:HEX` digest.
pub fn parse_digest(s: &str) -> Option<[u8; 32]> {
    let hex = s.strip_prefix("sha256:")?;
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex, &mut out).ok()?;
    Some(out)
}

/// Parses the footer from the last [`FOOTER_FETCH`] bytes of a blob of
/// `blob_size` bytes.
///
/// # Errors
/// [`TocError::Footer`] if neither format matches or offsets are out of range.
pub fn parse_footer(tail: &[u8], blob_size: u64) -> Result<Footer, TocError> {
    let bad = |m: &str| TocError::Footer(m.to_owned());
    if (tail.len() as u64) < ZSTD_FOOTER_SIZE {
        return Err(bad("blob too small for a footer"));
    }
    let z = &tail[tail.len() - ZSTD_FOOTER_SIZE as usize..];
    let footer = if z[..4] == ZSTD_SKIPPABLE_MAGIC && &z[40..48] == ZSTD_CHUNKED_MAGIC {
        let le = |r: std::ops::Range<usize>| u64::from_le_bytes(z[r].try_into().unwrap());
        let toc_offset = le(8..16);
        Footer {
            compression: Compression::Zstd,
            payload_end: toc_offset
                .checked_sub(8)
                .ok_or_else(|| bad("TOC offset < 8"))?,
            toc_offset,
            toc_len: le(16..24),
        }
    } else {
        if tail.len() as u64 != GZIP_FOOTER_SIZE {
            return Err(bad("short eStargz footer"));
        }
        let g = tail;
        // gzip header with FEXTRA; XLEN = 26; subfield "SG", length 22:
        // 16 hex digits of TOC offset, then "STARGZ".
        if g[..4] != [0x1f, 0x8b, 0x08, 0x04]
            || u16::from_le_bytes([g[10], g[11]]) != 26
            || &g[12..14] != b"SG"
            || u16::from_le_bytes([g[14], g[15]]) != 22
            || &g[32..38] != b"STARGZ"
        {
            return Err(bad("no eStargz or zstd:chunked footer magic"));
        }
        let hex = std::str::from_utf8(&g[16..32]).map_err(|_| bad("TOC offset is not hex"))?;
        let toc_offset = u64::from_str_radix(hex, 16).map_err(|_| bad("TOC offset is not hex"))?;
        Footer {
            compression: Compression::Gzip,
            payload_end: toc_offset,
            toc_offset,
            toc_len: blob_size
                .checked_sub(GZIP_FOOTER_SIZE)
                .and_then(|e| e.checked_sub(toc_offset))
                .ok_or_else(|| bad("TOC offset beyond the footer"))?,
        }
    };
    if footer
        .toc_offset
        .checked_add(footer.toc_len)
        .is_none_or(|e| e > blob_size)
    {
        return Err(bad("TOC extends past the end of the blob"));
    }
    if footer.toc_len > MAX_TOC_COMPRESSED {
        return Err(bad("TOC larger than the limit"));
    }
    Ok(footer)
}

/// One TOC entry as JSON (the eStargz `TOCEntry`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RawEntry {
    /// Path in the layer.
    pub name: String,
    /// `dir`, `reg`, `symlink`, `hardlink`, `char`, `block`, `fifo`, `chunk`.
    #[serde(rename = "type")]
    pub kind: String,
    /// File size (reg).
    #[serde(default)]
    pub size: u64,
    /// RFC 3339 modification time.
    #[serde(default, rename = "modtime")]
    pub mod_time: String,
    /// Symlink or hardlink target.
    #[serde(default)]
    pub link_name: String,
    /// tar mode bits.
    #[serde(default)]
    pub mode: i64,
    /// Owner.
    #[serde(default)]
    pub uid: u32,
    /// Group.
    #[serde(default)]
    pub gid: u32,
    /// Blob offset of this entry's (first) chunk.
    #[serde(default)]
    pub offset: u64,
    /// Device numbers.
    #[serde(default)]
    pub dev_major: u32,
    /// Device numbers.
    #[serde(default)]
    pub dev_minor: u32,
    /// Extended attributes; values base64 in JSON.
    #[serde(default)]
    pub xattrs: HashMap<String, String>,
    /// Offset of this chunk within the file.
    #[serde(default)]
    pub chunk_offset: u64,
    /// Uncompressed chunk size (0: the rest of the file).
    #[serde(default)]
    pub chunk_size: u64,
    /// sha256 of the uncompressed chunk.
    #[serde(default)]
    pub chunk_digest: String,
    /// sha256 of the whole file (informational; reads verify chunks).
    #[serde(default)]
    pub digest: String,
}

/// The TOC document: `entries`, and Shoal's startup-set mark (`shoal
/// convert --profile`, docs/format.md); other keys are skipped.
#[derive(Default)]
struct Jtoc {
    entries: Vec<RawEntry>,
    startup: Option<StartupMark>,
}

#[derive(Deserialize)]
struct StartupMark {
    end: u64,
}

/// Deserializes a [`Jtoc`] while counting entries: the entry past
/// `max_entries` stops the parse, so a hostile TOC never materializes more
/// than the limit (`over` tells that error from malformed JSON).
struct JtocSeed<'a> {
    max_entries: u64,
    over: &'a std::cell::Cell<bool>,
}

impl<'de> serde::de::DeserializeSeed<'de> for JtocSeed<'_> {
    type Value = Jtoc;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Jtoc, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> serde::de::Visitor<'de> for JtocSeed<'_> {
    type Value = Jtoc;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a TOC object")
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Jtoc, A::Error> {
        let mut out = Jtoc::default();
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            match key.as_ref() {
                "entries" => {
                    out.entries = map.next_value_seed(EntriesSeed {
                        max_entries: self.max_entries,
                        over: self.over,
                    })?;
                }
                "startup" => out.startup = map.next_value()?,
                _ => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
        }
        Ok(out)
    }
}

struct EntriesSeed<'a> {
    max_entries: u64,
    over: &'a std::cell::Cell<bool>,
}

impl<'de> serde::de::DeserializeSeed<'de> for EntriesSeed<'_> {
    type Value = Vec<RawEntry>;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Vec<RawEntry>, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> serde::de::Visitor<'de> for EntriesSeed<'_> {
    type Value = Vec<RawEntry>;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an array of TOC entries")
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(
        self,
        mut seq: A,
    ) -> Result<Vec<RawEntry>, A::Error> {
        // No size hint: the input is hostile. The Vec grows as entries come.
        let mut out = Vec::new();
        while let Some(e) = seq.next_element::<RawEntry>()? {
            if out.len() as u64 >= self.max_entries {
                self.over.set(true);
                return Err(serde::de::Error::custom("too many entries"));
            }
            out.push(e);
        }
        Ok(out)
    }
}

/// One verified-to-be-consistent chunk of a regular file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chunk {
    /// Offset within the file.
    pub file_offset: u64,
    /// Uncompressed length.
    pub len: u64,
    /// Blob offset of the compressed chunk.
    pub blob_offset: u64,
    /// End (exclusive) of the compressed chunk in the blob.
    pub blob_end: u64,
    /// sha256 of the uncompressed bytes.
    pub digest: [u8; 32],
}

/// A parsed, verified TOC.
#[derive(Debug)]
pub struct Toc {
    /// Entries other than `chunk`, in TOC order.
    pub entries: Vec<RawEntry>,
    /// For `entries[i]` of type `reg`, `files[i]` lists its chunks in file
    /// order, covering `[0, size)` exactly. Empty for other entries.
    pub files: Vec<Vec<Chunk>>,
    /// Blob offset below which entries belong to the prefetch set, from the
    /// `.prefetch.landmark` or Shoal's `startup` mark; `None` without either.
    pub prefetch_end: Option<u64>,
    /// Compression.
    pub compression: Compression,
    /// eStargz only: the TOC's own tar entry, which a full unpack of the
    /// layer writes to the root as `stargz.index.json`. Served as a file so
    /// the tree equals an unpacked layer's exactly.
    pub toc_file: Option<TocFile>,
}

/// The `stargz.index.json` tar entry of an eStargz layer.
#[derive(Debug, Clone)]
pub struct TocFile {
    /// Mode bits from its tar header.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time (seconds).
    pub mtime: i64,
    /// The verified TOC JSON.
    pub json: bytes::Bytes,
}

/// Name of the TOC's tar entry in an eStargz layer.
pub const TOC_TAR_NAME: &str = "stargz.index.json";

impl Toc {
    /// Decompresses `compressed` (the TOC bytes the footer locates), checks
    /// its sha256 against `expected` (`sha256:HEX`), and builds the chunk
    /// table.
    ///
    /// # Errors
    /// [`TocError`] for a digest mismatch, malformed JSON, or inconsistent
    /// entries.
    pub fn parse(compressed: &[u8], footer: &Footer, expected: &str) -> Result<Toc, TocError> {
        Toc::parse_with(compressed, footer, expected, &TocLimits::default())
    }

    /// [`Toc::parse`] within `limits`: the compressed size is checked
    /// first, the JSON size while decompressing, and the entry count while
    /// decoding (the entry past the limit ends the parse).
    ///
    /// # Errors
    /// As [`Toc::parse`], and [`TocError::OverLimit`].
    pub fn parse_with(
        compressed: &[u8],
        footer: &Footer,
        expected: &str,
        limits: &TocLimits,
    ) -> Result<Toc, TocError> {
        limits.check_compressed(compressed.len() as u64)?;
        let (json, header) = decompress_toc(compressed, footer.compression, limits.max_json_bytes)?;
        let actual = format!("sha256:{}", hex::encode(Sha256::digest(&json)));
        if actual != expected {
            return Err(TocError::DigestMismatch {
                expected: expected.to_owned(),
                actual,
            });
        }
        let over = std::cell::Cell::new(false);
        let seed = JtocSeed {
            max_entries: limits.max_entries,
            over: &over,
        };
        let mut de = serde_json::Deserializer::from_slice(&json);
        let jtoc = serde::de::DeserializeSeed::deserialize(seed, &mut de)
            .and_then(|j| de.end().map(|()| j))
            .map_err(|e| {
                if over.get() {
                    TocError::OverLimit(format!(
                        "more than remote.toc_max_entries = {} entries",
                        limits.max_entries
                    ))
                } else {
                    TocError::Malformed(e.to_string())
                }
            })?;
        let startup_end = jtoc.startup.map(|s| s.end);
        let mut toc = build(jtoc.entries, footer)?;
        // A landmark entry wins; otherwise Shoal's startup mark sets the
        // prefetch set (it only selects chunks, so any value is harmless).
        toc.prefetch_end = toc.prefetch_end.or(startup_end);
        toc.toc_file = header.map(|(mode, uid, gid, mtime)| TocFile {
            mode,
            uid,
            gid,
            mtime,
            json: bytes::Bytes::from(json),
        });
        Ok(toc)
    }
}

/// `(mode, uid, gid, mtime)` of the TOC's tar header (eStargz only).
type TocHeader = Option<(u32, u32, u32, i64)>;

fn decompress_toc(
    compressed: &[u8],
    c: Compression,
    max_json: u64,
) -> Result<(Vec<u8>, TocHeader), TocError> {
    let max_json = max_json.min(MAX_TOC_JSON);
    let bad = |e: std::io::Error| TocError::Malformed(e.to_string());
    let mut json = Vec::new();
    let mut header = None;
    match c {
        Compression::Gzip => {
            // A gzip member holding a tar with one entry, stargz.index.json.
            let gz = flate2::read::GzDecoder::new(compressed);
            let mut ar = tar::Archive::new(gz);
            let mut entries = ar.entries().map_err(bad)?;
            let mut e = entries
                .next()
                .ok_or_else(|| TocError::Malformed("empty TOC tar".into()))?
                .map_err(bad)?;
            let name = e.path().map_err(bad)?.to_string_lossy().into_owned();
            if name != TOC_TAR_NAME {
                return Err(TocError::Malformed(format!(
                    "TOC tar entry is {name:?}, expected stargz.index.json"
                )));
            }
            let h = e.header();
            header = Some((
                h.mode().map_err(bad)? & 0o7777,
                h.uid().map_err(bad)? as u32,
                h.gid().map_err(bad)? as u32,
                h.mtime().map_err(bad)? as i64,
            ));
            (&mut e)
                .take(max_json + 1)
                .read_to_end(&mut json)
                .map_err(bad)?;
        }
        Compression::Zstd => {
            let d = zstd::stream::read::Decoder::new(compressed).map_err(bad)?;
            d.take(max_json + 1).read_to_end(&mut json).map_err(bad)?;
        }
    }
    if json.len() as u64 > max_json {
        return Err(TocError::OverLimit(format!(
            "TOC JSON larger than remote.toc_max_json_bytes = {max_json}"
        )));
    }
    Ok((json, header))
}

/// Decodes base64 xattr values.
///
/// # Errors
/// A value that is not base64.
pub fn xattrs(e: &RawEntry) -> Result<Vec<(String, Vec<u8>)>, TocError> {
    let mut out: Vec<(String, Vec<u8>)> = e
        .xattrs
        .iter()
        .map(|(k, v)| {
            base64::engine::general_purpose::STANDARD
                .decode(v)
                .map(|b| (k.clone(), b))
                .map_err(|err| TocError::Entry {
                    name: e.name.clone(),
                    problem: format!("xattr {k:?} is not base64: {err}"),
                })
        })
        .collect::<Result<_, _>>()?;
    out.sort();
    Ok(out)
}

/// Seconds since the epoch of an RFC 3339 time; 0 if absent or unparsable
/// (as the Go reader does).
pub fn mtime(e: &RawEntry) -> i64 {
    time::OffsetDateTime::parse(&e.mod_time, &time::format_description::well_known::Rfc3339)
        .map(|t| t.unix_timestamp())
        .unwrap_or(0)
}

/// Builds the chunk table, compacting `raw` in place to its non-chunk
/// entries: a second vector of entries would double the peak memory.
fn build(mut raw: Vec<RawEntry>, footer: &Footer) -> Result<Toc, TocError> {
    // Blob end of each data entry: the next non-zero offset, or the payload end.
    let mut ends = vec![footer.payload_end; raw.len()];
    let mut next = footer.payload_end;
    for (i, e) in raw.iter().enumerate().rev() {
        ends[i] = next;
        if e.offset != 0 {
            next = e.offset;
        }
    }
    // `raw[..kept]` are the entries so far (`kept <= i`); `files[j]` are the
    // chunks of `raw[j]`.
    let mut kept: usize = 0;
    let mut files: Vec<Vec<Chunk>> = Vec::new();
    let mut prefetch_end = None;
    for i in 0..raw.len() {
        let e = std::mem::take(&mut raw[i]);
        let err = |problem: String| TocError::Entry {
            name: e.name.clone(),
            problem,
        };
        let prev = kept.checked_sub(1).map(|p| &raw[p]);
        match e.kind.as_str() {
            "chunk" => {
                let Some((prev, file)) = prev
                    .filter(|p| p.kind == "reg")
                    .and_then(|p| Some((p, files.last_mut()?)))
                else {
                    return Err(err("chunk entry does not follow a regular file".into()));
                };
                file.push(chunk(&e, prev.size, ends[i], footer).map_err(err)?);
            }
            "reg" | "dir" | "symlink" | "hardlink" | "char" | "block" | "fifo" => {
                if let (Some(prev), Some(chunks)) = (prev, files.last()) {
                    check_coverage(prev, chunks)?;
                }
                let name = e.name.trim_start_matches("./").trim_start_matches('/');
                if name == PREFETCH_LANDMARK {
                    prefetch_end = Some(e.offset);
                } else if name == NO_PREFETCH_LANDMARK {
                    prefetch_end = Some(0);
                }
                let mut chunks = Vec::new();
                if e.kind == "reg" && e.size > 0 {
                    chunks.push(chunk(&e, e.size, ends[i], footer).map_err(err)?);
                }
                raw[kept] = e;
                kept += 1;
                files.push(chunks);
            }
            other => return Err(err(format!("unknown entry type {other:?}"))),
        }
    }
    drop(ends);
    raw.truncate(kept);
    if let (Some(prev), Some(chunks)) = (raw.last(), files.last()) {
        check_coverage(prev, chunks)?;
    }
    Ok(Toc {
        entries: raw,
        files,
        prefetch_end,
        compression: footer.compression,
        toc_file: None,
    })
}

fn chunk(e: &RawEntry, file_size: u64, blob_end: u64, footer: &Footer) -> Result<Chunk, String> {
    let len = if e.chunk_size == 0 {
        file_size
            .checked_sub(e.chunk_offset)
            .ok_or("chunk offset past end of file")?
    } else {
        e.chunk_size
    };
    if len > MAX_CHUNK {
        return Err(format!(
            "chunk of {len} bytes exceeds the {MAX_CHUNK}-byte limit"
        ));
    }
    let digest = parse_digest(&e.chunk_digest)
        .ok_or_else(|| format!("missing or invalid chunkDigest {:?}", e.chunk_digest))?;
    if e.offset == 0 || e.offset >= blob_end || blob_end > footer.payload_end {
        return Err(format!(
            "chunk blob range {}..{blob_end} is outside the payload (0..{})",
            e.offset, footer.payload_end
        ));
    }
    if blob_end - e.offset > MAX_CHUNK + (1 << 20) {
        return Err("compressed chunk larger than the limit".into());
    }
    Ok(Chunk {
        file_offset: e.chunk_offset,
        len,
        blob_offset: e.offset,
        blob_end,
        digest,
    })
}

/// A regular file's chunks must tile `[0, size)` exactly.
fn check_coverage(e: &RawEntry, chunks: &[Chunk]) -> Result<(), TocError> {
    if e.kind != "reg" {
        return Ok(());
    }
    let mut at = 0u64;
    for c in chunks {
        if c.file_offset != at {
            return Err(TocError::Entry {
                name: e.name.clone(),
                problem: format!("chunks leave a gap or overlap at offset {at}"),
            });
        }
        at = at.checked_add(c.len).ok_or_else(|| TocError::Entry {
            name: e.name.clone(),
            problem: "chunk sizes overflow".into(),
        })?;
    }
    if at != e.size {
        return Err(TocError::Entry {
            name: e.name.clone(),
            problem: format!("chunks cover {at} bytes of a {}-byte file", e.size),
        });
    }
    Ok(())
}
