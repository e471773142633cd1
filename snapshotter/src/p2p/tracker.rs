//! The owner side of placement: for the chunks a node owns
//! ([`super::placement`]), who holds them or is fetching them, and which of
//! them a requester should fetch from.
//!
//! Invariants:
//! - A node still fetching a chunk counts as a holder: a second requester is
//!   sent to it (it streams once it has the chunk) instead of upstream. This
//!   is the cluster-wide single flight.
//! - A requester is handed the less loaded of two distinct random holders
//!   other than itself ("power of two choices"); load is the number of
//!   times the tracker has handed a holder out, so uploads spread.
//! - State is bounded: at most [`Limits::chunks`] chunks (least recently
//!   used forgotten first) and [`Limits::holders`] holders per chunk.
//! - Pure and single-threaded: the caller holds it under a lock and supplies
//!   the random source (seeded in tests).

use std::collections::HashMap;
use std::num::NonZeroUsize;

use lru::LruCache;

use super::Digest;

/// Default number of chunks a tracker remembers.
pub const DEFAULT_TRACKED_CHUNKS: usize = 1 << 20;
/// Default number of holders remembered per chunk.
pub const DEFAULT_HOLDERS_PER_CHUNK: usize = 64;

/// Bounds on a tracker's memory.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Chunks remembered.
    pub chunks: usize,
    /// Holders remembered per chunk.
    pub holders: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            chunks: DEFAULT_TRACKED_CHUNKS,
            holders: DEFAULT_HOLDERS_PER_CHUNK,
        }
    }
}

/// A member as the tracker knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Member id (its node name).
    pub id: String,
    /// `host:port` of its peer service.
    pub address: String,
}

/// A holder handed to a requester.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// The member.
    pub member: Member,
    /// Whether it holds a verified copy (false: still fetching).
    pub complete: bool,
}

/// What an announcing member says about chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// It is fetching them.
    Fetching,
    /// It holds verified copies.
    Complete,
    /// It no longer holds them.
    Gone,
}

/// The tracker of the chunks one node owns.
pub struct Tracker {
    chunks: LruCache<Digest, Vec<Holder>>,
    load: HashMap<String, u64>,
    limits: Limits,
    rng: fastrand::Rng,
}

impl Tracker {
    /// An empty tracker drawing from `rng`.
    pub fn new(limits: Limits, rng: fastrand::Rng) -> Tracker {
        let cap = NonZeroUsize::new(limits.chunks.max(1)).unwrap_or(NonZeroUsize::MIN);
        Tracker {
            chunks: LruCache::new(cap),
            load: HashMap::new(),
            limits,
            rng,
        }
    }

    /// Records `state` of `digest` at `member`.
    pub fn announce(&mut self, digest: &Digest, member: &Member, state: State) {
        if state == State::Gone {
            if let Some(hs) = self.chunks.get_mut(digest) {
                hs.retain(|h| h.member.id != member.id);
            }
            return;
        }
        let complete = state == State::Complete;
        let holders = self.chunks.get_or_insert_mut(*digest, Vec::new);
        if let Some(h) = holders.iter_mut().find(|h| h.member.id == member.id) {
            h.member.address.clone_from(&member.address);
            h.complete |= complete;
        } else if holders.len() < self.limits.holders {
            holders.push(Holder {
                member: member.clone(),
                complete,
            });
        }
        // Else full: enough holders to spread load; the announcement is
        // dropped.
    }

    /// A holder of `digest` for `requester`: the less loaded of two random
    /// holders other than the requester, or `None` if there is none. With
    /// `register`, the requester is recorded as fetching the chunk.
    pub fn locate(
        &mut self,
        digest: &Digest,
        requester: &Member,
        register: bool,
    ) -> Option<Holder> {
        let chosen = self.choose(digest, &requester.id);
        if let Some(h) = &chosen {
            *self.load.entry(h.member.id.clone()).or_insert(0) += 1;
        }
        if register {
            self.announce(digest, requester, State::Fetching);
        }
        chosen
    }

    fn choose(&mut self, digest: &Digest, requester: &str) -> Option<Holder> {
        let holders = self.chunks.get(digest)?;
        let others: Vec<&Holder> = holders
            .iter()
            .filter(|h| h.member.id != requester)
            .collect();
        let pick = match others.len() {
            0 => return None,
            1 => others[0],
            n => {
                let a = self.rng.usize(..n);
                let b = (a + 1 + self.rng.usize(..n - 1)) % n;
                let load = |h: &Holder| self.load.get(&h.member.id).copied().unwrap_or(0);
                if load(others[b]) < load(others[a]) {
                    others[b]
                } else {
                    others[a]
                }
            }
        };
        Some(pick.clone())
    }

    /// How many members hold or are fetching `digest`.
    pub fn holders(&self, digest: &Digest) -> usize {
        self.chunks.peek(digest).map_or(0, Vec::len)
    }

    /// Forgets member `id` everywhere (it left or failed).
    pub fn remove_member(&mut self, id: &str) {
        for (_, hs) in self.chunks.iter_mut() {
            hs.retain(|h| h.member.id != id);
        }
        self.load.remove(id);
    }

    /// How many times `id` has been handed out.
    pub fn load(&self, id: &str) -> u64 {
        self.load.get(id).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(i: usize) -> Member {
        Member {
            id: format!("node-{i}"),
            address: format!("10.0.0.{i}:7701"),
        }
    }

    fn tracker(seed: u64) -> Tracker {
        Tracker::new(Limits::default(), fastrand::Rng::with_seed(seed))
    }

    #[test]
    fn nobody_holds_an_unknown_chunk() {
        let mut t = tracker(1);
        assert_eq!(t.locate(&[1; 32], &m(0), false), None);
    }

    #[test]
    fn a_fetching_node_counts_as_a_holder() {
        let mut t = tracker(1);
        let d = [2; 32];
        // The first requester finds nobody and is recorded as fetching.
        assert_eq!(t.locate(&d, &m(0), true), None);
        // The second is sent to it, not upstream.
        let h = t
            .locate(&d, &m(1), true)
            .expect("in-flight fetcher is a holder");
        assert_eq!(h.member, m(0));
        assert!(!h.complete);
        t.announce(&d, &m(0), State::Complete);
        let h = t.locate(&d, &m(2), false).unwrap();
        assert!(h.member == m(0) || h.member == m(1));
    }

    #[test]
    fn a_requester_is_never_sent_to_itself() {
        let mut t = tracker(3);
        let d = [3; 32];
        t.announce(&d, &m(0), State::Complete);
        assert_eq!(t.locate(&d, &m(0), false), None);
    }

    #[test]
    fn two_choices_spread_uploads() {
        // 200 requesters of one chunk held by 20 nodes: with the less loaded
        // of two, no holder serves far more than the mean (10).
        let mut t = tracker(7);
        let d = [4; 32];
        for i in 0..20 {
            t.announce(&d, &m(i), State::Complete);
        }
        for r in 100..300 {
            t.locate(&d, &m(r), false).unwrap();
        }
        let loads: Vec<u64> = (0..20).map(|i| t.load(&format!("node-{i}"))).collect();
        assert_eq!(loads.iter().sum::<u64>(), 200);
        let max = *loads.iter().max().unwrap();
        assert!(max <= 13, "max upload {max}, loads {loads:?}");
    }

    #[test]
    fn gone_and_removed_members_are_not_handed_out() {
        let mut t = tracker(5);
        let d = [5; 32];
        t.announce(&d, &m(0), State::Complete);
        t.announce(&d, &m(1), State::Complete);
        t.announce(&d, &m(0), State::Gone);
        for _ in 0..20 {
            assert_eq!(t.locate(&d, &m(9), false).unwrap().member, m(1));
        }
        t.remove_member("node-1");
        assert_eq!(t.locate(&d, &m(9), false), None);
        assert_eq!(t.holders(&d), 0);
    }

    #[test]
    fn state_is_bounded() {
        let mut t = Tracker::new(
            Limits {
                chunks: 2,
                holders: 3,
            },
            fastrand::Rng::with_seed(1),
        );
        for i in 0..10 {
            t.announce(&[9; 32], &m(i), State::Complete);
        }
        assert_eq!(t.holders(&[9; 32]), 3);
        t.announce(&[10; 32], &m(0), State::Complete);
        t.announce(&[11; 32], &m(0), State::Complete);
        assert_eq!(
            t.holders(&[9; 32]),
            0,
            "least recently used chunk forgotten"
        );
    }
}
