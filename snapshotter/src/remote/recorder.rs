//! Startup profile recording: the order in which a mounted layer's files
//! are first read, during a window after the mount.
//!
//! A layer records while both hold:
//! - less than `window` has passed since it was mounted;
//! - the container is not idle: once files have been first-read (on any
//!   layer) after this layer was mounted, a gap of `idle` with no new first
//!   read ends the recording. Before the first read (the container has not
//!   started) the idle clock does not run.
//!
//! Once ended, a layer's recording stays ended. Invariants: the read path
//! pays one clock read and, while recording, one atomic swap per read; it
//! allocates only on a file's first read. Memory is one flag per TOC entry
//! plus one record per file read while recording.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Default `profile.window_secs`: longest recording after a layer is mounted.
pub const DEFAULT_PROFILE_WINDOW_SECS: u64 = 30;
/// Default `profile.idle_secs`: recording ends once no file was first-read
/// for this long after the container started reading.
pub const DEFAULT_PROFILE_IDLE_SECS: u64 = 10;

/// How long layers record (the `[profile]` config section).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Recording {
    /// Longest recording after a mount (zero: no recording).
    pub window: Duration,
    /// Quiet gap that ends recording; `None`: only the window ends it.
    pub idle: Option<Duration>,
}

impl Default for Recording {
    fn default() -> Self {
        Recording {
            window: Duration::from_secs(DEFAULT_PROFILE_WINDOW_SECS),
            idle: Some(Duration::from_secs(DEFAULT_PROFILE_IDLE_SECS)),
        }
    }
}

/// The daemon's clock for recording, and when any layer last saw a first
/// read (shared by every layer, so the idle gap is the container's, not one
/// layer's).
#[derive(Debug)]
pub struct Activity {
    epoch: Instant,
    /// 1 + milliseconds since `epoch` of the latest recorded first read; 0:
    /// none yet.
    last_first_read: AtomicU64,
}

impl Default for Activity {
    fn default() -> Self {
        Activity {
            epoch: Instant::now(),
            last_first_read: AtomicU64::new(0),
        }
    }
}

impl Activity {
    /// Milliseconds since this activity's epoch.
    pub fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }
}

/// First reads of one layer's files.
#[derive(Debug)]
pub struct Recorder {
    activity: Arc<Activity>,
    /// Mount time, in `activity` milliseconds.
    mounted: u64,
    window_ms: u64,
    idle_ms: Option<u64>,
    ended: AtomicBool,
    seen: Vec<AtomicBool>,
    order: Mutex<Vec<(u32, u32)>>,
}

impl Recorder {
    /// A recorder for a layer of `entries` files, mounted now.
    pub fn new(entries: usize, recording: Recording, activity: Arc<Activity>) -> Recorder {
        Recorder {
            mounted: activity.now_ms(),
            activity,
            window_ms: recording.window.as_millis() as u64,
            idle_ms: recording.idle.map(|d| d.as_millis() as u64),
            ended: AtomicBool::new(false),
            seen: (0..entries).map(|_| AtomicBool::new(false)).collect(),
            order: Mutex::new(Vec::new()),
        }
    }

    /// Notes a read of entry `id`.
    pub fn touch(&self, id: u64) {
        if !self.ended.load(Ordering::Relaxed) {
            self.touch_at(id, self.activity.now_ms());
        }
    }

    /// Notes a read of entry `id` at `now` (milliseconds on the activity's
    /// clock).
    fn touch_at(&self, id: u64, now: u64) {
        if self.ended.load(Ordering::Relaxed) {
            return;
        }
        let at = now.saturating_sub(self.mounted);
        let last = self.activity.last_first_read.load(Ordering::Relaxed);
        let idle = match (self.idle_ms, last) {
            // A first read since this mount, then a quiet gap.
            (Some(idle), l) if l > self.mounted => now.saturating_sub(l - 1) > idle,
            _ => false,
        };
        if at >= self.window_ms || idle {
            self.ended.store(true, Ordering::Relaxed);
            return;
        }
        let Some(flag) = self.seen.get(id as usize) else {
            return;
        };
        if flag.load(Ordering::Relaxed) || flag.swap(true, Ordering::Relaxed) {
            return;
        }
        self.activity
            .last_first_read
            .fetch_max(now + 1, Ordering::Relaxed);
        let ms = u32::try_from(at).unwrap_or(u32::MAX);
        self.order.lock().push((ms, id as u32));
    }

    /// (milliseconds after mount, entry id) of every first read so far, in
    /// order.
    pub fn first_reads(&self) -> Vec<(u32, u32)> {
        self.order.lock().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(r: &Recorder) -> Vec<u32> {
        r.first_reads().into_iter().map(|(_, id)| id).collect()
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn records_first_reads_in_order_within_the_window() {
        let r = Recorder::new(4, Recording::default(), Arc::default());
        for id in [2, 0, 2, 9, 0, 3] {
            r.touch(id);
        }
        assert_eq!(ids(&r), [2, 0, 3]);
        let closed = Recorder::new(
            4,
            Recording {
                window: Duration::ZERO,
                idle: None,
            },
            Arc::default(),
        );
        closed.touch(1);
        assert!(closed.first_reads().is_empty());
    }

    #[test]
    fn the_window_ends_recording_for_good() {
        let rec = Recording {
            window: secs(30),
            idle: None,
        };
        let r = Recorder::new(8, rec, Arc::default());
        let m = r.mounted;
        r.touch_at(1, m + 1_000);
        r.touch_at(2, m + 29_999);
        r.touch_at(3, m + 30_000);
        r.touch_at(4, m + 10); // late arrival of an earlier time: still ended
        assert_eq!(ids(&r), [1, 2]);
        assert_eq!(r.first_reads()[1].0, 29_999);
    }

    #[test]
    fn an_idle_gap_after_the_container_started_ends_recording() {
        let rec = Recording {
            window: secs(60),
            idle: Some(secs(5)),
        };
        let activity = Arc::new(Activity::default());
        let a = Recorder::new(8, rec, activity.clone());
        let b = Recorder::new(8, rec, activity.clone());
        let m = a.mounted.max(b.mounted);
        // The container starts 20 s after the mount: the idle clock had not
        // been running.
        a.touch_at(1, m + 20_000);
        // Reads on another layer keep the container busy for both.
        b.touch_at(1, m + 24_000);
        a.touch_at(2, m + 28_000);
        // A read of a file already seen is not new activity.
        a.touch_at(2, m + 29_000);
        assert_eq!(ids(&a), [1, 2]);
        // 5 s with no new first read anywhere (last at +28 s): b ends too.
        b.touch_at(2, m + 33_001);
        a.touch_at(3, m + 33_002);
        assert_eq!(ids(&a), [1, 2]);
        assert_eq!(ids(&b), [1]);
        // Ended stays ended.
        b.touch_at(4, m + 28_500);
        assert_eq!(ids(&b), [1]);
    }
}
