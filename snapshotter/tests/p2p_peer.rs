//! The P2P peer protocol end to end over mTLS on 127.0.0.1: a real peer
//! service over a real chunk store, the real client, a cluster CA made by
//! `shoal::p2p::ca`, and fault-injecting peers (a liar, a staller) for the
//! cases a healthy server cannot produce.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use sha2::{Digest as _, Sha256};
use shoal::p2p::client::{FetchError, PeerClient};
use shoal::p2p::serve::parts;
use shoal::p2p::tls::{anonymous_client_config, NodeTls, CA_FILE, KEY_FILE};
use shoal::p2p::{ca, node};
use shoal::remote::store::ChunkStore;
use shoal_proto::p2p::peer_server::{Peer, PeerServer};
use shoal_proto::p2p::tracker_client::TrackerClient;
use shoal_proto::p2p::{AnnounceRequest, ChunkPart, GetChunkRequest, HolderState, LocateRequest};
use tokio_stream::Stream;
use tonic::transport::{Endpoint, Server};
use tonic::{Request, Response, Status};

const DEADLINE: Duration = Duration::from_secs(5);

/// A cluster CA, two members (a, b), and an outsider with its own CA.
struct Certs {
    _dir: tempfile::TempDir,
    a: NodeTls,
    b: NodeTls,
    outsider: NodeTls,
    ca_pem: Vec<u8>,
    b_dir: std::path::PathBuf,
    ca_dir: std::path::PathBuf,
}

fn certs() -> Certs {
    let dir = tempfile::Builder::new().prefix("h-p2p-").tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    ca::init_ca(&ca_dir, "test cluster", 1).unwrap();
    for n in ["a", "b"] {
        ca::issue_node(&ca_dir, n, &dir.path().join(n), 1).unwrap();
    }
    let other = dir.path().join("other-ca");
    ca::init_ca(&other, "someone else", 1).unwrap();
    ca::issue_node(&other, "mallory", &dir.path().join("mallory"), 1).unwrap();
    Certs {
        a: NodeTls::load(&dir.path().join("a")).unwrap(),
        b: NodeTls::load(&dir.path().join("b")).unwrap(),
        outsider: NodeTls::load(&dir.path().join("mallory")).unwrap(),
        ca_pem: std::fs::read(ca_dir.join(ca::CA_CERT)).unwrap(),
        b_dir: dir.path().join("b"),
        ca_dir,
        _dir: dir,
    }
}

fn chunk(len: usize, seed: u8) -> (Bytes, [u8; 32]) {
    let data: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect();
    let d: [u8; 32] = Sha256::digest(&data).into();
    (Bytes::from(data), d)
}

/// Node A's peer service over a chunk store holding `chunks` (memory cache
/// 0, so every read goes through the store's disk path).
async fn node_a(tls: &NodeTls, store_dir: &Path, chunks: &[(Bytes, [u8; 32])]) -> node::Listener {
    let store = ChunkStore::open(store_dir, 0).unwrap();
    for (data, d) in chunks {
        store.put(*d, data.clone()).unwrap();
    }
    node::start("127.0.0.1:0", tls, Arc::new(store), std::future::pending())
        .await
        .unwrap()
}

#[tokio::test]
async fn a_member_fetches_a_chunk_and_gets_not_found_for_others() {
    let c = certs();
    let dir = tempfile::Builder::new().prefix("h-p2p-").tempdir().unwrap();
    // 600 KiB: three messages of at most 256 KiB.
    let (data, d) = chunk(600 << 10, 1);
    let a = node_a(&c.a, dir.path(), &[(data.clone(), d)]).await;
    let addr = a.local_addr.to_string();
    let client = PeerClient::new(c.b.client_config());
    let got = client
        .fetch_chunk(&addr, &d, data.len() as u64, DEADLINE)
        .await
        .unwrap();
    assert_eq!(got, data);
    let (_, missing) = chunk(10, 2);
    let e = client.fetch_chunk(&addr, &missing, 10, DEADLINE).await;
    assert!(matches!(e, Err(FetchError::NotFound { .. })), "{e:?}");
    assert_eq!(
        a.stats
            .bytes_served
            .load(std::sync::atomic::Ordering::Relaxed),
        600 << 10
    );
}

#[tokio::test]
async fn a_client_without_a_cluster_certificate_gets_nothing() {
    let c = certs();
    let dir = tempfile::Builder::new().prefix("h-p2p-").tempdir().unwrap();
    let (data, d) = chunk(4096, 3);
    let a = node_a(&c.a, dir.path(), &[(data.clone(), d)]).await;
    let addr = a.local_addr.to_string();
    // No client certificate at all (but trusts the cluster CA).
    let anon = PeerClient::new(anonymous_client_config(&c.ca_pem));
    let e = anon.fetch_chunk(&addr, &d, 4096, DEADLINE).await;
    assert!(e.is_err(), "an anonymous client was served: {e:?}");
    // A certificate from another CA (that trusts our CA for the server).
    let mallory = c
        .outsider
        .client_config()
        .ca_certificate(tonic::transport::Certificate::from_pem(&c.ca_pem));
    let e = PeerClient::new(mallory)
        .fetch_chunk(&addr, &d, 4096, DEADLINE)
        .await;
    assert!(e.is_err(), "a foreign certificate was served: {e:?}");
    // The tracker is behind the same handshake.
    let ch = Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(anonymous_client_config(&c.ca_pem))
        .unwrap()
        .connect_lazy();
    let r = TrackerClient::new(ch)
        .locate(LocateRequest {
            digest: d.to_vec(),
            requester: "x".into(),
            ..Default::default()
        })
        .await;
    assert!(r.is_err(), "an anonymous client reached the tracker");
    assert_eq!(
        a.stats
            .bytes_served
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    // Control: a member is served by the same server.
    let ok = PeerClient::new(c.b.client_config())
        .fetch_chunk(&addr, &d, 4096, DEADLINE)
        .await
        .unwrap();
    assert_eq!(ok, data);
}

/// A peer that lies: what it sends for any digest is decided by `kind`.
#[derive(Clone, Copy)]
enum Lie {
    FlipOneByte,
    ExtraBytes,
    Short,
}

struct Liar {
    data: Bytes,
    lie: Lie,
}

type Parts = Pin<Box<dyn Stream<Item = Result<ChunkPart, Status>> + Send>>;

#[tonic::async_trait]
impl Peer for Liar {
    type GetChunkStream = Parts;
    async fn get_chunk(&self, _req: Request<GetChunkRequest>) -> Result<Response<Parts>, Status> {
        let mut v = self.data.to_vec();
        match self.lie {
            Lie::FlipOneByte => {
                let mid = v.len() / 2;
                v[mid] ^= 1
            }
            Lie::ExtraBytes => v.extend_from_slice(b"more"),
            Lie::Short => v.truncate(v.len() - 1),
        }
        Ok(Response::new(Box::pin(tokio_stream::iter(
            parts(Bytes::from(v)).map(Ok),
        ))))
    }
}

async fn liar(tls: &NodeTls, data: Bytes, lie: Lie) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let router = Server::builder()
        .tls_config(tls.server_config())
        .unwrap()
        .add_service(PeerServer::new(Liar { data, lie }));
    tokio::spawn(router.serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l)));
    addr
}

#[tokio::test]
async fn a_lying_peer_is_caught_by_the_callers_digest() {
    let c = certs();
    let (data, d) = chunk(300 << 10, 4);
    let client = PeerClient::new(c.b.client_config());
    for lie in [Lie::FlipOneByte, Lie::ExtraBytes, Lie::Short] {
        let addr = liar(&c.a, data.clone(), lie).await;
        let e = client
            .fetch_chunk(&addr, &d, data.len() as u64, DEADLINE)
            .await;
        assert!(matches!(e, Err(FetchError::Lied { .. })), "{e:?}");
    }
    // An honest peer sending the right bytes for a different digest than the
    // caller's TOC says is still a liar: the caller's digest decides.
    let (other, _) = chunk(300 << 10, 5);
    let addr = liar(&c.a, other, Lie::Short).await;
    let e = client
        .fetch_chunk(&addr, &d, (300 << 10) - 1, DEADLINE)
        .await;
    assert!(matches!(e, Err(FetchError::Lied { .. })), "{e:?}");
}

#[tokio::test]
async fn a_stalled_or_dead_peer_is_transient_within_the_deadline() {
    let c = certs();
    let client = PeerClient::new(c.b.client_config());
    // Accepts TCP, never speaks TLS.
    let stall = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = stall.local_addr().unwrap().to_string();
    let _held = tokio::spawn(async move {
        let mut conns = Vec::new();
        loop {
            if let Ok((s, _)) = stall.accept().await {
                conns.push(s);
            }
        }
    });
    let start = Instant::now();
    let e = client
        .fetch_chunk(&addr, &[0; 32], 1, Duration::from_millis(300))
        .await;
    assert!(matches!(e, Err(FetchError::Transient { .. })), "{e:?}");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    // Nobody listening.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = dead.local_addr().unwrap().to_string();
    drop(dead);
    let e = client.fetch_chunk(&addr, &[0; 32], 1, DEADLINE).await;
    assert!(matches!(e, Err(FetchError::Transient { .. })), "{e:?}");
}

#[tokio::test]
async fn the_tracker_hands_out_an_in_flight_fetcher() {
    let c = certs();
    let dir = tempfile::Builder::new().prefix("h-p2p-").tempdir().unwrap();
    let a = node_a(&c.a, dir.path(), &[]).await;
    let ch = Endpoint::from_shared(format!("https://{}", a.local_addr))
        .unwrap()
        .tls_config(c.b.client_config())
        .unwrap()
        .connect_lazy();
    let mut t = TrackerClient::new(ch);
    let d = [7u8; 32];
    let first = t
        .locate(LocateRequest {
            digest: d.to_vec(),
            requester: "b".into(),
            register_fetching: true,
            requester_address: "10.0.0.2:7701".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(first.holder.is_none());
    let second = t
        .locate(LocateRequest {
            digest: d.to_vec(),
            requester: "c".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let h = second.holder.expect("the fetching node is a holder");
    assert_eq!(
        (h.id.as_str(), h.address.as_str(), h.complete),
        ("b", "10.0.0.2:7701", false)
    );
    t.announce(AnnounceRequest {
        digests: vec![d.to_vec()],
        state: HolderState::Complete as i32,
        id: "b".into(),
        address: "10.0.0.2:7701".into(),
    })
    .await
    .unwrap();
    let third = t
        .locate(LocateRequest {
            digest: d.to_vec(),
            requester: "c".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(third.holder.unwrap().complete);
}

#[test]
fn node_keys_are_private_and_rotation_keeps_the_name() {
    let c = certs();
    let mode = std::fs::metadata(c.b_dir.join(KEY_FILE))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "node key");
    let ca_key = std::fs::metadata(c.ca_dir.join(ca::CA_KEY))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(ca_key & 0o777, 0o600);
    assert!(c.b_dir.join(CA_FILE).exists());
    assert!(matches!(
        ca::init_ca(&c.ca_dir, "again", 1),
        Err(ca::CaError::Exists(_))
    ));
    let before = std::fs::read(c.b_dir.join(KEY_FILE)).unwrap();
    assert_eq!(ca::rotate_node(&c.ca_dir, &c.b_dir, 1).unwrap(), "b");
    assert_ne!(std::fs::read(c.b_dir.join(KEY_FILE)).unwrap(), before);
    assert_eq!(ca::node_name(&c.b_dir).unwrap(), "b");
    assert!(matches!(
        ca::issue_node(&c.ca_dir, "bad name/..", &c.b_dir, 1),
        Err(ca::CaError::Name(_))
    ));
}

#[tokio::test]
async fn a_rotated_certificate_is_accepted() {
    let c = certs();
    let dir = tempfile::Builder::new().prefix("h-p2p-").tempdir().unwrap();
    let (data, d) = chunk(1000, 8);
    let a = node_a(&c.a, dir.path(), &[(data.clone(), d)]).await;
    ca::rotate_node(&c.ca_dir, &c.b_dir, 1).unwrap();
    let b = NodeTls::load(&c.b_dir).unwrap();
    let got = PeerClient::new(b.client_config())
        .fetch_chunk(&a.local_addr.to_string(), &d, 1000, DEADLINE)
        .await
        .unwrap();
    assert_eq!(got, data);
}

/// A store whose copy of every chunk went bad (bit rot the store's own
/// checks missed): the service must not send it.
struct Rotten(Bytes);

impl shoal::p2p::serve::ChunkLookup for Rotten {
    fn lookup(&self, _digest: &[u8; 32]) -> Option<Bytes> {
        Some(self.0.clone())
    }
}

#[tokio::test]
async fn a_node_does_not_serve_its_own_bad_copy() {
    let c = certs();
    let (data, d) = chunk(5000, 9);
    let mut bad = data.to_vec();
    bad[0] ^= 0x80;
    let a = node::start(
        "127.0.0.1:0",
        &c.a,
        Arc::new(Rotten(Bytes::from(bad))),
        std::future::pending(),
    )
    .await
    .unwrap();
    let e = PeerClient::new(c.b.client_config())
        .fetch_chunk(&a.local_addr.to_string(), &d, 5000, DEADLINE)
        .await;
    assert!(matches!(e, Err(FetchError::NotFound { .. })), "{e:?}");
    assert_eq!(
        a.stats
            .bad_own_copies
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert_eq!(
        a.stats
            .bytes_served
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}
