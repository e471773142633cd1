//! Shoal's own `shoal.v1.Status` gRPC service: a read-only report of mounted
//! remote layers and fetch counters, for `shoal status`.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use shoal_proto::status::status_server::Status;
use shoal_proto::status::{Counters, LayerStatus, LayersRequest, LayersResponse, SourceBytes};
use tonic::{Request, Response};

use crate::overlay::Snapshotter;
use crate::remote::fetch::SourceKind;

/// The status service.
pub struct StatusService {
    sn: Arc<Snapshotter>,
}

impl StatusService {
    /// Reports on `sn`.
    pub fn new(sn: Arc<Snapshotter>) -> Self {
        StatusService { sn }
    }
}

#[tonic::async_trait]
impl Status for StatusService {
    async fn layers(
        &self,
        _req: Request<LayersRequest>,
    ) -> Result<Response<LayersResponse>, tonic::Status> {
        let sn = self.sn.clone();
        let resp = tokio::task::spawn_blocking(move || report(&sn))
            .await
            .map_err(|e| tonic::Status::internal(format!("status task failed: {e}")))?;
        Ok(Response::new(resp))
    }
}

fn report(sn: &Snapshotter) -> LayersResponse {
    let version = env!("CARGO_PKG_VERSION").to_owned();
    let Some(remote) = sn.remote() else {
        return LayersResponse {
            layers: Vec::new(),
            counters: Some(Counters::default()),
            version,
        };
    };
    let layers = remote
        .status()
        .into_iter()
        .map(|l| LayerStatus {
            snapshot: l.name,
            snapshot_id: l.id,
            image_ref: l.remote.image_ref,
            layer_digest: l.remote.layer_digest,
            toc_digest: l.remote.toc_digest,
            format: l.format.to_owned(),
            files: l.files,
            chunks_total: l.chunks_total,
            chunks_local: l.chunks_local,
            bytes_total: l.bytes_total,
            bytes_local: l.bytes_local,
            served_from_cache: l.served_from_cache,
            served_after_fetch: l.served_after_fetch,
            read_errors: l.read_errors,
            fetched_on_demand: l.fetched_on_demand,
            identity: l.identity.name().to_owned(),
            identity_reason: match l.identity {
                crate::remote::identity::Check::Quarantined(why) => why,
                _ => String::new(),
            },
        })
        .collect();
    let f = &remote.fetcher().stats;
    let s = &remote.fetcher().store().stats;
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    LayersResponse {
        layers,
        counters: Some(Counters {
            bytes_fetched: load(&f.bytes_fetched),
            requests: load(&f.requests),
            verify_failures: load(&f.verify_failures),
            source_errors: load(&f.source_errors),
            not_cached: load(&f.not_cached),
            in_flight: load(&f.in_flight),
            fallbacks: load(&remote.stats.fallbacks),
            mounted: load(&remote.stats.mounted),
            store_memory_hits: load(&s.memory_hits),
            store_disk_hits: load(&s.disk_hits),
            store_misses: load(&s.misses),
            store_corrupt: load(&s.corrupt_on_disk),
            layers_verified: remote.check_counts().0,
            layers_quarantined: remote.check_counts().1,
            bytes_by_source: Some(SourceBytes {
                cache: load(&f.served_from_cache),
                primed: f.by_source.get(SourceKind::Primed),
                registry: f.by_source.get(SourceKind::Registry),
                peer: f.by_source.get(SourceKind::Peer),
            }),
        }),
        version,
    }
}
