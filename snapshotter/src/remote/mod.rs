//! Remote (lazily pulled) layers.
//!
//! # Layout
//! - [`toc`]: eStargz / zstd:chunked footers and TOCs, verified against the
//!   manifest's TOC digest, and the chunk table.
//! - [`store`]: the content-addressed store of verified chunks.
//! - [`annotations`]: Shoal's own layer annotations (`shoal convert`), which
//!   every containerd client passes to Prepare.
//! - [`layers`]: detection in Prepare labels, TOC resolution, mounts,
//!   prefetch and background fetch.
//! - [`prefetch`]: startup prefetches in flight, awaited by the container's
//!   Prepare.
//! - [`recorder`]: startup profiles: first reads of a layer's files.
//! - [`registry_blobs`]: layer blobs from registries.
//! - [`layer`]: a mounted layer: FUSE reads → store or fetch.
//! - [`fetch`]: merged Range fetches, decompression, verification, single
//!   flight.

pub mod annotations;
pub mod fetch;
pub mod layer;
pub mod layers;
pub mod prefetch;
pub mod recorder;
pub mod registry_blobs;
pub mod store;
pub mod toc;
