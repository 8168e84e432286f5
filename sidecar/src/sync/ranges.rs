//! Every version range a peer sends: how it may move our cursor (the cursor rule) and
//! what it must satisfy to be considered at all (issue 7, item 5), in one place.
//!
//! A peer's ranges decide how far our cursor for its feed moves, so a range that is
//! reversed, outside its unit, or whose changes lie outside it could make this node skip
//! changes it never received. Every chunk passes [`validate_chunk`] before the state
//! machine hands it on, and the apply side checks it again before buffering or applying
//! (both call this function, so the two checks cannot disagree).
//!
//! The exact rule, for a chunk `(from, to]` of the unit `(unit_from, unit_to]`:
//! - `0 <= unit_from <= from < to <= unit_to` — a non-empty range inside its unit;
//! - the one exception is the *empty unit* `from == to == unit_from == unit_to` with no
//!   changes: "nothing new after `from`" (a pull answered when the peer has nothing). It
//!   moves no cursor ([`super::advance_cursor`] needs `unit_from <= cursor < unit_to`);
//! - every change has `from < db_version <= to` (the sender's numbering; a change outside
//!   its chunk would be applied under a range that does not describe it).
//!
//! A pull continuation names its unit: `(unit_from, unit_to)` must satisfy
//! `0 <= unit_from <= after < unit_to` ([`validate_pull`]).

use super::msg::{Chunk, OriginRanges, OriginUnit};

/// Why a range was refused. Refusing changes nothing: the chunk is not buffered, not
/// applied, and no cursor moves; the sender is logged and counted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    /// A version below zero (versions start at 1; a cursor starts at 0).
    #[error("negative version in range ({from}, {to}] of unit ({unit_from}, {unit_to}]")]
    Negative {
        unit_from: i64,
        unit_to: i64,
        from: i64,
        to: i64,
    },
    /// The unit runs backwards, or is empty while its chunk is not the empty unit.
    #[error("unit ({unit_from}, {unit_to}] is reversed or empty")]
    BadUnit { unit_from: i64, unit_to: i64 },
    /// The chunk runs backwards, is empty inside a non-empty unit, or leaves its unit.
    #[error(
        "chunk ({from}, {to}] is reversed, empty or outside its unit ({unit_from}, {unit_to}]"
    )]
    ChunkOutsideUnit {
        unit_from: i64,
        unit_to: i64,
        from: i64,
        to: i64,
    },
    /// A change whose version lies outside its chunk.
    #[error("change at version {version} lies outside its chunk ({from}, {to}]")]
    ChangeOutsideChunk { version: i64, from: i64, to: i64 },
    /// A broadcast unit whose origin range is reversed, empty or out of bounds.
    #[error("origin unit ({from}, {to}] is reversed, empty or out of bounds")]
    BadOriginUnit { from: i64, to: i64 },
    /// A change of a broadcast unit that is not its origin's, or numbered outside it.
    #[error("a change (origin version {version}) is not the unit's origin's or lies outside ({from}, {to}]")]
    ChangeOutsideUnit { version: i64, from: i64, to: i64 },
    /// A per-origin list naming too many origins.
    #[error("a per-origin list names {count} origins (at most {MAX_ORIGINS})")]
    TooManyOrigins { count: usize },
    /// A per-origin list naming one origin twice.
    #[error("a per-origin list names origin {site} twice")]
    OriginTwice { site: String },
    /// Too many ranges for one origin.
    #[error("{count} ranges for origin {site} (at most {MAX_ORIGIN_RANGES})")]
    TooManyRanges { site: String, count: usize },
    /// A range that is reversed, below 1 or beyond the clock bound.
    #[error("range [{start}, {end}] of origin {site} is reversed or out of bounds")]
    BadOriginRange { site: String, start: i64, end: i64 },
    /// A snapshot part outside its file, or a file beyond `seed::MAX_SEED_BYTES`.
    #[error("snapshot part of {len} bytes at {offset} lies outside its file of {total} bytes")]
    BadSeedPart { offset: u64, len: usize, total: u64 },
    /// A pull continuation whose `after` lies outside the unit it names.
    #[error("pull after {after} lies outside its unit ({unit_from}, {unit_to}]")]
    PullOutsideUnit {
        after: i64,
        unit_from: i64,
        unit_to: i64,
    },
}

/// Checks a chunk against the rule of this module.
pub fn validate_chunk(c: &Chunk) -> Result<(), RangeError> {
    if c.unit_from < 0 || c.unit_to < 0 || c.from < 0 || c.to < 0 {
        return Err(RangeError::Negative {
            unit_from: c.unit_from,
            unit_to: c.unit_to,
            from: c.from,
            to: c.to,
        });
    }
    let empty_unit = c.unit_from == c.unit_to;
    if empty_unit {
        if c.from == c.unit_from && c.to == c.unit_to && c.changes.is_empty() {
            return Ok(());
        }
        return Err(RangeError::BadUnit {
            unit_from: c.unit_from,
            unit_to: c.unit_to,
        });
    }
    if c.unit_from > c.unit_to {
        return Err(RangeError::BadUnit {
            unit_from: c.unit_from,
            unit_to: c.unit_to,
        });
    }
    if !(c.unit_from <= c.from && c.from < c.to && c.to <= c.unit_to) {
        return Err(RangeError::ChunkOutsideUnit {
            unit_from: c.unit_from,
            unit_to: c.unit_to,
            from: c.from,
            to: c.to,
        });
    }
    if let Some(bad) = c
        .changes
        .iter()
        .find(|ch| ch.db_version <= c.from || ch.db_version > c.to)
    {
        return Err(RangeError::ChangeOutsideChunk {
            version: bad.db_version,
            from: c.from,
            to: c.to,
        });
    }
    Ok(())
}

/// Checks a pull: `after` is not negative, and a continuation's unit contains it.
pub fn validate_pull(after: i64, unit: Option<(i64, i64)>) -> Result<(), RangeError> {
    let bad = match unit {
        None => after < 0,
        Some((f, t)) => !(0 <= f && f <= after && after < t),
    };
    if bad {
        let (unit_from, unit_to) = unit.unwrap_or((after, after));
        return Err(RangeError::PullOutsideUnit {
            after,
            unit_from,
            unit_to,
        });
    }
    Ok(())
}

/// The cursor rule, the one place it is written down: a unit `(unit_from, unit_to]` of a
/// peer's feed moves our cursor for that peer only if it starts at or before the cursor
/// (otherwise there is a gap we have not seen).
pub fn advance_cursor(cursor: i64, unit_from: i64, unit_to: i64) -> i64 {
    if unit_from <= cursor && unit_to > cursor {
        unit_to
    } else {
        cursor
    }
}

/// Most out-of-order ranges remembered per peer; beyond that the oldest are forgotten
/// (harmless: the cursor just moves later and a pull re-fetches).
pub const MAX_RANGES: usize = 64;

/// [`advance_cursor`] for units that arrive out of order: a unit past a gap is remembered
/// in `ranges` and the cursor jumps over it once the gap is filled. Returns the cursor.
pub fn advance_with_ranges(
    cursor: i64,
    ranges: &mut Vec<(i64, i64)>,
    unit_from: i64,
    unit_to: i64,
) -> i64 {
    let mut cur = advance_cursor(cursor, unit_from, unit_to);
    if cur == cursor && unit_from > cursor && unit_to > unit_from {
        ranges.push((unit_from, unit_to));
    }
    loop {
        let before = cur;
        ranges.retain(|&(f, t)| {
            if f <= cur {
                cur = cur.max(t);
                false
            } else {
                true
            }
        });
        if cur == before {
            break;
        }
    }
    ranges.sort_unstable();
    if ranges.len() > MAX_RANGES {
        let drop = ranges.len() - MAX_RANGES;
        ranges.drain(..drop);
    }
    cur
}

/// Largest version accepted in a range (clocks are bounded at 2^62 by the extension).
pub const MAX_VERSION: i64 = 1 << 62;
/// Most origins one summary, `known` or `held` list may name.
pub const MAX_ORIGINS: usize = 100_000;
/// Most ranges per origin in one list.
pub const MAX_ORIGIN_RANGES: usize = 4_096;

/// Checks a per-origin range list (summary, `known`, `held`): bounded in size, each
/// range `1 <= a <= b <= MAX_VERSION`, and no origin named twice.
pub fn validate_origin_ranges(list: &[OriginRanges]) -> Result<(), RangeError> {
    if list.len() > MAX_ORIGINS {
        return Err(RangeError::TooManyOrigins { count: list.len() });
    }
    let mut seen = std::collections::HashSet::with_capacity(list.len());
    for o in list {
        if !seen.insert(o.site) {
            return Err(RangeError::OriginTwice {
                site: hex::encode(o.site),
            });
        }
        if o.ranges.len() > MAX_ORIGIN_RANGES {
            return Err(RangeError::TooManyRanges {
                site: hex::encode(o.site),
                count: o.ranges.len(),
            });
        }
        if let Some(&(a, b)) = o
            .ranges
            .iter()
            .find(|&&(a, b)| !(1 <= a && a <= b && b <= MAX_VERSION))
        {
            return Err(RangeError::BadOriginRange {
                site: hex::encode(o.site),
                start: a,
                end: b,
            });
        }
    }
    Ok(())
}

/// Checks a broadcast unit: `0 <= from < to <= MAX_VERSION`, and every change is the
/// origin's own, numbered inside `(from, to]`.
pub fn validate_unit(u: &OriginUnit) -> Result<(), RangeError> {
    if !(0 <= u.from && u.from < u.to && u.to <= MAX_VERSION) {
        return Err(RangeError::BadOriginUnit {
            from: u.from,
            to: u.to,
        });
    }
    if let Some(bad) = u.changes.iter().find(|c| {
        c.site_id.as_slice() != u.origin.as_slice()
            || !c.origin_version.is_some_and(|v| u.from < v && v <= u.to)
    }) {
        return Err(RangeError::ChangeOutsideUnit {
            version: bad.origin_version.unwrap_or(-1),
            from: u.from,
            to: u.to,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::msg::{chunk_unit, Change, Value};
    use crate::sync::test_support::{addr, drain, ident, machine};
    use crate::sync::Msg;
    use proptest::prelude::*;
    use std::time::Duration;

    #[test]
    fn ranges_that_break_the_rule_are_refused_before_anything_is_applied() {
        let mut s = machine(1);
        let bad = [
            (20, 10, 20, 10),
            (10, 20, 30, 40),
            (10, 20, 15, 15),
            (-1, 5, -1, 5),
        ];
        for (uf, ut, f, t) in bad {
            s.handle_message(
                addr(2),
                &ident(2),
                Msg::Changes {
                    site: [2; 16],
                    chunk: Chunk {
                        unit_from: uf,
                        unit_to: ut,
                        from: f,
                        to: t,
                        changes: vec![],
                        held: None,
                        schema: None,
                    },
                },
                Duration::ZERO,
            );
            assert!(
                drain(&mut s).is_empty(),
                "({uf}, {ut}] ({f}, {t}] was accepted"
            );
        }
        assert_eq!(s.stats().refused, bad.len() as u64);
    }

    fn change(v: i64) -> Change {
        Change {
            table: "t".into(),
            pk: vec![1, 9, 1],
            cid: "a".into(),
            val: Value::Null,
            col_version: 1,
            db_version: v,
            site_id: vec![7; 16],
            cl: 1,
            seq: 0,
            origin_version: Some(v),
        }
    }

    fn chunk(unit_from: i64, unit_to: i64, from: i64, to: i64, versions: &[i64]) -> Chunk {
        Chunk {
            unit_from,
            unit_to,
            from,
            to,
            changes: versions.iter().copied().map(change).collect(),
            held: None,
            schema: None,
        }
    }

    #[test]
    fn the_attacks_of_issue_7_are_refused() {
        // A reversed unit.
        assert!(validate_chunk(&chunk(20, 10, 20, 10, &[])).is_err());
        // A chunk outside its unit (it used to be buffered).
        assert!(validate_chunk(&chunk(10, 20, 30, 40, &[35])).is_err());
        assert!(validate_chunk(&chunk(10, 20, 5, 15, &[12])).is_err());
        // An empty chunk inside a non-empty unit.
        assert!(validate_chunk(&chunk(10, 20, 15, 15, &[])).is_err());
        // A change outside its chunk.
        assert!(validate_chunk(&chunk(10, 20, 10, 20, &[25])).is_err());
        assert!(validate_chunk(&chunk(10, 20, 10, 20, &[10])).is_err());
        // Negative versions.
        assert!(validate_chunk(&chunk(-5, 20, -5, 20, &[])).is_err());
        // An empty unit carrying changes.
        assert!(validate_chunk(&chunk(7, 7, 7, 7, &[7])).is_err());
    }

    #[test]
    fn what_honest_senders_produce_is_accepted() {
        assert_eq!(validate_chunk(&chunk(7, 7, 7, 7, &[])), Ok(()));
        assert_eq!(validate_chunk(&chunk(0, 3, 0, 3, &[1, 2, 3])), Ok(()));
        assert_eq!(validate_chunk(&chunk(0, 9, 3, 5, &[4])), Ok(()));
        let chunks = chunk_unit(10, 40, (11..=30).map(change).collect(), None, 6, 1 << 20);
        assert!(chunks.iter().all(|c| validate_chunk(c).is_ok()));
        assert_eq!(validate_pull(5, None), Ok(()));
        assert_eq!(validate_pull(5, Some((0, 9))), Ok(()));
        assert!(validate_pull(-1, None).is_err());
        assert!(validate_pull(9, Some((0, 9))).is_err());
        assert!(validate_pull(5, Some((6, 9))).is_err());
    }

    #[test]
    fn cursor_advances_only_without_a_gap() {
        assert_eq!(advance_cursor(10, 10, 20), 20);
        assert_eq!(advance_cursor(10, 5, 20), 20);
        assert_eq!(advance_cursor(10, 11, 20), 10);
        assert_eq!(advance_cursor(30, 10, 20), 30);
    }

    #[test]
    fn out_of_order_units_move_the_cursor_once_the_gap_fills() {
        let mut r = Vec::new();
        assert_eq!(advance_with_ranges(10, &mut r, 20, 30), 10);
        assert_eq!(advance_with_ranges(10, &mut r, 30, 40), 10);
        assert_eq!(r, vec![(20, 30), (30, 40)]);
        assert_eq!(advance_with_ranges(10, &mut r, 10, 20), 40);
        assert!(r.is_empty());
        assert_eq!(advance_with_ranges(40, &mut r, 5, 35), 40);
        assert!(r.is_empty());
    }

    #[test]
    fn origin_lists_and_units_are_checked() {
        let ok = OriginRanges {
            site: [1; 16],
            ranges: vec![(1, 5), (9, 9)],
        };
        assert_eq!(validate_origin_ranges(std::slice::from_ref(&ok)), Ok(()));
        for ranges in [vec![(0, 3)], vec![(5, 4)], vec![(1, MAX_VERSION + 1)]] {
            let bad = OriginRanges {
                site: [1; 16],
                ranges,
            };
            assert!(validate_origin_ranges(&[bad]).is_err());
        }
        assert!(validate_origin_ranges(&[ok.clone(), ok]).is_err());
        let unit = |from, to, versions: &[i64]| OriginUnit {
            origin: [7; 16],
            from,
            to,
            committed_ms: 0,
            changes: versions.iter().copied().map(change).collect(),
            schema: None,
        };
        assert_eq!(validate_unit(&unit(0, 3, &[1, 3])), Ok(()));
        assert!(validate_unit(&unit(3, 3, &[])).is_err());
        assert!(validate_unit(&unit(-1, 3, &[])).is_err());
        assert!(validate_unit(&unit(0, 3, &[4])).is_err());
        let mut foreign = unit(0, 3, &[1]);
        foreign.origin = [8; 16];
        assert!(
            validate_unit(&foreign).is_err(),
            "a change of another origin"
        );
    }

    proptest! {
        /// Whatever chunks a peer sends, the cursor only ever covers versions that some
        /// accepted unit covered: no sequence of frames makes this node skip a version it
        /// has not received. (Accepted units are the ones the apply side applies whole.)
        #[test]
        fn no_frame_makes_the_cursor_skip_a_version(
            frames in proptest::collection::vec(
                (-3i64..60, -3i64..60, -3i64..60, -3i64..60,
                 proptest::collection::vec(-3i64..60, 0..4)),
                0..40),
        ) {
            let mut cursor = 0i64;
            let mut ranges = Vec::new();
            let mut covered = [false; 61];
            for (uf, ut, f, t, vs) in frames {
                let c = chunk(uf, ut, f, t, &vs);
                if validate_chunk(&c).is_err() {
                    continue;
                }
                prop_assert!(c.unit_from <= c.from && c.from <= c.to && c.to <= c.unit_to);
                prop_assert!(c.changes.iter().all(|ch| ch.db_version > c.from && ch.db_version <= c.to));
                // Only a whole unit is applied and moves the cursor.
                if !c.is_whole_unit() {
                    continue;
                }
                for v in (c.unit_from + 1)..=c.unit_to {
                    covered[v as usize] = true;
                }
                let before = cursor;
                cursor = advance_with_ranges(cursor, &mut ranges, c.unit_from, c.unit_to);
                prop_assert!(cursor >= before);
                prop_assert!(ranges.len() <= MAX_RANGES);
                for v in 1..=cursor {
                    prop_assert!(covered[v as usize], "cursor {} skips version {}", cursor, v);
                }
            }
        }

        #[test]
        fn validation_never_panics(
            uf in any::<i64>(), ut in any::<i64>(), f in any::<i64>(), t in any::<i64>(),
            vs in proptest::collection::vec(any::<i64>(), 0..4),
        ) {
            let _ = validate_chunk(&chunk(uf, ut, f, t, &vs));
            let _ = validate_pull(f, Some((uf, ut)));
        }
    }
}
