//! The background job of a mounted layer: the identity check (one pass over
//! the blob that also stores its chunks, [`super::super::identity`]), then
//! the background fetch of whatever is still missing, and the decisions the
//! snapshotter asks of the verdicts.

use std::sync::Arc;
use std::time::Duration;

use tracing::{error, info, warn};

use super::{Blobs, RemoteLayers};
use crate::metadata::RemoteRef;
use crate::remote::fetch::Fetcher;
use crate::remote::identity::{chain_id, chain_of_key, diff_id_pass, Check, Checks};
use crate::remote::layer::LayerReader;

/// What runs after a layer's startup set: check, then fetch the rest.
pub(super) struct Job {
    name: String,
    remote: RemoteRef,
    reader: Arc<LayerReader>,
    blobs: Arc<dyn Blobs>,
    fetcher: Arc<Fetcher>,
    checks: Arc<Checks>,
    verify: bool,
    background_fetch: bool,
    delay: Duration,
}

impl Job {
    pub(super) async fn run(self) {
        if let Check::Quarantined(why) = self.checks.get(&self.name) {
            self.reader.poison();
            error!(snapshot = %self.name, layer = %self.remote.layer_digest, reason = %why,
                   "layer is quarantined: not serving it");
            return;
        }
        if !self.verify && !self.background_fetch {
            return;
        }
        tokio::time::sleep(self.delay).await;
        if self.verify && self.checks.get(&self.name) == Check::Unverified {
            self.check().await;
            if self.reader.is_poisoned() {
                return;
            }
        }
        if self.background_fetch {
            self.reader.spawn_background(Duration::ZERO);
        }
    }

    async fn check(&self) {
        let Some(parent) = self.checks.parent(&self.name) else {
            warn!(snapshot = %self.name, "layer was mounted without a recorded parent; cannot check its diffID");
            return;
        };
        let started = std::time::Instant::now();
        let size = match self.blobs.size(&self.remote).await {
            Ok(s) => s,
            Err(e) => {
                warn!(snapshot = %self.name, error = %e, "diffID check: blob size unknown; layer stays unverified");
                return;
            }
        };
        let reader = self.reader.clone();
        let stop = move || reader.is_stopped();
        let pass = diff_id_pass(
            self.blobs.source(&self.remote),
            size,
            self.reader.toc(),
            &self.fetcher,
            &stop,
        )
        .await;
        let pass = match pass {
            Ok(p) => p,
            Err(e) => {
                warn!(snapshot = %self.name, layer = %self.remote.layer_digest, error = %e,
                      "diffID check did not finish; layer stays unverified");
                return;
            }
        };
        let got = chain_id(parent.as_deref(), &pass.diff_id);
        if got == self.name {
            self.checks.set(&self.name, Check::Verified);
            info!(snapshot = %self.name, layer = %self.remote.layer_digest, diff_id = %pass.diff_id,
                  bytes = pass.bytes, chunks_stored = pass.chunks_stored,
                  ms = started.elapsed().as_millis() as u64, "layer diffID verified");
        } else {
            let why = format!(
                "layer {} of {} uncompresses to diffID {}, which gives chain ID {got}, not {}",
                self.remote.layer_digest, self.remote.image_ref, pass.diff_id, self.name
            );
            self.checks.set(&self.name, Check::Quarantined(why.clone()));
            self.reader.poison();
            error!(snapshot = %self.name, layer = %self.remote.layer_digest,
                   image = %self.remote.image_ref, reason = %why,
                   "LAYER QUARANTINED: its content does not match the chain ID it was mounted under; \
                    reads now fail and no image can use it");
        }
    }
}

impl RemoteLayers {
    /// The background job of mounted snapshot `id`, if it is mounted.
    pub(super) fn background_job(&self, id: u64) -> Option<Job> {
        let m = self.mounted.lock();
        let m = m.get(&id)?;
        Some(Job {
            name: m.name.clone(),
            remote: m.remote.clone(),
            reader: m.reader.clone(),
            blobs: self.blobs.clone(),
            fetcher: self.fetcher.clone(),
            checks: self.checks.clone(),
            verify: self.cfg.verify_layers,
            background_fetch: self.cfg.background_fetch,
            delay: self.cfg.background_delay,
        })
    }

    /// Records that `name` is being mounted lazily on the backend snapshot
    /// `parent` (its claim, checked later). Keeps an earlier record.
    pub fn claim(&self, name: &str, parent: Option<&str>) {
        if self.checks.parent(name).is_none() {
            self.checks.claim(name, parent.map(chain_of_key));
        }
    }

    /// Whether a new Prepare of `new` may be answered with the existing lazy
    /// snapshot `name`, which serves `existing`.
    ///
    /// # Errors
    /// Why not: the layer is quarantined, or unverified and another blob or
    /// TOC claims the same chain ID (one of the two images lies about its
    /// diffID; containerd's own unpack of the new one will tell).
    pub fn may_adopt(
        &self,
        name: &str,
        existing: &RemoteRef,
        new: &RemoteRef,
    ) -> Result<(), String> {
        match self.checks.get(name) {
            Check::Verified => Ok(()),
            Check::Quarantined(why) => Err(format!("chain ID {name} is quarantined: {why}")),
            Check::Unverified
                if existing.layer_digest == new.layer_digest
                    && existing.toc_digest == new.toc_digest =>
            {
                Ok(())
            }
            Check::Unverified => Err(format!(
                "chain ID {name} is held by layer {} (TOC {}), not yet verified; this image names layer {} (TOC {})",
                existing.layer_digest, existing.toc_digest, new.layer_digest, new.toc_digest
            )),
        }
    }

    /// Whether any layer is quarantined.
    pub fn any_quarantined(&self) -> bool {
        self.checks.any_quarantined()
    }

    /// Why snapshot `name` must not be handed out, if it is quarantined.
    pub fn quarantined(&self, name: &str) -> Option<String> {
        match self.checks.get(name) {
            Check::Quarantined(why) => Some(why),
            _ => None,
        }
    }

    /// The verdict on snapshot `name`.
    pub fn check(&self, name: &str) -> Check {
        self.checks.get(name)
    }

    /// Forgets the verdict on a removed snapshot.
    pub fn forget_check(&self, name: &str) {
        self.checks.forget(name);
    }

    /// The verdicts' counters: (verified, quarantined) since start.
    pub fn check_counts(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.checks.verified.load(Relaxed),
            self.checks.quarantined.load(Relaxed),
        )
    }
}
