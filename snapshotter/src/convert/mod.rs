//! `shoal convert`: rewrites an image's layers into Shoal's format, a
//! `tar+zstd` layer laid out as zstd:chunked with a per-chunk sha256 TOC
//! (docs/format.md).
//!
//! # Layout
//! - [`location`]: registry references and `oci:DIR:TAG` layouts, read
//!   (verified) and written.
//! - [`tarstream`]: a streaming tar reader that keeps the raw header bytes.
//! - [`chunked`]: the layer writer (frames, TOC, footer).
//! - [`layer`]: one source layer to one Shoal layer.
//! - [`image`]: manifests, configs and indexes rewritten around new layers.
//! - [`profile`]: startup profiles: which entries of a layer go first.
//! - [`progress`]: the progress display.
//! - [`cli`]: the `shoal convert` subcommand.
//! - [`profile_cli`]: the `shoal profile show` subcommand.
//! - [`optimize`]: the `shoal optimize` subcommand (convert, run, record,
//!   convert with the profile).
//!
//! # Invariants
//! - Every source byte is checked against the digest that names it before
//!   it is used (manifests, configs, layers).
//! - Nothing is written to the destination until every layer of every
//!   platform has converted; then blobs, then manifests by digest, and the
//!   tag last. An existing destination tag is replaced only with `force`.
//! - Memory is bounded whatever the layer sizes: blobs are staged on disk in
//!   `work_dir` and converted as streams.
//! - Same input and options, same output digests.

pub mod chunked;
pub mod cli;
pub mod image;
pub mod layer;
pub mod location;
pub mod optimize;
pub mod profile;
pub mod profile_cli;
pub mod progress;
pub mod tarstream;

use std::path::PathBuf;

use serde::Serialize;

pub use chunked::LayerInfo;
pub use layer::Layout;
pub use location::{Endpoint, Location};

/// Default largest chunk of file content (see docs/format.md for why).
pub const DEFAULT_CHUNK_SIZE: usize = 1 << 20;
/// Default zstd level (see docs/format.md).
pub const DEFAULT_LEVEL: i32 = 9;
/// Layer media type of Shoal layers.
pub const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
/// TOC digest annotation (shared with eStargz / zstd:chunked readers).
pub const ANNOTATION_TOC_DIGEST: &str = crate::remote::layers::LABEL_TOC_DIGEST;
/// The layer's own digest, so a snapshotter that gets only the descriptor's
/// annotations as labels knows which blob to fetch.
pub const ANNOTATION_LAYER_DIGEST: &str = crate::remote::annotations::LABEL_SHOAL_LAYER_DIGEST;
/// The repository (`HOST/PATH`) the image was converted into: where the
/// snapshotter fetches the blob when no client label says better.
pub const ANNOTATION_SOURCE: &str = crate::remote::annotations::LABEL_SHOAL_SOURCE;
/// `OFFSET:LENGTH` of the compressed TOC in the blob.
pub const ANNOTATION_TOC_POSITION: &str = crate::remote::annotations::LABEL_SHOAL_TOC_POSITION;
/// Blob offset where the startup set ends (only with a profile).
pub const ANNOTATION_STARTUP_END: &str = crate::remote::annotations::LABEL_SHOAL_STARTUP_END;

/// Errors of a conversion. Each names the part of the image at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// Reading the source image (manifest, index, config).
    #[error("source {location}: {reason}")]
    Source {
        /// Which image.
        location: String,
        /// What failed.
        reason: String,
    },
    /// One layer could not be read or converted.
    #[error("layer {digest} ({media_type}): {reason}")]
    Layer {
        /// Source layer digest.
        digest: String,
        /// Its media type.
        media_type: String,
        /// What failed.
        reason: String,
    },
    /// The destination tag exists and `force` was not given.
    #[error("destination {0} exists; pass --force to overwrite it")]
    Exists(String),
    /// Writing the destination.
    #[error("destination {location}: {reason}")]
    Destination {
        /// Which image.
        location: String,
        /// What failed.
        reason: String,
    },
    /// Local staging directory.
    #[error("work directory {path}: {reason}")]
    Work {
        /// The directory.
        path: String,
        /// What failed.
        reason: String,
    },
}

/// What to convert and how.
#[derive(Clone, Debug)]
pub struct Options {
    /// Source image.
    pub src: Location,
    /// Destination image.
    pub dst: Location,
    /// Overwrite an existing destination tag.
    pub force: bool,
    /// Chunking and compression.
    pub layout: Layout,
    /// Where blobs are staged (default: the system temp directory).
    pub work_dir: Option<PathBuf>,
    /// Repository to record in [`ANNOTATION_SOURCE`]; default: the
    /// destination's, for a registry destination.
    pub source_repository: Option<String>,
    /// Startup profile: its files go first in each layer.
    pub profile: Option<profile::Profile>,
    /// Push by digest only and write no tag (`shoal optimize`'s trial
    /// image, which must leave nothing behind).
    pub untagged: bool,
}

/// One converted layer, for the summary.
#[derive(Debug, Clone, Serialize)]
pub struct LayerSummary {
    /// Source layer digest.
    pub source_digest: String,
    /// Source media type.
    pub source_media_type: String,
    /// Source blob size.
    pub source_size: u64,
    /// The Shoal layer.
    #[serde(flatten)]
    pub out: LayerInfo,
}

/// One converted manifest (one platform).
#[derive(Debug, Clone, Serialize)]
pub struct ManifestSummary {
    /// `os/arch[/variant]`, from the index; `None` for a single manifest.
    pub platform: Option<String>,
    /// Source manifest digest.
    pub source_digest: String,
    /// New manifest digest.
    pub digest: String,
    /// Layers in manifest order.
    pub layers: Vec<LayerSummary>,
}

/// What a conversion did (`--json`).
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Source, as given.
    pub source: String,
    /// Destination, as given.
    pub destination: String,
    /// Media type of what the destination tag names.
    pub media_type: String,
    /// Digest of what the destination tag names.
    pub digest: String,
    /// Per platform.
    pub manifests: Vec<ManifestSummary>,
    /// Index entries left out (attestations, unknown platforms).
    pub skipped: Vec<String>,
    /// Seconds the conversion took.
    pub seconds: f64,
}

/// A staging directory removed when dropped: fresh (created exclusively,
/// under a random name, never an existing one) and private (0700), since
/// it holds the layers of private images. Files in it are made with
/// [`private_file`] (0600).
pub(crate) struct Staging(tempfile::TempDir);

impl Staging {
    fn new(base: Option<&PathBuf>) -> Result<Staging, ConvertError> {
        use std::os::unix::fs::PermissionsExt as _;
        let base = base.cloned().unwrap_or_else(std::env::temp_dir);
        tempfile::Builder::new()
            .prefix("shoal-convert-")
            .permissions(std::fs::Permissions::from_mode(0o700))
            .tempdir_in(&base)
            .map(Staging)
            .map_err(|e| ConvertError::Work {
                path: base.display().to_string(),
                reason: e.to_string(),
            })
    }

    /// The directory.
    pub(crate) fn path(&self) -> &std::path::Path {
        self.0.path()
    }
}

/// Creates (or truncates) a staged file, readable by the owner only.
///
/// # Errors
/// As [`std::fs::OpenOptions::open`].
pub(crate) fn private_file(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

/// Converts `opts.src` into `opts.dst`.
///
/// # Errors
/// [`ConvertError`]; the destination is untouched unless the error is a
/// [`ConvertError::Destination`] while publishing.
pub async fn convert(
    registry: crate::registry::Registry,
    opts: &Options,
    progress: &progress::Progress,
) -> Result<Summary, ConvertError> {
    let started = std::time::Instant::now();
    let src = Endpoint::new(opts.src.clone(), registry.clone());
    let dst = Endpoint::new(opts.dst.clone(), registry);
    let dst_err = |reason: String| ConvertError::Destination {
        location: opts.dst.to_string(),
        reason,
    };
    if !opts.force && dst.tag_exists().await.map_err(dst_err)? {
        return Err(ConvertError::Exists(opts.dst.to_string()));
    }
    let staging = Staging::new(opts.work_dir.as_ref())?;
    let source_repo = opts.source_repository.clone().or(match &opts.dst {
        Location::Registry(r) => Some(format!("{}/{}", r.registry, r.repository)),
        Location::Oci { .. } => None,
    });
    let mut conv = image::Converter::new(&src, staging.path(), opts.layout, source_repo, progress);
    conv.profile = opts.profile.clone().map(std::sync::Arc::new);
    let top = conv.image().await?;
    // Publish: blobs, manifests by digest, then the tag.
    progress.note(&format!("pushing to {}", opts.dst));
    for (digest, path) in &conv.blobs {
        dst.put_blob(digest, path).await.map_err(dst_err)?;
    }
    for (media_type, bytes) in &conv.manifests {
        dst.put_manifest(media_type, bytes).await.map_err(dst_err)?;
    }
    dst.put_manifest(&top.0, &top.1).await.map_err(dst_err)?;
    if !opts.untagged {
        dst.tag(&top.0, &top.1).await.map_err(dst_err)?;
    }
    Ok(Summary {
        source: opts.src.to_string(),
        destination: opts.dst.to_string(),
        media_type: top.0,
        digest: location::digest_of(&top.1),
        manifests: conv.summaries,
        skipped: conv.skipped,
        seconds: started.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};

    #[test]
    fn staging_is_fresh_private_and_removed() {
        let base = tempfile::tempdir().unwrap();
        let base_path = base.path().to_path_buf();
        let a = Staging::new(Some(&base_path)).unwrap();
        let b = Staging::new(Some(&base_path)).unwrap();
        assert_ne!(a.path(), b.path(), "a fresh directory each time");
        assert_eq!(a.path().parent(), Some(base.path()));
        let mode = std::fs::metadata(a.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "{mode:o}");
        // A file staged in it is the owner's alone, whatever the umask.
        let f = a.path().join("out-1");
        std::io::Write::write_all(&mut private_file(&f).unwrap(), b"layer").unwrap();
        assert_eq!(std::fs::metadata(&f).unwrap().mode() & 0o777, 0o600);
        let dir = a.path().to_path_buf();
        drop(a);
        assert!(!dir.exists(), "removed when dropped");
    }
}
