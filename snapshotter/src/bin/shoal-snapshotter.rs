//! `shoal-snapshotter`: the node daemon containerd talks to through
//! `[proxy_plugins.shoal]`.

use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use shoal::config::{Config, DEFAULT_ADDRESS, DEFAULT_CONFIG, DEFAULT_LOG_LEVEL, DEFAULT_ROOT};
use shoal::cri::CredentialStore;
use shoal::handover::FdStore;
use shoal::overlay::Snapshotter;
use shoal::registry::{Registry, RegistryConfig};
use shoal::remote::fetch::registry::RegistryBlobs;
use shoal::remote::fetch::Fetcher;
use shoal::remote::gc::CacheConfig;
use shoal::remote::layers::{RemoteConfig, RemoteLayers};
use shoal::remote::store::ChunkStore;
use shoal::server;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

/// Exit status for a bad config file or bad flags.
const EXIT_USAGE: u8 = 2;

#[derive(Parser, Debug)]
#[command(
    name = "shoal-snapshotter",
    version,
    about = "Shoal containerd snapshotter daemon (gRPC proxy plugin)",
    long_about = "Serves containerd's snapshots API on a Unix socket. Register it in \
containerd's config.toml:\n\n  [proxy_plugins.shoal]\n    type = \"snapshot\"\n    \
address = \"/run/shoal/shoal.sock\"\n\nFlags override the config file."
)]
struct Args {
    /// State directory: metadata and snapshot layers [default: /var/lib/shoal]
    #[arg(long, value_name = "DIR")]
    root: Option<PathBuf>,
    /// Unix socket to serve gRPC on [default: /run/shoal/shoal.sock]
    #[arg(long, value_name = "SOCKET")]
    address: Option<PathBuf>,
    /// Config file; a missing default file means defaults, a missing named
    /// file is an error [default: /etc/shoal/config.toml]
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Log level or tracing filter, e.g. `debug` or `info,shoal::grpc=debug`
    /// [default: info]
    #[arg(long, value_name = "LEVEL")]
    log_level: Option<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let explicit = args.config.is_some();
    let path = args.config.unwrap_or_else(|| DEFAULT_CONFIG.into());
    let mut config = match Config::load(&path, explicit) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("shoal-snapshotter: invalid configuration: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    config.root = args.root.unwrap_or(config.root);
    config.address = args.address.unwrap_or(config.address);
    config.log_level = args.log_level.unwrap_or(config.log_level);
    if let Err((key, problem)) = config.validate() {
        eprintln!(
            "shoal-snapshotter: invalid --{}: {problem}",
            key.replace('_', "-")
        );
        return ExitCode::from(EXIT_USAGE);
    }
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_LEVEL));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    debug_assert_eq!(DEFAULT_ROOT, Config::default().root.to_str().unwrap());
    debug_assert_eq!(DEFAULT_ADDRESS, Config::default().address.to_str().unwrap());

    // A registry setup error (e.g. an unreadable docker config) is a
    // configuration error: exit 2, which the systemd unit does not restart.
    let registry = if config.remote.enable {
        match Registry::new(RegistryConfig::from_section(&config.registry)) {
            Ok(r) => Some(r),
            Err(e) => {
                error!("invalid configuration: [registry]: {e}");
                return ExitCode::from(EXIT_USAGE);
            }
        }
    } else {
        None
    };

    match run(config, registry) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The remote-layer machinery: chunk store, fetcher, registry client. Touches
/// no network: the daemon must start while registries are unreachable.
fn remote_layers(
    config: &Config,
    registry: Registry,
) -> anyhow::Result<(RemoteLayers, Arc<ChunkStore>)> {
    let chunks = config.root.join("chunks");
    let store = ChunkStore::open(&chunks, config.remote.memory_cache_bytes)
        .with_context(|| format!("open chunk store {}", chunks.display()))?;
    let store = Arc::new(store);
    let cfg = RemoteConfig {
        prefetch_timeout: std::time::Duration::from_secs(config.remote.prefetch_timeout_secs),
        wait_for_startup: config.remote.wait_for_startup_set,
        background_fetch: config.remote.background_fetch,
        background_delay: std::time::Duration::from_secs(config.remote.background_delay_secs),
        fuse_threads: config.remote.fuse_threads,
        passthrough: config.remote.passthrough,
        fetch_ahead_bytes: config.remote.fetch_ahead_bytes,
        verify_layers: config.remote.verify_layers,
        source: shoal::remote::annotations::SourcePolicy {
            hosts: config.remote.source_hosts.clone(),
            credentials: config.remote.source_credentials,
        },
        toc_limits: config.remote.toc_limits(),
    };
    let tocs = config.root.join("tocs");
    let layers = RemoteLayers::new(
        tocs.clone(),
        Arc::new(RegistryBlobs::new(registry)),
        Arc::new(Fetcher::new(store.clone())),
        tokio::runtime::Handle::current(),
        cfg,
    )
    .with_context(|| format!("create {}", tocs.display()))?
    .with_recording(config.profile.recording());
    let c = &config.cache;
    layers.cache().configure(CacheConfig {
        limits: CacheConfig::limits(
            c.max_bytes,
            c.high_watermark_percent,
            c.low_watermark_percent,
        ),
        ttl_secs: c.unreferenced_ttl_secs,
        interval: std::time::Duration::from_secs(c.gc_interval_secs),
        unfetchable_max_bytes: CacheConfig::unfetchable_cap(c.max_bytes, c.unfetchable_max_percent),
    });
    // Without a store the daemon still works, but a restart breaks the
    // readers of lazy layers, as it would without this feature.
    match FdStore::open(&config.root) {
        Ok((fds, kept)) => Ok((layers.with_fd_store(fds, kept), store)),
        Err(e) => {
            warn!(error = %e, "no fd store: lazy layers will not survive a restart of this daemon");
            Ok((layers, store))
        }
    }
}

fn run(config: Config, registry: Option<Registry>) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("shoal")
        .build()
        .context("start tokio runtime")?;
    rt.block_on(async move {
        let mut sigint = signal(SignalKind::interrupt()).context("install SIGINT handler")?;
        let mut sigterm = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
        // The root is private: it holds image data and the metadata store.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&config.root)
            .with_context(|| format!("create {}", config.root.display()))?;
        // The CRI proxy's credential store: the registry client looks up an
        // image's own credentials in it before the node's.
        let cri = match &config.cri.image_service_socket {
            Some(socket) => {
                let dir = config.root.join("cri");
                let ttl = std::time::Duration::from_secs(config.cri.credential_ttl_secs);
                let store = tokio::task::spawn_blocking(move || CredentialStore::open(&dir, ttl))
                    .await?
                    .context("open the CRI credential store")?;
                Some((socket.clone(), Arc::new(store)))
            }
            None => None,
        };
        let registry = registry.map(|r| match &cri {
            Some((_, store)) => r.with_scoped(store.clone()),
            None => r,
        });
        let (remote, chunks) = if let Some(registry) = registry {
            let (layers, chunks) = remote_layers(&config, registry)?;
            (Some(layers), Some(chunks))
        } else {
            info!("remote layers disabled: every layer is pulled and unpacked by containerd");
            (None, None)
        };
        let root = config.root.clone();
        let sn = tokio::task::spawn_blocking(move || Snapshotter::open_with_remote(&root, remote))
            .await?
            .with_context(|| format!("open snapshotter root {}", config.root.display()))?;
        let listener = server::bind(&config.address)?;
        let sn = Arc::new(sn);
        // Only now may layers whose TOC is not kept reach the network: the
        // daemon serves even while the registry is down.
        sn.remount_waiting();
        if let Some(addr) = &config.metrics.address {
            // validate() checked that it parses.
            shoal::metrics::serve(addr.parse()?, sn.clone()).await?;
        }
        info!(
            version = env!("CARGO_PKG_VERSION"),
            root = %config.root.display(),
            address = %config.address.display(),
            "shoal-snapshotter serving"
        );
        // Tell systemd (Type=notify) we are ready; a no-op elsewhere.
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let p2p = match (&config.p2p.enabled, chunks) {
            (true, Some(chunks)) => {
                let mut stop = stop_rx.clone();
                let stopped = async move {
                    let _ = stop.wait_for(|s| *s).await;
                };
                Some(shoal::p2p::node::start_daemon(&config.p2p, chunks, stopped).await?)
            }
            (true, None) => {
                warn!("[p2p] enabled but remote layers are off: no chunks to share");
                None
            }
            _ => None,
        };
        let proxy = match cri {
            Some((socket, store)) => {
                let listener = server::bind(&socket)?;
                let upstream = config.cri.containerd_cri_socket.clone();
                // The kubelet stats it: absolute, as the daemon sees it.
                let image_fs = std::fs::canonicalize(&config.root).unwrap_or(config.root.clone());
                let mut stop = stop_rx.clone();
                Some(tokio::spawn(async move {
                    let stopped = async move {
                        let _ = stop.wait_for(|s| *s).await;
                    };
                    shoal::cri::serve(listener, &socket, &upstream, store, &image_fs, stopped).await
                }))
            }
            None => None,
        };
        let shutdown = async move {
            tokio::select! {
                _ = sigint.recv() => info!("SIGINT: shutting down"),
                _ = sigterm.recv() => info!("SIGTERM: shutting down"),
            }
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
            let _ = stop_tx.send(true);
        };
        server::serve(sn.clone(), listener, &config.address, shutdown).await?;
        if let Some(proxy) = proxy {
            proxy.await??;
        }
        if let Some(p2p) = p2p {
            let _ = p2p.task.await;
        }
        // Leave lazy layers mounted for the next daemon, and exit without
        // dropping anything: a dropped pending read would answer EIO, while
        // an unanswered one is resent to the next daemon.
        if sn.remote().is_some_and(|r| r.hand_over()) {
            std::process::exit(0);
        }
        Ok(())
    })
}
