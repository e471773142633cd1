//! Shoal's `shoal.v1.Cache` gRPC service: `shoal gc`, `shoal pin`,
//! `shoal unpin` and the cache half of `shoal status`.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use shoal_proto::cache::cache_server::Cache;
use shoal_proto::cache::{
    CacheUsage, CacheUsageRequest, GcReport, GcRequest, PinRequest, PinResponse,
};
use tonic::{Request, Response};

use crate::overlay::Snapshotter;
use crate::remote::gc;

/// The cache service.
pub struct CacheService {
    sn: Arc<Snapshotter>,
}

impl CacheService {
    /// Serves the cache of `sn`.
    pub fn new(sn: Arc<Snapshotter>) -> Self {
        CacheService { sn }
    }

    fn cache(&self) -> Result<&Arc<crate::remote::cache::Cache>, tonic::Status> {
        self.sn.remote().map(|r| r.cache()).ok_or_else(|| {
            tonic::Status::failed_precondition(
                "remote layers are disabled ([remote] enable = false): there is no chunk cache",
            )
        })
    }
}

/// The wire form of a GC report.
pub fn report_to_proto(r: gc::GcReport) -> GcReport {
    GcReport {
        dry_run: r.dry_run,
        trigger: r.trigger,
        at: r.at,
        duration_ms: r.duration_ms,
        used_before: r.used_before,
        used_after: r.used_after,
        freed_bytes: r.freed_bytes,
        evicted_chunks: r.evicted_chunks,
        evicted_expired: r.evicted_expired,
        evicted_lru: r.evicted_lru,
        evicted_unfetchable: r.evicted_unfetchable,
        evicted_unfetchable_over_cap: r.evicted_unfetchable_over_cap,
        skipped_busy: r.skipped_busy,
        pinned_bytes: r.pinned_bytes,
        kept_unfetchable_bytes: r.kept_unfetchable_bytes,
        disk_full: r.disk_full,
        unfetchable_layers: r.unfetchable_layers,
        tocs_removed: r.tocs_removed,
        tocs_kept: r.tocs_kept,
    }
}

#[tonic::async_trait]
impl Cache for CacheService {
    async fn gc(&self, req: Request<GcRequest>) -> Result<Response<GcReport>, tonic::Status> {
        let cache = self.cache()?.clone();
        let dry_run = req.into_inner().dry_run;
        let r = cache.gc(dry_run, "manual").await;
        Ok(Response::new(report_to_proto(r)))
    }

    async fn pin(&self, req: Request<PinRequest>) -> Result<Response<PinResponse>, tonic::Status> {
        let cache = self.cache()?.clone();
        let target = req.into_inner().target;
        let r = tokio::task::spawn_blocking(move || cache.pin(&target))
            .await
            .map_err(|e| tonic::Status::internal(e.to_string()))?
            .map_err(tonic::Status::invalid_argument)?;
        Ok(Response::new(PinResponse {
            changed: r.changed,
            layers: r.layers,
        }))
    }

    async fn unpin(
        &self,
        req: Request<PinRequest>,
    ) -> Result<Response<PinResponse>, tonic::Status> {
        let cache = self.cache()?.clone();
        let target = req.into_inner().target;
        let r = tokio::task::spawn_blocking(move || cache.unpin(&target))
            .await
            .map_err(|e| tonic::Status::internal(e.to_string()))?
            .map_err(tonic::Status::internal)?;
        Ok(Response::new(PinResponse {
            changed: r.changed,
            layers: r.layers,
        }))
    }

    async fn usage(
        &self,
        _req: Request<CacheUsageRequest>,
    ) -> Result<Response<CacheUsage>, tonic::Status> {
        let Some(remote) = self.sn.remote() else {
            return Ok(Response::new(CacheUsage::default()));
        };
        let cache = remote.cache().clone();
        let fetch = remote.fetcher().clone();
        let u = tokio::task::spawn_blocking(move || {
            let store = cache.store();
            let cfg = cache.config();
            let s = &store.stats;
            let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
            let mut pins: Vec<String> = cache.pins().into_iter().collect();
            pins.sort();
            CacheUsage {
                enabled: true,
                used_bytes: store.index().used(),
                chunks: store.index().len() as u64,
                max_bytes: cfg.limits.max_bytes,
                high_bytes: cfg.limits.high_bytes,
                low_bytes: cfg.limits.low_bytes,
                unreferenced_ttl_secs: cfg.ttl_secs,
                gc_interval_secs: cfg.interval.as_secs(),
                pins,
                last_gc: cache.last_report().map(report_to_proto),
                memory_hits: load(&s.memory_hits),
                disk_hits: load(&s.disk_hits),
                misses: load(&s.misses),
                served_from_cache: load(&fetch.stats.served_from_cache),
                served_after_fetch: load(&fetch.stats.served_after_fetch),
                not_cached: load(&fetch.stats.not_cached),
                at_limit: load(&s.at_limit),
                write_failures: load(&s.write_failures),
                last_full: store.last_full(),
                gc_runs: load(&cache.stats.runs),
                evicted_chunks: load(&s.evicted),
                evicted_bytes: load(&s.evicted_bytes),
            }
        })
        .await
        .map_err(|e| tonic::Status::internal(e.to_string()))?;
        Ok(Response::new(u))
    }
}
