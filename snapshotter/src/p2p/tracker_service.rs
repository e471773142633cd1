//! The `shoal.p2p.v1.Tracker` gRPC service: [`Tracker`] behind a lock.
//!
//! Member ids and addresses in requests are taken as sent: any member of the
//! cluster (anyone with a certificate from its CA) may announce. Binding them
//! to the caller's certificate is not built yet (docs/p2p.md).

use parking_lot::Mutex;
use shoal_proto::p2p::tracker_server;
use shoal_proto::p2p::{
    AnnounceRequest, AnnounceResponse, HolderState, LocateRequest, LocateResponse,
};
use tonic::{Request, Response, Status};

use super::digest_of;
use super::tracker::{Member, State, Tracker};

/// The most digests one Announce may carry.
pub const MAX_ANNOUNCE_DIGESTS: usize = 4096;

/// The tracker service.
pub struct TrackerService {
    tracker: Mutex<Tracker>,
}

impl TrackerService {
    /// A service over `tracker`.
    pub fn new(tracker: Tracker) -> TrackerService {
        TrackerService {
            tracker: Mutex::new(tracker),
        }
    }
}

#[tonic::async_trait]
impl tracker_server::Tracker for TrackerService {
    async fn locate(
        &self,
        req: Request<LocateRequest>,
    ) -> Result<Response<LocateResponse>, Status> {
        let r = req.into_inner();
        let digest = digest_of(&r.digest)
            .ok_or_else(|| Status::invalid_argument("digest must be 32 bytes"))?;
        if r.requester.is_empty() {
            return Err(Status::invalid_argument("requester is empty"));
        }
        if r.register_fetching && r.requester_address.is_empty() {
            return Err(Status::invalid_argument(
                "register_fetching needs requester_address",
            ));
        }
        let requester = Member {
            id: r.requester,
            address: r.requester_address,
        };
        let mut t = self.tracker.lock();
        let holder = t.locate(&digest, &requester, r.register_fetching);
        let holders = t.holders(&digest) as u32;
        Ok(Response::new(LocateResponse {
            holder: holder.map(|h| shoal_proto::p2p::Holder {
                id: h.member.id,
                address: h.member.address,
                complete: h.complete,
            }),
            holders,
        }))
    }

    async fn announce(
        &self,
        req: Request<AnnounceRequest>,
    ) -> Result<Response<AnnounceResponse>, Status> {
        let r = req.into_inner();
        if r.id.is_empty() || r.address.is_empty() {
            return Err(Status::invalid_argument("id and address are required"));
        }
        if r.digests.len() > MAX_ANNOUNCE_DIGESTS {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_ANNOUNCE_DIGESTS} digests per announce"
            )));
        }
        let state = match HolderState::try_from(r.state) {
            Ok(HolderState::Fetching) => State::Fetching,
            Ok(HolderState::Complete) => State::Complete,
            Ok(HolderState::Gone) => State::Gone,
            _ => return Err(Status::invalid_argument("state must be set")),
        };
        let digests = r
            .digests
            .iter()
            .map(|d| digest_of(d))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| Status::invalid_argument("every digest must be 32 bytes"))?;
        let member = Member {
            id: r.id,
            address: r.address,
        };
        let mut t = self.tracker.lock();
        for d in &digests {
            t.announce(d, &member, state);
        }
        Ok(Response::new(AnnounceResponse {}))
    }
}
