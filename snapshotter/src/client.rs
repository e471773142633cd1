//! A gRPC client for a Shoal daemon (or any snapshotter) on a Unix socket.
//! Used by the `shoal` CLI and by the integration tests, which drive the real
//! daemon exactly as containerd's proxy client would.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use shoal_proto::snapshots::snapshots_client::SnapshotsClient;
use tonic::transport::{Channel, Endpoint};

/// Connects to the snapshots service on `socket`.
///
/// # Errors
/// The socket cannot be dialled.
pub async fn connect(socket: &Path) -> Result<SnapshotsClient<Channel>, tonic::transport::Error> {
    Ok(SnapshotsClient::new(channel(socket).await?))
}

/// A gRPC channel to a Unix socket, for any of the services on it.
///
/// # Errors
/// The socket cannot be dialled.
pub async fn channel(socket: &Path) -> Result<Channel, tonic::transport::Error> {
    let socket: PathBuf = socket.to_owned();
    // The URI is required by the API but unused: every connection dials the
    // socket.
    let channel = Endpoint::from_static("http://[::]:0")
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await?;
    Ok(channel)
}
