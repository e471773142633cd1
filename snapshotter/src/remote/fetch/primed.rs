//! A layer's startup set, requested before its TOC is in.
//!
//! On a first mount the TOC must arrive (and verify) before Shoal knows which
//! chunks the startup set holds. When the layer's annotations say where the
//! startup set ends ([`super::annotations::Hints`]), [`PrimedSource`] asks
//! for `[0, end)` at once, alongside the TOC, and keeps the bytes as they
//! arrive. The startup fetch, once the TOC is parsed, reads its merged
//! ranges from that stream instead of sending requests of its own: one
//! request and one round trip fewer, and no gap on the link between the TOC
//! and the startup set.
//!
//! Nothing here is trusted: the bytes are handed to the fetcher, which
//! verifies every chunk against the TOC like bytes from any source. The
//! [`super::router::Router`] sends a chunk here only while the window
//! [`PrimedSource::covers`] it; a range the window cannot serve (the early
//! request failed, or priming is [`PrimedSource::finish`]ed) is answered
//! [`SourceError::NotFound`], and the router takes it to the registry, as
//! it does every re-fetch of a chunk that failed verification.

use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::watch;
use tracing::debug;

use super::extend_contiguous;
use super::source::{BoxFuture, RangeSource, Sink, SourceError, SourceKind};

/// Largest window primed: a startup set larger than this is primed for its
/// first part only (the rest is fetched as usual).
pub const MAX_PRIMED_BYTES: u64 = 32 << 20;

/// How far the early request has got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Progress {
    /// Bytes `[0, n)` of the window are in.
    Have(u64),
    /// The request failed (or priming ended): the registry serves everything.
    Gone,
}

/// The early request's bytes, shared with the task that receives them.
struct Shared {
    end: u64,
    bytes: Mutex<Vec<u8>>,
    progress: watch::Sender<Progress>,
}

impl Shared {
    /// Appends a piece that continues the window.
    fn take(&self, piece: (u64, Bytes)) {
        let mut bytes = self.bytes.lock();
        if extend_contiguous(&mut bytes, 0, piece) {
            self.progress
                .send_replace(Progress::Have(bytes.len() as u64));
        }
    }
}

/// The window and the task filling it, aborted when the window goes.
struct Window {
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Window {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A [`RangeSource`] that serves `[0, end)` from one early streamed request.
pub struct PrimedSource {
    window: Mutex<Option<Window>>,
}

impl PrimedSource {
    /// Starts fetching `[0, min(end, MAX_PRIMED_BYTES))` from `inner` on
    /// runtime `rt`.
    pub fn start(
        inner: Arc<dyn RangeSource>,
        end: u64,
        rt: &tokio::runtime::Handle,
    ) -> Arc<PrimedSource> {
        let end = end.min(MAX_PRIMED_BYTES);
        let shared = Arc::new(Shared {
            end,
            bytes: Mutex::new(Vec::new()),
            progress: watch::channel(Progress::Have(0)).0,
        });
        let sh = shared.clone();
        let task = rt.spawn(async move {
            let (sink, mut pieces) = tokio::sync::mpsc::unbounded_channel();
            let fetch = inner.fetch_streamed(0, end, sink);
            tokio::pin!(fetch);
            let r = loop {
                tokio::select! {
                    r = &mut fetch => break r,
                    Some(p) = pieces.recv() => sh.take(p),
                }
            };
            while let Ok(p) = pieces.try_recv() {
                sh.take(p);
            }
            if let Err(e) = r {
                debug!(end, error = %e, "early startup-set request failed; fetching it as usual");
                sh.progress.send_replace(Progress::Gone);
            }
        });
        Arc::new(PrimedSource {
            window: Mutex::new(Some(Window { shared, task })),
        })
    }

    /// Ends priming: the window's bytes are dropped, and every range goes
    /// to the registry (called once the startup fetch is over).
    pub fn finish(&self) {
        if let Some(w) = self.window.lock().take() {
            w.shared.progress.send_replace(Progress::Gone);
        }
    }

    /// Whether the window is live and holds all of blob bytes
    /// `[offset, end)`.
    pub fn covers(&self, offset: u64, end: u64) -> bool {
        self.window.lock().as_ref().is_some_and(|w| {
            offset < end && end <= w.shared.end && *w.shared.progress.borrow() != Progress::Gone
        })
    }

    fn shared(&self) -> Option<Arc<Shared>> {
        self.window.lock().as_ref().map(|w| w.shared.clone())
    }

    /// Sends `[offset, offset + len)` from the window to `sink` as it
    /// arrives and returns it; `None` if the window cannot serve it (then
    /// the router asks the registry).
    async fn serve_window(&self, offset: u64, len: u64, sink: &Sink) -> Option<Bytes> {
        let w = self.shared()?;
        let end = offset.checked_add(len)?;
        if end > w.end {
            return None;
        }
        let mut rx = w.progress.subscribe();
        let mut sent = offset;
        loop {
            let have = match *rx.borrow_and_update() {
                Progress::Have(n) => n,
                Progress::Gone => return None,
            };
            if have > sent {
                let upto = have.min(end);
                let piece = {
                    let bytes = w.bytes.lock();
                    Bytes::copy_from_slice(&bytes[sent as usize..upto as usize])
                };
                let _ = sink.send((sent, piece));
                sent = upto;
            }
            if sent >= end {
                let bytes = w.bytes.lock();
                return Some(Bytes::copy_from_slice(
                    &bytes[offset as usize..end as usize],
                ));
            }
            if rx.changed().await.is_err() {
                return None;
            }
        }
    }
}

impl RangeSource for PrimedSource {
    fn fetch(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<Bytes, SourceError>> {
        let (sink, _) = tokio::sync::mpsc::unbounded_channel();
        self.fetch_streamed(offset, len, sink)
    }

    fn fetch_streamed(
        &self,
        offset: u64,
        len: u64,
        sink: Sink,
    ) -> BoxFuture<'_, Result<Bytes, SourceError>> {
        Box::pin(async move {
            self.serve_window(offset, len, &sink).await.ok_or_else(|| {
                SourceError::NotFound(format!(
                    "primed window cannot serve {len} bytes at {offset}"
                ))
            })
        })
    }

    fn name(&self) -> &str {
        "primed"
    }

    fn kind(&self) -> SourceKind {
        SourceKind::Primed
    }
}
