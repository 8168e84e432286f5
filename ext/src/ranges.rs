//! Sets of versions as coalesced inclusive ranges: the pure logic behind
//! `patina_origin_ranges` (no SQLite here, so it is tested deterministically).
//!
//! A set is kept minimal: no two ranges overlap or touch (`[1,3]` and `[4,6]` are one
//! range `[1,6]`), so a set that holds every version of an origin up to its head is one
//! row, and the number of rows an origin costs is one more than its number of gaps.

use std::collections::BTreeMap;

/// A set of positive versions as disjoint, non-adjacent inclusive ranges.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RangeSet {
    /// start -> end, both inclusive; invariant: minimal (see the module doc).
    ranges: BTreeMap<i64, i64>,
}

impl RangeSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// `[start, end]`, or the empty set when `end < start`.
    pub fn from_range(start: i64, end: i64) -> Self {
        let mut s = Self::new();
        s.insert(start, end);
        s
    }

    /// Builds a set from ranges in any order, overlapping or not.
    #[cfg(test)]
    pub fn from_ranges(ranges: impl IntoIterator<Item = (i64, i64)>) -> Self {
        let mut s = Self::new();
        for (a, b) in ranges {
            s.insert(a, b);
        }
        s
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The ranges in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = (i64, i64)> + '_ {
        self.ranges.iter().map(|(a, b)| (*a, *b))
    }

    /// The highest version held (0 when empty).
    pub fn head(&self) -> i64 {
        self.ranges.values().next_back().copied().unwrap_or(0)
    }

    /// How many versions the set holds.
    pub fn count(&self) -> i64 {
        self.ranges.iter().map(|(a, b)| b - a + 1).sum()
    }

    pub fn insert_one(&mut self, v: i64) {
        self.insert(v, v);
    }

    /// Adds `[start, end]`, merging every range it overlaps or touches. An empty range
    /// (`end < start`) adds nothing.
    pub fn insert(&mut self, start: i64, end: i64) {
        if end < start {
            return;
        }
        // Fast path: versions of an origin mostly arrive in order, extending the last range.
        if let Some((_, last_end)) = self.ranges.iter_mut().next_back() {
            if *last_end < start && start <= last_end.saturating_add(1) {
                *last_end = end;
                return;
            }
        }
        let (mut lo, mut hi) = (start, end);
        // Ranges are disjoint and sorted, so the candidates are the ones starting at or
        // before `end + 1`, walked down until one ends before `start - 1`.
        let reach = end.saturating_add(1);
        let floor = start.saturating_sub(1);
        let absorbed: Vec<(i64, i64)> = self
            .ranges
            .range(..=reach)
            .rev()
            .take_while(|(_, e)| **e >= floor)
            .map(|(a, b)| (*a, *b))
            .collect();
        for (a, b) in absorbed {
            self.ranges.remove(&a);
            lo = lo.min(a);
            hi = hi.max(b);
        }
        self.ranges.insert(lo, hi);
    }

    /// Adds every range of `other`.
    pub fn union(&mut self, other: &RangeSet) {
        for (a, b) in other.iter() {
            self.insert(a, b);
        }
    }

    /// True when `v` is in the set.
    #[cfg(test)]
    pub fn contains(&self, v: i64) -> bool {
        self.ranges
            .range(..=v)
            .next_back()
            .is_some_and(|(_, e)| *e >= v)
    }

    /// The versions of `[start, end]` not in the set, as minimal ranges.
    pub fn missing(&self, start: i64, end: i64) -> Vec<(i64, i64)> {
        let mut out = Vec::new();
        if end < start {
            return out;
        }
        let mut next = start;
        // The range containing `start`, if any, then every range starting inside.
        let first = self
            .ranges
            .range(..=start)
            .next_back()
            .map(|(a, b)| (*a, *b));
        let inside = self.ranges.range(start..=end).map(|(a, b)| (*a, *b));
        for (a, b) in first.into_iter().chain(inside) {
            if b < next {
                continue;
            }
            if a > next {
                out.push((next, a - 1));
            }
            if b >= end {
                return out;
            }
            next = b + 1;
        }
        out.push((next, end));
        out
    }

    /// The gaps below the head: what is missing of `[1, head]`.
    pub fn gaps(&self) -> Vec<(i64, i64)> {
        self.missing(1, self.head())
    }
}

/// How a stored set of ranges changes when `new` is merged into it: the stored ranges to
/// delete (by start) and the ranges to write. Pure, so both merge paths and tests share
/// it; `stored` must be the stored ranges that overlap or touch `new` (ascending).
pub fn merge_plan(stored: &[(i64, i64)], new: (i64, i64)) -> (Vec<i64>, Option<(i64, i64)>) {
    let (mut lo, mut hi) = new;
    for (a, b) in stored {
        lo = lo.min(*a);
        hi = hi.max(*b);
    }
    if let [only] = stored {
        if *only == (lo, hi) {
            return (Vec::new(), None); // already held
        }
    }
    (stored.iter().map(|(a, _)| *a).collect(), Some((lo, hi)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn coalesces_adjacent_and_overlapping() {
        let s = RangeSet::from_ranges([(5, 6), (1, 2), (3, 4), (10, 12), (11, 20)]);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![(1, 6), (10, 20)]);
        assert_eq!(s.head(), 20);
        assert_eq!(s.count(), 17);
        assert_eq!(s.gaps(), vec![(7, 9)]);
        assert!(s.contains(6) && !s.contains(7) && s.contains(10));
    }

    #[test]
    fn missing_between() {
        let s = RangeSet::from_ranges([(3, 5), (8, 8), (12, 15)]);
        assert_eq!(s.missing(1, 20), vec![(1, 2), (6, 7), (9, 11), (16, 20)]);
        assert_eq!(s.missing(4, 8), vec![(6, 7)]);
        assert_eq!(s.missing(3, 5), vec![]);
        assert_eq!(s.missing(13, 13), vec![]);
        assert_eq!(s.missing(6, 6), vec![(6, 6)]);
        assert_eq!(s.missing(9, 2), vec![]);
        assert_eq!(RangeSet::new().missing(1, 3), vec![(1, 3)]);
    }

    #[test]
    fn extremes_do_not_overflow() {
        let mut s = RangeSet::from_range(i64::MAX - 1, i64::MAX);
        s.insert(i64::MIN, i64::MIN);
        s.insert_one(i64::MAX - 2);
        assert_eq!(s.iter().count(), 2);
        assert_eq!(s.head(), i64::MAX);
    }

    #[test]
    fn plan_extends_or_keeps() {
        assert_eq!(merge_plan(&[], (4, 4)), (vec![], Some((4, 4))));
        assert_eq!(merge_plan(&[(1, 3)], (4, 4)), (vec![1], Some((1, 4))));
        assert_eq!(merge_plan(&[(1, 9)], (4, 4)), (vec![], None));
        assert_eq!(
            merge_plan(&[(1, 3), (5, 7)], (4, 4)),
            (vec![1, 5], Some((1, 7)))
        );
    }

    fn minimal(s: &RangeSet) -> bool {
        let v: Vec<_> = s.iter().collect();
        v.iter().all(|(a, b)| a <= b) && v.windows(2).all(|w| w[0].1 + 1 < w[1].0)
    }

    proptest! {
        /// Inserting the same versions in any order (singly or as ranges) yields the same
        /// minimal set, and it holds exactly those versions.
        #[test]
        fn order_does_not_matter(
            mut vs in proptest::collection::vec(1i64..200, 0..120),
            seed in any::<u64>(),
        ) {
            let mut a = RangeSet::new();
            for v in &vs { a.insert_one(*v); }
            // A deterministic shuffle from the seed.
            let mut x = seed | 1;
            for i in (1..vs.len()).rev() {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                vs.swap(i, (x % (i as u64 + 1)) as usize);
            }
            let mut b = RangeSet::new();
            for v in &vs { b.insert_one(*v); }
            prop_assert_eq!(&a, &b);
            prop_assert!(minimal(&a));
            for v in 0..202 {
                prop_assert_eq!(a.contains(v), vs.contains(&v));
            }
            let missing: i64 = a.missing(1, 200).iter().map(|(x, y)| y - x + 1).sum();
            prop_assert_eq!(missing + a.count(), 200);
        }

        #[test]
        fn ranges_union_like_versions(rs in proptest::collection::vec((1i64..300, 0i64..20), 0..40)) {
            let a = RangeSet::from_ranges(rs.iter().map(|(s, l)| (*s, s + l)));
            let mut b = RangeSet::new();
            for (s, l) in rs.iter().rev() {
                for v in *s..=s + l { b.insert_one(v); }
            }
            prop_assert_eq!(&a, &b);
            prop_assert!(minimal(&a));
        }

        /// The stored-table plan, applied to a set, gives what inserting into it gives.
        #[test]
        fn plan_matches_insert(rs in proptest::collection::vec((1i64..300, 0i64..20), 0..30), new in (1i64..300, 0i64..20)) {
            let mut stored = RangeSet::from_ranges(rs.iter().map(|(s, l)| (*s, s + l)));
            let (a, b) = (new.0, new.0 + new.1);
            let touching: Vec<_> = stored.iter().filter(|(x, y)| *y >= a - 1 && *x <= b + 1).collect();
            let (delete, write) = merge_plan(&touching, (a, b));
            let mut expect = stored.clone();
            expect.insert(a, b);
            for d in delete { stored.ranges.remove(&d); }
            if let Some((x, y)) = write { stored.ranges.insert(x, y); }
            prop_assert_eq!(stored, expect);
        }
    }
}
