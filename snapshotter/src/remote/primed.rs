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
//! verifies every chunk against the TOC like bytes from any source, and
//! re-fetches a chunk that fails with a plain `fetch`, which always goes to
//! the inner source. A streamed range outside the primed window, or any
//! range once the early request failed or priming is
//! [`PrimedSource::finish`]ed, goes to the inner source too.

use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::watch;
use tracing::debug;

use super::fetch::{extend_contiguous, BoxFuture, RangeSource, Sink};

/// Largest window primed: a startup set larger than this is primed for its
/// first part only (the rest is fetched as usual).
pub const MAX_PRIMED_BYTES: u64 = 32 << 20;

/// How far the early request has got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Progress {
    /// Bytes `[0, n)` of the window are in.
    Have(u64),
    /// The request failed (or priming ended): use the inner source.
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
    inner: Arc<dyn RangeSource>,
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
        let (src, sh) = (inner.clone(), shared.clone());
        let task = rt.spawn(async move {
            let (sink, mut pieces) = tokio::sync::mpsc::unbounded_channel();
            let fetch = src.fetch_streamed(0, end, sink);
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
            inner,
            window: Mutex::new(Some(Window { shared, task })),
        })
    }

    /// Ends priming: the window's bytes are dropped, and every range goes
    /// to the inner source (called once the startup fetch is over).
    pub fn finish(&self) {
        if let Some(w) = self.window.lock().take() {
            w.shared.progress.send_replace(Progress::Gone);
        }
    }

    fn shared(&self) -> Option<Arc<Shared>> {
        self.window.lock().as_ref().map(|w| w.shared.clone())
    }

    /// Sends `[offset, offset + len)` from the window to `sink` as it
    /// arrives and returns it; `None` if the window cannot serve it (then
    /// the caller asks the inner source).
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
    /// Always the inner source: the fetcher's plain fetches are the
    /// re-fetches of chunks that failed verification, and those must not
    /// be answered from the same bytes again.
    fn fetch(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<Bytes, String>> {
        self.inner.fetch(offset, len)
    }

    fn fetch_streamed(
        &self,
        offset: u64,
        len: u64,
        sink: Sink,
    ) -> BoxFuture<'_, Result<Bytes, String>> {
        Box::pin(async move {
            let end = offset.saturating_add(len);
            let split = self
                .shared()
                .map(|w| w.end)
                .filter(|&w| offset < w && w < end);
            let Some(w) = split else {
                return match self.serve_window(offset, len, &sink).await {
                    Some(b) => Ok(b),
                    // Pieces already sent are skipped by the receiver.
                    None => self.inner.fetch_streamed(offset, len, sink).await,
                };
            };
            // Starts inside the window and runs past it: the head from the
            // window, the tail by a request of its own, at the same time.
            let (head, tail) = tokio::join!(
                self.serve_window(offset, w - offset, &sink),
                self.inner.fetch_streamed(w, end - w, sink.clone())
            );
            let head = match head {
                Some(h) => h,
                None => self.inner.fetch_streamed(offset, w - offset, sink).await?,
            };
            let mut all = Vec::with_capacity(len as usize);
            all.extend_from_slice(&head);
            all.extend_from_slice(&tail?);
            Ok(Bytes::from(all))
        })
    }

    fn name(&self) -> &str {
        self.inner.name()
    }
}
