//! The fetcher's counters: bytes, requests, errors and latency, by kind of
//! source where it matters ([`SourceBytes`]); read by `shoal status` and
//! `/metrics`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};

use super::source::SourceKind;

/// Fetch latency histograms, labelled by source.
pub type LatencyFamily = Family<Vec<(String, String)>, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 1 ms .. ~33 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// Counters for status and metrics.
#[derive(Debug)]
pub struct FetchStats {
    /// Compressed bytes received from sources.
    pub bytes_fetched: AtomicU64,
    /// Range requests issued.
    pub requests: AtomicU64,
    /// Chunks that failed verification (each attempt counts).
    pub verify_failures: AtomicU64,
    /// Source errors.
    pub source_errors: AtomicU64,
    /// Chunks stored to memory but not to disk (disk full or failing).
    pub not_cached: AtomicU64,
    /// Fetches in flight now.
    pub in_flight: AtomicU64,
    /// Bytes served to FUSE readers straight from the store.
    pub served_from_cache: AtomicU64,
    /// Bytes served to FUSE readers after a fetch from a source.
    pub served_after_fetch: AtomicU64,
    /// Uncompressed chunk bytes that reads fetched themselves.
    pub fetched_on_demand: AtomicU64,
    /// Files handed to the kernel for passthrough (once per inode and
    /// mount); their reads never reach the daemon.
    pub passthrough_files: AtomicU64,
    /// Compressed bytes received, by kind of source.
    pub by_source: SourceBytes,
    /// Seconds per Range request, by kind of source.
    pub latency: Arc<LatencyFamily>,
}

/// Compressed bytes received from each kind of source.
#[derive(Debug, Default)]
pub struct SourceBytes([AtomicU64; SourceKind::ALL.len()]);

impl SourceBytes {
    pub(super) fn add(&self, kind: SourceKind, n: u64) {
        self.0[kind as usize].fetch_add(n, Ordering::Relaxed);
    }

    /// Bytes received from `kind` so far.
    pub fn get(&self, kind: SourceKind) -> u64 {
        self.0[kind as usize].load(Ordering::Relaxed)
    }
}

impl Default for FetchStats {
    fn default() -> Self {
        FetchStats {
            bytes_fetched: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            verify_failures: AtomicU64::new(0),
            source_errors: AtomicU64::new(0),
            not_cached: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            served_from_cache: AtomicU64::new(0),
            served_after_fetch: AtomicU64::new(0),
            fetched_on_demand: AtomicU64::new(0),
            passthrough_files: AtomicU64::new(0),
            by_source: SourceBytes::default(),
            latency: Arc::new(Family::new_with_constructor(latency_histogram)),
        }
    }
}
