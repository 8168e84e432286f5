//! Per-origin knowledge as values: which versions of each origin a node holds.
//!
//! Every origin numbers its own writes `1, 2, 3, …` without gaps (`origin_version`), so
//! what a node holds of an origin is a set of inclusive version ranges, and what one node
//! lacks that another holds is a set difference. The database keeps the same sets in
//! `patina_origin_ranges` (written inside every merge); these are the in-memory copies
//! the sync machine reasons with, and the shapes summaries carry on the wire.

use std::collections::BTreeMap;

use super::msg::{OriginRanges, SiteId};

/// Disjoint, non-touching inclusive ranges `(start, end)`, sorted, all versions ≥ 1.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RangeSet {
    ranges: Vec<(i64, i64)>,
}

impl RangeSet {
    /// The set of `ranges` (any order, overlapping allowed; empty or inverted ones ignored).
    pub fn from_ranges(ranges: impl IntoIterator<Item = (i64, i64)>) -> RangeSet {
        let mut s = RangeSet::default();
        for (a, b) in ranges {
            s.insert(a, b);
        }
        s
    }

    /// The ranges, sorted.
    pub fn ranges(&self) -> &[(i64, i64)] {
        &self.ranges
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The highest version held (0 when none).
    pub fn head(&self) -> i64 {
        self.ranges.last().map_or(0, |r| r.1)
    }

    /// How many versions are held.
    pub fn count(&self) -> i64 {
        self.ranges
            .iter()
            .map(|(a, b)| b.saturating_sub(*a).saturating_add(1))
            .sum()
    }

    /// Adds `a..=b`, coalescing with neighbours.
    pub fn insert(&mut self, a: i64, b: i64) {
        let a = a.max(1);
        if b < a {
            return;
        }
        // Versions mostly arrive in order: past the last range, or touching it.
        match self.ranges.last_mut() {
            None => {
                self.ranges.push((a, b));
                return;
            }
            Some(last) if a > last.1.saturating_add(1) => {
                self.ranges.push((a, b));
                return;
            }
            Some(last) if a >= last.0 => {
                last.1 = last.1.max(b);
                return;
            }
            Some(_) => {}
        }
        let (mut lo, mut hi) = (a, b);
        let mut out = Vec::with_capacity(self.ranges.len() + 1);
        let mut placed = false;
        for &(x, y) in &self.ranges {
            if y.saturating_add(1) < lo {
                out.push((x, y));
            } else if hi.saturating_add(1) < x {
                if !placed {
                    out.push((lo, hi));
                    placed = true;
                }
                out.push((x, y));
            } else {
                lo = lo.min(x);
                hi = hi.max(y);
            }
        }
        if !placed {
            out.push((lo, hi));
        }
        self.ranges = out;
    }

    /// Adds every range of `other`.
    pub fn union_with(&mut self, other: &RangeSet) {
        for &(a, b) in &other.ranges {
            self.insert(a, b);
        }
    }

    /// Whether version `v` is held.
    pub fn contains(&self, v: i64) -> bool {
        let i = self.ranges.partition_point(|r| r.1 < v);
        self.ranges.get(i).is_some_and(|r| r.0 <= v)
    }

    /// Whether every version of `a..=b` is held.
    pub fn covers(&self, a: i64, b: i64) -> bool {
        if b < a {
            return true;
        }
        let i = self.ranges.partition_point(|r| r.1 < a);
        self.ranges.get(i).is_some_and(|r| r.0 <= a && b <= r.1)
    }

    /// The versions of `self` not in `other`.
    pub fn minus(&self, other: &RangeSet) -> RangeSet {
        let mut out = Vec::new();
        for &(a, b) in &self.ranges {
            let mut lo = a;
            for &(x, y) in &other.ranges {
                if y < lo || x > b {
                    continue;
                }
                if x > lo {
                    out.push((lo, x - 1));
                }
                lo = y.saturating_add(1);
                if lo > b {
                    break;
                }
            }
            if lo <= b {
                out.push((lo, b));
            }
        }
        RangeSet { ranges: out }
    }

    /// The versions of `1..=head` not held: the gaps below the head.
    pub fn gaps(&self) -> RangeSet {
        RangeSet::from_ranges([(1, self.head())]).minus(self)
    }

    /// At most `max` ranges, dropping the oldest ones first: a summary may claim less
    /// than is held (the peer sends a little again), never more.
    pub fn truncated(&self, max: usize) -> RangeSet {
        let skip = self.ranges.len().saturating_sub(max);
        RangeSet {
            ranges: self.ranges[skip..].to_vec(),
        }
    }
}

/// What a node holds, per origin site.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Held {
    by_origin: BTreeMap<SiteId, RangeSet>,
}

impl Held {
    /// From the wire shape (invalid ranges dropped).
    pub fn from_wire(list: &[OriginRanges]) -> Held {
        let mut h = Held::default();
        for o in list {
            for &(a, b) in &o.ranges {
                h.insert(o.site, a, b);
            }
        }
        h
    }

    /// The wire shape, with at most `max_ranges` ranges per origin (the newest kept).
    pub fn to_wire(&self, max_ranges: usize) -> Vec<OriginRanges> {
        self.by_origin
            .iter()
            .filter(|(_, r)| !r.is_empty())
            .map(|(site, r)| OriginRanges {
                site: *site,
                ranges: r.truncated(max_ranges).ranges,
            })
            .collect()
    }

    pub fn insert(&mut self, origin: SiteId, a: i64, b: i64) {
        if b >= a.max(1) {
            self.by_origin.entry(origin).or_default().insert(a, b);
        }
    }

    /// Replaces what is held of `origin`.
    pub fn set(&mut self, origin: SiteId, ranges: RangeSet) {
        self.by_origin.insert(origin, ranges);
    }

    pub fn union_with(&mut self, other: &Held) {
        for (site, r) in &other.by_origin {
            self.by_origin.entry(*site).or_default().union_with(r);
        }
    }

    /// What is held of `origin` (empty when nothing).
    pub fn of(&self, origin: &SiteId) -> RangeSet {
        self.by_origin.get(origin).cloned().unwrap_or_default()
    }

    pub fn contains(&self, origin: &SiteId, v: i64) -> bool {
        self.by_origin.get(origin).is_some_and(|r| r.contains(v))
    }

    pub fn covers(&self, origin: &SiteId, a: i64, b: i64) -> bool {
        b < a || self.by_origin.get(origin).is_some_and(|r| r.covers(a, b))
    }

    /// Every origin with what is held of it.
    pub fn iter(&self) -> impl Iterator<Item = (&SiteId, &RangeSet)> {
        self.by_origin.iter()
    }

    /// Removes ranges of `other` from this set (e.g. pending versions that were applied).
    pub fn remove(&mut self, other: &Held) {
        for (site, r) in &other.by_origin {
            if let Some(mine) = self.by_origin.get_mut(site) {
                *mine = mine.minus(r);
                if mine.is_empty() {
                    self.by_origin.remove(site);
                }
            }
        }
    }

    /// Per origin, the versions held here and not in `other`.
    pub fn minus(&self, other: &Held) -> Held {
        let mut out = Held::default();
        for (site, r) in &self.by_origin {
            let d = match other.by_origin.get(site) {
                Some(o) => r.minus(o),
                None => r.clone(),
            };
            if !d.is_empty() {
                out.by_origin.insert(*site, d);
            }
        }
        out
    }

    pub fn is_empty(&self) -> bool {
        self.by_origin.values().all(RangeSet::is_empty)
    }

    /// Approximate memory, for the per-node state figures of the simulation.
    pub fn approx_bytes(&self) -> usize {
        self.by_origin
            .values()
            .map(|r| 16 + 24 + r.ranges.len() * 16)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ranges_coalesce_and_subtract() {
        let mut s = RangeSet::default();
        s.insert(5, 7);
        s.insert(1, 2);
        s.insert(3, 4);
        assert_eq!(s.ranges(), &[(1, 7)]);
        s.insert(10, 12);
        assert_eq!(s.ranges(), &[(1, 7), (10, 12)]);
        assert_eq!(s.gaps().ranges(), &[(8, 9)]);
        assert!(s.covers(2, 6) && !s.covers(6, 10) && s.contains(11) && !s.contains(9));
        let other = RangeSet::from_ranges([(2, 3), (6, 11)]);
        assert_eq!(s.minus(&other).ranges(), &[(1, 1), (4, 5), (12, 12)]);
        assert_eq!(s.count(), 10);
        assert_eq!(s.truncated(1).ranges(), &[(10, 12)]);
    }

    fn model(ops: &[(i64, i64)]) -> std::collections::BTreeSet<i64> {
        ops.iter().flat_map(|&(a, b)| a.max(1)..=b).collect()
    }

    proptest! {
        #[test]
        fn range_sets_behave_as_sets(
            xs in proptest::collection::vec((0i64..60, 0i64..60), 0..12),
            ys in proptest::collection::vec((0i64..60, 0i64..60), 0..12),
        ) {
            let a = RangeSet::from_ranges(xs.iter().copied());
            let b = RangeSet::from_ranges(ys.iter().copied());
            let (ma, mb) = (model(&xs), model(&ys));
            let flat = |s: &RangeSet| -> std::collections::BTreeSet<i64> {
                s.ranges().iter().flat_map(|&(x, y)| x..=y).collect()
            };
            prop_assert_eq!(flat(&a), ma.clone());
            prop_assert_eq!(flat(&a.minus(&b)), ma.difference(&mb).copied().collect());
            for w in a.ranges().windows(2) {
                prop_assert!(w[0].1 + 1 < w[1].0, "ranges touch or overlap");
            }
            for v in 0..62 {
                prop_assert_eq!(a.contains(v), ma.contains(&v));
            }
        }
    }
}
