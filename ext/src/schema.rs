//! What patina needs to know about a table, read from SQLite's own pragmas, and the rules
//! a table must meet to be replicated (DESIGN §1 "Schema rules").

use crate::error::{Error, Result};
use crate::sqlite::{column_collation, Conn, Value};

/// Suffix of every object patina adds for a table (`t__patina_clock`, triggers, index).
pub const MARK: &str = "__patina";

/// One column of a replicated table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    /// Declared type, copied onto the clock table's key columns so lookups keep the
    /// same affinity (otherwise the triggers' lookups scan).
    pub decl_type: String,
    /// Non-BINARY collation, copied for the same reason.
    pub collation: Option<String>,
}

/// A table's primary key and replicated (non-key) columns, in declaration order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableInfo {
    pub name: String,
    pub pk: Vec<Column>,
    pub columns: Vec<Column>,
    /// The key is a single `INTEGER PRIMARY KEY` (a rowid alias): the clock table can be
    /// keyed by rowid too.
    pub integer_pk: bool,
}

/// Quotes an identifier for SQL text.
pub fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quotes a string literal for SQL text.
pub fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

pub fn clock_table(table: &str) -> String {
    format!("{table}{MARK}_clock")
}

fn text(v: &Value) -> String {
    match v {
        Value::Text(b) | Value::Blob(b) => String::from_utf8_lossy(b).into_owned(),
        Value::Integer(i) => i.to_string(),
        Value::Real(f) => f.to_string(),
        Value::Null => String::new(),
    }
}

/// True when `table` exists in the main schema as an ordinary table.
pub fn table_exists(conn: Conn, table: &str) -> Result<bool> {
    Ok(conn
        .query_value(
            "SELECT 1 FROM main.sqlite_schema WHERE type = 'table' AND name = ?1",
            &[Value::Text(table.as_bytes().to_vec())],
        )?
        .is_some())
}

/// True when `table` has been made replicated (its clock table exists).
pub fn is_replicated(conn: Conn, table: &str) -> Result<bool> {
    table_exists(conn, &clock_table(table))
}

/// Every replicated table of the main schema, by name.
pub fn replicated_tables(conn: Conn) -> Result<Vec<String>> {
    let suffix = format!("{MARK}_clock");
    let mut s = conn.prepare("SELECT name FROM main.sqlite_schema WHERE type = 'table' AND name LIKE '%' || ?1 ORDER BY name")?;
    let names = s.query_map(&[Value::Text(suffix.as_bytes().to_vec())], |r| {
        text(&r.column(0))
    })?;
    Ok(names
        .into_iter()
        .filter_map(|n| n.strip_suffix(&suffix).map(str::to_string))
        .filter(|base| !base.is_empty())
        .collect())
}

/// Reads a table's columns and checks the replication rules; every refusal names the
/// table and the offending column or index.
pub fn inspect(conn: Conn, table: &str) -> Result<TableInfo> {
    let refuse = |reason: String| Error::Schema {
        table: table.to_string(),
        reason,
    };
    if table.contains(MARK)
        || table.starts_with("patina_")
        || table.starts_with("sqlite_")
        || table.starts_with("crsql_")
    {
        return Err(refuse(
            "names with '__patina' or the prefixes 'patina_', 'sqlite_', 'crsql_' are reserved"
                .into(),
        ));
    }
    if !table_exists(conn, table)? {
        return Err(refuse("no such table in the main schema".into()));
    }
    // table_xinfo: cid, name, type, notnull, dflt_value, pk, hidden
    let mut s = conn.prepare(&format!(
        "SELECT name, type, \"notnull\", dflt_value, pk, hidden FROM pragma_table_xinfo({})",
        literal(table)
    ))?;
    let rows = s.query_map(&[], |r| {
        (
            text(&r.column(0)),
            text(&r.column(1)),
            r.column_i64(2) != 0,
            !r.column_is_null(3),
            r.column_i64(4),
            r.column_i64(5),
        )
    })?;
    let mut pk: Vec<(i64, Column)> = Vec::new();
    let mut columns = Vec::new();
    for (name, decl_type, not_null, has_default, pk_pos, hidden) in rows {
        if name.contains(MARK) {
            return Err(refuse(format!(
                "column '{name}': names containing '{MARK}' are reserved for patina"
            )));
        }
        if hidden == 2 || hidden == 3 {
            continue; // generated columns are computed on every replica, not replicated
        }
        let col = Column {
            collation: column_collation(conn, table, &name),
            name: name.clone(),
            decl_type,
        };
        if pk_pos > 0 {
            if !not_null {
                return Err(refuse(format!(
                    "primary key column '{name}' must be declared NOT NULL (a NULL or auto-assigned key would collide across replicas)"
                )));
            }
            pk.push((pk_pos, col));
        } else {
            if not_null && !has_default {
                return Err(refuse(format!(
                    "column '{name}' is NOT NULL without a DEFAULT; a replica may learn of a row before its value arrives, so give it a DEFAULT"
                )));
            }
            columns.push(col);
        }
    }
    if pk.is_empty() {
        return Err(refuse(
            "it has no PRIMARY KEY; replicated rows are identified by their primary key".into(),
        ));
    }
    pk.sort_by_key(|(pos, _)| *pos);
    let pk: Vec<Column> = pk.into_iter().map(|(_, c)| c).collect();
    if pk.len() + columns.len() > 2000 {
        return Err(refuse("too many columns".into()));
    }

    let mut s = conn.prepare(&format!(
        "SELECT name, \"unique\", origin FROM pragma_index_list({})",
        literal(table)
    ))?;
    for (index, unique, origin) in s.query_map(&[], |r| {
        (text(&r.column(0)), r.column_i64(1) != 0, text(&r.column(2)))
    })? {
        if unique && origin != "pk" {
            return Err(refuse(format!(
                "unique index '{index}': uniqueness cannot be kept across replicas that accept writes independently; drop it or make it non-unique"
            )));
        }
    }
    let mut s = conn.prepare(&format!(
        "SELECT \"from\", \"table\" FROM pragma_foreign_key_list({})",
        literal(table)
    ))?;
    if let Some((from, parent)) = s
        .query_map(&[], |r| (text(&r.column(0)), text(&r.column(1))))?
        .into_iter()
        .next()
    {
        return Err(refuse(format!(
            "column '{from}' has a FOREIGN KEY to '{parent}'; replicas merge independently so it cannot be checked; remove the constraint"
        )));
    }

    let integer_pk = pk.len() == 1 && pk[0].decl_type.eq_ignore_ascii_case("INTEGER") && {
        // A rowid alias: the table is a rowid table and the key is its INTEGER PRIMARY KEY.
        let without_rowid = conn
            .query_value(
                "SELECT 1 FROM main.sqlite_schema WHERE name = ?1 AND sql LIKE '%WITHOUT%ROWID%'",
                &[Value::Text(table.as_bytes().to_vec())],
            )?
            .is_some();
        !without_rowid
    };
    Ok(TableInfo {
        name: table.to_string(),
        pk,
        columns,
        integer_pk,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(quote("a\"b"), "\"a\"\"b\"");
        assert_eq!(literal("it's"), "'it''s'");
        assert_eq!(clock_table("t"), "t__patina_clock");
    }
}
