//! [`RegistryError`]: what went wrong talking to a registry, naming the host,
//! repository and object (digest or tag) involved.
//!
//! Invariant: [`RegistryError::is_transient`] decides retries: only
//! connection trouble, timeouts, bodies under the rate floor, truncated
//! bodies, 5xx, 408 and 429 are transient. (Any error moves on to the next host; see `fetch`.)

use std::path::PathBuf;
use std::time::Duration;

/// Errors of the registry client.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The image reference does not parse.
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference {
        /// The text given.
        reference: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A local file (hosts.toml, CA, client cert, docker config) is unusable.
    #[error("registry config {}: {reason}", path.display())]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// No configured host has the capability the operation needs.
    #[error("no host for registry {registry} may {capability} (check hosts.toml capabilities)")]
    NoHosts {
        /// Registry name.
        registry: String,
        /// `pull` or `resolve`.
        capability: &'static str,
    },
    /// Connecting or transferring failed (refused, reset, TLS, DNS).
    #[error("{host}/{repo}@{object}: connection failed: {reason}")]
    Transport {
        /// Host contacted.
        host: String,
        /// Repository.
        repo: String,
        /// Digest or tag.
        object: String,
        /// The underlying error, with its causes.
        reason: String,
    },
    /// The server's certificate was refused (not retried: it won't change).
    #[error("{host}/{repo}@{object}: TLS certificate refused (hosts.toml `ca` or `skip_verify`): {reason}")]
    Certificate {
        /// Host contacted.
        host: String,
        /// Repository.
        repo: String,
        /// Digest or tag.
        object: String,
        /// The verifier's complaint.
        reason: String,
    },
    /// No response headers, or no body bytes, within the request timeout.
    #[error("{host}/{repo}@{object}: timed out after {after:?} waiting for {waiting_for}")]
    Timeout {
        /// Host contacted.
        host: String,
        /// Repository.
        repo: String,
        /// Digest or tag.
        object: String,
        /// The timeout that fired.
        after: Duration,
        /// `response headers` or `body bytes`.
        waiting_for: &'static str,
    },
    /// The body came in slower, on average, than the configured floor
    /// (`registry.min_rate_bytes_per_sec`) allows.
    #[error("{host}/{repo}@{object}: body too slow: {got} bytes in {elapsed:?}, under the floor of {min_rate} bytes/s")]
    TooSlow {
        /// Host contacted.
        host: String,
        /// Repository.
        repo: String,
        /// Digest or tag.
        object: String,
        /// Bytes received (skipped ones included).
        got: u64,
        /// Time since the body started.
        elapsed: Duration,
        /// The floor, bytes/s.
        min_rate: u64,
    },
    /// An unexpected HTTP status.
    #[error("{host}/{repo}@{object}: HTTP {status}{}", detail_suffix(detail))]
    Status {
        /// Host contacted.
        host: String,
        /// Repository.
        repo: String,
        /// Digest or tag.
        object: String,
        /// The status code.
        status: u16,
        /// Start of the body (registry error JSON), if any.
        detail: String,
        /// `Retry-After`, for 429 and 503.
        retry_after: Option<Duration>,
    },
    /// The registry does not have the object (HTTP 404).
    #[error("{host}/{repo}@{object}: not found (HTTP 404)")]
    NotFound {
        /// Host contacted.
        host: String,
        /// Repository.
        repo: String,
        /// Digest or tag.
        object: String,
    },
    /// Authentication failed: credentials refused, token endpoint errors.
    #[error("{host}/{repo}@{object}: authentication failed: {reason}")]
    Auth {
        /// Host contacted.
        host: String,
        /// Repository.
        repo: String,
        /// Digest or tag.
        object: String,
        /// What was refused, and by whom.
        reason: String,
    },
    /// The body ended before the promised length.
    #[error("{host}/{repo}@{object}: short read: got {got} of {want} bytes")]
    ShortRead {
        /// Host contacted.
        host: String,
        /// Repository.
        repo: String,
        /// Digest or tag.
        object: String,
        /// Bytes received.
        got: u64,
        /// Bytes expected.
        want: u64,
    },
    /// The answer does not match the request (Content-Range, length, 416,
    /// too large, digest mismatch).
    #[error("{host}/{repo}@{object}: bad response: {reason}")]
    BadResponse {
        /// Host contacted.
        host: String,
        /// Repository.
        repo: String,
        /// Digest or tag.
        object: String,
        /// What does not match.
        reason: String,
    },
    /// Building the HTTP client failed.
    #[error("building the HTTP client: {0}")]
    Client(String),
}

fn detail_suffix(detail: &str) -> String {
    if detail.is_empty() {
        String::new()
    } else {
        format!(": {detail}")
    }
}

impl RegistryError {
    /// Whether retrying (on this or another host) may help.
    pub fn is_transient(&self) -> bool {
        match self {
            RegistryError::Transport { .. }
            | RegistryError::Timeout { .. }
            | RegistryError::TooSlow { .. }
            | RegistryError::ShortRead { .. } => true,
            RegistryError::Status { status, .. } => {
                *status >= 500 || *status == 408 || *status == 429
            }
            _ => false,
        }
    }

    /// The server's `Retry-After`, if it sent one.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            RegistryError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// Host, repository and object, to build errors from.
#[derive(Debug, Clone)]
pub(crate) struct Site {
    pub host: String,
    pub repo: String,
    pub object: String,
}

impl Site {
    pub fn transport(&self, err: &reqwest::Error) -> RegistryError {
        let reason = error_chain(err);
        if reason.contains("invalid peer certificate") {
            return RegistryError::Certificate {
                host: self.host.clone(),
                repo: self.repo.clone(),
                object: self.object.clone(),
                reason,
            };
        }
        RegistryError::Transport {
            host: self.host.clone(),
            repo: self.repo.clone(),
            object: self.object.clone(),
            reason,
        }
    }

    pub fn timeout(&self, after: Duration, waiting_for: &'static str) -> RegistryError {
        RegistryError::Timeout {
            host: self.host.clone(),
            repo: self.repo.clone(),
            object: self.object.clone(),
            after,
            waiting_for,
        }
    }

    pub fn too_slow(&self, got: u64, elapsed: Duration, min_rate: u64) -> RegistryError {
        RegistryError::TooSlow {
            host: self.host.clone(),
            repo: self.repo.clone(),
            object: self.object.clone(),
            got,
            elapsed,
            min_rate,
        }
    }

    pub fn auth(&self, reason: impl Into<String>) -> RegistryError {
        RegistryError::Auth {
            host: self.host.clone(),
            repo: self.repo.clone(),
            object: self.object.clone(),
            reason: reason.into(),
        }
    }

    pub fn bad(&self, reason: impl Into<String>) -> RegistryError {
        RegistryError::BadResponse {
            host: self.host.clone(),
            repo: self.repo.clone(),
            object: self.object.clone(),
            reason: reason.into(),
        }
    }

    pub fn short(&self, got: u64, want: u64) -> RegistryError {
        RegistryError::ShortRead {
            host: self.host.clone(),
            repo: self.repo.clone(),
            object: self.object.clone(),
            got,
            want,
        }
    }

    pub fn status(
        &self,
        status: u16,
        detail: String,
        retry_after: Option<Duration>,
    ) -> RegistryError {
        if status == 404 {
            return RegistryError::NotFound {
                host: self.host.clone(),
                repo: self.repo.clone(),
                object: self.object.clone(),
            };
        }
        RegistryError::Status {
            host: self.host.clone(),
            repo: self.repo.clone(),
            object: self.object.clone(),
            status,
            detail,
            retry_after,
        }
    }
}

/// `err` with its sources, since reqwest's top-level message is vague
/// ("error sending request").
pub(crate) fn error_chain(err: &dyn std::error::Error) -> String {
    let mut s = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let m = e.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = e.source();
    }
    s
}
