//! GC policy: which chunks to evict, decided from the index, the mounted
//! layers that reference chunks, pins and whether each layer can still be
//! fetched. Pure: [`plan`] touches no disk and no clock, so every rule is unit
//! tested with chosen times; [`super::cache`] gathers the inputs and applies
//! the plan.
//!
//! Rules, in order:
//! 1. A chunk no mounted layer references, not accessed for `ttl` seconds,
//!    is evicted.
//! 2. If usage is still above the high watermark, chunks are evicted by
//!    least recent access until usage is at the low watermark, among the
//!    unreferenced ones and those whose every referencing layer can still be
//!    fetched.
//! 3. A chunk of a pinned layer is never evicted (pins are bound to verified
//!    TOC digests, see [`super::cache`]). A chunk of a layer that cannot be
//!    fetched now (registry unreachable) is evicted only when the disk is
//!    truly full (a write failed with ENOSPC), and that is logged as an error
//!    by the caller.
//! 4. But what unfetchable layers keep that way is capped at
//!    `unfetchable_max_bytes`: an image controls whether its registry
//!    answers, so a layer that stops serving after it was fetched must not
//!    make its chunks unevictable. Past the cap, the oldest unfetchable
//!    chunks are evicted by rule 2 like any other (`Why::UnfetchableOverCap`).

use std::collections::HashMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::index::Entry;
use super::store::Limits;

/// Default `cache.max_bytes`.
pub const DEFAULT_MAX_BYTES: u64 = 20 << 30;
/// Default `cache.high_watermark_percent`.
pub const DEFAULT_HIGH_WATERMARK_PERCENT: u8 = 90;
/// Default `cache.low_watermark_percent`.
pub const DEFAULT_LOW_WATERMARK_PERCENT: u8 = 75;
/// Default `cache.unreferenced_ttl_secs`: one day.
pub const DEFAULT_UNREFERENCED_TTL_SECS: u64 = 24 * 3600;
/// Default `cache.gc_interval_secs`.
pub const DEFAULT_GC_INTERVAL_SECS: u64 = 300;
/// Default `cache.unfetchable_max_percent`: the share of `max_bytes` that
/// chunks of unfetchable layers may keep out of rule 2's reach.
pub const DEFAULT_UNFETCHABLE_MAX_PERCENT: u8 = 25;
/// How long a "can this layer be fetched?" answer is reused.
pub const PROBE_TTL: Duration = Duration::from_secs(30);
/// How often access times are written to the index.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(10);

/// GC settings (from `[cache]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheConfig {
    /// Capacity and watermarks.
    pub limits: Limits,
    /// Seconds an unreferenced chunk is kept after its last access.
    pub ttl_secs: u64,
    /// Time between periodic runs.
    pub interval: Duration,
    /// Bytes of unfetchable layers' chunks kept above the high watermark
    /// (rule 4); `u64::MAX`: no cap.
    pub unfetchable_max_bytes: u64,
}

impl CacheConfig {
    /// Limits from `max_bytes` and watermark percentages (0 = unlimited).
    pub fn limits(max_bytes: u64, high_percent: u8, low_percent: u8) -> Limits {
        let pct = |p: u8| (u128::from(max_bytes) * u128::from(p) / 100) as u64;
        Limits {
            max_bytes,
            high_bytes: pct(high_percent),
            low_bytes: pct(low_percent),
        }
    }

    /// Rule 4's cap from `max_bytes` and a percentage (no cap when
    /// `max_bytes` is 0, unlimited).
    pub fn unfetchable_cap(max_bytes: u64, percent: u8) -> u64 {
        if max_bytes == 0 {
            return u64::MAX;
        }
        (u128::from(max_bytes) * u128::from(percent) / 100) as u64
    }
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            limits: Self::limits(
                DEFAULT_MAX_BYTES,
                DEFAULT_HIGH_WATERMARK_PERCENT,
                DEFAULT_LOW_WATERMARK_PERCENT,
            ),
            ttl_secs: DEFAULT_UNREFERENCED_TTL_SECS,
            interval: Duration::from_secs(DEFAULT_GC_INTERVAL_SECS),
            unfetchable_max_bytes: Self::unfetchable_cap(
                DEFAULT_MAX_BYTES,
                DEFAULT_UNFETCHABLE_MAX_PERCENT,
            ),
        }
    }
}

/// A mounted layer as GC sees it.
#[derive(Clone, Debug)]
pub struct LayerRefs {
    /// Layer digest, for logs.
    pub layer: String,
    /// The chunks it references.
    pub chunks: Vec<[u8; 32]>,
    /// Pinned (the layer or its image).
    pub pinned: bool,
    /// Its blob can be fetched again now.
    pub fetchable: bool,
}

/// Why a chunk is evicted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Why {
    /// Unreferenced and past the TTL.
    Expired,
    /// Least recently used, above the high watermark.
    Lru,
    /// The disk is full and only unfetchable data was left.
    Unfetchable,
    /// Of an unfetchable layer, past `unfetchable_max_bytes` (rule 4).
    UnfetchableOverCap,
}

/// A chunk to evict.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Victim {
    /// Its digest.
    pub digest: [u8; 32],
    /// Bytes it frees.
    pub size: u64,
    /// Why.
    pub why: Why,
}

/// What [`plan`] decided, and what it had to keep.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Chunks to evict, in order.
    pub victims: Vec<Victim>,
    /// Bytes of pinned chunks.
    pub pinned_bytes: u64,
    /// Bytes kept because their layer cannot be fetched now.
    pub kept_unfetchable_bytes: u64,
    /// Usage after the plan is applied.
    pub used_after: u64,
    /// Chunks that must stay (pinned, or of a layer that cannot be fetched
    /// now): evicting a victim must not take them along (a whole-file object
    /// goes whole; see `ChunkStore::evict_keeping`).
    pub protected: std::collections::HashSet<[u8; 32]>,
}

#[derive(Clone, Copy)]
struct Refs {
    pinned: bool,
    unfetchable: bool,
}

/// Decides what to evict (see the module doc). `disk_full` allows rule 3's
/// last resort.
pub fn plan(
    entries: &[([u8; 32], Entry)],
    layers: &[LayerRefs],
    cfg: &CacheConfig,
    now: u64,
    disk_full: bool,
) -> Plan {
    let mut refs: HashMap<[u8; 32], Refs> = HashMap::new();
    for l in layers {
        for d in &l.chunks {
            let r = refs.entry(*d).or_insert(Refs {
                pinned: false,
                unfetchable: false,
            });
            r.pinned |= l.pinned;
            r.unfetchable |= !l.fetchable;
        }
    }
    let mut used: u64 = entries.iter().map(|(_, e)| e.size).sum();
    let mut out = Plan::default();
    // Rule 1. `rest`: (digest, entry, referenced, why evicted by rule 2).
    let mut rest = Vec::new();
    let mut unfetchable = Vec::new();
    for (d, e) in entries {
        match refs.get(d) {
            None if now >= e.last_access.saturating_add(cfg.ttl_secs) => {
                used -= e.size;
                out.victims.push(Victim {
                    digest: *d,
                    size: e.size,
                    why: Why::Expired,
                });
            }
            None => rest.push((d, e, false, Why::Lru)),
            Some(r) if r.pinned => {
                out.pinned_bytes += e.size;
                out.protected.insert(*d);
            }
            Some(r) if r.unfetchable => unfetchable.push((d, e)),
            Some(_) => rest.push((d, e, true, Why::Lru)),
        }
    }
    // Rule 4: the oldest unfetchable chunks past the cap join rule 2.
    unfetchable.sort_by_key(|(_, e)| e.last_access);
    let total: u64 = unfetchable.iter().map(|(_, e)| e.size).sum();
    let mut excess = total.saturating_sub(cfg.unfetchable_max_bytes);
    let over_cap = unfetchable
        .iter()
        .take_while(|(_, e)| {
            let take = excess > 0;
            excess = excess.saturating_sub(e.size);
            take
        })
        .count();
    rest.extend(
        unfetchable
            .drain(..over_cap)
            .map(|(d, e)| (d, e, true, Why::UnfetchableOverCap)),
    );
    let high = cfg.limits.high_bytes;
    let low = cfg.limits.low_bytes;
    let over = |used: u64| (high > 0 && used > high) || disk_full;
    if over(used) {
        // Rule 2: oldest first; unreferenced before referenced at equal age.
        rest.sort_by_key(|(_, e, referenced, _)| (e.last_access, *referenced));
        for (d, e, _, why) in rest {
            if used <= low {
                if why == Why::UnfetchableOverCap {
                    out.kept_unfetchable_bytes += e.size;
                }
                continue;
            }
            used -= e.size;
            out.victims.push(Victim {
                digest: *d,
                size: e.size,
                why,
            });
        }
        // Rule 3.
        for (d, e) in unfetchable {
            if used <= low || !disk_full {
                out.kept_unfetchable_bytes += e.size;
                out.protected.insert(*d);
                continue;
            }
            used -= e.size;
            out.victims.push(Victim {
                digest: *d,
                size: e.size,
                why: Why::Unfetchable,
            });
        }
    } else {
        out.kept_unfetchable_bytes = total;
        out.protected.extend(unfetchable.iter().map(|(d, _)| **d));
    }
    out.used_after = used;
    out
}

/// The result of one GC run, as `shoal gc` and `shoal status` show it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcReport {
    /// Nothing was removed; this is what would have been.
    pub dry_run: bool,
    /// What started it: `periodic`, `watermark`, `manual`.
    pub trigger: String,
    /// When it ran (seconds since the epoch).
    pub at: u64,
    /// How long it took.
    pub duration_ms: u64,
    /// Bytes in the store before.
    pub used_before: u64,
    /// Bytes in the store after (for a dry run: what would remain).
    pub used_after: u64,
    /// Bytes freed (or that would be).
    pub freed_bytes: u64,
    /// Chunks evicted (or that would be).
    pub evicted_chunks: u64,
    /// Of which: unreferenced past the TTL.
    pub evicted_expired: u64,
    /// Of which: least recently used above the high watermark.
    pub evicted_lru: u64,
    /// Of which: of unfetchable layers, because the disk was full.
    pub evicted_unfetchable: u64,
    /// Of which: of unfetchable layers, past `unfetchable_max_percent`.
    #[serde(default)]
    pub evicted_unfetchable_over_cap: u64,
    /// Chunks left because a reader was reading them.
    pub skipped_busy: u64,
    /// Bytes of pinned chunks.
    pub pinned_bytes: u64,
    /// Bytes kept because their layer cannot be fetched now.
    pub kept_unfetchable_bytes: u64,
    /// The disk was truly full (ENOSPC since the last run).
    pub disk_full: bool,
    /// Mounted layers whose registry could not be reached.
    pub unfetchable_layers: Vec<String>,
    /// Kept TOCs removed (or that would be): no snapshot references them,
    /// no pin covers them, unreferenced for the TTL.
    #[serde(default)]
    pub tocs_removed: u64,
    /// Kept TOCs left.
    #[serde(default)]
    pub tocs_kept: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(size: u64, last_access: u64) -> Entry {
        Entry { size, last_access }
    }

    fn cfg(max: u64) -> CacheConfig {
        CacheConfig {
            limits: CacheConfig::limits(max, 90, 50),
            ttl_secs: 100,
            interval: Duration::from_secs(1),
            unfetchable_max_bytes: u64::MAX,
        }
    }

    fn layer(chunks: &[u8], pinned: bool, fetchable: bool) -> LayerRefs {
        LayerRefs {
            layer: "l".into(),
            chunks: chunks.iter().map(|&c| [c; 32]).collect(),
            pinned,
            fetchable,
        }
    }

    fn digests(p: &Plan) -> Vec<(u8, Why)> {
        p.victims.iter().map(|v| (v.digest[0], v.why)).collect()
    }

    #[test]
    fn the_unfetchable_cap_is_a_share_of_max_bytes() {
        assert_eq!(CacheConfig::unfetchable_cap(20 << 30, 25), 5 << 30);
        assert_eq!(CacheConfig::unfetchable_cap(1000, 0), 0);
        assert_eq!(CacheConfig::unfetchable_cap(1000, 100), 1000);
        // No size limit: nothing to take a share of.
        assert_eq!(CacheConfig::unfetchable_cap(0, 25), u64::MAX);
    }

    #[test]
    fn unreferenced_chunks_go_only_after_the_ttl() {
        let entries = [([1; 32], e(10, 1000)), ([2; 32], e(10, 1050))];
        let layers = [];
        let c = cfg(0);
        assert!(plan(&entries, &layers, &c, 1099, false).victims.is_empty());
        assert_eq!(
            digests(&plan(&entries, &layers, &c, 1100, false)),
            [(1, Why::Expired)]
        );
        let p = plan(&entries, &layers, &c, 1150, false);
        assert_eq!(p.victims.len(), 2);
        assert_eq!(p.used_after, 0);
        // Referenced chunks never expire.
        let p = plan(&entries, &[layer(&[1, 2], false, true)], &c, 99999, false);
        assert!(p.victims.is_empty());
    }

    #[test]
    fn above_the_high_watermark_lru_down_to_the_low_one_sparing_pins_and_unfetchable() {
        // 10 chunks of 10 bytes: 100 bytes; max 100 → high 90, low 50.
        let entries: Vec<_> = (1..=10u8).map(|i| ([i; 32], e(10, u64::from(i)))).collect();
        let layers = [
            layer(&[1, 2], true, true), // pinned: never
            layer(&[3], false, false),  // unfetchable: not unless disk full
            layer(&[4, 5, 6, 7, 8, 9, 10], false, true),
        ];
        let c = cfg(100);
        let p = plan(&entries, &layers, &c, 50, false);
        assert_eq!(
            digests(&p),
            [
                (4, Why::Lru),
                (5, Why::Lru),
                (6, Why::Lru),
                (7, Why::Lru),
                (8, Why::Lru)
            ]
        );
        assert_eq!(p.used_after, 50);
        assert_eq!(p.pinned_bytes, 20);
        assert_eq!(p.kept_unfetchable_bytes, 10);
        // What eviction must not take along: the pinned and the kept chunks.
        let mut protected: Vec<u8> = p.protected.iter().map(|d| d[0]).collect();
        protected.sort_unstable();
        assert_eq!(protected, [1, 2, 3]);
        // Below the high watermark nothing referenced goes.
        assert!(plan(&entries[..9], &layers, &c, 50, false)
            .victims
            .is_empty());
        // Truly full disk, pins and only unfetchable data left: unfetchable goes too.
        let layers = [
            layer(&[1, 2, 4, 5, 6, 7, 8], true, true),
            layer(&[3, 9, 10], false, false),
        ];
        let p = plan(&entries, &layers, &c, 50, true);
        assert_eq!(
            digests(&p),
            [
                (3, Why::Unfetchable),
                (9, Why::Unfetchable),
                (10, Why::Unfetchable)
            ]
        );
        let p = plan(&entries, &layers, &c, 50, false);
        assert!(p.victims.is_empty());
        assert_eq!(p.kept_unfetchable_bytes, 30);
    }

    #[test]
    fn a_chunk_shared_with_an_unfetchable_layer_is_kept() {
        let entries = [([1; 32], e(100, 1))];
        let layers = [layer(&[1], false, true), layer(&[1], false, false)];
        let p = plan(&entries, &layers, &cfg(50), 10, false);
        assert!(p.victims.is_empty());
        assert_eq!(p.kept_unfetchable_bytes, 100);
    }

    #[test]
    fn unfetchable_chunks_past_the_cap_go_oldest_first_above_the_high_watermark() {
        // 10 chunks of 10 bytes, all of unfetchable layers; max 100 → high
        // 90, low 50; the cap keeps 30 bytes of them.
        let entries: Vec<_> = (1..=10u8).map(|i| ([i; 32], e(10, u64::from(i)))).collect();
        let layers = [
            layer(&[1, 2, 3, 4, 5], false, false),
            layer(&[6, 7, 8, 9, 10], false, false),
        ];
        let c = CacheConfig {
            unfetchable_max_bytes: 30,
            ..cfg(100)
        };
        let p = plan(&entries, &layers, &c, 50, false);
        assert_eq!(
            digests(&p),
            [
                (1, Why::UnfetchableOverCap),
                (2, Why::UnfetchableOverCap),
                (3, Why::UnfetchableOverCap),
                (4, Why::UnfetchableOverCap),
                (5, Why::UnfetchableOverCap)
            ]
        );
        assert_eq!(p.used_after, 50);
        assert_eq!(p.kept_unfetchable_bytes, 50);
        // The newest, within the cap, are protected from being taken along.
        let mut protected: Vec<u8> = p.protected.iter().map(|d| d[0]).collect();
        protected.sort_unstable();
        assert_eq!(protected, [8, 9, 10]);
        // Below the high watermark nothing goes, over the cap or not.
        assert!(plan(&entries[..9], &layers, &c, 50, false)
            .victims
            .is_empty());
        // Within the cap: kept, as before.
        let c = CacheConfig {
            unfetchable_max_bytes: 100,
            ..cfg(100)
        };
        assert!(plan(&entries, &layers, &c, 50, false).victims.is_empty());
        // Pinned chunks never count against it, nor go.
        let layers = [
            layer(&[1, 2, 3], true, false),
            layer(&[4, 5, 6, 7, 8, 9, 10], false, false),
        ];
        let c = CacheConfig {
            unfetchable_max_bytes: 0,
            ..cfg(100)
        };
        let p = plan(&entries, &layers, &c, 50, false);
        assert_eq!(p.pinned_bytes, 30);
        assert_eq!(
            digests(&p),
            (4..=8u8)
                .map(|d| (d, Why::UnfetchableOverCap))
                .collect::<Vec<_>>()
        );
    }
}
