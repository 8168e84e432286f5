//! A subscription's rows: running its query into (key, values as JSON text) pairs, the
//! diff against the previous result, and which result columns form a row's key. Pure
//! but for the statement it steps; the engine (`sub_engine`) owns state and persistence.

use std::collections::HashMap;

use rusqlite::{Connection, Statement};
use serde_json::Value as Json;

use super::authorizer::AuthState;
use super::error::HttpError;
use super::json_values::{add_json_len, value_to_json};
use super::pool::Limits;

/// One change of a subscription's result.
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
    let sql = |e| super::exec::sql_error(e, auth);
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

/// Compares the old rows with a new result: the changes, the new rows, the next row id.
pub fn diff(
    old: &HashMap<String, (i64, String)>,
    new: Vec<(String, String)>,
    mut next_rowid: i64,
) -> (Vec<Change>, HashMap<String, (i64, String)>, i64) {
    let mut changes = Vec::new();
    let mut rows = HashMap::with_capacity(new.len());
    for (key, vals) in new {
        match old.get(&key) {
            Some((rowid, old_vals)) => {
                if *old_vals != vals {
                    changes.push(Change {
                        kind: "update",
                        rowid: *rowid,
                        key: key.clone(),
                        vals: vals.clone(),
                    });
                }
                rows.insert(key, (*rowid, vals));
            }
            None => {
                let rowid = next_rowid;
                next_rowid += 1;
                changes.push(Change {
                    kind: "insert",
                    rowid,
                    key: key.clone(),
                    vals: vals.clone(),
                });
                rows.insert(key, (rowid, vals));
            }
        }
    }
    let mut gone: Vec<(&String, &(i64, String))> =
        old.iter().filter(|(k, _)| !rows.contains_key(*k)).collect();
    gone.sort_by_key(|(_, (rowid, _))| *rowid);
    for (key, (rowid, vals)) in gone {
        changes.push(Change {
            kind: "delete",
            rowid: *rowid,
            key: key.clone(),
            vals: vals.clone(),
        });
    }
    (changes, rows, next_rowid)
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
        let (c, r, next) = diff(&HashMap::new(), rows(&[("a", "[1]"), ("b", "[2]")]), 1);
        assert_eq!(
            c.iter().map(|c| (c.kind, c.rowid)).collect::<Vec<_>>(),
            vec![("insert", 1), ("insert", 2)]
        );
        assert_eq!(next, 3);
        let (c, r2, next) = diff(&r, rows(&[("b", "[3]"), ("c", "[4]")]), next);
        assert_eq!(
            c.iter().map(|c| (c.kind, c.rowid)).collect::<Vec<_>>(),
            vec![("update", 2), ("insert", 3), ("delete", 1)]
        );
        assert_eq!(next, 4);
        let (c, _, _) = diff(&r2, rows(&[("b", "[3]"), ("c", "[4]")]), next);
        assert!(c.is_empty());
    }
}
