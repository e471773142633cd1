//! mTLS under the cluster CA: a node's files, and the server and client
//! configs built from them (rustls through tonic, with the aws-lc-rs crypto
//! provider that reqwest and rcgen already use in this build).
//!
//! A node's TLS directory (written by `shoal cluster issue-node`) holds:
//! - [`CA_FILE`]: the cluster CA certificate, the only root trusted;
//! - [`CERT_FILE`]: this node's certificate, signed by the CA;
//! - [`KEY_FILE`]: its private key (mode 0600).
//!
//! Invariants:
//! - The server requires a client certificate that chains to the cluster CA
//!   (`client_auth_optional` stays false): a client without one fails the
//!   TLS handshake and reaches no service.
//! - Clients verify the server against the cluster CA only (no system
//!   roots), under the name [`PEER_NAME`] that every node certificate carries:
//!   any member may serve any chunk, since receivers check every byte.
//! - Files are read when the daemon starts; a rotated certificate takes
//!   effect on the next restart (no hot reload yet).

use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// The cluster CA certificate in a node's TLS directory.
pub const CA_FILE: &str = "ca.pem";
/// The node's certificate in its TLS directory.
pub const CERT_FILE: &str = "node.pem";
/// The node's private key in its TLS directory.
pub const KEY_FILE: &str = "node.key";
/// The DNS name in every node certificate, which clients verify: it says
/// "a member of this cluster", not which one.
pub const PEER_NAME: &str = "peer.shoal.internal";

/// A node's TLS files could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file is missing or unreadable.
    #[error("read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A file holds no PEM block of the kind expected.
    #[error("{path}: {what}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: &'static str,
    },
}

/// A node's credentials: the cluster CA and its own certificate and key
/// (PEM).
#[derive(Clone)]
pub struct NodeTls {
    ca: Vec<u8>,
    cert: Vec<u8>,
    key: Vec<u8>,
}

impl std::fmt::Debug for NodeTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeTls").finish_non_exhaustive()
    }
}

fn read(dir: &Path, name: &str, marker: &'static str) -> Result<Vec<u8>, TlsError> {
    let path = dir.join(name);
    let data = std::fs::read(&path).map_err(|source| TlsError::Read {
        path: path.clone(),
        source,
    })?;
    if !String::from_utf8_lossy(&data).contains(marker) {
        return Err(TlsError::Invalid {
            path,
            what: "no PEM block of the expected kind",
        });
    }
    Ok(data)
}

impl NodeTls {
    /// Reads a node's TLS directory.
    ///
    /// # Errors
    /// A file is missing, unreadable or holds no PEM block of its kind.
    pub fn load(dir: &Path) -> Result<NodeTls, TlsError> {
        Ok(NodeTls {
            ca: read(dir, CA_FILE, "BEGIN CERTIFICATE")?,
            cert: read(dir, CERT_FILE, "BEGIN CERTIFICATE")?,
            key: read(dir, KEY_FILE, "PRIVATE KEY")?,
        })
    }

    /// From PEM held in memory (tests, tools).
    pub fn from_pem(ca: &str, cert: &str, key: &str) -> NodeTls {
        NodeTls {
            ca: ca.as_bytes().to_vec(),
            cert: cert.as_bytes().to_vec(),
            key: key.as_bytes().to_vec(),
        }
    }

    /// The server side: this node's certificate; clients must present one
    /// signed by the cluster CA.
    pub fn server_config(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert, &self.key))
            .client_ca_root(Certificate::from_pem(&self.ca))
            .client_auth_optional(false)
    }

    /// The client side: presents this node's certificate, trusts only the
    /// cluster CA, and checks the server name [`PEER_NAME`].
    pub fn client_config(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca))
            .identity(Identity::from_pem(&self.cert, &self.key))
            .domain_name(PEER_NAME)
    }
}

/// A client config that trusts the cluster CA but presents no certificate:
/// what an outsider who knows the CA has. Servers refuse it (tests, probes).
pub fn anonymous_client_config(ca_pem: &[u8]) -> ClientTlsConfig {
    ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name(PEER_NAME)
}
