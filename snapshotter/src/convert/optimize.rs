//! `shoal optimize SRC DST [-- CMD ARGS]`: convert, run the image once
//! through containerd and Shoal while the daemon records its first reads,
//! then convert again with that startup profile.
//!
//! The first conversion is pushed to DST's repository by digest only, with
//! no tag (the run pulls it as `REPO@DIGEST`); the image is pulled with
//! `shoal pull` semantics and run with containerd's `ctr run --rm` (killed
//! after `--timeout`). Once its first reads are taken, the trial image is
//! removed from containerd, so the command leaves no tag behind in either
//! place (the untagged manifest and blobs stay in the registry until its own
//! garbage collection). Only DST's own tag needs `--force` to be
//! overwritten.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::{convert, progress::Progress, Layout, Location, Options};
use crate::registry::{Registry, RegistryConfig};

/// `shoal optimize` arguments.
#[derive(clap::Args, Debug)]
pub struct OptimizeArgs {
    /// The Shoal daemon's socket.
    #[arg(long, value_name = "SOCKET", env = "SHOAL_ADDRESS", default_value = crate::config::DEFAULT_ADDRESS)]
    pub address: PathBuf,
    /// containerd's socket.
    #[arg(long, value_name = "SOCKET", env = "CONTAINERD_ADDRESS", default_value = crate::pull::DEFAULT_CONTAINERD_ADDRESS)]
    pub containerd_address: PathBuf,
    /// containerd namespace.
    #[arg(long, env = "CONTAINERD_NAMESPACE", default_value = crate::pull::DEFAULT_NAMESPACE)]
    pub namespace: String,
    /// Snapshotter name of Shoal in containerd's `proxy_plugins`.
    #[arg(long, default_value = crate::pull::DEFAULT_SNAPSHOTTER)]
    pub snapshotter: String,
    /// Seconds the run may take before it is killed (its first reads so far
    /// still count).
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
    /// Overwrite DST's tag if it exists.
    #[arg(long)]
    pub force: bool,
    /// Directory for staging blobs.
    #[arg(long, value_name = "DIR")]
    pub work_dir: Option<PathBuf>,
    /// containerd-style `hosts.toml` directory for registries.
    #[arg(long, value_name = "DIR", default_value = crate::registry::DEFAULT_CONFIG_PATH)]
    pub hosts_dir: PathBuf,
    /// No progress on stderr.
    #[arg(long, short)]
    pub quiet: bool,
    /// Print the final conversion's summary as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Source: an image reference, or oci:DIR[:TAG].
    pub src: String,
    /// Destination: an image reference (the run pulls from the registry).
    pub dst: String,
    /// Command to run in the container (default: the image's own).
    #[arg(last = true)]
    pub cmd: Vec<String>,
}

/// Runs `shoal optimize`.
///
/// # Errors
/// Any step failing; DST's tag is written only by the last step.
pub fn run(a: OptimizeArgs) -> anyhow::Result<()> {
    let src: Location = a.src.parse().map_err(anyhow::Error::msg)?;
    let dst: Location = a.dst.parse().map_err(anyhow::Error::msg)?;
    let Location::Registry(dst_ref) = &dst else {
        bail!("shoal optimize needs a registry destination: the run pulls the image from there");
    };
    let mut tmp_ref = dst_ref.clone();
    tmp_ref.digest = None;
    let reg_cfg = RegistryConfig {
        config_path: a.hosts_dir.clone(),
        ..Default::default()
    };
    let registry = Registry::new(reg_cfg.clone()).context("registry client")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("start tokio runtime")?;
    let progress = Progress::new(a.quiet);
    let base = Options {
        src: src.clone(),
        dst: Location::Registry(tmp_ref.clone()),
        force: true,
        layout: Layout {
            chunk_size: super::DEFAULT_CHUNK_SIZE,
            level: super::DEFAULT_LEVEL,
        },
        work_dir: a.work_dir.clone(),
        source_repository: None,
        profile: None,
        untagged: true,
    };
    if !a.force && rt.block_on(registry.manifest_exists(dst_ref))? {
        bail!("destination {} exists; pass --force to overwrite it", a.dst);
    }
    progress.note(&format!(
        "1/4 converting {} -> {}/{} (untagged)",
        a.src, tmp_ref.registry, tmp_ref.repository
    ));
    let trial = rt.block_on(convert(registry.clone(), &base, &progress))?;
    tmp_ref.tag = None;
    tmp_ref.digest = Some(trial.digest);
    let tmp = tmp_ref.to_string();

    progress.note(&format!("2/4 pulling {tmp} through {}", a.snapshotter));
    let pull_opts = crate::pull::PullOptions {
        containerd_address: a.containerd_address.clone(),
        namespace: a.namespace.clone(),
        snapshotter: a.snapshotter.clone(),
        platform: crate::pull::Platform::host(),
        registry: reg_cfg.clone(),
    };
    let pulled = rt
        .block_on(crate::pull::pull(&tmp, &pull_opts, &mut |_| {}))
        .with_context(|| format!("pull {tmp}"))?;
    if pulled.lazy == 0 {
        bail!(
            "no layer of {tmp} was mounted lazily, so nothing can be recorded (is {} Shoal?)",
            a.snapshotter
        );
    }

    progress.note(&format!("3/4 running {tmp} (at most {}s)", a.timeout));
    run_once(&a, &tmp)?;

    let recorded = rt.block_on(super::profile_cli::recorded(&a.address, &tmp, &reg_cfg));
    // The trial image is not for use: drop it from containerd whatever the
    // outcome (its layers are unmounted once containerd's GC removes them).
    match ctr(&a, &["image", "rm", &tmp])
        .stdout(Stdio::null())
        .status()
    {
        Ok(s) if s.success() => {}
        r => eprintln!("optimize: could not remove the trial image {tmp} from containerd: {r:?}"),
    }
    let (profile, _, _) = recorded?;
    progress.note(&format!(
        "4/4 converting with a profile of {} files -> {}",
        profile.paths.len(),
        a.dst
    ));
    let opts = Options {
        dst,
        force: a.force,
        profile: Some(profile),
        untagged: false,
        ..base
    };
    let summary = rt.block_on(convert(registry, &opts, &progress))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        let files: u64 = summary
            .manifests
            .iter()
            .flat_map(|m| &m.layers)
            .map(|l| l.out.startup_files)
            .sum();
        println!(
            "{} -> {} {} (startup set: {files} files)",
            summary.source, summary.destination, summary.digest
        );
    }
    Ok(())
}

/// A `ctr` command against containerd and the namespace of `a`.
fn ctr(a: &OptimizeArgs, args: &[&str]) -> Command {
    let mut c = Command::new("ctr");
    c.arg("--address")
        .arg(&a.containerd_address)
        .arg("--namespace")
        .arg(&a.namespace)
        .args(args);
    c
}

/// `ctr run --rm` the image once, killing the task after the timeout.
fn run_once(a: &OptimizeArgs, image: &str) -> anyhow::Result<()> {
    let id = format!("shoal-optimize-{}", std::process::id());
    let mut run = ctr(
        a,
        &["run", "--rm", "--snapshotter", &a.snapshotter, image, &id],
    );
    run.args(&a.cmd).stdin(Stdio::null()).stdout(Stdio::null());
    let mut child = run
        .spawn()
        .context("start `ctr run` (is containerd's ctr installed?)")?;
    let deadline = Instant::now() + Duration::from_secs(a.timeout);
    loop {
        if let Some(status) = child.try_wait()? {
            if !status.success() {
                eprintln!("optimize: the run exited with {status}; its first reads still count");
            }
            return Ok(());
        }
        if Instant::now() >= deadline {
            let _ = ctr(a, &["task", "kill", "-s", "SIGKILL", &id]).status();
            let _ = child.wait();
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
