//! The `shoal profile show` subcommand: an image's startup profile from the
//! first reads the daemon recorded on its lazily mounted layers.

use std::path::PathBuf;

use anyhow::Context;
use serde_json::Value;
use shoal_proto::profile::profiles_client::ProfilesClient;
use shoal_proto::profile::{FirstRead, FirstReadsRequest};

use super::profile::Profile;
use crate::registry::{Reference, Registry, RegistryConfig};

/// `shoal profile` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum ProfileCommand {
    /// Show the startup profile recorded for IMAGE: the files its containers
    /// first read (across all its layers, in first-read order) during the
    /// recording window after the layers were mounted.
    Show(ShowArgs),
}

/// `shoal profile show` arguments.
#[derive(clap::Args, Debug)]
pub struct ShowArgs {
    /// The Shoal daemon's socket.
    #[arg(long, value_name = "SOCKET", env = "SHOAL_ADDRESS", default_value = crate::config::DEFAULT_ADDRESS)]
    pub address: PathBuf,
    /// Write the profile (JSON, for `shoal convert --profile`) to FILE.
    #[arg(long, short, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Print the profile as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// containerd-style `hosts.toml` directory for registries.
    #[arg(long, value_name = "DIR", default_value = crate::registry::DEFAULT_CONFIG_PATH)]
    pub hosts_dir: PathBuf,
    /// Image reference whose layers Shoal has mounted lazily.
    pub image: String,
}

/// The profile recorded for `image`: its layers' first reads from the
/// daemon at `address`, merged image-wide in first-read order (a path read in
/// several layers counts once). Also returns the reads shown and the number
/// of the image's layers.
///
/// # Errors
/// The image cannot be resolved or the daemon cannot be asked.
pub async fn recorded(
    address: &std::path::Path,
    image: &str,
    registry: &RegistryConfig,
) -> anyhow::Result<(Profile, Vec<FirstRead>, usize)> {
    let layers = image_layers(image, registry).await?;
    let channel = crate::client::channel(address)
        .await
        .with_context(|| format!("connect to the Shoal daemon at {}", address.display()))?;
    let mut reads = ProfilesClient::new(channel)
        .first_reads(FirstReadsRequest {
            layer_digests: layers.clone(),
        })
        .await
        .context("profile request")?
        .into_inner()
        .reads;
    reads.sort_by_key(|r| r.ms);
    let mut seen = std::collections::HashSet::new();
    reads.retain(|r| seen.insert(r.path.clone()));
    let profile = Profile {
        version: 1,
        image: image.to_string(),
        paths: reads.iter().map(|r| r.path.clone()).collect(),
    };
    Ok((profile, reads, layers.len()))
}

/// Runs `shoal profile ...`.
///
/// # Errors
/// The image cannot be resolved or the daemon cannot be asked.
pub fn run(cmd: ProfileCommand) -> anyhow::Result<()> {
    let ProfileCommand::Show(a) = cmd;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start tokio runtime")?;
    let cfg = RegistryConfig {
        config_path: a.hosts_dir.clone(),
        ..Default::default()
    };
    let (profile, reads, n_layers) = rt.block_on(recorded(&a.address, &a.image, &cfg))?;
    if let Some(out) = &a.output {
        std::fs::write(out, serde_json::to_vec_pretty(&profile)?)
            .with_context(|| format!("write {}", out.display()))?;
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&profile)?);
    } else if a.output.is_none() {
        println!("{:>8}  {:<19}  PATH", "MS", "LAYER");
        for r in &reads {
            println!(
                "{:>8}  {:<19}  {}",
                r.ms,
                &r.layer_digest[..r.layer_digest.len().min(19)],
                r.path
            );
        }
    }
    let with_reads: std::collections::HashSet<&str> =
        reads.iter().map(|r| r.layer_digest.as_str()).collect();
    eprintln!(
        "profile: {} files from {} of the image's {} layers",
        profile.paths.len(),
        with_reads.len(),
        n_layers
    );
    Ok(())
}

/// The layer digests of `image` (this host's platform from an index).
async fn image_layers(image: &str, cfg: &RegistryConfig) -> anyhow::Result<Vec<String>> {
    let reference: Reference = image
        .parse()
        .map_err(|e| anyhow::anyhow!("image reference {image:?}: {e}"))?;
    let registry = Registry::new(cfg.clone()).context("registry client")?;
    let (_, _, bytes) = registry
        .fetch_manifest(&reference)
        .await
        .with_context(|| format!("resolve {image}"))?;
    let mut v: Value = serde_json::from_slice(&bytes).context("manifest JSON")?;
    if let Some(list) = v["manifests"].as_array() {
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            other => other,
        };
        let d = list
            .iter()
            .find(|d| d["platform"]["os"] == "linux" && d["platform"]["architecture"] == arch)
            .and_then(|d| d["digest"].as_str())
            .ok_or_else(|| anyhow::anyhow!("{image}: no linux/{arch} manifest in the index"))?;
        let mut r = reference.clone();
        r.tag = None;
        r.digest = Some(d.to_string());
        let (_, _, bytes) = registry
            .fetch_manifest(&r)
            .await
            .with_context(|| format!("resolve {image}"))?;
        v = serde_json::from_slice(&bytes).context("manifest JSON")?;
    }
    Ok(v["layers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l["digest"].as_str().map(str::to_string))
        .collect())
}
