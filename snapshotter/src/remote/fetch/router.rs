//! The one place where each chunk's source is decided.
//!
//! The fetcher groups the chunks a caller leads into merged requests; it
//! asks [`Router::route`] for every chunk, and cuts a request wherever the
//! route changes. A request that fails goes where [`Router::on_error`]
//! says; a chunk that fails verification is fetched once more from
//! [`Router::refetch_route`]. Sources themselves never fall back to each
//! other.
//!
//! Routes today:
//! - [`Route::Primed`]: the chunk lies inside the live window of a layer's
//!   early startup-set request ([`super::primed::PrimedSource`]);
//! - [`Route::Registry`]: everything else, and every retry.
//!
//! The P2P source is to be one more route here (a chunk whose owner knows a
//! holder), with the registry as its fallback; the fetcher does not change.

use std::sync::Arc;

use super::primed::PrimedSource;
use super::source::{RangeSource, SourceError, SourceKind};
use crate::remote::toc::Chunk;

/// Which source a request goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// The primed startup window.
    Primed,
    /// The registry.
    Registry,
}

/// The sources of one layer and the rules between them.
pub struct Router {
    registry: Arc<dyn RangeSource>,
    primed: Option<Arc<PrimedSource>>,
}

impl Router {
    /// A router with the registry (or any blob source) alone.
    pub fn new(registry: Arc<dyn RangeSource>) -> Router {
        Router {
            registry,
            primed: None,
        }
    }

    /// Also serves chunks inside `primed`'s window from it.
    #[must_use]
    pub fn with_primed(mut self, primed: Option<Arc<PrimedSource>>) -> Router {
        self.primed = primed;
        self
    }

    /// Where `chunk` is fetched from now. A chunk is primed only when all
    /// of it lies inside a window that is still live.
    pub fn route(&self, chunk: &Chunk) -> Route {
        match &self.primed {
            Some(p) if p.covers(chunk.blob_offset, chunk.blob_end) => Route::Primed,
            _ => Route::Registry,
        }
    }

    /// The source behind `route`.
    pub fn source(&self, route: Route) -> &dyn RangeSource {
        match (route, &self.primed) {
            (Route::Primed, Some(p)) => &**p,
            _ => &*self.registry,
        }
    }

    /// The kind of source behind `route`, for accounting.
    pub fn kind(&self, route: Route) -> SourceKind {
        self.source(route).kind()
    }

    /// Where a request that failed on `route` with `error` goes next, if
    /// anywhere. The primed window falls back to the registry for any
    /// error (the window is gone, or cannot serve the range); a registry
    /// error is final here (the registry client has already retried
    /// transient failures, on every mirror).
    pub fn on_error(&self, route: Route, error: &SourceError) -> Option<Route> {
        let _ = error;
        match route {
            Route::Primed => Some(Route::Registry),
            Route::Registry => None,
        }
    }

    /// Where a chunk goes after its bytes from `failed` did not verify:
    /// never the same bytes again, so never the primed window.
    pub fn refetch_route(&self, failed: Route) -> Route {
        let _ = failed;
        Route::Registry
    }

    /// The registry source, for whole-blob passes and TOC reads.
    pub fn registry(&self) -> &Arc<dyn RangeSource> {
        &self.registry
    }
}
