//! `shoal`: the operator's command-line tool.
//!
//! Conventions shared by every subcommand: `--address` (the Shoal daemon's
//! socket) for subcommands that talk to the daemon; `--containerd-address`
//! and `--namespace` for those that talk to containerd; `--json` for
//! machine-readable output.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use shoal::cache_cli::human;
use shoal::config::DEFAULT_ADDRESS;
use shoal_proto::status::status_client::StatusClient;
use shoal_proto::status::{LayersRequest, LayersResponse};

#[derive(Parser, Debug)]
#[command(
    name = "shoal",
    version,
    about = "Operate the Shoal lazy-pulling snapshotter",
    long_about = "Operate the Shoal lazy-pulling snapshotter.\n\nThe daemon itself is \
`shoal-snapshotter`; see `shoal-snapshotter --help` and docs/containerd.md."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Debug)]
struct DaemonArgs {
    /// The Shoal daemon's socket.
    #[arg(long, value_name = "SOCKET", env = "SHOAL_ADDRESS", default_value = DEFAULT_ADDRESS)]
    address: PathBuf,
}

#[derive(clap::Args, Debug)]
struct ContainerdArgs {
    /// containerd's socket.
    #[arg(long, value_name = "SOCKET", env = "CONTAINERD_ADDRESS",
          default_value = shoal::pull::DEFAULT_CONTAINERD_ADDRESS)]
    containerd_address: PathBuf,
    /// containerd namespace.
    #[arg(long, env = "CONTAINERD_NAMESPACE", default_value = shoal::pull::DEFAULT_NAMESPACE)]
    namespace: String,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the version of this build.
    Version,
    /// Show lazily mounted layers: bytes local out of total, and counters.
    Status {
        #[command(flatten)]
        daemon: DaemonArgs,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Run chunk-cache garbage collection now and show what was freed.
    Gc {
        #[command(flatten)]
        daemon: DaemonArgs,
        /// Only show what would be freed.
        #[arg(long)]
        dry_run: bool,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Pin an image reference or a layer digest: GC keeps its chunks.
    Pin {
        #[command(flatten)]
        daemon: DaemonArgs,
        /// Image reference (as pulled, e.g. 127.0.0.1:5000/app:1) or layer
        /// digest (sha256:...).
        target: String,
    },
    /// Remove a pin.
    Unpin {
        #[command(flatten)]
        daemon: DaemonArgs,
        /// As given to `shoal pin`.
        target: String,
    },
    /// Pull an image into containerd through Shoal, lazily where the layers
    /// allow (eStargz, zstd:chunked); other layers are unpacked normally.
    #[command(
        long_about = "Pull an image into containerd through Shoal, lazily where the \
layers allow (eStargz, zstd:chunked); other layers are unpacked normally.\n\n\
Adds the snapshot labels Shoal needs itself (as `ctr-remote image rpull` does), so it \
works without CRI. Afterwards: `ctr run --snapshotter shoal REF ID CMD`.\n\n\
Registries: the `[registry]` section of the daemon's config file (hosts.toml \
directory, credentials, timeouts, retries), as the daemon uses it; without the file, \
hosts.toml under /etc/containerd/certs.d and Docker's config.json credentials."
    )]
    Pull {
        #[command(flatten)]
        containerd: ContainerdArgs,
        /// The daemon's config file, for its `[registry]` section (a missing
        /// default file means defaults).
        #[arg(long, value_name = "FILE", env = "SHOAL_CONFIG", default_value = shoal::config::DEFAULT_CONFIG)]
        config: PathBuf,
        /// Snapshotter name in containerd's `proxy_plugins`.
        #[arg(long, default_value = shoal::pull::DEFAULT_SNAPSHOTTER)]
        snapshotter: String,
        /// Plain HTTP registry. Loopback registries fall back to plain HTTP
        /// by themselves; for other hosts, set `server = "http://..."` in
        /// their hosts.toml (this flag alone does not change them).
        #[arg(long)]
        plain_http: bool,
        /// Platform to pull from a multi-platform image (OS/ARCH[/VARIANT]);
        /// default: this host's.
        #[arg(long)]
        platform: Option<String>,
        /// Print a machine-readable summary on stdout (progress goes to stderr).
        #[arg(long)]
        json: bool,
        /// Image reference, e.g. 127.0.0.1:5000/app:1.
        reference: String,
    },
    /// Convert an image into Shoal's format: tar+zstd layers that any
    /// runtime can pull and that Shoal mounts lazily (docs/format.md).
    Convert(shoal::convert::cli::ConvertArgs),
    /// Convert an image, run it once through containerd and Shoal while the
    /// daemon records what it reads, and convert it again with that startup
    /// profile (docs/format.md).
    Optimize(shoal::convert::optimize::OptimizeArgs),
    /// Startup profiles recorded by the daemon (docs/format.md).
    #[command(subcommand)]
    Profile(shoal::convert::profile_cli::ProfileCommand),
    /// P2P cluster credentials: the cluster CA and node certificates for
    /// mTLS between peers (docs/p2p.md).
    #[command(subcommand)]
    Cluster(shoal::p2p::cli::ClusterCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Version => {
            println!("shoal {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        Command::Status { daemon, json } => status(&daemon, json),
        Command::Gc {
            daemon,
            dry_run,
            json,
        } => shoal::cache_cli::gc(&daemon.address, dry_run, json),
        Command::Pin { daemon, target } => shoal::cache_cli::pin(&daemon.address, &target, false),
        Command::Unpin { daemon, target } => shoal::cache_cli::pin(&daemon.address, &target, true),
        Command::Convert(args) => shoal::convert::cli::run(args),
        Command::Profile(cmd) => shoal::convert::profile_cli::run(cmd),
        Command::Cluster(cmd) => shoal::p2p::cli::run(cmd),
        Command::Optimize(args) => shoal::convert::optimize::run(args),
        Command::Pull {
            containerd,
            config,
            snapshotter,
            plain_http,
            platform,
            json,
            reference,
        } => pull(
            &containerd,
            &config,
            snapshotter,
            plain_http,
            platform,
            json,
            &reference,
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shoal: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start tokio runtime")
}

fn status(daemon: &DaemonArgs, json: bool) -> anyhow::Result<()> {
    let (resp, cache): (LayersResponse, _) = runtime()?.block_on(async {
        let channel = shoal::client::channel(&daemon.address)
            .await
            .with_context(|| {
                format!(
                    "connect to the Shoal daemon at {}",
                    daemon.address.display()
                )
            })?;
        let r = StatusClient::new(channel.clone())
            .layers(LayersRequest {})
            .await
            .context("status request")?;
        anyhow::Ok((r.into_inner(), shoal::cache_cli::usage(channel).await))
    })?;
    let pins = cache.as_ref().map(|u| u.pins.clone()).unwrap_or_default();
    let c = resp.counters.unwrap_or_default();
    if json {
        let layers: Vec<serde_json::Value> = resp
            .layers
            .iter()
            .map(|l| {
                serde_json::json!({
                    "snapshot": l.snapshot, "snapshot_id": l.snapshot_id,
                    "image_ref": l.image_ref, "layer_digest": l.layer_digest,
                    "toc_digest": l.toc_digest, "format": l.format, "files": l.files,
                    "chunks_total": l.chunks_total, "chunks_local": l.chunks_local,
                    "bytes_total": l.bytes_total, "bytes_local": l.bytes_local,
                    "served_from_cache": l.served_from_cache,
                    "served_after_fetch": l.served_after_fetch, "read_errors": l.read_errors,
                    "fetched_on_demand": l.fetched_on_demand,
                    "identity": l.identity, "identity_reason": l.identity_reason,
                    "hit_rate": shoal::cache_cli::layer_hit_rate(l),
                    "pinned": shoal::cache_cli::pinned(&pins, l),
                })
            })
            .collect();
        let out = serde_json::json!({
            "version": resp.version,
            "layers": layers,
            "counters": {
                "bytes_fetched": c.bytes_fetched, "requests": c.requests,
                "verify_failures": c.verify_failures, "source_errors": c.source_errors,
                "not_cached": c.not_cached, "in_flight": c.in_flight,
                "fallbacks": c.fallbacks, "mounted": c.mounted,
                "store_memory_hits": c.store_memory_hits, "store_disk_hits": c.store_disk_hits,
                "store_misses": c.store_misses, "store_corrupt": c.store_corrupt,
                "layers_verified": c.layers_verified, "layers_quarantined": c.layers_quarantined,
                "bytes_by_source": c.bytes_by_source.as_ref().map(|b| serde_json::json!({
                    "cache": b.cache, "primed": b.primed, "registry": b.registry, "peer": b.peer,
                })),
            },
            "images": shoal::cache_cli::images_json(&resp.layers, &pins),
            "cache": cache.as_ref().map(shoal::cache_cli::usage_json),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "shoal-snapshotter {} — {} lazily mounted layer(s)",
        resp.version,
        resp.layers.len()
    );
    if !resp.layers.is_empty() {
        println!(
            "{:<14} {:<14} {:<13} {:<11} {:>13} {:>26} {:>6}  IMAGE",
            "SNAPSHOT", "LAYER", "FORMAT", "IDENTITY", "CHUNKS", "BYTES LOCAL", "ERRORS"
        );
    }
    for l in &resp.layers {
        // Floor, so 100% means complete.
        let pct = (100 * l.bytes_local)
            .checked_div(l.bytes_total)
            .unwrap_or(100);
        println!(
            "{:<14} {:<14} {:<13} {:<11} {:>13} {:>26} {:>6}  {}",
            short(&l.snapshot),
            short(&l.layer_digest),
            l.format,
            l.identity,
            format!("{}/{}", l.chunks_local, l.chunks_total),
            format!(
                "{}/{} {:>3}%",
                human(l.bytes_local),
                human(l.bytes_total),
                pct
            ),
            l.read_errors,
            l.image_ref
        );
    }
    let by = c.bytes_by_source.unwrap_or_default();
    println!(
        "fetched {} in {} requests (primed window {}, registry {}, peers {}; {} read from the cache); \
         {} in flight; verification failures {}; source errors {}; \
         fallbacks to full pull {}; chunks not cached (disk) {}",
        human(c.bytes_fetched),
        c.requests,
        human(by.primed),
        human(by.registry),
        human(by.peer),
        human(by.cache),
        c.in_flight,
        c.verify_failures,
        c.source_errors,
        c.fallbacks,
        c.not_cached
    );
    for l in resp.layers.iter().filter(|l| l.identity == "quarantined") {
        println!("QUARANTINED {}: {}", l.snapshot, l.identity_reason);
    }
    if let Some(u) = &cache {
        shoal::cache_cli::print_text(&resp.layers, u);
    }
    Ok(())
}

/// The registry settings of the daemon's config file at `path`; defaults
/// when the default file is missing.
fn registry_config(path: &std::path::Path) -> anyhow::Result<shoal::registry::RegistryConfig> {
    let explicit = path != std::path::Path::new(shoal::config::DEFAULT_CONFIG);
    // The error names file, key and problem itself (its source repeats it).
    let config = shoal::config::Config::load(path, explicit).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(shoal::registry::RegistryConfig::from_section(
        &config.registry,
    ))
}

fn pull(
    containerd: &ContainerdArgs,
    config: &std::path::Path,
    snapshotter: String,
    plain_http: bool,
    platform: Option<String>,
    json: bool,
    reference: &str,
) -> anyhow::Result<()> {
    use shoal::pull::{Event, Platform, PullOptions};
    let platform = match platform {
        Some(p) => p.parse::<Platform>()?,
        None => Platform::host(),
    };
    if plain_http {
        // Not a switch of the registry client: see the flag's help.
        eprintln!(
            "shoal: note: --plain-http: loopback registries fall back to plain HTTP by \
             themselves; other hosts need `server = \"http://...\"` in their hosts.toml"
        );
    }
    let opts = PullOptions {
        containerd_address: containerd.containerd_address.clone(),
        namespace: containerd.namespace.clone(),
        snapshotter,
        platform,
        registry: registry_config(config)?,
    };
    // Progress on stdout, or on stderr when stdout carries the JSON.
    let say = |line: String| {
        if json {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    };
    let mut total = 0;
    let mut progress = |e: Event<'_>| match e {
        Event::Resolved {
            digest,
            manifest,
            layers,
            size,
        } => {
            total = layers;
            let m = if manifest == digest {
                String::new()
            } else {
                format!(", manifest {}", short(manifest))
            };
            say(format!(
                "resolved {reference} to {digest}{m}: {layers} layer(s), {}",
                human(size)
            ));
        }
        Event::Layer(l) => say(format!(
            "layer {}/{total} {}  {:<8} {:>9}  fetched {:>9}  {:.2}s",
            l.index + 1,
            short(&l.digest),
            l.outcome.as_str(),
            human(l.size),
            human(l.fetched),
            l.seconds
        )),
    };
    let summary = runtime()?
        .block_on(shoal::pull::pull(reference, &opts, &mut progress))
        .with_context(|| format!("pull {reference}"))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!(
            "pulled {} ({}) into {}: {} layer(s): {} lazy, {} unpacked, {} already present; \
             fetched {} in {:.2}s",
            summary.reference,
            summary.digest,
            summary.snapshotter,
            summary.layers.len(),
            summary.lazy,
            summary.unpacked,
            summary.present,
            human(summary.bytes_fetched),
            summary.seconds
        );
    }
    Ok(())
}

fn short(digest: &str) -> String {
    let d = digest.strip_prefix("sha256:").unwrap_or(digest);
    d.chars().take(12).collect()
}
