//! A subscription's rows: running its query into (key, values as JSON text) pairs, the
//! diff against the previous result (whole, or for a set of touched keys), and which
//! result columns form a row's key. Pure but for the statement it steps; the engine owns
//! state and `storage` persistence.

use std::collections::HashMap;

use rusqlite::{Connection, Statement};
use serde_json::Value as Json;

use crate::http::authorizer::AuthState;
use crate::http::json_values::{add_json_len, value_to_json};
use crate::http::pool::Limits;
use crate::http::HttpError;

/// A subscription's current rows: key → (row id, values as JSON text).
pub type Rows = HashMap<String, (i64, String)>;

/// One change of a subscription's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub kind: &'static str,
    pub rowid: i64,
    pub key: String,
    pub vals: String,
}

/// Runs a prepared query: (key, values as JSON text) per row, in result order. Rows with
/// the same key get an occurrence suffix so none is lost. TEXT that is not UTF-8 and rows
/// past `api.max_result_bytes` are refused: the stored rows are what resuming clients get.
pub fn evaluate(
    stmt: &mut Statement<'_>,
    columns: &[String],
    key_cols: Option<&[usize]>,
    auth: &AuthState,
    limits: Limits,
) -> Result<Vec<(String, String)>, HttpError> {
    let sql = |e| crate::http::exec::sql_error(e, auth);
    let mut out = Vec::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut rows = stmt.raw_query();
    while let Some(row) = rows.next().map_err(sql)? {
        let mut vals = Vec::with_capacity(columns.len());
        let mut size = 2;
        for (i, column) in columns.iter().enumerate() {
            let v = row.get_ref(i).map_err(sql)?;
            add_json_len(&mut size, v, limits.max_result_bytes)?;
            vals.push(value_to_json(v, column)?);
        }
        let vals_text = Json::Array(vals.clone()).to_string();
        let mut key = match key_cols {
            Some(cols) => {
                Json::Array(cols.iter().filter_map(|&c| vals.get(c).cloned()).collect()).to_string()
            }
            None => vals_text.clone(),
        };
        let n_seen = seen.entry(key.clone()).or_insert(0);
        if *n_seen > 0 {
            key.push_str(&format!("#{n_seen}"));
        }
        *n_seen += 1;
        out.push((key, vals_text));
    }
    Ok(out)
}

/// Compares the old rows with a whole new result: the changes and the next row id. New
/// keys are inserts (in result order, fresh row ids), changed values updates, vanished
/// keys deletes (by row id).
pub fn diff(old: &Rows, new: Vec<(String, String)>, next_rowid: i64) -> (Vec<Change>, i64) {
    let present: std::collections::HashSet<String> = new.iter().map(|(k, _)| k.clone()).collect();
    let gone = old.keys().filter(|k| !present.contains(*k));
    changes_for(old, new, gone, next_rowid)
}

/// Compares the old rows with the new rows of some `touched` keys only (the query run
/// restricted to them): the same changes [`diff`] would find for those keys.
pub fn diff_keys(
    old: &Rows,
    touched: &[String],
    new: Vec<(String, String)>,
    next_rowid: i64,
) -> (Vec<Change>, i64) {
    // A keyed result is mostly empty or a few rows: a set of them would cost more than
    // looking through them (this runs for every subscription in every round).
    let present: Option<std::collections::HashSet<&String>> =
        (new.len() > 16).then(|| new.iter().map(|(k, _)| k).collect());
    let is_new = |k: &String| match &present {
        Some(set) => set.contains(k),
        None => new.iter().any(|(n, _)| n == k),
    };
    let gone: Vec<&String> = touched
        .iter()
        .filter(|k| old.contains_key(*k) && !is_new(k))
        .collect();
    changes_for(old, new, gone.into_iter(), next_rowid)
}

fn changes_for<'a>(
    old: &Rows,
    new: Vec<(String, String)>,
    gone: impl Iterator<Item = &'a String>,
    mut next_rowid: i64,
) -> (Vec<Change>, i64) {
    let mut changes = Vec::new();
    for (key, vals) in new {
        match old.get(&key) {
            Some((rowid, old_vals)) => {
                if *old_vals != vals {
                    changes.push(Change {
                        kind: "update",
                        rowid: *rowid,
                        key,
                        vals,
                    });
                }
            }
            None => {
                let rowid = next_rowid;
                next_rowid += 1;
                changes.push(Change {
                    kind: "insert",
                    rowid,
                    key,
                    vals,
                });
            }
        }
    }
    let mut gone: Vec<(&String, &(i64, String))> =
        gone.filter_map(|k| old.get_key_value(k)).collect();
    gone.sort_by_key(|(_, (rowid, _))| *rowid);
    gone.dedup_by_key(|(_, (rowid, _))| *rowid);
    for (key, (rowid, vals)) in gone {
        changes.push(Change {
            kind: "delete",
            rowid: *rowid,
            key: key.clone(),
            vals: vals.clone(),
        });
    }
    (changes, next_rowid)
}

/// Applies committed changes to the rows they were computed from.
pub fn apply(rows: &mut Rows, changes: Vec<Change>) {
    for c in changes {
        if c.kind == "delete" {
            rows.remove(&c.key);
        } else {
            rows.insert(c.key, (c.rowid, c.vals));
        }
    }
}

/// The row key a touched primary key has in a subscription keyed by it: the JSON array
/// of its values, as [`evaluate`] writes keys.
pub fn key_of(values: &[rusqlite::types::Value]) -> Result<String, HttpError> {
    let mut out = Vec::with_capacity(values.len());
    for v in values {
        out.push(value_to_json(
            rusqlite::types::ValueRef::from(v),
            "primary key",
        )?);
    }
    Ok(Json::Array(out).to_string())
}

/// The result columns holding the primary key of every table the rows come from, or
/// `None` when some key column is not selected (or a value is computed): then the whole
/// row is the key, and an edit shows as a delete plus an insert.
pub fn key_columns(conn: &Connection, stmt: &Statement<'_>) -> Option<Vec<usize>> {
    // rusqlite panics on a table or column name that is not UTF-8; such a query is then
    // keyed by whole rows rather than taking the engine thread down.
    let meta: Vec<(Option<String>, Option<String>)> =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            stmt.columns_with_metadata()
                .map(|m| {
                    (
                        m.table_name().map(String::from),
                        m.origin_name().map(String::from),
                    )
                })
                .collect()
        }))
        .ok()?;
    let mut tables: Vec<String> = meta.iter().filter_map(|(t, _)| t.clone()).collect();
    tables.sort();
    tables.dedup();
    if tables.is_empty() {
        return None;
    }
    let mut key = Vec::new();
    for t in &tables {
        let mut pk_stmt = conn
            .prepare_cached("SELECT name FROM pragma_table_info(?1) WHERE pk > 0 ORDER BY pk")
            .ok()?;
        let pks: Vec<String> = pk_stmt
            .query_map([t], |r| r.get(0))
            .and_then(|it| it.collect())
            .ok()?;
        if pks.is_empty() {
            return None;
        }
        for pk in pks {
            let idx = meta.iter().position(|(tt, o)| {
                tt.as_deref() == Some(t.as_str())
                    && o.as_deref().is_some_and(|o| o.eq_ignore_ascii_case(&pk))
            })?;
            key.push(idx);
        }
    }
    Some(key)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn rows(items: &[(&str, &str)]) -> Vec<(String, String)> {
        items
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn diff_inserts_updates_deletes() {
        let mut r = Rows::new();
        let (c, next) = diff(&r, rows(&[("a", "[1]"), ("b", "[2]")]), 1);
        assert_eq!(
            c.iter().map(|c| (c.kind, c.rowid)).collect::<Vec<_>>(),
            vec![("insert", 1), ("insert", 2)]
        );
        assert_eq!(next, 3);
        apply(&mut r, c);
        let (c, next) = diff(&r, rows(&[("b", "[3]"), ("c", "[4]")]), next);
        assert_eq!(
            c.iter().map(|c| (c.kind, c.rowid)).collect::<Vec<_>>(),
            vec![("update", 2), ("insert", 3), ("delete", 1)]
        );
        assert_eq!(next, 4);
        apply(&mut r, c);
        let (c, _) = diff(&r, rows(&[("b", "[3]"), ("c", "[4]")]), next);
        assert!(c.is_empty());
    }

    #[test]
    fn diff_of_touched_keys_leaves_the_other_rows_alone() {
        let mut r = Rows::new();
        let (c, next) = diff(&r, rows(&[("a", "[1]"), ("b", "[2]"), ("c", "[3]")]), 1);
        apply(&mut r, c);
        // "a" left the filter, "b" changed, "d" entered; "c" was not touched.
        let touched = ["a".to_string(), "b".to_string(), "d".to_string()];
        let (c, next) = diff_keys(&r, &touched, rows(&[("b", "[9]"), ("d", "[4]")]), next);
        assert_eq!(
            c.iter().map(|c| (c.kind, c.rowid)).collect::<Vec<_>>(),
            vec![("update", 2), ("insert", 4), ("delete", 1)]
        );
        assert_eq!(next, 5);
        apply(&mut r, c);
        assert_eq!(r.len(), 3);
        assert_eq!(r["c"], (3, "[3]".to_string()));
    }
}
