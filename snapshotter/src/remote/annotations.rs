//! Shoal's own layer annotations, written by `shoal convert`.
//!
//! containerd's unpacker passes every layer-descriptor annotation whose key
//! starts with `containerd.io/snapshot/` to Prepare as a label, whichever
//! client pulls (nerdctl, CRI with `disable_snapshot_annotations = true`,
//! containerd's Go client). So these labels make a converted image lazily
//! mountable without the `cri.*` labels: the layer's digest, and the
//! repository it was converted into. Both sit in the manifest, which the
//! pulled manifest digest vouches for (docs/format.md).

use std::collections::BTreeMap;

/// The layer blob's own digest.
pub const LABEL_SHOAL_LAYER_DIGEST: &str = "containerd.io/snapshot/shoal.layer.digest";
/// Repository (`HOST/PATH`) to fetch the layer from.
pub const LABEL_SHOAL_SOURCE: &str = "containerd.io/snapshot/shoal.source";

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
        let (target, r) = detect(&l).expect("remote");
        assert_eq!(target, "sha256:chain");
        assert_eq!(r.image_ref, "127.0.0.1:5000/app");
        assert_eq!(r.layer_digest, "sha256:layer");
        assert_eq!(r.toc_digest, "sha256:toc");
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
        assert_eq!(detect(&l).unwrap().1.image_ref, "mirror.local/app:1");
        l.remove(LABEL_CRI_IMAGE_REF);
        l.remove(LABEL_SHOAL_LAYER_DIGEST);
        assert!(detect(&l).is_none());
    }
}
