//! Remote layers of the snapshotter: detecting them in Prepare labels,
//! resolving and verifying their TOC, mounting them through FUSE, prefetching
//! their startup set and streaming in the rest.
//!
//! Invariants:
//! - A TOC is used only after its sha256 matched the digest from the layer
//!   annotation (see [`super::toc`]); the verified compressed TOC is kept
//!   under `ROOT/tocs/`, so remounting after a restart needs no network.
//! - Every failure to go lazy is a fallback to a normal pull, logged with the
//!   reason and counted; it is never a failed Prepare.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::runtime::Handle;
use tracing::{info, warn};

use super::annotations::{Hints, SourcePolicy};
use super::cache::Cache;
use super::fetch::primed::PrimedSource;
use super::fetch::{BoxFuture, Fetcher, RangeSource, Router};
use super::layer::{compression_name, LayerReader};
use super::recorder::{Activity, Recorder, Recording};
use super::toc::{parse_digest, parse_footer, Footer, Toc, TocLimits, FOOTER_FETCH};
use crate::metadata::{RemoteRef, Usage};

mod handover;
mod verify;

/// Label containerd's unpacker sets to the layer's chain ID: the name the
/// committed snapshot must have.
pub const LABEL_TARGET: &str = "containerd.io/snapshot.ref";
/// eStargz / zstd:chunked TOC digest annotation, passed through by any client.
pub const LABEL_TOC_DIGEST: &str = "containerd.io/snapshot/stargz/toc.digest";
/// Image reference (CRI with `disable_snapshot_annotations = false`,
/// `ctr-remote image rpull`).
pub const LABEL_CRI_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
/// Layer digest (same clients).
pub const LABEL_CRI_LAYER_DIGEST: &str = "containerd.io/snapshot/cri.layer-digest";
/// Image reference as stargz-snapshotter 0.12's `ctr-remote image rpull`
/// (Debian 12) labels it.
pub const LABEL_STARGZ_REFERENCE: &str = "containerd.io/snapshot/remote/stargz.reference";
/// Layer digest, same client.
pub const LABEL_STARGZ_DIGEST: &str = "containerd.io/snapshot/remote/stargz.digest";

/// Access to layer blobs (the registry; later, peers in front of it).
pub trait Blobs: Send + Sync {
    /// A source of the blob's bytes. Must not touch the network until used.
    fn source(&self, r: &RemoteRef) -> Arc<dyn RangeSource>;
    /// The blob's size.
    fn size<'a>(&'a self, r: &'a RemoteRef) -> BoxFuture<'a, Result<u64, String>>;
}

/// Knobs for remote layers (from the config file).
#[derive(Clone, Debug)]
pub struct RemoteConfig {
    /// How long a layer's prefetch set may take (and a waiting Prepare waits).
    pub prefetch_timeout: Duration,
    /// A container's Prepare waits for the startup sets in flight.
    pub wait_for_startup: bool,
    /// Fetch the rest of each layer in the background.
    pub background_fetch: bool,
    /// FUSE worker threads per mount.
    pub fuse_threads: usize,
    /// Delay after mounting before the background fetch starts.
    pub background_delay: Duration,
    /// Serve large, all-local files by kernel passthrough.
    pub passthrough: bool,
    /// Compressed bytes of following chunks a fetching read takes along.
    pub fetch_ahead_bytes: u64,
    /// Check each lazy layer's diffID against its chain ID in one pass over
    /// the blob (see [`super::identity`]).
    pub verify_layers: bool,
    /// Which hosts `shoal.source` may name, and with what credentials.
    pub source: SourcePolicy,
    /// How large a TOC may be; a larger one is refused (a fallback).
    pub toc_limits: TocLimits,
}

/// Counters for status and metrics.
#[derive(Debug, Default)]
pub struct RemoteStats {
    /// Layers mounted lazily.
    pub mounted: AtomicU64,
    /// Layers that fell back to a normal pull.
    pub fallbacks: AtomicU64,
    /// Of which: the TOC could not be fetched or verified.
    pub fallbacks_toc: AtomicU64,
    /// Of which: the layer could not be mounted.
    pub fallbacks_mount: AtomicU64,
    /// Of which: the chain ID is held by a lazy layer of another blob that is
    /// unverified or quarantined.
    pub fallbacks_conflict: AtomicU64,
    /// Kept TOCs that failed verification (removed and fetched again).
    pub bad_kept_tocs: AtomicU64,
    /// Of the TOC fallbacks: the TOC passed a `remote.toc_max_*` limit.
    pub fallbacks_toc_limit: AtomicU64,
}

/// Why a layer fell back to a normal pull (a metrics label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FallbackReason {
    /// The TOC could not be fetched or did not verify.
    Toc,
    /// The FUSE mount or the metadata write failed.
    Mount,
    /// The chain ID is held by a lazy layer of another blob that is not
    /// verified (see [`super::identity`]).
    Conflict,
}

/// The remote-layer half of the snapshotter.
pub struct RemoteLayers {
    tocs: Arc<super::tocs::KeptTocs>,
    blobs: Arc<dyn Blobs>,
    fetcher: Arc<Fetcher>,
    rt: Handle,
    cfg: RemoteConfig,
    cache: Arc<Cache>,
    mounted: Mutex<HashMap<u64, MountedLayer>>,
    /// Keeps each mount's `/dev/fuse` fd across restarts (see `handover`).
    fd_store: Option<crate::handover::FdStore>,
    /// Fds taken back from the store at start, not yet resumed or dropped.
    kept: Mutex<HashMap<String, std::os::fd::OwnedFd>>,
    /// How long mounted layers record first reads.
    recording: Recording,
    activity: Arc<Activity>,
    /// Verdicts on each lazy layer's identity (diffID against chain ID).
    checks: Arc<super::identity::Checks>,
    /// Counters.
    pub stats: RemoteStats,
}

struct MountedLayer {
    name: String,
    remote: RemoteRef,
    reader: Arc<LayerReader>,
    mount: shoal_fuse::Mounted,
    /// The early startup-set request, until the startup fetch is over.
    primed: Option<Arc<PrimedSource>>,
}

/// What `shoal status` shows of one mounted layer.
#[derive(Clone, Debug)]
pub struct LayerStatus {
    /// Committed snapshot name (chain ID).
    pub name: String,
    /// Snapshot id.
    pub id: u64,
    /// Where it comes from.
    pub remote: RemoteRef,
    /// `estargz` or `zstd:chunked`.
    pub format: &'static str,
    /// TOC entries.
    pub files: u64,
    /// Distinct chunks.
    pub chunks_total: u64,
    /// Chunks verified and stored locally.
    pub chunks_local: u64,
    /// Uncompressed bytes of all chunks.
    pub bytes_total: u64,
    /// Uncompressed bytes of local chunks.
    pub bytes_local: u64,
    /// Bytes served to FUSE from the store.
    pub served_from_cache: u64,
    /// Bytes served to FUSE after fetching.
    pub served_after_fetch: u64,
    /// Chunk bytes that reads fetched themselves (outside every prefetch).
    pub fetched_on_demand: u64,
    /// Reads answered with EIO.
    pub read_errors: u64,
    /// Pinned (the layer or its image): GC keeps its chunks.
    pub pinned: bool,
    /// Whether its content matches its chain ID.
    pub identity: super::identity::Check,
}

/// The first reads recorded on one mounted layer.
#[derive(Clone, Debug)]
pub struct LayerFirstReads {
    /// Layer digest.
    pub layer_digest: String,
    /// Where it is fetched from.
    pub image_ref: String,
    /// (milliseconds after mount, path), in first-read order.
    pub reads: Vec<(u32, String)>,
}

/// A resolved layer, ready to mount.
pub struct Resolved {
    toc: Arc<Toc>,
    /// What the layer will report as its usage.
    pub usage: Usage,
    /// The startup set, requested alongside the TOC (from hints).
    primed: Option<Arc<PrimedSource>>,
}

/// Finds a lazily mountable layer in Prepare labels: the target chain ID and
/// where to fetch from. `None` means "not remote": a normal Prepare.
///
/// The image reference and layer digest come from the CRI labels, from the
/// labels older `ctr-remote` versions set, or from the annotations `shoal
/// convert` writes (which any client passes on, see [`super::annotations`]);
/// without any, the layer is not remote (containerd pulls it normally).
/// `shoal.source` is used only as `policy` allows: otherwise the layer is
/// not remote (logged), and a host it may name gets no credentials unless
/// the policy says so.
pub fn detect(
    labels: &BTreeMap<String, String>,
    policy: &SourcePolicy,
) -> Option<(String, RemoteRef)> {
    let get = |k: &str| labels.get(k).filter(|v| !v.is_empty()).cloned();
    let target = get(LABEL_TARGET)?;
    let toc_digest = get(LABEL_TOC_DIGEST)?;
    let shoal = super::annotations::shoal_source(labels);
    let layer_digest = get(LABEL_CRI_LAYER_DIGEST)
        .or_else(|| get(LABEL_STARGZ_DIGEST))
        .or(shoal.1)?;
    let (image_ref, anonymous) = match get(LABEL_CRI_IMAGE_REF)
        .or_else(|| get(LABEL_STARGZ_REFERENCE))
    {
        Some(client) => (client, false),
        None => {
            let source = shoal.0?;
            match policy.check(&source) {
                Ok(credentials) => (source, !credentials),
                Err(reason) => {
                    warn!(layer = %layer_digest, %reason, "not mounting the layer lazily; containerd pulls it");
                    return None;
                }
            }
        }
    };
    Some((
        target,
        RemoteRef {
            image_ref,
            layer_digest,
            toc_digest,
            anonymous,
        },
    ))
}

impl RemoteLayers {
    /// Remote layers whose TOCs are kept in `tocs_dir`.
    ///
    /// # Errors
    /// `tocs_dir` cannot be created.
    pub fn new(
        tocs_dir: PathBuf,
        blobs: Arc<dyn Blobs>,
        fetcher: Arc<Fetcher>,
        rt: Handle,
        cfg: RemoteConfig,
    ) -> std::io::Result<RemoteLayers> {
        let tocs = Arc::new(super::tocs::KeptTocs::new(tocs_dir)?.with_limits(cfg.toc_limits));
        let cache = Arc::new(Cache::new(
            fetcher.store().clone(),
            blobs.clone(),
            tocs.clone(),
        ));
        Ok(RemoteLayers {
            tocs,
            blobs,
            cache,
            fetcher,
            rt,
            cfg,
            mounted: Mutex::new(HashMap::new()),
            fd_store: None,
            kept: Mutex::new(HashMap::new()),
            recording: Recording::default(),
            activity: Arc::default(),
            checks: Arc::default(),
            stats: RemoteStats::default(),
        })
    }

    /// Finds a lazily mountable layer in Prepare labels, under this
    /// daemon's `shoal.source` policy (see [`detect`]).
    pub fn detect(&self, labels: &BTreeMap<String, String>) -> Option<(String, RemoteRef)> {
        detect(labels, &self.cfg.source)
    }

    /// Sets how long layers mounted from now on record first reads (the
    /// `[profile]` config section).
    pub fn with_recording(mut self, recording: Recording) -> RemoteLayers {
        self.recording = recording;
        self
    }

    /// Loads and verifies the TOC of `r`: from the local copy if there is
    /// one, else from the blob (footer, then TOC, by Range requests).
    /// Blocking: call from a blocking thread.
    ///
    /// # Errors
    /// A message saying why the layer cannot be mounted lazily.
    pub fn resolve(&self, r: &RemoteRef) -> Result<Resolved, String> {
        self.resolve_with(r, Hints::default())
    }

    /// [`RemoteLayers::resolve`], using the layer's annotation hints on a
    /// first mount: the TOC is fetched at its hinted position (no size
    /// request, no footer read; a TOC that does not verify there is looked
    /// up through the footer after all), and the startup set is requested
    /// alongside it ([`PrimedSource`]).
    ///
    /// # Errors
    /// As [`RemoteLayers::resolve`].
    pub fn resolve_with(&self, r: &RemoteRef, hints: Hints) -> Result<Resolved, String> {
        // The digest comes with the image and names local files: it must be
        // a digest, never a path.
        if parse_digest(&r.toc_digest).is_none() {
            return Err(format!(
                "TOC digest {:?} is not a sha256 digest",
                r.toc_digest
            ));
        }
        let local = self.read_kept(r)?;
        let fetched = local.is_none();
        // Only for a layer seen for the first time: a kept TOC means its
        // chunks may well be local already.
        let primed = match (&local, hints.startup_end) {
            (None, Some(end)) => Some(PrimedSource::start(self.blobs.source(r), end, &self.rt)),
            _ => None,
        };
        let hinted = match (&local, hints.toc) {
            (None, Some((offset, len))) => self.rt.block_on(self.fetch_toc_at(r, offset, len))?,
            _ => None,
        };
        let (footer, compressed, toc) = match (local, hinted) {
            (Some(kept), _) => kept,
            (None, Some(parsed)) => parsed,
            (None, None) => {
                let (f, c) = self.rt.block_on(self.fetch_toc(r))?;
                let toc = Toc::parse_with(&c, &f, &r.toc_digest, &self.cfg.toc_limits)
                    .map_err(|e| self.refused(e))?;
                (f, c, toc)
            }
        };
        // Only a verified TOC is kept: a bad copy would refuse the layer for good.
        if fetched {
            if let Err(e) = self.tocs.write(&r.toc_digest, &footer, &compressed) {
                warn!(layer = %r.layer_digest, error = %e, "cannot keep the TOC locally");
            }
        }
        Ok(self.resolved(toc, primed))
    }

    /// [`RemoteLayers::resolve`] from the kept TOC alone, touching no
    /// network: `Ok(None)` when there is no kept copy that verifies (a bad
    /// one is removed), so the layer must wait for the network.
    ///
    /// # Errors
    /// The TOC digest is not a digest.
    pub fn resolve_local(&self, r: &RemoteRef) -> Result<Option<Resolved>, String> {
        if parse_digest(&r.toc_digest).is_none() {
            return Err(format!(
                "TOC digest {:?} is not a sha256 digest",
                r.toc_digest
            ));
        }
        Ok(self
            .read_kept(r)?
            .map(|(_, _, toc)| self.resolved(toc, None)))
    }

    /// The kept TOC of `r`, verified. A copy that fails verification (torn
    /// by a crash, corrupted on disk) is removed, so the caller fetches and
    /// keeps it again. A copy past a `remote.toc_max_*` limit (lowered
    /// since it was kept) is refused, as a fetched one would be.
    fn read_kept(&self, r: &RemoteRef) -> Result<Option<(Footer, Vec<u8>, Toc)>, String> {
        let now = self.cache.store().clock().now();
        let Some((footer, compressed)) = self.tocs.read_local(&r.toc_digest, now) else {
            return Ok(None);
        };
        match Toc::parse_with(&compressed, &footer, &r.toc_digest, &self.cfg.toc_limits) {
            Ok(toc) => Ok(Some((footer, compressed, toc))),
            Err(e @ super::toc::TocError::OverLimit(_)) => Err(self.refused(e)),
            Err(e) => {
                self.stats.bad_kept_tocs.fetch_add(1, Ordering::Relaxed);
                warn!(layer = %r.layer_digest, toc = %r.toc_digest, error = %e,
                      "kept TOC does not verify; removing it to fetch it again");
                self.tocs.discard(&r.toc_digest);
                Ok(None)
            }
        }
    }

    fn resolved(&self, toc: Toc, primed: Option<Arc<PrimedSource>>) -> Resolved {
        // File bytes only: a hostile TOC may put any size on other entries.
        let size = toc
            .entries
            .iter()
            .filter(|e| e.kind == "reg")
            .fold(0u64, |sum, e| sum.saturating_add(e.size));
        let usage = Usage {
            size: i64::try_from(size).unwrap_or(i64::MAX),
            inodes: toc.entries.len() as i64,
        };
        Resolved {
            toc: Arc::new(toc),
            usage,
            primed,
        }
    }

    /// The TOC at a hinted position, parsed, if it is there and verifies;
    /// `None` (logged) sends the caller to the footer. A TOC there that is
    /// past a limit is refused outright: the footer's would be the same.
    async fn fetch_toc_at(
        &self,
        r: &RemoteRef,
        offset: u64,
        len: u64,
    ) -> Result<Option<(Footer, Vec<u8>, Toc)>, String> {
        let Ok(footer) = Footer::zstd_at(offset, len) else {
            return Ok(None);
        };
        let limits = &self.cfg.toc_limits;
        if limits.check_compressed(len).is_err() {
            // The footer's own length is checked (and refused) next.
            return Ok(None);
        }
        let checked = match self.blobs.source(r).fetch(offset, len).await {
            Ok(b) => match Toc::parse_with(&b, &footer, &r.toc_digest, limits) {
                Ok(toc) => Ok((b.to_vec(), toc)),
                Err(e @ super::toc::TocError::OverLimit(_)) => return Err(self.refused(e)),
                Err(e) => Err(e.to_string()),
            },
            Err(e) => Err(e.to_string()),
        };
        match checked {
            Ok((compressed, toc)) => Ok(Some((footer, compressed, toc))),
            Err(e) => {
                warn!(layer = %r.layer_digest, offset, len, error = %e,
                      "no valid TOC at the annotated position; reading the footer");
                Ok(None)
            }
        }
    }

    async fn fetch_toc(&self, r: &RemoteRef) -> Result<(Footer, Vec<u8>), String> {
        let size = self.blobs.size(r).await?;
        if size < FOOTER_FETCH {
            return Err(format!("blob is only {size} bytes"));
        }
        let source = self.blobs.source(r);
        let tail = source
            .fetch(size - FOOTER_FETCH, FOOTER_FETCH)
            .await
            .map_err(|e| e.to_string())?;
        let footer = parse_footer(&tail, size).map_err(|e| e.to_string())?;
        // Refused before a byte of it is fetched.
        self.cfg
            .toc_limits
            .check_compressed(footer.toc_len)
            .map_err(|e| self.refused(e))?;
        let toc = source
            .fetch(footer.toc_offset, footer.toc_len)
            .await
            .map_err(|e| e.to_string())?;
        Ok((footer, toc.to_vec()))
    }

    /// Mounts a resolved layer at `mountpoint` as snapshot `id`.
    ///
    /// # Errors
    /// The TOC's tree is unservable (e.g. a path escaping the root) or the
    /// mount failed.
    pub fn mount(
        &self,
        id: u64,
        name: &str,
        r: &RemoteRef,
        resolved: &Resolved,
        mountpoint: &Path,
    ) -> Result<(), String> {
        self.serve(id, name, r, resolved, mountpoint, None)
    }

    /// Mounts (`fd` None) or resumes (`fd` kept by an earlier process) a layer.
    fn serve(
        &self,
        id: u64,
        name: &str,
        r: &RemoteRef,
        resolved: &Resolved,
        mountpoint: &Path,
        fd: Option<std::os::fd::OwnedFd>,
    ) -> Result<(), String> {
        let resumed = fd.is_some();
        let tree = super::layer::tree(&resolved.toc)?;
        let reader = Arc::new(
            LayerReader::new(
                r.layer_digest.clone(),
                resolved.toc.clone(),
                self.fetcher.clone(),
                Arc::new(Router::new(self.blobs.source(r)).with_primed(resolved.primed.clone())),
                self.rt.clone(),
                Recorder::new(
                    resolved.toc.entries.len(),
                    self.recording,
                    self.activity.clone(),
                ),
            )
            .with_passthrough(self.cfg.passthrough)
            .with_fetch_ahead(self.cfg.fetch_ahead_bytes),
        );
        let opts = shoal_fuse::MountOptions {
            fsname: format!("shoal:{}", r.layer_digest),
            allow_other: true,
            threads: self.cfg.fuse_threads,
            passthrough: self.cfg.passthrough,
            // Beside the mount point, in the snapshot's own directory.
            iomode_log: mountpoint.parent().map(|d| d.join("iomodes")),
        };
        let mount = match fd {
            Some(fd) => shoal_fuse::attach(tree, reader.clone(), fd, mountpoint, opts)
                .map_err(|e| format!("FUSE resume at {}: {e}", mountpoint.display()))?,
            None => shoal_fuse::mount(tree, reader.clone(), mountpoint, opts)
                .map_err(|e| format!("FUSE mount at {}: {e}", mountpoint.display()))?,
        };
        if !resumed {
            self.keep_fd(id, &mount);
            // A resumed mount keeps the setting: it belongs to the superblock.
            super::readahead::raise(mountpoint);
        }
        self.cache.register(id, r.clone(), reader.clone());
        self.mounted.lock().insert(
            id,
            MountedLayer {
                name: name.to_owned(),
                remote: r.clone(),
                reader,
                mount,
                primed: resolved.primed.clone(),
            },
        );
        self.stats.mounted.fetch_add(1, Ordering::Relaxed);
        info!(id, layer = %r.layer_digest, format = compression_name(resolved.toc.compression),
              files = resolved.toc.entries.len(), resumed, "layer mounted lazily");
        Ok(())
    }

    /// Starts fetching the prefetch set of snapshot `id` in a task, then the
    /// background fetch of the rest; returns at once. The startup sets of
    /// all layers thus download in parallel; [`RemoteLayers::wait_for_prefetch`]
    /// (the container's Prepare) waits for them.
    pub fn start_fetching(&self, id: u64) {
        let Some((reader, primed)) = self
            .mounted
            .lock()
            .get_mut(&id)
            .map(|m| (m.reader.clone(), m.primed.take()))
        else {
            return;
        };
        let chunks = reader.prefetch_chunks();
        // Registered before the task runs, so a container Prepare right
        // after this one waits for it.
        let running = (!chunks.is_empty()).then(|| self.fetcher.priority().startup().begin(id));
        let cfg = self.cfg.clone();
        let background = self.background_job(id);
        self.rt.spawn(async move {
            if let Some(_running) = running {
                let n = chunks.len();
                let started = std::time::Instant::now();
                let r = tokio::time::timeout(cfg.prefetch_timeout, reader.fetch_all(chunks, 4, false))
                    .await;
                match r {
                    Ok(Ok(())) => info!(layer = %reader.layer, chunks = n,
                        ms = started.elapsed().as_millis() as u64, "prefetch set fetched"),
                    Ok(Err(e)) => {
                        warn!(layer = %reader.layer, error = %e, "prefetch failed; continuing lazily")
                    }
                    Err(_) => warn!(layer = %reader.layer, timeout = ?cfg.prefetch_timeout,
                        "prefetch did not finish in time; continuing lazily"),
                }
            }
            // The early request has served the startup set (or cannot):
            // its buffer goes, and later ranges go to the registry as usual.
            if let Some(p) = primed {
                p.finish();
            }
            if let Some(job) = background {
                job.run().await;
            }
        });
    }

    /// With `remote.wait_for_startup_set`, waits at most
    /// `remote.prefetch_timeout_secs` until every startup prefetch in flight
    /// has ended; otherwise returns at once (the container's reads of chunks
    /// still on their way wait for those chunks alone). Blocking: call from
    /// a blocking thread.
    pub fn wait_for_prefetch(&self) {
        if !self.cfg.wait_for_startup || self.fetcher.priority().startup().is_empty() {
            return;
        }
        let started = std::time::Instant::now();
        let done = self.rt.block_on(async {
            tokio::time::timeout(
                self.cfg.prefetch_timeout,
                self.fetcher.priority().startup().wait_all(),
            )
            .await
            .is_ok()
        });
        info!(
            ms = started.elapsed().as_millis() as u64,
            done, "waited for startup prefetches"
        );
    }

    /// Starts only the background fetch of snapshot `id` (if enabled),
    /// without waiting: for layers mounted again at start, which must not
    /// hold up the daemon when the registry is unreachable.
    pub fn start_background(&self, id: u64) {
        if let Some(job) = self.background_job(id) {
            self.rt.spawn(job.run());
        }
    }

    /// Fetches the rest of snapshot `id` now and lays out its large files
    /// for passthrough (what the background fetch does, awaited).
    ///
    /// # Errors
    /// Not mounted, or the first fetch error.
    pub async fn fetch_and_lay_out(&self, id: u64) -> Result<(), String> {
        let reader = self
            .mounted
            .lock()
            .get(&id)
            .map(|m| m.reader.clone())
            .ok_or_else(|| format!("snapshot {id} is not a mounted remote layer"))?;
        reader.fetch_and_lay_out(false).await
    }

    /// Crash recovery once the root lock is held: drops partial chunk
    /// files, rebuilds the chunk index in `db` from the files, and starts
    /// the cache's GC loop.
    ///
    /// # Errors
    /// The database failed.
    pub fn recover(&self, db: Arc<redb::Database>) -> Result<(), redb::Error> {
        let store = self.fetcher.store();
        store.remove_stale_temp();
        let started = std::time::Instant::now();
        store.attach_index(db.clone())?;
        self.tocs.attach(&db)?;
        self.checks.attach(&db)?;
        info!(
            chunks = store.index().len(),
            bytes = store.index().used(),
            ms = started.elapsed().as_millis() as u64,
            "chunk store indexed"
        );
        self.cache.spawn(&self.rt);
        Ok(())
    }

    /// Whether snapshot `id` is mounted (by this process).
    pub fn is_mounted(&self, id: u64) -> bool {
        self.mounted.lock().contains_key(&id)
    }

    /// Layers mounted now.
    pub fn mounted_count(&self) -> usize {
        self.mounted.lock().len()
    }

    /// The chunk cache (GC, pins).
    pub fn cache(&self) -> &Arc<Cache> {
        &self.cache
    }

    /// Unmounts snapshot `id` if it is mounted.
    pub fn unmount(&self, id: u64) {
        // Not under the lock: unregister may wait for a Prepare's write
        // transaction, whose mount takes this lock.
        let m = self.mounted.lock().remove(&id);
        if let Some(m) = m {
            self.forget_fd(id);
            self.cache.unregister(id);
            m.reader.stop();
            if let Err(e) = m.mount.unmount() {
                warn!(id, error = %e, "unmount failed");
            }
        }
    }

    /// Status of every mounted layer, by snapshot id.
    pub fn status(&self) -> Vec<LayerStatus> {
        let layers: Vec<(u64, String, RemoteRef, Arc<LayerReader>)> = self
            .mounted
            .lock()
            .iter()
            .map(|(id, m)| (*id, m.name.clone(), m.remote.clone(), m.reader.clone()))
            .collect();
        let store = self.fetcher.store();
        let pins = self.cache.pinned_tocs();
        let mut out: Vec<LayerStatus> = layers
            .into_iter()
            .map(|(id, name, remote, reader)| {
                let pinned = Cache::is_pinned(&pins, &remote);
                let chunks = reader.all_chunks();
                let local: Vec<_> = chunks
                    .iter()
                    .filter(|c| store.contains(&c.digest))
                    .collect();
                LayerStatus {
                    name: name.clone(),
                    id,
                    remote,
                    format: compression_name(reader.toc().compression),
                    files: reader.toc().entries.len() as u64,
                    chunks_total: chunks.len() as u64,
                    chunks_local: local.len() as u64,
                    bytes_total: chunks.iter().map(|c| c.len).sum(),
                    bytes_local: local.iter().map(|c| c.len).sum(),
                    served_from_cache: reader.served.from_cache.load(Ordering::Relaxed),
                    served_after_fetch: reader.served.after_fetch.load(Ordering::Relaxed),
                    fetched_on_demand: reader.served.fetched_on_demand.load(Ordering::Relaxed),
                    read_errors: reader.served.errors.load(Ordering::Relaxed),
                    pinned,
                    identity: self.checks.get(&name),
                }
            })
            .collect();
        out.sort_by_key(|l| l.id);
        out
    }

    /// First reads recorded on every mounted layer.
    pub fn first_reads(&self) -> Vec<LayerFirstReads> {
        let readers: Vec<(RemoteRef, Arc<LayerReader>)> = self
            .mounted
            .lock()
            .values()
            .map(|m| (m.remote.clone(), m.reader.clone()))
            .collect();
        readers
            .into_iter()
            .map(|(r, reader)| {
                let toc = reader.toc();
                let reads = reader
                    .recorder
                    .first_reads()
                    .into_iter()
                    .filter_map(|(ms, id)| Some((ms, toc.entries.get(id as usize)?.name.clone())))
                    .collect();
                LayerFirstReads {
                    layer_digest: r.layer_digest,
                    image_ref: r.image_ref,
                    reads,
                }
            })
            .collect()
    }

    /// The fetcher (for its counters and store).
    pub fn fetcher(&self) -> &Arc<Fetcher> {
        &self.fetcher
    }

    /// The message of a TOC error, counting a limit's refusal.
    fn refused(&self, e: super::toc::TocError) -> String {
        if matches!(e, super::toc::TocError::OverLimit(_)) {
            self.stats
                .fallbacks_toc_limit
                .fetch_add(1, Ordering::Relaxed);
        }
        e.to_string()
    }

    /// Notes a fallback to a normal pull.
    pub fn fallback(&self, layer: &str, why: FallbackReason, reason: &str) {
        self.stats.fallbacks.fetch_add(1, Ordering::Relaxed);
        match why {
            FallbackReason::Toc => &self.stats.fallbacks_toc,
            FallbackReason::Mount => &self.stats.fallbacks_mount,
            FallbackReason::Conflict => &self.stats.fallbacks_conflict,
        }
        .fetch_add(1, Ordering::Relaxed);
        warn!(
            layer,
            reason, "cannot mount layer lazily; falling back to a normal pull"
        );
    }
}

impl Drop for RemoteLayers {
    fn drop(&mut self) {
        let ids: Vec<u64> = self.mounted.lock().keys().copied().collect();
        for id in ids {
            self.unmount(id);
        }
        if let Err(e) = self.fetcher.store().index().flush() {
            warn!(error = %e, "cannot write the chunk index");
        }
    }
}
