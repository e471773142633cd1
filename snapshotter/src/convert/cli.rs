//! The `shoal convert` subcommand: arguments, output, exit status.

use std::path::PathBuf;

use anyhow::Context;

use super::{convert, progress::Progress, Layout, Location, Options, Summary};

/// `shoal convert` arguments.
#[derive(clap::Args, Debug)]
pub struct ConvertArgs {
    /// Overwrite the destination tag if it exists.
    #[arg(long)]
    pub force: bool,
    /// Largest chunk of file content, in bytes (a power of two between
    /// 64 KiB and 16 MiB).
    #[arg(long, default_value_t = super::DEFAULT_CHUNK_SIZE)]
    pub chunk_size: usize,
    /// zstd compression level (1-19).
    #[arg(long, default_value_t = super::DEFAULT_LEVEL)]
    pub level: i32,
    /// Directory for staging blobs (default: the system temp directory).
    /// Needs room for one source layer plus the converted image.
    #[arg(long, value_name = "DIR")]
    pub work_dir: Option<PathBuf>,
    /// Repository (`HOST/PATH`) to record in the layers' shoal.source
    /// annotation, where Shoal fetches lazily from; default: the
    /// destination's repository (none for an OCI layout destination).
    #[arg(long, value_name = "HOST/PATH")]
    pub source_repository: Option<String>,
    /// Startup profile (JSON, see docs/format.md): its files go first in
    /// each layer, marked for Shoal to fetch first on mount.
    #[arg(long, value_name = "FILE")]
    pub profile: Option<PathBuf>,
    /// containerd-style `hosts.toml` directory for registries.
    #[arg(long, value_name = "DIR", default_value = crate::registry::DEFAULT_CONFIG_PATH)]
    pub hosts_dir: PathBuf,
    /// No progress on stderr.
    #[arg(long, short)]
    pub quiet: bool,
    /// Print a machine-readable summary on stdout.
    #[arg(long)]
    pub json: bool,
    /// Source: an image reference, or oci:DIR[:TAG].
    pub src: String,
    /// Destination: an image reference, or oci:DIR[:TAG].
    pub dst: String,
}

/// Runs `shoal convert`.
///
/// # Errors
/// Bad arguments or a failed conversion (nothing was tagged).
pub fn run(a: ConvertArgs) -> anyhow::Result<()> {
    if !(a.chunk_size.is_power_of_two() && (64 << 10..=16 << 20).contains(&a.chunk_size)) {
        anyhow::bail!("--chunk-size must be a power of two between 65536 and 16777216");
    }
    if !(1..=19).contains(&a.level) {
        anyhow::bail!("--level must be between 1 and 19");
    }
    let profile = match &a.profile {
        Some(p) => Some(super::profile::Profile::load(p).map_err(anyhow::Error::msg)?),
        None => None,
    };
    let src: Location = a.src.parse().map_err(anyhow::Error::msg)?;
    let dst: Location = a.dst.parse().map_err(anyhow::Error::msg)?;
    let opts = Options {
        src,
        dst,
        force: a.force,
        layout: Layout {
            chunk_size: a.chunk_size,
            level: a.level,
        },
        work_dir: a.work_dir,
        source_repository: a.source_repository,
        profile,
        untagged: false,
    };
    let registry = crate::registry::Registry::new(crate::registry::RegistryConfig {
        config_path: a.hosts_dir.clone(),
        ..Default::default()
    })
    .context("registry client")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("start tokio runtime")?;
    let progress = Progress::new(a.quiet);
    let summary: Summary = rt.block_on(convert(registry, &opts, &progress))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        let layers: usize = summary.manifests.iter().map(|m| m.layers.len()).sum();
        println!(
            "{} -> {} {} ({} manifest(s), {} layer(s), {:.1}s)",
            summary.source,
            summary.destination,
            summary.digest,
            summary.manifests.len(),
            layers,
            summary.seconds
        );
    }
    Ok(())
}
