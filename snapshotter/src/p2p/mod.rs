//! Peer-to-peer chunk exchange between the nodes of a cluster
//! (docs/p2p.md): building blocks that the fetch path's chunk-source router
//! uses as one more source, with the registry as the fallback.
//!
//! # Layout
//! - [`serve`]: the `shoal.p2p.v1.Peer` service: streams a chunk this node
//!   holds, by digest, after checking its own copy.
//! - [`client`]: [`client::PeerClient`], which fetches a chunk from a peer
//!   and checks it against the digest and length the *caller* took from its
//!   own verified TOC.
//! - [`tls`]: mTLS under the cluster CA: loading a node's files, server and
//!   client configs.
//! - [`ca`]: creating the cluster CA and issuing node certificates
//!   (`shoal cluster`).
//! - [`cli`]: the `shoal cluster` subcommands.
//! - [`placement`]: rendezvous hashing of a chunk digest over live members:
//!   the chunk's owner (its tracker) and the failover order.
//! - [`tracker`]: the owner side: who holds or is fetching a chunk; hands a
//!   requester the less loaded of two random holders.
//! - [`tracker_service`]: the `shoal.p2p.v1.Tracker` gRPC service over a
//!   [`tracker::Tracker`].
//! - [`node`]: the daemon's P2P listener (its own port, mTLS only).
//!
//! Invariant: nothing a peer sends is trusted. A chunk is accepted only if its
//! length and sha256 equal what the receiver's own verified TOC says.

pub mod ca;
pub mod cli;
pub mod client;
pub mod node;
pub mod placement;
pub mod serve;
pub mod tls;
pub mod tracker;
pub mod tracker_service;

/// A chunk digest: the sha256 of its uncompressed bytes (the chunk store's
/// key, from the layer's TOC).
pub type Digest = [u8; 32];

/// The largest message of a streamed chunk. Bounded so that a big chunk is
/// sent as several HTTP/2 frames' worth of messages under flow control
/// rather than one allocation on both sides.
pub const PART_BYTES: usize = 256 << 10;

/// The digest in a request, if it is 32 bytes long.
pub(crate) fn digest_of(bytes: &[u8]) -> Option<Digest> {
    bytes.try_into().ok()
}
