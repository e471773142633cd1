//! The `runtime.v1.ImageService` proxy: every call is forwarded to
//! containerd's CRI socket as raw bytes ([`RawCodec`]); requests, responses,
//! metadata and statuses come back as containerd sent them.
//!
//! Two calls are also decoded on the side:
//! - `PullImage`: its `auth` is stored for the image *before* the call is
//!   forwarded (containerd prepares the lazy layers, and Shoal fetches their
//!   TOCs, during the pull) and put back as it was if the pull fails, so a
//!   wrong pull secret does not replace a good one (kubelet tries each of a
//!   pod's secrets in turn). A pull without `auth` leaves the stored one.
//! - `RemoveImage`: once containerd removed the image, the credentials of
//!   every name it had (asked with `ImageStatus` first, since the request may
//!   name it by ID) are forgotten.
//!
//! - `ImageFsInfo`: the answer's image filesystem is rewritten to Shoal's
//!   root where containerd names a directory that does not exist
//!   ([`super::fsinfo`]).
//!
//! Only unary calls are forwarded; a streaming one (`StreamImages`) fails
//! with the status containerd gives a unary call of it.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use bytes::Bytes;
use prost::Message as _;
use shoal_proto::cri;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::server::NamedService;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};

use super::codec::RawCodec;
use super::fsinfo;
use super::store::CredentialStore;
use crate::registry::auth::normalize_host;
use crate::registry::{Credential, ImageCredential, Reference};

/// Largest message forwarded either way (kubelet's own limit is 16 MiB).
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// The proxy service; cheap to clone.
#[derive(Clone)]
pub struct ImageProxy {
    upstream: Channel,
    store: Arc<CredentialStore>,
    /// Reported as the image filesystem where containerd's is missing.
    image_fs: Option<Arc<std::path::Path>>,
}

impl NamedService for ImageProxy {
    const NAME: &'static str = "runtime.v1.ImageService";
}

impl ImageProxy {
    /// Forwards to `upstream` (containerd's CRI socket), keeping pull
    /// credentials in `store`.
    pub fn new(upstream: Channel, store: Arc<CredentialStore>) -> ImageProxy {
        ImageProxy {
            upstream,
            store,
            image_fs: None,
        }
    }

    /// Reports `root` (Shoal's root) as the image filesystem where
    /// containerd names a missing snapshotter directory.
    pub fn with_image_fs(mut self, root: &std::path::Path) -> ImageProxy {
        self.image_fs = Some(Arc::from(root));
        self
    }

    /// Sends `req` to containerd as it is.
    async fn forward(&self, path: &str, req: Request<Bytes>) -> Result<Response<Bytes>, Status> {
        let mut client = tonic::client::Grpc::new(self.upstream.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        client
            .ready()
            .await
            .map_err(|e| Status::unavailable(format!("containerd's CRI socket: {e}")))?;
        let path = http::uri::PathAndQuery::try_from(path)
            .map_err(|e| Status::internal(format!("method path {path:?}: {e}")))?;
        client.unary(req, path, RawCodec).await
    }

    async fn call(&self, path: String, req: Request<Bytes>) -> Result<Response<Bytes>, Status> {
        match path.rsplit('/').next().unwrap_or("") {
            "PullImage" => self.pull(&path, req).await,
            "RemoveImage" => self.remove(&path, req).await,
            "ImageFsInfo" => {
                let resp = self.forward(&path, req).await?;
                Ok(match &self.image_fs {
                    Some(root) => resp.map(|raw| fsinfo::rewrite(raw, root)),
                    None => resp,
                })
            }
            _ => self.forward(&path, req).await,
        }
    }

    async fn pull(&self, path: &str, req: Request<Bytes>) -> Result<Response<Bytes>, Status> {
        let decoded = cri::PullImageRequest::decode(req.get_ref().clone()).ok();
        let keep = decoded.and_then(|p| {
            let image = p.image?.image;
            let cred = image_credential(&image, p.auth.as_ref()?)?;
            Some((image, cred))
        });
        let Some((image, cred)) = keep else {
            return self.forward(path, req).await;
        };
        let store = self.store.clone();
        let (img, c) = (image.clone(), cred.clone());
        let old = match tokio::task::spawn_blocking(move || store.put(&img, &c)).await {
            Ok(Ok(old)) => old,
            Ok(Err(e)) => {
                // The pull still goes ahead; its lazy layers use the node's
                // credentials.
                warn!(%image, error = %e, "cannot keep the pull credentials");
                return self.forward(path, req).await;
            }
            Err(e) => return Err(Status::internal(format!("credential store: {e}"))),
        };
        debug!(%image, user = %cred.credential.username, "kept pull credentials");
        let result = self.forward(path, req).await;
        if let Err(status) = &result {
            debug!(%image, code = ?status.code(), "pull failed; putting back the previous credentials");
            let store = self.store.clone();
            let restored = tokio::task::spawn_blocking(move || store.restore(&image, old)).await;
            if let Ok(Err(e)) = restored {
                warn!(error = %e, "cannot put back the previous pull credentials");
            }
        }
        result
    }

    async fn remove(&self, path: &str, req: Request<Bytes>) -> Result<Response<Bytes>, Status> {
        let spec = cri::RemoveImageRequest::decode(req.get_ref().clone())
            .ok()
            .and_then(|r| r.image);
        let mut names = Vec::new();
        if let Some(spec) = &spec {
            names.push(spec.image.clone());
            names.extend(self.names(spec).await);
        }
        let result = self.forward(path, req).await?;
        if !names.is_empty() {
            let store = self.store.clone();
            match tokio::task::spawn_blocking(move || store.remove(&names)).await {
                Ok(Ok(n)) if n > 0 => {
                    info!(entries = n, "forgot the credentials of a removed image")
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => warn!(error = %e, "cannot forget the credentials of a removed image"),
                Err(e) => warn!(error = %e, "credential store task failed"),
            }
        }
        Ok(result)
    }

    /// Every name of the image `spec` names (tags and digests), or none.
    async fn names(&self, spec: &cri::ImageSpec) -> Vec<String> {
        let mut client = cri::image_service_client::ImageServiceClient::new(self.upstream.clone());
        let req = cri::ImageStatusRequest {
            image: Some(spec.clone()),
            verbose: false,
        };
        match client.image_status(req).await {
            Ok(r) => r
                .into_inner()
                .image
                .map(|i| i.repo_tags.into_iter().chain(i.repo_digests).collect())
                .unwrap_or_default(),
            Err(e) => {
                debug!(error = %e, "ImageStatus before RemoveImage failed");
                Vec::new()
            }
        }
    }
}

/// The credential a `PullImage` of `image` carries in `auth`, as containerd's
/// CRI reads it: `auth` (base64 `user:password`) overrides
/// `username`/`password`, and a `server_address` for another host than the
/// image's means no credential. `None` too when `auth` holds nothing.
pub fn image_credential(image: &str, auth: &cri::AuthConfig) -> Option<ImageCredential> {
    let reference: Reference = image.parse().ok()?;
    let host = normalize_host(&reference.registry);
    if !auth.server_address.is_empty() && normalize_host(&auth.server_address) != host {
        debug!(%image, server = %auth.server_address, "pull credentials are for another host; not kept");
        return None;
    }
    let (mut username, mut password) = (auth.username.clone(), auth.password.clone());
    if !auth.auth.is_empty() {
        let raw = B64.decode(auth.auth.trim()).ok()?;
        let raw = String::from_utf8(raw).ok()?;
        let (u, p) = raw.split_once(':')?;
        username = u.to_string();
        password = p.to_string();
    }
    if username.is_empty()
        && password.is_empty()
        && auth.identity_token.is_empty()
        && auth.registry_token.is_empty()
    {
        return None;
    }
    Some(ImageCredential {
        credential: Credential {
            host,
            username,
            password,
            identity_token: auth.identity_token.clone(),
        },
        registry_token: auth.registry_token.clone(),
    })
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl tower::Service<http::Request<Body>> for ImageProxy {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let path = req.uri().path().to_string();
            let svc = tower::service_fn(move |r: Request<Bytes>| {
                let (this, path) = (this.clone(), path.clone());
                async move { this.call(path, r).await }
            });
            let mut grpc = tonic::server::Grpc::new(RawCodec)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES);
            Ok(grpc.unary(svc, req).await)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> cri::AuthConfig {
        cri::AuthConfig::default()
    }

    #[test]
    fn auth_config_as_containerd_reads_it() {
        let a = cri::AuthConfig {
            username: "u".into(),
            password: "p".into(),
            ..auth()
        };
        let c = image_credential("r.io/app:v1", &a).unwrap();
        assert_eq!(
            (c.credential.host.as_str(), c.credential.username.as_str()),
            ("r.io", "u")
        );
        // `auth` wins over username/password.
        let a = cri::AuthConfig {
            username: "u".into(),
            auth: B64.encode("alice:s3:cret"),
            ..auth()
        };
        let c = image_credential("alpine", &a).unwrap();
        assert_eq!(c.credential.host, "docker.io");
        assert_eq!(
            (
                c.credential.username.as_str(),
                c.credential.password.as_str()
            ),
            ("alice", "s3:cret")
        );
        // Tokens alone are credentials.
        let a = cri::AuthConfig {
            registry_token: "rt".into(),
            ..auth()
        };
        assert_eq!(image_credential("r.io/a", &a).unwrap().registry_token, "rt");
        // A server address for another host: not this image's credential.
        let a = cri::AuthConfig {
            username: "u".into(),
            server_address: "https://other.io".into(),
            ..auth()
        };
        assert!(image_credential("r.io/app", &a).is_none());
        let a = cri::AuthConfig {
            username: "u".into(),
            server_address: "https://index.docker.io/v1/".into(),
            ..auth()
        };
        assert!(image_credential("alpine", &a).is_some());
        // Nothing, or not a reference: none.
        assert!(image_credential("r.io/app", &auth()).is_none());
        let a = cri::AuthConfig {
            username: "u".into(),
            ..auth()
        };
        assert!(image_credential("Not A Reference!", &a).is_none());
    }
}
