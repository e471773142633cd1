//! The daemon's configuration file (`/etc/shoal/config.toml` by default).
//!
//! Loading is read → size cap → parse → [`Config::validate`]. Every key has a
//! default (the `DEFAULT_*` constants, which docs/configuration.md quotes), so
//! an empty file is a valid config. Unknown keys are errors, so that a typo
//! is caught instead of silently ignored. Command-line flags override the
//! file.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The config format version this build reads.
pub const CONFIG_VERSION: u32 = 1;
/// Default `root`: snapshots, metadata and (later) the chunk cache.
pub const DEFAULT_ROOT: &str = "/var/lib/shoal";
/// Default `address`: the gRPC socket containerd's `proxy_plugins` dials.
pub const DEFAULT_ADDRESS: &str = "/run/shoal/shoal.sock";
/// Default config file; a missing default file means all defaults.
pub const DEFAULT_CONFIG: &str = "/etc/shoal/config.toml";
/// Default `log_level`.
pub const DEFAULT_LOG_LEVEL: &str = "info";
/// Default `remote.prefetch_timeout_secs`: how long Prepare waits for a
/// layer's startup (prefetch) set.
pub const DEFAULT_PREFETCH_TIMEOUT_SECS: u64 = 10;
/// Default `remote.fetch_ahead_bytes`: 64 KiB, a few small files' worth,
/// about 5 ms at 100 Mbit/s (measured against 128 KiB and off in
/// docs/format.md).
pub const DEFAULT_FETCH_AHEAD_BYTES: u64 = 64 << 10;
/// Default `remote.background_delay_secs`: seconds after a layer is mounted
/// before the rest of it streams in (the container's startup reads go first).
pub const DEFAULT_BACKGROUND_DELAY_SECS: u64 = 5;
/// Default `remote.source_credentials`: the node's credentials are not sent
/// to a host that an image's `shoal.source` annotation chose.
pub const DEFAULT_SOURCE_CREDENTIALS: bool = false;
/// Default `remote.fuse_threads`.
pub const DEFAULT_FUSE_THREADS: usize = 2;
/// Default `remote.memory_cache_bytes`: verified chunks kept in memory.
pub const DEFAULT_MEMORY_CACHE_BYTES: u64 = 256 << 20;
/// Default `remote.toc_max_entries`: entries in one layer's TOC (`chunk`
/// entries included). The largest layers seen in practice have a few
/// hundred thousand files; past this a layer is pulled normally.
pub const DEFAULT_TOC_MAX_ENTRIES: u64 = 1_000_000;
/// Default `remote.toc_max_compressed_bytes`: a compressed TOC larger than
/// this is not even fetched.
pub const DEFAULT_TOC_MAX_COMPRESSED_BYTES: u64 = 64 << 20;
/// Default `remote.toc_max_json_bytes`: uncompressed TOC JSON.
pub const DEFAULT_TOC_MAX_JSON_BYTES: u64 = 256 << 20;
/// Default `registry.config_path`: containerd's hosts.toml directory.
pub const DEFAULT_REGISTRY_CONFIG_PATH: &str = "/etc/containerd/certs.d";
/// Default `registry.request_timeout_secs`.
pub const DEFAULT_REQUEST_TIMEOUT_SECS: u64 = 30;
/// Default `registry.retries`.
pub const DEFAULT_RETRIES: u32 = 3;
/// Default `registry.max_concurrent`.
pub const DEFAULT_MAX_CONCURRENT: usize = 32;
/// Default `registry.max_concurrent_per_host`: below `max_concurrent`, so a
/// slow host leaves slots to the others.
pub const DEFAULT_MAX_CONCURRENT_PER_HOST: usize = 8;
/// Default `registry.max_concurrent_per_blob`: below the host's, so one
/// layer leaves slots to the other layers of its host.
pub const DEFAULT_MAX_CONCURRENT_PER_BLOB: usize = 4;
/// Default `registry.min_rate_bytes_per_sec`: 4 KiB/s, far below any working
/// link's share, far above a trickle.
pub const DEFAULT_MIN_RATE_BYTES_PER_SEC: u64 = 4 << 10;
/// Default `registry.min_rate_grace_secs`.
pub const DEFAULT_MIN_RATE_GRACE_SECS: u64 = 10;
/// Default `cri.containerd_cri_socket`: containerd serves CRI on its main
/// socket.
pub const DEFAULT_CRI_CONTAINERD_SOCKET: &str = "/run/containerd/containerd.sock";
/// Default `cri.credential_ttl_secs`: a pull's credentials are used for a
/// day after it (the next pull of the image refreshes them).
pub const DEFAULT_CRI_CREDENTIAL_TTL_SECS: u64 = 24 * 3600;
/// Default `[p2p] listen`: the peer service's TCP address.
pub const DEFAULT_P2P_LISTEN: &str = "0.0.0.0:7701";
/// Default `[p2p] tls_dir`: the node's CA, certificate and key.
pub const DEFAULT_P2P_TLS_DIR: &str = "/etc/shoal/p2p";
/// Default `[p2p] dns_interval_secs`: how often `dns` is re-resolved.
pub const DEFAULT_P2P_DNS_INTERVAL_SECS: u64 = 30;
/// Default `[p2p] max_registry_fallbacks`: concurrent registry fetches after
/// peers failed.
pub const DEFAULT_P2P_MAX_REGISTRY_FALLBACKS: usize = 4;

/// A config file larger than this is refused before parsing.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Format version; must be [`CONFIG_VERSION`].
    pub version: u32,
    /// State directory.
    pub root: PathBuf,
    /// gRPC socket path.
    pub address: PathBuf,
    /// Log filter: a level (`info`) or `tracing` directives
    /// (`info,shoal::grpc=debug`).
    pub log_level: String,
    /// Lazily pulled layers.
    pub remote: RemoteSection,
    /// Registry access for lazily pulled layers.
    pub registry: RegistrySection,
    /// The chunk cache's capacity and GC.
    pub cache: CacheSection,
    /// The Prometheus endpoint.
    pub metrics: MetricsSection,
    /// Startup profile recording.
    pub profile: ProfileSection,
    /// The CRI image-service proxy.
    pub cri: CriSection,
    /// Peer-to-peer chunk exchange (docs/p2p.md).
    pub p2p: P2pSection,
}

/// `[p2p]`: peer-to-peer chunk exchange between the nodes of a cluster.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct P2pSection {
    /// Serve the peer service (off by default).
    pub enabled: bool,
    /// `ip:port` the peer service listens on.
    pub listen: String,
    /// `host:port` other nodes reach this one at; unset: `listen` (which must
    /// then not be a wildcard address).
    pub advertise: Option<String>,
    /// Static `host:port` list of peers to bootstrap from.
    pub peers: Vec<String>,
    /// `name:port` resolving to peers (a headless Service), re-resolved
    /// every `dns_interval_secs`.
    pub dns: Option<String>,
    /// Seconds between resolutions of `dns`.
    pub dns_interval_secs: u64,
    /// Directory with `ca.pem`, `node.pem`, `node.key` (`shoal cluster
    /// issue-node`).
    pub tls_dir: PathBuf,
    /// Upload cap in bytes per second; 0: none.
    pub upload_bytes_per_sec: u64,
    /// Download cap in bytes per second; 0: none.
    pub download_bytes_per_sec: u64,
    /// Concurrent registry fetches after peers failed.
    pub max_registry_fallbacks: usize,
}

impl Default for P2pSection {
    fn default() -> Self {
        P2pSection {
            enabled: false,
            listen: DEFAULT_P2P_LISTEN.into(),
            advertise: None,
            peers: Vec::new(),
            dns: None,
            dns_interval_secs: DEFAULT_P2P_DNS_INTERVAL_SECS,
            tls_dir: DEFAULT_P2P_TLS_DIR.into(),
            upload_bytes_per_sec: 0,
            download_bytes_per_sec: 0,
            max_registry_fallbacks: DEFAULT_P2P_MAX_REGISTRY_FALLBACKS,
        }
    }
}

impl P2pSection {
    /// The address other nodes reach this one at.
    pub fn advertised(&self) -> &str {
        self.advertise.as_deref().unwrap_or(&self.listen)
    }

    fn validate(&self) -> Result<(), (&'static str, String)> {
        let listen: std::net::SocketAddr = self.listen.parse().map_err(|_| {
            (
                "p2p.listen",
                format!(
                    "{:?} is not an IP address and port, e.g. 0.0.0.0:7701",
                    self.listen
                ),
            )
        })?;
        if self.enabled && self.advertise.is_none() && listen.ip().is_unspecified() {
            return Err((
                "p2p.advertise",
                format!(
                    "must be set when listen is {} (a wildcard address)",
                    self.listen
                ),
            ));
        }
        let host_port = |a: &str| {
            a.rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
        };
        if let Some(a) = self.advertise.as_deref().filter(|a| !host_port(a)) {
            return Err(("p2p.advertise", format!("{a:?} is not host:port")));
        }
        if let Some(a) = self.peers.iter().find(|a| !host_port(a)) {
            return Err(("p2p.peers", format!("{a:?} is not host:port")));
        }
        if let Some(a) = self.dns.as_deref().filter(|a| !host_port(a)) {
            return Err(("p2p.dns", format!("{a:?} is not name:port")));
        }
        if self.dns_interval_secs == 0 {
            return Err(("p2p.dns_interval_secs", "must be at least 1".into()));
        }
        if self.max_registry_fallbacks == 0 {
            return Err(("p2p.max_registry_fallbacks", "must be at least 1".into()));
        }
        if !self.tls_dir.is_absolute() {
            return Err((
                "p2p.tls_dir",
                format!("{} is not an absolute path", self.tls_dir.display()),
            ));
        }
        Ok(())
    }
}

/// `[cri]`: the CRI image-service proxy (`crate::cri`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CriSection {
    /// Socket to serve `runtime.v1.ImageService` on; unset: off.
    pub image_service_socket: Option<PathBuf>,
    /// containerd's CRI socket, where every call is forwarded.
    pub containerd_cri_socket: PathBuf,
    /// How long a pull's credentials are used after it.
    pub credential_ttl_secs: u64,
}

impl Default for CriSection {
    fn default() -> Self {
        CriSection {
            image_service_socket: None,
            containerd_cri_socket: DEFAULT_CRI_CONTAINERD_SOCKET.into(),
            credential_ttl_secs: DEFAULT_CRI_CREDENTIAL_TTL_SECS,
        }
    }
}

/// `[remote]`: lazily pulled layers.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RemoteSection {
    /// Mount eStargz / zstd:chunked layers lazily; when false every layer is
    /// pulled and unpacked by containerd.
    pub enable: bool,
    /// Seconds a layer's prefetch set may take to fetch (and, with
    /// `wait_for_startup_set`, how long a container's Prepare waits for it).
    pub prefetch_timeout_secs: u64,
    /// A container's Prepare waits for the startup sets in flight. Off by
    /// default: the container starts at once, and a read of a chunk still
    /// on its way waits for that chunk alone (fetches stream chunk by chunk).
    pub wait_for_startup_set: bool,
    /// Fetch the rest of each layer in the background after mounting.
    pub background_fetch: bool,
    /// Seconds after mounting before the background fetch starts; it then
    /// runs only while on-demand reads are quiet.
    pub background_delay_secs: u64,
    /// FUSE worker threads per mounted layer.
    pub fuse_threads: usize,
    /// Bytes of verified chunks kept in memory.
    pub memory_cache_bytes: u64,
    /// Serve large files whose chunks are all local by kernel passthrough
    /// (Linux 6.9+): reads then go straight to a local file.
    pub passthrough: bool,
    /// A read that has to fetch also takes along up to this many compressed
    /// bytes of the chunks that follow in the blob (0: only its own).
    pub fetch_ahead_bytes: u64,
    /// Check each lazy layer's content against its chain ID (diffID) in one
    /// pass over the blob, after `background_delay_secs`; a mismatch
    /// quarantines the layer.
    pub verify_layers: bool,
    /// Registry hosts an image's `shoal.source` annotation may name (when
    /// no client label names the image's registry); `*` (the default): any
    /// host, never with the node's credentials; empty: none, and such
    /// layers are pulled normally.
    pub source_hosts: Vec<String>,
    /// Send the node's credentials to a host `shoal.source` chose.
    pub source_credentials: bool,
    /// Most entries in one layer's TOC; a larger TOC is refused (the layer
    /// is pulled normally).
    pub toc_max_entries: u64,
    /// Most bytes of one layer's compressed TOC.
    pub toc_max_compressed_bytes: u64,
    /// Most bytes of one layer's uncompressed TOC JSON.
    pub toc_max_json_bytes: u64,
}

impl RemoteSection {
    /// The TOC limits.
    pub fn toc_limits(&self) -> crate::remote::toc::TocLimits {
        crate::remote::toc::TocLimits {
            max_entries: self.toc_max_entries,
            max_compressed_bytes: self.toc_max_compressed_bytes,
            max_json_bytes: self.toc_max_json_bytes,
        }
    }

    fn validate(&self) -> Result<(), (&'static str, String)> {
        use crate::remote::toc::{MAX_TOC_COMPRESSED, MAX_TOC_JSON};
        if let Some(bad) = self.source_hosts.iter().find(|h| {
            h.is_empty()
                || (h.as_str() != "*")
                    && !h
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || ".-:[]".contains(c))
        }) {
            return Err((
                "remote.source_hosts",
                format!("{bad:?} is not a host[:port] (no scheme, no path) or *"),
            ));
        }
        if self.toc_max_entries == 0 {
            return Err(("remote.toc_max_entries", "must be at least 1".into()));
        }
        if !(1..=MAX_TOC_COMPRESSED).contains(&self.toc_max_compressed_bytes) {
            return Err((
                "remote.toc_max_compressed_bytes",
                format!("must be 1 to {MAX_TOC_COMPRESSED}"),
            ));
        }
        if !(1..=MAX_TOC_JSON).contains(&self.toc_max_json_bytes) {
            return Err((
                "remote.toc_max_json_bytes",
                format!("must be 1 to {MAX_TOC_JSON}"),
            ));
        }
        Ok(())
    }
}

impl Default for RemoteSection {
    fn default() -> Self {
        RemoteSection {
            enable: true,
            prefetch_timeout_secs: DEFAULT_PREFETCH_TIMEOUT_SECS,
            wait_for_startup_set: false,
            background_fetch: true,
            background_delay_secs: DEFAULT_BACKGROUND_DELAY_SECS,
            fuse_threads: DEFAULT_FUSE_THREADS,
            memory_cache_bytes: DEFAULT_MEMORY_CACHE_BYTES,
            passthrough: true,
            fetch_ahead_bytes: DEFAULT_FETCH_AHEAD_BYTES,
            verify_layers: true,
            source_hosts: vec!["*".to_owned()],
            source_credentials: DEFAULT_SOURCE_CREDENTIALS,
            toc_max_entries: DEFAULT_TOC_MAX_ENTRIES,
            toc_max_compressed_bytes: DEFAULT_TOC_MAX_COMPRESSED_BYTES,
            toc_max_json_bytes: DEFAULT_TOC_MAX_JSON_BYTES,
        }
    }
}

/// `[registry]`: how registries are reached.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistrySection {
    /// containerd-style `hosts.toml` directory (`HOST[:PORT]/hosts.toml`).
    pub config_path: PathBuf,
    /// Seconds before one request is abandoned (and retried).
    pub request_timeout_secs: u64,
    /// Retries of a failed request, with backoff and jitter.
    pub retries: u32,
    /// Concurrent registry requests, for the whole daemon.
    pub max_concurrent: usize,
    /// Concurrent requests to one registry host (or mirror).
    pub max_concurrent_per_host: usize,
    /// Concurrent requests for one blob (layer) on one host.
    pub max_concurrent_per_blob: usize,
    /// Bytes/s a response body must average after `min_rate_grace_secs`
    /// (0: no floor).
    pub min_rate_bytes_per_sec: u64,
    /// Seconds a response body may take before the rate floor applies.
    pub min_rate_grace_secs: u64,
    /// Docker config file with credentials; unset means
    /// `$DOCKER_CONFIG/config.json` or `~/.docker/config.json`.
    pub docker_config: Option<PathBuf>,
    /// Kubernetes-style docker config files (a mounted `dockerconfigjson`
    /// Secret: the file or its directory; or a legacy `.dockercfg`), read
    /// after `docker_config`, in order.
    pub docker_config_files: Vec<PathBuf>,
    /// Credentials, tried before the docker config.
    pub credentials: Vec<CredentialSection>,
}

impl Default for RegistrySection {
    fn default() -> Self {
        RegistrySection {
            config_path: DEFAULT_REGISTRY_CONFIG_PATH.into(),
            request_timeout_secs: DEFAULT_REQUEST_TIMEOUT_SECS,
            retries: DEFAULT_RETRIES,
            max_concurrent: DEFAULT_MAX_CONCURRENT,
            max_concurrent_per_host: DEFAULT_MAX_CONCURRENT_PER_HOST,
            max_concurrent_per_blob: DEFAULT_MAX_CONCURRENT_PER_BLOB,
            min_rate_bytes_per_sec: DEFAULT_MIN_RATE_BYTES_PER_SEC,
            min_rate_grace_secs: DEFAULT_MIN_RATE_GRACE_SECS,
            docker_config: None,
            docker_config_files: Vec::new(),
            credentials: Vec::new(),
        }
    }
}

/// `[[registry.credentials]]`: one registry's credentials.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialSection {
    /// `host[:port]` as in image references (`docker.io`, `127.0.0.1:5000`).
    pub host: String,
    /// User name (with `password`).
    #[serde(default)]
    pub username: String,
    /// Password.
    #[serde(default)]
    pub password: String,
    /// Identity (refresh) token, instead of a password.
    #[serde(default)]
    pub identity_token: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            version: CONFIG_VERSION,
            root: DEFAULT_ROOT.into(),
            address: DEFAULT_ADDRESS.into(),
            log_level: DEFAULT_LOG_LEVEL.into(),
            remote: RemoteSection::default(),
            registry: RegistrySection::default(),
            cache: CacheSection::default(),
            metrics: MetricsSection::default(),
            profile: ProfileSection::default(),
            cri: CriSection::default(),
            p2p: P2pSection::default(),
        }
    }
}

/// `[cache]`: capacity and garbage collection of the chunk store
/// (`ROOT/chunks`); defaults in [`crate::remote::gc`].
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheSection {
    /// Most bytes the chunk store may hold (0: no limit).
    pub max_bytes: u64,
    /// GC starts when usage passes this percentage of `max_bytes`.
    pub high_watermark_percent: u8,
    /// GC evicts down to this percentage of `max_bytes`.
    pub low_watermark_percent: u8,
    /// Seconds a chunk that no mounted layer references is kept after its
    /// last access.
    pub unreferenced_ttl_secs: u64,
    /// Seconds between periodic GC runs.
    pub gc_interval_secs: u64,
    /// Percentage of `max_bytes` that chunks of layers whose registry
    /// cannot be reached may keep out of GC's reach.
    pub unfetchable_max_percent: u8,
}

impl Default for CacheSection {
    fn default() -> Self {
        use crate::remote::gc::*;
        CacheSection {
            max_bytes: DEFAULT_MAX_BYTES,
            high_watermark_percent: DEFAULT_HIGH_WATERMARK_PERCENT,
            low_watermark_percent: DEFAULT_LOW_WATERMARK_PERCENT,
            unreferenced_ttl_secs: DEFAULT_UNREFERENCED_TTL_SECS,
            gc_interval_secs: DEFAULT_GC_INTERVAL_SECS,
            unfetchable_max_percent: DEFAULT_UNFETCHABLE_MAX_PERCENT,
        }
    }
}

impl CacheSection {
    fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.high_watermark_percent == 0 || self.high_watermark_percent > 100 {
            return Err(("cache.high_watermark_percent", "must be 1 to 100".into()));
        }
        if self.low_watermark_percent >= self.high_watermark_percent {
            return Err((
                "cache.low_watermark_percent",
                "must be below cache.high_watermark_percent".into(),
            ));
        }
        if self.gc_interval_secs == 0 {
            return Err(("cache.gc_interval_secs", "must be at least 1".into()));
        }
        if self.unfetchable_max_percent > 100 {
            return Err(("cache.unfetchable_max_percent", "must be 0 to 100".into()));
        }
        Ok(())
    }
}

/// `[profile]`: how long mounted layers record their first reads (the
/// startup profile; see [`crate::remote::recorder`]).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProfileSection {
    /// Longest recording, in seconds after a layer is mounted (0: none).
    pub window_secs: u64,
    /// Recording ends once no file was first-read for this many seconds
    /// after the container started reading (0: only the window ends it).
    pub idle_secs: u64,
}

impl Default for ProfileSection {
    fn default() -> Self {
        use crate::remote::recorder::*;
        ProfileSection {
            window_secs: DEFAULT_PROFILE_WINDOW_SECS,
            idle_secs: DEFAULT_PROFILE_IDLE_SECS,
        }
    }
}

impl ProfileSection {
    /// The recording settings.
    pub fn recording(&self) -> crate::remote::recorder::Recording {
        crate::remote::recorder::Recording {
            window: std::time::Duration::from_secs(self.window_secs),
            idle: (self.idle_secs > 0).then(|| std::time::Duration::from_secs(self.idle_secs)),
        }
    }
}

/// `[metrics]`: the Prometheus `/metrics` endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsSection {
    /// `host:port` to serve `/metrics` on over plain HTTP; unset: off.
    pub address: Option<String>,
}

/// Why a config file was refused. Each message names the file, and where it
/// can, the key and the problem.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: cannot read config file: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is larger than [`MAX_CONFIG_BYTES`].
    #[error("{path}: config file is larger than {MAX_CONFIG_BYTES} bytes")]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// The file is not valid TOML for this schema.
    #[error("{path}: key `{key}`: {problem}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Dotted path of the offending key (`.` for the whole document).
        key: String,
        /// What is wrong, with the line and column.
        problem: String,
    },
    /// A value parsed but is not acceptable.
    #[error("{path}: key `{key}`: {problem}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The offending key.
        key: &'static str,
        /// What is wrong.
        problem: String,
    },
}

impl Config {
    /// Loads `path`. When `explicit` is false (the default path was used) a
    /// missing file means all defaults; when true it is an error.
    ///
    /// # Errors
    /// See [`ConfigError`].
    pub fn load(path: &Path, explicit: bool) -> Result<Config, ConfigError> {
        let read_err = |source| ConfigError::Read {
            path: path.to_owned(),
            source,
        };
        let file = match fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                return Ok(Config::default())
            }
            Err(e) => return Err(read_err(e)),
        };
        let mut text = String::new();
        file.take(MAX_CONFIG_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(read_err)?;
        if text.len() as u64 > MAX_CONFIG_BYTES {
            return Err(ConfigError::TooLarge {
                path: path.to_owned(),
            });
        }
        let config = Config::parse(&text).map_err(|(key, problem)| ConfigError::Parse {
            path: path.to_owned(),
            key,
            problem,
        })?;
        config
            .validate()
            .map_err(|(key, problem)| ConfigError::Invalid {
                path: path.to_owned(),
                key,
                problem,
            })?;
        Ok(config)
    }

    /// Parses TOML text (no validation; [`Config::load`] also runs
    /// [`Config::validate`]). Public for the fuzz targets.
    ///
    /// # Errors
    /// `(key, problem)`: the dotted key and what is wrong with it.
    pub fn parse(text: &str) -> Result<Config, (String, String)> {
        let de = toml::de::Deserializer::parse(text)
            .map_err(|e| (".".to_owned(), one_line(&e.to_string())))?;
        serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            (key, one_line(&e.into_inner().to_string()))
        })
    }

    /// Checks values that parse but make no sense.
    ///
    /// # Errors
    /// `(key, problem)` for the first bad value.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.version != CONFIG_VERSION {
            return Err((
                "version",
                format!(
                    "unsupported version {}; this build reads version {CONFIG_VERSION}",
                    self.version
                ),
            ));
        }
        for (key, p) in [("root", &self.root), ("address", &self.address)] {
            if !p.is_absolute() {
                return Err((key, format!("{} is not an absolute path", p.display())));
            }
        }
        if let Some(p) = &self.cri.image_service_socket {
            if !p.is_absolute() || *p == self.address {
                return Err((
                    "cri.image_service_socket",
                    format!(
                        "{} must be an absolute path other than `address`",
                        p.display()
                    ),
                ));
            }
        }
        if self.cri.credential_ttl_secs == 0 {
            return Err(("cri.credential_ttl_secs", "must be at least 1".into()));
        }
        if self.remote.fuse_threads == 0 {
            return Err(("remote.fuse_threads", "must be at least 1".into()));
        }
        self.remote.validate()?;
        self.cache.validate()?;
        self.p2p.validate()?;
        if let Some(a) = &self.metrics.address {
            if a.parse::<std::net::SocketAddr>().is_err() {
                return Err((
                    "metrics.address",
                    format!("{a:?} is not an IP address and port, e.g. 127.0.0.1:9464"),
                ));
            }
        }
        for (key, n) in [
            ("registry.max_concurrent", self.registry.max_concurrent),
            (
                "registry.max_concurrent_per_host",
                self.registry.max_concurrent_per_host,
            ),
            (
                "registry.max_concurrent_per_blob",
                self.registry.max_concurrent_per_blob,
            ),
        ] {
            if n == 0 {
                return Err((key, "must be at least 1".into()));
            }
        }
        if self.registry.request_timeout_secs == 0 {
            return Err(("registry.request_timeout_secs", "must be at least 1".into()));
        }
        // EnvFilter reads an unknown bare word ("debgu") as a target name and
        // silently logs nothing; only levels may stand alone here.
        const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
        if let Some(bad) = self.log_level.split(',').map(str::trim).find(|d| {
            !d.is_empty() && !d.contains('=') && !LEVELS.contains(&d.to_ascii_lowercase().as_str())
        }) {
            return Err((
                "log_level",
                format!(
                    "{bad:?} is not a level (trace, debug, info, warn, error, off) or TARGET=LEVEL"
                ),
            ));
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log_level) {
            return Err((
                "log_level",
                format!("{:?} is not a log level or filter: {e}", self.log_level),
            ));
        }
        Ok(())
    }
}

/// toml's messages span several lines (with a source excerpt); keep the
/// location and the problem on one line for logs and the terminal.
fn one_line(msg: &str) -> String {
    msg.lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty()
                && !l.starts_with('|')
                && !l.chars().next().is_some_and(|c| c.is_ascii_digit())
        })
        .collect::<Vec<_>>()
        .join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_text(text: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.toml");
        fs::write(&p, text).unwrap();
        Config::load(&p, true)
    }

    #[test]
    fn empty_file_is_all_defaults() {
        assert_eq!(load_text("").unwrap(), Config::default());
    }

    #[test]
    fn missing_default_file_is_defaults_but_missing_explicit_file_is_an_error() {
        let p = Path::new("/nonexistent/shoal/config.toml");
        assert_eq!(Config::load(p, false).unwrap(), Config::default());
        assert!(matches!(
            Config::load(p, true),
            Err(ConfigError::Read { .. })
        ));
    }

    #[test]
    fn errors_name_the_key_and_problem() {
        let e = load_text("version = 1\nlog_level = 3\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("key `log_level`") && e.contains("invalid type"),
            "{e}"
        );
        let e = load_text("roots = \"/x\"\n").unwrap_err().to_string();
        assert!(e.contains("unknown field `roots`"), "{e}");
        let e = load_text("version = 7\n").unwrap_err().to_string();
        assert!(
            e.contains("key `version`") && e.contains("unsupported version 7"),
            "{e}"
        );
        let e = load_text("root = \"relative\"\n").unwrap_err().to_string();
        assert!(e.contains("key `root`"), "{e}");
        let e = load_text("root = [\n").unwrap_err().to_string();
        assert!(e.contains("config.toml"), "{e}");
        let e = load_text("log_level = \"debgu\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("key `log_level`") && e.contains("debgu"), "{e}");
        assert!(load_text("log_level = \"info,shoal::grpc=debug\"\n").is_ok());
        let e = load_text("log_level = \"info,[\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("key `log_level`"), "{e}");
    }

    #[test]
    fn p2p_section() {
        assert!(!Config::default().p2p.enabled);
        let c = load_text("[p2p]\nenabled = true\nlisten = \"10.0.0.1:7701\"\n").unwrap();
        assert!(c.p2p.enabled);
        assert_eq!(c.p2p.advertised(), "10.0.0.1:7701");
        assert_eq!(c.p2p.tls_dir, Path::new(DEFAULT_P2P_TLS_DIR));
        let e = load_text("[p2p]\nenabled = true\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("key `p2p.advertise`"), "{e}");
        let e = load_text("[p2p]\npeers = [\"nocolon\"]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("key `p2p.peers`"), "{e}");
        let e = load_text("[p2p]\nlisten = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("key `p2p.listen`"), "{e}");
    }

    #[test]
    fn cache_and_metrics_sections() {
        let c = load_text(
            "[cache]\nmax_bytes = 1000\nhigh_watermark_percent = 80\nlow_watermark_percent = 60\n\
             unreferenced_ttl_secs = 5\ngc_interval_secs = 7\n[metrics]\naddress = \"127.0.0.1:9464\"\n",
        )
        .unwrap();
        assert_eq!(c.cache.max_bytes, 1000);
        assert_eq!(c.metrics.address.as_deref(), Some("127.0.0.1:9464"));
        assert!(
            Config::default().metrics.address.is_none(),
            "metrics are off by default"
        );
        let e = load_text("[cache]\nlow_watermark_percent = 95\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("key `cache.low_watermark_percent`"), "{e}");
        let e = load_text("[metrics]\naddress = \"localhost\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("key `metrics.address`"), "{e}");
    }

    #[test]
    fn profile_section() {
        use std::time::Duration;
        let d = Config::default().profile.recording();
        assert_eq!(d.window, Duration::from_secs(30));
        assert_eq!(d.idle, Some(Duration::from_secs(10)));
        let c = load_text("[profile]\nwindow_secs = 60\nidle_secs = 0\n").unwrap();
        let r = c.profile.recording();
        assert_eq!((r.window, r.idle), (Duration::from_secs(60), None));
        let e = load_text("[profile]\nwindow = 5\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `window`"), "{e}");
    }
}
