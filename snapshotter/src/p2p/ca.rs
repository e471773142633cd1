//! The cluster CA and node certificates (`shoal cluster`), with rcgen.
//!
//! Layout:
//! - a CA directory: [`CA_CERT`] and [`CA_KEY`] (0600). Keep it off the
//!   nodes: whoever holds the key can mint members.
//! - a node directory: the CA certificate, the node's certificate and key
//!   (0600), named as [`super::tls`] reads them.
//!
//! Node certificates name the node (common name and a DNS name) and carry
//! [`super::tls::PEER_NAME`]; they are valid for both TLS server and client
//! authentication, since every node is both. Keys are ECDSA P-256.
//!
//! Files are written to a temp file in the same directory and renamed, so a
//! reader sees the old or the new file, never a partial one.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

use super::tls::{CA_FILE, CERT_FILE, KEY_FILE, PEER_NAME};

/// The CA certificate in a CA directory.
pub const CA_CERT: &str = "ca.pem";
/// The CA private key in a CA directory (0600).
pub const CA_KEY: &str = "ca.key";
/// Default validity of the CA, in days (10 years).
pub const DEFAULT_CA_DAYS: u32 = 3650;
/// Default validity of a node certificate, in days.
pub const DEFAULT_NODE_DAYS: u32 = 365;

/// A CA or node certificate could not be made or written.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Generating, parsing or signing failed.
    #[error("certificate: {0}")]
    Cert(#[from] rcgen::Error),
    /// The CA directory already holds a CA (refused, so a key is never
    /// overwritten by accident).
    #[error("{0} already exists; refusing to overwrite a CA")]
    Exists(PathBuf),
    /// A node name that is not a DNS label sequence.
    #[error("invalid node name {0:?}: use letters, digits, '-' and '.'")]
    Name(String),
    /// The node certificate to rotate has no common name.
    #[error("{0}: no common name to re-issue")]
    NoName(PathBuf),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
    move |source| CaError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `data` to `dir/name` with `mode`, atomically (temp file, fsync,
/// rename).
fn write_file(dir: &Path, name: &str, data: &[u8], mode: u32) -> Result<(), CaError> {
    crate::secret_file::write(&dir.join(name), data, mode)
        .map_err(|(path, source)| CaError::Io { path, source })
}

fn make_dir(dir: &Path) -> Result<(), CaError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(dir))
}

fn validity(params: &mut CertificateParams, days: u32) {
    let now = OffsetDateTime::now_utc();
    // An hour back, for clocks that differ a little between nodes.
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(i64::from(days));
}

/// Creates a cluster CA in `dir` (made 0700 if missing). Returns the CA
/// certificate's path.
///
/// # Errors
/// `dir` already holds a CA, or a file cannot be written.
pub fn init_ca(dir: &Path, name: &str, days: u32) -> Result<PathBuf, CaError> {
    make_dir(dir)?;
    for f in [CA_CERT, CA_KEY] {
        if dir.join(f).exists() {
            return Err(CaError::Exists(dir.join(f)));
        }
    }
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut params, days);
    let cert = params.self_signed(&key)?;
    write_file(dir, CA_KEY, key.serialize_pem().as_bytes(), 0o600)?;
    write_file(dir, CA_CERT, cert.pem().as_bytes(), 0o644)?;
    Ok(dir.join(CA_CERT))
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// Issues a certificate for node `name`, signed by the CA in `ca_dir`, into
/// `out` (made 0700 if missing): the CA certificate, the node certificate
/// and its key (0600). Existing node files are replaced (this is also how a
/// node is rotated).
///
/// # Errors
/// A bad name, an unreadable CA, or a file that cannot be written.
pub fn issue_node(ca_dir: &Path, name: &str, out: &Path, days: u32) -> Result<(), CaError> {
    if !valid_name(name) {
        return Err(CaError::Name(name.to_string()));
    }
    let ca_cert_path = ca_dir.join(CA_CERT);
    let ca_key_path = ca_dir.join(CA_KEY);
    let ca_pem = std::fs::read_to_string(&ca_cert_path).map_err(io(&ca_cert_path))?;
    let ca_key = std::fs::read_to_string(&ca_key_path).map_err(io(&ca_key_path))?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, KeyPair::from_pem(&ca_key)?)?;

    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec![name.to_string()])?;
    params
        .subject_alt_names
        .push(SanType::DnsName(PEER_NAME.try_into()?));
    params.distinguished_name.push(DnType::CommonName, name);
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    validity(&mut params, days);
    let cert = params.signed_by(&key, &issuer)?;
    make_dir(out)?;
    // Key first: a reader never pairs a new certificate with an old key
    // for long, and a restart picks up both.
    write_file(out, KEY_FILE, key.serialize_pem().as_bytes(), 0o600)?;
    write_file(out, CERT_FILE, cert.pem().as_bytes(), 0o644)?;
    write_file(out, CA_FILE, ca_pem.as_bytes(), 0o644)?;
    Ok(())
}

/// The node name (common name) of the certificate in a node directory.
///
/// # Errors
/// The certificate is unreadable or has no common name.
pub fn node_name(node_dir: &Path) -> Result<String, CaError> {
    let path = node_dir.join(CERT_FILE);
    let pem = std::fs::read(&path).map_err(io(&path))?;
    common_name(&pem).ok_or(CaError::NoName(path))
}

/// The common name of the first certificate in `pem`.
pub fn common_name(pem: &[u8]) -> Option<String> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem).ok()?;
    let cert = pem.parse_x509().ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
}

/// Re-issues the node certificate in `node_dir` under the same name, with a
/// new key.
///
/// # Errors
/// As [`node_name`] and [`issue_node`].
pub fn rotate_node(ca_dir: &Path, node_dir: &Path, days: u32) -> Result<String, CaError> {
    let name = node_name(node_dir)?;
    issue_node(ca_dir, &name, node_dir, days)?;
    Ok(name)
}
