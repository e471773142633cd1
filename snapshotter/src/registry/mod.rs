//! Registry client for lazily pulled layers: blob byte ranges, blob sizes
//! and manifests over the OCI distribution API, with hosts configured the
//! way containerd configures them.
//!
//! # Layout
//! - [`mod@reference`]: image references and Docker Hub normalisation.
//! - [`hosts`]: `certs.d/HOST/hosts.toml` (mirrors, capabilities, TLS).
//! - [`auth`]: challenges, credentials, token cache.
//! - [`scoped`]: credentials scoped to an image's host and repository.
//! - `fetch`: the request loop (failover, retries, redirects, timeouts,
//!   Range checks).
//! - `body`: reading responses (lengths, ranges, chunk timeouts).
//! - `push`: blob uploads and manifest PUTs (`shoal convert`).
//! - [`error`]: the error type, [`RegistryError`].
//!
//! # Behaviour
//! - Hosts: `hosts.toml` mirrors in file order, then the server; only hosts
//!   with `pull` serve blobs and manifests by digest, only `resolve` hosts
//!   serve tags. Loopback registries without a hosts file are tried over
//!   HTTPS (unverified) and fall back to plain HTTP, like containerd.
//! - Failover and retries: any failure moves on to the next host (a mirror
//!   that lacks a blob, refuses us or answers wrongly must not stop the
//!   pull). After a round over all hosts, the client waits ([`backoff`], or
//!   `Retry-After` for 429/503, up to [`MAX_RETRY_AFTER`]) and starts another
//!   round, `retries` times, with only the hosts whose failure was transient
//!   (connection errors, timeouts, truncated bodies, 5xx, 408, 429). The
//!   error returned is the last failing host's, normally the server's.
//! - Timeouts: `request_timeout` bounds connecting plus waiting for the
//!   response headers, and then *each gap* between body chunks. A body must
//!   also average at least `min_rate` bytes/s once `min_rate_grace` has
//!   passed, so a body of `n` bytes takes at most
//!   `max(min_rate_grace, n / min_rate)`: a host that trickles bytes cannot
//!   hold a request slot for long, while large ranges on slow links that
//!   keep the floor still finish.
//! - Ranges: `Range: bytes=a-b`. A 206 must carry exactly that
//!   `Content-Range` (and a matching `Content-Length`); the body must be
//!   exactly `len` bytes or the read fails with [`RegistryError::ShortRead`].
//!   A 200 (the server ignored `Range`) is accepted by streaming past
//!   `offset` bytes and keeping only the window; the host is remembered
//!   (logged once), and the answer is parked at the window's end, so the
//!   blob's next range at or past it continues the same answer instead of
//!   starting again from byte 0 (`unranged`): a layer fetched in blob order
//!   costs one pass over the blob, not O(N²).
//! - Redirects (301/302/303/307/308) are followed by hand, up to
//!   [`MAX_REDIRECTS`]; `Authorization` and the `hosts.toml` `[header]`
//!   values are dropped when the target is on another origin (blob storage
//!   such as S3 uses signed URLs).
//! - Concurrency (`limits`): at most `max_concurrent` requests of one
//!   [`Registry`] (and its clones) are in flight at once, at most
//!   `max_concurrent_per_host` to one host, and at most
//!   `max_concurrent_per_blob` for one blob on one host, so a slow host
//!   leaves slots to the others and one layer leaves slots to the other
//!   layers of its host.
//! - Credentials: an image's own for its host and repository
//!   ([`Registry::with_scoped`], from CRI `PullImage`), else
//!   [`RegistryConfig::credentials`], then Docker's `config.json`;
//!   credential helpers are not supported. A [`Registry::anonymous`] client
//!   sends none.
//! - Host resolution is cached for [`HOSTS_TTL`], so `hosts.toml` edits take
//!   effect without a restart.

pub mod auth;
mod body;
pub mod docker_config;
pub mod error;
mod fetch;
pub mod hosts;
mod limits;
mod push;
pub mod reference;
pub mod scoped;
mod unranged;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use body::BodySink;
pub use error::RegistryError;
pub use fetch::{
    backoff, BACKOFF_BASE, BACKOFF_MAX, MANIFEST_ACCEPT, MAX_REDIRECTS, MAX_RETRY_AFTER,
};
pub use hosts::{Capability, HostSpec};
pub use push::UPLOAD_PIECE;
pub use reference::Reference;
pub use scoped::{ImageCredential, ScopedCredentials};

/// Default [`RegistryConfig::config_path`].
pub const DEFAULT_CONFIG_PATH: &str = "/etc/containerd/certs.d";
/// Default [`RegistryConfig::request_timeout`].
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Default [`RegistryConfig::retries`].
pub const DEFAULT_RETRIES: u32 = 3;
/// Default [`RegistryConfig::max_concurrent`].
pub const DEFAULT_MAX_CONCURRENT: usize = crate::config::DEFAULT_MAX_CONCURRENT;
/// Default [`RegistryConfig::max_concurrent_per_host`].
pub const DEFAULT_MAX_CONCURRENT_PER_HOST: usize = crate::config::DEFAULT_MAX_CONCURRENT_PER_HOST;
/// Default [`RegistryConfig::max_concurrent_per_blob`].
pub const DEFAULT_MAX_CONCURRENT_PER_BLOB: usize = crate::config::DEFAULT_MAX_CONCURRENT_PER_BLOB;
/// Default [`RegistryConfig::min_rate`].
pub const DEFAULT_MIN_RATE: u64 = crate::config::DEFAULT_MIN_RATE_BYTES_PER_SEC;
/// Default [`RegistryConfig::min_rate_grace`].
pub const DEFAULT_MIN_RATE_GRACE: Duration =
    Duration::from_secs(crate::config::DEFAULT_MIN_RATE_GRACE_SECS);
/// How long a registry's resolved hosts are reused before `hosts.toml` is
/// read again.
pub const HOSTS_TTL: Duration = Duration::from_secs(60);
/// Manifests larger than this are refused (containerd's limit too).
pub const MAX_MANIFEST_BYTES: u64 = 4 << 20;

/// One registry's credentials.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Credential {
    /// `host[:port]` as in image references (`docker.io`, `127.0.0.1:5000`)
    /// or the host of a mirror.
    pub host: String,
    /// User name (with `password`); empty for none.
    pub username: String,
    /// Password; empty for none.
    pub password: String,
    /// Identity (OAuth2 refresh) token, used instead of the password for
    /// Bearer token requests; empty for none.
    pub identity_token: String,
}

/// How registries are reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryConfig {
    /// containerd's `certs.d` directory (`HOST[:PORT]/hosts.toml`).
    pub config_path: PathBuf,
    /// Bound on connect + response headers, and on each gap between body
    /// chunks (not on the whole transfer).
    pub request_timeout: Duration,
    /// Extra rounds over the hosts after the first fails transiently.
    pub retries: u32,
    /// Requests in flight at once, per [`Registry`].
    pub max_concurrent: usize,
    /// Requests in flight at once to one host (`host[:port]`).
    pub max_concurrent_per_host: usize,
    /// Range and size requests in flight at once for one blob on one host.
    pub max_concurrent_per_blob: usize,
    /// Bytes/s a response body must average once `min_rate_grace` has
    /// passed (0: no floor).
    pub min_rate: u64,
    /// How long a body may take before `min_rate` applies.
    pub min_rate_grace: Duration,
    /// Credentials, tried before the Docker config.
    pub credentials: Vec<Credential>,
    /// Docker config file; `None` means `$DOCKER_CONFIG/config.json` or
    /// `~/.docker/config.json` (a broken default file is ignored with a
    /// warning; a broken explicit one is an error).
    pub docker_config: Option<PathBuf>,
    /// More Docker config files, read after `docker_config`: Kubernetes'
    /// mounted `dockerconfigjson` Secrets (a file or its directory).
    pub docker_config_files: Vec<PathBuf>,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            config_path: DEFAULT_CONFIG_PATH.into(),
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            retries: DEFAULT_RETRIES,
            max_concurrent: DEFAULT_MAX_CONCURRENT,
            max_concurrent_per_host: DEFAULT_MAX_CONCURRENT_PER_HOST,
            max_concurrent_per_blob: DEFAULT_MAX_CONCURRENT_PER_BLOB,
            min_rate: DEFAULT_MIN_RATE,
            min_rate_grace: DEFAULT_MIN_RATE_GRACE,
            credentials: Vec::new(),
            docker_config: None,
            docker_config_files: Vec::new(),
        }
    }
}

impl RegistryConfig {
    /// From the daemon's `[registry]` config section.
    pub fn from_section(s: &crate::config::RegistrySection) -> RegistryConfig {
        RegistryConfig {
            config_path: s.config_path.clone(),
            request_timeout: Duration::from_secs(s.request_timeout_secs),
            retries: s.retries,
            max_concurrent: s.max_concurrent,
            max_concurrent_per_host: s.max_concurrent_per_host,
            max_concurrent_per_blob: s.max_concurrent_per_blob,
            min_rate: s.min_rate_bytes_per_sec,
            min_rate_grace: Duration::from_secs(s.min_rate_grace_secs),
            credentials: s
                .credentials
                .iter()
                .map(|c| Credential {
                    host: c.host.clone(),
                    username: c.username.clone(),
                    password: c.password.clone(),
                    identity_token: c.identity_token.clone(),
                })
                .collect(),
            docker_config: s.docker_config.clone(),
            docker_config_files: s.docker_config_files.clone(),
        }
    }
}

fn default_docker_config() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG").filter(|d| !d.is_empty()) {
        return Some(Path::new(&dir).join("config.json"));
    }
    std::env::var_os("HOME").map(|h| Path::new(&h).join(".docker/config.json"))
}

/// A host to try, with the HTTP client its TLS settings need.
#[derive(Debug)]
pub(crate) struct Host {
    pub spec: HostSpec,
    pub client: reqwest::Client,
    /// Set once plain HTTP worked for an `http_fallback` host.
    pub plain_http: AtomicBool,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct TlsKey {
    skip_verify: bool,
    ca: Vec<PathBuf>,
    client: Vec<(PathBuf, Option<PathBuf>)>,
}

type HostList = Arc<Vec<Arc<Host>>>;

#[derive(Debug)]
struct Inner {
    cfg: RegistryConfig,
    auth: auth::Auth,
    limits: limits::Limits,
    unranged: unranged::Unranged,
    clients: Mutex<HashMap<TlsKey, reqwest::Client>>,
    hosts: Mutex<HashMap<String, (Instant, HostList)>>,
}

/// Registry client; cheap to clone (clones share clients, tokens, hosts and
/// the concurrency limit).
#[derive(Debug, Clone)]
pub struct Registry {
    inner: Arc<Inner>,
    /// Send no credentials (see [`Registry::anonymous`]).
    anonymous: bool,
    /// Images' own credentials (see [`Registry::with_scoped`]).
    scoped: Option<Arc<dyn ScopedCredentials>>,
}

impl Registry {
    /// A client for `cfg`. Reads the Docker config now; `hosts.toml` files
    /// are read when a registry is first used.
    ///
    /// # Errors
    /// An explicitly configured Docker config that cannot be read or parsed,
    /// or a concurrency limit of 0.
    pub fn new(cfg: RegistryConfig) -> Result<Self, RegistryError> {
        for (name, n) in [
            ("max_concurrent", cfg.max_concurrent),
            ("max_concurrent_per_host", cfg.max_concurrent_per_host),
            ("max_concurrent_per_blob", cfg.max_concurrent_per_blob),
        ] {
            if n == 0 {
                return Err(RegistryError::Client(format!("{name} must be at least 1")));
            }
        }
        let mut creds = cfg.credentials.clone();
        let explicit = cfg.docker_config.is_some();
        if let Some(path) = cfg.docker_config.clone().or_else(default_docker_config) {
            match docker_config::load_docker_config(&path) {
                Ok(c) => creds.extend(c),
                Err(reason) if explicit => return Err(RegistryError::Config { path, reason }),
                Err(reason) => {
                    tracing::warn!(path = %path.display(), %reason, "ignoring unreadable docker config")
                }
            }
        }
        for path in &cfg.docker_config_files {
            let c = docker_config::load_docker_config(path).map_err(|reason| {
                RegistryError::Config {
                    path: path.clone(),
                    reason,
                }
            })?;
            creds.extend(c);
        }
        Ok(Registry {
            anonymous: false,
            scoped: None,
            inner: Arc::new(Inner {
                auth: auth::Auth::new(creds),
                limits: limits::Limits::new(
                    cfg.max_concurrent,
                    cfg.max_concurrent_per_host,
                    cfg.max_concurrent_per_blob,
                ),
                unranged: unranged::Unranged::default(),
                clients: Mutex::new(HashMap::new()),
                hosts: Mutex::new(HashMap::new()),
                cfg,
            }),
        })
    }

    /// This client, sending no credentials: for hosts that an image, not the
    /// operator, chose. It shares everything else (clients, hosts, the
    /// concurrency limit); its tokens are asked for anonymously and cached
    /// apart from those that credentials bought.
    pub fn anonymous(&self) -> Registry {
        Registry {
            inner: self.inner.clone(),
            anonymous: true,
            scoped: None,
        }
    }

    /// This client, sending the credential that `scoped` holds for a host
    /// and repository instead of the node's (see [`scoped`]). Clones share
    /// it; [`Registry::anonymous`] drops it.
    pub fn with_scoped(mut self, scoped: Arc<dyn ScopedCredentials>) -> Registry {
        self.scoped = Some(scoped);
        self
    }

    /// Whose credentials a request to `host` for `repository` carries.
    fn who(&self, host: &str, repository: &str) -> auth::Who {
        if self.anonymous {
            return auth::Who::Anonymous;
        }
        match self
            .scoped
            .as_ref()
            .and_then(|s| s.lookup(&auth::normalize_host(host), repository))
        {
            Some(c) => auth::Who::Image(c),
            None => auth::Who::Node,
        }
    }

    /// How long a response body may take.
    fn pace(&self) -> body::Pace {
        body::Pace {
            gap: self.inner.cfg.request_timeout,
            min_rate: self.inner.cfg.min_rate,
            grace: self.inner.cfg.min_rate_grace,
        }
    }

    /// The configuration in use.
    pub fn config(&self) -> &RegistryConfig {
        &self.inner.cfg
    }

    /// Token requests made so far (each cache miss costs one).
    pub fn token_requests(&self) -> u64 {
        self.inner.auth.token_requests()
    }

    /// The hosts tried for `reference` with capability `cap`, in order.
    ///
    /// # Errors
    /// A broken `hosts.toml` or CA/client file, or no host with `cap`.
    pub fn hosts(
        &self,
        reference: &Reference,
        cap: Capability,
    ) -> Result<Vec<HostSpec>, RegistryError> {
        Ok(self
            .hosts_for(reference, cap)?
            .iter()
            .map(|h| h.spec.clone())
            .collect())
    }

    fn hosts_for(
        &self,
        reference: &Reference,
        cap: Capability,
    ) -> Result<Vec<Arc<Host>>, RegistryError> {
        let all = self.resolve(&reference.registry)?;
        let hosts: Vec<_> = all
            .iter()
            .filter(|h| h.spec.capabilities.allows(cap))
            .cloned()
            .collect();
        if hosts.is_empty() {
            return Err(RegistryError::NoHosts {
                registry: reference.registry.clone(),
                capability: match cap {
                    Capability::Pull => "pull",
                    Capability::Resolve => "resolve",
                },
            });
        }
        Ok(hosts)
    }

    fn resolve(&self, registry: &str) -> Result<HostList, RegistryError> {
        {
            let cache = self.inner.hosts.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((at, list)) = cache.get(registry) {
                if at.elapsed() < HOSTS_TTL {
                    return Ok(list.clone());
                }
            }
        }
        let specs = hosts::resolve(&self.inner.cfg.config_path, registry)
            .map_err(|(path, reason)| RegistryError::Config { path, reason })?;
        let mut list = Vec::with_capacity(specs.len());
        for spec in specs {
            let client = self.client_for(&spec)?;
            list.push(Arc::new(Host {
                spec,
                client,
                plain_http: AtomicBool::new(false),
            }));
        }
        let list = Arc::new(list);
        let mut cache = self.inner.hosts.lock().unwrap_or_else(|e| e.into_inner());
        cache.insert(registry.to_string(), (Instant::now(), list.clone()));
        Ok(list)
    }

    fn client_for(&self, spec: &HostSpec) -> Result<reqwest::Client, RegistryError> {
        let key = TlsKey {
            skip_verify: spec.skip_verify.unwrap_or(false),
            ca: spec.ca.clone(),
            client: spec.client.clone(),
        };
        let mut clients = self.inner.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = clients.get(&key) {
            return Ok(c.clone());
        }
        let mut b = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(self.inner.cfg.request_timeout)
            .pool_idle_timeout(Duration::from_secs(90))
            .user_agent(concat!("shoal/", env!("CARGO_PKG_VERSION")))
            .tls_danger_accept_invalid_certs(key.skip_verify);
        let read = |p: &PathBuf| {
            std::fs::read(p).map_err(|e| RegistryError::Config {
                path: p.clone(),
                reason: e.to_string(),
            })
        };
        for p in &key.ca {
            let certs = reqwest::Certificate::from_pem_bundle(&read(p)?).map_err(|e| {
                RegistryError::Config {
                    path: p.clone(),
                    reason: format!("not a PEM CA bundle: {e}"),
                }
            })?;
            b = b.tls_certs_merge(certs);
        }
        for (cert, keyfile) in &key.client {
            let mut pem = read(cert)?;
            if let Some(k) = keyfile {
                pem.push(b'\n');
                pem.extend(read(k)?);
            }
            let id = reqwest::Identity::from_pem(&pem).map_err(|e| RegistryError::Config {
                path: cert.clone(),
                reason: format!("not a PEM client certificate and key: {e}"),
            })?;
            b = b.identity(id);
        }
        let client = b
            .build()
            .map_err(|e| RegistryError::Client(error::error_chain(&e)))?;
        clients.insert(key, client.clone());
        Ok(client)
    }
}
