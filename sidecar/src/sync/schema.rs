//! Schema knowledge as values, pure: which replicated tables and columns a node has, its
//! fingerprint, and the rule for changes a node cannot apply yet (issue 12, part 3).
//!
//! # The rule for a unit that names an unknown table or column
//! During a rolling schema change some nodes already write a new table or column while
//! others do not have it yet. Such a node neither refuses the unit (anti-entropy would
//! send it again forever, and a catch-up pull would restart at it for good) nor applies
//! the part it can (a replica never exposes part of a unit). It **buffers the whole unit
//! durably**, in the transaction that records it as received:
//! - the versions the unit proves are recorded as held, and a catch-up unit moves the
//!   cursor, exactly as if it had been applied: summaries stop asking for it and the next
//!   pull continues after it;
//! - the versions whose changes sit only in the buffer ([`buffered_versions`]) are kept
//!   beside it, and a node never vouches for them to others: a catch-up it serves does
//!   not claim them (its feed does not contain their changes) and its offers leave them
//!   out of what it names as held beyond memory;
//! - the unit is applied, whole and in one transaction, as soon as the local schema
//!   knows every table and column it names (checked after every schema change).
//!
//! A catch-up unit (a range of a peer's feed) holds the changes of many origins. Each
//! origin's changes in it are whole transactions of that origin: the peer merged each of
//! that origin's units in one transaction, so they are adjacent in its feed, and its feed
//! is read in whole transactions. So a catch-up unit is split by origin
//! ([`waiting_origins`]): the changes of an origin that names anything missing are
//! buffered together (one entry per origin), and the other origins' changes are applied
//! at once. No transaction is split, and one new column does not hold back a whole
//! catch-up (a node that joins or returns before it is migrated still gets every other
//! table at once).
//!
//! A unit is one read of its origin's feed, so transactions committed within the same
//! few milliseconds can travel as one unit; a transaction on an unrelated table that
//! shares a unit with one naming a new column waits with it.
//!
//! Later units of the same origin that touch only known tables are applied meanwhile,
//! ahead of the buffered one. That cannot change the result: merges are per column
//! (higher `col_version`, then the greater value, then the greater site) and per row
//! (higher causal length), each a maximum under a total order, so merging the same
//! changes in any order gives the same tables and clocks (`ext/src/merge.rs`, property
//! tested in `ext/tests/merge_paths.rs`). What it changes is only the order in which a
//! reader of this replica sees whole units, as with any unit that arrives past a gap.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use super::held::Held;
use super::msg::{Change, SiteId};

/// The `cid` of a row's own clock (`crsql_changes`), which names no column.
pub const ROW_CID: &str = "-1";

/// The replicated tables of a database and their columns. Names are kept lower-cased:
/// SQLite compares identifiers without regard to ASCII case.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Schema {
    tables: BTreeMap<String, BTreeSet<String>>,
}

/// Something a change names that the local schema lacks.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Missing {
    /// No replicated table of that name.
    Table(String),
    /// The table is replicated but has no column of that name.
    Column { table: String, column: String },
}

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Missing::Table(t) => write!(f, "table {t}"),
            Missing::Column { table, column } => write!(f, "column {table}.{column}"),
        }
    }
}

impl Schema {
    /// From `(table, columns)` pairs (every column, key columns included).
    pub fn new<T, C>(tables: impl IntoIterator<Item = (T, C)>) -> Schema
    where
        T: AsRef<str>,
        C: IntoIterator,
        C::Item: AsRef<str>,
    {
        let mut out = Schema::default();
        for (t, cols) in tables {
            let set = out
                .tables
                .entry(t.as_ref().to_ascii_lowercase())
                .or_default();
            set.extend(cols.into_iter().map(|c| c.as_ref().to_ascii_lowercase()));
        }
        out
    }

    /// A stable 64-bit digest of the replicated tables and their columns, the same on
    /// every node (and every release) with the same tables and columns, whatever order
    /// they were created or listed in: the first 8 bytes of SHA-256 over the sorted,
    /// lower-cased names. Column types, defaults and indexes are not part of it: they
    /// do not decide whether a change can be applied.
    pub fn fingerprint(&self) -> u64 {
        let mut text = Vec::new();
        for (t, cols) in &self.tables {
            text.extend_from_slice(t.as_bytes());
            text.push(0);
            for c in cols {
                text.extend_from_slice(c.as_bytes());
                text.push(1);
            }
            text.push(2);
        }
        let d = ring::digest::digest(&ring::digest::SHA256, &text);
        let mut b = [0u8; 8];
        b.copy_from_slice(&d.as_ref()[..8]);
        u64::from_be_bytes(b)
    }

    /// Whether `change` names only a replicated table and one of its columns (or the
    /// row's own clock).
    pub fn knows(&self, change: &Change) -> bool {
        self.missing_of(change).is_none()
    }

    fn missing_of(&self, change: &Change) -> Option<Missing> {
        let table = change.table.to_ascii_lowercase();
        let Some(cols) = self.tables.get(&table) else {
            return Some(Missing::Table(table));
        };
        if change.cid == ROW_CID {
            return None;
        }
        let column = change.cid.to_ascii_lowercase();
        if cols.contains(&column) {
            None
        } else {
            Some(Missing::Column { table, column })
        }
    }

    /// Every table and column `changes` name that this schema lacks, sorted, each once.
    pub fn missing<'a>(&self, changes: impl IntoIterator<Item = &'a Change>) -> Vec<Missing> {
        let mut out = BTreeSet::new();
        for c in changes {
            if let Some(m) = self.missing_of(c) {
                out.insert(m);
            }
        }
        out.into_iter().collect()
    }

    /// The replicated tables, lower-cased.
    pub fn tables(&self) -> impl Iterator<Item = &str> {
        self.tables.keys().map(String::as_str)
    }
}

/// The versions whose changes are in `changes` (by their origin and origin version): what
/// a buffered catch-up unit holds only in the buffer. A change without an origin version
/// (a peer before the per-origin protocol) names none.
pub fn buffered_versions<'a>(changes: impl IntoIterator<Item = &'a Change>) -> Held {
    let mut h = Held::default();
    for c in changes {
        if let (Some(v), Ok(site)) = (c.origin_version, SiteId::try_from(c.site_id.as_slice())) {
            h.insert(site, v, v);
        }
    }
    h
}

/// The origins (site ids as sent) of the changes in `changes` that `schema` cannot
/// apply: in a catch-up unit, every change of these origins is buffered and the rest is
/// applied (the split rule above).
pub fn waiting_origins<'a>(
    schema: &Schema,
    changes: impl IntoIterator<Item = &'a Change>,
) -> BTreeSet<Vec<u8>> {
    changes
        .into_iter()
        .filter(|c| !schema.knows(c))
        .map(|c| c.site_id.clone())
        .collect()
}

/// Joins what is missing for a log line or the health answer: `column t.c, table u`.
pub fn describe(missing: &[Missing]) -> String {
    missing
        .iter()
        .map(Missing::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::msg::Value;

    fn change(table: &str, cid: &str, site: u8, v: i64) -> Change {
        Change {
            table: table.into(),
            pk: vec![1, 9, 1],
            cid: cid.into(),
            val: Value::Integer(1),
            col_version: 1,
            db_version: v,
            site_id: vec![site; 16],
            cl: 1,
            seq: 0,
            origin_version: Some(v),
        }
    }

    #[test]
    fn the_fingerprint_ignores_order_and_case_and_sees_every_column() {
        let a = Schema::new([("items", vec!["id", "a", "b"]), ("other", vec!["k"])]);
        let b = Schema::new([("OTHER", vec!["K"]), ("items", vec!["b", "id", "A"])]);
        assert_eq!(a.fingerprint(), b.fingerprint());
        let c = Schema::new([("items", vec!["id", "a", "b", "c"]), ("other", vec!["k"])]);
        assert_ne!(
            a.fingerprint(),
            c.fingerprint(),
            "an added column changes it"
        );
        // Names are delimited: moving a letter between a table and a column changes it.
        let d = Schema::new([("ab", vec!["c"])]);
        let e = Schema::new([("a", vec!["bc"])]);
        assert_ne!(d.fingerprint(), e.fingerprint());
        assert_ne!(Schema::default().fingerprint(), d.fingerprint());
    }

    #[test]
    fn missing_names_unknown_tables_and_columns_once_each() {
        let s = Schema::new([("items", vec!["id", "a"])]);
        let changes = [
            change("items", "a", 2, 1),
            change("Items", "A", 2, 2),
            change("items", ROW_CID, 2, 3),
            change("items", "c", 2, 4),
            change("items", "c", 2, 5),
            change("new_table", "x", 2, 6),
        ];
        assert!(s.knows(&changes[0]) && s.knows(&changes[1]) && s.knows(&changes[2]));
        let m = s.missing(&changes);
        assert_eq!(
            m,
            vec![
                Missing::Table("new_table".into()),
                Missing::Column {
                    table: "items".into(),
                    column: "c".into()
                },
            ]
        );
        assert_eq!(describe(&m), "table new_table, column items.c");
        assert!(s.missing(&changes[..3]).is_empty());
        // Once migrated, the same changes are all known.
        let migrated = Schema::new([("items", vec!["id", "a", "c"]), ("new_table", vec!["x"])]);
        assert!(migrated.missing(&changes).is_empty());
    }

    #[test]
    fn a_catch_up_waits_only_for_the_origins_that_name_something_missing() {
        let s = Schema::new([("items", vec!["id", "a"])]);
        let changes = [
            change("items", "a", 2, 1),
            change("items", "b", 2, 2),
            change("items", "a", 3, 1),
            change("new_table", "x", 4, 1),
            change("items", ROW_CID, 5, 1),
        ];
        let waiting = waiting_origins(&s, &changes);
        assert_eq!(
            waiting.into_iter().collect::<Vec<_>>(),
            vec![vec![2u8; 16], vec![4u8; 16]]
        );
        assert!(waiting_origins(&s, &changes[2..3]).is_empty());
    }

    #[test]
    fn buffered_versions_are_the_changes_own() {
        let changes = [
            change("t", "a", 2, 4),
            change("t", "a", 2, 5),
            change("t", "a", 3, 9),
        ];
        let h = buffered_versions(&changes);
        assert!(h.covers(&[2; 16], 4, 5) && h.contains(&[3; 16], 9));
        assert!(!h.contains(&[2; 16], 6) && !h.contains(&[3; 16], 8));
        let mut none = change("t", "a", 2, 1);
        none.origin_version = None;
        assert!(buffered_versions([&none]).is_empty());
    }

    /// A unit with a fingerprint is still read by a node of the previous layout (fields
    /// 0–4), and the previous layout's units are read with no fingerprint.
    #[test]
    fn the_fingerprint_field_is_invisible_to_the_previous_layout() {
        use crate::sync::msg::OriginUnit;
        use minicbor::{Decode, Encode};
        #[derive(Debug, PartialEq, Encode, Decode)]
        struct PreviousUnit {
            #[cbor(n(0), with = "minicbor::bytes")]
            origin: SiteId,
            #[n(1)]
            from: i64,
            #[n(2)]
            to: i64,
            #[n(3)]
            committed_ms: u64,
            #[n(4)]
            changes: Vec<Change>,
        }
        let unit = OriginUnit {
            origin: [2; 16],
            from: 0,
            to: 1,
            committed_ms: 5,
            changes: vec![change("t", "a", 2, 1)],
            schema: Some(0xfeed_f00d),
        };
        let bytes = minicbor::to_vec(&unit).expect("encodes");
        let old: PreviousUnit = minicbor::decode(&bytes).expect("the previous layout reads it");
        assert_eq!(old.changes, unit.changes);
        let back = minicbor::to_vec(&old).expect("encodes");
        let new: OriginUnit = minicbor::decode(&back).expect("reads the previous layout");
        assert_eq!(new.schema, None);
        assert_eq!(new.changes, unit.changes);
    }

    /// Versions held only in the schema buffer are held (a summary does not ask for
    /// them) but never named as held beyond memory: a pull of this node's feed would not
    /// bring them.
    #[test]
    fn buffered_versions_are_not_offered_for_a_pull() {
        use crate::sync::machine::{Applied, Effect};
        use crate::sync::msg::{Msg, OriginRanges};
        use crate::sync::test_support::{addr, drain, ident, machine};
        use crate::sync::RangeSet;
        use std::time::Duration;
        let origin = [7u8; 16];
        let offers = |buffered: Option<Held>, theirs: Vec<OriginRanges>| {
            let mut m = machine(1);
            m.set_peers([(addr(2), [2; 16])], Duration::ZERO);
            m.handle_applied(
                Applied {
                    held: vec![(origin, RangeSet::from_ranges([(1, 10)]))],
                    buffered,
                    ..Applied::default()
                },
                Duration::ZERO,
            );
            drain(&mut m);
            let summary = Msg::Summary {
                site: [2; 16],
                held: theirs,
                reply: false,
                urgent: false,
                collected: None,
                cl_floor: None,
            };
            m.handle_message(addr(2), &ident(2), summary, Duration::from_secs(5));
            drain(&mut m)
                .into_iter()
                .filter_map(|e| match e {
                    Effect::Send {
                        msg: Msg::Offer { more, .. },
                        ..
                    } => Some(Held::from_wire(&more)),
                    _ => None,
                })
                .collect::<Vec<_>>()
        };
        let knows_some = vec![OriginRanges {
            site: origin,
            ranges: vec![(1, 4)],
        }];
        let more = offers(None, knows_some.clone());
        assert!(
            more.len() == 1 && more[0].covers(&origin, 5, 10),
            "{more:?}"
        );
        let mut buffered = Held::default();
        buffered.insert(origin, 8, 10);
        let more = offers(Some(buffered.clone()), knows_some);
        assert!(more.len() == 1 && more[0].covers(&origin, 5, 7), "{more:?}");
        assert!(!more[0].contains(&origin, 8), "{more:?}");
        // A peer that knows nothing of the origin: the same.
        let more = offers(Some(buffered), vec![]);
        assert!(more.len() == 1 && more[0].covers(&origin, 1, 7), "{more:?}");
        assert!(!more[0].contains(&origin, 8), "{more:?}");
    }
}
