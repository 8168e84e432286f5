//! Making tables replicated and plain again, and schema changes between
//! `crsql_begin_alter` and `crsql_commit_alter`.
//!
//! Every entry point runs in a savepoint: on error nothing it did remains.

use crate::error::{Error, Result};
use crate::merge::MAX_CLOCK;
use crate::schema::{self, clock_table, inspect, literal, quote, TableInfo, MARK};
use crate::sqlite::{Conn, Value};
use crate::state;
use crate::triggers::{self, CL, DBV, S_DBV, S_OV, S_SITE};

/// `crsql_as_crr`: creates the clock, installs triggers, backfills clocks for existing rows.
/// Run again on a replicated table it repairs: regenerates triggers, adopts added
/// columns, and records rows written while no trigger saw them.
pub fn as_crr(conn: Conn, table: &str) -> Result<()> {
    state::ensure(conn)?;
    state::savepoint(conn, "patina_as_crr", || {
        let info = inspect(conn, table)?;
        if schema::is_replicated(conn, table)? {
            migrate_clock(conn, &info)?;
        } else {
            conn.exec(&triggers::create_clock(&info))?;
        }
        install_triggers_for(conn, &info)?;
        reconcile(conn, &info)
    })
}

/// `crsql_as_table`: drops triggers and clocks; the table's rows stay as they are.
pub fn as_table(conn: Conn, table: &str) -> Result<()> {
    if !schema::is_replicated(conn, table)? {
        return Err(Error::NotReplicated(table.to_string()));
    }
    state::savepoint(conn, "patina_as_table", || {
        drop_all_triggers(conn, table)?;
        conn.exec(&format!("DROP TABLE {}", quote(&clock_table(table))))
    })
}

/// `crsql_begin_alter`: drops the triggers so `ALTER TABLE` may drop or rename columns
/// they mention. Writes between this and `crsql_commit_alter` are recorded at commit only
/// as far as `reconcile` can see them (inserted and deleted rows, not updates).
pub fn begin_alter(conn: Conn, table: &str) -> Result<()> {
    if !schema::is_replicated(conn, table)? {
        return Err(Error::NotReplicated(table.to_string()));
    }
    drop_all_triggers(conn, table)
}

/// `crsql_commit_alter`: adopts the table's new columns without touching existing rows
/// (an added column has no clock until it is written, so no change per row is emitted),
/// drops clocks of dropped columns, and reinstalls the triggers.
pub fn commit_alter(conn: Conn, table: &str) -> Result<()> {
    if !schema::is_replicated(conn, table)? {
        return Err(Error::NotReplicated(table.to_string()));
    }
    state::savepoint(conn, "patina_commit_alter", || {
        let info = inspect(conn, table)?;
        migrate_clock(conn, &info)?;
        install_triggers_for(conn, &info)?;
        reconcile(conn, &info)
    })
}

/// Regenerates the triggers of a replicated table (after a site id change, a migration).
pub(crate) fn install_triggers(conn: Conn, table: &str) -> Result<()> {
    let info = inspect(conn, table)?;
    install_triggers_for(conn, &info)
}

fn install_triggers_for(conn: Conn, info: &TableInfo) -> Result<()> {
    let site = state::local_site(conn)?;
    drop_all_triggers(conn, &info.name)?;
    conn.exec(&triggers::create_triggers(info, site))
}

/// Drops every patina trigger on `table`, whatever columns it had when they were made.
fn drop_all_triggers(conn: Conn, table: &str) -> Result<()> {
    let prefix = format!("{table}{MARK}_");
    let mut s = conn
        .prepare("SELECT name FROM main.sqlite_schema WHERE type = 'trigger' AND tbl_name = ?1")?;
    let names: Vec<String> = s
        .query_map(&[Value::Text(table.as_bytes().to_vec())], |r| {
            match r.column(0) {
                Value::Text(b) => String::from_utf8_lossy(&b).into_owned(),
                _ => String::new(),
            }
        })?
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect();
    drop(s);
    conn.exec(&triggers::drop_triggers(&names))
}

/// The clock table's key columns and replicated columns, read from its own schema.
fn clock_layout(conn: Conn, table: &str) -> Result<(Vec<String>, Vec<String>)> {
    let mut s = conn.prepare(&format!(
        "SELECT name FROM pragma_table_info({})",
        literal(&clock_table(table))
    ))?;
    let names = s.query_map(&[], |r| match r.column(0) {
        Value::Text(b) => String::from_utf8_lossy(&b).into_owned(),
        _ => String::new(),
    })?;
    let suffix = format!("{MARK}_v");
    let keys = names
        .iter()
        .filter(|n| !n.contains(MARK))
        .cloned()
        .collect();
    let cols = names
        .iter()
        .filter_map(|n| n.strip_suffix(&suffix))
        .map(str::to_string)
        .collect();
    Ok((keys, cols))
}

fn migrate_clock(conn: Conn, info: &TableInfo) -> Result<()> {
    let (keys, cols) = clock_layout(conn, &info.name)?;
    let want_keys: Vec<&str> = info.pk.iter().map(|c| c.name.as_str()).collect();
    if keys
        .iter()
        .map(String::as_str)
        .ne(want_keys.iter().copied())
    {
        return Err(Error::Schema {
            table: info.name.clone(),
            reason: format!(
                "its primary key changed from ({}) to ({}); changing the key of a replicated table is not supported \
                 in place: copy the rows to a new table, or run crsql_as_table, rebuild, and crsql_as_crr again",
                keys.join(", "),
                want_keys.join(", ")
            ),
        });
    }
    let clock = quote(&clock_table(&info.name));
    for c in &info.columns {
        if !cols.iter().any(|x| x == &c.name) {
            for def in triggers::col_clock_defs(&c.name) {
                conn.exec(&format!("ALTER TABLE {clock} ADD COLUMN {def}"))?;
            }
        }
    }
    for old in &cols {
        if !info.columns.iter().any(|c| &c.name == old) {
            for col in triggers::col_clock(old) {
                conn.exec(&format!("ALTER TABLE {clock} DROP COLUMN {}", quote(&col)))?;
            }
        }
    }
    Ok(())
}

/// Gives clocks to rows that have none (existing rows at `as_crr`, rows written while the
/// triggers were off) and records deletes nobody saw. Each gets fresh change numbers.
fn reconcile(conn: Conn, info: &TableInfo) -> Result<()> {
    let site = state::local_site(conn)?;
    let n = info.columns.len() as i64;
    // As the insert trigger numbers a first life: the columns carry the row; only a
    // key-only table records the row's own clock.
    let per_row = n.max(1);
    let clock = quote(&clock_table(&info.name));
    let table = quote(&info.name);
    let key_match = |a: &str, b: &str| triggers::pk_match(info, a, b);
    let names = triggers::clock_columns(info);
    let own = if n == 0 {
        ["s.db_version + b.r".to_string(), site.to_string()]
    } else {
        ["NULL".to_string(), "NULL".to_string()]
    };
    let mut values = vec![
        triggers::pk_list(info, "b."),
        "1".into(),
        format!("s.db_version + b.r * {per_row}"),
    ];
    values.extend(own);
    values.push(if n == 0 {
        "s.origin_version + b.r".into()
    } else {
        "NULL".into()
    });
    for i in 0..info.columns.len() {
        values.extend([
            "1".into(),
            format!("s.db_version + (b.r - 1) * {per_row} + {}", i + 1),
            site.to_string(),
            format!("s.origin_version + (b.r - 1) * {per_row} + {}", i + 1),
        ]);
    }
    conn.exec(&format!(
        "INSERT INTO {clock} ({names}) SELECT {values} FROM \
         (SELECT {pk}, row_number() OVER (ORDER BY {pk}) AS r FROM {table} AS b0 \
          WHERE NOT EXISTS (SELECT 1 FROM {clock} AS k WHERE {m})) AS b, patina_state AS s WHERE s.id = 0",
        names = names.join(", "),
        values = values.join(", "),
        pk = triggers::pk_list(info, ""),
        m = key_match("k", "b0"),
    ))?;
    let added = conn.query_i64("SELECT changes()")?.unwrap_or(0);
    if added > 0 {
        conn.exec(&format!(
            "UPDATE patina_state SET db_version = db_version + {k}, origin_version = origin_version + {k} WHERE id = 0",
            k = added * per_row
        ))?;
    }
    // Rows the clock thinks alive but the table no longer has: record their delete (a row
    // at the causal length limit stays as it is, as its delete trigger would refuse).
    conn.exec(&format!(
        "UPDATE {clock} SET {CL} = {CL} + 1, {DBV} = s.db_version + d.r, {S_DBV} = s.db_version + d.r, \
         {S_SITE} = {site}, {S_OV} = s.origin_version + d.r \
         FROM (SELECT {kpk}, row_number() OVER (ORDER BY {kpk}) AS r FROM {clock} AS k \
               WHERE k.{CL} % 2 = 1 AND k.{CL} < {MAX_CLOCK} AND NOT EXISTS (SELECT 1 FROM {table} AS b WHERE {m})) AS d, patina_state AS s \
         WHERE s.id = 0 AND {dm}",
        kpk = triggers::pk_list(info, "k."),
        m = key_match("b", "k"),
        dm = key_match(&clock, "d"),
    ))?;
    let deleted = conn.query_i64("SELECT changes()")?.unwrap_or(0);
    if deleted > 0 {
        conn.exec(&format!(
            "UPDATE patina_state SET db_version = db_version + {deleted}, origin_version = origin_version + {deleted} WHERE id = 0"
        ))?;
    }
    // Living rows that nothing in the feed carries any more: no column clock in this life
    // and the row's own clock open (a `DROP COLUMN` took the columns that carried them).
    // They get their own clock now, or a fresh replica would never learn of them.
    let no_column: String = info
        .columns
        .iter()
        .map(|c| format!(" AND k.{} = 0", quote(&triggers::col_clock(&c.name)[0])))
        .collect();
    conn.exec(&format!(
        "UPDATE {clock} SET {DBV} = s.db_version + d.r, {S_DBV} = s.db_version + d.r, \
         {S_SITE} = {site}, {S_OV} = s.origin_version + d.r \
         FROM (SELECT {kpk}, row_number() OVER (ORDER BY {kpk}) AS r FROM {clock} AS k \
               WHERE k.{CL} % 2 = 1 AND k.{S_SITE} IS NULL{no_column}) AS d, patina_state AS s \
         WHERE s.id = 0 AND {dm}",
        kpk = triggers::pk_list(info, "k."),
        dm = key_match(&clock, "d"),
    ))?;
    let carried = conn.query_i64("SELECT changes()")?.unwrap_or(0);
    if carried > 0 {
        conn.exec(&format!(
            "UPDATE patina_state SET db_version = db_version + {carried}, origin_version = origin_version + {carried} WHERE id = 0"
        ))?;
    }
    Ok(())
}

/// Gives the database a fresh random site id. Past local changes keep their credit to the
/// old id (they point at its ordinal); new ones use the new ordinal, baked into the
/// triggers, which are regenerated.
pub fn new_site_id(conn: Conn) -> Result<Vec<u8>> {
    state::ensure(conn)?;
    state::savepoint(conn, "patina_new_site", || {
        // The old id becomes an origin like any other: what it numbered stays held, and the
        // new id starts its own numbering at 1.
        let old = state::site_id(conn)?;
        let head = state::origin_version(conn)?;
        let site: [u8; 16] = rand::random();
        let ord = state::site_ordinal_insert(conn, &site)?;
        let mut s = conn.prepare(
            "UPDATE patina_state SET site_id = ?1, local_site = ?2, origin_version = 0 WHERE id = 0",
        )?;
        s.execute(&[Value::Blob(site.to_vec()), Value::Integer(ord)])?;
        drop(s);
        // Recorded once the old id is no longer this site's (its own are never stored).
        crate::origins::record(conn, &old, &crate::ranges::RangeSet::from_range(1, head))?;
        for table in schema::replicated_tables(conn)? {
            install_triggers(conn, &table)?;
        }
        Ok(site.to_vec())
    })
}
