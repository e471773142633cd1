//! Startup prefetches in flight, so a container's Prepare can wait for them.
//!
//! A lazily mounted layer's Prepare returns as soon as the layer is mounted;
//! its prefetch set (eStargz landmark or Shoal startup mark) is fetched by a
//! task, so the startup sets of all an image's layers download in parallel
//! rather than one Prepare after another. The container's own Prepare then
//! waits (bounded by `remote.prefetch_timeout_secs`) for every prefetch in
//! flight before it returns the rootfs mounts.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::watch;

/// Prefetch tasks by snapshot id.
#[derive(Debug, Default)]
pub struct InFlight {
    map: Mutex<HashMap<u64, watch::Receiver<bool>>>,
}

/// Held by a prefetch task; dropping it (done, failed or panicked) ends the
/// wait for this layer.
pub struct Running {
    set: Arc<InFlight>,
    id: u64,
    _done: watch::Sender<bool>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.set.map.lock().remove(&self.id);
    }
}

impl InFlight {
    /// Notes that snapshot `id` is prefetching until the guard drops.
    pub fn begin(self: &Arc<Self>, id: u64) -> Running {
        let (tx, rx) = watch::channel(false);
        self.map.lock().insert(id, rx);
        Running {
            set: self.clone(),
            id,
            _done: tx,
        }
    }

    /// Waits until every prefetch in flight now has ended.
    pub async fn wait_all(&self) {
        let rxs: Vec<watch::Receiver<bool>> = self.map.lock().values().cloned().collect();
        for mut rx in rxs {
            // Err: the sender dropped, i.e. the prefetch ended.
            let _ = rx.wait_for(|done| *done).await;
        }
    }

    /// Prefetches in flight.
    pub fn len(&self) -> usize {
        self.map.lock().len()
    }

    /// Whether none is in flight.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(flavor = "current_thread")]
    async fn waits_for_every_prefetch_in_flight() {
        let set = Arc::new(InFlight::default());
        set.wait_all().await; // nothing in flight: returns at once
        let s2 = set.clone();
        let task = tokio::spawn(async move {
            let _a = s2.begin(1);
            let _b = s2.begin(2);
            tokio::time::sleep(Duration::from_millis(50)).await;
        });
        tokio::task::yield_now().await;
        assert_eq!(set.len(), 2);
        let started = tokio::time::Instant::now();
        set.wait_all().await;
        assert!(started.elapsed() >= Duration::from_millis(50));
        task.await.unwrap();
        assert!(set.is_empty());
    }
}
