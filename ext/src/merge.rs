//! The merge rules, as pure functions over values and clocks (no SQLite here).
//!
//! Rows carry a causal length `cl`: odd alive, even deleted, higher wins. Within one life
//! (equal `cl`) each column is last-writer-wins on `col_version`, then on the value under
//! one total order, then on the site id. Each rule is a join on a total order, so applying
//! the same set of changes in any order, with duplicates, reaches one state.

use std::cmp::Ordering;

use crate::sqlite::Value;

/// Rank of a value's storage class in the tie-break order: NULL < numbers < TEXT < BLOB.
fn class(v: &Value) -> u8 {
    match v {
        Value::Null => 0,
        Value::Integer(_) | Value::Real(_) => 1,
        Value::Text(_) => 2,
        Value::Blob(_) => 3,
    }
}

/// Compares an integer with a real exactly (no rounding through f64 for large integers).
fn cmp_int_real(i: i64, f: f64) -> Ordering {
    if f.is_nan() {
        return Ordering::Greater;
    }
    // i64 range is [-2^63, 2^63); every f64 outside it compares trivially.
    const TWO_63: f64 = 9_223_372_036_854_775_808.0;
    if f >= TWO_63 {
        return Ordering::Less;
    }
    if f < -TWO_63 {
        return Ordering::Greater;
    }
    let t = f.trunc(); // exactly representable as i64 now
    match i.cmp(&(t as i64)) {
        Ordering::Equal => {
            let frac = f - t;
            if frac > 0.0 {
                Ordering::Less
            } else if frac < 0.0 {
                Ordering::Greater
            } else {
                Ordering::Equal
            }
        }
        o => o,
    }
}

/// The total order of DESIGN §1: NULL < numbers (integers and reals by value; on equal
/// value INTEGER < REAL) < TEXT (bytes) < BLOB (bytes).
pub fn compare_values(a: &Value, b: &Value) -> Ordering {
    match class(a).cmp(&class(b)) {
        Ordering::Equal => {}
        o => return o,
    }
    match (a, b) {
        (Value::Integer(x), Value::Integer(y)) => x.cmp(y),
        (Value::Real(x), Value::Real(y)) => x.total_cmp(y),
        (Value::Integer(x), Value::Real(y)) => cmp_int_real(*x, *y).then(Ordering::Less),
        (Value::Real(x), Value::Integer(y)) => {
            cmp_int_real(*y, *x).reverse().then(Ordering::Greater)
        }
        (Value::Text(x), Value::Text(y)) | (Value::Blob(x), Value::Blob(y)) => x.cmp(y),
        _ => Ordering::Equal, // both NULL
    }
}

/// What the incoming change's causal length does to the row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowStep {
    /// The change belongs to an older life of the row: ignore it.
    Stale,
    /// Same life as the local row.
    SameLife,
    /// A later life that deletes the row (`cl` even).
    Delete,
    /// A later life in which the row is alive (`cl` odd): reset the row, then apply.
    NewLife,
}

/// Compares the incoming `cl` with the local one (0 when the row is unknown here).
pub fn row_step(local_cl: i64, incoming_cl: i64) -> RowStep {
    match incoming_cl.cmp(&local_cl) {
        Ordering::Less => RowStep::Stale,
        Ordering::Equal => RowStep::SameLife,
        Ordering::Greater if incoming_cl % 2 == 0 => RowStep::Delete,
        Ordering::Greater => RowStep::NewLife,
    }
}

/// A column's clock within one life, as compared by the merge.
#[derive(Clone, Debug, PartialEq)]
pub struct ColumnClock<'a> {
    /// Edits counted in this life; 0 = never written in this life.
    pub col_version: i64,
    pub value: &'a Value,
    /// The credited site id; `None` only for a column never written in this life.
    pub site: Option<&'a [u8]>,
}

/// The outcome of merging one column change into the local column.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ColumnStep {
    /// Local state stays.
    Keep,
    /// The incoming change wins with a different value: write it.
    Take,
    /// The incoming change wins but carries the local value (a higher version of the same
    /// value, or the same version and value from a greater site): update the clock; the
    /// row is rewritten only under `merge-equal-values`.
    TakeEqualValue,
}

/// Last-writer-wins for one column within one life.
pub fn column_step(local: &ColumnClock<'_>, incoming: &ColumnClock<'_>) -> ColumnStep {
    let value_order = compare_values(incoming.value, local.value);
    let wins = incoming
        .col_version
        .cmp(&local.col_version)
        .then(value_order)
        .then_with(|| incoming.site.cmp(&local.site));
    match (wins, value_order) {
        (Ordering::Greater, Ordering::Equal) => ColumnStep::TakeEqualValue,
        (Ordering::Greater, _) => ColumnStep::Take,
        _ => ColumnStep::Keep,
    }
}

/// Whether a tie on the row's life (a concurrent delete or resurrection) credits the
/// incoming site: the greater site id is credited, so every replica names the same one.
pub fn sentinel_credits(local_site: Option<&[u8]>, incoming_site: &[u8]) -> bool {
    Some(incoming_site) > local_site
}

/// The largest `cl` or `col_version` a merge accepts: 2^62.
///
/// Local writes add 1 to a column's version and at most 2 to a row's `cl`, in plain-SQL
/// triggers where an overflowing `+ 1` silently turns the clock into a REAL (9.22e18)
/// that no longer compares or ships as an integer, and two replicas then stay apart for
/// good. Refusing larger clocks at the door leaves 2^62 local edits of one row before any
/// arithmetic could reach `i64::MAX`, so no trigger or merge ever overflows. Every replica
/// refuses the same changes, so refusing one never makes replicas disagree.
pub const MAX_CLOCK: i64 = 1 << 62;

/// Which clock of a change is out of range, for the error message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClockField {
    Cl,
    ColVersion,
}

impl std::fmt::Display for ClockField {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ClockField::Cl => "cl",
            ClockField::ColVersion => "col_version",
        })
    }
}

/// Checks a change's clocks against `1..=MAX_CLOCK` (`col_version` only for a column
/// change: a row's own clock carries none). Returns the offending field and value.
pub fn check_clocks(cl: i64, col_version: Option<i64>) -> Result<(), (ClockField, i64)> {
    if !(1..=MAX_CLOCK).contains(&cl) {
        return Err((ClockField::Cl, cl));
    }
    match col_version {
        Some(v) if !(1..=MAX_CLOCK).contains(&v) => Err((ClockField::ColVersion, v)),
        _ => Ok(()),
    }
}

/// The local state of the row a change targets, as far as the plan needs it.
#[derive(Clone, Debug)]
pub struct LocalRow<'a> {
    /// Causal length; 0 when the row is unknown here.
    pub cl: i64,
    /// The site credited with the row's own clock in this life (`None`: credit open).
    pub row_site: Option<&'a [u8]>,
    /// The target column's clock; ignored for a change to the row's own clock.
    pub column: ColumnClock<'a>,
}

/// One incoming change, as far as the plan needs it.
#[derive(Clone, Debug)]
pub struct IncomingChange<'a> {
    pub cl: i64,
    pub site: &'a [u8],
    /// `None` for the row's own clock (cid '-1'); the column's clock otherwise.
    pub column: Option<ColumnClock<'a>>,
}

/// What one change does to a row: the one decision both merge paths (one statement per
/// change in `changes_write`, grouped by row in `changes_batch`) carry out, so they
/// cannot drift apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Nothing changes (an older life, a losing column, an uncredited row clock).
    Skip,
    /// A later, deleted life: delete the base row, set `cl`, credit the row's clock to
    /// the incoming site, restart every column clock.
    Delete,
    /// A later, living life: the base row restarts from its DEFAULTs, every column clock
    /// restarts; a row-clock change credits the row's clock, a column change sets its
    /// column (value and clock) and leaves the row's credit open until its own change
    /// arrives.
    NewLife,
    /// Same life: credit the row's own clock to the incoming site.
    CreditRow,
    /// Same life: the column's clock becomes the incoming one; the base column is
    /// rewritten when `write_base`.
    SetColumn { write_base: bool },
}

impl Plan {
    /// Whether carrying out the plan writes the base row — what `crsql_rows_impacted()`
    /// counts, per change. A delete counts only when there was a row to delete.
    pub fn impacts(self, base_present: bool) -> bool {
        match self {
            Plan::Delete => base_present,
            Plan::NewLife => true,
            Plan::SetColumn { write_base } => write_base,
            Plan::Skip | Plan::CreditRow => false,
        }
    }
}

/// Decides what `incoming` does to `local`. `equal_values` is the `merge-equal-values`
/// setting: whether a winning change that carries the local value rewrites the row.
///
/// A column never written in this life (version 0) holds its DEFAULT, not a value any
/// site wrote, so any change to it wins and is written, as cr-sqlite does for a column
/// with no clock.
pub fn plan(local: &LocalRow<'_>, incoming: &IncomingChange<'_>, equal_values: bool) -> Plan {
    match (row_step(local.cl, incoming.cl), &incoming.column) {
        (RowStep::Stale, _) => Plan::Skip,
        (RowStep::Delete, _) => Plan::Delete,
        (RowStep::NewLife, _) => Plan::NewLife,
        (RowStep::SameLife, None) => {
            if sentinel_credits(local.row_site, incoming.site) {
                Plan::CreditRow
            } else {
                Plan::Skip
            }
        }
        // A deleted life has no column values (such changes are refused before this).
        (RowStep::SameLife, Some(_)) if incoming.cl % 2 == 0 => Plan::Skip,
        (RowStep::SameLife, Some(_)) if local.column.col_version == 0 => {
            Plan::SetColumn { write_base: true }
        }
        (RowStep::SameLife, Some(inc)) => match column_step(&local.column, inc) {
            ColumnStep::Keep => Plan::Skip,
            ColumnStep::Take => Plan::SetColumn { write_base: true },
            ColumnStep::TakeEqualValue => Plan::SetColumn {
                write_base: equal_values,
            },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use Value::*;

    #[test]
    fn value_order() {
        assert_eq!(compare_values(&Null, &Integer(-5)), Ordering::Less);
        assert_eq!(compare_values(&Integer(1), &Real(1.0)), Ordering::Less);
        assert_eq!(compare_values(&Real(1.0), &Integer(1)), Ordering::Greater);
        assert_eq!(compare_values(&Integer(2), &Real(1.5)), Ordering::Greater);
        assert_eq!(compare_values(&Real(1e300), &Text(vec![])), Ordering::Less);
        assert_eq!(
            compare_values(&Text(b"b".to_vec()), &Blob(b"a".to_vec())),
            Ordering::Less
        );
        assert_eq!(
            compare_values(&Integer(i64::MAX), &Real(9.223372036854776e18)),
            Ordering::Less
        );
        assert_eq!(compare_values(&Integer(-3), &Real(-2.5)), Ordering::Less);
        assert_ne!(compare_values(&Integer(1), &Real(1.0)), Ordering::Equal);
    }

    #[test]
    fn one_against_one_point_zero() {
        let (a, b) = (Integer(1), Real(1.0));
        let l = ColumnClock {
            col_version: 1,
            value: &a,
            site: Some(&[9]),
        };
        let r = ColumnClock {
            col_version: 1,
            value: &b,
            site: Some(&[1]),
        };
        assert_eq!(column_step(&l, &r), ColumnStep::Take);
        assert_eq!(column_step(&r, &l), ColumnStep::Keep);
    }

    #[test]
    fn equal_value_credits_greater_site() {
        let v = Integer(7);
        let lo = ColumnClock {
            col_version: 3,
            value: &v,
            site: Some(&[1]),
        };
        let hi = ColumnClock {
            col_version: 3,
            value: &v,
            site: Some(&[2]),
        };
        assert_eq!(column_step(&lo, &hi), ColumnStep::TakeEqualValue);
        assert_eq!(column_step(&hi, &lo), ColumnStep::Keep);
        assert_eq!(column_step(&hi, &hi), ColumnStep::Keep);
    }

    #[test]
    fn rows() {
        assert_eq!(row_step(0, 1), RowStep::NewLife);
        assert_eq!(row_step(1, 2), RowStep::Delete);
        assert_eq!(row_step(3, 2), RowStep::Stale);
        assert_eq!(row_step(3, 3), RowStep::SameLife);
        assert_eq!(row_step(1, 4), RowStep::Delete);
    }

    fn value() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Null),
            (-3i64..3).prop_map(Integer),
            (-3i64..3).prop_map(|i| Real(i as f64 * 0.5)),
            proptest::collection::vec(0u8..3, 0..2).prop_map(Text),
            proptest::collection::vec(0u8..3, 0..2).prop_map(Blob),
        ]
    }

    /// A change to one column of one row, as the model merges it.
    #[derive(Clone, Debug)]
    struct Change {
        cl: i64,
        version: i64,
        value: Value,
        site: u8,
    }

    fn change() -> impl Strategy<Value = Change> {
        (1i64..5, 1i64..4, value(), 0u8..4).prop_map(|(cl, version, value, site)| Change {
            cl,
            version,
            value,
            site,
        })
    }

    /// The model of a row with one column: (cl, version, value, site).
    fn apply(state: Option<Change>, c: &Change) -> Option<Change> {
        let Some(s) = state else {
            return Some(c.clone());
        };
        match row_step(s.cl, c.cl) {
            RowStep::Stale => Some(s),
            RowStep::Delete | RowStep::NewLife => Some(c.clone()),
            RowStep::SameLife => {
                let (ls, is) = ([s.site], [c.site]);
                let l = ColumnClock {
                    col_version: s.version,
                    value: &s.value,
                    site: Some(&ls),
                };
                let i = ColumnClock {
                    col_version: c.version,
                    value: &c.value,
                    site: Some(&is),
                };
                match column_step(&l, &i) {
                    ColumnStep::Keep => Some(s),
                    _ => Some(c.clone()),
                }
            }
        }
    }

    fn key(s: &Option<Change>) -> Option<(i64, i64, String, u8)> {
        s.as_ref()
            .map(|c| (c.cl, c.version, format!("{:?}", c.value), c.site))
    }

    proptest! {
        /// Any order, with duplicates, reaches the same state (commutative, associative,
        /// idempotent).
        #[test]
        fn merge_is_order_free(changes in proptest::collection::vec(change(), 1..8), seed in any::<u64>()) {
            let forward = changes.iter().fold(None, apply);
            let mut shuffled = changes.clone();
            shuffled.extend(changes.iter().take(3).cloned());
            let mut x = seed;
            for i in (1..shuffled.len()).rev() {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                shuffled.swap(i, (x >> 33) as usize % (i + 1));
            }
            let other = shuffled.iter().fold(None, apply);
            prop_assert_eq!(key(&forward), key(&other));
        }
    }
}
