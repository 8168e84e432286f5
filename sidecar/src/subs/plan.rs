//! Which writes concern a subscription, and whether it can be matched incrementally.
//!
//! Both answers come from SQLite, not from parsing the SQL: the authorizer reports, while
//! the query is prepared, every table it reads, every `SELECT` (more than one: a subquery,
//! a compound, a CTE) and every function it calls; `pragma_function_list` says which of
//! those are aggregates or window functions; column metadata says which result columns
//! are the table's primary key; and `EXPLAIN QUERY PLAN` of the keyed query (below) says
//! whether SQLite really reaches each row by its key.
//!
//! A query is **incremental** when it reads one table, has one `SELECT`, calls no
//! aggregate or window function, selects every primary key column of that table
//! unchanged, and its keyed form is planned as a key lookup with nothing materialised
//! (which rules out `LIMIT`, `DISTINCT`, `GROUP BY` and the like: SQLite cannot flatten
//! those into the lookup). Its keyed form is
//!
//! ```sql
//! WITH patina_sub(c0, c1, ...) AS (<the query>)
//! SELECT patina_sub.* FROM temp.patina_sub_keys AS patina_k CROSS JOIN patina_sub
//!  WHERE patina_k.tbl = '<table>' AND patina_sub.c<pk> = patina_k.k0 AND ...
//! ```
//!
//! run with the touched keys of that table in `temp.patina_sub_keys`: the result is the
//! query's rows for exactly those keys (`CROSS JOIN` keeps the keys as the outer loop).
//! Every other query is re-run whole, and only when a table it reads was touched.

use std::collections::BTreeSet;
use std::hash::{Hash, Hasher};

use crate::http::json_values::StatementSpec;
use crate::http::pool::ApiConn;
use crate::http::queries::prepare_readonly;

use super::error::SubError;

/// The widest primary key matched incrementally (columns of `temp.patina_sub_keys`).
pub const MAX_KEY_COLUMNS: usize = 8;

/// The engine's scratch table of touched keys (on its own connection, in `temp`).
pub const KEYS_SCHEMA: &str = "CREATE TEMP TABLE IF NOT EXISTS patina_sub_keys \
    (tbl TEXT NOT NULL, k0, k1, k2, k3, k4, k5, k6, k7)";

/// How a subscription is matched against touched keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Tables the query reads, lower-cased: a write elsewhere never re-runs it (the engine
    /// lower-cases the touched tables, as `crsql_changes` names them, once per round).
    pub tables: BTreeSet<String>,
    /// `Ok`: matched by key; `Err`: re-run whole, and why.
    pub mode: Result<Keyed, &'static str>,
}

/// The keyed form of an incremental query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keyed {
    /// The one table read, lower-cased.
    pub table: String,
    /// The query restricted to the keys in `temp.patina_sub_keys` (see the module doc).
    pub sql: String,
    /// Number of primary key columns.
    pub width: usize,
    /// A hash of `sql`: the engine orders a round's subscriptions by it so that those of
    /// one shape (equal `sql`, other parameters) are next to each other, without comparing
    /// the whole text of every pair.
    pub shape: u64,
}

impl Plan {
    /// A plan for a query that no longer prepares: never re-run by touched keys.
    pub fn none() -> Plan {
        Plan {
            tables: BTreeSet::new(),
            mode: Err("the query does not prepare"),
        }
    }
}

/// Plans `spec` on the engine's connection. `key_cols` are the result columns holding the
/// table's primary key (`diff::key_columns`), `ncols` the number of result columns.
pub fn plan(
    api: &ApiConn,
    spec: &StatementSpec,
    key_cols: Option<&[usize]>,
    ncols: usize,
) -> Result<Plan, SubError> {
    let (prepared, reads) = api
        .auth
        .recording(|| prepare_readonly(&api.conn, &api.auth, spec).map(drop));
    prepared?;
    let tables = reads.tables.clone();
    let full = |why| Plan {
        tables: tables.clone(),
        mode: Err(why),
    };
    if reads.tables.len() != 1 {
        return Ok(full(
            "it reads more than one table (a join, a subquery or a view)",
        ));
    }
    if reads.selects != 1 || reads.recursive {
        return Ok(full("it has a subquery, a compound SELECT or a CTE"));
    }
    for f in &reads.functions {
        let aggregate: bool = api.auth.trusted(|| {
            api.conn.query_row(
                "SELECT EXISTS (SELECT 1 FROM pragma_function_list \
                 WHERE name = ?1 AND type IN ('a', 'w'))",
                [f],
                |r| r.get(0),
            )
        })?;
        if aggregate {
            return Ok(full("it calls an aggregate or window function"));
        }
    }
    let Some(key_cols) = key_cols else {
        return Ok(full(
            "it does not select every primary key column unchanged",
        ));
    };
    if key_cols.is_empty() || key_cols.len() > MAX_KEY_COLUMNS {
        return Ok(full("its table's primary key has more than 8 columns"));
    }
    let table = tables.iter().next().cloned().unwrap_or_default();
    let sql = keyed_sql(&spec.sql, &table, key_cols, ncols);
    let keyed = StatementSpec {
        sql: format!("EXPLAIN QUERY PLAN {sql}"),
        params: spec.params.clone(),
    };
    let pk_names: Vec<String> = api.auth.trusted(|| -> rusqlite::Result<Vec<String>> {
        let mut st = api
            .conn
            .prepare("SELECT name FROM pragma_table_info(?1) WHERE pk > 0 ORDER BY pk")?;
        let names = st.query_map([&table], |r| r.get::<_, String>(0))?;
        names.collect()
    })?;
    let details: Vec<String> = match prepare_readonly(&api.conn, &api.auth, &keyed) {
        Ok(mut st) => {
            let mut rows = st.raw_query();
            let mut out = Vec::new();
            while let Some(r) = rows.next()? {
                out.push(r.get::<_, String>(3)?);
            }
            out
        }
        Err(_) => return Ok(full("its keyed form does not prepare")),
    };
    if !is_key_lookup(&details, &pk_names) {
        return Ok(full(
            "SQLite cannot reach its rows by key (LIMIT, DISTINCT, GROUP BY, ORDER BY with LIMIT, ...)",
        ));
    }
    Ok(Plan {
        tables,
        mode: Ok(Keyed {
            table,
            shape: {
                let mut h = std::hash::DefaultHasher::new();
                sql.hash(&mut h);
                h.finish()
            },
            sql,
            width: key_cols.len(),
        }),
    })
}

/// The keyed form of `sql` (see the module doc).
fn keyed_sql(sql: &str, table: &str, key_cols: &[usize], ncols: usize) -> String {
    let body = sql.trim_end().trim_end_matches(';');
    let cols: Vec<String> = (0..ncols).map(|i| format!("c{i}")).collect();
    let on: Vec<String> = key_cols
        .iter()
        .enumerate()
        .map(|(k, c)| format!("patina_sub.c{c} = patina_k.k{k}"))
        .collect();
    format!(
        "WITH patina_sub({}) AS (\n{body}\n) SELECT patina_sub.* FROM temp.patina_sub_keys \
         AS patina_k CROSS JOIN patina_sub WHERE patina_k.tbl = '{}' AND {}",
        cols.join(", "),
        table.replace('\'', "''"),
        on.join(" AND ")
    )
}

/// Whether a query plan reaches the subscription's table only by its primary key: one
/// `SEARCH` of it on every key column (or the rowid), no `SCAN` of it, nothing
/// materialised. The plan names two tables: the keys (`patina_k`) and the query's own
/// (by its alias, if it has one), so every other name is the query's table.
fn is_key_lookup(details: &[String], pk: &[String]) -> bool {
    let mut searched = false;
    for d in details {
        let lower = d.to_ascii_lowercase();
        if lower.contains("materialize") || lower.contains("co-routine") {
            return false;
        }
        let words: Vec<&str> = lower.split_whitespace().collect();
        let on_table = words.get(1).is_some_and(|w| *w != "patina_k");
        match words.first() {
            Some(&"scan") if on_table => return false,
            Some(&"search") if on_table => {
                let by_rowid = lower.contains("(rowid=?)");
                let by_pk = pk
                    .iter()
                    .all(|c| lower.contains(&format!("{}=?", c.to_ascii_lowercase())));
                if !(by_rowid || by_pk) {
                    return false;
                }
                searched = true;
            }
            _ => {}
        }
    }
    searched
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_sql_wraps_the_query_and_joins_on_every_key_column() {
        let s = keyed_sql("SELECT a, b, v FROM t2 WHERE v > 3;\n", "t2", &[0, 1], 3);
        assert_eq!(
            s,
            "WITH patina_sub(c0, c1, c2) AS (\nSELECT a, b, v FROM t2 WHERE v > 3\n) SELECT \
             patina_sub.* FROM temp.patina_sub_keys AS patina_k CROSS JOIN patina_sub WHERE \
             patina_k.tbl = 't2' AND patina_sub.c0 = patina_k.k0 AND patina_sub.c1 = patina_k.k1"
        );
    }

    #[test]
    fn only_a_search_on_every_key_column_is_a_key_lookup() {
        let pk = ["id".to_string()];
        let ok = [
            "SCAN patina_k".into(),
            "SEARCH machines USING INDEX sqlite_autoindex_machines_1 (id=?)".into(),
        ];
        assert!(is_key_lookup(&ok, &pk));
        let rowid = [
            "SCAN patina_k".into(),
            "SEARCH m USING INTEGER PRIMARY KEY (rowid=?)".into(),
        ];
        assert!(is_key_lookup(&rowid, &pk));
        let by_region = ["SEARCH machines USING INDEX m_region (region=?)".into()];
        assert!(!is_key_lookup(&by_region, &pk));
        let mat = [
            "MATERIALIZE patina_sub".into(),
            "SEARCH machines USING INDEX m_region (region=?)".into(),
        ];
        assert!(!is_key_lookup(&mat, &pk));
        let scan = ["SCAN patina_k".into(), "SCAN machines".into()];
        assert!(!is_key_lookup(&scan, &pk));
    }
}
