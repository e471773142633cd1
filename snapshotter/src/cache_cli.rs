//! The CLI half of the chunk cache: `shoal gc`, `shoal pin`, `shoal unpin`,
//! and the cache and per-image parts of `shoal status` (the binary only
//! parses flags and dispatches here).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use serde_json::{json, Value};
use shoal_proto::cache::cache_client::CacheClient;
use shoal_proto::cache::{CacheUsage, CacheUsageRequest, GcReport, GcRequest, PinRequest};
use shoal_proto::status::LayerStatus;
use tonic::transport::Channel;

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start tokio runtime")
}

async fn client(address: &Path) -> anyhow::Result<CacheClient<Channel>> {
    let ch = crate::client::channel(address)
        .await
        .with_context(|| format!("connect to the Shoal daemon at {}", address.display()))?;
    Ok(CacheClient::new(ch))
}

/// Bytes for people: `1.5MiB`.
pub fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n}B")
    } else {
        format!("{v:.1}{}", UNITS[u])
    }
}

fn ratio(part: u64, whole: u64) -> Option<f64> {
    (whole > 0).then(|| part as f64 / whole as f64)
}

/// Whether a layer is covered by one of `pins`.
pub fn pinned(pins: &[String], l: &LayerStatus) -> bool {
    pins.iter()
        .any(|p| *p == l.layer_digest || *p == l.image_ref)
}

/// Fraction of a layer's bytes served from the local store.
pub fn layer_hit_rate(l: &LayerStatus) -> Option<f64> {
    ratio(
        l.served_from_cache,
        l.served_from_cache + l.served_after_fetch,
    )
}

/// `shoal gc [--dry-run] [--json]`.
///
/// # Errors
/// The daemon is unreachable or refused.
pub fn gc(address: &Path, dry_run: bool, as_json: bool) -> anyhow::Result<()> {
    let r = runtime()?.block_on(async {
        let r = client(address)
            .await?
            .gc(GcRequest { dry_run })
            .await
            .context("gc request")?;
        anyhow::Ok(r.into_inner())
    })?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&report_json(&r))?);
        return Ok(());
    }
    let verb = if r.dry_run { "would free" } else { "freed" };
    println!(
        "{verb} {} in {} chunk(s): {} unreferenced past the TTL, {} least recently used, \
         {} of unreachable layers past their share of the cache, {} of unreachable layers (disk full)",
        human(r.freed_bytes),
        r.evicted_chunks,
        r.evicted_expired,
        r.evicted_lru,
        r.evicted_unfetchable_over_cap,
        r.evicted_unfetchable
    );
    println!(
        "cache {} -> {}; pinned {}; kept (registry unreachable) {}; being read, skipped {}{}",
        human(r.used_before),
        human(r.used_after),
        human(r.pinned_bytes),
        human(r.kept_unfetchable_bytes),
        r.skipped_busy,
        if r.disk_full { "; DISK FULL" } else { "" }
    );
    println!(
        "kept TOCs: {} {}, {} left",
        r.tocs_removed,
        if r.dry_run {
            "would be removed"
        } else {
            "removed"
        },
        r.tocs_kept
    );
    for l in &r.unfetchable_layers {
        println!("  cannot be fetched now: {l}");
    }
    Ok(())
}

/// `shoal pin TARGET` / `shoal unpin TARGET`.
///
/// # Errors
/// The daemon is unreachable or refused the target.
pub fn pin(address: &Path, target: &str, unpin: bool) -> anyhow::Result<()> {
    let r = runtime()?.block_on(async {
        let mut c = client(address).await?;
        let req = PinRequest {
            target: target.to_owned(),
        };
        let r = if unpin {
            c.unpin(req).await
        } else {
            c.pin(req).await
        };
        anyhow::Ok(
            r.map_err(|s| anyhow::anyhow!("{}", s.message()))?
                .into_inner(),
        )
    })?;
    let what = match (unpin, r.changed) {
        (false, true) => "pinned",
        (false, false) => "already pinned",
        (true, true) => "unpinned",
        (true, false) => "was not pinned",
    };
    println!(
        "{target}: {what} (covers {} layer(s) now, mounted or with a kept TOC)",
        r.layers
    );
    Ok(())
}

/// The cache's usage, for `shoal status`; `None` if the daemon does not
/// serve the cache API.
pub async fn usage(channel: Channel) -> Option<CacheUsage> {
    CacheClient::new(channel)
        .usage(CacheUsageRequest {})
        .await
        .ok()
        .map(tonic::Response::into_inner)
}

/// A GC report as JSON.
pub fn report_json(r: &GcReport) -> Value {
    json!({
        "dry_run": r.dry_run, "trigger": r.trigger, "at": r.at, "duration_ms": r.duration_ms,
        "used_before": r.used_before, "used_after": r.used_after,
        "freed_bytes": r.freed_bytes, "evicted_chunks": r.evicted_chunks,
        "evicted_expired": r.evicted_expired, "evicted_lru": r.evicted_lru,
        "evicted_unfetchable": r.evicted_unfetchable,
        "evicted_unfetchable_over_cap": r.evicted_unfetchable_over_cap,
        "skipped_busy": r.skipped_busy,
        "tocs_removed": r.tocs_removed, "tocs_kept": r.tocs_kept,
        "pinned_bytes": r.pinned_bytes, "kept_unfetchable_bytes": r.kept_unfetchable_bytes,
        "disk_full": r.disk_full, "unfetchable_layers": r.unfetchable_layers,
    })
}

/// Cache usage as JSON.
pub fn usage_json(u: &CacheUsage) -> Value {
    let lookups = u.memory_hits + u.disk_hits + u.misses;
    json!({
        "used_bytes": u.used_bytes, "chunks": u.chunks, "max_bytes": u.max_bytes,
        "high_watermark_bytes": u.high_bytes, "low_watermark_bytes": u.low_bytes,
        "unreferenced_ttl_secs": u.unreferenced_ttl_secs, "gc_interval_secs": u.gc_interval_secs,
        "pins": u.pins,
        "hit_rate": ratio(u.memory_hits + u.disk_hits, lookups),
        "lookups": {"memory": u.memory_hits, "disk": u.disk_hits, "miss": u.misses},
        "bytes_by_source": {"cache": u.served_from_cache, "registry": u.served_after_fetch},
        "not_cached": u.not_cached, "not_cached_at_limit": u.at_limit,
        "write_failures": u.write_failures, "last_full": u.last_full,
        "gc_runs": u.gc_runs, "evicted_chunks": u.evicted_chunks, "evicted_bytes": u.evicted_bytes,
        "last_gc": u.last_gc.as_ref().map(report_json),
    })
}

#[derive(Default)]
struct Image {
    layers: u64,
    chunks_local: u64,
    chunks_total: u64,
    bytes_local: u64,
    bytes_total: u64,
    from_cache: u64,
    after_fetch: u64,
    pinned: bool,
}

fn images(layers: &[LayerStatus], pins: &[String]) -> BTreeMap<String, Image> {
    let mut m: BTreeMap<String, Image> = BTreeMap::new();
    for l in layers {
        let i = m.entry(l.image_ref.clone()).or_default();
        i.layers += 1;
        i.chunks_local += l.chunks_local;
        i.chunks_total += l.chunks_total;
        i.bytes_local += l.bytes_local;
        i.bytes_total += l.bytes_total;
        i.from_cache += l.served_from_cache;
        i.after_fetch += l.served_after_fetch;
        i.pinned |= pins.contains(&l.image_ref);
    }
    m
}

/// Per-image totals as JSON.
pub fn images_json(layers: &[LayerStatus], pins: &[String]) -> Value {
    images(layers, pins)
        .into_iter()
        .map(|(r, i)| {
            json!({
                "image_ref": r, "layers": i.layers,
                "chunks_local": i.chunks_local, "chunks_total": i.chunks_total,
                "bytes_local": i.bytes_local, "bytes_total": i.bytes_total,
                "bytes_by_source": {"cache": i.from_cache, "registry": i.after_fetch},
                "hit_rate": ratio(i.from_cache, i.from_cache + i.after_fetch),
                "pinned": i.pinned,
            })
        })
        .collect()
}

fn pct(r: Option<f64>) -> String {
    r.map_or_else(|| "-".into(), |r| format!("{:.0}%", r * 100.0))
}

/// The text of `shoal status` after the layer table: images, the cache
/// against its limits, and the last GC.
pub fn print_text(layers: &[LayerStatus], u: &CacheUsage) {
    let imgs = images(layers, &u.pins);
    if !imgs.is_empty() {
        println!(
            "\n{:<6} {:>15} {:>24} {:>10} {:>10} {:>5} {:>6}  IMAGE",
            "LAYERS", "CHUNKS", "BYTES LOCAL", "CACHE", "REGISTRY", "HIT", "PINNED"
        );
        for (r, i) in &imgs {
            println!(
                "{:<6} {:>15} {:>24} {:>10} {:>10} {:>5} {:>6}  {}",
                i.layers,
                format!("{}/{}", i.chunks_local, i.chunks_total),
                format!("{}/{}", human(i.bytes_local), human(i.bytes_total)),
                human(i.from_cache),
                human(i.after_fetch),
                pct(ratio(i.from_cache, i.from_cache + i.after_fetch)),
                if i.pinned { "yes" } else { "no" },
                r
            );
        }
    }
    let limit = if u.max_bytes == 0 {
        "no limit".to_owned()
    } else {
        format!(
            "max {} (GC from {} down to {})",
            human(u.max_bytes),
            human(u.high_bytes),
            human(u.low_bytes)
        )
    };
    let lookups = u.memory_hits + u.disk_hits + u.misses;
    println!(
        "\ncache: {} in {} chunk(s), {limit}; unreferenced TTL {}s; hit rate {} of {} lookups; \
         served {} from cache, {} from registry",
        human(u.used_bytes),
        u.chunks,
        u.unreferenced_ttl_secs,
        pct(ratio(u.memory_hits + u.disk_hits, lookups)),
        lookups,
        human(u.served_from_cache),
        human(u.served_after_fetch)
    );
    if u.not_cached > 0 {
        println!(
            "cache full: {} verified chunk(s) served without caching ({} at max_bytes, {} write failures)",
            u.not_cached, u.at_limit, u.write_failures
        );
    }
    if !u.pins.is_empty() {
        println!("pinned: {}", u.pins.join(", "));
    }
    match &u.last_gc {
        Some(g) => println!(
            "last GC ({}, {}s ago epoch {}): freed {} in {} chunk(s), cache {} -> {}; {} kept TOC(s) removed, {} left{}",
            g.trigger,
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
                .saturating_sub(g.at),
            g.at,
            human(g.freed_bytes),
            g.evicted_chunks,
            human(g.used_before),
            human(g.used_after),
            g.tocs_removed,
            g.tocs_kept,
            if g.disk_full { ", DISK FULL" } else { "" }
        ),
        None => println!("last GC: none yet"),
    }
}
