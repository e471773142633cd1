//! `shoal pull`: pulling an image into containerd through a snapshotter,
//! adding the labels a remote snapshotter needs itself (as `ctr-remote image
//! rpull` does), so lazy pulls work without CRI and with any client
//! afterwards (`ctr run --snapshotter shoal`, nerdctl).
//!
//! # Layout
//! - [`image`]: resolving the reference: index → platform manifest → config;
//!   chain IDs.
//! - [`containerd`]: the containerd session (namespace and lease headers) and
//!   its calls: leases, snapshots, diff, content labels, images.
//! - [`content`]: writing a blob into containerd's content store.
//! - [`unpack`]: one layer: skip, lazy (Prepare → AlreadyExists) or normal
//!   unpack (fetch → Apply → Commit).
//!
//! # What a pull does (containerd's `client.Pull` + unpacker)
//! 1. Take a lease (expiring after [`LEASE_EXPIRE`]) so GC cannot race the
//!    pull; everything below carries it.
//! 2. Resolve the reference and write the index (if any), manifest and
//!    config into the content store with the GC labels containerd's
//!    `ChildGCLabels` sets (`gc.ref.content.m.N`, `gc.ref.content.config`,
//!    `gc.ref.content.l.N`) and the distribution source.
//! 3. Unpack each layer in order ([`unpack`]).
//! 4. Label the config `containerd.io/gc.ref.snapshot.<snapshotter>` = top
//!    chain ID, then create or update the image record; only then delete the
//!    lease (the image now holds everything).
//!
//! Registry access uses [`crate::registry`]: `hosts.toml` under
//! [`RegistryConfig::config_path`], Docker credentials, and a plain-HTTP
//! fallback for loopback registries. The registry client has no plain-HTTP
//! switch for other hosts; those need `server = "http://..."` in hosts.toml.

pub mod containerd;
pub mod content;
pub mod image;
pub mod unpack;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use containerd_client::types::Descriptor;
use serde::Serialize;

pub use image::Platform;
pub use unpack::{LayerReport, Outcome};

use self::containerd::Session;
use self::content::{Target, Written};
use self::image::{Blob, Image};
use crate::registry::{Reference, Registry, RegistryConfig, RegistryError};

/// How long the pull's lease outlives a pull that died without deleting it.
pub const LEASE_EXPIRE: Duration = Duration::from_secs(3600);
/// Default containerd socket.
pub const DEFAULT_CONTAINERD_ADDRESS: &str = "/run/containerd/containerd.sock";
/// Default containerd namespace.
pub const DEFAULT_NAMESPACE: &str = "default";
/// Default snapshotter name (as registered in containerd's `proxy_plugins`).
pub const DEFAULT_SNAPSHOTTER: &str = "shoal";

/// Errors of a pull.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    /// A bad option or reference.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The registry failed.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// containerd's socket cannot be dialled.
    #[error("connect to containerd at {}: {reason}", path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A containerd call failed.
    #[error("containerd: {op}: {message} ({code:?})")]
    Containerd {
        /// The call, with its object.
        op: String,
        /// gRPC code.
        code: tonic::Code,
        /// containerd's message.
        message: String,
    },
    /// The image's objects are unusable (unparsable, no such platform,
    /// digest mismatch).
    #[error("image {reference}: {reason}")]
    Image {
        /// The reference.
        reference: String,
        /// What is wrong.
        reason: String,
    },
    /// A layer could not be unpacked.
    #[error("layer {digest}: {reason}")]
    Layer {
        /// Its digest.
        digest: String,
        /// What went wrong.
        reason: String,
    },
    /// A protocol invariant broke (containerd or the source misbehaved).
    #[error("{0}")]
    Internal(String),
}

impl PullError {
    pub(crate) fn image(reference: &str, reason: impl Into<String>) -> PullError {
        PullError::Image {
            reference: reference.to_string(),
            reason: reason.into(),
        }
    }
}

/// What to pull into, and how.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// containerd's socket.
    pub containerd_address: PathBuf,
    /// containerd namespace.
    pub namespace: String,
    /// Snapshotter name in containerd.
    pub snapshotter: String,
    /// Platform to pick from an index.
    pub platform: Platform,
    /// Registry access.
    pub registry: RegistryConfig,
}

/// Progress, reported as it happens.
#[derive(Debug)]
pub enum Event<'a> {
    /// The reference is resolved; layers come next.
    Resolved {
        /// The top object (index or manifest) digest.
        digest: &'a str,
        /// The platform manifest's digest.
        manifest: &'a str,
        /// Layers to handle.
        layers: usize,
        /// Their compressed size.
        size: u64,
    },
    /// A layer is done.
    Layer(&'a LayerReport),
}

/// What a pull did.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// The reference as given (also the image name).
    pub reference: String,
    /// Digest of the top object (what the image record points at).
    pub digest: String,
    /// Its media type.
    pub media_type: String,
    /// The platform manifest's digest.
    pub manifest: String,
    /// The config's digest.
    pub config: String,
    /// The platform pulled.
    pub platform: String,
    /// The snapshotter.
    pub snapshotter: String,
    /// Per layer, bottom first.
    pub layers: Vec<LayerReport>,
    /// Layers mounted lazily.
    pub lazy: usize,
    /// Layers unpacked normally.
    pub unpacked: usize,
    /// Layers that were there already.
    pub present: usize,
    /// Bytes this command fetched from the registry (manifests, config,
    /// unpacked layers; not what the snapshotter fetches for lazy layers).
    pub bytes_fetched: u64,
    /// Wall time of the whole pull.
    pub seconds: f64,
}

/// Pulls `image_ref` into containerd through `opts.snapshotter`, reporting
/// progress to `progress`.
///
/// # Errors
/// See [`PullError`]. On error the lease is still deleted, so whatever was
/// written becomes garbage for containerd's GC.
pub async fn pull(
    image_ref: &str,
    opts: &PullOptions,
    progress: &mut (dyn FnMut(Event<'_>) + Send),
) -> Result<Summary, PullError> {
    let started = Instant::now();
    let reference: Reference = image_ref.parse()?;
    if opts.snapshotter.is_empty() {
        return Err(PullError::InvalidArgument("empty snapshotter name".into()));
    }
    let registry = Registry::new(opts.registry.clone())?;
    let channel = crate::client::channel(&opts.containerd_address)
        .await
        .map_err(|e| PullError::Connect {
            path: opts.containerd_address.clone(),
            reason: crate::registry::error::error_chain(&e),
        })?;
    let mut session = Session::new(channel, &opts.namespace, &opts.snapshotter)?;
    session.create_lease(LEASE_EXPIRE).await?;
    let result = pull_leased(&session, &registry, &reference, image_ref, opts, progress).await;
    let deleted = session.delete_lease().await;
    let mut summary = result?;
    deleted?;
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

async fn pull_leased(
    session: &Session,
    registry: &Registry,
    reference: &Reference,
    image_ref: &str,
    opts: &PullOptions,
    progress: &mut (dyn FnMut(Event<'_>) + Send),
) -> Result<Summary, PullError> {
    let image = image::resolve(registry, reference, &opts.platform).await?;
    progress(Event::Resolved {
        digest: &image.top().digest,
        manifest: &image.manifest.digest,
        layers: image.layers.len(),
        size: image.layers.iter().map(|l| l.size).sum(),
    });
    let source = HashMap::from([(
        format!("containerd.io/distribution.source.{}", reference.registry),
        reference.repository.clone(),
    )]);
    store_metadata(session, &image, &source).await?;

    let unpacker = unpack::Unpacker {
        session,
        registry,
        reference,
        image_ref,
        image: &image,
        content_labels: source,
    };
    let mut layers = Vec::with_capacity(image.layers.len());
    for i in 0..image.layers.len() {
        let report = unpacker.layer(i).await?;
        progress(Event::Layer(&report));
        layers.push(report);
    }
    if let Some(top) = image.layers.last() {
        session
            .label_content(
                &image.config.digest,
                HashMap::from([(
                    format!("containerd.io/gc.ref.snapshot.{}", opts.snapshotter),
                    top.chain_id.clone(),
                )]),
            )
            .await?;
    }
    let top = image.top();
    session
        .put_image(
            image_ref,
            Descriptor {
                media_type: top.media_type.clone(),
                digest: top.digest.clone(),
                size: top.size() as i64,
                annotations: HashMap::new(),
            },
        )
        .await?;

    let count = |o| layers.iter().filter(|l| l.outcome == o).count();
    Ok(Summary {
        reference: image_ref.to_string(),
        digest: top.digest.clone(),
        media_type: top.media_type.clone(),
        manifest: image.manifest.digest.clone(),
        config: image.config.digest.clone(),
        platform: opts.platform.to_string(),
        snapshotter: opts.snapshotter.clone(),
        lazy: count(Outcome::Lazy),
        unpacked: count(Outcome::Unpacked),
        present: count(Outcome::Present),
        bytes_fetched: image.metadata_bytes() + layers.iter().map(|l| l.fetched).sum::<u64>(),
        layers,
        seconds: 0.0,
    })
}

/// Writes config, manifest and index (if any) with their GC labels.
async fn store_metadata(
    session: &Session,
    image: &Image,
    source: &HashMap<String, String>,
) -> Result<(), PullError> {
    let mut manifest_labels = source.clone();
    manifest_labels.insert(
        "containerd.io/gc.ref.content.config".into(),
        image.config.digest.clone(),
    );
    for (i, l) in image.layers.iter().enumerate() {
        manifest_labels.insert(
            format!("containerd.io/gc.ref.content.l.{i}"),
            l.digest.clone(),
        );
    }
    put_blob(session, "config", &image.config, source.clone()).await?;
    put_blob(session, "manifest", &image.manifest, manifest_labels).await?;
    if let Some(index) = &image.index {
        let mut labels = source.clone();
        for (i, m) in image.index_manifests.iter().enumerate() {
            labels.insert(format!("containerd.io/gc.ref.content.m.{i}"), m.clone());
        }
        put_blob(session, "index", index, labels).await?;
    }
    Ok(())
}

/// Writes an in-memory blob; if it exists, sets `labels` on it instead.
async fn put_blob(
    session: &Session,
    kind: &str,
    blob: &Blob,
    labels: HashMap<String, String>,
) -> Result<(), PullError> {
    let ref_key = format!("{kind}-{}", blob.digest);
    let bytes = blob.bytes.clone();
    let written = content::write(
        session,
        Target {
            ref_key: &ref_key,
            digest: &blob.digest,
            size: blob.size(),
        },
        labels.clone(),
        |offset| {
            let b = bytes.slice(offset as usize..);
            async move { Ok(b) }
        },
    )
    .await?;
    if written == Written::Existed {
        session.label_content(&blob.digest, labels).await?;
    }
    Ok(())
}
