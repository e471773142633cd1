//! A registry host (a mirror, say) that ignores `Range` and answers every
//! request with `200` and the whole blob: the real registry client against
//! a local HTTP server that counts the requests and body bytes it sends.
//! Fetching a layer in blob order, as the background fetch does, must cost
//! one pass over the blob, not a pass from byte 0 per range.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use common::http::{digest_of, local_registry, read_head};
use shoal::registry::{Reference, Registry, RegistryConfig};
use tokio::io::AsyncWriteExt as _;

fn blob(len: usize) -> Vec<u8> {
    common::noise(len, 7)
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
                    if read_head(&mut sock).await.is_none() {
                        return;
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
    let cfg = RegistryConfig {
        retries: 0,
        ..RegistryConfig::default()
    };
    local_registry(certs, &server.host(), "", cfg)
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
