//! A streaming tar reader that keeps the raw bytes: each entry comes with
//! the exact header blocks (PAX / GNU long-name records and the header) it
//! was read from, so a converter can copy the archive byte for byte and only
//! change how it is compressed.
//!
//! Invariants: memory is bounded by [`MAX_META`] per entry (file content is
//! never buffered here; the caller reads it with [`TarStream::read_data`]);
//! a header with a bad checksum, a sparse file, a name with a `..` component
//! or an absolute name (or such a hardlink target) is an error, never
//! skipped.

use std::io::Read;

/// Largest PAX or GNU long-name record accepted.
pub const MAX_META: u64 = 1 << 20;
const BLOCK: usize = 512;

/// Errors reading a tar stream.
#[derive(Debug, thiserror::Error)]
pub enum TarError {
    /// Reading the (decompressed) stream failed.
    #[error("reading the tar stream: {0}")]
    Io(#[from] std::io::Error),
    /// The archive is malformed.
    #[error("malformed tar: {0}")]
    Malformed(String),
    /// An entry's path (or hardlink target) would escape the layer root.
    #[error("tar entry {0:?} escapes the layer root (absolute path or `..`)")]
    Escape(String),
    /// A tar feature Shoal does not convert.
    #[error("tar entry {name:?}: {what} is not supported")]
    Unsupported {
        /// Entry name.
        name: String,
        /// What.
        what: &'static str,
    },
}

/// One entry's metadata, with PAX and GNU records applied.
#[derive(Debug, Clone)]
pub struct TarEntry {
    /// Path, cleaned: no `./` prefix, no trailing `/`.
    pub name: String,
    /// Link target (symlink as written; hardlink cleaned like `name`).
    pub link: String,
    /// Type flag of the header (`b'0'`, `b'5'`, ...; `\0` is mapped to `b'0'`).
    pub typeflag: u8,
    /// Content size in the archive.
    pub size: u64,
    /// Mode bits.
    pub mode: u32,
    /// Owner.
    pub uid: u64,
    /// Group.
    pub gid: u64,
    /// Owner name.
    pub uname: String,
    /// Group name.
    pub gname: String,
    /// Modification time, seconds.
    pub mtime: i64,
    /// Device numbers.
    pub dev_major: u32,
    /// Device numbers.
    pub dev_minor: u32,
    /// Extended attributes (`SCHILY.xattr.*` records), sorted by name.
    pub xattrs: Vec<(String, Vec<u8>)>,
}

/// What the stream yields next.
pub enum Item {
    /// An entry: its raw header blocks, then `entry.size` bytes of content
    /// (read with [`TarStream::read_data`]) and [`TarStream::padding`] bytes.
    Entry {
        /// Every block from the first record of this entry to its header.
        raw: Vec<u8>,
        /// The parsed entry.
        entry: TarEntry,
    },
    /// The end-of-archive marker: its first block; the caller copies the
    /// rest of the stream as is.
    End(Vec<u8>),
}

/// A tar archive read from `R`.
pub struct TarStream<R> {
    r: R,
    /// Content bytes of the current entry not yet read.
    remaining: u64,
    /// Global PAX records in force.
    global: Vec<(String, Vec<u8>)>,
}

impl<R: Read> TarStream<R> {
    /// Reads a tar archive from `r`.
    pub fn new(r: R) -> Self {
        TarStream {
            r,
            remaining: 0,
            global: Vec::new(),
        }
    }

    /// The inner reader, borrowed.
    pub fn get_ref(&self) -> &R {
        &self.r
    }

    /// The inner reader (for copying what follows the end marker).
    pub fn into_inner(self) -> R {
        self.r
    }

    /// The next entry or the end marker.
    ///
    /// # Errors
    /// [`TarError`]; also if the previous entry's content was not read.
    pub fn next_item(&mut self) -> Result<Item, TarError> {
        if self.remaining != 0 {
            return Err(TarError::Malformed("entry content not consumed".into()));
        }
        let mut raw = Vec::new();
        let mut pax: Vec<(String, Vec<u8>)> = Vec::new();
        let mut long_name: Option<Vec<u8>> = None;
        let mut long_link: Option<Vec<u8>> = None;
        loop {
            let mut block = [0u8; BLOCK];
            if !read_block(&mut self.r, &mut block)? {
                if raw.is_empty() {
                    // An archive without an end marker: tolerated, as Go's reader does.
                    return Ok(Item::End(Vec::new()));
                }
                return Err(TarError::Malformed("archive ends inside an entry".into()));
            }
            if block.iter().all(|b| *b == 0) {
                if !raw.is_empty() {
                    return Err(TarError::Malformed(
                        "end marker after a PAX/long-name record".into(),
                    ));
                }
                return Ok(Item::End(block.to_vec()));
            }
            let h = tar::Header::from_byte_slice(&block);
            check_checksum(h)?;
            raw.extend_from_slice(&block);
            let size = h
                .entry_size()
                .map_err(|e| TarError::Malformed(format!("header size: {e}")))?;
            let flag = h.as_bytes()[156];
            match flag {
                b'x' | b'g' | b'L' | b'K' => {
                    if size > MAX_META {
                        return Err(TarError::Malformed(format!(
                            "{}-byte PAX/long-name record exceeds {MAX_META}",
                            size
                        )));
                    }
                    let padded = size.div_ceil(BLOCK as u64) * BLOCK as u64;
                    let mut data = vec![0u8; padded as usize];
                    self.r.read_exact(&mut data).map_err(eof)?;
                    raw.extend_from_slice(&data);
                    data.truncate(size as usize);
                    match flag {
                        b'x' => pax.extend(pax_records(&data)?),
                        b'g' => self.global.extend(pax_records(&data)?),
                        b'L' => long_name = Some(trim_nul(data)),
                        _ => long_link = Some(trim_nul(data)),
                    }
                }
                _ => {
                    let entry = self.entry(h, flag, size, &pax, long_name, long_link)?;
                    self.remaining = entry.size;
                    return Ok(Item::Entry { raw, entry });
                }
            }
        }
    }

    fn entry(
        &self,
        h: &tar::Header,
        flag: u8,
        size: u64,
        pax: &[(String, Vec<u8>)],
        long_name: Option<Vec<u8>>,
        long_link: Option<Vec<u8>>,
    ) -> Result<TarEntry, TarError> {
        let rec = |k: &str| {
            pax.iter()
                .rev()
                .chain(self.global.iter().rev())
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
        };
        let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
        let num = |k: &str| rec(k).and_then(|v| text(v).split('.').next()?.parse::<i64>().ok());
        let raw_name = rec("path")
            .or(long_name)
            .unwrap_or_else(|| h.path_bytes().into_owned());
        let raw_name = text(raw_name);
        let name = clean(&raw_name)?;
        let flag = if flag == 0 { b'0' } else { flag };
        let raw_link = rec("linkpath")
            .or(long_link)
            .or_else(|| h.link_name_bytes().map(|c| c.into_owned()))
            .map(text)
            .unwrap_or_default();
        let link = if flag == b'1' {
            clean(&raw_link)?
        } else {
            raw_link
        };
        if flag == b'S' {
            return Err(TarError::Unsupported {
                name,
                what: "a GNU sparse file",
            });
        }
        if rec("GNU.sparse.major").is_some() || rec("GNU.sparse.size").is_some() {
            return Err(TarError::Unsupported {
                name,
                what: "a PAX sparse file",
            });
        }
        let size = match rec("size") {
            Some(v) => text(v)
                .parse::<u64>()
                .map_err(|_| TarError::Malformed(format!("entry {name:?}: bad PAX size")))?,
            None => size,
        };
        let hnum = |r: std::io::Result<u64>, what: &str| {
            r.map_err(|e| TarError::Malformed(format!("entry {name:?}: {what}: {e}")))
        };
        let mut xattrs: Vec<(String, Vec<u8>)> = pax
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix("SCHILY.xattr.")?.to_string(), v.clone())))
            .collect();
        xattrs.sort();
        xattrs.dedup_by(|a, b| a.0 == b.0);
        let dev = |r: std::io::Result<Option<u32>>| r.ok().flatten().unwrap_or(0);
        Ok(TarEntry {
            link,
            typeflag: flag,
            size,
            mode: h
                .mode()
                .map_err(|e| TarError::Malformed(format!("entry {name:?}: mode: {e}")))?,
            uid: match num("uid") {
                Some(v) => v as u64,
                None => hnum(h.uid(), "uid")?,
            },
            gid: match num("gid") {
                Some(v) => v as u64,
                None => hnum(h.gid(), "gid")?,
            },
            uname: rec("uname")
                .map(text)
                .unwrap_or_else(|| text(h.username_bytes().unwrap_or_default().to_vec())),
            gname: rec("gname")
                .map(text)
                .unwrap_or_else(|| text(h.groupname_bytes().unwrap_or_default().to_vec())),
            mtime: match num("mtime") {
                Some(v) => v,
                None => hnum(h.mtime(), "mtime")? as i64,
            },
            dev_major: dev(h.device_major()),
            dev_minor: dev(h.device_minor()),
            xattrs,
            name,
        })
    }

    /// Reads up to `buf.len()` bytes of the current entry's content; 0 at
    /// its end.
    ///
    /// # Errors
    /// The stream ends early.
    pub fn read_data(&mut self, buf: &mut [u8]) -> Result<usize, TarError> {
        let want = (buf.len() as u64).min(self.remaining) as usize;
        if want == 0 {
            return Ok(0);
        }
        self.r.read_exact(&mut buf[..want]).map_err(eof)?;
        self.remaining -= want as u64;
        Ok(want)
    }

    /// Reads the padding after an entry of `size` content bytes.
    ///
    /// # Errors
    /// The stream ends early.
    pub fn padding(&mut self, size: u64) -> Result<Vec<u8>, TarError> {
        let pad = (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64;
        let mut p = vec![0u8; pad as usize];
        self.r.read_exact(&mut p).map_err(eof)?;
        Ok(p)
    }
}

fn eof(e: std::io::Error) -> TarError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        TarError::Malformed("archive ends inside an entry".into())
    } else {
        TarError::Io(e)
    }
}

/// Fills `block`; `false` at a clean end of stream.
fn read_block(r: &mut impl Read, block: &mut [u8; BLOCK]) -> Result<bool, TarError> {
    let mut n = 0;
    while n < BLOCK {
        match r.read(&mut block[n..]) {
            Ok(0) if n == 0 => return Ok(false),
            Ok(0) => return Err(TarError::Malformed("archive ends inside a header".into())),
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(TarError::Io(e)),
        }
    }
    Ok(true)
}

fn check_checksum(h: &tar::Header) -> Result<(), TarError> {
    let b = h.as_bytes();
    let want = h
        .cksum()
        .map_err(|e| TarError::Malformed(format!("header checksum field: {e}")))?;
    let sum: u32 = b[..148]
        .iter()
        .chain(&[b' '; 8])
        .chain(&b[156..])
        .map(|x| u32::from(*x))
        .sum();
    if sum != want {
        return Err(TarError::Malformed(format!(
            "header checksum {want} does not match {sum}"
        )));
    }
    Ok(())
}

fn trim_nul(mut v: Vec<u8>) -> Vec<u8> {
    while v.last() == Some(&0) {
        v.pop();
    }
    v
}

fn pax_records(data: &[u8]) -> Result<Vec<(String, Vec<u8>)>, TarError> {
    tar::PaxExtensions::new(data)
        .map(|r| {
            let r = r.map_err(|e| TarError::Malformed(format!("PAX record: {e}")))?;
            let k = r
                .key()
                .map_err(|_| TarError::Malformed("PAX key is not UTF-8".into()))?;
            Ok((k.to_string(), r.value_bytes().to_vec()))
        })
        .collect()
}

/// Cleans a tar path: refuses absolute paths and `..` components; drops
/// `.` components, a `./` prefix and trailing slashes.
///
/// # Errors
/// [`TarError::Escape`].
pub fn clean(raw: &str) -> Result<String, TarError> {
    if raw.starts_with('/') {
        return Err(TarError::Escape(raw.to_string()));
    }
    let mut parts = Vec::new();
    for c in raw.split('/') {
        match c {
            "" | "." => {}
            ".." => return Err(TarError::Escape(raw.to_string())),
            c => parts.push(c),
        }
    }
    Ok(parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_refuses_escapes() {
        assert_eq!(clean("./a/b/").unwrap(), "a/b");
        assert_eq!(clean("a//./b").unwrap(), "a/b");
        assert_eq!(clean("./").unwrap(), "");
        for bad in ["/etc/passwd", "../x", "a/../../x", "a/.."] {
            assert!(matches!(clean(bad), Err(TarError::Escape(_))), "{bad}");
        }
    }
}
