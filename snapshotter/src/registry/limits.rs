//! Concurrency limits of the registry client, so that one slow host or one
//! busy layer cannot take every request slot of the daemon.
//!
//! A request takes, in this order, a permit of its blob on its host (Range
//! and size requests only), a permit of its host, and a permit of the
//! client-wide pool. The order is the same for every request, so no two
//! requests can wait on each other. Tokio's semaphores are FIFO, so layers
//! waiting on one host take turns.
//!
//! Invariants:
//! - At most `per_blob` requests of one blob on one host, `per_host` of one
//!   host, and `global` in all are in flight at once.
//! - A host's or blob's pool lives while someone holds or waits for it; the
//!   maps drop a pool when its last user goes (a wait that is cancelled
//!   included), so hosts and digests named by images cannot grow them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Each pool with the number of requests holding or waiting for it.
type Pools = Arc<Mutex<HashMap<String, (Arc<Semaphore>, usize)>>>;

/// Permit pools: client-wide, per host, per blob on a host.
#[derive(Debug)]
pub(crate) struct Limits {
    global: Arc<Semaphore>,
    per_host: usize,
    per_blob: usize,
    hosts: Pools,
    blobs: Pools,
}

/// The permits of one request; dropping it frees them (and idle pools).
#[derive(Debug)]
pub(crate) struct Permits {
    // Field order is drop order: the client-wide permit goes first.
    _global: OwnedSemaphorePermit,
    _host: Slot,
    _blob: Option<Slot>,
}

/// One user of a keyed pool: counted from before its wait until dropped.
#[derive(Debug)]
struct Slot {
    permit: Option<OwnedSemaphorePermit>,
    key: String,
    pools: Pools,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.permit.take();
        let mut map = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, users)) = map.get_mut(&self.key) {
            *users -= 1;
            if *users == 0 {
                map.remove(&self.key);
            }
        }
    }
}

impl Limits {
    /// Pools of `global`, `per_host` and `per_blob` permits (each at least 1).
    pub(crate) fn new(global: usize, per_host: usize, per_blob: usize) -> Limits {
        Limits {
            global: Arc::new(Semaphore::new(global.max(1))),
            per_host: per_host.max(1),
            per_blob: per_blob.max(1),
            hosts: Pools::default(),
            blobs: Pools::default(),
        }
    }

    /// Waits for a slot for one request to `host`, for `blob` if given.
    pub(crate) async fn acquire(&self, host: &str, blob: Option<&str>) -> Permits {
        let blob = match blob {
            Some(d) => Some(slot(&self.blobs, format!("{host}/{d}"), self.per_blob).await),
            None => None,
        };
        let host = slot(&self.hosts, host.to_string(), self.per_host).await;
        let global = self
            .global
            .clone()
            .acquire_owned()
            .await
            .expect("the client-wide pool is never closed");
        Permits {
            _global: global,
            _host: host,
            _blob: blob,
        }
    }

    /// Pools currently kept for hosts and for blobs (for tests).
    #[cfg(test)]
    fn pools(&self) -> (usize, usize) {
        let n = |p: &Pools| p.lock().unwrap_or_else(|e| e.into_inner()).len();
        (n(&self.hosts), n(&self.blobs))
    }
}

async fn slot(pools: &Pools, key: String, cap: usize) -> Slot {
    let pool = {
        let mut map = pools.lock().unwrap_or_else(|e| e.into_inner());
        let (pool, users) = map
            .entry(key.clone())
            .or_insert_with(|| (Arc::new(Semaphore::new(cap)), 0));
        *users += 1;
        pool.clone()
    };
    // The slot exists before the wait, so a cancelled wait is uncounted too.
    let mut slot = Slot {
        permit: None,
        key,
        pools: pools.clone(),
    };
    slot.permit = Some(
        pool.acquire_owned()
            .await
            .expect("a host or blob pool is never closed"),
    );
    slot
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn caps_hold_and_idle_pools_go() {
        let l = Arc::new(Limits::new(8, 3, 2));
        let a1 = l.acquire("a", Some("x")).await;
        let a2 = l.acquire("a", Some("x")).await;
        // A third request of blob x waits, while blob y of the same host
        // still gets the host's last slot.
        let l2 = l.clone();
        let mut third = tokio::spawn(async move { l2.acquire("a", Some("x")).await });
        assert!(tokio::time::timeout(Duration::from_millis(50), &mut third)
            .await
            .is_err());
        let a3 = l.acquire("a", Some("y")).await;
        // The host is full now: blob z waits, another host does not.
        let l3 = l.clone();
        let mut z = tokio::spawn(async move { l3.acquire("a", Some("z")).await });
        assert!(tokio::time::timeout(Duration::from_millis(50), &mut z)
            .await
            .is_err());
        let b = l.acquire("b", Some("x")).await;
        // a1's host slot goes to z, first in the host's queue; a2's blob
        // and host slots then go to the third request of x.
        drop(a1);
        let zz = z.await.unwrap();
        drop(a2);
        let t = third.await.unwrap();
        drop((a3, t, zz, b));
        assert_eq!(l.pools(), (0, 0));
    }

    #[tokio::test]
    async fn a_cancelled_wait_leaves_no_pool() {
        let l = Limits::new(8, 1, 1);
        let held = l.acquire("a", Some("x")).await;
        assert!(
            tokio::time::timeout(Duration::from_millis(20), l.acquire("a", Some("x")))
                .await
                .is_err()
        );
        drop(held);
        assert_eq!(l.pools(), (0, 0));
    }
}
