//! Unpacking one layer through containerd's snapshots service, the way
//! containerd's unpacker does: skip a chain ID that exists, else Prepare an
//! extraction snapshot with the labels a remote snapshotter needs; an
//! AlreadyExists answer means the snapshotter mounted the layer itself
//! (lazily), mounts mean a normal unpack: fetch the blob into the content
//! store, Apply it through the diff service, check the diff ID, Commit under
//! the chain ID.
//!
//! Invariant: an extraction snapshot that is not committed is removed, on
//! every error path.

use std::collections::HashMap;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use containerd_client::types::{Descriptor, Mount};
use serde::Serialize;

use super::containerd::{Prepared, Session};
use super::content::{self, Target, Written};
use super::image::{Image, Layer};
use super::PullError;
use crate::registry::{Reference, Registry};
use crate::remote::layers::{LABEL_CRI_IMAGE_REF, LABEL_CRI_LAYER_DIGEST, LABEL_TARGET};

/// Manifest digest (CRI, `ctr-remote image rpull`).
pub const LABEL_CRI_MANIFEST_DIGEST: &str = "containerd.io/snapshot/cri.manifest-digest";
/// Comma-separated digests of this layer and the ones above it.
pub const LABEL_CRI_IMAGE_LAYERS: &str = "containerd.io/snapshot/cri.image-layers";
/// Layer annotations with this prefix become snapshot labels
/// (containerd's `snapshots.FilterInheritedLabels`).
pub const INHERITED_PREFIX: &str = "containerd.io/snapshot/";
/// Content label holding a layer's verified uncompressed digest.
pub const LABEL_UNCOMPRESSED: &str = "containerd.io/uncompressed";
/// containerd's limit on a label's key plus value (`labels.Validate`).
pub const MAX_LABEL_BYTES: usize = 4096;
/// Bytes asked of the registry per Range request when fetching a layer.
pub const FETCH_CHUNK: u64 = 4 << 20;
/// Prepare attempts when AlreadyExists comes back without the chain ID
/// existing (containerd's unpacker tries 3 times too).
const PREPARE_TRIES: usize = 3;

/// How a layer ended up in the snapshotter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// The chain ID existed before the pull.
    Present,
    /// The snapshotter mounted it remotely (Prepare said AlreadyExists).
    Lazy,
    /// Fetched and unpacked through containerd's diff service.
    Unpacked,
}

impl Outcome {
    /// Lowercase name, as in the JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Present => "present",
            Outcome::Lazy => "lazy",
            Outcome::Unpacked => "unpacked",
        }
    }
}

/// What happened to one layer.
#[derive(Debug, Clone, Serialize)]
pub struct LayerReport {
    /// Position in the manifest, from 0 (bottom).
    pub index: usize,
    /// Compressed digest.
    pub digest: String,
    /// Media type.
    pub media_type: String,
    /// Compressed size.
    pub size: u64,
    /// Snapshot name.
    pub chain_id: String,
    /// How it got there.
    pub outcome: Outcome,
    /// Bytes this command fetched from the registry for it.
    pub fetched: u64,
    /// Wall time spent on it.
    pub seconds: f64,
}

/// Snapshot labels for layer `i` of `image`: the layer's inherited
/// annotations, the CRI labels (as containerd's
/// `snapshotters.AppendInfoHandlerWrapper` sets them), and the target chain
/// ID.
pub fn snapshot_labels(image_ref: &str, image: &Image, i: usize) -> HashMap<String, String> {
    let layer = &image.layers[i];
    let mut labels: HashMap<String, String> = layer
        .annotations
        .iter()
        .filter(|(k, _)| k.starts_with(INHERITED_PREFIX))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    labels.insert(LABEL_CRI_IMAGE_REF.into(), image_ref.into());
    labels.insert(LABEL_CRI_LAYER_DIGEST.into(), layer.digest.clone());
    labels.insert(
        LABEL_CRI_MANIFEST_DIGEST.into(),
        image.manifest.digest.clone(),
    );
    labels.insert(
        LABEL_CRI_IMAGE_LAYERS.into(),
        image_layers(&image.layers[i..]),
    );
    labels.insert(LABEL_TARGET.into(), layer.chain_id.clone());
    labels
}

/// As many digests of `layers` as fit the label size limit, comma-separated.
fn image_layers(layers: &[Layer]) -> String {
    let budget = MAX_LABEL_BYTES - LABEL_CRI_IMAGE_LAYERS.len();
    let mut out = String::new();
    for l in layers {
        let extra = l.digest.len() + usize::from(!out.is_empty());
        if out.len() + extra > budget {
            break;
        }
        if !out.is_empty() {
            out.push(',');
        }
        out.push_str(&l.digest);
    }
    out
}

/// A unique extraction key in containerd's format (`extract-%s %s`).
fn extraction_key(chain_id: &str) -> String {
    use std::hash::{BuildHasher, Hasher};
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(now.as_nanos());
    format!(
        "extract-{}-{:06x} {chain_id}",
        now.subsec_nanos(),
        h.finish() & 0xff_ffff
    )
}

/// Everything one image's layers share.
pub struct Unpacker<'a> {
    /// containerd, with the lease.
    pub session: &'a Session,
    /// Where blobs come from.
    pub registry: &'a Registry,
    /// The parsed reference (for registry requests).
    pub reference: &'a Reference,
    /// The reference as the user gave it (the `cri.image-ref` label).
    pub image_ref: &'a str,
    /// The resolved image.
    pub image: &'a Image,
    /// Labels every committed blob gets (distribution source).
    pub content_labels: HashMap<String, String>,
}

impl Unpacker<'_> {
    /// Makes layer `i` exist in the snapshotter under its chain ID. Layers
    /// below it must exist already.
    ///
    /// # Errors
    /// containerd or the registry failed, or the unpacked layer's diff ID is
    /// not the config's.
    pub async fn layer(&self, i: usize) -> Result<LayerReport, PullError> {
        let started = Instant::now();
        let layer = &self.image.layers[i];
        let report = |outcome, fetched| LayerReport {
            index: i,
            digest: layer.digest.clone(),
            media_type: layer.media_type.clone(),
            size: layer.size,
            chain_id: layer.chain_id.clone(),
            outcome,
            fetched,
            seconds: started.elapsed().as_secs_f64(),
        };
        if self.session.snapshot_exists(&layer.chain_id).await? {
            return Ok(report(Outcome::Present, 0));
        }
        let parent = match i {
            0 => "",
            _ => self.image.layers[i - 1].chain_id.as_str(),
        };
        let labels = snapshot_labels(self.image_ref, self.image, i);
        for _ in 0..PREPARE_TRIES {
            let key = extraction_key(&layer.chain_id);
            match self.session.prepare(&key, parent, labels.clone()).await? {
                Prepared::AlreadyExists => {
                    if self.session.snapshot_exists(&layer.chain_id).await? {
                        return Ok(report(Outcome::Lazy, 0));
                    }
                    // The key itself collided; rare. Try a new one.
                }
                Prepared::Mounts(mounts) => {
                    let r = self.unpack(layer, &key, mounts, labels).await;
                    if r.is_err() {
                        if let Err(e) = self.session.remove(&key).await {
                            tracing::warn!(key, error = %e, "cannot remove the extraction snapshot");
                        }
                    }
                    return r.map(|fetched| report(Outcome::Unpacked, fetched));
                }
            }
        }
        Err(PullError::Layer {
            digest: layer.digest.clone(),
            reason: format!(
                "Prepare kept answering AlreadyExists but {} does not exist",
                layer.chain_id
            ),
        })
    }

    /// Fetch, apply, verify, commit. Returns the bytes fetched.
    async fn unpack(
        &self,
        layer: &Layer,
        key: &str,
        mounts: Vec<Mount>,
        labels: HashMap<String, String>,
    ) -> Result<u64, PullError> {
        let ref_key = format!("layer-{}", layer.digest);
        let size = layer.size;
        let written = content::write(
            self.session,
            Target {
                ref_key: &ref_key,
                digest: &layer.digest,
                size,
            },
            self.content_labels.clone(),
            |offset| async move {
                let len = FETCH_CHUNK.min(size - offset);
                Ok(self
                    .registry
                    .fetch_range(self.reference, &layer.digest, offset, len)
                    .await?)
            },
        )
        .await?;
        let fetched = match written {
            Written::Existed => 0,
            Written::Committed { fetched } => fetched,
        };
        let desc = Descriptor {
            media_type: layer.media_type.clone(),
            digest: layer.digest.clone(),
            size: layer.size as i64,
            annotations: HashMap::new(),
        };
        let diff_id = self.session.apply(desc, mounts).await?;
        if diff_id != layer.diff_id {
            return Err(PullError::Layer {
                digest: layer.digest.clone(),
                reason: format!(
                    "unpacked to {diff_id}, but the config says {}",
                    layer.diff_id
                ),
            });
        }
        if !self.session.commit(&layer.chain_id, key, labels).await? {
            // Someone else committed the same chain ID meanwhile.
            self.session.remove(key).await?;
        }
        self.session
            .label_content(
                &layer.digest,
                HashMap::from([(LABEL_UNCOMPRESSED.to_string(), diff_id)]),
            )
            .await?;
        Ok(fetched)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pull::image::Blob;
    use bytes::Bytes;

    fn layer(n: u32, annotations: &[(&str, &str)]) -> Layer {
        Layer {
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
            digest: format!("sha256:{n:064x}"),
            size: 100,
            annotations: annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            diff_id: format!("sha256:{:064x}", n + 1000),
            chain_id: format!("sha256:{:064x}", n + 2000),
        }
    }

    fn image(layers: Vec<Layer>) -> Image {
        let blob = |d: &str| Blob {
            media_type: String::new(),
            digest: d.into(),
            bytes: Bytes::new(),
        };
        Image {
            index: None,
            index_manifests: vec![],
            manifest: blob("sha256:manifest"),
            config: blob("sha256:config"),
            layers,
        }
    }

    #[test]
    fn labels_are_what_the_daemon_detects() {
        let toc = "sha256:0123";
        let img = image(vec![
            layer(1, &[]),
            layer(
                2,
                &[
                    ("containerd.io/snapshot/stargz/toc.digest", toc),
                    ("org.opencontainers.image.title", "not inherited"),
                ],
            ),
        ]);
        let labels = snapshot_labels("127.0.0.1:5000/app:1", &img, 1);
        let l = &img.layers[1];
        assert_eq!(labels[LABEL_TARGET], l.chain_id);
        assert_eq!(labels[LABEL_CRI_IMAGE_REF], "127.0.0.1:5000/app:1");
        assert_eq!(labels[LABEL_CRI_LAYER_DIGEST], l.digest);
        assert_eq!(labels[LABEL_CRI_MANIFEST_DIGEST], "sha256:manifest");
        assert_eq!(labels[LABEL_CRI_IMAGE_LAYERS], l.digest);
        assert_eq!(labels["containerd.io/snapshot/stargz/toc.digest"], toc);
        assert!(!labels.contains_key("org.opencontainers.image.title"));
        let sorted: std::collections::BTreeMap<String, String> = labels.into_iter().collect();
        let (target, remote) = crate::remote::layers::detect(&sorted, &Default::default())
            .expect("detected as remote");
        assert_eq!(target, l.chain_id);
        assert_eq!(remote.toc_digest, toc);
        assert_eq!(remote.layer_digest, l.digest);

        let labels = snapshot_labels("r", &img, 0);
        assert_eq!(
            labels[LABEL_CRI_IMAGE_LAYERS],
            format!("{},{}", img.layers[0].digest, img.layers[1].digest)
        );
    }

    #[test]
    fn image_layers_label_stays_under_the_limit() {
        let layers: Vec<Layer> = (0..100).map(|n| layer(n, &[])).collect();
        let v = image_layers(&layers);
        assert!(LABEL_CRI_IMAGE_LAYERS.len() + v.len() <= MAX_LABEL_BYTES);
        let n = v.split(',').count();
        assert!(n > 10 && n < 100, "{n}");
        assert!(v.split(',').zip(&layers).all(|(d, l)| d == l.digest));
    }

    #[test]
    fn extraction_keys_are_unique_and_containerd_shaped() {
        let a = extraction_key("sha256:abc");
        let b = extraction_key("sha256:abc");
        assert_ne!(a, b);
        assert!(
            a.starts_with("extract-") && a.ends_with(" sha256:abc"),
            "{a}"
        );
    }
}
