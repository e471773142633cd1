//! Rendezvous (highest random weight) hashing of a chunk digest over the
//! live members: the first member is the chunk's owner (its tracker), the
//! next ones take over in order when it fails.
//!
//! Invariants:
//! - The order depends only on the digest and the set of member ids, not on
//!   the order the ids are given in, so every node that sees the same
//!   members picks the same owner without talking to anyone.
//! - Removing a member moves only the chunks it owned (to their next
//!   member); adding one moves only the chunks it now wins.
//! - Weights are the first 8 bytes of sha256(digest ‖ id): members cannot
//!   choose ids that steal specific chunks without a preimage search over
//!   sha256, and ties (equal weights) fall back to the id.

use sha2::{Digest as _, Sha256};

use super::Digest;

/// The weight of member `id` for chunk `digest`.
pub fn weight(digest: &Digest, id: &str) -> u64 {
    let mut h = Sha256::new();
    h.update(digest);
    h.update(id.as_bytes());
    let out = h.finalize();
    let mut w = [0u8; 8];
    w.copy_from_slice(&out[..8]);
    u64::from_be_bytes(w)
}

/// `members` in rendezvous order for `digest`: owner first, then the
/// failover order.
pub fn ranked<'a, S: AsRef<str>>(digest: &Digest, members: &'a [S]) -> Vec<&'a str> {
    let mut scored: Vec<(u64, &str)> = members
        .iter()
        .map(|m| (weight(digest, m.as_ref()), m.as_ref()))
        .collect();
    scored.sort_unstable_by(|a, b| b.cmp(a));
    scored.dedup_by(|a, b| a.1 == b.1);
    scored.into_iter().map(|(_, m)| m).collect()
}

/// The owner of `digest` among `members`, if there is any member.
pub fn owner<'a, S: AsRef<str>>(digest: &Digest, members: &'a [S]) -> Option<&'a str> {
    members
        .iter()
        .map(|m| (weight(digest, m.as_ref()), m.as_ref()))
        .max()
        .map(|(_, m)| m)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digests(n: usize, seed: u64) -> Vec<Digest> {
        let mut rng = fastrand::Rng::with_seed(seed);
        (0..n)
            .map(|_| {
                let mut d = [0u8; 32];
                rng.fill(&mut d);
                d
            })
            .collect()
    }

    fn members(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("node-{i}")).collect()
    }

    #[test]
    fn owners_spread_evenly() {
        let m = members(50);
        let ds = digests(50_000, 1);
        let mut counts = std::collections::HashMap::new();
        for d in &ds {
            *counts.entry(owner(d, &m).unwrap()).or_insert(0u32) += 1;
        }
        assert_eq!(counts.len(), 50, "every member owns some chunks");
        let mean = 50_000.0 / 50.0;
        let max = *counts.values().max().unwrap() as f64;
        let min = *counts.values().min().unwrap() as f64;
        // 1,000 per member on average; binomial spread is about ±32 (1σ).
        assert!(
            max < mean * 1.15 && min > mean * 0.85,
            "min {min} max {max}"
        );
    }

    #[test]
    fn order_does_not_depend_on_input_order() {
        let mut m = members(20);
        let ds = digests(200, 2);
        let before: Vec<_> = ds.iter().map(|d| ranked(d, &m).join(",")).collect();
        m.reverse();
        let after: Vec<_> = ds.iter().map(|d| ranked(d, &m).join(",")).collect();
        assert_eq!(before, after);
        for d in &ds {
            assert_eq!(owner(d, &m), ranked(d, &m).first().copied());
        }
    }

    #[test]
    fn removing_the_owner_moves_only_its_chunks_to_the_next() {
        let m = members(30);
        let ds = digests(5_000, 3);
        let gone = "node-7";
        let rest: Vec<String> = m.iter().filter(|x| *x != gone).cloned().collect();
        let mut moved = 0;
        for d in &ds {
            let r = ranked(d, &m);
            let new_owner = owner(d, &rest).unwrap();
            if r[0] == gone {
                moved += 1;
                assert_eq!(new_owner, r[1], "the next member in order takes over");
            } else {
                assert_eq!(new_owner, r[0], "chunks of other owners stay put");
            }
        }
        assert!(moved > 0);
    }

    #[test]
    fn no_members_no_owner() {
        let none: Vec<String> = Vec::new();
        assert_eq!(owner(&[0; 32], &none), None);
        assert!(ranked(&[0; 32], &none).is_empty());
    }
}
