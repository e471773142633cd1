//! containerd's `Snapshots` gRPC service, translated onto [`Snapshotter`].
//!
//! This file owns only the translation: protobuf ↔ domain types, field masks,
//! filters, and running each (blocking, fsync-bound) operation on tokio's
//! blocking pool so that gRPC workers never wait on disk. Error codes come
//! from the single mapping in [`crate::error`].

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::Arc;

use shoal_proto::snapshots::snapshots_server::Snapshots;
use shoal_proto::snapshots::{
    CleanupRequest, CommitSnapshotRequest, Info as PbInfo, Kind as PbKind, ListSnapshotsRequest,
    ListSnapshotsResponse, MountsRequest, MountsResponse, PrepareSnapshotRequest,
    PrepareSnapshotResponse, RemoveSnapshotRequest, StatSnapshotRequest, StatSnapshotResponse,
    UpdateSnapshotRequest, UpdateSnapshotResponse, UsageRequest, UsageResponse,
    ViewSnapshotRequest, ViewSnapshotResponse,
};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tracing::{debug, error};

use crate::error::{Error, Result};
use crate::filter::Filter;
use crate::metadata::{Info, Kind};
use crate::overlay::Snapshotter;

/// How many infos go in one List response message (containerd's server uses
/// the same batching idea to stay under the gRPC message size limit).
const LIST_BATCH: usize = 100;

/// The gRPC service.
#[derive(Clone)]
pub struct Service {
    sn: Arc<Snapshotter>,
}

impl Service {
    /// Serves `sn`.
    pub fn new(sn: Arc<Snapshotter>) -> Self {
        Service { sn }
    }

    /// Runs `f` on the blocking pool and maps its error to a gRPC status.
    async fn run<T: Send + 'static>(
        &self,
        op: &'static str,
        key: String,
        f: impl FnOnce(&Snapshotter) -> Result<T> + Send + 'static,
    ) -> Result<T, Status> {
        let sn = self.sn.clone();
        let res = tokio::task::spawn_blocking(move || f(&sn))
            .await
            .map_err(|e| Status::internal(format!("{op} task failed: {e}")))?;
        match res {
            Ok(v) => {
                debug!(op, key, "ok");
                Ok(v)
            }
            Err(e) => {
                match &e {
                    Error::NotFound(_)
                    | Error::AlreadyExists(_)
                    | Error::FailedPrecondition(_)
                    | Error::InvalidArgument(_) => debug!(op, key, error = %e, "refused"),
                    _ => error!(op, key, error = %e, "failed"),
                }
                Err(e.into())
            }
        }
    }
}

fn labels(m: HashMap<String, String>) -> BTreeMap<String, String> {
    m.into_iter().collect()
}

fn parent(p: String) -> Option<String> {
    (!p.is_empty()).then_some(p)
}

fn to_pb(info: Info) -> PbInfo {
    let kind = match info.kind {
        Kind::View => PbKind::View,
        Kind::Active => PbKind::Active,
        Kind::Committed => PbKind::Committed,
    };
    PbInfo {
        name: info.name,
        parent: info.parent.unwrap_or_default(),
        kind: kind as i32,
        created_at: Some(info.created.into()),
        updated_at: Some(info.updated.into()),
        labels: info.labels.into_iter().collect(),
    }
}

type ListStream = Pin<Box<dyn Stream<Item = Result<ListSnapshotsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Snapshots for Service {
    async fn prepare(
        &self,
        req: Request<PrepareSnapshotRequest>,
    ) -> Result<Response<PrepareSnapshotResponse>, Status> {
        let r = req.into_inner();
        debug!(key = %r.key, parent = %r.parent, labels = ?r.labels, "prepare");
        let mounts = self
            .run("prepare", r.key.clone(), move |sn| {
                sn.create(
                    Kind::Active,
                    &r.key,
                    parent(r.parent).as_deref(),
                    labels(r.labels),
                )
            })
            .await?;
        Ok(Response::new(PrepareSnapshotResponse { mounts }))
    }

    async fn view(
        &self,
        req: Request<ViewSnapshotRequest>,
    ) -> Result<Response<ViewSnapshotResponse>, Status> {
        let r = req.into_inner();
        let mounts = self
            .run("view", r.key.clone(), move |sn| {
                sn.create(
                    Kind::View,
                    &r.key,
                    parent(r.parent).as_deref(),
                    labels(r.labels),
                )
            })
            .await?;
        Ok(Response::new(ViewSnapshotResponse { mounts }))
    }

    async fn mounts(
        &self,
        req: Request<MountsRequest>,
    ) -> Result<Response<MountsResponse>, Status> {
        let key = req.into_inner().key;
        let mounts = self
            .run("mounts", key.clone(), move |sn| sn.mounts(&key))
            .await?;
        Ok(Response::new(MountsResponse { mounts }))
    }

    async fn commit(&self, req: Request<CommitSnapshotRequest>) -> Result<Response<()>, Status> {
        let r = req.into_inner();
        self.run("commit", r.key.clone(), move |sn| {
            sn.commit(&r.name, &r.key, labels(r.labels))
        })
        .await?;
        Ok(Response::new(()))
    }

    async fn remove(&self, req: Request<RemoveSnapshotRequest>) -> Result<Response<()>, Status> {
        let key = req.into_inner().key;
        self.run("remove", key.clone(), move |sn| sn.remove(&key))
            .await?;
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        req: Request<StatSnapshotRequest>,
    ) -> Result<Response<StatSnapshotResponse>, Status> {
        let key = req.into_inner().key;
        let info = self
            .run("stat", key.clone(), move |sn| sn.stat(&key))
            .await?;
        Ok(Response::new(StatSnapshotResponse {
            info: Some(to_pb(info)),
        }))
    }

    async fn update(
        &self,
        req: Request<UpdateSnapshotRequest>,
    ) -> Result<Response<UpdateSnapshotResponse>, Status> {
        let r = req.into_inner();
        let pb = r
            .info
            .ok_or_else(|| Status::invalid_argument("update: info is required"))?;
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let key = pb.name.clone();
        let info = self
            .run("update", key, move |sn| {
                // Only the name and labels matter to an update; the store
                // keeps every other field as it is.
                let mut current = sn.stat(&pb.name)?;
                current.labels = labels(pb.labels);
                sn.update(&current, &paths)
            })
            .await?;
        Ok(Response::new(UpdateSnapshotResponse {
            info: Some(to_pb(info)),
        }))
    }

    type ListStream = ListStream;

    async fn list(
        &self,
        req: Request<ListSnapshotsRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let filters = req.into_inner().filters;
        let filter = Filter::parse_all(&filters)
            .map_err(|e| Status::invalid_argument(format!("list: {e}")))?;
        let infos = self
            .run("list", filters.join(" || "), move |sn| sn.list(&filter))
            .await?;
        let batches: Vec<Result<ListSnapshotsResponse, Status>> = infos
            .chunks(LIST_BATCH)
            .map(|c| {
                Ok(ListSnapshotsResponse {
                    info: c.iter().cloned().map(to_pb).collect(),
                })
            })
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(batches))))
    }

    async fn usage(&self, req: Request<UsageRequest>) -> Result<Response<UsageResponse>, Status> {
        let key = req.into_inner().key;
        let u = self
            .run("usage", key.clone(), move |sn| sn.usage(&key))
            .await?;
        Ok(Response::new(UsageResponse {
            size: u.size,
            inodes: u.inodes,
        }))
    }

    async fn cleanup(&self, _req: Request<CleanupRequest>) -> Result<Response<()>, Status> {
        self.run("cleanup", String::new(), |sn| sn.cleanup().map(drop))
            .await?;
        Ok(Response::new(()))
    }
}
