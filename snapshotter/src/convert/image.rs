//! Rewrites an image around converted layers: index → manifests → config
//! and layers. Everything new is staged (blobs on disk, manifests in
//! memory); [`super::convert`] publishes it.
//!
//! Invariants: the output is OCI (Docker schema 2 manifests and lists become
//! their OCI equivalents; a `tar+zstd` layer is not valid in Docker schema
//! 2). Fields Shoal does not know are kept. JSON is re-serialised with
//! sorted keys, so output bytes depend only on the input. The config changes
//! only where a layer's diff ID changed (eStargz sources).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use serde_json::{json, Value};

use super::layer::{self, source_compression, Layout};
use super::location::{digest_of, Endpoint};
use super::progress::Progress;
use super::{
    ConvertError, LayerSummary, ManifestSummary, ANNOTATION_LAYER_DIGEST, ANNOTATION_SOURCE,
    ANNOTATION_STARTUP_END, ANNOTATION_TOC_DIGEST, ANNOTATION_TOC_POSITION, LAYER_MEDIA_TYPE,
};

const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

/// Annotation prefixes of lazy formats that describe the *source* blob and
/// so must not be copied onto the new one.
const STALE_ANNOTATIONS: [&str; 2] = [
    "containerd.io/snapshot/",
    "io.github.containers.zstd-chunked.",
];

/// The state of one conversion.
pub struct Converter<'a> {
    src: &'a Endpoint,
    staging: &'a Path,
    layout: Layout,
    source_repo: Option<String>,
    progress: &'a Progress,
    /// Staged blobs by digest (layers and configs).
    pub blobs: BTreeMap<String, PathBuf>,
    /// Staged child manifests (media type, bytes), for an index.
    pub manifests: Vec<(String, Bytes)>,
    /// Per-platform summaries.
    pub summaries: Vec<ManifestSummary>,
    /// Index entries left out.
    pub skipped: Vec<String>,
    /// Startup profile for every layer.
    pub profile: Option<std::sync::Arc<super::profile::Profile>>,
    done: HashMap<String, LayerSummary>,
    seq: u64,
}

impl<'a> Converter<'a> {
    /// A converter reading `src` and staging under `staging`.
    pub fn new(
        src: &'a Endpoint,
        staging: &'a Path,
        layout: Layout,
        source_repo: Option<String>,
        progress: &'a Progress,
    ) -> Self {
        Converter {
            src,
            staging,
            layout,
            source_repo,
            progress,
            blobs: BTreeMap::new(),
            manifests: Vec::new(),
            summaries: Vec::new(),
            skipped: Vec::new(),
            profile: None,
            done: HashMap::new(),
            seq: 0,
        }
    }

    fn source_err(&self, reason: impl Into<String>) -> ConvertError {
        ConvertError::Source {
            location: self.src.loc.to_string(),
            reason: reason.into(),
        }
    }

    /// Converts the image the source names; returns the top object (media
    /// type, bytes) to tag.
    ///
    /// # Errors
    /// [`ConvertError`].
    pub async fn image(&mut self) -> Result<(String, Bytes), ConvertError> {
        let (mt, _digest, bytes) = self
            .src
            .manifest(None)
            .await
            .map_err(|e| self.source_err(e))?;
        let v: Value =
            serde_json::from_slice(&bytes).map_err(|e| self.source_err(e.to_string()))?;
        let mt = if mt.is_empty() {
            v["mediaType"].as_str().unwrap_or_default().to_string()
        } else {
            mt
        };
        if mt == OCI_INDEX || mt == DOCKER_LIST || (mt.is_empty() && v.get("manifests").is_some()) {
            let out = self.index(v).await?;
            return Ok((OCI_INDEX.to_string(), out));
        }
        let (out, summary) = self.manifest(&_digest, None, &bytes).await?;
        self.summaries.push(summary);
        Ok((OCI_MANIFEST.to_string(), out))
    }

    async fn index(&mut self, mut v: Value) -> Result<Bytes, ConvertError> {
        let descs = v["manifests"]
            .as_array()
            .cloned()
            .ok_or_else(|| self.source_err("index without a manifests list"))?;
        let mut out = Vec::new();
        for mut d in descs {
            let digest = d["digest"].as_str().unwrap_or_default().to_string();
            let p = &d["platform"];
            let platform = format!(
                "{}/{}{}",
                p["os"].as_str().unwrap_or("unknown"),
                p["architecture"].as_str().unwrap_or("unknown"),
                p["variant"]
                    .as_str()
                    .map(|s| format!("/{s}"))
                    .unwrap_or_default()
            );
            let kind = d["mediaType"].as_str().unwrap_or_default();
            if platform.starts_with("unknown/")
                || !(kind == OCI_MANIFEST || kind == DOCKER_MANIFEST)
            {
                // Attestations and nested indexes refer to the source image's
                // digests; carrying them over would be a lie.
                self.skipped.push(format!("{digest} ({kind}, {platform})"));
                continue;
            }
            self.progress
                .note(&format!("platform {platform}: manifest {digest}"));
            let (_, _, bytes) = self
                .src
                .manifest(Some(&digest))
                .await
                .map_err(|e| self.source_err(e))?;
            let (new, summary) = self.manifest(&digest, Some(platform), &bytes).await?;
            d["mediaType"] = json!(OCI_MANIFEST);
            d["digest"] = json!(digest_of(&new));
            d["size"] = json!(new.len());
            self.summaries.push(summary);
            self.manifests.push((OCI_MANIFEST.to_string(), new));
            out.push(d);
        }
        if out.is_empty() {
            return Err(self.source_err("index has no image manifest Shoal can convert"));
        }
        v["manifests"] = Value::Array(out);
        v["mediaType"] = json!(OCI_INDEX);
        v["schemaVersion"] = json!(2);
        Ok(Bytes::from(
            serde_json::to_vec(&v).expect("JSON value serialises"),
        ))
    }

    async fn manifest(
        &mut self,
        digest: &str,
        platform: Option<String>,
        bytes: &[u8],
    ) -> Result<(Bytes, ManifestSummary), ConvertError> {
        let mut m: Value = serde_json::from_slice(bytes)
            .map_err(|e| self.source_err(format!("manifest {digest}: {e}")))?;
        let mt = m["mediaType"].as_str().unwrap_or(OCI_MANIFEST);
        if mt != OCI_MANIFEST && mt != DOCKER_MANIFEST {
            return Err(
                self.source_err(format!("manifest {digest}: unsupported media type {mt:?}"))
            );
        }
        let cfg_digest = m["config"]["digest"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let cfg_size = m["config"]["size"].as_u64().unwrap_or(0);
        let cfg_bytes = self
            .src
            .small_blob(&cfg_digest, cfg_size)
            .await
            .map_err(|e| self.source_err(format!("config: {e}")))?;
        let mut cfg: Value = serde_json::from_slice(&cfg_bytes)
            .map_err(|e| self.source_err(format!("config {cfg_digest}: {e}")))?;
        let layers = m["layers"]
            .as_array()
            .cloned()
            .ok_or_else(|| self.source_err(format!("manifest {digest} has no layers list")))?;
        let n_diff = cfg["rootfs"]["diff_ids"].as_array().map_or(0, Vec::len);
        if n_diff != layers.len() {
            return Err(self.source_err(format!(
                "config {cfg_digest} lists {n_diff} diff IDs for {} layers",
                layers.len()
            )));
        }
        let mut new_layers = Vec::new();
        let mut summaries = Vec::new();
        for (i, l) in layers.iter().enumerate() {
            let s = self.layer(i, layers.len(), l).await?;
            let mut desc = l.clone();
            let mut ann: BTreeMap<String, String> = l["annotations"]
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(k, _)| !STALE_ANNOTATIONS.iter().any(|p| k.starts_with(p)))
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect();
            ann.insert(ANNOTATION_TOC_DIGEST.into(), s.out.toc_digest.clone());
            ann.insert(ANNOTATION_LAYER_DIGEST.into(), s.out.digest.clone());
            ann.insert(
                ANNOTATION_TOC_POSITION.into(),
                format!("{}:{}", s.out.toc_offset, s.out.toc_len),
            );
            if s.out.startup_fetch_end > 0 {
                ann.insert(
                    ANNOTATION_STARTUP_END.into(),
                    s.out.startup_fetch_end.to_string(),
                );
            }
            if let Some(r) = &self.source_repo {
                ann.insert(ANNOTATION_SOURCE.into(), r.clone());
            }
            desc["mediaType"] = json!(LAYER_MEDIA_TYPE);
            desc["digest"] = json!(s.out.digest);
            desc["size"] = json!(s.out.size);
            desc["annotations"] = json!(ann);
            if let Some(o) = desc.as_object_mut() {
                o.remove("urls");
            }
            cfg["rootfs"]["diff_ids"][i] = json!(s.out.diff_id);
            new_layers.push(desc);
            summaries.push(s);
        }
        // Keep the config's bytes unless a diff ID changed.
        let old: Value = serde_json::from_slice(&cfg_bytes).expect("parsed above");
        let cfg_out = if old == cfg {
            cfg_bytes
        } else {
            serde_json::to_vec(&cfg).expect("JSON value serialises")
        };
        let cfg_new_digest = digest_of(&cfg_out);
        let cfg_path = self
            .staging
            .join(format!("config-{}", cfg_new_digest.replace(':', "-")));
        super::private_file(&cfg_path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, &cfg_out))
            .map_err(|e| ConvertError::Work {
                path: cfg_path.display().to_string(),
                reason: e.to_string(),
            })?;
        self.blobs.insert(cfg_new_digest.clone(), cfg_path);
        let cfg_mt = match m["config"]["mediaType"].as_str() {
            Some(DOCKER_CONFIG) | None => OCI_CONFIG.to_string(),
            Some(other) => other.to_string(),
        };
        m["config"]["mediaType"] = json!(cfg_mt);
        m["config"]["digest"] = json!(cfg_new_digest);
        m["config"]["size"] = json!(cfg_out.len());
        m["layers"] = Value::Array(new_layers);
        m["mediaType"] = json!(OCI_MANIFEST);
        m["schemaVersion"] = json!(2);
        let out = Bytes::from(serde_json::to_vec(&m).expect("JSON value serialises"));
        let summary = ManifestSummary {
            platform,
            source_digest: digest.to_string(),
            digest: digest_of(&out),
            layers: summaries,
        };
        Ok((out, summary))
    }

    async fn layer(&mut self, i: usize, n: usize, l: &Value) -> Result<LayerSummary, ConvertError> {
        let digest = l["digest"].as_str().unwrap_or_default().to_string();
        let media_type = l["mediaType"].as_str().unwrap_or_default().to_string();
        let size = l["size"].as_u64().unwrap_or(0);
        if let Some(s) = self.done.get(&digest) {
            return Ok(s.clone());
        }
        let err = |reason: String| ConvertError::Layer {
            digest: digest.clone(),
            media_type: media_type.clone(),
            reason,
        };
        let compression = source_compression(&media_type).ok_or_else(|| {
            err("unknown layer media type; Shoal converts tar, tar+gzip and tar+zstd layers".into())
        })?;
        let lazy_source = l["annotations"].as_object().is_some_and(|a| {
            a.keys()
                .any(|k| STALE_ANNOTATIONS.iter().any(|p| k.starts_with(p)))
        });
        self.seq += 1;
        let src_path = self.staging.join(format!("src-{}", self.seq));
        let out_path = self.staging.join(format!("out-{}", self.seq));
        let label = format!("layer {}/{n} {}", i + 1, short(&digest));
        let bar = self.progress.bar(&format!("{label} fetch"), size);
        self.src
            .fetch_blob(&digest, size, &src_path, &mut |b| bar.set(b))
            .await
            .map_err(&err)?;
        bar.done();
        let layout = self.layout;
        let bar = self.progress.bar(&format!("{label} convert"), size);
        let (src2, out2) = (src_path.clone(), out_path.clone());
        let profile = self.profile.clone();
        let info = tokio::task::spawn_blocking(move || {
            let r = layer::convert(
                &src2,
                compression,
                lazy_source,
                &out2,
                layout,
                profile.as_deref(),
                &mut |b| bar.set(b),
            );
            bar.done();
            r
        })
        .await
        .map_err(|e| err(format!("conversion task: {e}")))?
        .map_err(&err)?;
        let _ = std::fs::remove_file(&src_path);
        self.progress.note(&format!(
            "{label}: {} -> {} ({} bytes, {} files, {} chunks, startup set {} files / {} bytes)",
            short(&digest),
            short(&info.digest),
            info.size,
            info.files,
            info.chunks,
            info.startup_files,
            info.startup_bytes
        ));
        self.blobs.insert(info.digest.clone(), out_path);
        let s = LayerSummary {
            source_digest: digest.clone(),
            source_media_type: media_type.clone(),
            source_size: size,
            out: info,
        };
        self.done.insert(digest, s.clone());
        Ok(s)
    }
}

fn short(d: &str) -> &str {
    &d[..d.len().min(19)]
}
