//! Shoal: a containerd remote snapshotter.
//!
//! # Layout
//! - [`config`]: the config file, its defaults and validation.
//! - [`metadata`]: snapshot metadata in redb (kinds, parents, labels, ids).
//! - [`overlay`]: containerd's overlayfs snapshotter semantics: directories,
//!   mounts, commit, remove, cleanup.
//! - [`registry`]: registry client: hosts.toml mirrors, auth, Range fetches.
//! - [`remote`]: lazily pulled layers: TOCs, chunk store, fetching.
//! - [`pull`]: `shoal pull`: an image into containerd through the
//!   snapshotter, with the labels for lazy layers.
//! - [`convert`]: `shoal convert`: images rewritten into Shoal's lazily
//!   mountable `tar+zstd` format.
//! - [`filter`]: containerd's filter expressions, for List.
//! - [`usage`]: disk usage as containerd counts it.
//! - [`grpc`]: the `containerd.services.snapshots.v1.Snapshots` service.
//! - [`server`]: the Unix socket and the server's lifetime.
//! - [`sockbind`]: sockets created with their final mode; peer checks.
//! - [`status`]: Shoal's own read-only status service.
//! - [`cache_cli`]: `shoal gc`, `pin`, `unpin` and the cache part of `shoal status`.
//! - [`cache_service`]: Shoal's chunk cache service (GC, pins, usage).
//! - [`metrics`]: the Prometheus `/metrics` endpoint.
//! - [`profile_service`]: recorded first reads (startup profiles) over gRPC.
//! - [`cri`]: the CRI image-service proxy and its per-image pull
//!   credentials.
//! - [`p2p`]: peer-to-peer chunk exchange: the peer service and client,
//!   mTLS under a cluster CA, placement and the per-chunk tracker.
//! - [`client`]: a client for the daemon's socket (CLI, tests).
//! - [`error`]: the error type and its mapping onto gRPC codes.
//!
//! Dependencies point one way: this crate uses `shoal-proto` and `shoal-fuse`;
//! neither knows about it.

pub mod cache_cli;
pub mod cache_service;
pub mod client;
pub mod config;
pub mod convert;
pub mod cri;
pub mod error;
pub mod filter;
pub mod grpc;
pub mod handover;
pub mod metadata;
pub mod metrics;
pub mod overlay;
pub mod p2p;
pub mod profile_service;
pub mod pull;
pub mod registry;
pub mod remote;
pub mod secret_file;
pub mod server;
pub mod sockbind;
pub mod status;
pub mod usage;
