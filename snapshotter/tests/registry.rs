//! Registry client against a real Distribution registry (`docker-registry`,
//! started per test on a free loopback port and killed by pid), plus small
//! hand-written HTTP servers for faults a real registry won't produce on
//! demand: 503s, truncated bodies, stalls, token endpoints, redirects.

use std::io::Write as _;
use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use sha2::{Digest as _, Sha256};
use shoal::registry::{Credential, Reference, Registry, RegistryConfig, RegistryError};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const TIMEOUT: Duration = Duration::from_millis(500);

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn digest_of(data: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(data))
}

/// Deterministic, incompressible-looking test data.
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

/// A registry client with short timeouts, its own certs.d dir and no
/// ambient Docker config.
fn client(certs: &Path, docker_config: Option<PathBuf>, creds: Vec<Credential>) -> Registry {
    Registry::new(RegistryConfig {
        config_path: certs.to_path_buf(),
        request_timeout: TIMEOUT,
        retries: 2,
        max_concurrent: 8,
        credentials: creds,
        docker_config: Some(docker_config.unwrap_or_else(|| certs.join("no-docker-config.json"))),
        ..RegistryConfig::default()
    })
    .unwrap()
}

/// `CERTS/HOST_PORT_/hosts.toml` with `text`.
fn write_hosts(certs: &Path, registry: &str, text: &str) {
    let (h, p) = registry.rsplit_once(':').unwrap();
    let dir = certs.join(format!("{h}_{p}_"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("hosts.toml"), text).unwrap();
}

// ---------------------------------------------------------------- real registry

struct RealRegistry {
    child: Child,
    port: u16,
    tls: bool,
    _dir: tempfile::TempDir,
}

impl RealRegistry {
    /// `htpasswd`: (user, password) for `auth: htpasswd`.
    fn start(htpasswd: Option<(&str, &str)>) -> RealRegistry {
        Self::start_with(htpasswd, None)
    }

    /// `tls`: PEM certificate chain and key files to serve HTTPS with.
    fn start_with(htpasswd: Option<(&str, &str)>, tls: Option<(&Path, &Path)>) -> RealRegistry {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut cfg = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.path().join("data").display()
        );
        if let Some((user, pass)) = htpasswd {
            let hash = bcrypt::hash(pass, 4).unwrap();
            let file = dir.path().join("htpasswd");
            std::fs::write(&file, format!("{user}:{hash}\n")).unwrap();
            cfg.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: shoal-test\n    path: {}\n",
                file.display()
            ));
        }
        if let Some((cert, key)) = tls {
            cfg.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                cert.display(),
                key.display()
            ));
        }
        std::fs::write(dir.path().join("config.yml"), cfg).unwrap();
        let log = std::fs::File::create(dir.path().join("log")).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(dir.path().join("config.yml"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("docker-registry (Debian package docker-registry) must be installed");
        let reg = RealRegistry {
            child,
            port,
            tls: tls.is_some(),
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(8);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "registry did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        reg
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn base(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}/v2", self.port)
    }

    /// A plain client for setting up fixtures.
    fn http(&self) -> reqwest::Client {
        reqwest::Client::builder()
            .tls_danger_accept_invalid_certs(true)
            .build()
            .unwrap()
    }

    /// Monolithic upload: POST for a session, PUT with `?digest=`.
    async fn push_blob(&self, repo: &str, data: &[u8], auth: Option<(&str, &str)>) -> String {
        let http = self.http();
        let with_auth = |r: reqwest::RequestBuilder| match auth {
            Some((u, p)) => r.basic_auth(u, Some(p)),
            None => r,
        };
        let resp = with_auth(http.post(format!("{}/{repo}/blobs/uploads/", self.base())))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 202, "upload session");
        let loc = resp.headers()["location"].to_str().unwrap().to_string();
        let mut url = reqwest::Url::parse(&self.base())
            .unwrap()
            .join(&loc)
            .unwrap();
        let digest = digest_of(data);
        url.query_pairs_mut().append_pair("digest", &digest);
        let resp = with_auth(http.put(url))
            .header("content-type", "application/octet-stream")
            .body(data.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201, "upload put");
        digest
    }

    async fn put_manifest(&self, repo: &str, tag: &str, media_type: &str, body: &[u8]) {
        let resp = self
            .http()
            .put(format!("{}/{repo}/manifests/{tag}", self.base()))
            .header("content-type", media_type)
            .body(body.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201, "manifest put");
    }
}

impl Drop for RealRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn real_registry_ranges_size_and_manifest() {
    let reg = RealRegistry::start(None);
    let data = blob(300_000);
    let digest = reg.push_blob("test/app", &data, None).await;
    let certs = tempfile::tempdir().unwrap();
    // No hosts.toml: a loopback registry is tried over HTTPS, then plain HTTP.
    let r = client(certs.path(), None, vec![]);
    let reference: Reference = format!("{}/test/app:v1", reg.host()).parse().unwrap();

    assert_eq!(
        r.blob_size(&reference, &digest).await.unwrap(),
        data.len() as u64
    );
    let n = data.len() as u64;
    for (off, len) in [
        (0, 1),
        (0, n),
        (12_345, 1_000),
        (65_535, 65_537),
        (n - 10, 10),
        (n - 1, 1),
    ] {
        let got = r.fetch_range(&reference, &digest, off, len).await.unwrap();
        assert_eq!(
            &got[..],
            &data[off as usize..(off + len) as usize],
            "{off}+{len}"
        );
    }
    assert!(r
        .fetch_range(&reference, &digest, 7, 0)
        .await
        .unwrap()
        .is_empty());

    let err = r
        .fetch_range(&reference, &digest, n - 5, 10)
        .await
        .unwrap_err();
    assert!(!err.is_transient(), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains(&reg.host()) && msg.contains("test/app") && msg.contains(&digest),
        "{msg}"
    );

    let missing = digest_of(b"missing");
    let err = r.fetch_range(&reference, &missing, 0, 1).await.unwrap_err();
    assert!(matches!(err, RegistryError::NotFound { .. }), "{err}");

    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let config_digest = reg.push_blob("test/app", config, None).await;
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_digest}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{digest}","size":{n}}}]}}"#,
        config.len()
    );
    let mt = "application/vnd.oci.image.manifest.v1+json";
    reg.put_manifest("test/app", "v1", mt, manifest.as_bytes())
        .await;
    let (media_type, mdigest, bytes) = r.fetch_manifest(&reference).await.unwrap();
    assert_eq!(media_type, mt);
    assert_eq!(mdigest, digest_of(manifest.as_bytes()));
    assert_eq!(&bytes[..], manifest.as_bytes());
    let by_digest: Reference = format!("{}/test/app@{mdigest}", reg.host())
        .parse()
        .unwrap();
    assert_eq!(r.fetch_manifest(&by_digest).await.unwrap().2, bytes);
    let err = r
        .fetch_manifest(&format!("{}/test/app:nope", reg.host()).parse().unwrap())
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::NotFound { .. }), "{err}");
}

#[tokio::test]
async fn real_registry_basic_auth_from_docker_config() {
    let reg = RealRegistry::start(Some(("alice", "wonderland")));
    let data = blob(10_000);
    let digest = reg
        .push_blob("private/app", &data, Some(("alice", "wonderland")))
        .await;
    let certs = tempfile::tempdir().unwrap();
    write_hosts(
        certs.path(),
        &reg.host(),
        &format!("server = \"http://{}\"\n", reg.host()),
    );
    let reference: Reference = format!("{}/private/app:v1", reg.host()).parse().unwrap();
    let docker_config = |user: &str, pass: &str| {
        let p = certs.path().join(format!("docker-{user}-{pass}.json"));
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
        std::fs::write(
            &p,
            format!(
                r#"{{"auths":{{"http://{}":{{"auth":"{auth}"}}}}}}"#,
                reg.host()
            ),
        )
        .unwrap();
        p
    };

    let ok = client(
        certs.path(),
        Some(docker_config("alice", "wonderland")),
        vec![],
    );
    let got = ok.fetch_range(&reference, &digest, 100, 200).await.unwrap();
    assert_eq!(&got[..], &data[100..300]);
    assert_eq!(ok.blob_size(&reference, &digest).await.unwrap(), 10_000);

    let wrong = client(
        certs.path(),
        Some(docker_config("alice", "looking-glass")),
        vec![],
    );
    let err = wrong
        .fetch_range(&reference, &digest, 0, 10)
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::Auth { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("authentication failed")
            && msg.contains("refused")
            && msg.contains(&reg.host()),
        "{msg}"
    );

    let none = client(certs.path(), None, vec![]);
    let err = none
        .fetch_range(&reference, &digest, 0, 10)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no username/password"), "{err}");

    // Shoal's own credentials win over a wrong docker config.
    let cred = Credential {
        host: reg.host(),
        username: "alice".into(),
        password: "wonderland".into(),
        identity_token: String::new(),
    };
    let both = client(
        certs.path(),
        Some(docker_config("alice", "looking-glass")),
        vec![cred],
    );
    assert_eq!(
        both.fetch_range(&reference, &digest, 0, 10).await.unwrap(),
        data[..10]
    );
}

/// `[registry] docker_config_files`: a Kubernetes `dockerconfigjson`
/// Secret mounted as a directory authenticates like `config.json`.
#[tokio::test]
async fn real_registry_basic_auth_from_a_mounted_dockerconfigjson() {
    let reg = RealRegistry::start(Some(("alice", "wonderland")));
    let data = blob(4_000);
    let digest = reg
        .push_blob("private/k8s", &data, Some(("alice", "wonderland")))
        .await;
    let certs = tempfile::tempdir().unwrap();
    write_hosts(
        certs.path(),
        &reg.host(),
        &format!("server = \"http://{}\"\n", reg.host()),
    );
    let secret = certs.path().join("pull-secret");
    std::fs::create_dir(&secret).unwrap();
    let auth = base64::engine::general_purpose::STANDARD.encode("alice:wonderland");
    std::fs::write(
        secret.join(".dockerconfigjson"),
        format!(r#"{{"auths":{{"{}":{{"auth":"{auth}"}}}}}}"#, reg.host()),
    )
    .unwrap();
    let with_files = |files: Vec<PathBuf>| {
        Registry::new(RegistryConfig {
            config_path: certs.path().to_path_buf(),
            request_timeout: TIMEOUT,
            retries: 2,
            docker_config: Some(certs.path().join("no-docker-config.json")),
            docker_config_files: files,
            ..RegistryConfig::default()
        })
    };
    let reference: Reference = format!("{}/private/k8s:v1", reg.host()).parse().unwrap();
    let ok = with_files(vec![secret.clone()]).unwrap();
    assert_eq!(
        ok.fetch_range(&reference, &digest, 0, 10).await.unwrap(),
        data[..10]
    );
    let none = with_files(vec![]).unwrap();
    assert!(none.fetch_range(&reference, &digest, 0, 10).await.is_err());
    // A listed file that cannot be parsed stops the client from starting.
    std::fs::write(secret.join(".dockerconfigjson"), "{").unwrap();
    let err = with_files(vec![secret]).unwrap_err();
    assert!(matches!(err, RegistryError::Config { .. }), "{err}");
}

#[tokio::test]
async fn mirror_failover_from_dead_port_to_real_registry() {
    let reg = RealRegistry::start(None);
    let data = blob(5_000);
    let digest = reg.push_blob("test/mirrored", &data, None).await;
    let certs = tempfile::tempdir().unwrap();
    let upstream = format!("upstream.invalid:{}", free_port());
    let (dead1, dead2) = (free_port(), free_port());
    let empty = Fake::start(|_| Action::Send(response("404 Not Found", &[], b"{}"))).await;
    write_hosts(
        certs.path(),
        &upstream,
        &format!(
            "server = \"http://127.0.0.1:{dead2}\"\n\n[host.\"http://127.0.0.1:{dead1}\"]\n  capabilities = [\"pull\", \"resolve\"]\n\n[host.\"http://{}\"]\n  capabilities = [\"pull\"]\n\n[host.\"http://{}\"]\n  capabilities = [\"pull\"]\n",
            empty.host(),
            reg.host()
        ),
    );
    let r = client(certs.path(), None, vec![]);
    let reference: Reference = format!("{upstream}/test/mirrored:v1").parse().unwrap();
    let hosts = r
        .hosts(&reference, shoal::registry::Capability::Pull)
        .unwrap();
    let order: Vec<_> = hosts.iter().map(|h| h.host.clone()).collect();
    assert_eq!(
        order,
        [
            format!("127.0.0.1:{dead1}"),
            empty.host(),
            reg.host(),
            format!("127.0.0.1:{dead2}")
        ]
    );
    let started = Instant::now();
    let got = r
        .fetch_range(&reference, &digest, 1_000, 2_000)
        .await
        .unwrap();
    assert_eq!(&got[..], &data[1_000..3_000]);
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(
        empty.requests().len(),
        1,
        "a mirror without the blob is asked once"
    );
    // Tags only go to resolve hosts: the dead mirror and the dead server.
    let err = r.fetch_manifest(&reference).await.unwrap_err();
    assert!(matches!(err, RegistryError::Transport { .. }), "{err}");
}

/// A test CA and a server certificate for 127.0.0.1 signed by it, as PEM
/// files in `dir`: (ca.pem, server.pem, server.key).
fn make_certs(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Shoal test CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let paths = (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    );
    std::fs::write(&paths.0, ca.pem()).unwrap();
    std::fs::write(&paths.1, leaf.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    (paths.0, paths.1, paths.2)
}

#[tokio::test]
async fn real_registry_over_tls_with_ca_or_skip_verify() {
    let pki = tempfile::tempdir().unwrap();
    let (ca, cert, key) = make_certs(pki.path());
    let reg = RealRegistry::start_with(None, Some((&cert, &key)));
    let data = blob(4_000);
    let digest = reg.push_blob("tls/app", &data, None).await;
    let reference: Reference = format!("{}/tls/app:v1", reg.host()).parse().unwrap();
    let server = format!("server = \"https://{}\"\n", reg.host());
    let with_hosts = |extra: &str| {
        let certs = tempfile::tempdir().unwrap();
        write_hosts(certs.path(), &reg.host(), &format!("{server}{extra}"));
        let (h, p) = reg
            .host()
            .rsplit_once(':')
            .map(|(h, p)| (h.to_string(), p.to_string()))
            .unwrap();
        std::fs::copy(&ca, certs.path().join(format!("{h}_{p}_/ca.pem"))).unwrap();
        let r = client(certs.path(), None, vec![]);
        (certs, r)
    };

    // The CA, as a path relative to the host directory and as a list.
    for extra in ["ca = \"ca.pem\"\n", "ca = [\"ca.pem\"]\n"] {
        let (_certs, r) = with_hosts(extra);
        let got = r
            .fetch_range(&reference, &digest, 1_000, 500)
            .await
            .unwrap();
        assert_eq!(&got[..], &data[1_000..1_500], "{extra}");
    }
    let (_certs, r) = with_hosts("skip_verify = true\n");
    assert_eq!(r.blob_size(&reference, &digest).await.unwrap(), 4_000);

    // Neither: the certificate is refused, and the error says so.
    let (_certs, r) = with_hosts("");
    let err = r.fetch_range(&reference, &digest, 0, 10).await.unwrap_err();
    assert!(matches!(err, RegistryError::Certificate { .. }), "{err}");
    assert!(err.to_string().contains("UnknownIssuer"), "{err}");
    assert!(!err.is_transient());

    // Without a hosts file a loopback registry gets HTTPS without
    // verification, as containerd does.
    let certs = tempfile::tempdir().unwrap();
    let r = client(certs.path(), None, vec![]);
    assert_eq!(
        r.fetch_range(&reference, &digest, 0, 10).await.unwrap(),
        data[..10]
    );
}

// ---------------------------------------------------------------- fake servers

/// One parsed request to a fake server.
#[derive(Debug, Clone)]
struct Req {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: String,
}

impl Req {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// (offset, len) of `Range: bytes=a-b`.
    fn range(&self) -> (usize, usize) {
        let r = self.header("range").expect("Range header");
        let (a, b) = r.strip_prefix("bytes=").unwrap().split_once('-').unwrap();
        let (a, b): (usize, usize) = (a.parse().unwrap(), b.parse().unwrap());
        (a, b - a + 1)
    }
}

enum Action {
    /// Write these bytes, then close.
    Send(Vec<u8>),
    /// Write these bytes, then hold the connection open.
    SendThenStall(Vec<u8>),
    /// Wait, then write and close.
    Delay(Duration, Vec<u8>),
}

type Handler = Arc<dyn Fn(&Req) -> Action + Send + Sync>;

struct Fake {
    port: u16,
    requests: Arc<Mutex<Vec<Req>>>,
    in_flight: Arc<AtomicUsize>,
    max_in_flight: Arc<AtomicUsize>,
}

impl Fake {
    async fn start(handler: impl Fn(&Req) -> Action + Send + Sync + 'static) -> Fake {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let in_flight = Arc::new(AtomicUsize::new(0));
        let max_in_flight = Arc::new(AtomicUsize::new(0));
        let handler: Handler = Arc::new(handler);
        let (reqs, inf, maxf) = (requests.clone(), in_flight.clone(), max_in_flight.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                let (handler, reqs, inf, maxf) =
                    (handler.clone(), reqs.clone(), inf.clone(), maxf.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match sock.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                    let text = String::from_utf8_lossy(&buf[..end]).to_string();
                    let mut lines = text.split("\r\n");
                    let mut first = lines.next().unwrap_or("").split(' ');
                    let req = Req {
                        method: first.next().unwrap_or("").into(),
                        path: first.next().unwrap_or("").into(),
                        headers: lines
                            .take_while(|l| !l.is_empty())
                            .filter_map(|l| l.split_once(':'))
                            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                            .collect(),
                        body: String::new(),
                    };
                    let want = req
                        .header("content-length")
                        .map_or(0, |v| v.parse().unwrap());
                    let mut body = buf[end..].to_vec();
                    while body.len() < want {
                        match sock.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => body.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let mut req = req;
                    req.body = String::from_utf8_lossy(&body).to_string();
                    reqs.lock().unwrap().push(req.clone());
                    let now = inf.fetch_add(1, Ordering::SeqCst) + 1;
                    maxf.fetch_max(now, Ordering::SeqCst);
                    match handler(&req) {
                        Action::Send(b) => {
                            let _ = sock.write_all(&b).await;
                        }
                        Action::Delay(d, b) => {
                            tokio::time::sleep(d).await;
                            let _ = sock.write_all(&b).await;
                        }
                        Action::SendThenStall(b) => {
                            let _ = sock.write_all(&b).await;
                            inf.fetch_sub(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_secs(30)).await;
                            return;
                        }
                    }
                    inf.fetch_sub(1, Ordering::SeqCst);
                    let _ = sock.shutdown().await;
                });
            }
        });
        Fake {
            port,
            requests,
            in_flight,
            max_in_flight,
        }
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn requests(&self) -> Vec<Req> {
        self.requests.lock().unwrap().clone()
    }
}

fn response(status: &str, headers: &[(&str, String)], body: &[u8]) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {status}\r\nConnection: close\r\n").into_bytes();
    for (k, v) in headers {
        write!(out, "{k}: {v}\r\n").unwrap();
    }
    if !headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-length"))
    {
        write!(out, "Content-Length: {}\r\n", body.len()).unwrap();
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

/// A 206 for `req`'s range of `data`.
fn partial(req: &Req, data: &[u8]) -> Vec<u8> {
    let (off, len) = req.range();
    response(
        "206 Partial Content",
        &[(
            "Content-Range",
            format!("bytes {off}-{}/{}", off + len - 1, data.len()),
        )],
        &data[off..off + len],
    )
}

/// A client whose hosts.toml points `fake` at plain HTTP.
fn fake_client(certs: &Path, fake: &Fake, creds: Vec<Credential>) -> (Registry, Reference) {
    write_hosts(
        certs,
        &fake.host(),
        &format!("server = \"http://{}\"\n", fake.host()),
    );
    let r = client(certs, None, creds);
    let reference = format!("{}/test/repo:v1", fake.host()).parse().unwrap();
    (r, reference)
}

#[tokio::test]
async fn fault_503_twice_then_success_is_retried() {
    let data = Arc::new(blob(4_096));
    let calls = Arc::new(AtomicUsize::new(0));
    let (d, c) = (data.clone(), calls.clone());
    let fake = Fake::start(move |req| {
        if c.fetch_add(1, Ordering::SeqCst) < 2 {
            Action::Send(response("503 Service Unavailable", &[], b"busy"))
        } else {
            Action::Send(partial(req, &d))
        }
    })
    .await;
    let certs = tempfile::tempdir().unwrap();
    let (r, reference) = fake_client(certs.path(), &fake, vec![]);
    let got = r
        .fetch_range(&reference, &digest_of(&data), 100, 1_000)
        .await
        .unwrap();
    assert_eq!(&got[..], &data[100..1_100]);
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn fault_503_forever_names_the_status() {
    let fake = Fake::start(|_| {
        Action::Send(response(
            "503 Service Unavailable",
            &[],
            b"down for maintenance",
        ))
    })
    .await;
    let certs = tempfile::tempdir().unwrap();
    let (r, reference) = fake_client(certs.path(), &fake, vec![]);
    let digest = digest_of(b"x");
    let err = r.fetch_range(&reference, &digest, 0, 10).await.unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("HTTP 503") && msg.contains("down for maintenance") && msg.contains(&digest),
        "{msg}"
    );
    assert_eq!(fake.requests().len(), 3, "1 try + 2 retries");
}

#[tokio::test]
async fn fault_short_body_is_an_error() {
    let data = Arc::new(blob(8_192));
    let d = data.clone();
    let fake = Fake::start(move |req| {
        let (off, len) = req.range();
        let mut full = partial(req, &d);
        full.truncate(full.len() - len / 2);
        let _ = off;
        Action::Send(full)
    })
    .await;
    let certs = tempfile::tempdir().unwrap();
    let (r, reference) = fake_client(certs.path(), &fake, vec![]);
    let err = r
        .fetch_range(&reference, &digest_of(&data), 0, 4_000)
        .await
        .unwrap_err();
    match &err {
        RegistryError::ShortRead { got, want, .. } => assert_eq!((*got, *want), (2_000, 4_000)),
        other => panic!("expected a short read, got {other}"),
    }
    assert!(err.to_string().contains("short read"), "{err}");
}

#[tokio::test]
async fn fault_wrong_content_range_is_an_error() {
    let data = Arc::new(blob(1_000));
    let d = data.clone();
    let fake = Fake::start(move |_| {
        Action::Send(response(
            "206 Partial Content",
            &[("Content-Range", "bytes 0-9/1000".into())],
            &d[..10],
        ))
    })
    .await;
    let certs = tempfile::tempdir().unwrap();
    let (r, reference) = fake_client(certs.path(), &fake, vec![]);
    let err = r
        .fetch_range(&reference, &digest_of(&data), 500, 10)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("Content-Range"), "{err}");
}

#[tokio::test]
async fn full_body_answer_to_a_range_yields_the_window() {
    let data = Arc::new(blob(20_000));
    let d = data.clone();
    let fake = Fake::start(move |_| Action::Send(response("200 OK", &[], &d))).await;
    let certs = tempfile::tempdir().unwrap();
    let (r, reference) = fake_client(certs.path(), &fake, vec![]);
    let got = r
        .fetch_range(&reference, &digest_of(&data), 15_000, 3_000)
        .await
        .unwrap();
    assert_eq!(&got[..], &data[15_000..18_000]);
    let err = r
        .fetch_range(&reference, &digest_of(&data), 19_000, 3_000)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("20000 bytes"), "{err}");
}

/// Collects what a streamed fetch sent to its sink and checks that the
/// pieces, in order, tile `[off, off + want.len())` and equal `want`.
fn assert_pieces_tile(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<(u64, bytes::Bytes)>,
    off: u64,
    want: &[u8],
) -> usize {
    let mut at = off;
    let mut pieces = 0;
    while let Ok((pos, piece)) = rx.try_recv() {
        assert_eq!(pos, at, "piece {pieces} starts where the last ended");
        let rel = (pos - off) as usize;
        assert_eq!(&piece[..], &want[rel..rel + piece.len()], "piece {pieces}");
        at += piece.len() as u64;
        pieces += 1;
    }
    assert_eq!(at, off + want.len() as u64, "pieces cover the range");
    pieces
}

#[tokio::test]
async fn real_registry_streams_a_range_in_pieces_with_their_offsets() {
    let reg = RealRegistry::start(None);
    let data = blob(3_000_000);
    let digest = reg.push_blob("test/app", &data, None).await;
    let certs = tempfile::tempdir().unwrap();
    let r = client(certs.path(), None, vec![]);
    let reference: Reference = format!("{}/test/app:v1", reg.host()).parse().unwrap();
    let (off, len) = (123_457u64, 2_500_000u64);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let got = r
        .fetch_range_streamed(&reference, &digest, off, len, Some(&tx))
        .await
        .unwrap();
    let want = &data[off as usize..(off + len) as usize];
    assert_eq!(&got[..], want);
    let pieces = assert_pieces_tile(rx, off, want);
    assert!(pieces > 1, "a 2.5 MB body arrives in more than one piece");
}

#[tokio::test]
async fn full_body_answer_streams_only_the_window() {
    let data = Arc::new(blob(20_000));
    let d = data.clone();
    let fake = Fake::start(move |_| Action::Send(response("200 OK", &[], &d))).await;
    let certs = tempfile::tempdir().unwrap();
    let (r, reference) = fake_client(certs.path(), &fake, vec![]);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let got = r
        .fetch_range_streamed(&reference, &digest_of(&data), 15_000, 3_000, Some(&tx))
        .await
        .unwrap();
    assert_eq!(&got[..], &data[15_000..18_000]);
    assert_pieces_tile(rx, 15_000, &data[15_000..18_000]);
}

#[tokio::test]
async fn bearer_token_flow_and_cache() {
    let data = Arc::new(blob(2_048));
    let port = Arc::new(AtomicUsize::new(0));
    let (d, p) = (data.clone(), port.clone());
    let fake = Fake::start(move |req| {
        if req.path.starts_with("/token") {
            assert!(req.path.contains("service=fake-registry"), "{}", req.path);
            assert!(req.path.contains("scope=repository%3Atest%2Frepo%3Apull"), "{}", req.path);
            return Action::Send(response("200 OK", &[], br#"{"access_token":"tok-123","expires_in":300}"#));
        }
        if req.header("authorization") != Some("Bearer tok-123") {
            let realm = format!("http://127.0.0.1:{}/token", p.load(Ordering::SeqCst));
            let challenge = format!(
                r#"Bearer realm="{realm}",service="fake-registry",scope="repository:test/repo:pull""#
            );
            return Action::Send(response("401 Unauthorized", &[("WWW-Authenticate", challenge)], b""));
        }
        if req.method == "HEAD" {
            return Action::Send(response("200 OK", &[("Content-Length", d.len().to_string())], b""));
        }
        Action::Send(partial(req, &d))
    })
    .await;
    port.store(fake.port as usize, Ordering::SeqCst);
    let certs = tempfile::tempdir().unwrap();
    let cred = Credential {
        host: fake.host(),
        username: "bob".into(),
        password: "builder".into(),
        identity_token: String::new(),
    };
    let (r, reference) = fake_client(certs.path(), &fake, vec![cred]);
    let digest = digest_of(&data);
    assert_eq!(
        r.fetch_range(&reference, &digest, 0, 100).await.unwrap(),
        data[..100]
    );
    assert_eq!(
        r.fetch_range(&reference, &digest, 1_000, 48).await.unwrap(),
        data[1_000..1_048]
    );
    assert_eq!(r.blob_size(&reference, &digest).await.unwrap(), 2_048);
    let reqs = fake.requests();
    let token_reqs: Vec<_> = reqs
        .iter()
        .filter(|r| r.path.starts_with("/token"))
        .collect();
    assert_eq!(token_reqs.len(), 1, "token cached: {reqs:#?}");
    assert_eq!(r.token_requests(), 1);
    let basic = base64::engine::general_purpose::STANDARD.encode("bob:builder");
    assert_eq!(
        token_reqs[0].header("authorization"),
        Some(format!("Basic {basic}").as_str())
    );
    // One anonymous 401, then every blob request carries the token, never the password.
    assert_eq!(
        reqs.iter()
            .filter(|r| r.header("authorization").is_none())
            .count(),
        1
    );
    assert!(reqs
        .iter()
        .filter(|r| !r.path.starts_with("/token"))
        .all(|r| !r.header("authorization").unwrap_or("").starts_with("Basic")));
}

#[tokio::test]
async fn redirect_to_blob_storage_drops_authorization() {
    let data = Arc::new(blob(3_000));
    let d = data.clone();
    let storage = Fake::start(move |req| Action::Send(partial(req, &d))).await;
    let storage_host = storage.host();
    let fake = Fake::start(move |req| {
        if req.header("authorization").is_none() {
            return Action::Send(response(
                "401 Unauthorized",
                &[("WWW-Authenticate", r#"Basic realm="fake""#.into())],
                b"",
            ));
        }
        let loc = format!("http://{storage_host}/bucket/blob?X-Amz-Signature=abc");
        Action::Send(response(
            "307 Temporary Redirect",
            &[("Location", loc)],
            b"",
        ))
    })
    .await;
    let certs = tempfile::tempdir().unwrap();
    let cred = Credential {
        host: fake.host(),
        username: "u".into(),
        password: "p".into(),
        identity_token: String::new(),
    };
    let (r, reference) = fake_client(certs.path(), &fake, vec![cred]);
    let got = r
        .fetch_range(&reference, &digest_of(&data), 10, 20)
        .await
        .unwrap();
    assert_eq!(&got[..], &data[10..30]);
    let sreqs = storage.requests();
    assert_eq!(sreqs.len(), 1);
    assert!(sreqs[0]
        .path
        .starts_with("/bucket/blob?X-Amz-Signature=abc"));
    assert_eq!(
        sreqs[0].header("authorization"),
        None,
        "auth leaked: {sreqs:#?}"
    );
    assert_eq!(sreqs[0].header("range"), Some("bytes=10-29"));
    assert!(fake
        .requests()
        .iter()
        .any(|r| r.header("authorization").is_some()));
}

#[tokio::test]
async fn stalled_server_times_out() {
    let fake = Fake::start(|_| Action::Delay(Duration::from_secs(30), Vec::new())).await;
    let certs = tempfile::tempdir().unwrap();
    let (r, reference) = fake_client(certs.path(), &fake, vec![]);
    let started = Instant::now();
    let err = r
        .fetch_range(&reference, &digest_of(b"x"), 0, 10)
        .await
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    assert!(matches!(err, RegistryError::Timeout { .. }), "{err}");
    assert!(err.to_string().contains("response headers"), "{err}");
}

#[tokio::test]
async fn body_stalling_between_chunks_times_out() {
    let data = Arc::new(blob(10_000));
    let d = data.clone();
    let fake = Fake::start(move |req| {
        let mut bytes = partial(req, &d);
        bytes.truncate(bytes.len() - 5_000);
        Action::SendThenStall(bytes)
    })
    .await;
    let certs = tempfile::tempdir().unwrap();
    let (r, reference) = fake_client(certs.path(), &fake, vec![]);
    let started = Instant::now();
    let err = r
        .fetch_range(&reference, &digest_of(&data), 0, 10_000)
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(4));
    assert!(err.to_string().contains("body bytes"), "{err}");
}

#[tokio::test]
async fn concurrency_is_bounded_per_registry() {
    let data = Arc::new(blob(1_000));
    let d = data.clone();
    let fake =
        Fake::start(move |req| Action::Delay(Duration::from_millis(100), partial(req, &d))).await;
    let certs = tempfile::tempdir().unwrap();
    write_hosts(
        certs.path(),
        &fake.host(),
        &format!("server = \"http://{}\"\n", fake.host()),
    );
    let r = Registry::new(RegistryConfig {
        config_path: certs.path().to_path_buf(),
        request_timeout: TIMEOUT,
        max_concurrent: 2,
        docker_config: Some(certs.path().join("none.json")),
        ..RegistryConfig::default()
    })
    .unwrap();
    let reference: Reference = format!("{}/test/repo:v1", fake.host()).parse().unwrap();
    let digest = digest_of(&data);
    let tasks: Vec<_> = (0..6u64)
        .map(|i| {
            let (r, reference, digest) = (r.clone(), reference.clone(), digest.clone());
            tokio::spawn(async move { r.fetch_range(&reference, &digest, i * 100, 100).await })
        })
        .collect();
    for (i, t) in tasks.into_iter().enumerate() {
        assert_eq!(t.await.unwrap().unwrap(), data[i * 100..i * 100 + 100]);
    }
    assert_eq!(fake.max_in_flight.load(Ordering::SeqCst), 2);
    assert_eq!(fake.in_flight.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn too_many_requests_waits_for_retry_after() {
    let data = Arc::new(blob(100));
    let calls = Arc::new(AtomicUsize::new(0));
    let (d, c) = (data.clone(), calls.clone());
    let fake = Fake::start(move |req| {
        if c.fetch_add(1, Ordering::SeqCst) == 0 {
            Action::Send(response(
                "429 Too Many Requests",
                &[("Retry-After", "1".into())],
                b"",
            ))
        } else {
            Action::Send(partial(req, &d))
        }
    })
    .await;
    let certs = tempfile::tempdir().unwrap();
    let (r, reference) = fake_client(certs.path(), &fake, vec![]);
    let started = Instant::now();
    assert_eq!(
        r.fetch_range(&reference, &digest_of(&data), 0, 100)
            .await
            .unwrap(),
        data[..]
    );
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn client_errors_are_not_retried() {
    let fake = Fake::start(|_| {
        Action::Send(response(
            "403 Forbidden",
            &[],
            b"{\"errors\":[{\"code\":\"DENIED\"}]}",
        ))
    })
    .await;
    let certs = tempfile::tempdir().unwrap();
    let (r, reference) = fake_client(certs.path(), &fake, vec![]);
    let err = r
        .fetch_range(&reference, &digest_of(b"x"), 0, 1)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("HTTP 403") && err.to_string().contains("DENIED"),
        "{err}"
    );
    assert_eq!(fake.requests().len(), 1);
}

#[tokio::test]
async fn identity_token_uses_the_refresh_token_grant() {
    let data = Arc::new(blob(64));
    let port = Arc::new(AtomicUsize::new(0));
    let (d, p) = (data.clone(), port.clone());
    let fake = Fake::start(move |req| {
        if req.path.starts_with("/oauth") {
            if req.method == "POST"
                && req.body.contains("grant_type=refresh_token")
                && req.body.contains("refresh_token=id-tok-9")
                && req.body.contains("scope=repository%3Atest%2Frepo%3Apull")
            {
                return Action::Send(response("200 OK", &[], br#"{"token":"t-9"}"#));
            }
            return Action::Send(response("401 Unauthorized", &[], b""));
        }
        if req.header("authorization") != Some("Bearer t-9") {
            let realm = format!("http://127.0.0.1:{}/oauth", p.load(Ordering::SeqCst));
            let challenge = format!(r#"Bearer realm="{realm}",service="svc""#);
            return Action::Send(response(
                "401 Unauthorized",
                &[("WWW-Authenticate", challenge)],
                b"",
            ));
        }
        Action::Send(partial(req, &d))
    })
    .await;
    port.store(fake.port as usize, Ordering::SeqCst);
    let certs = tempfile::tempdir().unwrap();
    let cred = Credential {
        host: fake.host(),
        identity_token: "id-tok-9".into(),
        ..Credential::default()
    };
    let (r, reference) = fake_client(certs.path(), &fake, vec![cred]);
    assert_eq!(
        r.fetch_range(&reference, &digest_of(&data), 0, 64)
            .await
            .unwrap(),
        data[..]
    );

    // A token endpoint that refuses gives an auth error naming it.
    let (r, _) = fake_client(certs.path(), &fake, vec![]);
    let err = r
        .fetch_range(&reference, &digest_of(&data), 0, 64)
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("authentication failed") && msg.contains("/oauth") && msg.contains("HTTP 401"),
        "{msg}"
    );
}
