//! The CRI image-service proxy and per-image credentials, end to end in one
//! process:
//! - the registry client sends an image's own credential (from the store the
//!   proxy fills) to that image's host and repository only, before the
//!   node's, and never to a mirror;
//! - the proxy forwards raw bytes (a field Shoal does not know reaches
//!   containerd), keeps `PullImage` credentials, puts the old ones back when
//!   a pull fails, and forgets them on `RemoveImage`.
//!
//! containerd's side is a small raw gRPC server that records what reached it
//! and answers as told (a fault injector); the real containerd run is
//! tests/e2e/cri.sh.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use bytes::{BufMut, Bytes, BytesMut};
use common::http::{local_registry, read_head};
use prost::Message as _;
use shoal::cri::codec::RawCodec;
use shoal::cri::CredentialStore;
use shoal::registry::{Credential, RegistryConfig, ScopedCredentials as _};
use shoal_proto::cri;
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpListener;
use tonic::server::NamedService;

const DIGEST: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";

/// A registry that answers HEAD of any blob with 1234 bytes when the request
/// carries Basic `alice:wonderland`, else 401 with a Basic challenge.
/// Records each request's (path, Authorization).
async fn basic_registry() -> (String, Arc<Mutex<Vec<(String, String)>>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let host = l.local_addr().unwrap().to_string();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    tokio::spawn(async move {
        let good = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("alice:wonderland")
        );
        loop {
            let (mut sock, _) = l.accept().await.unwrap();
            let s = s.clone();
            let good = good.clone();
            tokio::spawn(async move {
                while let Some(head) = read_head(&mut sock).await {
                    let head = String::from_utf8_lossy(&head).to_string();
                    let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
                    let auth = head
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("authorization")
                                .then(|| v.trim().to_string())
                        })
                        .unwrap_or_default();
                    s.lock().unwrap().push((path, auth.clone()));
                    let resp = if auth == good {
                        "HTTP/1.1 200 OK\r\ncontent-length: 1234\r\n\r\n".to_string()
                    } else {
                        "HTTP/1.1 401 Unauthorized\r\nwww-authenticate: Basic realm=\"t\"\r\ncontent-length: 0\r\n\r\n".to_string()
                    };
                    if sock.write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (host, seen)
}

fn store(dir: &std::path::Path) -> Arc<CredentialStore> {
    Arc::new(CredentialStore::open(&dir.join("cri"), Duration::from_secs(3600)).unwrap())
}

fn alice(password: &str) -> shoal::registry::ImageCredential {
    shoal::registry::ImageCredential {
        credential: Credential {
            username: "alice".into(),
            password: password.into(),
            ..Credential::default()
        },
        registry_token: String::new(),
    }
}

#[tokio::test]
async fn lazy_fetches_use_the_images_own_credentials() {
    let (host, seen) = basic_registry().await;
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let creds = store(dir.path());
    // The node's credential for the host is wrong: the image's must win.
    let node = Credential {
        host: host.clone(),
        username: "alice".into(),
        password: "node-wide".into(),
        identity_token: String::new(),
    };
    let cfg = RegistryConfig {
        credentials: vec![node],
        retries: 0,
        ..RegistryConfig::default()
    };
    let (registry, _) = local_registry(&certs, &host, "", cfg);
    let registry = registry.with_scoped(creds.clone());
    let private: shoal::registry::Reference = format!("{host}/private/app:v1").parse().unwrap();
    let other: shoal::registry::Reference = format!("{host}/other/app:v1").parse().unwrap();

    let err = registry.blob_size(&private, DIGEST).await.unwrap_err();
    assert!(err.to_string().contains("refused"), "node-wide only: {err}");

    creds
        .put(&format!("{host}/private/app:v1"), &alice("wonderland"))
        .unwrap();
    assert_eq!(registry.blob_size(&private, DIGEST).await.unwrap(), 1234);
    // Scoped to the repository: another one still gets the node's.
    assert!(registry.blob_size(&other, DIGEST).await.is_err());
    // An anonymous client (a host an annotation chose) sends none.
    let before = seen.lock().unwrap().len();
    assert!(registry
        .anonymous()
        .blob_size(&private, DIGEST)
        .await
        .is_err());
    assert!(seen.lock().unwrap()[before..]
        .iter()
        .all(|(_, a)| a.is_empty()));

    // After a restart (a new store on the same directory), still in force.
    let registry2 = registry.clone().with_scoped(store(dir.path()));
    assert_eq!(registry2.blob_size(&private, DIGEST).await.unwrap(), 1234);
    // RemoveImage forgets them.
    creds.remove(&[format!("{host}/private/app:v1")]).unwrap();
    let registry3 = registry.clone().with_scoped(store(dir.path()));
    assert!(registry3.blob_size(&private, DIGEST).await.is_err());
}

#[tokio::test]
async fn a_mirror_never_receives_the_images_credentials() {
    let (mirror, seen) = basic_registry().await;
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let creds = store(dir.path());
    // Upstream `upstream.invalid` is served by the mirror only.
    let upstream = "upstream.invalid:5000";
    let (h, p) = upstream.rsplit_once(':').unwrap();
    let hosts = certs.join(format!("{h}_{p}_"));
    std::fs::create_dir_all(&hosts).unwrap();
    std::fs::write(
        hosts.join("hosts.toml"),
        format!("[host.\"http://{mirror}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"),
    )
    .unwrap();
    let registry = shoal::registry::Registry::new(RegistryConfig {
        config_path: certs.clone(),
        docker_config: Some(certs.join("none.json")),
        retries: 0,
        ..RegistryConfig::default()
    })
    .unwrap()
    .with_scoped(creds.clone());
    creds
        .put(&format!("{upstream}/private/app:v1"), &alice("wonderland"))
        .unwrap();
    let r: shoal::registry::Reference = format!("{upstream}/private/app:v1").parse().unwrap();
    assert!(registry.blob_size(&r, DIGEST).await.is_err());
    let seen = seen.lock().unwrap();
    assert!(!seen.is_empty());
    assert!(seen.iter().all(|(_, a)| a.is_empty()), "{seen:?}");
}

const MISSING_SNAPSHOTTER_DIR: &str = "/nonexistent/containerd/io.containerd.snapshotter.v1.shoal";

/// containerd's CRI side: records raw requests by path and answers
/// `PullImage` with `pull` (OK or a status), `ImageStatus` with the image's
/// tags, anything else with an empty message.
#[derive(Clone)]
struct Upstream {
    seen: Arc<Mutex<Vec<(String, Bytes)>>>,
    pull_fails: Arc<Mutex<bool>>,
}

impl NamedService for Upstream {
    const NAME: &'static str = "runtime.v1.ImageService";
}

impl tower::Service<tonic::codegen::http::Request<tonic::body::Body>> for Upstream {
    type Response = tonic::codegen::http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: tonic::codegen::http::Request<tonic::body::Body>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let path = req.uri().path().to_string();
            let svc = tower::service_fn(move |r: tonic::Request<Bytes>| {
                let (this, path) = (this.clone(), path.clone());
                async move {
                    this.seen
                        .lock()
                        .unwrap()
                        .push((path.clone(), r.get_ref().clone()));
                    let out = match path.rsplit('/').next().unwrap() {
                        "PullImage" if *this.pull_fails.lock().unwrap() => {
                            return Err(tonic::Status::unknown("pull access denied"))
                        }
                        "PullImage" => cri::PullImageResponse {
                            image_ref: "sha256:abc".into(),
                        }
                        .encode_to_vec(),
                        "ImageStatus" => cri::ImageStatusResponse {
                            image: Some(cri::Image {
                                id: "sha256:abc".into(),
                                repo_tags: vec!["r.io/private/app:v1".into()],
                                ..Default::default()
                            }),
                            ..Default::default()
                        }
                        .encode_to_vec(),
                        // What containerd 1.6.20 answers for a proxy
                        // snapshotter: a directory that does not exist.
                        "ImageFsInfo" => cri::ImageFsInfoResponse {
                            image_filesystems: vec![cri::FilesystemUsage {
                                fs_id: Some(cri::FilesystemIdentifier {
                                    mountpoint: MISSING_SNAPSHOTTER_DIR.into(),
                                }),
                                used_bytes: Some(cri::UInt64Value { value: 42 }),
                                ..Default::default()
                            }],
                            ..Default::default()
                        }
                        .encode_to_vec(),
                        _ => Vec::new(),
                    };
                    Ok(tonic::Response::new(Bytes::from(out)))
                }
            });
            Ok(tonic::server::Grpc::new(RawCodec).unary(svc, req).await)
        })
    }
}

#[tokio::test]
async fn proxy_forwards_raw_and_keeps_pull_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let up_sock = dir.path().join("containerd.sock");
    let proxy_sock = dir.path().join("shoal-cri.sock");
    let upstream = Upstream {
        seen: Arc::default(),
        pull_fails: Arc::default(),
    };
    let l = tokio::net::UnixListener::bind(&up_sock).unwrap();
    let u = upstream.clone();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(u)
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(l))
            .await
    });
    let creds = store(dir.path());
    let listener = shoal::server::bind(&proxy_sock).unwrap();
    let (ps, us, c) = (proxy_sock.clone(), up_sock.clone(), creds.clone());
    let root = dir.path().to_path_buf();
    tokio::spawn(async move {
        shoal::cri::serve(listener, &ps, &us, c, &root, std::future::pending()).await
    });
    let channel = shoal::client::channel(&proxy_sock).await.unwrap();

    // A PullImage with a field this proto does not know (number 99) reaches
    // containerd byte for byte.
    let pull = |password: &str| cri::PullImageRequest {
        image: Some(cri::ImageSpec {
            image: "r.io/private/app:v1".into(),
            ..Default::default()
        }),
        auth: Some(cri::AuthConfig {
            username: "alice".into(),
            password: password.into(),
            ..Default::default()
        }),
        sandbox_config: None,
    };
    let mut raw = BytesMut::from(&pull("wonderland").encode_to_vec()[..]);
    raw.put_slice(&[0x9a, 0x06, 0x03, b'n', b'e', b'w']); // field 99, "new"
    let raw = raw.freeze();
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.unwrap();
    let path = "/runtime.v1.ImageService/PullImage".parse().unwrap();
    let resp: tonic::Response<Bytes> = grpc
        .unary(tonic::Request::new(raw.clone()), path, RawCodec)
        .await
        .unwrap();
    let resp = cri::PullImageResponse::decode(resp.into_inner()).unwrap();
    assert_eq!(resp.image_ref, "sha256:abc");
    assert_eq!(
        upstream.seen.lock().unwrap().last().unwrap(),
        &("/runtime.v1.ImageService/PullImage".to_string(), raw)
    );
    let kept = creds.lookup("r.io", "private/app").unwrap();
    assert_eq!(kept.credential.password, "wonderland");
    let on_disk = std::fs::read_to_string(creds.path()).unwrap();
    assert!(on_disk.contains("r.io/private/app:v1"), "{on_disk}");

    // A failed pull with another secret: containerd's status comes back,
    // and the working credential stays.
    let mut client = cri::image_service_client::ImageServiceClient::new(channel.clone());
    *upstream.pull_fails.lock().unwrap() = true;
    let err = client.pull_image(pull("wrong")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unknown);
    assert_eq!(err.message(), "pull access denied");
    assert_eq!(
        creds
            .lookup("r.io", "private/app")
            .unwrap()
            .credential
            .password,
        "wonderland"
    );

    // Other calls pass through untouched.
    client
        .list_images(cri::ListImagesRequest::default())
        .await
        .unwrap();
    assert!(upstream
        .seen
        .lock()
        .unwrap()
        .iter()
        .any(|(p, _)| p == "/runtime.v1.ImageService/ListImages"));

    // ImageFsInfo: containerd's missing snapshotter directory becomes
    // Shoal's root (containerd #10095); the usage figures stay.
    let fs = client
        .image_fs_info(cri::ImageFsInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    let fs = &fs.image_filesystems[0];
    assert_eq!(
        fs.fs_id.as_ref().unwrap().mountpoint,
        dir.path().display().to_string()
    );
    assert_eq!(fs.used_bytes.as_ref().unwrap().value, 42);

    // RemoveImage by ID: the proxy asks for the image's names first and
    // forgets their credentials once containerd removed it.
    client
        .remove_image(cri::RemoveImageRequest {
            image: Some(cri::ImageSpec {
                image: "sha256:abc".into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    assert!(creds.lookup("r.io", "private/app").is_none());
    assert!(creds.images().is_empty());
}
