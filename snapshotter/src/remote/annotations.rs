//! Shoal's own layer annotations, written by `shoal convert`.
//!
//! containerd's unpacker passes every layer-descriptor annotation whose key
//! starts with `containerd.io/snapshot/` to Prepare as a label, whichever
//! client pulls (nerdctl, CRI with `disable_snapshot_annotations = true`,
//! containerd's Go client). So these labels make a converted image lazily
//! mountable without the `cri.*` labels: the layer's digest, and the
//! repository it was converted into. Both sit in the manifest, which the
//! pulled manifest digest vouches for (docs/format.md). Two more are only
//! [`Hints`] that save round trips, verified like everything else. The
//! source names a host, and which hosts an image may name is the
//! operator's call: [`SourcePolicy`].

use std::collections::BTreeMap;

/// The layer blob's own digest.
pub const LABEL_SHOAL_LAYER_DIGEST: &str = "containerd.io/snapshot/shoal.layer.digest";
/// Repository (`HOST/PATH`) to fetch the layer from.
pub const LABEL_SHOAL_SOURCE: &str = "containerd.io/snapshot/shoal.source";

/// Where the compressed TOC lies in the blob, `OFFSET:LENGTH` (what the
/// zstd:chunked footer says), so that a mount fetches the TOC at once,
/// without asking the blob's size and reading its footer first.
pub const LABEL_SHOAL_TOC_POSITION: &str = "containerd.io/snapshot/shoal.toc.position";
/// Blob offset up to which a reader fetches the startup set (laid out
/// first): the start of the first chunk after it (a chunk's bytes end where
/// the next chunk's begin). A mount requests `[0, end)` beside the TOC.
pub const LABEL_SHOAL_STARTUP_END: &str = "containerd.io/snapshot/shoal.startup.end";

/// Hints from Shoal's annotations that save round trips on a first mount.
/// They are never trusted: a TOC fetched at a hinted position must still
/// hash to the TOC digest, and bytes fetched early are verified chunk by
/// chunk like any others. A malformed hint is ignored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Hints {
    /// (offset, length) of the compressed zstd:chunked TOC.
    pub toc: Option<(u64, u64)>,
    /// End of the startup set: bytes `[0, end)` are fetched first.
    pub startup_end: Option<u64>,
}

/// The [`Hints`] in `labels`.
pub fn hints(labels: &BTreeMap<String, String>) -> Hints {
    let toc = labels.get(LABEL_SHOAL_TOC_POSITION).and_then(|v| {
        let (a, b) = v.split_once(':')?;
        let (off, len) = (a.parse::<u64>().ok()?, b.parse::<u64>().ok()?);
        (len > 0 && off >= 8 && off.checked_add(len).is_some()).then_some((off, len))
    });
    let startup_end = labels
        .get(LABEL_SHOAL_STARTUP_END)
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|n| *n > 0);
    Hints { toc, startup_end }
}

/// What the operator lets `shoal.source` choose (`[remote] source_hosts`
/// and `source_credentials`).
///
/// `shoal.source` is written by whoever built the image, and it picks the
/// host the node fetches from. Client labels (`cri.image-ref`,
/// `stargz.reference`) name the registry the image was pulled from; when
/// they are there they win and `shoal.source` is not used. Without them
/// Shoal cannot tell where the image came from, so `shoal.source` is
/// honoured only for a host on the allow-list, and the node's credentials
/// go there only if the operator says so: a public image must not make the
/// node fetch from a private repository with the node's credentials.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SourcePolicy {
    /// Registry hosts (`host[:port]`, as in image references) that
    /// `shoal.source` may name; `*` stands for any host, which never gets
    /// credentials.
    pub hosts: Vec<String>,
    /// Send the node's credentials to those hosts.
    pub credentials: bool,
}

impl SourcePolicy {
    /// Whether `source` (a `shoal.source` value) may be fetched from; the
    /// answer says whether credentials may be sent there.
    ///
    /// # Errors
    /// Why not: it does not parse, or its host is not on the allow-list.
    pub fn check(&self, source: &str) -> Result<bool, String> {
        let r: crate::registry::Reference = source
            .parse()
            .map_err(|e| format!("shoal.source {source:?}: {e}"))?;
        let host = crate::registry::auth::normalize_host(&r.registry);
        if self
            .hosts
            .iter()
            .any(|h| crate::registry::auth::normalize_host(h) == host)
        {
            Ok(self.credentials)
        } else if self.hosts.iter().any(|h| h == "*") {
            // Any host, but the node's credentials only go to hosts the
            // operator named.
            Ok(false)
        } else {
            Err(format!(
                "shoal.source names host {host}, which is not in remote.source_hosts; \
                 an image annotation does not choose where the node fetches from"
            ))
        }
    }
}

/// The (image reference, layer digest) Shoal's annotations give, if both
/// are there and non-empty.
pub fn shoal_source(labels: &BTreeMap<String, String>) -> (Option<String>, Option<String>) {
    let get = |k: &str| labels.get(k).filter(|v| !v.is_empty()).cloned();
    (get(LABEL_SHOAL_SOURCE), get(LABEL_SHOAL_LAYER_DIGEST))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote::layers::{detect, LABEL_CRI_IMAGE_REF, LABEL_TARGET, LABEL_TOC_DIGEST};

    fn allow(hosts: &[&str], credentials: bool) -> SourcePolicy {
        SourcePolicy {
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            credentials,
        }
    }

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn shoal_annotations_alone_make_a_layer_remote() {
        let l = labels(&[
            (LABEL_TARGET, "sha256:chain"),
            (LABEL_TOC_DIGEST, "sha256:toc"),
            (LABEL_SHOAL_SOURCE, "127.0.0.1:5000/app"),
            (LABEL_SHOAL_LAYER_DIGEST, "sha256:layer"),
        ]);
        let (target, r) = detect(&l, &allow(&["127.0.0.1:5000"], false)).expect("remote");
        assert_eq!(target, "sha256:chain");
        assert_eq!(r.image_ref, "127.0.0.1:5000/app");
        assert_eq!(r.layer_digest, "sha256:layer");
        assert_eq!(r.toc_digest, "sha256:toc");
        assert!(
            r.anonymous,
            "no credentials to an image-chosen host by default"
        );
        let (_, r) = detect(&l, &allow(&["127.0.0.1:5000"], true)).unwrap();
        assert!(!r.anonymous, "source_credentials = true");
    }

    #[test]
    fn shoal_source_off_the_allow_list_is_not_followed() {
        let l = labels(&[
            (LABEL_TARGET, "sha256:chain"),
            (LABEL_TOC_DIGEST, "sha256:toc"),
            (LABEL_SHOAL_SOURCE, "private.example.com/secret/app"),
            (LABEL_SHOAL_LAYER_DIGEST, "sha256:layer"),
        ]);
        // Not remote: containerd pulls the layer itself, from where the
        // image really came from.
        assert!(detect(&l, &SourcePolicy::default()).is_none());
        assert!(detect(&l, &allow(&["127.0.0.1:5000", "example.com"], true)).is_none());
        assert!(detect(&l, &allow(&["private.example.com"], false)).is_some());
        // Docker Hub's aliases are one host.
        let p = allow(&["registry-1.docker.io"], false);
        assert_eq!(p.check("docker.io/library/alpine"), Ok(false));
        assert_eq!(p.check("alpine"), Ok(false));
        assert!(p.check("not a reference").is_err());
        let err = p.check("ghcr.io/o/r").unwrap_err();
        assert!(err.contains("remote.source_hosts"), "{err}");
    }

    #[test]
    fn hints_parse_and_malformed_ones_are_ignored() {
        let l = labels(&[
            (LABEL_SHOAL_TOC_POSITION, "4194400:407862"),
            (LABEL_SHOAL_STARTUP_END, "4169435"),
        ]);
        assert_eq!(
            hints(&l),
            Hints {
                toc: Some((4_194_400, 407_862)),
                startup_end: Some(4_169_435),
            }
        );
        for bad in [
            "",
            "12",
            "x:1",
            "1:y",
            "100:0",
            "0:10",
            "18446744073709551615:2",
            "-1:5",
        ] {
            let l = labels(&[(LABEL_SHOAL_TOC_POSITION, bad)]);
            assert_eq!(hints(&l), Hints::default(), "{bad:?}");
        }
        for bad in ["", "0", "-3", "1:2", "x"] {
            let l = labels(&[(LABEL_SHOAL_STARTUP_END, bad)]);
            assert_eq!(hints(&l), Hints::default(), "{bad:?}");
        }
        assert_eq!(hints(&BTreeMap::new()), Hints::default());
    }

    #[test]
    fn client_labels_win_and_missing_parts_mean_not_remote() {
        let mut l = labels(&[
            (LABEL_TARGET, "sha256:chain"),
            (LABEL_TOC_DIGEST, "sha256:toc"),
            (LABEL_SHOAL_SOURCE, "127.0.0.1:5000/app"),
            (LABEL_SHOAL_LAYER_DIGEST, "sha256:layer"),
            (LABEL_CRI_IMAGE_REF, "mirror.local/app:1"),
        ]);
        // The client named the image: no allow-list needed, credentials go
        // to the registry the image was pulled from.
        let (_, r) = detect(&l, &SourcePolicy::default()).unwrap();
        assert_eq!(r.image_ref, "mirror.local/app:1");
        assert!(!r.anonymous);
        l.remove(LABEL_CRI_IMAGE_REF);
        l.remove(LABEL_SHOAL_LAYER_DIGEST);
        assert!(detect(&l, &allow(&["127.0.0.1:5000"], true)).is_none());
    }
}
