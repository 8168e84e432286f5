//! The `crsql_changes` virtual table: glue between SQLite's module callbacks and the
//! feed reader (`changes_read`) and merger (`changes_write`).
//!
//! Eponymous-only (no `CREATE VIRTUAL TABLE` needed). Columns are cr-sqlite's nine plus a
//! hidden `origin_version`. Written as a raw `sqlite3_module` because sqlite-loadable's
//! table traits do not expose the transaction callbacks we use to scope statement caches.

use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::ptr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use sqlite_loadable::ext::{
    sqlite3, sqlite3_context, sqlite3_index_info, sqlite3_module, sqlite3_value, sqlite3_vtab,
    sqlite3_vtab_cursor,
};

use crate::changes_read::{self, Change, Filter};
use crate::error::{Error, Result};
use crate::merger::{ChangeRef, Incoming, Merger, Queued};
use crate::pk::{self, Packed};
use crate::schema;
use crate::sqlite::{self as sq, Conn, Value};
use crate::state::Sites;
use crate::Shared;

const SCHEMA: &CStr =
    c"CREATE TABLE x([table] TEXT, pk BLOB, cid TEXT, val ANY, col_version INTEGER, \
    db_version INTEGER, site_id BLOB, cl INTEGER, seq INTEGER, origin_version INTEGER HIDDEN, \
    patina_batch BLOB HIDDEN)";

const COL_TABLE: c_int = 0;
const COL_DB_VERSION: c_int = 5;
const COL_SITE_ID: c_int = 6;
/// The change columns (cr-sqlite's nine and `origin_version`); `patina_batch` follows.
const NCOLS: usize = 10;
/// The hidden column a batch of packed changes is written to (see [`check_batch`]).
const COL_BATCH: usize = NCOLS;

// SQLITE_INDEX_CONSTRAINT_*
const OP_EQ: u8 = 2;
const OP_GT: u8 = 4;
const OP_LE: u8 = 8;
const OP_LT: u8 = 16;
const OP_GE: u8 = 32;
const OP_NE: u8 = 68;
const OP_ISNOT: u8 = 69;
const OP_IS: u8 = 72;

/// Bits of idxNum, in the order their arguments are passed to xFilter.
const F_GT: i32 = 1;
const F_GE: i32 = 2;
const F_EQ: i32 = 4;
const F_LT: i32 = 8;
const F_LE: i32 = 16;
const F_SITE_EQ: i32 = 32;
const F_SITE_NE: i32 = 64;
const F_TABLE: i32 = 128;

#[repr(C)]
struct Vtab {
    base: sqlite3_vtab,
    conn: Conn,
    shared: Arc<Shared>,
    /// The last windowed read's whole remainder, for the next window of the same snapshot.
    window_cache: RefCell<Option<WindowCache>>,
}

/// Chunked readers ask for `(a, b]`, then `(b, c]`, … of one snapshot. The row index can
/// only bound a scan from below (a row's older changes may sit inside a window its newest
/// change is past), so each window would rescan everything after it. Instead the first
/// window materializes the remainder once and later windows are served from it while
/// nothing has committed since: `PRAGMA data_version` moves on other connections' commits,
/// `total_changes` on this connection's writes.
struct WindowCache {
    data_version: i64,
    total_changes: i64,
    after: i64,
    table: Option<String>,
    /// Sorted by db_version: every change in `(after, covered]`.
    rows: Vec<Change>,
    covered: i64,
}

/// At most this many changes are kept for later windows (a few MB), so a reader that
/// stops early does not pin the whole remainder of a large feed in memory.
const WINDOW_CACHE_CHANGES: usize = 32_768;

#[repr(C)]
struct Cursor {
    base: sqlite3_vtab_cursor,
    rows: Vec<Change>,
    pos: usize,
}

pub static MODULE: sqlite3_module = sqlite3_module {
    iVersion: 2,
    xCreate: None, // eponymous-only
    xConnect: Some(x_connect),
    xBestIndex: Some(x_best_index),
    xDisconnect: Some(x_disconnect),
    xDestroy: Some(x_disconnect),
    xOpen: Some(x_open),
    xClose: Some(x_close),
    xFilter: Some(x_filter),
    xNext: Some(x_next),
    xEof: Some(x_eof),
    xColumn: Some(x_column),
    xRowid: Some(x_rowid),
    xUpdate: Some(x_update),
    xBegin: Some(x_begin),
    xSync: Some(x_sync),
    xCommit: Some(x_end),
    xRollback: Some(x_end),
    xFindFunction: None,
    xRename: None,
    xSavepoint: Some(x_savepoint),
    xRelease: Some(x_release),
    xRollbackTo: Some(x_rollback_to),
    xShadowName: None,
};

/// Sets `zErrMsg` of the vtab and returns SQLITE_ERROR.
fn fail(vtab: *mut sqlite3_vtab, err: &Error) -> c_int {
    // SAFETY: vtab is live; we replace (and free) any previous message.
    unsafe {
        sq::sqlite_free((*vtab).zErrMsg.cast());
        (*vtab).zErrMsg = sq::sqlite_string(&err.to_string());
    }
    match err {
        Error::Sqlite { code, .. } => *code,
        _ => sq::SQLITE_ERROR,
    }
}

unsafe extern "C" fn x_connect(
    db: *mut sqlite3,
    aux: *mut c_void,
    _argc: c_int,
    _argv: *const *const c_char,
    pp_vtab: *mut *mut sqlite3_vtab,
    _err: *mut *mut c_char,
) -> c_int {
    // SAFETY: db is the connection SQLite passed this xConnect; it outlives the vtab.
    let rc = unsafe { sq::declare_vtab(db, SCHEMA) };
    if rc != sq::SQLITE_OK {
        return rc;
    }
    // SAFETY: aux is the Arc<Shared> pointer registered with the module; we clone it.
    let shared = unsafe {
        let a = aux as *const Shared;
        Arc::increment_strong_count(a);
        Arc::from_raw(a)
    };
    let vtab = Box::new(Vtab {
        base: sqlite3_vtab {
            pModule: ptr::null(),
            nRef: 0,
            zErrMsg: ptr::null_mut(),
        },
        // SAFETY: the connection outlives its vtab (SQLite disconnects it before closing).
        conn: unsafe { Conn::from_raw(db) },
        shared,
        window_cache: RefCell::new(None),
    });
    // SAFETY: SQLite takes the pointer and hands it back to x_disconnect.
    unsafe { *pp_vtab = Box::into_raw(vtab).cast() };
    sq::SQLITE_OK
}

unsafe extern "C" fn x_disconnect(vtab: *mut sqlite3_vtab) -> c_int {
    // SAFETY: created by Box::into_raw in x_connect; SQLite disconnects once.
    drop(unsafe { Box::from_raw(vtab.cast::<Vtab>()) });
    sq::SQLITE_OK
}

unsafe extern "C" fn x_best_index(
    _vtab: *mut sqlite3_vtab,
    info: *mut sqlite3_index_info,
) -> c_int {
    // SAFETY: SQLite passes a valid index_info with nConstraint entries.
    let info = unsafe { &mut *info };
    let cons =
        unsafe { std::slice::from_raw_parts(info.aConstraint, info.nConstraint.max(0) as usize) };
    let usage = unsafe {
        std::slice::from_raw_parts_mut(info.aConstraintUsage, info.nConstraint.max(0) as usize)
    };
    let mut chosen: [Option<usize>; 8] = [None; 8];
    for (i, c) in cons.iter().enumerate() {
        if c.usable == 0 {
            continue;
        }
        let bit = match (c.iColumn, c.op) {
            (COL_DB_VERSION, OP_GT) => 0,
            (COL_DB_VERSION, OP_GE) => 1,
            (COL_DB_VERSION, OP_EQ) => 2,
            (COL_DB_VERSION, OP_LT) => 3,
            (COL_DB_VERSION, OP_LE) => 4,
            (COL_SITE_ID, OP_EQ | OP_IS) => 5,
            (COL_SITE_ID, OP_NE | OP_ISNOT) => 6,
            (COL_TABLE, OP_EQ) => 7,
            _ => continue,
        };
        if chosen[bit].is_none() {
            chosen[bit] = Some(i);
        }
    }
    let mut idx = 0;
    let mut arg = 0;
    for (bit, c) in chosen.iter().enumerate() {
        if let Some(i) = c {
            arg += 1;
            usage[*i].argvIndex = arg;
            usage[*i].omit = 0;
            idx |= 1 << bit;
        }
    }
    info.idxNum = idx;
    let ranged = idx & (F_GT | F_GE | F_EQ) != 0;
    info.estimatedCost = if ranged { 100.0 } else { 1_000_000.0 };
    info.estimatedRows = if ranged { 100 } else { 1_000_000 };
    if info.nOrderBy == 1 {
        // SAFETY: nOrderBy entries.
        let ob = unsafe { &*info.aOrderBy };
        if ob.iColumn == COL_DB_VERSION && ob.desc == 0 {
            info.orderByConsumed = 1;
        }
    }
    sq::SQLITE_OK
}

unsafe extern "C" fn x_open(_vtab: *mut sqlite3_vtab, pp: *mut *mut sqlite3_vtab_cursor) -> c_int {
    let cur = Box::new(Cursor {
        base: sqlite3_vtab_cursor {
            pVtab: ptr::null_mut(),
        },
        rows: Vec::new(),
        pos: 0,
    });
    // SAFETY: SQLite owns the pointer until x_close.
    unsafe { *pp = Box::into_raw(cur).cast() };
    sq::SQLITE_OK
}

unsafe extern "C" fn x_close(cur: *mut sqlite3_vtab_cursor) -> c_int {
    // SAFETY: created in x_open.
    drop(unsafe { Box::from_raw(cur.cast::<Cursor>()) });
    sq::SQLITE_OK
}

/// An integer bound from a constraint value: `(floor, ceil)` for reals.
fn bound(v: &Value) -> Option<(i64, i64)> {
    match v {
        Value::Integer(i) => Some((*i, *i)),
        Value::Real(f) if f.is_finite() => Some((f.floor() as i64, f.ceil() as i64)),
        Value::Real(f) if *f > 0.0 => Some((i64::MAX, i64::MAX)),
        Value::Real(_) => Some((i64::MIN, i64::MIN)),
        _ => None,
    }
}

fn build_filter(idx: c_int, args: &[Value]) -> Option<Filter> {
    let mut f = Filter::all();
    let mut it = args.iter();
    for bit in 0..8 {
        if idx & (1 << bit) == 0 {
            continue;
        }
        let v = it.next()?;
        match 1 << bit {
            F_GT => f.after = f.after.max(bound(v)?.0),
            F_GE => f.after = f.after.max(bound(v)?.1.saturating_sub(1)),
            F_EQ => {
                let (lo, hi) = bound(v)?;
                if lo != hi {
                    return None;
                }
                f.after = f.after.max(lo.saturating_sub(1));
                f.up_to = f.up_to.min(lo);
            }
            F_LT => f.up_to = f.up_to.min(bound(v)?.1.saturating_sub(1)),
            F_LE => f.up_to = f.up_to.min(bound(v)?.0),
            F_SITE_EQ => match v {
                Value::Blob(b) => f.site_eq = Some(b.clone()),
                _ => return None,
            },
            F_SITE_NE => {
                if let Value::Blob(b) = v {
                    f.site_ne = Some(b.clone());
                }
            }
            F_TABLE => match v {
                Value::Text(t) => f.table = Some(String::from_utf8_lossy(t).into_owned()),
                _ => return None,
            },
            _ => {}
        }
    }
    Some(f)
}

/// A read with an upper bound, served from (and refreshing) the window cache.
fn read_window(vtab: &Vtab, f: &Filter) -> Result<Vec<Change>> {
    let conn = vtab.conn;
    let data_version = conn.query_i64("PRAGMA data_version")?.unwrap_or(0);
    let total_changes = conn.total_changes();
    let mut cache = vtab
        .window_cache
        .try_borrow_mut()
        .map_err(|_| Error::State("crsql_changes read re-entered itself".into()))?;
    let valid = cache.as_ref().is_some_and(|c| {
        c.data_version == data_version
            && c.total_changes == total_changes
            && c.table == f.table
            && f.after >= c.after
            && (c.covered == i64::MAX || f.up_to <= c.covered)
    });
    if !valid {
        let whole = Filter {
            after: f.after,
            up_to: i64::MAX,
            table: f.table.clone(),
            site_eq: None,
            site_ne: None,
        };
        let (rows, covered) =
            read_changes_first(conn, &whole, WINDOW_CACHE_CHANGES.max(window_hint(f)))?;
        *cache = Some(WindowCache {
            data_version,
            total_changes,
            after: f.after,
            table: f.table.clone(),
            rows,
            covered,
        });
    }
    let Some(c) = cache.as_ref() else {
        return Ok(Vec::new());
    };
    let start = c.rows.partition_point(|r| r.db_version <= f.after);
    let out: Vec<Change> = c.rows[start..]
        .iter()
        .take_while(|r| r.db_version <= f.up_to)
        .filter(|r| f.keeps_site(r.site_id.as_deref()))
        .cloned()
        .collect();
    // The last window of what is cached frees it.
    if c.rows.last().map_or(true, |r| r.db_version <= f.up_to) {
        *cache = None;
    }
    Ok(out)
}

/// Room for one window of `f` when its width is known to be larger than the cache bound.
fn window_hint(f: &Filter) -> usize {
    usize::try_from(f.up_to.saturating_sub(f.after))
        .unwrap_or(usize::MAX)
        .min(1 << 22)
}

/// The first `limit` changes of `f` by db_version, and the db_version up to which the
/// result is complete (`i64::MAX` when nothing was cut). Memory stays near `2 * limit`
/// changes however large the feed: the collection is cut back as it grows.
fn read_changes_first(conn: Conn, f: &Filter, limit: usize) -> Result<(Vec<Change>, i64)> {
    let mut out = Vec::new();
    let mut cut = false;
    if !crate::state::initialized(conn)? {
        return Ok((out, i64::MAX));
    }
    let tables = match &f.table {
        Some(t) if schema::is_replicated(conn, t)? => vec![t.clone()],
        Some(_) => Vec::new(),
        None => schema::replicated_tables(conn)?,
    };
    let mut sites = Sites::default();
    sites.reload(conn)?;
    let mut trim = |out: &mut Vec<Change>| {
        if out.len() > limit {
            out.sort_unstable_by_key(|c| c.db_version);
            out.truncate(limit);
            cut = true;
        }
    };
    for t in tables {
        let info = schema::inspect(conn, &t)?;
        changes_read::read_table(conn, &info, &sites, f, &mut out, &mut |o| {
            if o.len() > limit.saturating_mul(2) {
                trim(o)
            }
        })?;
    }
    trim(&mut out);
    out.sort_by_key(|c| c.db_version);
    let covered = if cut {
        out.last().map_or(f.after, |c| c.db_version)
    } else {
        i64::MAX
    };
    Ok((out, covered))
}

/// Every change that passes `f`, sorted by db_version.
fn read_changes(conn: Conn, f: &Filter) -> Result<Vec<Change>> {
    read_changes_first(conn, f, usize::MAX).map(|(rows, _)| rows)
}

unsafe extern "C" fn x_filter(
    cur: *mut sqlite3_vtab_cursor,
    idx_num: c_int,
    _idx_str: *const c_char,
    argc: c_int,
    argv: *mut *mut sqlite3_value,
) -> c_int {
    // SAFETY: cur is ours; its pVtab was set by SQLite to our vtab.
    let cursor = unsafe { &mut *cur.cast::<Cursor>() };
    let vtab = unsafe { &*(cursor.base.pVtab.cast::<Vtab>()) };
    let args: Vec<Value> = (0..argc.max(0) as usize)
        // SAFETY: argv holds argc values SQLite passed this call.
        .map(|i| unsafe { Value::from_raw(*argv.add(i)) })
        .collect();
    cursor.rows.clear();
    cursor.pos = 0;
    let Some(filter) = build_filter(idx_num, &args) else {
        return sq::SQLITE_OK; // a constraint no row can meet (NULL, a non-blob site id)
    };
    // Changes queued on the batched path are part of what this connection holds.
    if let Err(e) = vtab.shared.flush(vtab.conn) {
        return fail(cursor.base.pVtab, &e);
    }
    let rows = if filter.up_to < i64::MAX {
        read_window(vtab, &filter)
    } else {
        read_changes(vtab.conn, &filter)
    };
    match rows {
        Ok(rows) => {
            cursor.rows = rows;
            sq::SQLITE_OK
        }
        Err(e) => fail(cursor.base.pVtab, &e),
    }
}

unsafe extern "C" fn x_next(cur: *mut sqlite3_vtab_cursor) -> c_int {
    // SAFETY: ours.
    unsafe { (*cur.cast::<Cursor>()).pos += 1 };
    sq::SQLITE_OK
}

unsafe extern "C" fn x_eof(cur: *mut sqlite3_vtab_cursor) -> c_int {
    // SAFETY: ours.
    let c = unsafe { &*cur.cast::<Cursor>() };
    c_int::from(c.pos >= c.rows.len())
}

unsafe extern "C" fn x_column(
    cur: *mut sqlite3_vtab_cursor,
    ctx: *mut sqlite3_context,
    i: c_int,
) -> c_int {
    // SAFETY: ours; SQLite only asks for a column while not at EOF.
    let c = unsafe { &*cur.cast::<Cursor>() };
    let Some(row) = c.rows.get(c.pos) else {
        return sq::SQLITE_ERROR;
    };
    let v = match i {
        0 => Value::Text(row.table.as_bytes().to_vec()),
        1 => Value::Blob(row.pk.to_vec()),
        2 => Value::Text(row.cid.as_bytes().to_vec()),
        3 => row.val.clone(),
        4 => Value::Integer(row.col_version),
        5 => Value::Integer(row.db_version),
        6 => row
            .site_id
            .as_ref()
            .map_or(Value::Null, |s| Value::Blob(s.to_vec())),
        7 => Value::Integer(row.cl),
        8 => Value::Integer(0),
        9 => Value::Integer(row.origin_version),
        _ => Value::Null,
    };
    // SAFETY: ctx is the context SQLite passed this xColumn.
    unsafe { sq::result_value(ctx, &v) };
    sq::SQLITE_OK
}

unsafe extern "C" fn x_rowid(cur: *mut sqlite3_vtab_cursor, rowid: *mut i64) -> c_int {
    // SAFETY: ours.
    let c = unsafe { &*cur.cast::<Cursor>() };
    unsafe { *rowid = c.rows.get(c.pos).map_or(0, |r| r.db_version) };
    sq::SQLITE_OK
}

fn text_field<'a>(v: Packed<'a>, name: &str) -> Result<&'a [u8]> {
    match v {
        Packed::Text(t) => Ok(t),
        other => Err(Error::Change(format!(
            "{name} must be TEXT, got {}",
            other.type_name()
        ))),
    }
}

fn int_field(v: Packed<'_>, name: &str) -> Result<i64> {
    match v {
        Packed::Integer(i) => Ok(i),
        other => Err(Error::Change(format!(
            "{name} must be an INTEGER, got {}",
            other.type_name()
        ))),
    }
}

/// A change's ten fields in the column order of `crsql_changes`, typed; the value is
/// returned beside them (it is copied only where it is kept).
fn parse_fields<'a>(f: [Packed<'a>; NCOLS]) -> Result<(ChangeRef<'a>, Packed<'a>)> {
    let [table, pk, cid, val, col_version, db_version, site_id, cl, _seq, origin] = f;
    let pk = match pk {
        Packed::Blob(b) => b,
        other => {
            return Err(Error::Change(format!(
                "pk must be a BLOB made by crsql_pack_columns, got {}",
                other.type_name()
            )))
        }
    };
    let site_id = match site_id {
        Packed::Blob(b) => b,
        other => {
            return Err(Error::Change(format!(
                "site_id must be a 16-byte BLOB, got {}",
                other.type_name()
            )))
        }
    };
    let origin_version = match origin {
        Packed::Null => None,
        v => Some(int_field(v, "origin_version")?),
    };
    let change = ChangeRef {
        table: String::from_utf8_lossy(text_field(table, "table")?),
        pk,
        cid: String::from_utf8_lossy(text_field(cid, "cid")?),
        col_version: int_field(col_version, "col_version")?,
        db_version: int_field(db_version, "db_version")?,
        site_id,
        cl: int_field(cl, "cl")?,
        origin_version,
    };
    Ok((change, val))
}

fn parse_incoming(args: &[Value]) -> Result<Incoming> {
    let fields: [Packed<'_>; NCOLS] = std::array::from_fn(|i| Packed::from(&args[i]));
    let (change, val) = parse_fields(fields)?;
    Ok(Incoming::new(&change, val.to_value()))
}

/// Checks a `patina_batch` blob and queues its changes: a sequence of records, each one
/// change's ten fields in the column order of `crsql_changes` (`table` ..
/// `origin_version`) packed the way `crsql_pack_columns` packs values. Every change is
/// decoded and checked before anything is written, so a malformed batch is refused whole.
fn check_batch(merger: &mut Merger, conn: Conn, blob: &[u8]) -> Result<Vec<Queued>> {
    let mut out = Vec::new();
    let mut rest = blob;
    while !rest.is_empty() {
        let at = out.len();
        let bad = |e: Error| Error::Change(format!("change {at} of the patina_batch: {e}"));
        let mut r = pk::Reader::new(rest).map_err(bad)?;
        if r.count() != NCOLS {
            return Err(bad(Error::Change(format!(
                "it has {} fields, a change has {NCOLS}",
                r.count()
            ))));
        }
        let mut fields = [Packed::Null; NCOLS];
        for f in &mut fields {
            *f = r
                .next_value()
                .map_err(bad)?
                .ok_or_else(|| bad(Error::Change("a field is missing".into())))?;
        }
        rest = r.rest();
        let (change, val) = parse_fields(fields).map_err(bad)?;
        out.push(merger.checked(conn, &change, val.to_value()).map_err(bad)?);
    }
    Ok(out)
}

/// The `patina_batch` argument of an insert: None when NULL (a one-change insert).
///
/// # Safety
/// `raw` is a value SQLite passed the running `xUpdate`; the slice must not outlive it.
unsafe fn batch_arg<'a>(raw: *mut sqlite3_value) -> Result<Option<&'a [u8]>> {
    // SAFETY: as this function's.
    if let Some(b) = unsafe { Value::blob_of(raw) } {
        return Ok(Some(b));
    }
    // SAFETY: as this function's.
    match unsafe { Value::from_raw(raw) } {
        Value::Null => Ok(None),
        Value::Blob(_) => Err(Error::Change(
            "the patina_batch blob could not be read (out of memory?)".into(),
        )),
        other => Err(Error::Change(format!(
            "patina_batch must be a BLOB of packed changes, got {}",
            other.type_name()
        ))),
    }
}

unsafe extern "C" fn x_update(
    vtab: *mut sqlite3_vtab,
    argc: c_int,
    argv: *mut *mut sqlite3_value,
    _rowid: *mut i64,
) -> c_int {
    // SAFETY: vtab is ours; argv has argc values.
    let v = unsafe { &*vtab.cast::<Vtab>() };
    let argc = argc.max(0) as usize;
    // The batch column is read apart (borrowed: it may be megabytes).
    let args: Vec<Value> = (0..argc.min(2 + NCOLS))
        // SAFETY: argv holds argc values SQLite passed this call.
        .map(|i| unsafe { Value::from_raw(*argv.add(i)) })
        .collect();
    if argc != 2 + NCOLS + 1 || args[0] != Value::Null {
        return fail(
            vtab,
            &Error::Change(
                "only INSERT is supported; UPDATE and DELETE of changes are refused".into(),
            ),
        );
    }
    let conn = v.conn;
    let fields = &args[2..];
    let result = (|| {
        let mut merger = v.shared.merger.try_borrow_mut().map_err(|_| {
            Error::Change(
                "a merge was started from inside another merge (a trigger writing crsql_changes?)"
                    .into(),
            )
        })?;
        // SAFETY: argc was checked above; the value lives as long as this call.
        match unsafe { batch_arg(*argv.add(2 + COL_BATCH)) }? {
            None => merger.merge(conn, parse_incoming(fields)?),
            Some(b) if fields.iter().all(|f| *f == Value::Null) => {
                let queued = check_batch(&mut merger, conn, b)?;
                merger.merge_batch(conn, queued)
            }
            Some(_) => Err(Error::Change(
                "a row of crsql_changes carries either one change or a patina_batch, not both"
                    .into(),
            )),
        }
    })();
    match result {
        Ok(n) => {
            v.shared.rows_impacted.fetch_add(n, Ordering::Relaxed);
            sq::SQLITE_OK
        }
        Err(e) => {
            if let Ok(mut m) = v.shared.merger.try_borrow_mut() {
                m.clear();
            }
            fail(vtab, &e)
        }
    }
}

unsafe extern "C" fn x_begin(vtab: *mut sqlite3_vtab) -> c_int {
    // SAFETY: ours.
    let v = unsafe { &*vtab.cast::<Vtab>() };
    v.shared.rows_impacted.store(0, Ordering::Relaxed);
    sq::SQLITE_OK
}

/// Commit or rollback: the queue is gone (a commit flushed it in `x_sync`) and cached
/// statements are finalized, so none outlives the transaction or keeps the connection
/// from closing.
unsafe extern "C" fn x_end(vtab: *mut sqlite3_vtab) -> c_int {
    // SAFETY: ours.
    let v = unsafe { &*vtab.cast::<Vtab>() };
    if let Ok(mut m) = v.shared.merger.try_borrow_mut() {
        m.end_transaction();
    }
    sq::SQLITE_OK
}

/// Commit, phase one: apply what the batched path still holds (writing here is allowed;
/// FTS5 flushes its pending terms the same way).
unsafe extern "C" fn x_sync(vtab: *mut sqlite3_vtab) -> c_int {
    // SAFETY: ours.
    let v = unsafe { &*vtab.cast::<Vtab>() };
    match v.shared.flush(v.conn) {
        Ok(()) => sq::SQLITE_OK,
        Err(e) => fail(vtab, &e),
    }
}

unsafe extern "C" fn x_savepoint(vtab: *mut sqlite3_vtab, n: c_int) -> c_int {
    // SAFETY: ours.
    let v = unsafe { &*vtab.cast::<Vtab>() };
    if let Ok(mut m) = v.shared.merger.try_borrow_mut() {
        m.savepoint(n);
    }
    sq::SQLITE_OK
}

unsafe extern "C" fn x_release(vtab: *mut sqlite3_vtab, n: c_int) -> c_int {
    // SAFETY: ours.
    let v = unsafe { &*vtab.cast::<Vtab>() };
    if let Ok(mut m) = v.shared.merger.try_borrow_mut() {
        m.release(n);
    }
    sq::SQLITE_OK
}

unsafe extern "C" fn x_rollback_to(vtab: *mut sqlite3_vtab, n: c_int) -> c_int {
    // SAFETY: ours.
    let v = unsafe { &*vtab.cast::<Vtab>() };
    if let Ok(mut m) = v.shared.merger.try_borrow_mut() {
        m.rollback_to(n);
    }
    sq::SQLITE_OK
}
