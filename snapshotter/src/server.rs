//! The gRPC endpoint: claiming the Unix socket safely and serving until
//! shutdown.
//!
//! Socket rules: a socket that a live process accepts connections on is never
//! taken over (that would silently cut containerd off from the other
//! daemon); a stale socket file left by a dead process is replaced; a path
//! that exists but is not a socket is refused rather than deleted. The
//! socket has mode [`SOCKET_MODE`] from the moment its path exists
//! ([`crate::sockbind`]), whatever the umask.

use std::future::Future;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt};
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use shoal_proto::cache::cache_server::CacheServer;
use shoal_proto::profile::profiles_server::ProfilesServer;
use shoal_proto::snapshots::snapshots_server::SnapshotsServer;
use shoal_proto::status::status_server::StatusServer;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tracing::{info, warn};

use crate::cache_service::CacheService;
use crate::grpc::Service;
use crate::overlay::Snapshotter;
use crate::status::StatusService;

/// The gRPC socket's mode: only root (containerd, `shoal`) connects.
pub const SOCKET_MODE: u32 = 0o600;

/// Binds `address` with mode [`SOCKET_MODE`], replacing a stale socket but
/// never a live one. Call inside a tokio runtime.
///
/// # Errors
/// The path is served by a live process, is not a socket, or cannot be bound.
pub fn bind(address: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = address.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(dir)
            .with_context(|| format!("create socket directory {}", dir.display()))?;
    }
    match std::fs::symlink_metadata(address) {
        Ok(md) if !md.file_type().is_socket() => {
            bail!("{} exists and is not a socket; refusing to replace it", address.display())
        }
        Ok(_) => match std::os::unix::net::UnixStream::connect(address) {
            Ok(_) => bail!(
                "{} is in use by another live process (another shoal-snapshotter?); refusing to take it over",
                address.display()
            ),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                warn!(socket = %address.display(), "replacing stale socket");
                std::fs::remove_file(address)
                    .with_context(|| format!("remove stale socket {}", address.display()))?;
            }
            Err(e) => {
                return Err(e).with_context(|| format!("probe existing socket {}", address.display()))
            }
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("stat {}", address.display())),
    }
    crate::sockbind::bind_private(address, SOCKET_MODE, |p| {
        let l = std::os::unix::net::UnixListener::bind(p)?;
        l.set_nonblocking(true)?;
        UnixListener::from_std(l)
    })
    .with_context(|| format!("bind {}", address.display()))
}

/// Serves the snapshots API on `listener` until `shutdown` completes, then
/// removes the socket file if it is still the one we created.
///
/// # Errors
/// A transport error from the gRPC server.
pub async fn serve(
    sn: Arc<Snapshotter>,
    listener: UnixListener,
    address: &Path,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let ino = std::fs::metadata(address).map(|m| m.ino()).ok();
    let result = tonic::transport::Server::builder()
        .add_service(SnapshotsServer::new(Service::new(sn.clone())))
        .add_service(StatusServer::new(StatusService::new(sn.clone())))
        .add_service(CacheServer::new(CacheService::new(sn.clone())))
        .add_service(ProfilesServer::new(
            crate::profile_service::ProfileService::new(sn),
        ))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
        .context("gRPC server");
    if ino.is_some() && std::fs::metadata(address).map(|m| m.ino()).ok() == ino {
        let _ = std::fs::remove_file(address);
    }
    info!("gRPC server stopped");
    result
}
