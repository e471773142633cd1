//! Converts one layer: a verified source blob on disk in, a Shoal layer on
//! disk out (see [`super::chunked`]).
//!
//! Invariants: the source's uncompressed tar is copied byte for byte except
//! for the artefacts of a lazy source format (eStargz's `stargz.index.json`
//! and prefetch landmarks), so a plain layer keeps its diff ID. Memory is one
//! chunk plus bounded metadata, whatever the layer's size.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom};
use std::path::Path;

use super::chunked::{ChunkedWriter, LayerInfo};
use super::profile::Profile;
use super::tarstream::{Item, TarStream};

/// How a source layer is compressed, from its media type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceCompression {
    /// Plain tar.
    None,
    /// gzip (one or more members: eStargz too).
    Gzip,
    /// zstd (one or more frames: zstd:chunked too).
    Zstd,
}

/// The compression a layer media type implies, or `None` for a media type
/// that is not a layer Shoal can convert.
pub fn source_compression(media_type: &str) -> Option<SourceCompression> {
    match media_type {
        "application/vnd.oci.image.layer.v1.tar"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar"
        | "application/vnd.docker.image.rootfs.diff.tar" => Some(SourceCompression::None),
        "application/vnd.oci.image.layer.v1.tar+gzip"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
        | "application/vnd.docker.image.rootfs.diff.tar.gzip" => Some(SourceCompression::Gzip),
        "application/vnd.oci.image.layer.v1.tar+zstd"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => {
            Some(SourceCompression::Zstd)
        }
        _ => None,
    }
}

/// Parameters of the output layout.
#[derive(Clone, Copy, Debug)]
pub struct Layout {
    /// Largest chunk of file content per frame; chunks start at file
    /// offsets that are multiples of it.
    pub chunk_size: usize,
    /// zstd level.
    pub level: i32,
}

/// Names that lazy formats add to a layer and that are not image content.
const FORMAT_ARTEFACTS: [&str; 3] = [
    "stargz.index.json",
    ".prefetch.landmark",
    ".no.prefetch.landmark",
];

/// Converts the blob at `src` into `dst`. `lazy_source` drops the
/// artefacts of eStargz / zstd:chunked sources. With a `profile`, the
/// layer's startup set goes first and the TOC marks where it ends (see
/// [`super::profile`]). `progress` is called with the compressed source
/// bytes read so far.
///
/// # Errors
/// A message naming what is wrong (the caller adds the layer digest).
pub fn convert(
    src: &Path,
    compression: SourceCompression,
    lazy_source: bool,
    dst: &Path,
    layout: Layout,
    profile: Option<&Profile>,
    progress: &mut dyn FnMut(u64),
) -> Result<LayerInfo, String> {
    let file = File::open(src).map_err(|e| format!("open {}: {e}", src.display()))?;
    let counted = ProgressReader {
        r: BufReader::with_capacity(1 << 20, file),
        n: 0,
        last: 0,
        f: progress,
    };
    let mut input: Box<dyn Read + '_> = match compression {
        SourceCompression::None => Box::new(counted),
        SourceCompression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(counted)),
        SourceCompression::Zstd => {
            Box::new(zstd::stream::read::Decoder::new(counted).map_err(|e| format!("zstd: {e}"))?)
        }
    };
    let out = super::private_file(dst).map_err(|e| format!("create {}: {e}", dst.display()))?;
    let mut w = ChunkedWriter::new(BufWriter::with_capacity(1 << 20, out), layout.level)
        .map_err(|e| format!("zstd: {e}"))?;
    let mut buf = vec![0u8; layout.chunk_size];
    let mut copier = Copier {
        w: &mut w,
        buf: &mut buf,
        lazy_source,
        dst,
    };
    match profile.filter(|p| !p.paths.is_empty()) {
        None => copier.stream(TarStream::new(input), &HashSet::new())?,
        Some(profile) => {
            // Two passes need the uncompressed tar on disk.
            let plain_path = dst.with_extension("plain");
            let mut plain = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&plain_path)
                .map_err(|e| format!("create {}: {e}", plain_path.display()))?;
            let _ = std::fs::remove_file(&plain_path); // unlinked; gone when closed
            std::io::copy(&mut input, &mut plain)
                .map_err(|e| format!("decompressing the layer: {e}"))?;
            let plan = super::profile::plan(&mut plain, profile)?;
            for r in &plan.startup {
                plain
                    .seek(SeekFrom::Start(r.start))
                    .map_err(|e| e.to_string())?;
                let region = BufReader::new((&mut plain).take(r.end - r.start));
                let mut tar = TarStream::new(region);
                match tar.next_item().map_err(|e| e.to_string())? {
                    Item::Entry { raw, entry } => copier.entry(&mut tar, raw, &entry)?,
                    Item::End(_) => return Err("profile plan points at the end marker".into()),
                }
            }
            copier
                .w
                .mark_startup_end(plan.startup.len() as u64)
                .map_err(|e| copier.io(e))?;
            plain.seek(SeekFrom::Start(0)).map_err(|e| e.to_string())?;
            let reader = Positioned {
                r: BufReader::with_capacity(1 << 20, plain),
                n: 0,
            };
            copier.stream(TarStream::new(reader), &plan.moved)?;
        }
    }
    let (info, out) = w
        .finish()
        .map_err(|e| format!("write {}: {e}", dst.display()))?;
    out.into_inner()
        .map_err(|e| format!("write {}: {}", dst.display(), e.into_error()))?
        .sync_all()
        .map_err(|e| format!("write {}: {e}", dst.display()))?;
    Ok(info)
}

/// Tracks how many bytes were read, so entries can be found by offset.
struct Positioned<R> {
    r: R,
    n: u64,
}

impl<R: Read> Read for Positioned<R> {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        let k = self.r.read(b)?;
        self.n += k as u64;
        Ok(k)
    }
}

/// A reader whose position is known (for skipping moved entries).
trait Position {
    fn position(&self) -> Option<u64>;
}

impl<R> Position for Positioned<R> {
    fn position(&self) -> Option<u64> {
        Some(self.n)
    }
}

impl Position for Box<dyn Read + '_> {
    fn position(&self) -> Option<u64> {
        None
    }
}

/// Copies tar entries into the writer.
struct Copier<'a, W: std::io::Write> {
    w: &'a mut ChunkedWriter<W>,
    buf: &'a mut [u8],
    lazy_source: bool,
    dst: &'a Path,
}

impl<W: std::io::Write> Copier<'_, W> {
    fn io(&self, e: std::io::Error) -> String {
        format!("write {}: {e}", self.dst.display())
    }

    /// Copies every entry of `tar` (except those starting at an offset in
    /// `skip`), the end marker and whatever follows it.
    fn stream<R: Read + Position>(
        &mut self,
        mut tar: TarStream<R>,
        skip: &HashSet<u64>,
    ) -> Result<(), String> {
        loop {
            let start = tar.get_ref().position();
            match tar.next_item().map_err(|e| e.to_string())? {
                Item::End(first) => {
                    self.w.raw(&first).map_err(|e| self.io(e))?;
                    let mut rest = tar.into_inner();
                    loop {
                        let n = rest
                            .read(self.buf)
                            .map_err(|e| format!("reading after the tar end marker: {e}"))?;
                        if n == 0 {
                            return Ok(());
                        }
                        self.w.raw(&self.buf[..n]).map_err(|e| self.io(e))?;
                    }
                }
                Item::Entry { raw, entry } => {
                    if start.is_some_and(|s| skip.contains(&s)) {
                        while tar.read_data(self.buf).map_err(|e| e.to_string())? > 0 {}
                        tar.padding(entry.size).map_err(|e| e.to_string())?;
                    } else {
                        self.entry(&mut tar, raw, &entry)?;
                    }
                }
            }
        }
    }

    /// Copies one entry whose header `tar` just returned.
    fn entry<R: Read>(
        &mut self,
        tar: &mut TarStream<R>,
        raw: Vec<u8>,
        entry: &super::tarstream::TarEntry,
    ) -> Result<(), String> {
        let drop = self.lazy_source && FORMAT_ARTEFACTS.contains(&entry.name.as_str());
        let regular = matches!(entry.typeflag, b'0' | b'7');
        if !drop {
            self.w.raw(&raw).map_err(|e| self.io(e))?;
            self.w.entry(entry);
        }
        loop {
            let n = read_chunk(tar, self.buf).map_err(|e| e.to_string())?;
            if n == 0 {
                break;
            }
            if drop {
                continue;
            }
            if regular {
                self.w.chunk(&self.buf[..n]).map_err(|e| self.io(e))?;
            } else {
                self.w.raw(&self.buf[..n]).map_err(|e| self.io(e))?;
            }
        }
        let pad = tar.padding(entry.size).map_err(|e| e.to_string())?;
        if !drop {
            self.w.raw(&pad).map_err(|e| self.io(e))?;
        }
        Ok(())
    }
}

/// Fills `buf` from the current entry's content (short only at its end).
fn read_chunk<R: Read>(
    tar: &mut TarStream<R>,
    buf: &mut [u8],
) -> Result<usize, super::tarstream::TarError> {
    let mut n = 0;
    while n < buf.len() {
        match tar.read_data(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

struct ProgressReader<'a, R> {
    r: R,
    n: u64,
    last: u64,
    f: &'a mut dyn FnMut(u64),
}

impl<R: Read> Read for ProgressReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let k = self.r.read(buf)?;
        self.n += k as u64;
        if self.n - self.last >= 4 << 20 || k == 0 {
            self.last = self.n;
            (self.f)(self.n);
        }
        Ok(k)
    }
}
