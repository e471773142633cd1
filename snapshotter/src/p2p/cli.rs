//! `shoal cluster`: the cluster CA and node certificates for P2P mTLS
//! (docs/p2p.md).

use std::path::PathBuf;

use anyhow::Context;

use super::ca;

/// `shoal cluster` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum ClusterCommand {
    /// Create the cluster CA in DIR: ca.pem (the certificate, copied to every
    /// node) and ca.key (0600). Keep DIR off the nodes: whoever holds ca.key
    /// can make members. Refuses to overwrite an existing CA.
    InitCa {
        /// Directory for ca.pem and ca.key (created 0700 if missing).
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// Common name of the CA certificate.
        #[arg(long, default_value = "shoal cluster CA")]
        name: String,
        /// Validity in days.
        #[arg(long, default_value_t = ca::DEFAULT_CA_DAYS)]
        days: u32,
    },
    /// Issue a certificate for node NAME into DIR: ca.pem, node.pem and
    /// node.key (0600), the files `[p2p] tls_dir` points at. Replaces an
    /// existing node.pem and node.key in DIR.
    IssueNode {
        /// The CA directory made by `shoal cluster init-ca`.
        #[arg(long, value_name = "CA_DIR")]
        ca: PathBuf,
        /// Node name (letters, digits, '-' and '.'), e.g. the host name.
        #[arg(long)]
        name: String,
        /// Output directory (created 0700 if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = ca::DEFAULT_NODE_DAYS)]
        days: u32,
    },
    /// Re-issue the node certificate in DIR with a new key and the same name
    /// (taken from DIR/node.pem). The daemon reads its TLS files at start:
    /// restart it to use the new certificate.
    RotateNode {
        /// The CA directory made by `shoal cluster init-ca`.
        #[arg(long, value_name = "CA_DIR")]
        ca: PathBuf,
        /// The node's TLS directory (as written by `issue-node`).
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = ca::DEFAULT_NODE_DAYS)]
        days: u32,
    },
    /// Fetch one chunk from a peer's P2P port over mTLS, check its length and
    /// sha256 against DIGEST and LENGTH, and write it to FILE (a probe for
    /// operators and tests). Exits non-zero if the peer does not hold it,
    /// cannot be reached in time, or sends anything else.
    GetChunk {
        /// This node's TLS directory (ca.pem, node.pem, node.key).
        #[arg(long, value_name = "DIR")]
        tls_dir: PathBuf,
        /// The peer, host:port.
        #[arg(long, value_name = "ADDR")]
        peer: String,
        /// The chunk's sha256 (hex, with or without `sha256:`).
        #[arg(long)]
        digest: String,
        /// The chunk's length in bytes.
        #[arg(long)]
        length: u64,
        /// Where to write the chunk.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Deadline for the whole request, in milliseconds.
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
    },
}

/// Runs a `shoal cluster` subcommand.
///
/// # Errors
/// The CA or node files cannot be made, read or written.
pub fn run(cmd: ClusterCommand) -> anyhow::Result<()> {
    match cmd {
        ClusterCommand::InitCa { dir, name, days } => {
            let cert = ca::init_ca(&dir, &name, days).context("init-ca")?;
            println!("cluster CA written: {}", cert.display());
        }
        ClusterCommand::IssueNode {
            ca: ca_dir,
            name,
            out,
            days,
        } => {
            ca::issue_node(&ca_dir, &name, &out, days).context("issue-node")?;
            println!("node {name}: certificate written to {}", out.display());
        }
        ClusterCommand::RotateNode {
            ca: ca_dir,
            dir,
            days,
        } => {
            let name = ca::rotate_node(&ca_dir, &dir, days).context("rotate-node")?;
            println!(
                "node {name}: certificate re-issued in {}; restart shoal-snapshotter to use it",
                dir.display()
            );
        }
        ClusterCommand::GetChunk {
            tls_dir,
            peer,
            digest,
            length,
            out,
            timeout_ms,
        } => {
            let hex_digest = digest.strip_prefix("sha256:").unwrap_or(&digest);
            let d: super::Digest = hex::decode(hex_digest)
                .ok()
                .and_then(|v| v.try_into().ok())
                .context("--digest: not 64 hex digits")?;
            let tls = super::tls::NodeTls::load(&tls_dir)?;
            let client = super::client::PeerClient::new(tls.client_config());
            let deadline = std::time::Duration::from_millis(timeout_ms);
            let data = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("start tokio runtime")?
                .block_on(client.fetch_chunk(&peer, &d, length, deadline))?;
            std::fs::write(&out, &data).with_context(|| format!("write {}", out.display()))?;
            println!("{} bytes from {peer}, sha256 verified", data.len());
        }
    }
    Ok(())
}
