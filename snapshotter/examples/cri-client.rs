//! A minimal CRI client for the end-to-end tests (tests/e2e/cri.sh): what
//! crictl would do, built from the vendored `runtime.v1` protocol
//! (`shoal_proto::cri`), since Debian 12 packages no crictl. Not a product
//! binary; it prints plain `key=value` lines for the test to check.
//!
//! ```text
//! cargo build --release -p shoal-snapshotter --example cri-client
//! target/release/examples/cri-client --image-endpoint /run/shoal/cri.sock \
//!     pull 127.0.0.1:5000/app:1 --user alice --password secret
//! ```
//!
//! Image calls go to `--image-endpoint` (Shoal's proxy), runtime calls to
//! `--runtime-endpoint` (containerd). A failed call prints its gRPC code and
//! message on stderr and exits 1.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use shoal_proto::cri;
use shoal_proto::cri::image_service_client::ImageServiceClient;
use shoal_proto::cri::runtime_service_client::RuntimeServiceClient;
use tonic::transport::Channel;

#[derive(Parser)]
#[command(about = "A minimal CRI client for Shoal's tests")]
struct Args {
    /// CRI image service socket (Shoal's proxy, or containerd).
    #[arg(long)]
    image_endpoint: PathBuf,
    /// CRI runtime service socket (containerd).
    #[arg(long)]
    runtime_endpoint: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// PullImage; prints `image_ref=`.
    Pull {
        image: String,
        #[arg(long, default_value = "")]
        user: String,
        #[arg(long, default_value = "")]
        password: String,
    },
    /// ImageStatus; prints `id=`, `size=`, `tag=`, `digest=` (or `absent`).
    Status { image: String },
    /// ImageFsInfo; prints one `image_fs=MOUNTPOINT used_bytes=N inodes_used=N`
    /// line per filesystem.
    FsInfo,
    /// RemoveImage.
    Rm { image: String },
    /// RunPodSandbox with host network, PID and IPC namespaces; prints
    /// `pod=ID`.
    RunPod {
        name: String,
        /// Directory for container logs.
        #[arg(long)]
        log_dir: PathBuf,
    },
    /// CreateContainer + StartContainer in a pod; prints `container=ID`.
    /// Its output goes to LOG_DIR/NAME.log (CRI log format).
    Run {
        pod: String,
        name: String,
        image: String,
        #[arg(long)]
        log_dir: PathBuf,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// ExecSync; prints the command's stdout, its stderr to stderr, and exits
    /// with its exit code.
    Exec {
        container: String,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// ContainerStatus; prints `state=` and `exit_code=`.
    ContainerStatus { container: String },
    /// StopPodSandbox + RemovePodSandbox (its containers go with it).
    RmPod { pod: String },
}

fn pod_metadata(name: &str) -> cri::PodSandboxMetadata {
    cri::PodSandboxMetadata {
        name: name.to_string(),
        uid: format!("uid-{name}"),
        namespace: "shoal-e2e".to_string(),
        attempt: 0,
    }
}

fn pod_config(name: &str, log_dir: &std::path::Path) -> cri::PodSandboxConfig {
    let node = cri::NamespaceMode::Node as i32;
    cri::PodSandboxConfig {
        metadata: Some(pod_metadata(name)),
        hostname: String::new(),
        log_directory: log_dir.display().to_string(),
        linux: Some(cri::LinuxPodSandboxConfig {
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(cri::NamespaceOption {
                    network: node,
                    pid: cri::NamespaceMode::Pod as i32,
                    ipc: node,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn runtime(args: &Args) -> anyhow::Result<RuntimeServiceClient<Channel>> {
    let path = args
        .runtime_endpoint
        .as_ref()
        .context("--runtime-endpoint is needed for this command")?;
    Ok(RuntimeServiceClient::new(shoal::cri::upstream(path)))
}

async fn run(args: Args) -> anyhow::Result<i32> {
    let mut images = ImageServiceClient::new(shoal::cri::upstream(&args.image_endpoint));
    let spec = |image: &str| cri::ImageSpec {
        image: image.to_string(),
        ..Default::default()
    };
    match &args.cmd {
        Cmd::Pull {
            image,
            user,
            password,
        } => {
            let auth = (!user.is_empty() || !password.is_empty()).then(|| cri::AuthConfig {
                username: user.clone(),
                password: password.clone(),
                ..Default::default()
            });
            let r = images
                .pull_image(cri::PullImageRequest {
                    image: Some(spec(image)),
                    auth,
                    sandbox_config: None,
                })
                .await?;
            println!("image_ref={}", r.into_inner().image_ref);
        }
        Cmd::Status { image } => {
            let r = images
                .image_status(cri::ImageStatusRequest {
                    image: Some(spec(image)),
                    verbose: false,
                })
                .await?;
            match r.into_inner().image {
                None => println!("absent"),
                Some(i) => {
                    println!("id={}", i.id);
                    println!("size={}", i.size);
                    for t in i.repo_tags {
                        println!("tag={t}");
                    }
                    for d in i.repo_digests {
                        println!("digest={d}");
                    }
                }
            }
        }
        Cmd::FsInfo => {
            let r = images.image_fs_info(cri::ImageFsInfoRequest {}).await?;
            let r = r.into_inner();
            let line = |kind: &str, f: &cri::FilesystemUsage| {
                println!(
                    "{kind}={} used_bytes={} inodes_used={}",
                    f.fs_id
                        .as_ref()
                        .map(|i| i.mountpoint.as_str())
                        .unwrap_or(""),
                    f.used_bytes.as_ref().map(|v| v.value).unwrap_or(0),
                    f.inodes_used.as_ref().map(|v| v.value).unwrap_or(0),
                )
            };
            r.image_filesystems.iter().for_each(|f| line("image_fs", f));
            r.container_filesystems
                .iter()
                .for_each(|f| line("container_fs", f));
        }
        Cmd::Rm { image } => {
            images
                .remove_image(cri::RemoveImageRequest {
                    image: Some(spec(image)),
                })
                .await?;
            println!("removed={image}");
        }
        Cmd::RunPod { name, log_dir } => {
            let r = runtime(&args)?
                .run_pod_sandbox(cri::RunPodSandboxRequest {
                    config: Some(pod_config(name, log_dir)),
                    runtime_handler: String::new(),
                })
                .await?;
            println!("pod={}", r.into_inner().pod_sandbox_id);
        }
        Cmd::Run {
            pod,
            name,
            image,
            log_dir,
            command,
        } => {
            let mut rt = runtime(&args)?;
            // The pod's name is needed again in the sandbox config.
            let status = rt
                .pod_sandbox_status(cri::PodSandboxStatusRequest {
                    pod_sandbox_id: pod.clone(),
                    verbose: false,
                })
                .await?
                .into_inner();
            let pod_name = status
                .status
                .and_then(|s| s.metadata)
                .map(|m| m.name)
                .context("pod sandbox has no metadata")?;
            let config = cri::ContainerConfig {
                metadata: Some(cri::ContainerMetadata {
                    name: name.clone(),
                    attempt: 0,
                }),
                image: Some(spec(image)),
                command: command.clone(),
                log_path: format!("{name}.log"),
                labels: HashMap::new(),
                ..Default::default()
            };
            let id = rt
                .create_container(cri::CreateContainerRequest {
                    pod_sandbox_id: pod.clone(),
                    config: Some(config),
                    sandbox_config: Some(pod_config(&pod_name, log_dir)),
                })
                .await?
                .into_inner()
                .container_id;
            rt.start_container(cri::StartContainerRequest {
                container_id: id.clone(),
            })
            .await?;
            println!("container={id}");
        }
        Cmd::Exec { container, command } => {
            let r = runtime(&args)?
                .exec_sync(cri::ExecSyncRequest {
                    container_id: container.clone(),
                    cmd: command.clone(),
                    timeout: 60,
                })
                .await?
                .into_inner();
            use std::io::Write as _;
            std::io::stdout().write_all(&r.stdout)?;
            std::io::stderr().write_all(&r.stderr)?;
            return Ok(r.exit_code);
        }
        Cmd::ContainerStatus { container } => {
            let s = runtime(&args)?
                .container_status(cri::ContainerStatusRequest {
                    container_id: container.clone(),
                    verbose: false,
                })
                .await?
                .into_inner()
                .status
                .context("no container status")?;
            let state = cri::ContainerState::try_from(s.state)
                .map(|s| s.as_str_name().to_string())
                .unwrap_or_else(|_| s.state.to_string());
            println!("state={state}");
            println!("exit_code={}", s.exit_code);
        }
        Cmd::RmPod { pod } => {
            let mut rt = runtime(&args)?;
            rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: pod.clone(),
            })
            .await?;
            rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
                pod_sandbox_id: pod.clone(),
            })
            .await?;
            println!("removed_pod={pod}");
        }
    }
    Ok(0)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = Args::parse();
    match run(args).await {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            match e.downcast_ref::<tonic::Status>() {
                Some(s) => eprintln!("cri-client: {:?}: {}", s.code(), s.message()),
                None => eprintln!("cri-client: {e:#}"),
            }
            std::process::exit(1);
        }
    }
}
