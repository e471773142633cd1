//! What a chunk source is: [`RangeSource`] gives bytes of a layer blob, with
//! a typed [`SourceError`] the [`super::router::Router`] acts on.
//!
//! Nothing a source returns is trusted: the fetcher verifies every chunk
//! against its TOC digest, whichever source sent it.

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;

use crate::registry::RegistryError;

/// A boxed future, for object-safe async traits.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where a source sends the pieces of a range as they arrive (blob offset,
/// bytes). A retry may send a range again from its start; the receiver
/// skips what it has.
pub type Sink = crate::registry::BodySink;

/// Which kind of source served bytes: the label of per-source accounting
/// in `shoal status`, `/metrics` and the fetch log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SourceKind {
    /// The early request for a layer's startup set ([`super::primed`]).
    Primed,
    /// The registry (through its mirrors).
    Registry,
    /// Another Shoal node.
    Peer,
}

impl SourceKind {
    /// Every kind, in display order.
    pub const ALL: [SourceKind; 3] = [SourceKind::Primed, SourceKind::Registry, SourceKind::Peer];

    /// The label used in metrics, logs and status.
    pub fn label(self) -> &'static str {
        match self {
            SourceKind::Primed => "primed",
            SourceKind::Registry => "registry",
            SourceKind::Peer => "peer",
        }
    }
}

/// Why a source gave no bytes. The router decides what each means for the
/// next step (see [`super::router::Router::on_error`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    /// The source does not hold these bytes (a 404, a peer without the
    /// chunk, a primed window that cannot serve the range).
    #[error("not found: {0}")]
    NotFound(String),
    /// It may work if asked again, here or elsewhere (timeouts, resets,
    /// 5xx, a slow body).
    #[error("{0}")]
    Transient(String),
    /// The source answered with bytes that are provably wrong (a length it
    /// was not asked for). Verification failures are found by the fetcher
    /// and routed by [`super::router::Router::refetch_route`].
    #[error("bad answer: {0}")]
    Lied(String),
    /// Asking again will not help (refused credentials, a bad reference).
    #[error("{0}")]
    Fatal(String),
}

impl From<RegistryError> for SourceError {
    fn from(e: RegistryError) -> Self {
        match &e {
            RegistryError::NotFound { .. } => SourceError::NotFound(e.to_string()),
            _ if e.is_transient() => SourceError::Transient(e.to_string()),
            _ => SourceError::Fatal(e.to_string()),
        }
    }
}

/// An error whose kind is not known (a test source's message, a local
/// failure): treated as transient.
impl From<String> for SourceError {
    fn from(message: String) -> Self {
        SourceError::Transient(message)
    }
}

impl From<&str> for SourceError {
    fn from(message: &str) -> Self {
        SourceError::Transient(message.to_owned())
    }
}

/// Somewhere a layer blob's bytes can be read from. Nothing it returns is
/// trusted.
pub trait RangeSource: Send + Sync {
    /// Exactly `len` bytes of the blob at `offset`.
    ///
    /// # Errors
    /// [`SourceError`], naming the source in its message.
    fn fetch(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<Bytes, SourceError>>;
    /// [`RangeSource::fetch`], also sending pieces of the range to `sink` as
    /// they arrive (each with its blob offset; a retry may send a range
    /// again from its start). The default sends the whole range at the end.
    ///
    /// # Errors
    /// As [`RangeSource::fetch`].
    fn fetch_streamed(
        &self,
        offset: u64,
        len: u64,
        sink: Sink,
    ) -> BoxFuture<'_, Result<Bytes, SourceError>> {
        Box::pin(async move {
            let b = self.fetch(offset, len).await?;
            let _ = sink.send((offset, b.clone()));
            Ok(b)
        })
    }
    /// Name for logs (`registry`, a peer address).
    fn name(&self) -> &str;
    /// Kind, for accounting. Blob sources are the registry unless they say
    /// otherwise.
    fn kind(&self) -> SourceKind {
        SourceKind::Registry
    }
}
