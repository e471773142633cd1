//! Writes a Shoal layer: a `tar+zstd` blob laid out as zstd:chunked (see
//! docs/format.md).
//!
//! The uncompressed stream is the source tar, byte for byte. It is cut into
//! zstd frames so that every chunk of file content starts a frame of its own:
//! header blocks and padding go into "metadata" frames, each content chunk
//! (at most `chunk_size` bytes, at file offsets that are multiples of it)
//! into one frame. After the tar come the TOC (zstd-compressed JSON in a
//! skippable frame) and the 48-byte zstd:chunked footer (a skippable frame),
//! which plain zstd decoders skip.
//!
//! Invariants: output is a pure function of the input and the parameters
//! (one compression level, no threads, no timestamps), so converting twice
//! gives identical bytes. Memory holds one chunk, the pending metadata
//! (flushed at [`MAX_PENDING`]) and the TOC entries.

use std::io::Write;

use base64::Engine as _;
use serde::Serialize;
use sha2::{Digest as _, Sha256};

use super::tarstream::TarEntry;

/// Metadata bytes buffered before they are flushed as a frame of their own.
pub const MAX_PENDING: usize = 1 << 20;
const SKIPPABLE_MAGIC: [u8; 4] = [0x50, 0x2a, 0x4d, 0x18];
const FOOTER_MAGIC: &[u8; 8] = b"GnUlInUx";
/// zstd:chunked manifest type of an eStargz-style JSON TOC.
const MANIFEST_TYPE_TOC: u64 = 1;

/// One TOC entry (the eStargz `TOCEntry` fields Shoal's reader uses).
#[derive(Serialize, Debug, Clone, Default)]
#[serde(rename_all = "camelCase")]
pub struct TocEntry {
    name: String,
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "is_zero")]
    size: u64,
    #[serde(rename = "modtime", skip_serializing_if = "String::is_empty")]
    mod_time: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    link_name: String,
    #[serde(skip_serializing_if = "is_zero_i")]
    mode: i64,
    #[serde(skip_serializing_if = "is_zero")]
    uid: u64,
    #[serde(skip_serializing_if = "is_zero")]
    gid: u64,
    #[serde(skip_serializing_if = "String::is_empty")]
    user_name: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    group_name: String,
    #[serde(skip_serializing_if = "is_zero")]
    offset: u64,
    #[serde(skip_serializing_if = "is_zero_u32")]
    dev_major: u32,
    #[serde(skip_serializing_if = "is_zero_u32")]
    dev_minor: u32,
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    xattrs: std::collections::BTreeMap<String, String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    digest: String,
    #[serde(skip_serializing_if = "is_zero")]
    chunk_offset: u64,
    #[serde(skip_serializing_if = "is_zero")]
    chunk_size: u64,
    #[serde(skip_serializing_if = "String::is_empty")]
    chunk_digest: String,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}
fn is_zero_i(v: &i64) -> bool {
    *v == 0
}
fn is_zero_u32(v: &u32) -> bool {
    *v == 0
}

#[derive(Serialize)]
struct Jtoc<'a> {
    version: u32,
    entries: &'a [TocEntry],
    #[serde(skip_serializing_if = "Option::is_none")]
    startup: Option<Startup>,
}

/// Where a layer's startup set ends (Shoal's TOC extension; other readers
/// ignore it): chunks at blob offsets below `end` are the startup set, which
/// Shoal fetches first on mount.
#[derive(Serialize, Debug, Clone, Copy)]
pub struct Startup {
    /// Blob offset just past the startup set's last chunk.
    pub end: u64,
    /// Files in the startup set.
    pub files: u64,
}

/// What a finished layer is.
#[derive(Debug, Clone, Serialize)]
pub struct LayerInfo {
    /// `sha256:` of the compressed blob.
    pub digest: String,
    /// Blob size.
    pub size: u64,
    /// `sha256:` of the uncompressed tar (the image config's diff ID).
    pub diff_id: String,
    /// `sha256:` of the uncompressed TOC JSON (the TOC annotation).
    pub toc_digest: String,
    /// Uncompressed tar bytes.
    pub uncompressed: u64,
    /// TOC entries other than chunks.
    pub files: u64,
    /// Content chunks.
    pub chunks: u64,
    /// Files laid out first as the startup set (0 without a profile).
    pub startup_files: u64,
    /// Compressed bytes of the startup set.
    pub startup_bytes: u64,
    /// Blob offset up to which a reader fetches the startup set: the first
    /// chunk after it, or the end of the payload (0 without a profile).
    pub startup_fetch_end: u64,
    /// Blob offset of the compressed TOC (after its skippable-frame header).
    pub toc_offset: u64,
    /// Length of the compressed TOC.
    pub toc_len: u64,
}

/// Counts and hashes what passes through.
struct Counting<W> {
    w: W,
    n: u64,
    hash: Sha256,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let k = self.w.write(b)?;
        self.n += k as u64;
        self.hash.update(&b[..k]);
        Ok(k)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.w.flush()
    }
}

/// Builds one layer into `W`.
pub struct ChunkedWriter<W: Write> {
    out: Counting<W>,
    zstd: zstd::bulk::Compressor<'static>,
    pending: Vec<u8>,
    diff: Sha256,
    uncompressed: u64,
    entries: Vec<TocEntry>,
    files: u64,
    chunks: u64,
    /// The regular file being written: index in `entries`, its hash, and
    /// bytes written so far.
    file: Option<(usize, Sha256, u64)>,
    startup: Option<Startup>,
    /// Offset of the first chunk after the startup mark: where a reader's
    /// last startup chunk ends (a chunk ends where the next one starts).
    startup_fetch_end: Option<u64>,
}

impl<W: Write> ChunkedWriter<W> {
    /// A writer compressing at zstd `level`.
    ///
    /// # Errors
    /// zstd refused the level.
    pub fn new(w: W, level: i32) -> std::io::Result<Self> {
        let mut zstd = zstd::bulk::Compressor::new(level)?;
        // Fixed frame parameters: content size in the header (readers can
        // size buffers), no checksum (chunks are verified by sha256).
        zstd.include_contentsize(true)?;
        zstd.include_checksum(false)?;
        zstd.include_dictid(false)?;
        Ok(ChunkedWriter {
            out: Counting {
                w,
                n: 0,
                hash: Sha256::new(),
            },
            zstd,
            pending: Vec::new(),
            diff: Sha256::new(),
            uncompressed: 0,
            entries: Vec::new(),
            files: 0,
            chunks: 0,
            file: None,
            startup: None,
            startup_fetch_end: None,
        })
    }

    /// Appends raw tar bytes that are not file content (headers, padding,
    /// end marker).
    ///
    /// # Errors
    /// Writing the output.
    pub fn raw(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.finish_file();
        self.diff.update(b);
        self.uncompressed += b.len() as u64;
        self.pending.extend_from_slice(b);
        if self.pending.len() >= MAX_PENDING {
            self.flush_pending()?;
        }
        Ok(())
    }

    fn flush_pending(&mut self) -> std::io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let frame = self.zstd.compress(&self.pending)?;
        self.out.write_all(&frame)?;
        self.pending.clear();
        Ok(())
    }

    /// Records a TOC entry for `e` (its header bytes went through [`raw`]).
    /// A regular file's content must follow through [`chunk`].
    ///
    /// [`raw`]: ChunkedWriter::raw
    /// [`chunk`]: ChunkedWriter::chunk
    pub fn entry(&mut self, e: &TarEntry) {
        self.finish_file();
        let kind = match e.typeflag {
            b'0' | b'7' => "reg",
            b'1' => "hardlink",
            b'2' => "symlink",
            b'3' => "char",
            b'4' => "block",
            b'5' => "dir",
            b'6' => "fifo",
            _ => return, // other types carry no tree entry; bytes are kept
        };
        if e.name.is_empty() {
            return; // the root directory itself
        }
        self.files += 1;
        self.entries.push(TocEntry {
            name: e.name.clone(),
            kind,
            size: if kind == "reg" { e.size } else { 0 },
            mod_time: rfc3339(e.mtime),
            link_name: e.link.clone(),
            mode: i64::from(e.mode),
            uid: e.uid,
            gid: e.gid,
            user_name: e.uname.clone(),
            group_name: e.gname.clone(),
            dev_major: e.dev_major,
            dev_minor: e.dev_minor,
            xattrs: e
                .xattrs
                .iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        base64::engine::general_purpose::STANDARD.encode(v),
                    )
                })
                .collect(),
            ..TocEntry::default()
        });
        if kind == "reg" && e.size > 0 {
            self.file = Some((self.entries.len() - 1, Sha256::new(), 0));
        }
    }

    /// Writes one chunk of the current regular file's content as a frame of
    /// its own.
    ///
    /// # Errors
    /// Writing the output.
    pub fn chunk(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.flush_pending()?;
        let offset = self.out.n;
        if self.startup.is_some() && self.startup_fetch_end.is_none() {
            self.startup_fetch_end = Some(offset);
        }
        let frame = self.zstd.compress(data)?;
        self.out.write_all(&frame)?;
        self.diff.update(data);
        self.uncompressed += data.len() as u64;
        self.chunks += 1;
        let digest = format!("sha256:{:x}", Sha256::digest(data));
        let Some((idx, hash, at)) = self.file.as_mut() else {
            return Err(std::io::Error::other("chunk outside a regular file"));
        };
        hash.update(data);
        let chunk_offset = *at;
        *at += data.len() as u64;
        let first = chunk_offset == 0;
        let e = &mut self.entries[*idx];
        let whole = first && data.len() as u64 == e.size;
        let fields = TocEntry {
            name: e.name.clone(),
            kind: "chunk",
            offset,
            chunk_offset,
            chunk_size: if whole { 0 } else { data.len() as u64 },
            chunk_digest: digest,
            ..TocEntry::default()
        };
        if first {
            e.offset = fields.offset;
            e.chunk_size = fields.chunk_size;
            e.chunk_digest = fields.chunk_digest;
        } else {
            self.entries.push(fields);
        }
        Ok(())
    }

    /// Marks everything written so far as the startup set of `files` files.
    ///
    /// # Errors
    /// Writing the output.
    pub fn mark_startup_end(&mut self, files: u64) -> std::io::Result<()> {
        self.finish_file();
        self.flush_pending()?;
        self.startup = Some(Startup {
            end: self.out.n,
            files,
        });
        Ok(())
    }

    fn finish_file(&mut self) {
        if let Some((idx, hash, _)) = self.file.take() {
            self.entries[idx].digest = format!("sha256:{:x}", hash.finalize());
        }
    }

    /// Writes the last frame, the TOC and the footer; returns the layer's
    /// digests and the output.
    ///
    /// # Errors
    /// Writing the output.
    pub fn finish(mut self) -> std::io::Result<(LayerInfo, W)> {
        self.finish_file();
        self.flush_pending()?;
        let json = serde_json::to_vec(&Jtoc {
            version: 1,
            entries: &self.entries,
            startup: self.startup,
        })
        .map_err(std::io::Error::other)?;
        let toc = self.zstd.compress(&json)?;
        let toc_len =
            u32::try_from(toc.len()).map_err(|_| std::io::Error::other("TOC too large"))?;
        self.out.write_all(&SKIPPABLE_MAGIC)?;
        self.out.write_all(&toc_len.to_le_bytes())?;
        let toc_offset = self.out.n;
        self.out.write_all(&toc)?;
        let mut footer = Vec::with_capacity(48);
        footer.extend_from_slice(&SKIPPABLE_MAGIC);
        footer.extend_from_slice(&40u32.to_le_bytes());
        footer.extend_from_slice(&toc_offset.to_le_bytes());
        footer.extend_from_slice(&(toc.len() as u64).to_le_bytes());
        footer.extend_from_slice(&(json.len() as u64).to_le_bytes());
        footer.extend_from_slice(&MANIFEST_TYPE_TOC.to_le_bytes());
        footer.extend_from_slice(FOOTER_MAGIC);
        self.out.write_all(&footer)?;
        self.out.flush()?;
        let info = LayerInfo {
            digest: format!("sha256:{:x}", self.out.hash.finalize()),
            size: self.out.n,
            diff_id: format!("sha256:{:x}", self.diff.finalize()),
            toc_digest: format!("sha256:{:x}", Sha256::digest(&json)),
            uncompressed: self.uncompressed,
            files: self.files,
            chunks: self.chunks,
            startup_files: self.startup.map_or(0, |s| s.files),
            startup_bytes: self.startup.map_or(0, |s| s.end),
            startup_fetch_end: match self.startup {
                Some(_) => self.startup_fetch_end.unwrap_or(toc_offset - 8),
                None => 0,
            },
            toc_offset,
            toc_len: toc.len() as u64,
        };
        Ok((info, self.out.w))
    }
}

/// RFC 3339 UTC time of `secs` since the epoch.
pub fn rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_matches_known_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59Z");
    }
}
