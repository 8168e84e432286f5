//! The per-connection merge state both merge paths share: a change as written to
//! `crsql_changes` and its checks, statement caches per table, the cached `patina_state`
//! row, the site-id map and the batched path's queue.
//!
//! `changes_write` (one change at a time) and `changes_batch` (the queue and
//! `patina_batch`, applied grouped by row) both build on this module and decide every
//! change with `merge::plan`; neither imports the other.

use std::collections::HashMap;
use std::rc::Rc;

use crate::error::{Error, Result};
use crate::merge;
use crate::pk;
use crate::schema::{quote, TableInfo};
use crate::sqlite::{Conn, Stmt, Value};
use crate::state::Sites;

/// Changes queued before the queue is applied on its own.
pub(crate) const QUEUE_LIMIT: usize = 4096;

/// A validated change waiting in the batched path's queue.
pub(crate) struct Queued {
    /// Shared by the changes of one table in a batch.
    pub(crate) table: Rc<str>,
    pub(crate) pk: Vec<u8>,
    pub(crate) keys: Vec<Value>,
    /// None: the row's own clock (cid '-1').
    pub(crate) col: Option<usize>,
    pub(crate) val: Value,
    pub(crate) col_version: i64,
    pub(crate) cl: i64,
    pub(crate) site: SiteBytes,
    pub(crate) site_ord: i64,
    pub(crate) origin: i64,
    /// See [`plain_key`]: the grouped path may read and write this row together with
    /// other rows of plain keys.
    pub(crate) plain_key: bool,
}

/// A site id, checked to be 16 bytes.
pub(crate) type SiteBytes = [u8; 16];

/// A change's fields as `crsql_changes` takes them, borrowed (from an [`Incoming`] or
/// straight from a `patina_batch` blob); the value travels beside it.
pub(crate) struct ChangeRef<'a> {
    /// Names are compared as UTF-8; invalid bytes become U+FFFD and match nothing.
    pub(crate) table: std::borrow::Cow<'a, str>,
    pub(crate) pk: &'a [u8],
    pub(crate) cid: std::borrow::Cow<'a, str>,
    pub(crate) col_version: i64,
    pub(crate) db_version: i64,
    pub(crate) site_id: &'a [u8],
    pub(crate) cl: i64,
    pub(crate) origin_version: Option<i64>,
}

/// A change as written to `crsql_changes`.
pub struct Incoming {
    pub table: String,
    pub pk: Vec<u8>,
    pub cid: String,
    pub val: Value,
    pub col_version: i64,
    pub db_version: i64,
    pub site_id: Vec<u8>,
    pub cl: i64,
    pub origin_version: Option<i64>,
}

impl Incoming {
    pub(crate) fn new(c: &ChangeRef<'_>, val: Value) -> Incoming {
        Incoming {
            table: c.table.clone().into_owned(),
            pk: c.pk.to_vec(),
            cid: c.cid.clone().into_owned(),
            val,
            col_version: c.col_version,
            db_version: c.db_version,
            site_id: c.site_id.to_vec(),
            cl: c.cl,
            origin_version: c.origin_version,
        }
    }

    pub(crate) fn fields(&self) -> ChangeRef<'_> {
        ChangeRef {
            table: self.table.as_str().into(),
            pk: &self.pk,
            cid: self.cid.as_str().into(),
            col_version: self.col_version,
            db_version: self.db_version,
            site_id: &self.site_id,
            cl: self.cl,
            origin_version: self.origin_version,
        }
    }
}

/// What [`Merger::check`] learned of a valid change.
pub(crate) struct Checked {
    pub(crate) keys: Vec<Value>,
    /// None: the row's own clock (cid '-1').
    pub(crate) col: Option<usize>,
    /// Replicated columns of the change's table.
    pub(crate) ncols: usize,
    pub(crate) site: SiteBytes,
    pub(crate) site_ord: i64,
    pub(crate) origin: i64,
    pub(crate) plain_key: bool,
}

/// SQLite's type affinity of a declared column type (its rules, in their order).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Affinity {
    Integer,
    Text,
    Blob,
    Real,
    Numeric,
}

fn affinity(decl: &str) -> Affinity {
    let d = decl.to_ascii_uppercase();
    if d.contains("INT") {
        Affinity::Integer
    } else if d.contains("CHAR") || d.contains("CLOB") || d.contains("TEXT") {
        Affinity::Text
    } else if d.contains("BLOB") || d.is_empty() {
        Affinity::Blob
    } else if d.contains("REAL") || d.contains("FLOA") || d.contains("DOUB") {
        Affinity::Real
    } else {
        Affinity::Numeric
    }
}

/// Whether two keys of a table that are both plain are the same row exactly when their
/// packed bytes are equal: every key column compares with BINARY, every value is of a
/// class its column stores unchanged and that compares equal to no value of another class
/// (an integer in an INTEGER or NUMERIC column, text in a TEXT column; in a column without
/// affinity an integer, text or blob, never a real: `1 = 1.0`), and the bytes are the
/// canonical packing (an integer in more bytes than it needs packs the same row
/// differently). Other keys ('a' and 'A' under NOCASE, 1 and '1' in an INTEGER column) can
/// name one row in different bytes, so the grouped path reads and writes them alone.
fn plain_key(key_columns: &[Option<Affinity>], keys: &[Value], canonical: bool) -> bool {
    canonical
        && key_columns.iter().zip(keys).all(|(a, v)| {
            matches!(
                (a, v),
                (
                    Some(Affinity::Integer | Affinity::Numeric),
                    Value::Integer(_)
                ) | (Some(Affinity::Text), Value::Text(_))
                    | (
                        Some(Affinity::Blob),
                        Value::Integer(_) | Value::Text(_) | Value::Blob(_)
                    )
            )
        })
}

/// Per key column, its affinity where it compares with BINARY (None otherwise), for
/// [`plain_key`].
fn key_columns(info: &TableInfo) -> Vec<Option<Affinity>> {
    info.pk
        .iter()
        .map(|c| c.collation.is_none().then(|| affinity(&c.decl_type)))
        .collect()
}

/// A checked change of the per-change path, for the batched path's queue.
pub(crate) fn queued(ch: Incoming, c: Checked) -> Queued {
    Queued::new(Rc::from(ch.table), ch.pk, ch.val, ch.col_version, ch.cl, c)
}

impl Queued {
    fn new(
        table: Rc<str>,
        pk: Vec<u8>,
        val: Value,
        col_version: i64,
        cl: i64,
        c: Checked,
    ) -> Queued {
        Queued {
            table,
            pk,
            keys: c.keys,
            col: c.col,
            val,
            col_version,
            cl,
            site: c.site,
            site_ord: c.site_ord,
            origin: c.origin,
            plain_key: c.plain_key,
        }
    }
}

/// The statements of the grouped path for one table.
#[derive(Default)]
pub(crate) struct BatchStmts {
    /// By number of keys read.
    pub(crate) reads: HashMap<usize, Stmt>,
    /// By number of clock rows written.
    pub(crate) upserts: HashMap<usize, Stmt>,
    pub(crate) delete: Option<Stmt>,
    /// In-place updates, by columns written.
    pub(crate) writes: HashMap<Vec<bool>, Stmt>,
    /// Whole-row writes, by (columns written, number of rows).
    pub(crate) replaces: HashMap<(Vec<bool>, usize), Stmt>,
}

/// Prepared statements of one table, by purpose.
pub(crate) struct TableStmts {
    /// Per column (index n = the sentinel): the local clock + value + base presence of one key.
    pub(crate) read: HashMap<usize, Stmt>,
    pub(crate) set_column: HashMap<usize, Stmt>,
    pub(crate) update_base: HashMap<usize, Stmt>,
    pub(crate) replace_with_column: HashMap<usize, Stmt>,
    pub(crate) set_sentinel: Option<Stmt>,
    pub(crate) new_life: Option<Stmt>,
    /// By column: a new life started by that column's change.
    pub(crate) new_life_with: HashMap<usize, Stmt>,
    pub(crate) insert_base: Option<Stmt>,
    pub(crate) delete_base: Option<Stmt>,
    /// The grouped (batched) path's statements.
    pub(crate) batch: BatchStmts,
    /// Triggers other than patina's are on the table (or on it from the temp schema): a
    /// one-by-one merge marks its base write with a flag, not a token (see
    /// `changes_write`). Read once per transaction, with the rest of this cache.
    pub(crate) other_triggers: bool,
    /// See [`key_columns`].
    key_columns: Vec<Option<Affinity>>,
}

/// Per-connection merge state, kept for one transaction.
#[derive(Default)]
pub(crate) struct Merger {
    pub(crate) tables: HashMap<String, (TableInfo, TableStmts)>,
    pub(crate) state_read: Option<Stmt>,
    pub(crate) state_write: Option<Stmt>,
    pub(crate) flag_write: Option<Stmt>,
    pub(crate) mark_clear: Option<Stmt>,
    /// The per-change path's held origin versions, `(site ordinal, version)`, not yet
    /// written to `patina_origin_ranges` (written, coalesced, at the next flush).
    pub(crate) held: Vec<(i64, i64)>,
    /// A per-change merge left its mark in `patina_state.merging` this transaction: it is
    /// stale for every later statement, but cleared before commit so other connections
    /// only ever see 0.
    pub(crate) token_left: bool,
    /// Whether this database's triggers know the mark (`patina_state.layout` ≥ 2; a
    /// database the extension could not migrate at load keeps older triggers, which
    /// would take any nonzero `merging` as a merge in progress). Read once per transaction.
    pub(crate) triggers_know_mark: Option<bool>,
    /// `patina_state` as of our last read or write, valid while the connection's
    /// `total_changes` has not moved since (nothing else wrote in between).
    pub(crate) state: Option<CachedState>,
    pub(crate) sites: Sites,
    /// The batched path's queue and the savepoints' positions in it and in `held`
    /// (`changes_batch`).
    pub(crate) queue: Vec<Queued>,
    pub(crate) marks: Vec<(i32, usize, usize)>,
    pub(crate) counter_write: Option<Stmt>,
    /// The table name the last checked batch change named (see [`Merger::checked`]).
    pub(crate) last_table: Option<Rc<str>>,
    /// Statements writing `patina_origin_ranges` (both paths).
    pub(crate) ranges: crate::origins::RangeStmts,
}

pub(crate) fn stmt(
    slot: &mut Option<Stmt>,
    conn: Conn,
    sql: impl FnOnce() -> String,
) -> Result<&mut Stmt> {
    if slot.is_none() {
        *slot = Some(conn.prepare(&sql())?);
    }
    slot.as_mut()
        .ok_or_else(|| Error::State("statement cache".into()))
}

/// The statement cached under `k`, prepared from `sql()` the first time.
pub(crate) fn keyed<K: std::hash::Hash + Eq>(
    map: &mut HashMap<K, Stmt>,
    k: K,
    conn: Conn,
    sql: impl FnOnce() -> String,
) -> Result<&mut Stmt> {
    match map.entry(k) {
        std::collections::hash_map::Entry::Occupied(e) => Ok(e.into_mut()),
        std::collections::hash_map::Entry::Vacant(e) => Ok(e.insert(conn.prepare(&sql())?)),
    }
}

pub(crate) fn key_where(t: &TableInfo, first_param: usize) -> String {
    t.pk.iter()
        .enumerate()
        .map(|(i, c)| format!("{} = ?{}", quote(&c.name), first_param + i))
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// True when a trigger not made by patina is on `table`, in the main or temp schema.
fn other_triggers(conn: Conn, table: &str) -> Result<bool> {
    let prefix = format!("{table}{}_", crate::schema::MARK);
    Ok(conn
        .query_value(
            "SELECT 1 FROM (SELECT name, tbl_name FROM main.sqlite_schema WHERE type = 'trigger' \
             UNION ALL SELECT name, tbl_name FROM temp.sqlite_schema WHERE type = 'trigger') \
             WHERE tbl_name = ?1 AND substr(name, 1, length(?2)) <> ?2 LIMIT 1",
            &[
                Value::Text(table.as_bytes().to_vec()),
                Value::Text(prefix.into_bytes()),
            ],
        )?
        .is_some())
}

impl Merger {
    /// Ends a transaction: drops the queue (a commit flushed it already) and every cached
    /// statement.
    pub(crate) fn end_transaction(&mut self) {
        self.queue.clear();
        self.marks.clear();
        self.held.clear();
        self.token_left = false;
        self.clear();
    }

    /// Drops every cached statement (after an error, a schema change); the queue stays.
    pub(crate) fn clear(&mut self) {
        self.tables.clear();
        self.state_read = None;
        self.state_write = None;
        self.flag_write = None;
        self.mark_clear = None;
        self.counter_write = None;
        self.ranges = crate::origins::RangeStmts::default();
        self.state = None;
        self.triggers_know_mark = None;
        self.sites.forget();
    }

    pub(crate) fn table(&mut self, conn: Conn, name: &str) -> Result<&mut (TableInfo, TableStmts)> {
        if !self.tables.contains_key(name) {
            if !crate::schema::is_replicated(conn, name)? {
                return Err(Error::Change(format!(
                    "unknown table '{name}': it is not a replicated table in this database"
                )));
            }
            let info = crate::schema::inspect(conn, name)?;
            let other_triggers = other_triggers(conn, name)?;
            let stmts = TableStmts {
                read: HashMap::new(),
                set_column: HashMap::new(),
                update_base: HashMap::new(),
                replace_with_column: HashMap::new(),
                set_sentinel: None,
                new_life: None,
                new_life_with: HashMap::new(),
                insert_base: None,
                delete_base: None,
                batch: BatchStmts::default(),
                other_triggers,
                key_columns: key_columns(&info),
            };
            self.tables.insert(name.to_string(), (info, stmts));
        }
        self.tables
            .get_mut(name)
            .ok_or_else(|| Error::State("table cache".into()))
    }

    /// Checks a change against this database before anything is written: a 16-byte site
    /// id, a known table and column, a key of the table's arity, clocks within bounds.
    pub(crate) fn check(&mut self, conn: Conn, ch: &ChangeRef<'_>) -> Result<Checked> {
        let site: SiteBytes = ch.site_id.try_into().map_err(|_| {
            Error::Change(format!(
                "site_id must be a 16-byte blob, got {} bytes",
                ch.site_id.len()
            ))
        })?;
        let (keys, canonical) = pk::unpack_canonical(ch.pk)?;
        // Key columns are NOT NULL (`crsql_as_crr` requires it): a NULL would be given a
        // fresh rowid here, a row under a key no other replica has.
        if let Some(i) = keys.iter().position(|k| *k == Value::Null) {
            return Err(Error::Change(format!(
                "pk value {} of table '{}' is NULL; key columns are NOT NULL",
                i + 1,
                ch.table
            )));
        }
        let site_ord = self.sites.ordinal(conn, ch.site_id)?;
        let origin = ch.origin_version.unwrap_or(ch.db_version);

        let (n, col, plain) = {
            let (info, stmts) = self.table(conn, &ch.table)?;
            if keys.len() != info.pk.len() {
                return Err(Error::Change(format!(
                    "pk of table '{}' has {} values, the table's primary key has {} columns",
                    ch.table,
                    keys.len(),
                    info.pk.len()
                )));
            }
            let col = if ch.cid == crate::changes_read::SENTINEL {
                None
            } else {
                match info.columns.iter().position(|c| c.name == ch.cid) {
                    Some(i) => Some(i),
                    None => {
                        return Err(Error::Change(format!(
                            "unknown column '{}' of table '{}'",
                            ch.cid, ch.table
                        )));
                    }
                }
            };
            (
                info.columns.len(),
                col,
                plain_key(&stmts.key_columns, &keys, canonical),
            )
        };
        if col.is_some() && ch.cl % 2 == 0 {
            return Err(Error::Change(format!(
                "column '{}' of table '{}' arrives with an even cl ({}): a deleted row has no column values",
                ch.cid, ch.table, ch.cl
            )));
        }
        if let Err((field, value)) = merge::check_clocks(ch.cl, col.map(|_| ch.col_version)) {
            return Err(Error::Clock {
                table: ch.table.clone().into_owned(),
                cid: ch.cid.clone().into_owned(),
                field,
                value,
            });
        }

        Ok(Checked {
            keys,
            col,
            ncols: n,
            site,
            site_ord,
            origin,
            plain_key: plain,
        })
    }

    /// A checked change for the batched path's queue; consecutive changes of one table
    /// share its name.
    pub(crate) fn checked(&mut self, conn: Conn, ch: &ChangeRef<'_>, val: Value) -> Result<Queued> {
        let c = self.check(conn, ch)?;
        let table = match &self.last_table {
            Some(t) if **t == *ch.table => t.clone(),
            _ => {
                let t: Rc<str> = Rc::from(ch.table.as_ref());
                self.last_table = Some(t.clone());
                t
            }
        };
        Ok(Queued::new(
            table,
            ch.pk.to_vec(),
            val,
            ch.col_version,
            ch.cl,
            c,
        ))
    }

    /// `(db_version, batched, merge_equal_values)`, from the cache while nothing else wrote;
    /// `batched` is `merging = 1` (a per-change merge's stale mark is not).
    pub(crate) fn state_now(&mut self, conn: Conn) -> Result<(i64, bool, bool)> {
        if let Some(c) = self.state {
            if c.total_changes == conn.total_changes() {
                return Ok((c.db_version, c.merging, c.equal_values));
            }
        }
        let s = stmt(&mut self.state_read, conn, || {
            "SELECT db_version, merging = 1, merge_equal_values FROM patina_state WHERE id = 0"
                .into()
        })?;
        s.reset();
        if !s.step()? {
            s.reset();
            return Err(Error::State("patina_state has no row".into()));
        }
        let r = (s.column_i64(0), s.column_i64(1) != 0, s.column_i64(2) != 0);
        s.reset();
        self.remember_state(conn, r.0, r.1, r.2);
        Ok(r)
    }

    pub(crate) fn remember_state(
        &mut self,
        conn: Conn,
        db_version: i64,
        merging: bool,
        equal_values: bool,
    ) {
        self.state = Some(CachedState {
            total_changes: conn.total_changes(),
            db_version,
            merging,
            equal_values,
        });
    }

    /// Keeps the cached state across writes that do not touch `patina_state` (range
    /// bookkeeping): valid now if it was valid when `total_changes` was `before`.
    pub(crate) fn state_still_valid(&mut self, conn: Conn, before: i64) {
        if let Some(c) = &mut self.state {
            if c.total_changes == before {
                c.total_changes = conn.total_changes();
            }
        }
    }

    /// See `triggers_know_mark`.
    pub(crate) fn triggers_know_mark(&mut self, conn: Conn) -> Result<bool> {
        if let Some(k) = self.triggers_know_mark {
            return Ok(k);
        }
        let layout = conn
            .query_i64("SELECT layout FROM patina_state WHERE id = 0")?
            .unwrap_or(0);
        let k = layout >= crate::state::LAYOUT;
        self.triggers_know_mark = Some(k);
        Ok(k)
    }

    pub(crate) fn forget_state(&mut self) {
        self.state = None;
    }

    /// The 16-byte site id of an ordinal (None for an unknown one).
    pub(crate) fn site_bytes(&mut self, conn: Conn, ord: i64) -> Option<SiteBytes> {
        if self.sites.id(ord).is_none() {
            let _ = self.sites.reload(conn);
        }
        self.sites.id(ord).and_then(|s| s.try_into().ok())
    }
}

#[derive(Clone, Copy)]
pub(crate) struct CachedState {
    total_changes: i64,
    db_version: i64,
    merging: bool,
    equal_values: bool,
}
