//! Pieces the registry tests share: digests, request heads read off a raw
//! socket, and a real registry client pointed at one local plain-HTTP host.

use std::path::Path;

use sha2::{Digest as _, Sha256};
use shoal::registry::{Reference, Registry, RegistryConfig};
use tokio::io::AsyncReadExt as _;
use tokio::net::TcpStream;

/// `sha256:<hex>` of `data`.
pub fn digest_of(data: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(data))
}

/// Reads one request head (up to the blank line); `None` if the peer
/// closed first.
pub async fn read_head(sock: &mut TcpStream) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match sock.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    Some(buf)
}

/// Writes `certs/HOST_PORT_/hosts.toml` sending `host` (`127.0.0.1:PORT`)
/// to plain HTTP, with `extra` appended.
pub fn write_hosts(certs: &Path, host: &str, extra: &str) {
    let (h, p) = host.rsplit_once(':').expect("host:port");
    let dir = certs.join(format!("{h}_{p}_"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("hosts.toml"),
        format!("server = \"http://{host}\"\n{extra}"),
    )
    .unwrap();
}

/// A client of `cfg` whose `hosts.toml` under `certs` sends `host` to plain
/// HTTP (with `extra` appended to it), with no ambient Docker config, and a
/// reference to `host/test/repo:v1`.
pub fn local_registry(
    certs: &Path,
    host: &str,
    extra: &str,
    cfg: RegistryConfig,
) -> (Registry, Reference) {
    write_hosts(certs, host, extra);
    let r = Registry::new(RegistryConfig {
        config_path: certs.to_path_buf(),
        docker_config: Some(certs.join("no-docker-config.json")),
        ..cfg
    })
    .unwrap();
    let reference = format!("{host}/test/repo:v1").parse().unwrap();
    (r, reference)
}
