//! Remote (lazily pulled) layers.
//!
//! # Layout
//! - [`toc`]: eStargz / zstd:chunked footers and TOCs, verified against the
//!   manifest's TOC digest, and the chunk table.
//! - [`store`]: the content-addressed store of verified chunks.
//! - [`fetch`]: merged Range fetches, decompression, verification, single
//!   flight.

pub mod fetch;
pub mod store;
pub mod toc;
