//! Shoal's FUSE layer filesystem.
//!
//! This crate will serve one read-only container image layer per mount, from
//! the layer's table of contents, over a small trait (`ChunkSource`) that the
//! snapshotter implements. It must never depend on tokio, tonic or HTTP; the
//! dependency direction is `snapshotter` → `fuse`.
//!
//! The foundation release mounts nothing through FUSE yet: every layer is
//! unpacked by containerd into an overlayfs directory.
