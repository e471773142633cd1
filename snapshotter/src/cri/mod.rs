//! Kubernetes' CRI image service, proxied: the kubelet is pointed at Shoal's
//! socket (`--image-service-endpoint`), Shoal forwards every call to
//! containerd, and keeps the pull credentials of each image so that its
//! lazy layers are fetched with the pod's pull secret (containerd passes no
//! credentials to snapshotters).
//!
//! # Layout
//! - [`codec`]: a gRPC codec that passes message bytes through.
//! - [`fsinfo`]: `ImageFsInfo`'s image filesystem, made statable by the
//!   kubelet (containerd #10095).
//! - [`proxy`]: the `runtime.v1.ImageService` service; what it decodes.
//! - [`store`]: the root-only credential store, its expiry and persistence.
//!
//! The registry client uses the store through
//! [`crate::registry::ScopedCredentials`] (by the host contacted and the
//! repository), so lazy layers need no hook of their own.

pub mod codec;
pub mod fsinfo;
pub mod proxy;
pub mod store;

use std::future::Future;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use hyper_util::rt::TokioIo;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::{Channel, Endpoint};
use tracing::info;

pub use proxy::ImageProxy;
pub use store::CredentialStore;

/// A channel to containerd's CRI socket that dials on first use, so that
/// Shoal starts while containerd is down (and redials after containerd
/// restarts).
pub fn upstream(socket: &Path) -> Channel {
    let socket: PathBuf = socket.to_owned();
    // The URI is required but unused: every connection dials the socket.
    Endpoint::from_static("http://[::]:0").connect_with_connector_lazy(tower::service_fn(
        move |_| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        },
    ))
}

/// Serves the image-service proxy on `listener` (bound at `address`, see
/// [`crate::server::bind`]) until `shutdown` completes, then removes the
/// socket file if it is still ours. `image_fs` is Shoal's root, reported to
/// the kubelet as the image filesystem where containerd names a missing
/// directory ([`fsinfo`]).
///
/// # Errors
/// A transport error from the gRPC server.
pub async fn serve(
    listener: UnixListener,
    address: &Path,
    containerd: &Path,
    store: Arc<CredentialStore>,
    image_fs: &Path,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let ino = std::fs::metadata(address).map(|m| m.ino()).ok();
    info!(
        address = %address.display(),
        containerd = %containerd.display(),
        credentials = %store.path().display(),
        "CRI image-service proxy serving"
    );
    let result = tonic::transport::Server::builder()
        .add_service(ImageProxy::new(upstream(containerd), store).with_image_fs(image_fs))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
        .context("CRI image-service proxy");
    if ino.is_some() && std::fs::metadata(address).map(|m| m.ino()).ok() == ino {
        let _ = std::fs::remove_file(address);
    }
    result
}
