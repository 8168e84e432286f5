//! The units a node broadcast or received lately, kept in memory to answer repairs.
//!
//! A gap in what a peer holds is almost always recent: a broadcast lost on the way, or a
//! relay that was down for a moment. Answering it from this cache costs no database
//! read and sends exactly the whole units the peer lacks (never a part of a unit, so a
//! replica never exposes half a transaction). Anything older than the cache is served
//! by a catch-up pull of the feed instead. Bounded by bytes and by age.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use super::held::RangeSet;
use super::msg::{OriginUnit, SiteId};

/// One cached unit and when it arrived.
#[derive(Clone, Debug)]
struct Cached {
    /// Shared with the messages and apply jobs that carried it.
    unit: Arc<OriginUnit>,
    at: Duration,
    bytes: usize,
}

/// Units by origin and last version, with the order they arrived in for eviction.
#[derive(Debug)]
pub struct RecentUnits {
    by_origin: HashMap<SiteId, BTreeMap<i64, Cached>>,
    order: VecDeque<(SiteId, i64)>,
    bytes: usize,
    max_bytes: usize,
    max_age: Duration,
}

impl RecentUnits {
    pub fn new(max_bytes: usize, max_age: Duration) -> RecentUnits {
        RecentUnits {
            by_origin: HashMap::new(),
            order: VecDeque::new(),
            bytes: 0,
            max_bytes,
            max_age,
        }
    }

    /// Keeps `unit` (received or written at `now`); a unit already kept is not kept twice.
    pub fn insert(&mut self, unit: &Arc<OriginUnit>, now: Duration) {
        let bytes = unit.approx_size();
        if bytes > self.max_bytes {
            return;
        }
        let units = self.by_origin.entry(unit.origin).or_default();
        if units.contains_key(&unit.to) {
            return;
        }
        units.insert(
            unit.to,
            Cached {
                unit: Arc::clone(unit),
                at: now,
                bytes,
            },
        );
        self.order.push_back((unit.origin, unit.to));
        self.bytes += bytes;
        self.evict(now);
    }

    /// Drops units past the age or byte bound, oldest first.
    pub fn evict(&mut self, now: Duration) {
        while let Some(&(origin, to)) = self.order.front() {
            let old = self
                .by_origin
                .get(&origin)
                .and_then(|u| u.get(&to))
                .map(|c| (now.saturating_sub(c.at) > self.max_age, c.bytes));
            match old {
                Some((too_old, _)) if !too_old && self.bytes <= self.max_bytes => break,
                Some((_, bytes)) => {
                    self.bytes -= bytes;
                    if let Some(units) = self.by_origin.get_mut(&origin) {
                        units.remove(&to);
                        if units.is_empty() {
                            self.by_origin.remove(&origin);
                        }
                    }
                }
                None => {}
            }
            self.order.pop_front();
        }
    }

    /// The cached units of `origin` that hold any version of `missing`, in version
    /// order, skipping those that arrived after `newest` (probably still on their way to
    /// the peer too). Returns them and the versions of `missing` they cover.
    pub fn covering(
        &self,
        origin: &SiteId,
        missing: &RangeSet,
        newest: Duration,
    ) -> (Vec<&OriginUnit>, RangeSet, RangeSet) {
        let mut found = Vec::new();
        let mut covered = RangeSet::default();
        let mut young = RangeSet::default();
        let Some(units) = self.by_origin.get(origin) else {
            return (found, covered, young);
        };
        for &(a, b) in missing.ranges() {
            // Units are keyed by their last version: the first that can hold `a` is the
            // first whose `to >= a`.
            for (_, c) in units.range(a..) {
                if c.unit.from >= b {
                    break;
                }
                if c.at > newest {
                    young.insert(c.unit.from + 1, c.unit.to);
                    continue;
                }
                if covered.covers(c.unit.from + 1, c.unit.to) {
                    continue;
                }
                covered.insert(c.unit.from + 1, c.unit.to);
                found.push(&*c.unit);
            }
        }
        (found, covered, young)
    }

    /// Bytes held, for metrics and the simulation's state figures.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(origin: u8, from: i64, to: i64) -> Arc<OriginUnit> {
        Arc::new(OriginUnit {
            origin: [origin; 16],
            from,
            to,
            committed_ms: 0,
            changes: vec![],
            schema: None,
        })
    }

    #[test]
    fn finds_whole_units_for_a_gap_and_forgets_old_ones() {
        let s = Duration::from_secs;
        let mut r = RecentUnits::new(1 << 20, s(60));
        for (f, t) in [(0, 3), (3, 5), (5, 9), (9, 10)] {
            r.insert(&unit(1, f, t), s(1));
        }
        r.insert(&unit(1, 10, 12), s(5));
        let missing = RangeSet::from_ranges([(4, 6), (11, 11)]);
        let (units, covered, young) = r.covering(&[1; 16], &missing, s(2));
        let got: Vec<(i64, i64)> = units.iter().map(|u| (u.from, u.to)).collect();
        assert_eq!(got, vec![(3, 5), (5, 9)]);
        assert_eq!(covered.ranges(), &[(4, 9)]);
        assert_eq!(young.ranges(), &[(11, 12)], "arrived after the cut-off");
        r.evict(s(62));
        let (units, _, _) = r.covering(&[1; 16], &missing, s(100));
        assert_eq!(units.len(), 1, "only the unit of second 5 is left");
    }

    #[test]
    fn bounded_by_bytes() {
        let mut r = RecentUnits::new(200, Duration::from_secs(60));
        for i in 0..10 {
            r.insert(&unit(1, i, i + 1), Duration::ZERO);
        }
        assert!(r.bytes() <= 200);
        let all = RangeSet::from_ranges([(1, 10)]);
        let (units, _, _) = r.covering(&[1; 16], &all, Duration::ZERO);
        assert!(units.iter().all(|u| u.to > 5), "the oldest went first");
    }
}
