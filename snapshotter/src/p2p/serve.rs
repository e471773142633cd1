//! The `shoal.p2p.v1.Peer` service: serves chunks this node holds.
//!
//! Invariants:
//! - A chunk is served only after this node re-hashed its own copy and found
//!   the sha256 equal to the digest asked for; a copy that fails is not sent
//!   (NOT_FOUND) and is counted. A peer could not be fooled by a bad copy
//!   anyway (receivers check), but a node never knowingly sends one.
//! - The store is read on the blocking pool (it may read disk).
//! - A chunk streams in messages of at most [`PART_BYTES`], slices of the
//!   store's `Bytes` (no copy); HTTP/2 flow control paces the sender.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use sha2::{Digest as _, Sha256};
use shoal_proto::p2p::peer_server::Peer;
use shoal_proto::p2p::{ChunkPart, GetChunkRequest};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tracing::warn;

use super::{digest_of, Digest, PART_BYTES};
use crate::remote::store::ChunkStore;

/// Where the service finds chunks. The daemon's is the [`ChunkStore`]; tests
/// may use a map.
pub trait ChunkLookup: Send + Sync + 'static {
    /// The stored bytes of chunk `digest`, if held (unverified here: the
    /// service checks them).
    fn lookup(&self, digest: &Digest) -> Option<Bytes>;
}

impl ChunkLookup for ChunkStore {
    fn lookup(&self, digest: &Digest) -> Option<Bytes> {
        self.get(digest)
    }
}

/// Counters of the peer service.
#[derive(Debug, Default)]
pub struct ServeStats {
    /// Chunks streamed to peers.
    pub chunks_served: AtomicU64,
    /// Bytes streamed to peers.
    pub bytes_served: AtomicU64,
    /// Requests for chunks this node does not hold.
    pub not_found: AtomicU64,
    /// Own copies that failed their sha256 check and were not sent.
    pub bad_own_copies: AtomicU64,
}

/// The peer service over a chunk lookup.
pub struct PeerService<L: ChunkLookup> {
    chunks: Arc<L>,
    stats: Arc<ServeStats>,
}

impl<L: ChunkLookup> PeerService<L> {
    /// A service serving the chunks `chunks` holds.
    pub fn new(chunks: Arc<L>) -> Self {
        PeerService {
            chunks,
            stats: Arc::default(),
        }
    }

    /// Its counters.
    pub fn stats(&self) -> Arc<ServeStats> {
        self.stats.clone()
    }
}

/// A chunk's bytes cut into messages of at most [`PART_BYTES`].
pub fn parts(data: Bytes) -> impl Iterator<Item = ChunkPart> {
    let len = data.len();
    (0..len.div_ceil(PART_BYTES)).map(move |i| {
        let end = len.min((i + 1) * PART_BYTES);
        ChunkPart {
            data: data.slice(i * PART_BYTES..end),
        }
    })
}

type PartStream = Pin<Box<dyn Stream<Item = Result<ChunkPart, Status>> + Send>>;

#[tonic::async_trait]
impl<L: ChunkLookup> Peer for PeerService<L> {
    type GetChunkStream = PartStream;

    async fn get_chunk(
        &self,
        req: Request<GetChunkRequest>,
    ) -> Result<Response<Self::GetChunkStream>, Status> {
        let digest = digest_of(&req.get_ref().digest)
            .ok_or_else(|| Status::invalid_argument("digest must be 32 bytes"))?;
        let chunks = self.chunks.clone();
        let found = tokio::task::spawn_blocking(move || {
            chunks
                .lookup(&digest)
                .map(|b| (Sha256::digest(&b)[..] == digest[..], b))
        })
        .await
        .map_err(|e| Status::internal(format!("chunk lookup: {e}")))?;
        let data = match found {
            Some((true, data)) => data,
            Some((false, _)) => {
                self.stats.bad_own_copies.fetch_add(1, Ordering::Relaxed);
                warn!(chunk = %hex::encode(digest), "own copy failed its sha256 check; not served");
                return Err(Status::not_found("chunk not held"));
            }
            None => {
                self.stats.not_found.fetch_add(1, Ordering::Relaxed);
                return Err(Status::not_found("chunk not held"));
            }
        };
        self.stats.chunks_served.fetch_add(1, Ordering::Relaxed);
        self.stats
            .bytes_served
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(Response::new(Box::pin(tokio_stream::iter(
            parts(data).map(Ok),
        ))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_bounded_and_complete() {
        let data = Bytes::from(vec![7u8; 2 * PART_BYTES + 5]);
        let p: Vec<_> = parts(data.clone()).collect();
        assert_eq!(p.len(), 3);
        assert!(p.iter().all(|m| m.data.len() <= PART_BYTES));
        let joined: Vec<u8> = p.iter().flat_map(|m| m.data.to_vec()).collect();
        assert_eq!(joined, data.to_vec());
        assert_eq!(parts(Bytes::new()).count(), 0);
    }
}
