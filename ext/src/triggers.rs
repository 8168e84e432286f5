//! SQL generation: the clock table of a replicated table and the plain-SQL AFTER triggers
//! that keep it.
//!
//! The triggers call no extension function, so a connection that never loaded patina
//! still records its writes. They take change numbers from the one-row `patina_state`
//! counter inside the writing transaction (gap-free, commit-ordered), and do nothing while
//! `patina_state.merging` marks a merge's own write (see `capturing`). The same UPDATE
//! advances `patina_state.origin_version` by the same amount: this site's own numbering,
//! which merges never consume, so an origin's versions have no holes made by merges.
//!
//! Clock layout, one row per base row: the key columns (same names, types, collations),
//! then `__patina_cl` (causal length), `__patina_dbv` (newest change number in the row,
//! indexed: the feed's range scan), the row's own clock (`__patina_s_*`: the change that
//! set `cl`), and per replicated column `<col>__patina_{v,dbv,site,ov}`: its version in this
//! life, change number, credited site (ordinal in `patina_sites`) and origin's number
//! (NULL only in clocks written before the origin counter existed: then it equals the
//! change number, which is what those changes were numbered by their origin).

use crate::merge::MAX_CLOCK;
use crate::schema::{clock_table, literal, quote, Column, TableInfo, MARK};

pub const CL: &str = "__patina_cl";
pub const DBV: &str = "__patina_dbv";
pub const S_DBV: &str = "__patina_s_dbv";
pub const S_SITE: &str = "__patina_s_site";
pub const S_OV: &str = "__patina_s_ov";

/// The four clock columns of replicated column `col`: version, change number, site, origin number.
pub fn col_clock(col: &str) -> [String; 4] {
    ["v", "dbv", "site", "ov"].map(|s| format!("{col}{MARK}_{s}"))
}

/// The row-level triggers; per-column update triggers are `<table>__patina_upd_<i>`.
pub fn trigger_names(table: &str) -> [String; 3] {
    ["ins", "updpk", "del"].map(|s| format!("{table}{MARK}_{s}"))
}

pub fn index_name(table: &str) -> String {
    format!("{table}{MARK}_dbv")
}

fn key_decl(c: &Column) -> String {
    let mut s = quote(&c.name);
    if !c.decl_type.is_empty() {
        s.push(' ');
        s.push_str(&c.decl_type);
    }
    if let Some(coll) = &c.collation {
        s.push_str(" COLLATE ");
        s.push_str(&quote(coll));
    }
    s.push_str(" NOT NULL");
    s
}

/// The clock column definitions of one replicated column (also used by ALTER ADD COLUMN).
pub fn col_clock_defs(col: &str) -> [String; 4] {
    let [v, dbv, site, ov] = col_clock(col);
    [
        format!("{} INTEGER NOT NULL DEFAULT 0", quote(&v)),
        format!("{} INTEGER", quote(&dbv)),
        format!("{} INTEGER", quote(&site)),
        format!("{} INTEGER", quote(&ov)),
    ]
}

/// `CREATE TABLE` + index for the clock of `t`.
pub fn create_clock(t: &TableInfo) -> String {
    let mut cols: Vec<String> = Vec::new();
    if t.integer_pk {
        cols.push(format!(
            "{} INTEGER PRIMARY KEY NOT NULL",
            quote(&t.pk[0].name)
        ));
    } else {
        cols.extend(t.pk.iter().map(key_decl));
    }
    cols.push(format!("{CL} INTEGER NOT NULL"));
    cols.push(format!("{DBV} INTEGER NOT NULL"));
    cols.push(format!("{S_DBV} INTEGER"));
    cols.push(format!("{S_SITE} INTEGER"));
    cols.push(format!("{S_OV} INTEGER"));
    for c in &t.columns {
        cols.extend(col_clock_defs(&c.name));
    }
    let tail = if t.integer_pk {
        ")".to_string()
    } else {
        format!(", PRIMARY KEY ({})) WITHOUT ROWID", pk_list(t, ""))
    };
    format!(
        "CREATE TABLE {clock} ({cols}{tail};\nCREATE INDEX {idx} ON {clock} ({DBV});",
        clock = quote(&clock_table(&t.name)),
        cols = cols.join(", "),
        idx = quote(&index_name(&t.name)),
    )
}

/// `"p1", "p2"` with an optional `prefix.` on each.
pub fn pk_list(t: &TableInfo, prefix: &str) -> String {
    t.pk.iter()
        .map(|c| format!("{prefix}{}", quote(&c.name)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `alias."p1" = ?first AND alias."p2" = ?first+1 ...`: a key bound as parameters.
pub fn pk_params(t: &TableInfo, alias: &str, first: usize) -> String {
    t.pk.iter()
        .enumerate()
        .map(|(i, c)| format!("{alias}.{} = ?{}", quote(&c.name), first + i))
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// `clock."p1" = SRC."p1" AND ...`
pub fn pk_match(t: &TableInfo, left: &str, src: &str) -> String {
    t.pk.iter()
        .map(|c| format!("{left}.{q} = {src}.{q}", q = quote(&c.name)))
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// Every clock column in layout order, quoted: the key, the row's own clock, then each
/// replicated column's four.
pub fn clock_columns(t: &TableInfo) -> Vec<String> {
    let mut names = vec![
        pk_list(t, ""),
        CL.into(),
        DBV.into(),
        S_DBV.into(),
        S_SITE.into(),
        S_OV.into(),
    ];
    for c in &t.columns {
        names.extend(col_clock(&c.name).map(|x| quote(&x)));
    }
    names
}

/// `cl` advanced by `step`, or the write refused: a causal length never passes
/// `MAX_CLOCK` (merges refuse larger ones, so every replica accepts what a trigger writes).
/// `cl` is at most `MAX_CLOCK` here, so the sum cannot overflow.
fn next_cl(t: &TableInfo, step: &str) -> String {
    let msg = literal(&format!(
        "patina: a row of table '{}' has reached the causal length limit ({MAX_CLOCK}); it can no longer be deleted or re-inserted",
        t.name
    ));
    format!("CASE WHEN {CL} + {step} > {MAX_CLOCK} THEN RAISE(ABORT, {msg}) ELSE {CL} + {step} END")
}

/// True while writes are captured: no merge is writing. `merging` is 0 outside merges, 1
/// for a whole batched merge, and during a one-by-one merge's base write a mark equal to
/// the merging connection's `total_changes() + 2`: that connection's next completed
/// statement makes the mark stale (so nothing has to clear it per change), and other
/// connections never see it (it is cleared before commit). `total_changes()` is SQLite's
/// own function, so the triggers still call nothing of the extension.
fn capturing(alias: &str) -> String {
    format!(
        "({alias}merging = 0 OR ({alias}merging > 1 AND {alias}merging <> total_changes() + 2))"
    )
}

/// Records an insert (or resurrection) of the row `src` (NEW): `n + 1` numbers, the
/// row's own clock first, then each column's.
///
/// The feed's shape is cr-sqlite's, decided here, per row, as it is written: a first life
/// of a row with columns is carried by its column changes alone (they hold `cl` and create
/// the row on merge), so its row clock stays open and its number is used by no change
/// (like a superseded change's). A resurrection (the clock row exists, so `cl` passes 1)
/// or a key-only table records the row's own clock (the `cid = '-1'` change) with
/// that number. Reserving the number either way keeps the trigger free of a lookup of the
/// clock row, which measured 1.5-2x the whole insert cost.
///
/// The origin numbering reserves nothing: it advances by `n` (1 for a key-only table), and
/// a resurrection's row clock carries the same origin number as its first column change
/// (an origin version names the changes that carry it, like cr-sqlite's `db_version`
/// names a transaction's). So an origin's inserts leave no hole that a peer receiving
/// all of its changes would see as a gap; only superseded changes do.
fn insert_body(t: &TableInfo, src: &str, site: i64) -> String {
    let n = t.columns.len();
    let clock = quote(&clock_table(&t.name));
    let names = clock_columns(t);
    let own_clock: [String; 3] = if n == 0 {
        [
            "s.db_version".into(),
            site.to_string(),
            "s.origin_version".into(),
        ]
    } else {
        ["NULL".into(), "NULL".into(), "NULL".into()]
    };
    // A row with no clock row starts its first life above every tombstone collected
    // here, so it outranks a tombstone of the same key a peer still keeps.
    let mut values = vec![
        pk_list(t, &format!("{src}.")),
        "s.cl_floor + 1".into(),
        "s.db_version".into(),
    ];
    values.extend(own_clock);
    let mut sets = vec![
        format!("{CL} = {}", next_cl(t, &format!("1 + ({CL} % 2)"))),
        format!("{DBV} = excluded.{DBV}"),
        format!("{S_DBV} = excluded.{DBV} - {n}"),
        format!("{S_SITE} = {site}"),
        // A resurrection's row clock shares the first column's origin number (see the
        // function's doc), so the origin counter needs no lookup to know the case.
        if n == 0 {
            format!("{S_OV} = excluded.{S_OV}")
        } else {
            format!(
                "{S_OV} = excluded.{}",
                quote(&col_clock(&t.columns[0].name)[3])
            )
        },
    ];
    for (i, c) in t.columns.iter().enumerate() {
        let [v, dbv, s, ov] = col_clock(&c.name).map(|x| quote(&x));
        values.extend([
            "1".into(),
            format!("s.db_version - {}", n - 1 - i),
            site.to_string(),
            format!("s.origin_version - {}", n - 1 - i),
        ]);
        sets.extend([
            format!("{v} = 1"),
            format!("{dbv} = excluded.{dbv}"),
            format!("{s} = {site}"),
            format!("{ov} = excluded.{ov}"),
        ]);
    }
    format!(
        "UPDATE patina_state SET db_version = db_version + {k}, origin_version = origin_version + {ko} \
         WHERE id = 0 AND {capturing};\n\
         INSERT INTO {clock} ({names}) SELECT {values} FROM patina_state AS s WHERE s.id = 0 AND {s_capturing}\n\
         ON CONFLICT ({pk}) DO UPDATE SET {sets};\n",
        k = n + 1,
        ko = n.max(1),
        capturing = capturing(""),
        s_capturing = capturing("s."),
        names = names.join(", "),
        values = values.join(", "),
        pk = pk_list(t, ""),
        sets = sets.join(", "),
    )
}

/// Records a delete of the row `src` (OLD): one number; a clock row is created when the
/// row was never seen (written while triggers were off), so the delete still travels.
fn delete_body(t: &TableInfo, src: &str, site: i64) -> String {
    let clock = quote(&clock_table(&t.name));
    format!(
        "UPDATE patina_state SET db_version = db_version + 1, origin_version = origin_version + 1 \
         WHERE id = 0 AND {capturing};\n\
         INSERT INTO {clock} ({pk}, {CL}, {DBV}, {S_DBV}, {S_SITE}, {S_OV}) \
         SELECT {src_pk}, s.cl_floor + 2, s.db_version, s.db_version, {site}, s.origin_version FROM patina_state AS s WHERE s.id = 0 AND {s_capturing}\n\
         ON CONFLICT ({pk}) DO UPDATE SET {CL} = {next}, {DBV} = excluded.{DBV}, {S_DBV} = excluded.{S_DBV}, \
         {S_SITE} = {site}, {S_OV} = excluded.{S_OV} WHERE {CL} % 2 = 1;\n",
        pk = pk_list(t, ""),
        src_pk = pk_list(t, &format!("{src}.")),
        next = next_cl(t, "1"),
        capturing = capturing(""),
        s_capturing = capturing("s."),
    )
}

/// The change test of one column: any difference in bytes or storage class (so `1` →
/// `1.0` and 'a' → 'A' under NOCASE are changes).
fn changed(c: &Column) -> String {
    let q = quote(&c.name);
    format!("(NEW.{q} IS NOT OLD.{q} COLLATE BINARY OR typeof(NEW.{q}) <> typeof(OLD.{q}))")
}

/// Records an update of one column that keeps the key: one number. The version stops at
/// `MAX_CLOCK` (reached only through a forged change): the write still happens and ties
/// at the bound resolve by value and site, so replicas still converge. One trigger per
/// column (`AFTER UPDATE OF col`) keeps an update that touches one column of a wide table
/// to two small statements.
fn update_column_trigger(t: &TableInfo, i: usize, site: i64) -> String {
    let c = &t.columns[i];
    let clock = quote(&clock_table(&t.name));
    let [v, dbv, s, ov] = col_clock(&c.name).map(|x| quote(&x));
    let name = quote(&format!("{}{MARK}_upd_{i}", t.name));
    format!(
        "CREATE TRIGGER {name} AFTER UPDATE OF {col} ON {table} \
         WHEN {same} AND {changed} AND (SELECT {capturing} FROM patina_state WHERE id = 0) BEGIN\n\
         UPDATE patina_state SET db_version = db_version + 1, origin_version = origin_version + 1 WHERE id = 0;\n\
         UPDATE {clock} SET {v} = min({v} + 1, {MAX_CLOCK}), \
         ({dbv}, {ov}, {DBV}) = (SELECT db_version, origin_version, db_version FROM patina_state WHERE id = 0), \
         {s} = {site} \
         WHERE {matches} AND {CL} % 2 = 1;\n\
         END;\n",
        col = quote(&c.name),
        table = quote(&t.name),
        same = same_key(t),
        changed = changed(c),
        capturing = capturing(""),
        matches = pk_match(t, &clock, "NEW"),
    )
}

fn same_key(t: &TableInfo) -> String {
    t.pk.iter()
        .map(|c| format!("NEW.{q} IS OLD.{q}", q = quote(&c.name)))
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// The four triggers; `site` is this database's ordinal in `patina_sites`.
pub fn create_triggers(t: &TableInfo, site: i64) -> String {
    let [ins, updpk, del] = trigger_names(&t.name).map(|n| quote(&n));
    let table = quote(&t.name);
    let mut sql = format!(
        "CREATE TRIGGER {ins} AFTER INSERT ON {table} BEGIN\n{}END;\n\
         CREATE TRIGGER {updpk} AFTER UPDATE ON {table} WHEN NOT ({same}) BEGIN\n{}{}END;\n\
         CREATE TRIGGER {del} AFTER DELETE ON {table} BEGIN\n{}END;\n",
        insert_body(t, "NEW", site),
        delete_body(t, "OLD", site),
        insert_body(t, "NEW", site),
        delete_body(t, "OLD", site),
        same = same_key(t),
    );
    for i in 0..t.columns.len() {
        sql.push_str(&update_column_trigger(t, i, site));
    }
    sql
}

/// Drops the named triggers (missing ones are fine).
pub fn drop_triggers(names: &[String]) -> String {
    names
        .iter()
        .map(|n| format!("DROP TRIGGER IF EXISTS {};\n", quote(n)))
        .collect()
}
