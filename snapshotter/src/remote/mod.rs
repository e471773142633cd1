//! Remote (lazily pulled) layers.
//!
//! # Layout
//! - [`toc`]: eStargz / zstd:chunked footers and TOCs, verified against the
//!   manifest's TOC digest, and the chunk table.
//! - [`store`]: the content-addressed store of verified chunks.
//! - [`objects`]: whole-file objects, the backing files of kernel
//!   passthrough for large files that are all local.
//! - [`index`]: the store's index in redb: sizes, last access, pins.
//! - [`cache`]: references, pins, probes; runs GC.
//! - [`gc`]: garbage collection: TTL for unreferenced chunks, then LRU.
//! - [`tocs`]: the kept TOCs under `ROOT/tocs/`, which layer and images each
//!   belongs to (so pins cover unmounted layers), and their GC.
//! - [`clock`]: wall-clock time, injectable for tests.
//! - [`annotations`]: Shoal's own layer annotations (`shoal convert`), which
//!   every containerd client passes to Prepare.
//! - [`layers`]: detection in Prepare labels, TOC resolution, mounts,
//!   prefetch and background fetch.
//! - [`prefetch`]: startup prefetches in flight, awaited by the container's
//!   Prepare.
//! - [`recorder`]: startup profiles: first reads of a layer's files.
//! - [`readahead`]: larger kernel readahead on each FUSE mount.
//! - [`layer`]: a mounted layer: FUSE reads → store or fetch.
//! - [`identity`]: whether a lazy layer's content is the layer its chain ID
//!   names (diffID check in one pass over the blob, verdicts, quarantine).
//! - [`fetch`]: merged Range fetches, single flight, and the seam where
//!   each chunk's source is decided ([`fetch::Router`]): the registry
//!   ([`fetch::registry`]) and the primed startup window
//!   ([`fetch::primed`]); decoding and the gate between fetch priorities.

pub mod annotations;
pub mod cache;
pub mod clock;
pub mod fetch;
pub mod gc;
pub mod identity;
pub mod index;
pub mod layer;
pub mod layers;
pub mod objects;
pub mod prefetch;
pub mod readahead;
pub mod recorder;
pub mod store;
pub mod toc;
pub mod tocs;
