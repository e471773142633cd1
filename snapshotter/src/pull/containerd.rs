//! A session with containerd's own API (not the snapshotter's socket): one
//! namespace, one lease, one snapshotter, and the calls a pull makes.
//!
//! Invariants: every request carries the `containerd-namespace` header, and,
//! once [`Session::create_lease`] succeeded, the `containerd-lease` header,
//! so content and snapshots made by the pull belong to the lease until the
//! image record and the config's snapshot label hold them. gRPC codes that
//! the pull branches on (NotFound, AlreadyExists) are returned as values;
//! other failures become [`PullError::Containerd`] naming the call.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use containerd_client::services::v1::images_client::ImagesClient;
use containerd_client::services::v1::leases_client::LeasesClient;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{
    CommitSnapshotRequest, PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest,
};
use containerd_client::services::v1::{
    content_client::ContentClient, diff_client::DiffClient, ApplyRequest, CreateImageRequest,
    CreateRequest, DeleteRequest, Image, Info, UpdateImageRequest, UpdateRequest,
};
use containerd_client::types::{Descriptor, Mount};
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

use super::PullError;

/// Header naming the namespace (containerd `namespaces.GRPCHeader`).
pub const NAMESPACE_HEADER: &str = "containerd-namespace";
/// Header naming the lease (containerd `leases.GRPCHeader`).
pub const LEASE_HEADER: &str = "containerd-lease";
/// Lease label after which containerd's GC may drop the lease.
pub const LABEL_GC_EXPIRE: &str = "containerd.io/gc.expire";

/// What Prepare of an extraction snapshot answered.
#[derive(Debug)]
pub enum Prepared {
    /// A normal snapshot to unpack into.
    Mounts(Vec<Mount>),
    /// The snapshotter already has the target (it mounted it remotely).
    AlreadyExists,
}

/// A containerd connection bound to a namespace and (later) a lease.
#[derive(Clone)]
pub struct Session {
    channel: Channel,
    namespace: AsciiMetadataValue,
    lease: Option<(String, AsciiMetadataValue)>,
    /// Snapshotter name every snapshot call goes to.
    pub snapshotter: String,
}

fn containerd_err(op: impl Into<String>, s: Status) -> PullError {
    PullError::Containerd {
        op: op.into(),
        code: s.code(),
        message: s.message().to_string(),
    }
}

/// `t` as RFC 3339 in UTC, the form containerd's `gc.expire` label wants.
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
    let dt =
        time::OffsetDateTime::from_unix_timestamp(secs).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        dt.year(),
        dt.month() as u8,
        dt.day(),
        dt.hour(),
        dt.minute(),
        dt.second()
    )
}

impl Session {
    /// A session over `channel` in `namespace`, for `snapshotter`.
    ///
    /// # Errors
    /// The namespace is not a valid header value.
    pub fn new(channel: Channel, namespace: &str, snapshotter: &str) -> Result<Session, PullError> {
        let namespace = MetadataValue::try_from(namespace)
            .map_err(|_| PullError::InvalidArgument(format!("namespace {namespace:?}")))?;
        Ok(Session {
            channel,
            namespace,
            lease: None,
            snapshotter: snapshotter.to_string(),
        })
    }

    fn req<T>(&self, msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        let md = r.metadata_mut();
        md.insert(NAMESPACE_HEADER, self.namespace.clone());
        if let Some((_, lease)) = &self.lease {
            md.insert(LEASE_HEADER, lease.clone());
        }
        r
    }

    pub(crate) fn content(&self) -> ContentClient<Channel> {
        ContentClient::new(self.channel.clone())
    }

    /// A request with this session's headers (for the content writer).
    pub(crate) fn request<T>(&self, msg: T) -> Request<T> {
        self.req(msg)
    }

    fn snapshots(&self) -> SnapshotsClient<Channel> {
        SnapshotsClient::new(self.channel.clone())
    }

    /// Creates a lease that expires after `expire` (should the pull die
    /// without deleting it) and attaches it to every later call.
    ///
    /// # Errors
    /// containerd refused.
    pub async fn create_lease(&mut self, expire: Duration) -> Result<String, PullError> {
        let now = SystemTime::now();
        let id = format!(
            "shoal-pull-{}-{}",
            now.duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos(),
            std::process::id()
        );
        let labels = HashMap::from([(LABEL_GC_EXPIRE.to_string(), rfc3339(now + expire))]);
        let resp = LeasesClient::new(self.channel.clone())
            .create(self.req(CreateRequest { id, labels }))
            .await
            .map_err(|s| containerd_err("create lease", s))?;
        let id = resp.into_inner().lease.map(|l| l.id).unwrap_or_default();
        let value = MetadataValue::try_from(id.as_str())
            .map_err(|_| PullError::InvalidArgument(format!("lease id {id:?}")))?;
        self.lease = Some((id.clone(), value));
        Ok(id)
    }

    /// Deletes the session's lease, if any; later calls carry none.
    ///
    /// # Errors
    /// containerd refused (NotFound is success).
    pub async fn delete_lease(&mut self) -> Result<(), PullError> {
        let Some((id, _)) = self.lease.take() else {
            return Ok(());
        };
        match LeasesClient::new(self.channel.clone())
            .delete(self.req(DeleteRequest {
                id: id.clone(),
                sync: false,
            }))
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::NotFound => Ok(()),
            Err(s) => Err(containerd_err(format!("delete lease {id}"), s)),
        }
    }

    /// Sets `labels` on existing content `digest` (only those keys).
    ///
    /// # Errors
    /// containerd refused (e.g. the content is gone).
    pub async fn label_content(
        &self,
        digest: &str,
        labels: HashMap<String, String>,
    ) -> Result<(), PullError> {
        if labels.is_empty() {
            return Ok(());
        }
        let paths = labels.keys().map(|k| format!("labels.{k}")).collect();
        self.content()
            .update(self.req(UpdateRequest {
                info: Some(Info {
                    digest: digest.to_string(),
                    labels,
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask { paths }),
            }))
            .await
            .map_err(|s| containerd_err(format!("label content {digest}"), s))?;
        Ok(())
    }

    /// Whether snapshot `key` exists.
    ///
    /// # Errors
    /// Stat failed other than with NotFound.
    pub async fn snapshot_exists(&self, key: &str) -> Result<bool, PullError> {
        match self
            .snapshots()
            .stat(self.req(StatSnapshotRequest {
                snapshotter: self.snapshotter.clone(),
                key: key.to_string(),
            }))
            .await
        {
            Ok(_) => Ok(true),
            Err(s) if s.code() == Code::NotFound => Ok(false),
            Err(s) => Err(containerd_err(format!("stat snapshot {key}"), s)),
        }
    }

    /// Prepares extraction snapshot `key` on `parent` with `labels`.
    ///
    /// # Errors
    /// Prepare failed other than with AlreadyExists.
    pub async fn prepare(
        &self,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Result<Prepared, PullError> {
        match self
            .snapshots()
            .prepare(self.req(PrepareSnapshotRequest {
                snapshotter: self.snapshotter.clone(),
                key: key.to_string(),
                parent: parent.to_string(),
                labels,
            }))
            .await
        {
            Ok(r) => Ok(Prepared::Mounts(r.into_inner().mounts)),
            Err(s) if s.code() == Code::AlreadyExists => Ok(Prepared::AlreadyExists),
            Err(s) => Err(containerd_err(format!("prepare snapshot {key:?}"), s)),
        }
    }

    /// Commits `key` as `name`. `Ok(false)`: `name` already exists.
    ///
    /// # Errors
    /// Commit failed other than with AlreadyExists.
    pub async fn commit(
        &self,
        name: &str,
        key: &str,
        labels: HashMap<String, String>,
    ) -> Result<bool, PullError> {
        match self
            .snapshots()
            .commit(self.req(CommitSnapshotRequest {
                snapshotter: self.snapshotter.clone(),
                name: name.to_string(),
                key: key.to_string(),
                labels,
            }))
            .await
        {
            Ok(_) => Ok(true),
            Err(s) if s.code() == Code::AlreadyExists => Ok(false),
            Err(s) => Err(containerd_err(format!("commit snapshot {name}"), s)),
        }
    }

    /// Removes snapshot `key`; a missing one is fine.
    ///
    /// # Errors
    /// Remove failed other than with NotFound.
    pub async fn remove(&self, key: &str) -> Result<(), PullError> {
        match self
            .snapshots()
            .remove(self.req(RemoveSnapshotRequest {
                snapshotter: self.snapshotter.clone(),
                key: key.to_string(),
            }))
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::NotFound => Ok(()),
            Err(s) => Err(containerd_err(format!("remove snapshot {key:?}"), s)),
        }
    }

    /// Applies layer `desc` (already in the content store) onto `mounts`;
    /// returns the uncompressed digest containerd computed.
    ///
    /// # Errors
    /// The diff service failed.
    pub async fn apply(&self, desc: Descriptor, mounts: Vec<Mount>) -> Result<String, PullError> {
        let digest = desc.digest.clone();
        let r = DiffClient::new(self.channel.clone())
            .apply(self.req(ApplyRequest {
                diff: Some(desc),
                mounts,
                ..Default::default()
            }))
            .await
            .map_err(|s| containerd_err(format!("apply layer {digest}"), s))?;
        Ok(r.into_inner().applied.map(|d| d.digest).unwrap_or_default())
    }

    /// Creates image `name` pointing at `target`, or updates it if it exists
    /// (as containerd's `createNewImage`).
    ///
    /// # Errors
    /// containerd refused.
    pub async fn put_image(&self, name: &str, target: Descriptor) -> Result<(), PullError> {
        let image = Image {
            name: name.to_string(),
            target: Some(target),
            ..Default::default()
        };
        let mut images = ImagesClient::new(self.channel.clone());
        for _ in 0..3 {
            match images
                .create(self.req(CreateImageRequest {
                    image: Some(image.clone()),
                    ..Default::default()
                }))
                .await
            {
                Ok(_) => return Ok(()),
                Err(s) if s.code() == Code::AlreadyExists => {}
                Err(s) => return Err(containerd_err(format!("create image {name}"), s)),
            }
            match images
                .update(self.req(UpdateImageRequest {
                    image: Some(image.clone()),
                    ..Default::default()
                }))
                .await
            {
                Ok(_) => return Ok(()),
                // Removed in between: create again.
                Err(s) if s.code() == Code::NotFound => {}
                Err(s) => return Err(containerd_err(format!("update image {name}"), s)),
            }
        }
        Err(PullError::Containerd {
            op: format!("create image {name}"),
            code: Code::Aborted,
            message: "the image kept appearing and disappearing".into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_is_utc_seconds() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(rfc3339(t), "2023-11-14T22:13:20Z");
    }
}
