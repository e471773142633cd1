//! The chunk cache's control half: which mounted layers reference which
//! chunks, pins, "can this layer be fetched again?" probes, and running GC
//! ([`super::gc`] decides, this applies) periodically, when usage crosses
//! the high watermark, and on `shoal gc`. Each run also collects the kept
//! TOCs ([`super::tocs`]), which name the chunks of pinned layers that are
//! not mounted.
//!
//! Invariants:
//! - One GC run at a time (`running`).
//! - Probes run concurrently, at most [`PROBE_CONCURRENCY`] at a time, each
//!   within [`PROBE_TIMEOUT`]: a dead registry costs a run about one
//!   timeout, not one per layer.
//! - Access times reach redb at most every [`FLUSH_INTERVAL`], and after
//!   each GC run.
//! - A layer counts as fetchable only if its blob's size was read from its
//!   source within [`PROBE_TTL`]; a probe that fails or times out makes it
//!   unfetchable, so GC keeps its chunks (up to `unfetchable_max_percent`
//!   of the cache, see [`super::gc`]).
//! - Pins are bound to verified TOCs: `shoal pin TARGET` binds the pin to
//!   the TOC digests of the layers Shoal has then for TARGET (mounted, or
//!   recorded with a kept TOC), and from then on a layer counts as pinned
//!   only if its TOC digest is bound. Its TOC verified against that digest,
//!   so its chunks are the pinned layer's. The image reference and layer
//!   digest labels an image sends are never enough: an image can claim any.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::runtime::Handle;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::{debug, error, info, warn};

use super::gc::{plan, CacheConfig, GcReport, LayerRefs, Why, FLUSH_INTERVAL, PROBE_TTL};
use super::layer::LayerReader;
use super::layers::Blobs;
use super::store::{ChunkStore, Evicted};
use super::tocs::KeptTocs;
use crate::metadata::RemoteRef;
use crate::registry::Reference;

/// How long one fetchability probe may take.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// How many fetchability probes run at once.
pub const PROBE_CONCURRENCY: usize = 8;

/// Counters for metrics.
#[derive(Debug, Default)]
pub struct GcStats {
    /// GC runs that removed (or could have removed) something, dry runs
    /// excluded.
    pub runs: AtomicU64,
}

struct Mounted {
    remote: RemoteRef,
    reader: Arc<LayerReader>,
}

/// See the module doc.
pub struct Cache {
    store: Arc<ChunkStore>,
    blobs: Arc<dyn Blobs>,
    tocs: Arc<KeptTocs>,
    cfg: Mutex<CacheConfig>,
    layers: Mutex<HashMap<u64, Mounted>>,
    probes: Mutex<HashMap<String, (Instant, bool)>>,
    last: Mutex<Option<GcReport>>,
    running: tokio::sync::Mutex<()>,
    /// Counters.
    pub stats: GcStats,
}

/// What `shoal pin` / `unpin` changed.
#[derive(Clone, Debug)]
pub struct PinOutcome {
    /// The pin was added (pin) or removed (unpin); false: nothing changed.
    pub changed: bool,
    /// Layers it covers now: mounted, or with a kept TOC.
    pub layers: u64,
}

/// A pin target must be a layer digest or an image reference.
///
/// # Errors
/// A message saying what is wrong with it.
pub fn check_pin_target(target: &str) -> Result<(), String> {
    if let Some(hex) = target.strip_prefix("sha256:") {
        if hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        {
            return Ok(());
        }
        return Err(format!(
            "{target:?} is not a sha256 digest (sha256: and 64 lowercase hex digits)"
        ));
    }
    target
        .parse::<Reference>()
        .map(drop)
        .map_err(|e| format!("{target:?} is neither a layer digest nor an image reference: {e}"))
}

impl Cache {
    /// A cache over `store`, probing layers through `blobs`, with the
    /// layers' TOCs kept in `tocs`.
    pub fn new(store: Arc<ChunkStore>, blobs: Arc<dyn Blobs>, tocs: Arc<KeptTocs>) -> Cache {
        Cache {
            store,
            blobs,
            tocs,
            cfg: Mutex::new(CacheConfig::default()),
            layers: Mutex::new(HashMap::new()),
            probes: Mutex::new(HashMap::new()),
            last: Mutex::new(None),
            running: tokio::sync::Mutex::new(()),
            stats: GcStats::default(),
        }
    }

    /// Sets limits, TTL and interval.
    pub fn configure(&self, cfg: CacheConfig) {
        self.store.set_limits(cfg.limits);
        *self.cfg.lock() = cfg;
    }

    /// The settings.
    pub fn config(&self) -> CacheConfig {
        *self.cfg.lock()
    }

    /// The store.
    pub fn store(&self) -> &Arc<ChunkStore> {
        &self.store
    }

    /// The kept TOCs.
    pub fn tocs(&self) -> &Arc<KeptTocs> {
        &self.tocs
    }

    /// Notes that snapshot `id` serves layer `remote` through `reader`.
    /// Memory only: it runs inside the snapshot's write transaction.
    pub fn register(&self, id: u64, remote: RemoteRef, reader: Arc<LayerReader>) {
        self.layers.lock().insert(id, Mounted { remote, reader });
    }

    /// Notes that snapshot `id` is unmounted, and records its layer with
    /// its kept TOC so pins still cover it. Blocking (a database write the
    /// first time a layer or image is unmounted); never call it inside a
    /// redb write transaction.
    pub fn unregister(&self, id: u64) {
        let Some(m) = self.layers.lock().remove(&id) else {
            return;
        };
        if let Err(e) = self.tocs.note_mounted(&m.remote) {
            error!(layer = %m.remote.layer_digest, error = %e,
                   "cannot record the layer; a pin will not keep its chunks now it is unmounted");
        }
    }

    /// Whether `remote` is covered by a pin: `pinned` are the TOC digests
    /// pins are bound to ([`Cache::pinned_tocs`]).
    pub fn is_pinned(pinned: &HashSet<String>, remote: &RemoteRef) -> bool {
        pinned.contains(&remote.toc_digest)
    }

    /// The TOC digests of pinned layers (empty on a database error, which
    /// is logged).
    pub fn pinned_tocs(&self) -> HashSet<String> {
        pinned_tocs(&self.store)
    }

    /// The pins (empty on a database error, which is logged).
    pub fn pins(&self) -> HashSet<String> {
        self.store.index().pins().unwrap_or_else(|e| {
            error!(error = %e, "cannot read pins");
            HashSet::new()
        })
    }

    /// Distinct layers (by TOC) whose labels name `target` now: mounted,
    /// or recorded with a kept TOC.
    fn claiming(&self, target: &str) -> BTreeSet<String> {
        let pins = HashSet::from([target.to_owned()]);
        let mut tocs: BTreeSet<String> = self
            .layers
            .lock()
            .values()
            .filter(|m| m.remote.layer_digest == target || m.remote.image_ref == target)
            .map(|m| m.remote.toc_digest.clone())
            .collect();
        match self.tocs.records() {
            Ok(r) => tocs.extend(
                r.into_iter()
                    .filter(|(_, rec)| rec.pinned_by(&pins))
                    .map(|(d, _)| d),
            ),
            Err(e) => warn!(error = %e, "cannot read the TOC records"),
        }
        tocs
    }

    /// Layers (TOCs) pin `target` is bound to.
    fn bound(&self, target: &str) -> u64 {
        self.store
            .index()
            .pin_bindings()
            .ok()
            .and_then(|mut b| b.remove(target))
            .map_or(0, |t| t.len() as u64)
    }

    /// Pins an image reference or a layer digest: GC never evicts the
    /// chunks of a layer it covers, mounted or not (found through its kept
    /// TOC), nor removes that TOC. The pin covers the layers Shoal has for
    /// `target` now, by their verified TOC digests (see the module doc);
    /// pinning again after pulling a new version adds that version's.
    /// Blocking.
    ///
    /// # Errors
    /// A bad target, or the database failed.
    pub fn pin(&self, target: &str) -> Result<PinOutcome, String> {
        check_pin_target(target)?;
        let index = self.store.index();
        let changed = index
            .pin(target, self.store.clock().now())
            .map_err(|e| e.to_string())?;
        let tocs = self.claiming(target);
        index.bind_pin(target, &tocs).map_err(|e| e.to_string())?;
        info!(target, tocs = ?tocs, "pinned");
        Ok(PinOutcome {
            changed,
            layers: self.bound(target),
        })
    }

    /// Removes a pin.
    ///
    /// # Errors
    /// The database failed.
    pub fn unpin(&self, target: &str) -> Result<PinOutcome, String> {
        let changed = self
            .store
            .index()
            .unpin(target)
            .map_err(|e| e.to_string())?;
        if changed {
            info!(target, "unpinned");
        }
        Ok(PinOutcome {
            changed,
            layers: self.bound(target),
        })
    }

    /// The last GC report (this run of the daemon, else the stored one).
    pub fn last_report(&self) -> Option<GcReport> {
        if let Some(r) = self.last.lock().clone() {
            return Some(r);
        }
        let json = self.store.index().last_gc().ok().flatten()?;
        serde_json::from_slice(&json).ok()
    }

    /// Whether each layer can be fetched again now, by `image\nlayer`
    /// key: answers younger than [`PROBE_TTL`] are reused, the others
    /// probed concurrently (see the module doc).
    async fn probe_all(&self, remotes: &[RemoteRef]) -> HashMap<String, bool> {
        let key = |r: &RemoteRef| format!("{}\n{}", r.image_ref, r.layer_digest);
        let mut out = HashMap::new();
        let mut todo = Vec::new();
        {
            let probes = self.probes.lock();
            for r in remotes {
                let k = key(r);
                match probes.get(&k) {
                    Some((at, ok)) if at.elapsed() < PROBE_TTL => {
                        out.insert(k, *ok);
                    }
                    _ if out.contains_key(&k) || todo.iter().any(|(t, _)| *t == k) => {}
                    _ => todo.push((k, r.clone())),
                }
            }
        }
        let permits = Arc::new(Semaphore::new(PROBE_CONCURRENCY));
        let mut set = JoinSet::new();
        for (k, r) in todo {
            let (blobs, permits) = (self.blobs.clone(), permits.clone());
            set.spawn(async move {
                let _permit = permits.acquire_owned().await;
                let ok = matches!(
                    tokio::time::timeout(PROBE_TIMEOUT, blobs.size(&r)).await,
                    Ok(Ok(_))
                );
                (k, r, ok)
            });
        }
        while let Some(done) = set.join_next().await {
            // A probe that panicked leaves no answer: unfetchable.
            let Ok((k, r, ok)) = done else { continue };
            if !ok {
                warn!(layer = %r.layer_digest, image = %r.image_ref,
                      "layer cannot be fetched now; GC keeps its chunks");
            }
            self.probes.lock().insert(k.clone(), (Instant::now(), ok));
            out.insert(k, ok);
        }
        out
    }

    async fn layer_refs(
        &self,
        pins: &HashSet<String>,
        mounted: Vec<(RemoteRef, Arc<LayerReader>)>,
    ) -> Vec<LayerRefs> {
        // A pinned layer is kept whatever the answer: no need to ask.
        let ask: Vec<RemoteRef> = mounted
            .iter()
            .filter(|(r, _)| !Self::is_pinned(pins, r))
            .map(|(r, _)| r.clone())
            .collect();
        let answers = self.probe_all(&ask).await;
        mounted
            .into_iter()
            .map(|(remote, reader)| {
                let pinned = Self::is_pinned(pins, &remote);
                let k = format!("{}\n{}", remote.image_ref, remote.layer_digest);
                LayerRefs {
                    layer: remote.layer_digest.clone(),
                    chunks: reader.all_chunks().iter().map(|c| c.digest).collect(),
                    pinned,
                    fetchable: pinned || answers.get(&k).copied().unwrap_or(false),
                }
            })
            .collect()
    }

    /// Runs GC once (see [`super::gc`]); a dry run only reports.
    pub async fn gc(&self, dry_run: bool, trigger: &str) -> GcReport {
        let _one = self.running.lock().await;
        let started = Instant::now();
        let cfg = self.config();
        let now = self.store.clock().now();
        let mounted: Vec<(RemoteRef, Arc<LayerReader>)> = self
            .layers
            .lock()
            .values()
            .map(|m| (m.remote.clone(), m.reader.clone()))
            .collect();
        // The database's work runs on the blocking pool, off the runtime.
        let (store, tocs) = (self.store.clone(), self.tocs.clone());
        let in_use: Vec<RemoteRef> = mounted.iter().map(|(r, _)| r.clone()).collect();
        let read = tokio::task::spawn_blocking(move || {
            let pins = pinned_tocs(&store);
            let kept = tocs.collect(&in_use, &pins, cfg.ttl_secs, now, dry_run);
            (pins, kept)
        })
        .await;
        // Without the pins nothing is evicted.
        let Ok((pins, kept)) = read else {
            error!(trigger, "GC skipped: reading the pins and kept TOCs failed");
            return GcReport {
                dry_run,
                trigger: trigger.to_owned(),
                at: now,
                ..GcReport::default()
            };
        };
        let mut layers = self.layer_refs(&pins, mounted).await;
        // Pinned layers no snapshot references: their chunks from the kept TOC.
        layers.extend(kept.pinned.iter().map(|(rec, chunks)| LayerRefs {
            layer: rec.layer_digest.clone(),
            chunks: chunks.to_vec(),
            pinned: true,
            fetchable: true,
        }));
        // Truly full: a write failed with ENOSPC since about the last run.
        let enospc = self.store.last_enospc();
        let disk_full = enospc > 0 && now.saturating_sub(enospc) <= cfg.interval.as_secs().max(60);
        let entries = self.store.index().snapshot();
        let used_before: u64 = entries.iter().map(|(_, e)| e.size).sum();
        let p = plan(&entries, &layers, &cfg, now, disk_full);
        let mut report = GcReport {
            dry_run,
            trigger: trigger.to_owned(),
            at: now,
            used_before,
            pinned_bytes: p.pinned_bytes,
            kept_unfetchable_bytes: p.kept_unfetchable_bytes,
            disk_full,
            unfetchable_layers: layers
                .iter()
                .filter(|l| !l.fetchable)
                .map(|l| l.layer.clone())
                .collect(),
            tocs_removed: kept.removed,
            tocs_kept: kept.kept,
            ..GcReport::default()
        };
        let count = |r: &mut GcReport, why: Why| match why {
            Why::Expired => r.evicted_expired += 1,
            Why::Lru => r.evicted_lru += 1,
            Why::Unfetchable => r.evicted_unfetchable += 1,
            Why::UnfetchableOverCap => r.evicted_unfetchable_over_cap += 1,
        };
        if dry_run {
            for v in &p.victims {
                report.freed_bytes += v.size;
                report.evicted_chunks += 1;
                count(&mut report, v.why);
            }
            report.used_after = p.used_after;
        } else {
            let store = self.store.clone();
            let victims = p.victims.clone();
            let protected = p.protected.clone();
            let applied = tokio::task::spawn_blocking(move || {
                victims
                    .iter()
                    .map(|v| (v.why, store.evict_keeping(&v.digest, &protected)))
                    .collect::<Vec<_>>()
            })
            .await
            .unwrap_or_default();
            for (why, r) in applied {
                match r {
                    Evicted::Freed(n) => {
                        report.freed_bytes += n;
                        report.evicted_chunks += 1;
                        count(&mut report, why);
                    }
                    Evicted::Busy => report.skipped_busy += 1,
                    Evicted::Missing => {}
                }
            }
            report.used_after = self.store.index().used();
            self.stats.runs.fetch_add(1, Ordering::Relaxed);
        }
        report.duration_ms = started.elapsed().as_millis() as u64;
        if report.evicted_unfetchable_over_cap > 0 {
            warn!(chunks = report.evicted_unfetchable_over_cap, layers = ?report.unfetchable_layers,
                  max = cfg.unfetchable_max_bytes,
                  "evicted the oldest chunks of layers whose registry is unreachable: \
                   they held more than cache.unfetchable_max_percent");
        }
        if report.evicted_unfetchable > 0 {
            error!(chunks = report.evicted_unfetchable, layers = ?report.unfetchable_layers,
                   "DISK FULL: evicted chunks of layers whose registry is unreachable; \
                    reads of those chunks fail until it is back");
        } else if disk_full && p.used_after > cfg.limits.low_bytes {
            error!(
                used = p.used_after,
                pinned = p.pinned_bytes,
                "DISK FULL and nothing more can be evicted (pinned or unfetchable); \
                    reads are served uncached"
            );
        } else if cfg.limits.high_bytes > 0 && p.used_after > cfg.limits.high_bytes {
            warn!(used = p.used_after, high = cfg.limits.high_bytes,
                  pinned = p.pinned_bytes, unfetchable = p.kept_unfetchable_bytes,
                  "chunk cache above its high watermark; the rest is pinned or cannot be fetched again now");
        }
        if !dry_run {
            if report.evicted_chunks > 0 {
                info!(
                    trigger,
                    freed = report.freed_bytes,
                    chunks = report.evicted_chunks,
                    expired = report.evicted_expired,
                    lru = report.evicted_lru,
                    used = report.used_after,
                    ms = report.duration_ms,
                    "chunk GC"
                );
            } else {
                debug!(
                    trigger,
                    used = report.used_after,
                    "chunk GC: nothing to evict"
                );
            }
            let (store, json) = (self.store.clone(), serde_json::to_vec(&report));
            let _ = tokio::task::spawn_blocking(move || {
                if let Err(e) = store.index().flush() {
                    error!(error = %e, "cannot write the chunk index");
                }
                if let Err(e) = store.index().set_last_gc(&json.unwrap_or_default()) {
                    error!(error = %e, "cannot store the GC result");
                }
            })
            .await;
            *self.last.lock() = Some(report.clone());
        }
        report
    }

    /// Starts the background loop: GC every interval and whenever the store
    /// says usage crossed the high watermark; access times flushed every
    /// [`FLUSH_INTERVAL`].
    /// Ends when the cache is dropped.
    pub fn spawn(self: &Arc<Self>, rt: &Handle) {
        let weak = Arc::downgrade(self);
        let mut next_gc = Instant::now() + self.config().interval;
        rt.spawn(async move {
            loop {
                let Some(me) = weak.upgrade() else { return };
                let wait = next_gc
                    .saturating_duration_since(Instant::now())
                    .min(FLUSH_INTERVAL);
                let store = me.store.clone();
                drop(me);
                let trigger = tokio::select! {
                    () = tokio::time::sleep(wait) => None,
                    () = store.gc_wake.notified() => Some("watermark"),
                };
                drop(store);
                let Some(me) = weak.upgrade() else { return };
                let store = me.store.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    if let Err(e) = store.index().flush() {
                        error!(error = %e, "cannot write the chunk index");
                    }
                })
                .await;
                let trigger = match trigger {
                    Some(t) => t,
                    None if Instant::now() >= next_gc => "periodic",
                    None => continue,
                };
                me.gc(false, trigger).await;
                // A cache that stays full wakes GC on every write: space runs.
                tokio::time::sleep(Duration::from_secs(1)).await;
                next_gc = Instant::now() + me.config().interval;
            }
        });
    }
}

/// The TOC digests of pinned layers (empty on a database error, which is
/// logged). Blocking: a database read.
fn pinned_tocs(store: &ChunkStore) -> HashSet<String> {
    match store.index().pin_bindings() {
        Ok(b) => b.into_values().flatten().collect(),
        Err(e) => {
            error!(error = %e, "cannot read pins");
            HashSet::new()
        }
    }
}
