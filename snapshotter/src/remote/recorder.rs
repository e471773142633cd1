//! Startup profile recording: the order in which a mounted layer's files
//! are first read, during a window after the mount.
//!
//! Invariants: the read path pays one clock read and, within the window, one
//! atomic swap per read; it allocates only on a file's first read. Memory is
//! one flag per TOC entry plus one record per file read in the window.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Default recording window after a layer is mounted.
pub const DEFAULT_PROFILE_WINDOW: Duration = Duration::from_secs(30);

/// First reads of one layer's files.
#[derive(Debug)]
pub struct Recorder {
    started: Instant,
    window: Duration,
    seen: Vec<AtomicBool>,
    order: Mutex<Vec<(u32, u32)>>,
}

impl Recorder {
    /// A recorder for a layer of `entries` files, recording for `window`
    /// from now.
    pub fn new(entries: usize, window: Duration) -> Recorder {
        Recorder {
            started: Instant::now(),
            window,
            seen: (0..entries).map(|_| AtomicBool::new(false)).collect(),
            order: Mutex::new(Vec::new()),
        }
    }

    /// Notes a read of entry `id`.
    pub fn touch(&self, id: u64) {
        let at = self.started.elapsed();
        if at > self.window {
            return;
        }
        let Some(flag) = self.seen.get(id as usize) else {
            return;
        };
        if flag.load(Ordering::Relaxed) || flag.swap(true, Ordering::Relaxed) {
            return;
        }
        let ms = u32::try_from(at.as_millis()).unwrap_or(u32::MAX);
        self.order
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((ms, id as u32));
    }

    /// (milliseconds after mount, entry id) of every first read so far, in
    /// order.
    pub fn first_reads(&self) -> Vec<(u32, u32)> {
        self.order.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_first_reads_in_order_within_the_window() {
        let r = Recorder::new(4, Duration::from_secs(60));
        for id in [2, 0, 2, 9, 0, 3] {
            r.touch(id);
        }
        let ids: Vec<u32> = r.first_reads().into_iter().map(|(_, id)| id).collect();
        assert_eq!(ids, [2, 0, 3]);
        let closed = Recorder::new(4, Duration::ZERO);
        std::thread::sleep(Duration::from_millis(2));
        closed.touch(1);
        assert!(closed.first_reads().is_empty());
    }
}
