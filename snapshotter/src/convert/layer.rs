//! Converts one layer: a verified source blob on disk in, a Shoal layer on
//! disk out (see [`super::chunked`]).
//!
//! Invariants: the source's uncompressed tar is copied byte for byte except
//! for the artefacts of a lazy source format (eStargz's `stargz.index.json`
//! and prefetch landmarks), so a plain layer keeps its diff ID. Memory is one
//! chunk plus bounded metadata, whatever the layer's size.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read};
use std::path::Path;

use super::chunked::{ChunkedWriter, LayerInfo};
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
/// artefacts of eStargz / zstd:chunked sources. `progress` is called with
/// the compressed source bytes read so far.
///
/// # Errors
/// A message naming what is wrong (the caller adds the layer digest).
pub fn convert(
    src: &Path,
    compression: SourceCompression,
    lazy_source: bool,
    dst: &Path,
    layout: Layout,
    progress: &mut dyn FnMut(u64),
) -> Result<LayerInfo, String> {
    let file = File::open(src).map_err(|e| format!("open {}: {e}", src.display()))?;
    let counted = ProgressReader {
        r: BufReader::with_capacity(1 << 20, file),
        n: 0,
        last: 0,
        f: progress,
    };
    let input: Box<dyn Read + '_> = match compression {
        SourceCompression::None => Box::new(counted),
        SourceCompression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(counted)),
        SourceCompression::Zstd => Box::new(
            zstd::stream::read::Decoder::new(counted).map_err(|e| format!("zstd: {e}"))?,
        ),
    };
    let out = File::create(dst).map_err(|e| format!("create {}: {e}", dst.display()))?;
    let mut w = ChunkedWriter::new(BufWriter::with_capacity(1 << 20, out), layout.level)
        .map_err(|e| format!("zstd: {e}"))?;
    let mut tar = TarStream::new(input);
    let mut buf = vec![0u8; layout.chunk_size];
    let io = |e: std::io::Error| format!("write {}: {e}", dst.display());
    loop {
        match tar.next_item().map_err(|e| e.to_string())? {
            Item::End(first) => {
                w.raw(&first).map_err(io)?;
                let mut rest = tar.into_inner();
                loop {
                    let n = rest
                        .read(&mut buf)
                        .map_err(|e| format!("reading after the tar end marker: {e}"))?;
                    if n == 0 {
                        break;
                    }
                    w.raw(&buf[..n]).map_err(io)?;
                }
                break;
            }
            Item::Entry { raw, entry } => {
                let drop = lazy_source && FORMAT_ARTEFACTS.contains(&entry.name.as_str());
                let regular = matches!(entry.typeflag, b'0' | b'7');
                if !drop {
                    w.raw(&raw).map_err(io)?;
                    w.entry(&entry);
                }
                loop {
                    let n = read_chunk(&mut tar, &mut buf).map_err(|e| e.to_string())?;
                    if n == 0 {
                        break;
                    }
                    if drop {
                        continue;
                    }
                    if regular {
                        w.chunk(&buf[..n]).map_err(io)?;
                    } else {
                        w.raw(&buf[..n]).map_err(io)?;
                    }
                }
                let pad = tar.padding(entry.size).map_err(|e| e.to_string())?;
                if !drop {
                    w.raw(&pad).map_err(io)?;
                }
            }
        }
    }
    let (info, out) = w.finish().map_err(io)?;
    out.into_inner()
        .map_err(|e| io(e.into_error()))?
        .sync_all()
        .map_err(io)?;
    Ok(info)
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
