//! A slow registry must not starve the others: the real registry client
//! against small local HTTP servers, one of which trickles the bodies of
//! chosen blobs (a byte at a time, well inside the per-gap timeout).
//!
//! Checked: reads from another host, and of another blob on the trickling
//! host, finish within a bound while the trickled reads are stuck; the
//! trickled reads give up once under the rate floor; and the per-host and
//! per-blob caps hold at the server.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::http::{digest_of, read_head, write_hosts};
use shoal::registry::{
    Reference, Registry, RegistryConfig, RegistryError, DEFAULT_MAX_CONCURRENT_PER_BLOB,
    DEFAULT_MAX_CONCURRENT_PER_HOST,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const BLOB_LEN: usize = 64 << 10;

fn blob(seed: u8) -> Vec<u8> {
    (0..BLOB_LEN)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

/// A registry host serving `blobs` by Range; the bodies of `trickled`
/// digests come a byte every `every`.
struct Server {
    port: u16,
    in_flight: Arc<AtomicUsize>,
    /// Requests received so far, per digest.
    received: Arc<Mutex<std::collections::HashMap<String, usize>>>,
}

impl Server {
    async fn start(blobs: Vec<Vec<u8>>, trickled: HashSet<String>, every: Duration) -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let blobs: Arc<std::collections::HashMap<String, Vec<u8>>> =
            Arc::new(blobs.into_iter().map(|b| (digest_of(&b), b)).collect());
        let trickled = Arc::new(trickled);
        let in_flight = Arc::new(AtomicUsize::new(0));
        let received = Arc::new(Mutex::new(std::collections::HashMap::new()));
        let (inf, per) = (in_flight.clone(), received.clone());
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let (blobs, trickled, inf, per) =
                    (blobs.clone(), trickled.clone(), inf.clone(), per.clone());
                tokio::spawn(async move {
                    let Some(buf) = read_head(&mut sock).await else {
                        return;
                    };
                    let text = String::from_utf8_lossy(&buf).to_string();
                    let path = text.split(' ').nth(1).unwrap_or("").to_string();
                    let digest = path.rsplit('/').next().unwrap_or("").to_string();
                    let range = text
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("range: bytes=")
                                .map(str::to_string)
                        })
                        .and_then(|r| {
                            let (a, b) = r.trim().split_once('-')?;
                            Some((a.parse::<usize>().ok()?, b.parse::<usize>().ok()?))
                        });
                    let Some(data) = blobs.get(&digest) else {
                        let _ = sock
                            .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                            .await;
                        return;
                    };
                    let (a, b) = range.unwrap_or((0, data.len() - 1));
                    inf.fetch_add(1, Ordering::SeqCst);
                    *per.lock().unwrap().entry(digest.clone()).or_insert(0) += 1;
                    let head = format!(
                        "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {a}-{b}/{}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        data.len(),
                        b - a + 1
                    );
                    let body = &data[a..=b];
                    if sock.write_all(head.as_bytes()).await.is_ok() {
                        if trickled.contains(&digest) {
                            // Watches for the client hanging up, so the
                            // count of requests in flight is exact.
                            let mut chunk = [0u8; 64];
                            for byte in body {
                                if sock.write_all(&[*byte]).await.is_err() {
                                    break;
                                }
                                tokio::select! {
                                    _ = tokio::time::sleep(every) => {}
                                    _ = sock.read(&mut chunk) => break,
                                }
                            }
                        } else {
                            let _ = sock.write_all(body).await;
                        }
                    }
                    inf.fetch_sub(1, Ordering::SeqCst);
                    let _ = sock.shutdown().await;
                });
            }
        });
        Server {
            port,
            in_flight,
            received,
        }
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn reference(&self) -> Reference {
        format!("{}/test/repo:v1", self.host()).parse().unwrap()
    }

    fn received(&self, digest: &str) -> usize {
        self.received
            .lock()
            .unwrap()
            .get(digest)
            .copied()
            .unwrap_or(0)
    }
}

/// The default limits, with a per-gap timeout the trickle never trips and
/// a short grace before the rate floor.
fn client(certs: &Path) -> Registry {
    Registry::new(RegistryConfig {
        config_path: certs.to_path_buf(),
        request_timeout: Duration::from_secs(30),
        retries: 0,
        min_rate_grace: Duration::from_secs(2),
        docker_config: Some(certs.join("no-docker-config.json")),
        ..RegistryConfig::default()
    })
    .unwrap()
}

fn spawn_reads(
    r: &Registry,
    server: &Server,
    b: &[u8],
    n: u64,
) -> Vec<tokio::task::JoinHandle<Result<bytes::Bytes, RegistryError>>> {
    (0..n)
        .map(|i| {
            let (r, reference, digest) = (r.clone(), server.reference(), digest_of(b));
            tokio::spawn(async move { r.fetch_range(&reference, &digest, i * 1000, 1000).await })
        })
        .collect()
}

async fn read_within(r: &Registry, server: &Server, b: &[u8], what: &str) {
    let t = Instant::now();
    let got = tokio::time::timeout(
        Duration::from_secs(1),
        r.fetch_range(&server.reference(), &digest_of(b), 0, BLOB_LEN as u64),
    )
    .await
    .unwrap_or_else(|_| panic!("{what} waited for the trickled reads"))
    .unwrap();
    assert_eq!(got, b);
    eprintln!("{what}: {:?}", t.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickling_host_leaves_other_hosts_and_blobs_their_slots() {
    // Host `slow` trickles four layers; host `mixed` trickles one layer and
    // serves another; host `fast` serves its layer.
    let slow_blobs: Vec<Vec<u8>> = (0..4).map(blob).collect();
    let (trickled_layer, fine_layer, other) = (blob(50), blob(100), blob(200));
    let every = Duration::from_millis(500);
    let slow = Server::start(
        slow_blobs.clone(),
        slow_blobs.iter().map(|b| digest_of(b)).collect(),
        every,
    )
    .await;
    let mixed = Server::start(
        vec![trickled_layer.clone(), fine_layer.clone()],
        HashSet::from([digest_of(&trickled_layer)]),
        every,
    )
    .await;
    let fast = Server::start(vec![other.clone()], HashSet::new(), Duration::ZERO).await;
    let certs = tempfile::tempdir().unwrap();
    for s in [&slow, &mixed, &fast] {
        write_hosts(certs.path(), &s.host(), "");
    }
    let r = client(certs.path());

    // 32 reads of the slow host's layers, 12 of the mixed host's trickled
    // layer: more than any pool holds.
    let started = Instant::now();
    let mut stuck = Vec::new();
    for b in &slow_blobs {
        stuck.extend(spawn_reads(&r, &slow, b, 8));
    }
    stuck.extend(spawn_reads(&r, &mixed, &trickled_layer, 12));
    // Well inside the 2 s grace, so no trickled read has ended yet: the
    // first wave is all the servers have seen.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let first_wave: Vec<usize> = slow_blobs
        .iter()
        .map(|b| slow.received(&digest_of(b)))
        .collect();
    let mixed_first = mixed.received(&digest_of(&trickled_layer));

    read_within(&r, &fast, &other, "another host's read").await;
    read_within(&r, &mixed, &fine_layer, "another layer of a trickling host").await;
    assert_eq!(
        first_wave.iter().sum::<usize>(),
        DEFAULT_MAX_CONCURRENT_PER_HOST,
        "requests to one host at once: {first_wave:?}"
    );
    assert!(
        first_wave
            .iter()
            .all(|n| *n <= DEFAULT_MAX_CONCURRENT_PER_BLOB),
        "requests of one blob at once: {first_wave:?}"
    );
    assert_eq!(
        mixed_first, DEFAULT_MAX_CONCURRENT_PER_BLOB,
        "requests of one blob at once"
    );

    // The trickled reads give up under the rate floor: the slow host's 32,
    // 8 at a time, each cut off after the 2 s grace: about 8 s.
    for s in stuck {
        let err = s.await.unwrap().unwrap_err();
        assert!(matches!(err, RegistryError::TooSlow { .. }), "{err}");
    }
    let took = started.elapsed();
    eprintln!("44 trickled reads failed after {took:?}");
    assert!(took < Duration::from_secs(15), "{took:?}");
    // The server notices a dropped connection at its next write.
    let t = Instant::now();
    while slow.in_flight.load(Ordering::SeqCst) > 0 && t.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        slow.in_flight.load(Ordering::SeqCst),
        0,
        "connections left open"
    );
}

#[tokio::test]
async fn a_body_under_the_rate_floor_fails_after_the_grace_period() {
    let data = blob(7);
    let trickled = HashSet::from([digest_of(&data)]);
    let slow = Server::start(vec![data.clone()], trickled, Duration::from_millis(200)).await;
    let certs = tempfile::tempdir().unwrap();
    write_hosts(certs.path(), &slow.host(), "");
    let r = client(certs.path());
    let started = Instant::now();
    let err = tokio::time::timeout(
        Duration::from_secs(10),
        r.fetch_range(&slow.reference(), &digest_of(&data), 0, 4096),
    )
    .await
    .expect("a trickled body was never cut off")
    .unwrap_err();
    let took = started.elapsed();
    assert!(matches!(err, RegistryError::TooSlow { .. }), "{err}");
    assert!(err.is_transient());
    assert!(
        took >= Duration::from_secs(2),
        "cut off before the grace: {took:?}"
    );
    assert!(took < Duration::from_secs(4), "{took:?}");
}
