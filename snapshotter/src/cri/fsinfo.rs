//! `ImageFsInfo`'s answer, made usable by the kubelet for Shoal.
//!
//! containerd before 1.6.32 / 1.7.16 (Debian 12's 1.6.20 included) reports
//! `<containerd root>/io.containerd.snapshotter.v1.<name>` as the image
//! filesystem of a proxy snapshotter (containerd #10095). That directory
//! never exists for Shoal, whose data lives under its own root, so the
//! kubelet cannot stat it: image GC and the ephemeral-storage eviction
//! signals (`imagefs.available`) break.
//!
//! The proxy rewrites such a mountpoint to Shoal's root, which holds the
//! snapshots, the chunk cache and the kept TOCs. Only a mountpoint that (1)
//! names a snapshotter directory and (2) does not exist is rewritten; a path
//! that exists (newer containerd with `exports.root`, or an installer's
//! symlink) is left as it is, and so are the byte and inode counts
//! (containerd sums them from the snapshotter's Usage). A rewritten answer is
//! re-encoded from Shoal's copy of the protocol, so fields that copy does not
//! know are dropped from it; an answer that needs no rewrite passes through
//! byte for byte.

use std::path::Path;

use bytes::Bytes;
use prost::Message as _;
use shoal_proto::cri;

/// The prefix of the directory name containerd reports for a snapshotter.
const SNAPSHOTTER_DIR_PREFIX: &str = "io.containerd.snapshotter.v1.";

/// True for a mountpoint the kubelet could not use: a snapshotter directory
/// that does not exist.
fn needs_rewrite(mountpoint: &str) -> bool {
    let p = Path::new(mountpoint);
    p.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with(SNAPSHOTTER_DIR_PREFIX))
        && !p.exists()
}

/// `raw` (an encoded `ImageFsInfoResponse`) with every missing snapshotter
/// mountpoint among its image filesystems replaced by `root`; `raw` itself
/// when nothing is replaced or it does not decode.
pub fn rewrite(raw: Bytes, root: &Path) -> Bytes {
    let Ok(mut resp) = cri::ImageFsInfoResponse::decode(raw.clone()) else {
        return raw;
    };
    let mut changed = false;
    for fs in &mut resp.image_filesystems {
        if let Some(id) = fs.fs_id.as_mut() {
            if needs_rewrite(&id.mountpoint) {
                tracing::debug!(reported = %id.mountpoint, root = %root.display(), "ImageFsInfo: mountpoint rewritten to Shoal's root");
                id.mountpoint = root.display().to_string();
                changed = true;
            }
        }
    }
    if changed {
        Bytes::from(resp.encode_to_vec())
    } else {
        raw
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(mountpoint: &str) -> Bytes {
        Bytes::from(
            cri::ImageFsInfoResponse {
                image_filesystems: vec![cri::FilesystemUsage {
                    timestamp: 7,
                    fs_id: Some(cri::FilesystemIdentifier {
                        mountpoint: mountpoint.into(),
                    }),
                    used_bytes: Some(cri::UInt64Value { value: 42 }),
                    inodes_used: Some(cri::UInt64Value { value: 3 }),
                }],
                container_filesystems: Vec::new(),
            }
            .encode_to_vec(),
        )
    }

    fn mountpoint(raw: Bytes) -> (String, u64) {
        let r = cri::ImageFsInfoResponse::decode(raw).unwrap();
        let fs = &r.image_filesystems[0];
        (
            fs.fs_id.as_ref().unwrap().mountpoint.clone(),
            fs.used_bytes.as_ref().unwrap().value,
        )
    }

    #[test]
    fn a_missing_snapshotter_dir_becomes_shoals_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("shoal");
        let missing = dir
            .path()
            .join("containerd/io.containerd.snapshotter.v1.shoal");
        let out = rewrite(answer(missing.to_str().unwrap()), &root);
        assert_eq!(mountpoint(out), (root.display().to_string(), 42));
    }

    #[test]
    fn existing_or_other_paths_pass_through_byte_for_byte() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("shoal");
        // Exists (exports.root on newer containerd, or an install symlink).
        let there = dir.path().join("io.containerd.snapshotter.v1.shoal");
        std::fs::create_dir(&there).unwrap();
        let raw = answer(there.to_str().unwrap());
        assert_eq!(rewrite(raw.clone(), &root), raw);
        // Not a snapshotter directory.
        let raw = answer("/var/lib/elsewhere");
        assert_eq!(rewrite(raw.clone(), &root), raw);
        // Not an ImageFsInfoResponse at all.
        let raw = Bytes::from_static(&[0xff, 0xff, 0xff]);
        assert_eq!(rewrite(raw.clone(), &root), raw);
    }
}
