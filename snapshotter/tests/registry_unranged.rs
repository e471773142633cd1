//! A registry host (a mirror, say) that ignores `Range` and answers every
//! request with `200` and the whole blob: the real registry client against
//! a local HTTP server that counts the requests and body bytes it sends.
//! Fetching a layer in blob order, as the background fetch does, must cost
//! one pass over the blob, not a pass from byte 0 per range.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use sha2::{Digest as _, Sha256};
use shoal::registry::{Reference, Registry, RegistryConfig};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

fn digest_of(data: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(data))
}

fn blob(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Serves `data` whole to every GET, whatever its `Range`.
struct NoRange {
    port: u16,
    requests: Arc<AtomicU64>,
    body_bytes: Arc<AtomicU64>,
}

impl NoRange {
    async fn start(data: Arc<Vec<u8>>) -> NoRange {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (requests, body_bytes) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (reqs, sent) = (requests.clone(), body_bytes.clone());
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let (data, reqs, sent) = (data.clone(), reqs.clone(), sent.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match sock.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    reqs.fetch_add(1, Ordering::SeqCst);
                    let head = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        data.len()
                    );
                    if sock.write_all(head.as_bytes()).await.is_err() {
                        return;
                    }
                    for piece in data.chunks(16 << 10) {
                        if sock.write_all(piece).await.is_err() {
                            return;
                        }
                        sent.fetch_add(piece.len() as u64, Ordering::SeqCst);
                    }
                    let _ = sock.shutdown().await;
                });
            }
        });
        NoRange {
            port,
            requests,
            body_bytes,
        }
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

fn client(certs: &Path, server: &NoRange) -> (Registry, Reference) {
    let dir = certs.join(format!("127.0.0.1_{}_", server.port));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("hosts.toml"),
        format!("server = \"http://{}\"\n", server.host()),
    )
    .unwrap();
    let r = Registry::new(RegistryConfig {
        config_path: certs.to_path_buf(),
        retries: 0,
        docker_config: Some(certs.join("no-docker-config.json")),
        ..RegistryConfig::default()
    })
    .unwrap();
    let reference = format!("{}/test/repo:v1", server.host()).parse().unwrap();
    (r, reference)
}

#[tokio::test]
async fn a_layer_read_in_blob_order_costs_one_pass() {
    const LEN: usize = 8 << 20;
    const PIECE: usize = 256 << 10;
    let data = Arc::new(blob(LEN));
    let server = NoRange::start(data.clone()).await;
    let certs = tempfile::tempdir().unwrap();
    let (r, reference) = client(certs.path(), &server);
    let digest = digest_of(&data);
    assert!(!r.ignores_range(&server.host()));
    for at in (0..LEN).step_by(PIECE) {
        let got = r
            .fetch_range(&reference, &digest, at as u64, PIECE as u64)
            .await
            .unwrap();
        assert!(got == data[at..at + PIECE], "bytes at {at}");
    }
    let (requests, sent) = (
        server.requests.load(Ordering::SeqCst),
        server.body_bytes.load(Ordering::SeqCst),
    );
    eprintln!(
        "{} ranges of {PIECE} bytes: {requests} request(s), {sent} body bytes sent for a {LEN}-byte blob",
        LEN / PIECE
    );
    assert!(r.ignores_range(&server.host()));
    assert_eq!(requests, 1, "one streamed answer for the whole layer");
    assert_eq!(sent, LEN as u64, "each byte sent once");
    assert_eq!(r.parked_streams(), 0, "the answer ended with the blob");
}

#[tokio::test]
async fn ranges_out_of_order_continue_the_nearest_answer() {
    const LEN: usize = 2 << 20;
    const K: usize = 64 << 10;
    let data = Arc::new(blob(LEN));
    let server = NoRange::start(data.clone()).await;
    let certs = tempfile::tempdir().unwrap();
    let (r, reference) = client(certs.path(), &server);
    let digest = digest_of(&data);
    // Offsets in KiB, and the requests the server has seen after each.
    let steps: [(usize, u64); 6] = [
        (1024, 1), // a new answer, parked at 1088 KiB
        (256, 2),  // before it: a second answer, parked at 320 KiB
        (1088, 2), // continues the first
        (320, 2),  // continues the second
        (1500, 2), // skips ahead in the first (parked at 1152 KiB)
        (0, 3),    // before both: a third
    ];
    for (kib, requests) in steps {
        let at = kib << 10;
        let got = r
            .fetch_range(&reference, &digest, at as u64, K as u64)
            .await
            .unwrap();
        assert!(got == data[at..at + K], "bytes at {kib} KiB");
        assert_eq!(
            server.requests.load(Ordering::SeqCst),
            requests,
            "after the range at {kib} KiB"
        );
    }
    assert_eq!(r.parked_streams(), 3);
}
