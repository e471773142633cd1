//! Shoal's own `shoal.v1.Profiles` gRPC service: the first reads recorded on
//! mounted lazy layers, for `shoal profile show`.

use std::sync::Arc;

use shoal_proto::profile::profiles_server::Profiles;
use shoal_proto::profile::{FirstRead, FirstReadsRequest, FirstReadsResponse};
use tonic::{Request, Response};

use crate::overlay::Snapshotter;

/// The profiles service.
pub struct ProfileService {
    sn: Arc<Snapshotter>,
}

impl ProfileService {
    /// Reports on `sn`.
    pub fn new(sn: Arc<Snapshotter>) -> Self {
        ProfileService { sn }
    }
}

#[tonic::async_trait]
impl Profiles for ProfileService {
    async fn first_reads(
        &self,
        req: Request<FirstReadsRequest>,
    ) -> Result<Response<FirstReadsResponse>, tonic::Status> {
        let want = req.into_inner().layer_digests;
        let Some(remote) = self.sn.remote() else {
            return Ok(Response::new(FirstReadsResponse::default()));
        };
        let mut reads = Vec::new();
        for l in remote.first_reads() {
            if !want.is_empty() && !want.contains(&l.layer_digest) {
                continue;
            }
            reads.extend(l.reads.into_iter().map(|(ms, path)| FirstRead {
                layer_digest: l.layer_digest.clone(),
                path,
                ms,
            }));
        }
        Ok(Response::new(FirstReadsResponse { reads }))
    }
}
