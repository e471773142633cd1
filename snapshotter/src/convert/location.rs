//! Where images are read from and written to: a registry reference, or an
//! OCI image layout directory (`oci:DIR[:TAG]`).
//!
//! Invariants: every blob and manifest read is checked against the digest
//! (and blob size) that names it before anyone uses it; a blob is streamed to
//! a file, never held in memory. Writes to a layout replace `index.json`
//! atomically (write, then rename).

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};

use crate::registry::{Reference, Registry};

/// Bytes per Range request when reading a source blob.
pub const FETCH_PIECE: u64 = 8 << 20;
/// Largest manifest or config read.
pub const MAX_JSON: u64 = 4 << 20;
const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// An image location.
#[derive(Clone, Debug)]
pub enum Location {
    /// A registry reference.
    Registry(Reference),
    /// An OCI image layout and a tag in it.
    Oci {
        /// Layout directory.
        dir: PathBuf,
        /// Tag (`org.opencontainers.image.ref.name`).
        tag: String,
    },
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Registry(r) => write!(f, "{r}"),
            Location::Oci { dir, tag } => write!(f, "oci:{}:{tag}", dir.display()),
        }
    }
}

impl std::str::FromStr for Location {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(rest) = s.strip_prefix("oci:") {
            let (dir, tag) = match rest.rsplit_once(':') {
                Some((d, t)) if !t.contains('/') && !t.is_empty() => (d, t),
                _ => (rest, "latest"),
            };
            if dir.is_empty() {
                return Err(format!("{s:?}: empty layout directory"));
            }
            return Ok(Location::Oci {
                dir: dir.into(),
                tag: tag.to_string(),
            });
        }
        s.parse::<Reference>()
            .map(Location::Registry)
            .map_err(|e| format!("{s:?} is neither oci:DIR:TAG nor an image reference: {e}"))
    }
}

/// A location plus the registry client to reach it.
pub struct Endpoint {
    /// Where.
    pub loc: Location,
    registry: Registry,
}

/// sha256 of bytes, as `sha256:HEX`.
pub fn digest_of(b: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(b))
}

fn blob_path(dir: &Path, digest: &str) -> Result<PathBuf, String> {
    let hex = digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|c| c.is_ascii_hexdigit()))
        .ok_or_else(|| format!("{digest:?} is not a sha256 digest"))?;
    Ok(dir.join("blobs/sha256").join(hex))
}

impl Endpoint {
    /// `loc`, reached through `registry` if it is a registry reference.
    pub fn new(loc: Location, registry: Registry) -> Self {
        Endpoint { loc, registry }
    }

    fn with_digest(r: &Reference, digest: &str) -> Reference {
        let mut r = r.clone();
        r.tag = None;
        r.digest = Some(digest.to_string());
        r
    }

    /// The manifest or index the location's tag names (`digest == None`)
    /// or the one with `digest`: (media type, digest, bytes).
    ///
    /// # Errors
    /// Not found, unreadable, or not matching its digest.
    pub async fn manifest(&self, digest: Option<&str>) -> Result<(String, String, Bytes), String> {
        match &self.loc {
            Location::Registry(r) => {
                let r = match digest {
                    Some(d) => Self::with_digest(r, d),
                    None => r.clone(),
                };
                self.registry
                    .fetch_manifest(&r)
                    .await
                    .map_err(|e| e.to_string())
            }
            Location::Oci { dir, tag } => {
                let (digest, declared_type) = match digest {
                    Some(d) => (d.to_string(), None),
                    None => {
                        let index = read_index(dir)?;
                        let desc = index["manifests"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .find(|m| m["annotations"][REF_NAME].as_str() == Some(tag))
                            .ok_or_else(|| {
                                format!("tag {tag:?} not in {}/index.json", dir.display())
                            })?;
                        (
                            desc["digest"].as_str().unwrap_or_default().to_string(),
                            desc["mediaType"].as_str().map(str::to_string),
                        )
                    }
                };
                let path = blob_path(dir, &digest)?;
                let bytes = read_capped(&path, MAX_JSON)?;
                if digest_of(&bytes) != digest {
                    return Err(format!("{} does not hash to {digest}", path.display()));
                }
                let v: Value = serde_json::from_slice(&bytes)
                    .map_err(|e| format!("manifest {digest}: {e}"))?;
                let mt = v["mediaType"]
                    .as_str()
                    .map(str::to_string)
                    .or(declared_type)
                    .unwrap_or_default();
                Ok((mt, digest, Bytes::from(bytes)))
            }
        }
    }

    /// Small JSON blob (a config), verified.
    ///
    /// # Errors
    /// Unreadable, too large or not matching `digest`.
    pub async fn small_blob(&self, digest: &str, size: u64) -> Result<Vec<u8>, String> {
        if size > MAX_JSON {
            return Err(format!("blob {digest}: {size} bytes exceeds {MAX_JSON}"));
        }
        let b = match &self.loc {
            Location::Registry(r) => self
                .registry
                .fetch_range(r, digest, 0, size)
                .await
                .map_err(|e| e.to_string())?
                .to_vec(),
            Location::Oci { dir, .. } => read_capped(&blob_path(dir, digest)?, MAX_JSON)?,
        };
        if b.len() as u64 != size || digest_of(&b) != digest {
            return Err(format!(
                "blob {digest} does not match its descriptor (digest or size {size})"
            ));
        }
        Ok(b)
    }

    /// Streams blob `digest` of `size` bytes into `dst`, checking both.
    /// `progress` gets the bytes copied so far.
    ///
    /// # Errors
    /// Unreadable, or the bytes do not match the descriptor.
    pub async fn fetch_blob(
        &self,
        digest: &str,
        size: u64,
        dst: &Path,
        progress: &mut dyn FnMut(u64),
    ) -> Result<(), String> {
        let mut out =
            super::private_file(dst).map_err(|e| format!("create {}: {e}", dst.display()))?;
        let mut hash = Sha256::new();
        let mut got = 0u64;
        let mut put = |b: &[u8], got: &mut u64| -> Result<(), String> {
            hash.update(b);
            *got += b.len() as u64;
            out.write_all(b)
                .map_err(|e| format!("write {}: {e}", dst.display()))
        };
        match &self.loc {
            Location::Registry(r) => {
                let mut at = 0;
                while at < size {
                    let n = FETCH_PIECE.min(size - at);
                    let b = self
                        .registry
                        .fetch_range(r, digest, at, n)
                        .await
                        .map_err(|e| e.to_string())?;
                    put(&b, &mut got)?;
                    at += n;
                    progress(at);
                }
            }
            Location::Oci { dir, .. } => {
                let path = blob_path(dir, digest)?;
                let mut f =
                    fs::File::open(&path).map_err(|e| format!("open {}: {e}", path.display()))?;
                let mut buf = vec![0u8; 1 << 20];
                loop {
                    let n = f
                        .read(&mut buf)
                        .map_err(|e| format!("read {}: {e}", path.display()))?;
                    if n == 0 {
                        break;
                    }
                    put(&buf[..n], &mut got)?;
                    if got > size {
                        break;
                    }
                    progress(got);
                }
            }
        }
        let actual = format!("sha256:{:x}", hash.finalize());
        if got != size || actual != digest {
            return Err(format!(
                "blob does not match its descriptor: {got} bytes hashing to {actual}, \
                 descriptor says {size} bytes, {digest}"
            ));
        }
        Ok(())
    }

    /// Whether the destination tag exists already.
    ///
    /// # Errors
    /// The registry or layout cannot be read.
    pub async fn tag_exists(&self) -> Result<bool, String> {
        match &self.loc {
            Location::Registry(r) => self
                .registry
                .manifest_exists(r)
                .await
                .map_err(|e| e.to_string()),
            Location::Oci { dir, tag } => {
                if !dir.join("index.json").exists() {
                    return Ok(false);
                }
                Ok(read_index(dir)?["manifests"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|m| m["annotations"][REF_NAME].as_str() == Some(tag)))
            }
        }
    }

    /// Stores the blob at `path` as `digest`.
    ///
    /// # Errors
    /// Upload or copy failed.
    pub async fn put_blob(&self, digest: &str, path: &Path) -> Result<(), String> {
        match &self.loc {
            Location::Registry(r) => self
                .registry
                .push_blob(r, digest, path)
                .await
                .map_err(|e| e.to_string()),
            Location::Oci { dir, .. } => {
                init_layout(dir)?;
                let dst = blob_path(dir, digest)?;
                if dst.exists() {
                    return Ok(());
                }
                let tmp = dst.with_extension("tmp");
                fs::copy(path, &tmp)
                    .and_then(|_| fs::rename(&tmp, &dst))
                    .map_err(|e| format!("write {}: {e}", dst.display()))
            }
        }
    }

    /// Stores a manifest by digest (not tagged).
    ///
    /// # Errors
    /// Upload or write failed.
    pub async fn put_manifest(&self, media_type: &str, bytes: &Bytes) -> Result<(), String> {
        let digest = digest_of(bytes);
        match &self.loc {
            Location::Registry(r) => self
                .registry
                .put_manifest(r, &digest, media_type, bytes.clone())
                .await
                .map_err(|e| e.to_string()),
            Location::Oci { dir, .. } => {
                init_layout(dir)?;
                let dst = blob_path(dir, &digest)?;
                let tmp = dst.with_extension("tmp");
                fs::write(&tmp, bytes)
                    .and_then(|()| fs::rename(&tmp, &dst))
                    .map_err(|e| format!("write {}: {e}", dst.display()))
            }
        }
    }

    /// Points the location's tag at the manifest `bytes` (already stored).
    ///
    /// # Errors
    /// Upload or write failed.
    pub async fn tag(&self, media_type: &str, bytes: &Bytes) -> Result<(), String> {
        match &self.loc {
            Location::Registry(r) => {
                let tag = r.object().to_string();
                self.registry
                    .put_manifest(r, &tag, media_type, bytes.clone())
                    .await
                    .map_err(|e| e.to_string())
            }
            Location::Oci { dir, tag } => {
                let mut index = read_index(dir)?;
                let list = index["manifests"]
                    .as_array_mut()
                    .ok_or("index.json has no manifests list")?;
                list.retain(|m| m["annotations"][REF_NAME].as_str() != Some(tag));
                list.push(json!({
                    "mediaType": media_type,
                    "digest": digest_of(bytes),
                    "size": bytes.len(),
                    "annotations": { REF_NAME: tag },
                }));
                let path = dir.join("index.json");
                let tmp = dir.join("index.json.tmp");
                fs::write(&tmp, serde_json::to_vec(&index).unwrap())
                    .and_then(|()| fs::rename(&tmp, &path))
                    .map_err(|e| format!("write {}: {e}", path.display()))
            }
        }
    }
}

fn read_capped(path: &Path, cap: u64) -> Result<Vec<u8>, String> {
    let f = fs::File::open(path).map_err(|e| format!("open {}: {e}", path.display()))?;
    let mut b = Vec::new();
    f.take(cap + 1)
        .read_to_end(&mut b)
        .map_err(|e| format!("read {}: {e}", path.display()))?;
    if b.len() as u64 > cap {
        return Err(format!("{} exceeds {cap} bytes", path.display()));
    }
    Ok(b)
}

fn read_index(dir: &Path) -> Result<Value, String> {
    let b = read_capped(&dir.join("index.json"), MAX_JSON)?;
    serde_json::from_slice(&b).map_err(|e| format!("{}/index.json: {e}", dir.display()))
}

fn init_layout(dir: &Path) -> Result<(), String> {
    let err = |e: std::io::Error| format!("create OCI layout {}: {e}", dir.display());
    fs::create_dir_all(dir.join("blobs/sha256")).map_err(err)?;
    if !dir.join("oci-layout").exists() {
        fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).map_err(err)?;
    }
    if !dir.join("index.json").exists() {
        fs::write(
            dir.join("index.json"),
            br#"{"schemaVersion":2,"manifests":[]}"#,
        )
        .map_err(err)?;
    }
    Ok(())
}
