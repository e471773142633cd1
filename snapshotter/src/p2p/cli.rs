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
    }
    Ok(())
}
