//! Resolving an image reference to what an unpack needs: the top object
//! (index or manifest), the platform's manifest, its config and layers, and
//! the layers' chain IDs.
//!
//! Invariants: every object returned was checked against a digest the user
//! vouched for: the manifest or index against the reference's digest (or,
//! for a tag, the digest the registry client computed from the bytes), a
//! platform manifest against its index descriptor, the config against the
//! manifest's descriptor (sha256 and size). Layers are checked later by
//! containerd (content commit with the expected digest, diff ID on apply) or
//! by the snapshotter's TOC verification.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use bytes::Bytes;
use oci_spec::image::{ImageConfiguration, ImageIndex, ImageManifest};
use sha2::{Digest as _, Sha256};

use super::PullError;
use crate::registry::{Reference, Registry};

/// OCI image index.
pub const MT_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker manifest list.
pub const MT_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// OCI image manifest.
pub const MT_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Docker schema 2 manifest.
pub const MT_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// A platform as `--platform` names it: `os/arch[/variant]`, normalised the
/// way containerd's `platforms.Normalize` does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    /// `linux`.
    pub os: String,
    /// GOARCH spelling: `amd64`, `arm64`, `arm`, ...
    pub arch: String,
    /// `v7` for arm; empty when the architecture's default.
    pub variant: String,
}

impl Platform {
    /// The platform this binary runs on.
    pub fn host() -> Platform {
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "x86" => "386",
            "aarch64" => "arm64",
            "powerpc64" if cfg!(target_endian = "little") => "ppc64le",
            "loongarch64" => "loong64",
            other => other,
        };
        let variant = if arch == "arm" { "v7" } else { "" };
        Platform::normalized(std::env::consts::OS, arch, variant)
    }

    fn normalized(os: &str, arch: &str, variant: &str) -> Platform {
        let os = os.to_ascii_lowercase();
        let (arch, variant) = match (arch.to_ascii_lowercase().as_str(), variant) {
            ("x86_64" | "x86-64" | "amd64", "" | "v1") => ("amd64".to_string(), String::new()),
            ("x86_64" | "x86-64" | "amd64", v) => ("amd64".to_string(), v.to_string()),
            ("aarch64" | "arm64", "" | "8" | "v8") => ("arm64".to_string(), String::new()),
            ("aarch64" | "arm64", v) => ("arm64".to_string(), v.to_string()),
            ("armhf", _) => ("arm".to_string(), "v7".to_string()),
            ("armel", _) => ("arm".to_string(), "v6".to_string()),
            ("arm", "" | "7") => ("arm".to_string(), "v7".to_string()),
            ("arm", v @ ("5" | "6" | "8")) => ("arm".to_string(), format!("v{v}")),
            ("i386" | "i686", v) => ("386".to_string(), v.to_string()),
            (a, v) => (a.to_string(), v.to_string()),
        };
        Platform { os, arch, variant }
    }

    fn matches(&self, p: &oci_spec::image::Platform) -> bool {
        let other = Platform::normalized(
            &p.os().to_string(),
            &p.architecture().to_string(),
            p.variant().as_deref().unwrap_or(""),
        );
        *self == other
    }
}

impl FromStr for Platform {
    type Err = PullError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split('/').collect();
        let bad = || PullError::InvalidArgument(format!("platform {s:?}: want OS/ARCH[/VARIANT]"));
        if parts.iter().any(|p| p.is_empty()) {
            return Err(bad());
        }
        match parts[..] {
            [os, arch] => Ok(Platform::normalized(os, arch, "")),
            [os, arch, variant] => Ok(Platform::normalized(os, arch, variant)),
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.arch)?;
        if !self.variant.is_empty() {
            write!(f, "/{}", self.variant)?;
        }
        Ok(())
    }
}

/// A JSON object (index, manifest or config) as fetched, verified.
#[derive(Debug, Clone)]
pub struct Blob {
    /// Media type.
    pub media_type: String,
    /// `sha256:...`.
    pub digest: String,
    /// The exact bytes (what the digest covers).
    pub bytes: Bytes,
}

impl Blob {
    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.bytes.len() as u64
    }
}

/// One layer of the manifest.
#[derive(Debug, Clone)]
pub struct Layer {
    /// Media type (`...tar+gzip`, `...tar+zstd`, Docker's `...rootfs.diff.tar.gzip`).
    pub media_type: String,
    /// Compressed digest.
    pub digest: String,
    /// Compressed size.
    pub size: u64,
    /// Descriptor annotations (the eStargz TOC digest lives here).
    pub annotations: HashMap<String, String>,
    /// Uncompressed digest, from the config's `rootfs.diff_ids`.
    pub diff_id: String,
    /// Chain ID: the name of the committed snapshot of this layer on top of
    /// all earlier ones.
    pub chain_id: String,
}

/// What a pull needs, resolved and verified.
#[derive(Debug, Clone)]
pub struct Image {
    /// The index, if the reference named one.
    pub index: Option<Blob>,
    /// Digests of every manifest the index lists (for its GC labels).
    pub index_manifests: Vec<String>,
    /// The platform's manifest.
    pub manifest: Blob,
    /// Its config.
    pub config: Blob,
    /// Its layers, bottom first.
    pub layers: Vec<Layer>,
}

impl Image {
    /// What the image record points at: the index if there is one.
    pub fn top(&self) -> &Blob {
        self.index.as_ref().unwrap_or(&self.manifest)
    }

    /// Bytes fetched from the registry for the JSON objects.
    pub fn metadata_bytes(&self) -> u64 {
        self.index.as_ref().map_or(0, Blob::size) + self.manifest.size() + self.config.size()
    }
}

/// `sha256:<hex>` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// Chain IDs of a stack of layers: `chain(0) = diff(0)`,
/// `chain(n) = sha256(chain(n-1) + " " + diff(n))` (OCI image-spec
/// `identity.ChainID`).
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(parent) => sha256_digest(format!("{parent} {d}").as_bytes()),
        };
        out.push(next);
    }
    out
}

#[derive(Debug, PartialEq, Eq)]
enum Kind {
    Index,
    Manifest,
}

fn kind(reference: &str, media_type: &str, bytes: &[u8]) -> Result<Kind, PullError> {
    match media_type {
        MT_OCI_INDEX | MT_DOCKER_LIST => return Ok(Kind::Index),
        MT_OCI_MANIFEST | MT_DOCKER_MANIFEST => return Ok(Kind::Manifest),
        _ => {}
    }
    // Registries may answer with a generic type; the JSON says what it is.
    let v: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| PullError::image(reference, format!("manifest is not JSON: {e}")))?;
    if v.get("schemaVersion").and_then(|s| s.as_u64()) == Some(1) {
        return Err(PullError::image(
            reference,
            "Docker schema 1 manifests are not supported",
        ));
    }
    if v.get("manifests").is_some() {
        Ok(Kind::Index)
    } else if v.get("layers").is_some() {
        Ok(Kind::Manifest)
    } else {
        Err(PullError::image(
            reference,
            format!("unsupported manifest media type {media_type:?}"),
        ))
    }
}

/// Resolves `reference` for `platform`: fetches the manifest (choosing the
/// platform's from an index) and the config.
///
/// # Errors
/// Registry failures; unparsable or unsupported objects; no manifest for the
/// platform; a config whose digest or size does not match; a layer count that
/// differs from the config's diff IDs.
pub async fn resolve(
    registry: &Registry,
    reference: &Reference,
    platform: &Platform,
) -> Result<Image, PullError> {
    let name = reference.to_string();
    let (media_type, digest, bytes) = registry.fetch_manifest(reference).await?;
    let mut index = None;
    let mut index_manifests = Vec::new();
    let manifest = if kind(&name, &media_type, &bytes)? == Kind::Index {
        let parsed = ImageIndex::from_reader(&bytes[..])
            .map_err(|e| PullError::image(&name, format!("index {digest}: {e}")))?;
        index_manifests = parsed
            .manifests()
            .iter()
            .map(|m| m.digest().to_string())
            .collect();
        let chosen = parsed
            .manifests()
            .iter()
            .find(|m| m.platform().as_ref().is_some_and(|p| platform.matches(p)))
            .ok_or_else(|| {
                let available: Vec<String> = parsed
                    .manifests()
                    .iter()
                    .filter_map(|m| m.platform().as_ref())
                    .map(|p| {
                        let mut s = format!("{}/{}", p.os(), p.architecture());
                        if let Some(v) = p.variant() {
                            s = format!("{s}/{v}");
                        }
                        s
                    })
                    .collect();
                PullError::image(
                    &name,
                    format!(
                        "no manifest for platform {platform} (index has: {})",
                        available.join(", ")
                    ),
                )
            })?;
        let want = chosen.digest().to_string();
        let by_digest = Reference {
            digest: Some(want.clone()),
            ..reference.clone()
        };
        let (mt, got, mbytes) = registry.fetch_manifest(&by_digest).await?;
        if got != want || sha256_digest(&mbytes) != want || mbytes.len() as u64 != chosen.size() {
            return Err(PullError::image(
                &name,
                format!("manifest {want}: fetched bytes do not match the index descriptor"),
            ));
        }
        index = Some(Blob {
            media_type: media_type.clone(),
            digest,
            bytes,
        });
        let mt = if mt.is_empty() {
            chosen.media_type().to_string()
        } else {
            mt
        };
        Blob {
            media_type: mt,
            digest: got,
            bytes: mbytes,
        }
    } else {
        Blob {
            media_type,
            digest,
            bytes,
        }
    };
    if kind(&name, &manifest.media_type, &manifest.bytes)? != Kind::Manifest {
        return Err(PullError::image(
            &name,
            format!("{} is an index inside an index", manifest.digest),
        ));
    }
    let parsed = ImageManifest::from_reader(&manifest.bytes[..])
        .map_err(|e| PullError::image(&name, format!("manifest {}: {e}", manifest.digest)))?;
    let mut manifest = manifest;
    if !matches!(
        manifest.media_type.as_str(),
        MT_OCI_MANIFEST | MT_DOCKER_MANIFEST
    ) {
        manifest.media_type = parsed
            .media_type()
            .as_ref()
            .map_or(MT_OCI_MANIFEST.to_string(), |m| m.to_string());
    }

    let cdesc = parsed.config();
    let cdigest = cdesc.digest().to_string();
    let cbytes = registry
        .fetch_range(reference, &cdigest, 0, cdesc.size())
        .await?;
    if sha256_digest(&cbytes) != cdigest {
        return Err(PullError::image(
            &name,
            format!("config {cdigest}: fetched bytes do not match the digest"),
        ));
    }
    let config = ImageConfiguration::from_reader(&cbytes[..])
        .map_err(|e| PullError::image(&name, format!("config {cdigest}: {e}")))?;
    let diff_ids = config.rootfs().diff_ids();
    if diff_ids.len() != parsed.layers().len() {
        return Err(PullError::image(
            &name,
            format!(
                "manifest has {} layers but the config has {} diff IDs",
                parsed.layers().len(),
                diff_ids.len()
            ),
        ));
    }
    let chains = chain_ids(diff_ids);
    let layers = parsed
        .layers()
        .iter()
        .zip(diff_ids.iter().zip(chains))
        .map(|(l, (diff_id, chain_id))| Layer {
            media_type: l.media_type().to_string(),
            digest: l.digest().to_string(),
            size: l.size(),
            annotations: l.annotations().clone().unwrap_or_default(),
            diff_id: diff_id.clone(),
            chain_id,
        })
        .collect();
    Ok(Image {
        index,
        index_manifests,
        manifest,
        config: Blob {
            media_type: cdesc.media_type().to_string(),
            digest: cdigest,
            bytes: cbytes,
        },
        layers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_image_spec() {
        let a = "sha256:aaaa".to_string();
        let b = "sha256:bbbb".to_string();
        let c = "sha256:cccc".to_string();
        let ids = chain_ids(&[a.clone(), b.clone(), c.clone()]);
        assert_eq!(ids[0], a);
        assert_eq!(ids[1], sha256_digest(format!("{a} {b}").as_bytes()));
        assert_eq!(ids[2], sha256_digest(format!("{} {c}", ids[1]).as_bytes()));
        assert!(chain_ids(&[]).is_empty());
    }

    #[test]
    fn chain_ids_match_go_identity_package() {
        // Fixture from Go's image-spec `identity.ChainIDs` over
        // `digest.FromString("layer one" | "layer two" | "layer three")`.
        let diff_ids: Vec<String> = ["layer one", "layer two", "layer three"]
            .iter()
            .map(|s| sha256_digest(s.as_bytes()))
            .collect();
        assert_eq!(
            diff_ids[0],
            "sha256:f191e625176e7514249870c60bc24622131b04927a418001d1969c9cecd260f1"
        );
        assert_eq!(
            chain_ids(&diff_ids),
            [
                "sha256:f191e625176e7514249870c60bc24622131b04927a418001d1969c9cecd260f1",
                "sha256:d440fc2ac5bfa225471b58c5d6b4283504f5dfbcd6251023a635cdcd0c058e3e",
                "sha256:952689aceeac7e377b602804de533a4ad47ba634e3917ca7cb071e5ff2bff6cd",
            ]
        );
    }

    #[test]
    fn platforms_parse_and_normalise() {
        let p: Platform = "linux/amd64".parse().unwrap();
        assert_eq!(p.to_string(), "linux/amd64");
        let p: Platform = "linux/aarch64/v8".parse().unwrap();
        assert_eq!(p.to_string(), "linux/arm64");
        let p: Platform = "linux/arm".parse().unwrap();
        assert_eq!(p.to_string(), "linux/arm/v7");
        let p: Platform = "Linux/x86_64".parse().unwrap();
        assert_eq!(p.to_string(), "linux/amd64");
        for bad in ["linux", "linux/", "/amd64", "a/b/c/d", ""] {
            assert!(bad.parse::<Platform>().is_err(), "{bad}");
        }
        assert!(!Platform::host().os.is_empty());
    }

    #[test]
    fn platforms_match_index_entries() {
        let entry = |os: &str, arch: &str, variant: Option<&str>| {
            let mut b = oci_spec::image::PlatformBuilder::default()
                .os(os)
                .architecture(arch);
            if let Some(v) = variant {
                b = b.variant(v);
            }
            b.build().unwrap()
        };
        let amd64: Platform = "linux/amd64".parse().unwrap();
        assert!(amd64.matches(&entry("linux", "amd64", None)));
        assert!(!amd64.matches(&entry("linux", "arm64", None)));
        assert!(!amd64.matches(&entry("windows", "amd64", None)));
        let arm64: Platform = "linux/arm64".parse().unwrap();
        assert!(arm64.matches(&entry("linux", "arm64", Some("v8"))));
        let armv7: Platform = "linux/arm/v7".parse().unwrap();
        assert!(armv7.matches(&entry("linux", "arm", Some("v7"))));
        assert!(!armv7.matches(&entry("linux", "arm", Some("v6"))));
    }

    #[test]
    fn kind_sniffs_generic_media_types() {
        assert!(kind("r", MT_OCI_INDEX, b"").unwrap() == Kind::Index);
        assert!(kind("r", MT_DOCKER_MANIFEST, b"").unwrap() == Kind::Manifest);
        assert!(kind("r", "application/json", br#"{"manifests":[]}"#).unwrap() == Kind::Index);
        assert!(kind("r", "", br#"{"schemaVersion":2,"layers":[]}"#).unwrap() == Kind::Manifest);
        let e = kind("r", "", br#"{"schemaVersion":1}"#).unwrap_err();
        assert!(e.to_string().contains("schema 1"), "{e}");
        assert!(kind("r", "", b"nope").is_err());
    }
}
