//! Registry host resolution from containerd's `certs.d` layout
//! (`hosts.toml`), following containerd's `remotes/docker/config`.
//!
//! For registry `NAME` the first existing directory of
//! `CONFIG_PATH/HOST_PORT_` (when `NAME` has a port), `CONFIG_PATH/NAME` and
//! `CONFIG_PATH/_default` is used. In it, `hosts.toml` lists `[host."URL"]`
//! mirrors in file order, then the `server` (or, without one, the default
//! host). Without `hosts.toml`, Docker's layout applies: `*.crt` are CA
//! files, `*.cert` + `*.key` client pairs.
//!
//! Invariants: the returned list is never empty unless the file lists no
//! host at all; the last entry is the upstream server; relative `ca` and
//! `client` paths are made absolute against the host directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::reference::{DOCKER_HUB, DOCKER_HUB_HOST};

/// What a host may be used for (`capabilities` in `hosts.toml`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Fetch blobs and manifests by digest.
    pub pull: bool,
    /// Resolve tags to manifests.
    pub resolve: bool,
    /// Push (Shoal never pushes; parsed for completeness).
    pub push: bool,
}

impl Capabilities {
    /// All capabilities, the default when `capabilities` is absent.
    pub const ALL: Capabilities = Capabilities {
        pull: true,
        resolve: true,
        push: true,
    };
}

/// The operation a host is chosen for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Capability {
    /// Blobs, and manifests by digest.
    Pull,
    /// Manifests by tag.
    Resolve,
}

impl Capabilities {
    /// Whether the host may serve `c`.
    pub fn allows(&self, c: Capability) -> bool {
        match c {
            Capability::Pull => self.pull,
            Capability::Resolve => self.resolve,
        }
    }
}

/// One endpoint to try, before TLS clients are attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostSpec {
    /// `https` or `http`.
    pub scheme: String,
    /// `host[:port]` that requests go to.
    pub host: String,
    /// API root, normally `/v2` (or the URL's path with `override_path`).
    pub path: String,
    /// What the host may be used for.
    pub capabilities: Capabilities,
    /// Extra CA files (PEM), added to the system roots.
    pub ca: Vec<PathBuf>,
    /// Client certificate and optional separate key file (PEM).
    pub client: Vec<(PathBuf, Option<PathBuf>)>,
    /// Skip server certificate verification.
    pub skip_verify: Option<bool>,
    /// Extra headers sent with every request to this host.
    pub header: Vec<(String, String)>,
    /// Try `https` but fall back to plain `http` when the TLS connection
    /// fails (loopback hosts without a configured scheme, like containerd).
    pub http_fallback: bool,
}

impl HostSpec {
    fn unset() -> HostSpec {
        HostSpec {
            scheme: String::new(),
            host: String::new(),
            path: String::new(),
            capabilities: Capabilities::ALL,
            ca: Vec::new(),
            client: Vec::new(),
            skip_verify: None,
            header: Vec::new(),
            http_fallback: false,
        }
    }
}

/// `ca = "a.pem"` or `ca = ["a.pem", "b.pem"]`; also header values.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// `client = "c.pem"`, `["c1.pem", "c2.pem"]` or `[["c.cert", "c.key"]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum ClientEntry {
    Combined(String),
    Pair(Vec<String>),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum ClientField {
    One(String),
    Many(Vec<ClientEntry>),
}

#[derive(Debug, Clone, Default, Deserialize)]
struct HostFileConfig {
    #[serde(default)]
    capabilities: Vec<String>,
    ca: Option<OneOrMany>,
    client: Option<ClientField>,
    skip_verify: Option<bool>,
    #[serde(default)]
    header: BTreeMap<String, OneOrMany>,
    #[serde(default)]
    override_path: bool,
}

/// The whole file. The root's host fields are spelled out rather than
/// flattened, because `#[serde(flatten)]` would lose the `Spanned` positions
/// that give the mirrors' order.
#[derive(Debug, Default, Deserialize)]
struct HostsFile {
    #[serde(default)]
    server: String,
    #[serde(default)]
    capabilities: Vec<String>,
    ca: Option<OneOrMany>,
    client: Option<ClientField>,
    skip_verify: Option<bool>,
    #[serde(default)]
    header: BTreeMap<String, OneOrMany>,
    #[serde(default)]
    override_path: bool,
    #[serde(default)]
    host: BTreeMap<String, toml::Spanned<HostFileConfig>>,
}

/// Parses a `hosts.toml`: the `[host."URL"]` entries in file order, then the
/// `server` entry (whose `host` is empty when the file names no server).
pub fn parse_hosts_file(base_dir: &Path, text: &str) -> Result<Vec<HostSpec>, String> {
    let file: HostsFile = toml::from_str(text).map_err(|e| e.to_string())?;
    let mut mirrors: Vec<(usize, String, HostFileConfig)> = file
        .host
        .into_iter()
        .map(|(url, cfg)| (cfg.span().start, url, cfg.into_inner()))
        .collect();
    mirrors.sort_by_key(|(pos, _, _)| *pos);
    let mut hosts = Vec::with_capacity(mirrors.len() + 1);
    for (_, url, cfg) in mirrors {
        hosts.push(parse_host(&url, base_dir, cfg).map_err(|e| format!("host {url:?}: {e}"))?);
    }
    let root = HostFileConfig {
        capabilities: file.capabilities,
        ca: file.ca,
        client: file.client,
        skip_verify: file.skip_verify,
        header: file.header,
        override_path: file.override_path,
    };
    hosts.push(parse_host(&file.server, base_dir, root).map_err(|e| format!("server: {e}"))?);
    Ok(hosts)
}

fn parse_host(server: &str, base_dir: &Path, cfg: HostFileConfig) -> Result<HostSpec, String> {
    let mut spec = HostSpec::unset();
    if !server.is_empty() {
        let full = if server.starts_with("http") {
            server.to_string()
        } else {
            format!("https://{server}")
        };
        let url = reqwest::Url::parse(&full).map_err(|e| format!("invalid URL {full:?}: {e}"))?;
        spec.scheme = url.scheme().to_string();
        if spec.scheme != "http" && spec.scheme != "https" {
            return Err(format!("unsupported scheme in {full:?}"));
        }
        spec.host = match (url.host_str(), url.port()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (Some(h), None) => h.to_string(),
            (None, _) => return Err(format!("no host in {full:?}")),
        };
        let path = clean_path(url.path());
        spec.path = if cfg.override_path || path.ends_with("/v2") {
            path
        } else {
            format!("{path}/v2")
        };
    }
    spec.skip_verify = cfg.skip_verify;
    if !cfg.capabilities.is_empty() {
        let mut caps = Capabilities {
            pull: false,
            resolve: false,
            push: false,
        };
        for c in &cfg.capabilities {
            match c.to_ascii_lowercase().as_str() {
                "pull" => caps.pull = true,
                "resolve" => caps.resolve = true,
                "push" => caps.push = true,
                other => return Err(format!("unknown capability {other:?}")),
            }
        }
        spec.capabilities = caps;
    }
    let abs = |p: &str| {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            base_dir.join(p)
        }
    };
    if let Some(ca) = cfg.ca {
        spec.ca = ca.into_vec().iter().map(|p| abs(p)).collect();
    }
    match cfg.client {
        None => {}
        Some(ClientField::One(p)) => spec.client.push((abs(&p), None)),
        Some(ClientField::Many(entries)) => {
            for e in entries {
                match e {
                    ClientEntry::Combined(p) => spec.client.push((abs(&p), None)),
                    ClientEntry::Pair(v) if v.len() == 2 => {
                        spec.client.push((abs(&v[0]), Some(abs(&v[1]))))
                    }
                    ClientEntry::Pair(v) => return Err(format!("invalid client pair {v:?}")),
                }
            }
        }
    }
    for (k, v) in cfg.header {
        for value in v.into_vec() {
            spec.header.push((k.clone(), value));
        }
    }
    Ok(spec)
}

/// `path.Clean` for URL paths: no trailing or doubled slashes, `""` for root.
fn clean_path(p: &str) -> String {
    let parts: Vec<&str> = p
        .split('/')
        .filter(|s| !s.is_empty() && *s != ".")
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!("/{}", parts.join("/"))
    }
}

/// containerd's directory name for `host:port`: `host_port_`.
fn host_directory(host: &str) -> Option<String> {
    let idx = host.rfind(':')?;
    (idx > 0).then(|| format!("{}_{}_", &host[..idx], &host[idx + 1..]))
}

/// The host directory used for `registry`, if any exists.
pub fn host_dir(root: &Path, registry: &str) -> Option<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(d) = host_directory(registry) {
        candidates.push(root.join(d));
    }
    candidates.push(root.join(registry));
    candidates.push(root.join("_default"));
    candidates.into_iter().find(|p| p.is_dir())
}

/// Whether `host` (with or without port) is loopback, as containerd's
/// `IsLocalhost`.
pub fn is_localhost(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or(rest)
    } else if host.matches(':').count() == 1 {
        host.split(':').next().unwrap_or(host)
    } else {
        host
    };
    name == "localhost"
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Resolves the ordered hosts for `registry` (`docker.io` for Docker Hub).
///
/// # Errors
/// A `hosts.toml` that exists but cannot be read or parsed; the message
/// names the file. (containerd falls back to the cert files on a parse
/// error; Shoal refuses, so a typo doesn't silently bypass mirrors.)
pub fn resolve(root: &Path, registry: &str) -> Result<Vec<HostSpec>, (PathBuf, String)> {
    let mut hosts = match host_dir(root, registry) {
        Some(dir) => {
            let file = dir.join("hosts.toml");
            match std::fs::read_to_string(&file) {
                Ok(text) if !text.trim().is_empty() => {
                    parse_hosts_file(&dir, &text).map_err(|e| (file.clone(), e))?
                }
                Ok(_) => cert_files(&dir).map_err(|e| (dir.clone(), e))?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    cert_files(&dir).map_err(|e| (dir.clone(), e))?
                }
                Err(e) => return Err((file, e.to_string())),
            }
        }
        None => vec![HostSpec::unset()],
    };
    if let Some(last) = hosts.last_mut().filter(|h| h.host.is_empty()) {
        if registry == DOCKER_HUB {
            last.scheme = "https".into();
            last.host = DOCKER_HUB_HOST.into();
        } else if is_localhost(registry) {
            last.scheme = "https".into();
            last.host = registry.into();
            last.http_fallback = true;
            last.skip_verify.get_or_insert(true);
        } else {
            last.scheme = "https".into();
            last.host = registry.into();
        }
        last.path = "/v2".into();
        last.capabilities = Capabilities::ALL;
    }
    Ok(hosts)
}

/// Docker's `certs.d` layout: `*.crt` CA files, `*.cert` with `*.key`.
fn cert_files(dir: &Path) -> Result<Vec<HostSpec>, String> {
    let mut spec = HostSpec::unset();
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| e.to_string())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    names.sort();
    for p in names {
        match p.extension().and_then(|e| e.to_str()) {
            Some("crt") => spec.ca.push(p),
            Some("cert") => {
                let key = p.with_extension("key");
                let key = key.is_file().then_some(key);
                spec.client.push((p, key));
            }
            _ => {}
        }
    }
    Ok(vec![spec])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Vec<HostSpec> {
        parse_hosts_file(Path::new("/certs/reg"), text).unwrap()
    }

    #[test]
    fn mirrors_keep_file_order_and_server_is_last() {
        let hosts = parse(
            r#"
server = "https://registry.example.com"

[host."https://zzz.mirror"]
  capabilities = ["pull"]

[host."http://aaa.mirror:5000"]
  capabilities = ["pull", "resolve"]

[host."https://mmm.mirror/custom/prefix"]
  override_path = true
"#,
        );
        let order: Vec<_> = hosts.iter().map(|h| h.host.as_str()).collect();
        assert_eq!(
            order,
            [
                "zzz.mirror",
                "aaa.mirror:5000",
                "mmm.mirror",
                "registry.example.com"
            ]
        );
        assert!(hosts[0].capabilities.allows(Capability::Pull));
        assert!(!hosts[0].capabilities.allows(Capability::Resolve));
        assert_eq!(hosts[1].scheme, "http");
        assert_eq!(hosts[1].path, "/v2");
        assert!(hosts[1].capabilities.resolve && !hosts[1].capabilities.push);
        assert_eq!(hosts[2].path, "/custom/prefix");
        assert_eq!(hosts[3].capabilities, Capabilities::ALL);
        assert_eq!(hosts[3].scheme, "https");
    }

    #[test]
    fn ca_string_or_list_and_client_forms() {
        let hosts = parse(
            r#"
server = "registry.example.com:8443"
ca = "root.pem"
skip_verify = false

[host."https://m1"]
  ca = ["/abs/a.pem", "rel/b.pem"]
  client = [["c.cert", "c.key"], "combined.pem"]
  skip_verify = true
  [host."https://m1".header]
    x-custom = "1"
    x-multi = ["a", "b"]
"#,
        );
        let m1 = &hosts[0];
        assert_eq!(
            m1.ca,
            [
                PathBuf::from("/abs/a.pem"),
                PathBuf::from("/certs/reg/rel/b.pem")
            ]
        );
        assert_eq!(
            m1.client,
            [
                (
                    PathBuf::from("/certs/reg/c.cert"),
                    Some(PathBuf::from("/certs/reg/c.key"))
                ),
                (PathBuf::from("/certs/reg/combined.pem"), None),
            ]
        );
        assert_eq!(m1.skip_verify, Some(true));
        assert_eq!(
            m1.header,
            [
                ("x-custom".to_string(), "1".to_string()),
                ("x-multi".to_string(), "a".to_string()),
                ("x-multi".to_string(), "b".to_string()),
            ]
        );
        let server = &hosts[1];
        assert_eq!(server.host, "registry.example.com:8443");
        assert_eq!(server.scheme, "https");
        assert_eq!(server.ca, [PathBuf::from("/certs/reg/root.pem")]);
        assert_eq!(server.skip_verify, Some(false));
    }

    #[test]
    fn paths_get_v2_unless_overridden() {
        let hosts = parse(
            "server = \"https://r.example/prefix/\"\n[host.\"https://m/v2\"]\n[host.\"https://n/\"]\n",
        );
        assert_eq!(hosts[0].path, "/v2");
        assert_eq!(hosts[1].path, "/v2");
        assert_eq!(hosts[2].path, "/prefix/v2");
    }

    #[test]
    fn bad_files_are_refused_with_the_reason() {
        let base = Path::new("/x");
        let e = parse_hosts_file(base, "[host.\"https://m\"]\ncapabilities = [\"fly\"]\n");
        assert!(e.unwrap_err().contains("unknown capability"));
        assert!(parse_hosts_file(base, "server = [").is_err());
        let e = parse_hosts_file(base, "[host.\"https://m\"]\nca = 5\n");
        assert!(e.is_err());
    }

    #[test]
    fn defaults_without_a_hosts_file() {
        let root = Path::new("/nonexistent-shoal-certs");
        let h = resolve(root, "docker.io").unwrap();
        assert_eq!(
            (h[0].scheme.as_str(), h[0].host.as_str()),
            ("https", "registry-1.docker.io")
        );
        let h = resolve(root, "127.0.0.1:5000").unwrap();
        assert!(h[0].http_fallback);
        assert_eq!(h[0].skip_verify, Some(true));
        let h = resolve(root, "ghcr.io").unwrap();
        assert_eq!(
            (h.len(), h[0].http_fallback, h[0].path.as_str()),
            (1, false, "/v2")
        );
    }

    #[test]
    fn host_directories_as_containerd_names_them() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("_default")).unwrap();
        std::fs::create_dir(root.path().join("reg.io_5000_")).unwrap();
        std::fs::write(
            root.path().join("reg.io_5000_/hosts.toml"),
            "[host.\"http://mirror:1\"]\n",
        )
        .unwrap();
        assert_eq!(
            host_dir(root.path(), "reg.io:5000").unwrap(),
            root.path().join("reg.io_5000_")
        );
        assert_eq!(
            host_dir(root.path(), "other").unwrap(),
            root.path().join("_default")
        );
        let h = resolve(root.path(), "reg.io:5000").unwrap();
        assert_eq!(h.len(), 2);
        assert_eq!(
            (h[0].scheme.as_str(), h[0].host.as_str()),
            ("http", "mirror:1")
        );
        assert_eq!(h[1].host, "reg.io:5000");
    }

    #[test]
    fn localhost_detection() {
        for h in [
            "localhost",
            "localhost:5000",
            "127.0.0.1",
            "127.0.0.5:80",
            "::1",
            "[::1]:5000",
        ] {
            assert!(is_localhost(h), "{h}");
        }
        for h in ["example.com", "10.0.0.1:5000", "localhost.example"] {
            assert!(!is_localhost(h), "{h}");
        }
    }
}
