//! Strict priority between the three classes of fetch.
//!
//! 1. **On-demand** reads (a reader is blocked on them) never wait here.
//! 2. **Startup prefetch** batches wait while any on-demand fetch is in
//!    flight, but at most [`STARTUP_YIELD_MAX`] per batch, so a busy reader
//!    cannot starve the startup set.
//! 3. **Background** batches (the rest of each layer) wait until no startup
//!    prefetch is in flight on any layer *and* on-demand fetches have been
//!    quiet for [`DEMAND_QUIET`]: a layer that the startup set doesn't touch
//!    gets no bandwidth until every startup set is in.
//!
//! The gate only decides *when* a batch may start; a request already sent is
//! never cancelled.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::remote::prefetch::InFlight;

/// How long on-demand fetches must have been quiet before background
/// batches go on.
pub const DEMAND_QUIET: Duration = Duration::from_millis(1000);

/// Longest a startup prefetch batch yields to on-demand fetches.
pub const STARTUP_YIELD_MAX: Duration = Duration::from_millis(200);

/// The gate every fetch class goes through (one per daemon, shared by all
/// layers through the [`super::Fetcher`]).
#[derive(Debug)]
pub struct Priority {
    startup: Arc<InFlight>,
    demand_quiet: Duration,
    startup_yield_max: Duration,
    epoch: Instant,
    /// On-demand fetches under way.
    demand_in_flight: AtomicU64,
    /// 1 + milliseconds since `epoch` of the last on-demand start or end;
    /// 0: never.
    last_demand: AtomicU64,
    /// Signalled when an on-demand fetch ends.
    demand_ended: Notify,
    /// Startup batches that waited for on-demand fetches.
    pub startup_yields: AtomicU64,
}

/// Held while an on-demand fetch is under way.
pub struct Demand(Arc<Priority>);

impl Drop for Demand {
    fn drop(&mut self) {
        let p = &self.0;
        p.last_demand.store(p.now_ms() + 1, Ordering::SeqCst);
        p.demand_in_flight.fetch_sub(1, Ordering::SeqCst);
        p.demand_ended.notify_waiters();
    }
}

impl Default for Priority {
    fn default() -> Self {
        Priority::with_timing(DEMAND_QUIET, STARTUP_YIELD_MAX)
    }
}

impl Priority {
    /// A gate with other quiet and yield times than [`DEMAND_QUIET`] and
    /// [`STARTUP_YIELD_MAX`] (tests).
    pub fn with_timing(demand_quiet: Duration, startup_yield_max: Duration) -> Priority {
        Priority {
            startup: Arc::default(),
            demand_quiet,
            startup_yield_max,
            epoch: Instant::now(),
            demand_in_flight: AtomicU64::new(0),
            last_demand: AtomicU64::new(0),
            demand_ended: Notify::new(),
            startup_yields: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Startup prefetches in flight (Prepare registers them; the
    /// container's Prepare waits for them).
    pub fn startup(&self) -> &Arc<InFlight> {
        &self.startup
    }

    /// Marks an on-demand fetch as under way until the guard drops.
    pub fn demand(self: &Arc<Self>) -> Demand {
        self.demand_in_flight.fetch_add(1, Ordering::SeqCst);
        self.last_demand.store(self.now_ms() + 1, Ordering::SeqCst);
        Demand(self.clone())
    }

    fn demand_busy(&self) -> bool {
        self.demand_in_flight.load(Ordering::SeqCst) > 0
    }

    /// Waits for a startup prefetch batch's turn: until no on-demand fetch
    /// is in flight, or [`STARTUP_YIELD_MAX`] has passed.
    pub async fn startup_turn(&self) {
        let deadline = Instant::now() + self.startup_yield_max;
        let mut yielded = false;
        loop {
            let ended = self.demand_ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            if !self.demand_busy() {
                return;
            }
            if !yielded {
                yielded = true;
                self.startup_yields.fetch_add(1, Ordering::Relaxed);
            }
            if tokio::time::timeout_at(deadline, ended).await.is_err() {
                return;
            }
        }
    }

    /// Waits for a background batch's turn: no startup prefetch in flight
    /// anywhere, no on-demand fetch in flight, and none for
    /// [`DEMAND_QUIET`].
    pub async fn background_turn(&self) {
        loop {
            if !self.startup.is_empty() {
                self.startup.wait_all().await;
                continue;
            }
            let ended = self.demand_ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            if self.demand_busy() {
                ended.await;
                continue;
            }
            let last = self.last_demand.load(Ordering::SeqCst);
            let quiet_for = match last {
                0 => u64::MAX,
                l => self.now_ms().saturating_sub(l - 1),
            };
            let want = self.demand_quiet.as_millis() as u64;
            if quiet_for >= want {
                // A startup set may have begun while we looked at demand.
                if self.startup.is_empty() {
                    return;
                }
                continue;
            }
            tokio::time::sleep(Duration::from_millis(want - quiet_for)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    //! Real time with short quiet and yield times: "still waiting" is checked
    //! over a span, "went on" within a generous bound, so a loaded machine
    //! slows the tests but does not fail them.
    use super::*;

    const QUIET: Duration = Duration::from_millis(100);

    /// Whether `fut` finishes within `within`.
    async fn done_within<F: std::future::Future>(
        fut: &mut std::pin::Pin<Box<F>>,
        within: Duration,
    ) -> bool {
        tokio::time::timeout(within, fut.as_mut()).await.is_ok()
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[tokio::test]
    async fn background_waits_for_every_startup_set_and_for_demand_quiet() {
        let p = Arc::new(Priority::with_timing(QUIET, secs(60)));
        // Nothing going on: at once.
        assert!(done_within(&mut Box::pin(p.background_turn()), secs(5)).await);

        let a = p.startup().begin(1);
        let b = p.startup().begin(2);
        let mut bg = Box::pin(p.background_turn());
        assert!(!done_within(&mut bg, QUIET * 3).await);
        drop(a);
        assert!(
            !done_within(&mut bg, QUIET * 2).await,
            "one startup set still in flight"
        );
        drop(b);
        assert!(done_within(&mut bg, secs(5)).await);

        // An on-demand fetch holds background back while it runs and for
        // the quiet time after it ends.
        let d = p.demand();
        let mut bg = Box::pin(p.background_turn());
        assert!(!done_within(&mut bg, QUIET * 3).await);
        drop(d);
        let ended = Instant::now();
        assert!(done_within(&mut bg, secs(5)).await);
        assert!(ended.elapsed() >= QUIET - Duration::from_millis(2));
    }

    #[tokio::test]
    async fn a_startup_set_begun_during_the_quiet_wait_still_goes_first() {
        let p = Arc::new(Priority::with_timing(QUIET, secs(60)));
        drop(p.demand());
        let mut bg = Box::pin(p.background_turn());
        assert!(!done_within(&mut bg, QUIET / 4).await);
        let s = p.startup().begin(7);
        assert!(!done_within(&mut bg, QUIET * 4).await);
        drop(s);
        assert!(done_within(&mut bg, secs(5)).await);
    }

    #[tokio::test]
    async fn startup_yields_to_demand_but_never_longer_than_the_bound() {
        // A bound far above the test's other waits: going on before it
        // shows that the wait ended for another reason.
        let p = Arc::new(Priority::with_timing(QUIET, secs(30)));
        assert!(
            done_within(&mut Box::pin(p.startup_turn()), secs(5)).await,
            "no demand: no wait"
        );
        assert_eq!(p.startup_yields.load(Ordering::Relaxed), 0);

        // Demand ends after 50 ms: startup goes on then.
        let d = p.demand();
        let ender = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            drop(d);
        });
        let t = Instant::now();
        assert!(done_within(&mut Box::pin(p.startup_turn()), secs(10)).await);
        assert!(t.elapsed() >= Duration::from_millis(45));
        ender.await.unwrap();

        // Demand that never ends: startup goes on after the bound.
        let p = Arc::new(Priority::with_timing(QUIET, Duration::from_millis(200)));
        let _d = p.demand();
        let t = Instant::now();
        assert!(done_within(&mut Box::pin(p.startup_turn()), secs(10)).await);
        assert!(t.elapsed() >= Duration::from_millis(195));
        assert_eq!(p.startup_yields.load(Ordering::Relaxed), 1);
        // Background, meanwhile, still waits.
        let mut bg = Box::pin(p.background_turn());
        assert!(!done_within(&mut bg, QUIET * 5).await);
    }
}
