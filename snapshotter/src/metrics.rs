//! The Prometheus `/metrics` endpoint (`[metrics] address`, off by
//! default): plain HTTP, one route, text exposition format.
//!
//! The daemon's counters stay plain atomics where they are kept; a
//! [`Collector`] reads them at scrape time, so the hot path pays nothing for
//! metrics. Only the fetch latency histograms are prometheus-client types
//! (`remote::fetch::FetchStats::latency`).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::Context;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tracing::{error, info};

use crate::overlay::Snapshotter;
use crate::remote::fetch::SourceKind;
use crate::remote::layers::RemoteLayers;

struct Daemon(Arc<Snapshotter>);

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Daemon")
    }
}

fn load(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

fn counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    values: &[(&str, &str, u64)],
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    match values {
        [("", _, n)] => ConstCounter::new(*n).encode(m),
        _ => {
            for (k, v, n) in values {
                ConstCounter::new(*n).encode(m.encode_family(&[(*k, *v)])?)?;
            }
            Ok(())
        }
    }
}

fn gauge(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    n: u64,
) -> Result<(), std::fmt::Error> {
    let m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    ConstGauge::new(i64::try_from(n).unwrap_or(i64::MAX)).encode(m)
}

fn encode_remote(r: &RemoteLayers, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
    let f = &r.fetcher().stats;
    let store = r.fetcher().store();
    let s = &store.stats;
    let c = r.cache();
    counter(
        &mut enc,
        "shoal_fuse_read_bytes",
        "Bytes served to FUSE readers, by where they came from.",
        &[
            ("source", "cache", load(&f.served_from_cache)),
            ("source", "fetched", load(&f.served_after_fetch)),
        ],
    )?;
    let by_source: Vec<_> = SourceKind::ALL
        .iter()
        .map(|k| ("source", k.label(), f.by_source.get(*k)))
        .collect();
    counter(
        &mut enc,
        "shoal_fetch_bytes",
        "Compressed bytes received, by kind of source (primed startup window, registry, peer).",
        &by_source,
    )?;
    counter(
        &mut enc,
        "shoal_fetch_on_demand_bytes",
        "Uncompressed chunk bytes that reads fetched themselves (outside every prefetch).",
        &[("", "", load(&f.fetched_on_demand))],
    )?;
    counter(
        &mut enc,
        "shoal_fetch_requests",
        "Range requests sent to sources.",
        &[("", "", load(&f.requests))],
    )?;
    counter(
        &mut enc,
        "shoal_fetch_errors",
        "Range requests that failed.",
        &[("", "", load(&f.source_errors))],
    )?;
    gauge(
        &mut enc,
        "shoal_fetches_in_flight",
        "Range requests under way.",
        load(&f.in_flight),
    )?;
    counter(
        &mut enc,
        "shoal_verify_failures",
        "Chunks whose bytes did not match their digest (dropped).",
        &[
            ("stage", "fetch", load(&f.verify_failures)),
            ("stage", "disk", load(&s.corrupt_on_disk)),
        ],
    )?;
    counter(
        &mut enc,
        "shoal_fallbacks",
        "Fallbacks: layers pulled normally instead of lazily (toc, toc_limit, mount, conflict: \
         the chain ID is held by an unverified lazy layer of another blob), \
         and verified chunks served without being cached (cache_full, cache_write_error).",
        &[
            (
                "reason",
                "toc",
                load(&r.stats.fallbacks_toc).saturating_sub(load(&r.stats.fallbacks_toc_limit)),
            ),
            ("reason", "toc_limit", load(&r.stats.fallbacks_toc_limit)),
            ("reason", "mount", load(&r.stats.fallbacks_mount)),
            ("reason", "conflict", load(&r.stats.fallbacks_conflict)),
            ("reason", "cache_full", load(&s.at_limit)),
            ("reason", "cache_write_error", load(&s.write_failures)),
        ],
    )?;
    let (verified, quarantined) = r.check_counts();
    counter(
        &mut enc,
        "shoal_layer_checks",
        "Lazy layers whose content was checked against their chain ID (diffID), by result; \
         a quarantined layer is never served again.",
        &[
            ("result", "verified", verified),
            ("result", "quarantined", quarantined),
        ],
    )?;
    counter(
        &mut enc,
        "shoal_kept_tocs_bad",
        "Kept TOCs that failed verification when read (torn by a crash, corrupted on disk); \
         each was removed and fetched again.",
        &[("", "", load(&r.stats.bad_kept_tocs))],
    )?;
    counter(
        &mut enc,
        "shoal_store_lookups",
        "Chunk store lookups, by result.",
        &[
            ("result", "memory", load(&s.memory_hits)),
            ("result", "disk", load(&s.disk_hits)),
            ("result", "miss", load(&s.misses)),
        ],
    )?;
    counter(
        &mut enc,
        "shoal_gc_runs",
        "GC runs (dry runs excluded).",
        &[("", "", load(&c.stats.runs))],
    )?;
    counter(
        &mut enc,
        "shoal_gc_evictions",
        "Chunks evicted by GC.",
        &[("", "", load(&s.evicted))],
    )?;
    counter(
        &mut enc,
        "shoal_gc_freed_bytes",
        "Bytes freed by GC.",
        &[("", "", load(&s.evicted_bytes))],
    )?;
    gauge(
        &mut enc,
        "shoal_cache_bytes",
        "Bytes in the chunk store.",
        store.index().used(),
    )?;
    gauge(
        &mut enc,
        "shoal_cache_chunks",
        "Chunks in the chunk store.",
        store.index().len() as u64,
    )?;
    gauge(
        &mut enc,
        "shoal_cache_max_bytes",
        "cache.max_bytes (0: no limit).",
        store.limits().max_bytes,
    )?;
    counter(
        &mut enc,
        "shoal_passthrough_files",
        "Files handed to the kernel for passthrough (once per inode and mount); \
         their reads bypass the daemon and are not in shoal_fuse_read_bytes.",
        &[("", "", load(&f.passthrough_files))],
    )?;
    let (objects, object_bytes) = store.objects().totals();
    gauge(
        &mut enc,
        "shoal_file_objects",
        "Whole-file objects (large all-local files laid out for passthrough).",
        objects,
    )?;
    gauge(
        &mut enc,
        "shoal_file_object_bytes",
        "Bytes in whole-file objects (part of shoal_cache_bytes).",
        object_bytes,
    )?;
    gauge(
        &mut enc,
        "shoal_layers_mounted",
        "Layers mounted lazily now.",
        r.mounted_count() as u64,
    )?;
    Ok(())
}

impl Collector for Daemon {
    fn encode(&self, enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        match self.0.remote() {
            Some(r) => encode_remote(r, enc),
            None => Ok(()),
        }
    }
}

/// The registry of `sn`'s metrics.
pub fn registry(sn: Arc<Snapshotter>) -> Registry {
    let mut reg = Registry::default();
    if let Some(r) = sn.remote() {
        reg.register(
            "shoal_fetch_duration_seconds",
            "Duration of one Range request, by source.",
            (*r.fetcher().stats.latency).clone(),
        );
    }
    reg.register_collector(Box::new(Daemon(sn)));
    reg
}

/// The text exposition of `reg`.
pub fn render(reg: &Registry) -> String {
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, reg) {
        error!(error = %e, "cannot encode metrics");
    }
    out
}

/// Binds `addr` and serves `GET /metrics` until the runtime ends.
///
/// # Errors
/// The address cannot be bound.
pub async fn serve(addr: SocketAddr, sn: Arc<Snapshotter>) -> anyhow::Result<()> {
    let reg = Arc::new(registry(sn));
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let reg = reg.clone();
            async move {
                let body = tokio::task::spawn_blocking(move || render(&reg))
                    .await
                    .unwrap_or_default();
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    body,
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("bind metrics address {addr}"))?;
    info!(address = %addr, "serving Prometheus metrics on /metrics");
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            error!(error = %e, "metrics server stopped");
        }
    });
    Ok(())
}
