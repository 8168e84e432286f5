//! Which deletes a node may forget: the per-origin limits handed to
//! `patina_collect_tombstones`, decided from what every member is known to hold (pure: the
//! machine feeds it summaries and the clock).
//!
//! A tombstone (the clock row of a deleted row) exists so that a change written before the
//! delete, arriving late, loses against it. Once no such change can arrive any more, the
//! tombstone is dead weight. The delete of origin `o` numbered `v` is **stable** here when
//! every member `m` has sent a summary showing it holds `o:1..=v`, and this node holds
//! every version `m` had written when it sent that summary. Then every change to the row
//! written before its author saw the delete is already held here (and a change arriving
//! again for a version held is never applied), while every change written after it
//! carries a higher causal length. A summary whose author's own versions are not all held
//! here yet is kept aside until they are ("absorbed"): only absorbed summaries count.
//!
//! A member that is down sends no summaries, so nothing becomes stable while one is away.
//! The **retention** bounds that: versions held here for longer than the retention are
//! collected anyway. A node that comes back after that may hold rows whose deletes were
//! collected here; summaries advertise what was collected (`collected` floors) so that it
//! notices and is re-seeded instead of bringing them back ([`lacks_collected`]).

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use super::held::{Held, RangeSet};
use super::msg::SiteId;

/// Per origin, the highest version `v` such that `1..=v` is held.
pub type Prefixes = HashMap<SiteId, i64>;

/// The contiguous prefix of a version set: `v` when it holds `1..=v`, else 0.
pub fn prefix(set: &RangeSet) -> i64 {
    match set.ranges().first() {
        Some(&(1, b)) => b,
        _ => 0,
    }
}

/// Every origin's prefix in `held` (origins without one left out).
pub fn prefixes(held: &Held) -> Prefixes {
    held.iter()
        .map(|(o, r)| (*o, prefix(r)))
        .filter(|(_, p)| *p > 0)
        .collect()
}

/// The tracker of what members hold, and of how long this node has held what it holds.
#[derive(Debug)]
pub struct Stability {
    retention: Duration,
    sample_every: Duration,
    /// This node's prefixes over time, oldest first: the newest one older than the
    /// retention says what has been held for that long.
    samples: VecDeque<(Duration, Prefixes)>,
    /// Every origin a summary named, numbered in order of first sight: members'
    /// prefixes are kept as [`Dense`] vectors over these numbers.
    numbers: HashMap<SiteId, usize>,
    /// Per member, the prefixes of its newest absorbed summary.
    absorbed: HashMap<SiteId, Dense>,
    /// Per member, its newest summary not absorbed yet.
    waiting: HashMap<SiteId, Dense>,
}

/// A member's prefixes, one per origin number (0: none). Every member's summary names
/// about every origin: 8 bytes an origin rather than a hashed 16-byte key each (a node
/// of an 800-node cluster keeps 800 of these, of 800 origins).
type Dense = Vec<i64>;

/// The prefix of the origin numbered `n` in `d` (0 when none).
fn dense_get(d: &Dense, n: Option<&usize>) -> i64 {
    n.and_then(|n| d.get(*n)).copied().unwrap_or(0)
}

impl Stability {
    /// `retention`: how long a version is held before its deletes are collected even
    /// when some member cannot confirm it.
    pub fn new(retention: Duration) -> Stability {
        Stability {
            retention,
            // 64 samples per retention: a version is collected at most 1/64 of the
            // retention later than it could be, whatever the retention.
            sample_every: (retention / 64).max(Duration::from_secs(1)),
            samples: VecDeque::new(),
            numbers: HashMap::new(),
            absorbed: HashMap::new(),
            waiting: HashMap::new(),
        }
    }

    /// A (complete, non-urgent) summary from `member`, with what this node holds now.
    pub fn observe_summary(&mut self, member: SiteId, theirs: &Held, ours: &Held) {
        let p = self.dense(theirs);
        let written = dense_get(&p, self.numbers.get(&member));
        if prefix(&ours.of(&member)) >= written {
            self.absorbed.insert(member, p);
            self.waiting.remove(&member);
        } else {
            self.waiting.insert(member, p);
        }
    }

    /// Promotes summaries that this node has caught up with, and samples its prefixes.
    pub fn tick(&mut self, ours: &Held, now: Duration) {
        let ready: Vec<SiteId> = self
            .waiting
            .iter()
            .filter(|(m, p)| prefix(&ours.of(m)) >= dense_get(p, self.numbers.get(*m)))
            .map(|(m, _)| *m)
            .collect();
        for m in ready {
            if let Some(p) = self.waiting.remove(&m) {
                self.absorbed.insert(m, p);
            }
        }
        let due = self
            .samples
            .back()
            .is_none_or(|(t, _)| now.saturating_sub(*t) >= self.sample_every);
        if due {
            self.samples.push_back((now, prefixes(ours)));
        }
        // Keep the newest sample older than the retention and everything after it.
        let horizon = now.saturating_sub(self.retention);
        while self.samples.len() >= 2 && self.samples[1].0 <= horizon {
            self.samples.pop_front();
        }
    }

    /// `held`'s prefixes as a [`Dense`] vector (numbering origins not seen before).
    fn dense(&mut self, held: &Held) -> Dense {
        let mut pairs = Vec::new();
        for (o, r) in held.iter() {
            let p = prefix(r);
            if p > 0 {
                let next = self.numbers.len();
                pairs.push((*self.numbers.entry(*o).or_insert(next), p));
            }
        }
        let mut d = vec![0; pairs.iter().map(|(n, _)| n + 1).max().unwrap_or(0)];
        for (n, p) in pairs {
            d[n] = p;
        }
        d
    }

    /// Stops counting `member` (forgotten, or replaced by a re-seeded node).
    pub fn forget(&mut self, member: &SiteId) {
        self.absorbed.remove(member);
        self.waiting.remove(member);
    }

    /// The per-origin limits up to which deletes may be collected now: the larger of what
    /// is stable among `members` (every member other than `me` that is not forgotten)
    /// and what this node has held for longer than the retention.
    pub fn limits(&self, me: &SiteId, members: &[SiteId], ours: &Held, now: Duration) -> Prefixes {
        let mut out: Prefixes = HashMap::new();
        let others: Vec<&SiteId> = members.iter().filter(|m| *m != me).collect();
        let all_absorbed = others.iter().all(|m| self.absorbed.contains_key(*m));
        if all_absorbed {
            for (origin, p) in prefixes(ours) {
                let n = self.numbers.get(&origin);
                let stable = others.iter().fold(p, |acc, m| {
                    let theirs = self.absorbed.get(*m).map_or(0, |q| dense_get(q, n));
                    acc.min(theirs)
                });
                if stable > 0 {
                    out.insert(origin, stable);
                }
            }
        }
        let horizon = now.checked_sub(self.retention);
        let old = horizon.and_then(|h| self.samples.iter().rev().find(|(t, _)| *t <= h));
        if let Some((_, held_long)) = old {
            for (origin, p) in held_long {
                let e = out.entry(*origin).or_insert(0);
                *e = (*e).max(*p);
            }
        }
        out
    }
}

/// The first origin whose collected versions (`floors`: `o` → every delete of `o` up to
/// it may have been forgotten by the peer) `ours` does not hold, with the floor and our
/// prefix. Such a node may keep rows the peer's collected deletes removed, and no answer
/// from that peer can tell it which: it must be re-seeded.
pub fn lacks_collected(me: &SiteId, ours: &Held, floors: &Prefixes) -> Option<(SiteId, i64, i64)> {
    let mut worst: Option<(SiteId, i64, i64)> = None;
    for (origin, floor) in floors {
        if origin == me {
            continue;
        }
        let have = ours.of(origin);
        if !have.covers(1, *floor) {
            let p = prefix(&have);
            if worst.is_none_or(|(o, _, _)| o > *origin) {
                worst = Some((*origin, *floor, p));
            }
        }
    }
    worst
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: SiteId = [1; 16];
    const B: SiteId = [2; 16];
    const C: SiteId = [3; 16];

    fn held(entries: &[(SiteId, i64)]) -> Held {
        let mut h = Held::default();
        for (o, v) in entries {
            h.insert(*o, 1, *v);
        }
        h
    }

    #[test]
    fn stable_is_what_every_member_holds_once_their_summaries_are_absorbed() {
        let mut s = Stability::new(Duration::from_secs(3600));
        let ours = held(&[(ME, 10), (B, 5), (C, 7)]);
        // B holds ME:1..=8 and has written 5, all held here: absorbed.
        s.observe_summary(B, &held(&[(ME, 8), (B, 5), (C, 7)]), &ours);
        // C has written 9, of which we hold 7: waits.
        s.observe_summary(C, &held(&[(ME, 10), (B, 5), (C, 9)]), &ours);
        let now = Duration::from_secs(10);
        s.tick(&ours, now);
        assert!(
            s.limits(&ME, &[ME, B, C], &ours, now).is_empty(),
            "C's summary is not absorbed: nothing is stable"
        );
        // Without C (forgotten), B alone bounds it.
        let only_b = s.limits(&ME, &[ME, B], &ours, now);
        assert_eq!(only_b.get(&ME), Some(&8));
        assert_eq!(only_b.get(&B), Some(&5));
        // Once C's versions arrive, its summary counts.
        let ours = held(&[(ME, 10), (B, 5), (C, 9)]);
        s.tick(&ours, now);
        let all = s.limits(&ME, &[ME, B, C], &ours, now);
        assert_eq!(all.get(&ME), Some(&8), "min over members");
        assert_eq!(all.get(&C), Some(&7), "B's summary held C up to 7");
    }

    #[test]
    fn a_gap_ends_the_prefix_and_a_truncated_summary_claims_nothing_below() {
        let mut h = Held::default();
        h.insert(B, 1, 4);
        h.insert(B, 6, 9);
        assert_eq!(prefix(&h.of(&B)), 4);
        let mut t = Held::default();
        t.insert(B, 6, 9);
        assert_eq!(prefix(&t.of(&B)), 0);
    }

    #[test]
    fn the_retention_collects_without_a_down_members_word() {
        let retention = Duration::from_secs(64);
        let mut s = Stability::new(retention);
        let early = held(&[(ME, 3), (B, 2)]);
        s.tick(&early, Duration::from_secs(1));
        let later = held(&[(ME, 30), (B, 20)]);
        for t in 2..=64 {
            s.tick(&later, Duration::from_secs(t));
        }
        // C never summarised (down): only the retention counts, and only what was held
        // a retention ago.
        let at = |s: &Stability, t: u64| s.limits(&ME, &[ME, B, C], &later, Duration::from_secs(t));
        assert!(at(&s, 64).is_empty(), "nothing held for 64 s yet");
        assert_eq!(at(&s, 65).get(&ME), Some(&3));
        assert_eq!(at(&s, 65).get(&B), Some(&2));
        for t in 65..=200 {
            s.tick(&later, Duration::from_secs(t));
        }
        assert_eq!(at(&s, 200).get(&ME), Some(&30));
        assert!(
            s.samples.len() <= 70,
            "samples stay bounded: {}",
            s.samples.len()
        );
    }

    #[test]
    fn a_node_lacking_collected_versions_is_told_which() {
        let ours = held(&[(B, 10), (C, 3)]);
        let mut floors = Prefixes::new();
        floors.insert(B, 10);
        assert_eq!(lacks_collected(&ME, &ours, &floors), None);
        floors.insert(C, 5);
        assert_eq!(lacks_collected(&ME, &ours, &floors), Some((C, 5, 3)));
        // Our own versions are ours to know.
        let mut own = Prefixes::new();
        own.insert(ME, 99);
        assert_eq!(lacks_collected(&ME, &ours, &own), None);
    }
}
