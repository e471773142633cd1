//! Registry client against input a hostile image or server chooses: digests
//! and repository names that would rewrite the URL path, token endpoints
//! that never stop talking or promise eternal tokens, and redirects that
//! would carry `hosts.toml` headers to another origin, and `shoal.source`
//! annotations that pick the host the node sends its credentials to.
//!
//! The servers are real HTTP servers (axum on a free loopback port) that
//! record every request they see.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use common::http::{digest_of, local_registry};
use shoal::metadata::RemoteRef;
use shoal::registry::{Credential, Reference, Registry, RegistryConfig, RegistryError};
use shoal::remote::annotations::{SourcePolicy, LABEL_SHOAL_LAYER_DIGEST, LABEL_SHOAL_SOURCE};
use shoal::remote::fetch::registry::RegistryBlobs;
use shoal::remote::layers::{
    detect, Blobs as _, LABEL_CRI_IMAGE_REF, LABEL_TARGET, LABEL_TOC_DIGEST,
};

/// One request a server saw.
#[derive(Clone, Debug)]
struct Seen {
    method: String,
    /// Path and query, as sent.
    target: String,
    headers: HeaderMap,
}

type Handler = Arc<dyn Fn(&Seen, u16) -> Response + Send + Sync>;

/// A recording HTTP server; `handler` gets each request and the server's port.
struct Server {
    port: u16,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Server {
    async fn start(handler: impl Fn(&Seen, u16) -> Response + Send + Sync + 'static) -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let handler: Handler = Arc::new(handler);
        let rec = seen.clone();
        let app = axum::Router::new().fallback(move |req: Request| {
            let (handler, rec) = (handler.clone(), rec.clone());
            async move {
                let s = Seen {
                    method: req.method().to_string(),
                    target: req
                        .uri()
                        .path_and_query()
                        .map_or(String::new(), |p| p.to_string()),
                    headers: req.headers().clone(),
                };
                rec.lock().unwrap().push(s.clone());
                handler(&s, port)
            }
        });
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Server { port, seen }
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

fn reply(status: StatusCode, headers: &[(&str, String)], body: Body) -> Response {
    let mut b = Response::builder().status(status);
    for (k, v) in headers {
        b = b.header(*k, v);
    }
    b.body(body).unwrap()
}

/// A 206 with the requested window of `data`.
fn partial(seen: &Seen, data: &[u8]) -> Response {
    let range = seen.headers["range"].to_str().unwrap();
    let (a, b) = range
        .strip_prefix("bytes=")
        .unwrap()
        .split_once('-')
        .unwrap();
    let (a, b): (usize, usize) = (a.parse().unwrap(), b.parse().unwrap());
    reply(
        StatusCode::PARTIAL_CONTENT,
        &[("content-range", format!("bytes {a}-{b}/{}", data.len()))],
        Body::from(data[a..=b].to_vec()),
    )
}

/// A client whose `hosts.toml` sends `server`'s registry to plain HTTP,
/// with `extra` appended to the file; no ambient Docker config.
fn client(certs: &Path, server: &Server, extra: &str, timeout: Duration) -> (Registry, Reference) {
    client_with(certs, server, extra, timeout, Vec::new())
}

fn client_with(
    certs: &Path,
    server: &Server,
    extra: &str,
    timeout: Duration,
    credentials: Vec<Credential>,
) -> (Registry, Reference) {
    let cfg = RegistryConfig {
        request_timeout: timeout,
        retries: 0,
        max_concurrent: 4,
        credentials,
        ..RegistryConfig::default()
    };
    local_registry(certs, &server.host(), extra, cfg)
}

/// A client holding the node's credentials (`node`/`secret`) for `server`.
fn node_client(certs: &Path, server: &Server) -> (Registry, Reference) {
    let cred = Credential {
        host: server.host(),
        username: "node".into(),
        password: "secret".into(),
        identity_token: String::new(),
    };
    client_with(certs, server, "", Duration::from_secs(2), vec![cred])
}

#[tokio::test]
async fn image_chosen_digests_and_repositories_never_reach_the_server() {
    let data = Arc::new(vec![7u8; 1000]);
    let d = data.clone();
    let server = Server::start(move |s, _| partial(s, &d)).await;
    let certs = tempfile::tempdir().unwrap();
    let (r, reference) = client(certs.path(), &server, "", Duration::from_secs(2));
    for bad in [
        "x:/../../admin?a=b",
        "x:/../../admin",
        "x:..",
        "x:a?b=c",
        "x:a#frag",
        "x:a%2F..%2Fadmin",
        "sha256:../../../v2/_catalog",
        "sha256:0123",
        "../x:abc",
    ] {
        let err = r.fetch_range(&reference, bad, 0, 10).await.unwrap_err();
        assert!(err.to_string().contains("invalid digest"), "{bad}: {err}");
        let err = r.blob_size(&reference, bad).await.unwrap_err();
        assert!(err.to_string().contains("invalid digest"), "{bad}: {err}");
    }
    // Fields are public: a hand-built reference is checked before any URL.
    for repo in ["test/../../admin", "test/repo?x=y", "test//repo", "Test"] {
        let hostile = Reference {
            repository: repo.into(),
            ..reference.clone()
        };
        let err = r
            .fetch_range(&hostile, &digest_of(&data), 0, 10)
            .await
            .unwrap_err();
        assert!(
            matches!(err, RegistryError::InvalidReference { .. }),
            "{repo}: {err}"
        );
        let err = r.fetch_manifest(&hostile).await.unwrap_err();
        assert!(
            matches!(err, RegistryError::InvalidReference { .. }),
            "{repo}: {err}"
        );
    }
    let hostile = Reference {
        tag: None,
        digest: Some("x:/../../admin?a=b".into()),
        ..reference.clone()
    };
    assert!(r.fetch_manifest(&hostile).await.is_err());
    assert!(
        server.seen().is_empty(),
        "requests reached the server: {:#?}",
        server.seen()
    );
    // The server is there: a well-formed digest gets through.
    let got = r
        .fetch_range(&reference, &digest_of(&data), 5, 10)
        .await
        .unwrap();
    assert_eq!(&got[..], &data[5..15]);
    assert_eq!(server.seen().len(), 1);
}

/// A registry that demands a Bearer token from its own `/token`, which
/// `token` answers; blobs need `Bearer tok`.
async fn token_registry(
    data: Arc<Vec<u8>>,
    token: impl Fn() -> Response + Send + Sync + 'static,
) -> Server {
    Server::start(move |s, port| {
        if s.target.starts_with("/token") {
            return token();
        }
        if s.headers.get("authorization").and_then(|v| v.to_str().ok()) != Some("Bearer tok") {
            let challenge =
                format!(r#"Bearer realm="http://127.0.0.1:{port}/token",service="reg""#);
            return reply(
                StatusCode::UNAUTHORIZED,
                &[("www-authenticate", challenge)],
                Body::empty(),
            );
        }
        partial(s, &data)
    })
    .await
}

#[tokio::test]
async fn endless_token_body_is_cut_at_the_cap() {
    const PIECE: usize = 64 << 10;
    // Bound what the server sends even if the client never stops reading.
    const SERVER_LIMIT: u64 = 512 << 20;
    let sent = Arc::new(AtomicU64::new(0));
    let counter = sent.clone();
    let data = Arc::new(vec![1u8; 100]);
    let server = token_registry(data.clone(), move || {
        let counter = counter.clone();
        let endless =
            std::iter::repeat_n((), (SERVER_LIMIT / PIECE as u64) as usize).map(move |()| {
                counter.fetch_add(PIECE as u64, Ordering::Relaxed);
                Ok::<_, std::io::Error>(Bytes::from_static(&[b' '; PIECE]))
            });
        reply(
            StatusCode::OK,
            &[("content-type", "application/json".into())],
            Body::from_stream(tokio_stream::iter(endless)),
        )
    })
    .await;
    let certs = tempfile::tempdir().unwrap();
    let (r, reference) = client(certs.path(), &server, "", Duration::from_secs(20));
    let started = Instant::now();
    let err = r
        .fetch_range(&reference, &digest_of(&data), 0, 10)
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("token endpoint"), "{msg}");
    assert!(msg.contains("exceeds 1048576 bytes"), "{msg}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    // Reading stopped at the cap: what the server got out is the cap plus
    // what socket buffers hold, far from everything it had to give.
    let out = sent.load(Ordering::Relaxed);
    assert!(out < 32 << 20, "server sent {out} bytes");
}

#[tokio::test]
async fn eternal_token_lifetime_is_clamped() {
    let data = Arc::new((0..=255u8).collect::<Vec<u8>>());
    let server = token_registry(data.clone(), || {
        reply(
            StatusCode::OK,
            &[],
            Body::from(format!(r#"{{"token":"tok","expires_in":{}}}"#, u64::MAX)),
        )
    })
    .await;
    let certs = tempfile::tempdir().unwrap();
    let (r, reference) = client(certs.path(), &server, "", Duration::from_secs(2));
    let digest = digest_of(&data);
    let got = r.fetch_range(&reference, &digest, 0, 10).await.unwrap();
    assert_eq!(&got[..], &data[..10]);
    let got = r.fetch_range(&reference, &digest, 10, 10).await.unwrap();
    assert_eq!(&got[..], &data[10..20]);
    assert_eq!(r.token_requests(), 1, "the token is cached");
}

#[tokio::test]
async fn hosts_toml_headers_stay_with_the_registry_on_redirect() {
    let data = Arc::new(vec![3u8; 500]);
    let d = data.clone();
    let storage = Server::start(move |s, _| partial(s, &d)).await;
    let storage_host = storage.host();
    let registry = Server::start(move |s, port| {
        // One same-origin hop first, then off to blob storage.
        let loc = if s.target.starts_with("/v2/") {
            format!("http://127.0.0.1:{port}/hop/blob")
        } else {
            format!("http://{storage_host}/bucket/blob?X-Amz-Signature=abc")
        };
        reply(
            StatusCode::TEMPORARY_REDIRECT,
            &[("location", loc)],
            Body::empty(),
        )
    })
    .await;
    let certs = tempfile::tempdir().unwrap();
    let (r, reference) = client(
        certs.path(),
        &registry,
        "[header]\nx-registry-secret = \"s3cret\"\n",
        Duration::from_secs(2),
    );
    let got = r
        .fetch_range(&reference, &digest_of(&data), 10, 20)
        .await
        .unwrap();
    assert_eq!(&got[..], &data[10..30]);
    let at_registry = registry.seen();
    assert_eq!(at_registry.len(), 2, "{at_registry:#?}");
    for s in &at_registry {
        assert_eq!(s.headers["x-registry-secret"], "s3cret", "{s:#?}");
    }
    let at_storage = storage.seen();
    assert_eq!(at_storage.len(), 1);
    assert_eq!(at_storage[0].method, "GET");
    assert!(
        at_storage[0].headers.get("x-registry-secret").is_none(),
        "header leaked: {at_storage:#?}"
    );
    assert_eq!(at_storage[0].headers["range"], "bytes=10-29");
}

/// A registry that wants Basic `node:secret` (the node's credentials) for
/// everything, and serves `data` to it.
async fn private_registry(data: Arc<Vec<u8>>) -> Server {
    Server::start(move |s, _| {
        let want = format!(
            "Basic {}",
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, "node:secret")
        );
        if s.headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(want.as_str()) {
            return reply(
                StatusCode::UNAUTHORIZED,
                &[("www-authenticate", r#"Basic realm="private""#.into())],
                Body::empty(),
            );
        }
        partial(s, &data)
    })
    .await
}

/// Prepare labels of a layer whose only pointer to its registry is the
/// image's own `shoal.source` annotation (plus a client label if `client`).
fn layer_labels(
    source: &str,
    digest: &str,
    client: Option<&str>,
) -> std::collections::BTreeMap<String, String> {
    let mut l: std::collections::BTreeMap<String, String> = [
        (LABEL_TARGET, "sha256:chain"),
        (LABEL_TOC_DIGEST, "sha256:toc"),
        (LABEL_SHOAL_SOURCE, source),
        (LABEL_SHOAL_LAYER_DIGEST, digest),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    if let Some(c) = client {
        l.insert(LABEL_CRI_IMAGE_REF.into(), c.into());
    }
    l
}

async fn fetch_via_blobs(blobs: &RegistryBlobs, r: &RemoteRef) -> Result<Bytes, String> {
    blobs
        .source(r)
        .fetch(0, 10)
        .await
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn image_chosen_hosts_get_no_credentials_unless_allowed() {
    let data = Arc::new(vec![9u8; 64]);
    let server = private_registry(data.clone()).await;
    let certs = tempfile::tempdir().unwrap();
    let (registry, _) = node_client(certs.path(), &server);
    let blobs = RegistryBlobs::new(registry);
    let source = format!("{}/private/app", server.host());
    let digest = digest_of(&data);
    let labels = layer_labels(&source, &digest, None);

    // Off the allow-list: not lazily mounted at all (containerd pulls it).
    assert!(detect(&labels, &SourcePolicy::default()).is_none());
    assert!(server.seen().is_empty());

    // Allowed host, default policy: fetched without the node's credentials.
    let allowed = SourcePolicy {
        hosts: vec![server.host()],
        credentials: false,
    };
    let (_, r) = detect(&labels, &allowed).unwrap();
    let err = fetch_via_blobs(&blobs, &r).await.unwrap_err();
    assert!(err.contains("source_credentials"), "{err}");
    let seen = server.seen();
    assert!(!seen.is_empty());
    assert!(
        seen.iter()
            .all(|s| s.headers.get("authorization").is_none()),
        "credentials sent to an image-chosen host: {seen:#?}"
    );

    // The operator allows credentials there: they are sent.
    let trusted = SourcePolicy {
        credentials: true,
        ..allowed.clone()
    };
    let (_, r) = detect(&labels, &trusted).unwrap();
    assert_eq!(fetch_via_blobs(&blobs, &r).await.unwrap(), data[..10]);

    // The client named the image's registry: credentials go there, with
    // no allow-list.
    let client_ref = format!("{}/private/app:v1", server.host());
    let labels = layer_labels("elsewhere.example/x", &digest, Some(&client_ref));
    let (_, r) = detect(&labels, &SourcePolicy::default()).unwrap();
    assert_eq!(r.image_ref, client_ref);
    assert_eq!(fetch_via_blobs(&blobs, &r).await.unwrap(), data[..10]);
}

#[tokio::test]
async fn anonymous_client_never_uses_a_token_credentials_bought() {
    let data = Arc::new(vec![4u8; 64]);
    let server = token_registry(data.clone(), || {
        reply(StatusCode::OK, &[], Body::from(r#"{"token":"tok"}"#))
    })
    .await;
    let certs = tempfile::tempdir().unwrap();
    let (r, reference) = node_client(certs.path(), &server);
    let digest = digest_of(&data);
    r.fetch_range(&reference, &digest, 0, 10).await.unwrap();
    assert_eq!(r.token_requests(), 1);
    // The anonymous client asks for its own token, without the password.
    r.anonymous()
        .fetch_range(&reference, &digest, 0, 10)
        .await
        .unwrap();
    assert_eq!(
        r.token_requests(),
        2,
        "a token bought with credentials is not reused"
    );
    let tokens: Vec<_> = server
        .seen()
        .into_iter()
        .filter(|s| s.target.starts_with("/token"))
        .collect();
    assert_eq!(tokens.len(), 2);
    assert!(tokens[0].headers.get("authorization").is_some());
    assert!(
        tokens[1].headers.get("authorization").is_none(),
        "{tokens:#?}"
    );
    assert!(!tokens[1].target.contains("account="), "{tokens:#?}");
}
