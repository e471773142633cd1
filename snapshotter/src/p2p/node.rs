//! The daemon's P2P listener: the `Peer` and `Tracker` services on their own
//! TCP port, only over mTLS under the cluster CA.
//!
//! Invariants:
//! - Nothing is served without TLS: the server is built only from a
//!   [`NodeTls`], whose config requires a client certificate.
//! - Starting touches no peer: a node with P2P on and no reachable peer
//!   starts and serves its own containers.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use shoal_proto::p2p::peer_server::PeerServer;
use shoal_proto::p2p::tracker_server::TrackerServer;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Server;
use tracing::{error, info};

use super::serve::{ChunkLookup, PeerService, ServeStats};
use super::tls::NodeTls;
use super::tracker::{Limits, Tracker};
use super::tracker_service::TrackerService;

/// The listener could not be started.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// Binding the listen address failed.
    #[error("bind {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The TLS configuration was refused.
    #[error("TLS: {0}")]
    Tls(#[from] tonic::transport::Error),
}

/// A running P2P listener.
pub struct Listener {
    /// The bound address (useful when the port was 0).
    pub local_addr: SocketAddr,
    /// The peer service's counters.
    pub stats: Arc<ServeStats>,
    /// The server task; it ends when the shutdown future completes.
    pub task: JoinHandle<()>,
}

/// Binds `listen` and serves the peer and tracker services over mTLS until
/// `shutdown` completes.
///
/// # Errors
/// The address cannot be bound or the TLS files are refused.
pub async fn start<L: ChunkLookup>(
    listen: &str,
    tls: &NodeTls,
    chunks: Arc<L>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Listener, NodeError> {
    let bind_err = |source| NodeError::Bind {
        addr: listen.to_string(),
        source,
    };
    let listener = TcpListener::bind(listen).await.map_err(bind_err)?;
    let local_addr = listener.local_addr().map_err(bind_err)?;
    let peer = PeerService::new(chunks);
    let stats = peer.stats();
    let tracker = TrackerService::new(Tracker::new(Limits::default(), fastrand::Rng::new()));
    let router = Server::builder()
        .tls_config(tls.server_config())?
        .add_service(PeerServer::new(peer))
        .add_service(TrackerServer::new(tracker));
    info!(address = %local_addr, "P2P peer service listening (mTLS)");
    let task = tokio::spawn(async move {
        if let Err(e) = router
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
            .await
        {
            error!(error = %e, "P2P peer service stopped");
        }
    });
    Ok(Listener {
        local_addr,
        stats,
        task,
    })
}

/// Why the daemon's P2P side did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The TLS directory is unusable.
    #[error("[p2p] tls_dir: {0}")]
    Files(#[from] super::tls::TlsError),
    /// The node certificate names no member.
    #[error("[p2p] tls_dir: {0}")]
    Name(#[from] super::ca::CaError),
    /// The listener did not start.
    #[error("[p2p] listen: {0}")]
    Node(#[from] NodeError),
}

/// Starts the daemon's P2P side from its `[p2p]` section: reads the TLS
/// directory, then serves on `listen`. Contacts no peer.
///
/// # Errors
/// See [`StartError`].
pub async fn start_daemon<L: ChunkLookup>(
    cfg: &crate::config::P2pSection,
    chunks: Arc<L>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Listener, StartError> {
    let tls = NodeTls::load(&cfg.tls_dir)?;
    let id = super::ca::node_name(&cfg.tls_dir)?;
    let listener = start(&cfg.listen, &tls, chunks, shutdown).await?;
    info!(
        member = %id,
        advertise = %cfg.advertised(),
        static_peers = cfg.peers.len(),
        dns = cfg.dns.as_deref().unwrap_or(""),
        "P2P enabled (membership is not built yet: peers are not contacted)"
    );
    Ok(listener)
}
