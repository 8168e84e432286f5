//! The apply side's decisions, pure: what applying a unit or a catch-up chunk lets a node
//! claim to hold. The node's apply thread (`db::apply`) and the simulation (`sim.rs`)
//! both call these, so the simulation proves the rules the node runs.

use super::held::Held;
use super::msg::{OriginRanges, OriginUnit, SiteId};
use super::ranges::advance_with_ranges;

/// What a node holds once it applied `unit`: the unit's whole range of its origin —
/// versions without a change were superseded at the origin before it was read, so they
/// are *cleared*. Nothing for the node's own writes (it holds those by its counter).
pub fn held_after_unit(unit: &OriginUnit, local: &SiteId) -> Held {
    let mut h = Held::default();
    if unit.origin != *local {
        h.insert(unit.origin, unit.from + 1, unit.to);
    }
    h
}

/// A catch-up unit `(unit_from, unit_to]` of a peer's feed was applied whole, on top of
/// the cursor `cursor`. Returns the new cursor (the cursor rule, with remembered
/// out-of-order `ranges`) and, when the unit continued the cursor, what the node may now
/// claim to hold: everything the server held when it fixed the unit (`held`, from the
/// unit's first chunk). Every change of the server's feed up to `unit_to` was then either
/// applied here or left out because this node held its version, so for each of those
/// versions this node holds the change or a newer one. Past a gap, nothing is claimed.
pub fn held_after_catch_up(
    cursor: i64,
    ranges: &mut Vec<(i64, i64)>,
    unit_from: i64,
    unit_to: i64,
    held: Option<&[OriginRanges]>,
    local: &SiteId,
) -> (i64, Held) {
    let continues = unit_from <= cursor;
    let next = advance_with_ranges(cursor, ranges, unit_from, unit_to);
    let mut claim = Held::default();
    if continues {
        if let Some(list) = held {
            for o in list.iter().filter(|o| o.site != *local) {
                for &(a, b) in &o.ranges {
                    claim.insert(o.site, a, b);
                }
            }
        }
    }
    (next, claim)
}

/// Whether chunks `(from, to]` (any order, duplicates allowed) tile the unit
/// `(unit_from, unit_to]` from its start to its end.
pub fn unit_complete(unit_from: i64, unit_to: i64, chunks: &[(i64, i64)]) -> bool {
    let mut sorted = chunks.to_vec();
    sorted.sort_unstable();
    let mut at = unit_from;
    for (f, t) in sorted {
        if f <= at {
            at = at.max(t);
        }
    }
    at >= unit_to
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_unit_claims_its_whole_range_but_not_our_own() {
        let u = OriginUnit {
            origin: [7; 16],
            from: 4,
            to: 9,
            committed_ms: 0,
            changes: vec![],
            schema: None,
        };
        assert!(held_after_unit(&u, &[1; 16]).covers(&[7; 16], 5, 9));
        assert!(held_after_unit(&u, &[7; 16]).is_empty());
    }

    #[test]
    fn a_catch_up_claims_the_servers_held_set_only_when_it_continues_the_cursor() {
        let held = vec![OriginRanges {
            site: [7; 16],
            ranges: vec![(1, 50)],
        }];
        let mut r = Vec::new();
        let (c, claim) = held_after_catch_up(10, &mut r, 10, 20, Some(&held), &[1; 16]);
        assert_eq!(c, 20);
        assert!(claim.covers(&[7; 16], 1, 50));
        let (c, claim) = held_after_catch_up(20, &mut r, 30, 40, Some(&held), &[1; 16]);
        assert_eq!(c, 20);
        assert!(claim.is_empty(), "past a gap nothing is claimed");
        assert!(unit_complete(0, 9, &[(4, 9), (0, 4)]));
        assert!(!unit_complete(0, 9, &[(0, 4), (5, 9)]));
    }
}
