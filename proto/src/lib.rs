//! Wire protocols spoken by Shoal.
//!
//! # Layout
//! - [`snapshots`]: containerd's `containerd.services.snapshots.v1` API, the
//!   contract between containerd's `proxy_plugins` client and the Shoal
//!   daemon. Both the server and the client are generated.
//! - [`types`]: `containerd.types.Mount`, returned by Prepare, View and Mounts.
//! - [`status`]: Shoal's own read-only status API (`shoal/v1/status.proto`),
//!   served on the daemon's socket beside the snapshots API.
//! - [`cache`]: Shoal's chunk cache API (`shoal/v1/cache.proto`): GC, pins,
//!   usage. Same protobuf package as `status`.
//! - [`profile`]: recorded first reads, for startup profiles
//!   (`shoal/v1/profile.proto`; same package as `status`).
//! - [`cri`]: Kubernetes' CRI, `runtime.v1` (`RuntimeService`,
//!   `ImageService`); messages and clients only. Shoal's CRI image-service
//!   proxy forwards raw bytes and decodes only what it needs with these types.
//! - [`p2p`]: the peer protocol (`shoal/p2p/v1/peer.proto`): chunks streamed
//!   between cluster members by digest, and the per-chunk tracker
//!   (`Locate`, `Announce`). Served only over mTLS.
//!
//! The `.proto` sources are vendored under `vendor/`; `vendor/README.md` says
//! where each came from. Modules mirror the protobuf packages so that the
//! generated cross-package paths (`super::super::...`) resolve.

/// Generated code, one module per protobuf package.
pub mod containerd {
    /// `containerd.types`.
    pub mod types {
        tonic::include_proto!("containerd.types");
    }
    /// `containerd.services.*`.
    pub mod services {
        /// `containerd.services.snapshots`.
        pub mod snapshots {
            /// `containerd.services.snapshots.v1`.
            pub mod v1 {
                tonic::include_proto!("containerd.services.snapshots.v1");
            }
        }
    }
}

/// Kubernetes' CRI (`runtime.*`).
pub mod runtime {
    /// `runtime.v1`.
    pub mod v1 {
        tonic::include_proto!("runtime.v1");
    }
}

/// Shoal's own protocols (`shoal.*`).
pub mod shoal {
    /// `shoal.v1`: the daemon's status API.
    pub mod v1 {
        tonic::include_proto!("shoal.v1");
    }
    /// `shoal.p2p`: the peer protocol between nodes of a cluster.
    pub mod p2p {
        /// `shoal.p2p.v1`: chunk exchange and the per-chunk tracker.
        pub mod v1 {
            tonic::include_proto!("shoal.p2p.v1");
        }
    }
}

pub use containerd::services::snapshots::v1 as snapshots;
pub use containerd::types;
pub use prost_types;
pub use runtime::v1 as cri;
pub use shoal::p2p::v1 as p2p;
pub use shoal::v1 as status;
pub use shoal::v1 as cache;
pub use shoal::v1 as profile;
