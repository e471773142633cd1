//! [`PeerClient`]: fetches one chunk from a peer over mTLS and accepts it
//! only if it matches what the caller expects.
//!
//! Invariants:
//! - The digest and length checked are the ones the *caller* passes, from its
//!   own verified TOC; nothing the peer says about the chunk is believed.
//!   A peer that sends more bytes than expected is cut off at once.
//! - Every request runs under a deadline the caller gives (connection,
//!   handshake and the whole stream); there is no fixed long timeout here.
//!   Choosing the deadline (adaptive, hedging) is the caller's job.
//! - Connections are cached per address and reused (HTTP/2 multiplexes
//!   concurrent requests on one connection).

use std::collections::HashMap;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use sha2::{Digest as _, Sha256};
use shoal_proto::p2p::peer_client::PeerClient as Grpc;
use shoal_proto::p2p::GetChunkRequest;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::Code;

use super::Digest;

/// Why a chunk did not come from a peer. The caller decides what next:
/// another holder, the registry, a ban.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The peer does not hold the chunk.
    #[error("peer {addr} does not hold the chunk")]
    NotFound {
        /// The peer.
        addr: String,
    },
    /// Timed out, unreachable, refused or reset: worth trying elsewhere, and
    /// the same peer later.
    #[error("peer {addr}: {reason}")]
    Transient {
        /// The peer.
        addr: String,
        /// What happened.
        reason: String,
    },
    /// The peer sent bytes that are not the chunk (wrong length or sha256):
    /// proof it is broken or lying. Drop the bytes and ban it.
    #[error("peer {addr} sent a bad chunk: {reason}")]
    Lied {
        /// The peer.
        addr: String,
        /// Which check failed.
        reason: String,
    },
    /// A request that cannot succeed as made (bad address, rejected
    /// request, internal error at the peer).
    #[error("peer {addr}: {reason}")]
    Fatal {
        /// The peer.
        addr: String,
        /// What happened.
        reason: String,
    },
}

impl FetchError {
    /// The peer the error is about.
    pub fn addr(&self) -> &str {
        match self {
            FetchError::NotFound { addr }
            | FetchError::Transient { addr, .. }
            | FetchError::Lied { addr, .. }
            | FetchError::Fatal { addr, .. } => addr,
        }
    }
}

/// Maps a gRPC status from a peer onto a [`FetchError`].
fn from_status(addr: &str, s: &tonic::Status) -> FetchError {
    let addr = addr.to_string();
    let reason = format!("{:?}: {}", s.code(), s.message());
    match s.code() {
        Code::NotFound => FetchError::NotFound { addr },
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::ResourceExhausted
        | Code::Aborted
        | Code::Cancelled
        | Code::Unknown => FetchError::Transient { addr, reason },
        _ => FetchError::Fatal { addr, reason },
    }
}

/// A client of other nodes' `shoal.p2p.v1.Peer` services.
pub struct PeerClient {
    tls: ClientTlsConfig,
    channels: Mutex<HashMap<String, Channel>>,
}

impl PeerClient {
    /// A client that connects with `tls` (normally
    /// [`super::tls::NodeTls::client_config`]).
    pub fn new(tls: ClientTlsConfig) -> PeerClient {
        PeerClient {
            tls,
            channels: Mutex::new(HashMap::new()),
        }
    }

    /// The (lazily connecting) channel to `addr` (`host:port`).
    fn channel(&self, addr: &str) -> Result<Channel, FetchError> {
        if let Some(c) = self.channels.lock().get(addr) {
            return Ok(c.clone());
        }
        let fatal = |reason: String| FetchError::Fatal {
            addr: addr.to_string(),
            reason,
        };
        let channel = Endpoint::from_shared(format!("https://{addr}"))
            .map_err(|e| fatal(format!("bad address: {e}")))?
            .tls_config(self.tls.clone())
            .map_err(|e| fatal(format!("TLS config: {e}")))?
            .connect_lazy();
        self.channels
            .lock()
            .insert(addr.to_string(), channel.clone());
        Ok(channel)
    }

    /// Forgets the connection to `addr` (after it failed), so the next
    /// request dials again.
    pub fn forget(&self, addr: &str) {
        self.channels.lock().remove(addr);
    }

    /// Fetches chunk `digest` of `expected_len` bytes from the peer at
    /// `addr`, within `deadline`. Returns the bytes only if their length and
    /// sha256 are the expected ones.
    ///
    /// # Errors
    /// See [`FetchError`]; on `Transient` the cached connection is dropped.
    pub async fn fetch_chunk(
        &self,
        addr: &str,
        digest: &Digest,
        expected_len: u64,
        deadline: Duration,
    ) -> Result<Bytes, FetchError> {
        let r = match tokio::time::timeout(deadline, self.fetch(addr, digest, expected_len)).await {
            Ok(r) => r,
            Err(_) => Err(FetchError::Transient {
                addr: addr.to_string(),
                reason: format!("no complete answer within {deadline:?}"),
            }),
        };
        if matches!(r, Err(FetchError::Transient { .. })) {
            self.forget(addr);
        }
        r
    }

    async fn fetch(
        &self,
        addr: &str,
        digest: &Digest,
        expected_len: u64,
    ) -> Result<Bytes, FetchError> {
        let lied = |reason: String| FetchError::Lied {
            addr: addr.to_string(),
            reason,
        };
        let mut grpc = Grpc::new(self.channel(addr)?);
        let mut stream = grpc
            .get_chunk(GetChunkRequest {
                digest: digest.to_vec(),
            })
            .await
            .map_err(|s| from_status(addr, &s))?
            .into_inner();
        let cap = usize::try_from(expected_len).map_err(|_| FetchError::Fatal {
            addr: addr.to_string(),
            reason: format!("expected length {expected_len} does not fit in memory"),
        })?;
        let mut buf = BytesMut::with_capacity(cap);
        let mut hasher = Sha256::new();
        while let Some(part) = stream.message().await.map_err(|s| from_status(addr, &s))? {
            let len = buf.len() as u64 + part.data.len() as u64;
            if len > expected_len {
                return Err(lied(format!("more than the expected {expected_len} bytes")));
            }
            hasher.update(&part.data);
            buf.extend_from_slice(&part.data);
        }
        if buf.len() as u64 != expected_len {
            return Err(lied(format!(
                "{} bytes, expected {expected_len}",
                buf.len()
            )));
        }
        if hasher.finalize()[..] != digest[..] {
            return Err(lied("sha256 differs from the requested digest".into()));
        }
        Ok(buf.freeze())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_kinds() {
        let k = |c| from_status("a:1", &tonic::Status::new(c, "x"));
        assert!(matches!(k(Code::NotFound), FetchError::NotFound { .. }));
        assert!(matches!(k(Code::Unavailable), FetchError::Transient { .. }));
        assert!(matches!(
            k(Code::DeadlineExceeded),
            FetchError::Transient { .. }
        ));
        assert!(matches!(k(Code::InvalidArgument), FetchError::Fatal { .. }));
        assert!(matches!(
            k(Code::PermissionDenied),
            FetchError::Fatal { .. }
        ));
    }
}
