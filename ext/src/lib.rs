//! patina — a SQLite loadable extension that makes ordinary tables conflict-free
//! replicated relations, with cr-sqlite's SQL surface.
//!
//! # Layout
//! - `sqlite`        — the one thin safe wrapper over the raw SQLite C API.
//! - `error`         — the crate's error enum.
//! - `pk`            — cr-sqlite's packed primary-key encoding.
//! - `merge`         — the merge rules as pure functions (no SQLite).
//! - `schema`        — reading a table's shape and the rules for replicating it.
//! - `triggers`      — SQL generation: clock tables and the plain-SQL capture triggers.
//! - `state`         — `patina_state` (counters, merge flag, site id) and `patina_sites`.
//! - `ranges`        — sets of versions as coalesced ranges (pure).
//! - `origins`       — per-origin held ranges in SQL, their helpers, the migration to them.
//! - `crr`           — `crsql_as_crr`, `crsql_as_table`, begin/commit alter, backfill.
//! - `changes`       — the `crsql_changes` virtual table (glue).
//! - `changes_read`  — the change feed.
//! - `merger`        — per-connection merge state both merge paths share (caches, queue).
//! - `changes_write` — merging remote changes one at a time (the entry point of a merge).
//! - `changes_batch` — the batched merge path: queued changes applied grouped by row.
//! - `collect`       — tombstone collection, applying the node's per-origin limits.
//! - `functions`     — the scalar SQL functions.

mod changes;
mod changes_batch;
mod changes_read;
mod changes_write;
mod collect;
mod crr;
mod error;
mod functions;
mod merge;
mod merger;
mod origins;
mod pk;
mod ranges;
mod schema;
mod sqlite;
mod state;
mod triggers;

use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_uint, c_void};
use std::sync::atomic::AtomicI64;
use std::sync::Arc;

use sqlite_loadable::ext::{faux_sqlite_extension_init2, sqlite3, sqlite3_api_routines};
use sqlite_loadable::FunctionFlags;

/// State one connection's functions and `crsql_changes` share. SQLite runs one
/// connection's callbacks one at a time, so a `RefCell` is enough; a re-entrant use (a
/// trigger merging from inside a merge) gets an error, not a panic.
#[derive(Default)]
pub(crate) struct Shared {
    /// Base rows written by merges since the current transaction's first merge.
    pub(crate) rows_impacted: AtomicI64,
    /// The merger: statement caches and the batched path's queue.
    pub(crate) merger: RefCell<merger::Merger>,
}

impl Shared {
    /// Applies the batched path's queue (see `changes_batch`).
    pub(crate) fn flush(&self, conn: sqlite::Conn) -> error::Result<()> {
        let mut m = self
            .merger
            .try_borrow_mut()
            .map_err(|_| error::Error::Change("patina_flush() ran from inside a merge".into()))?;
        let n = m.flush(conn)?;
        self.rows_impacted
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}

/// Entry points for the fuzz targets in `fuzz/` (cargo-fuzz builds with `--cfg fuzzing`);
/// absent from every normal build, so the crate's API stays its SQL surface.
#[cfg(fuzzing)]
pub mod fuzzing {
    /// The packed-key decoder on arbitrary bytes: it must refuse or unpack, and what it
    /// unpacks must pack to bytes that unpack and pack again to the same bytes.
    pub fn pk_round_trip(bytes: &[u8]) {
        if let Ok(values) = crate::pk::unpack(bytes) {
            let packed = crate::pk::pack(&values).expect("unpacked values pack again");
            let again = crate::pk::unpack(&packed).expect("packed bytes unpack");
            assert_eq!(again.len(), values.len());
            assert_eq!(crate::pk::pack(&again).expect("stable"), packed);
        }
    }
}

unsafe extern "C" fn drop_shared(p: *mut c_void) {
    // SAFETY: p came from Arc::into_raw in `register`.
    drop(unsafe { Arc::from_raw(p as *const Shared) });
}

/// The entry point `.load target/release/libpatina` finds by its file name.
///
/// # Safety
/// Called by SQLite with a valid connection and routine table.
#[no_mangle]
pub unsafe extern "C" fn sqlite3_patina_init(
    db: *mut sqlite3,
    err: *mut *mut c_char,
    api: *mut sqlite3_api_routines,
) -> c_uint {
    // SAFETY: api is SQLite's routine table, valid for the process.
    unsafe {
        faux_sqlite_extension_init2(api);
        sqlite::set_api(api);
    }
    // SAFETY: db is the connection SQLite is loading us into, and the table is stored.
    let conn = unsafe { sqlite::Conn::from_raw(db) };
    match register(conn) {
        Ok(()) => sqlite::SQLITE_OK as c_uint,
        Err(e) => {
            if !err.is_null() {
                // SAFETY: SQLite frees *err with sqlite3_free.
                unsafe { *err = sqlite::sqlite_string(&e.to_string()) };
            }
            sqlite::SQLITE_ERROR as c_uint
        }
    }
}

fn register(conn: sqlite::Conn) -> error::Result<()> {
    use functions as f;
    // Not Sync (RefCell inside): SQLite runs one connection's callbacks one at a time, and
    // the atomic count stays right when an app moves the connection between threads.
    #[allow(clippy::arc_with_non_send_sync)]
    let shared = Arc::new(Shared::default());
    let det = FunctionFlags::UTF8 | FunctionFlags::DETERMINISTIC;
    let plain = FunctionFlags::UTF8;
    let direct = FunctionFlags::UTF8 | FunctionFlags::DIRECTONLY;
    // name, argument count (-1 any), flags, implementation
    #[allow(clippy::type_complexity)]
    let list: &[(&str, c_int, FunctionFlags, f::Func)] = &[
        // crsql_as_crr('t') -> 'OK'
        ("crsql_as_crr", 1, direct, f::as_crr),
        // crsql_as_crr('main', 't') -> 'OK'
        ("crsql_as_crr", 2, direct, f::as_crr),
        // crsql_as_table('t') -> 'OK'
        ("crsql_as_table", 1, direct, f::as_table),
        // crsql_begin_alter('t') -> 'OK'
        ("crsql_begin_alter", 1, direct, f::begin_alter),
        // crsql_commit_alter('t') -> 'OK'
        ("crsql_commit_alter", 1, direct, f::commit_alter),
        // crsql_db_version() -> the last change number handed out
        ("crsql_db_version", 0, plain, f::db_version),
        // crsql_site_id() -> 16-byte blob
        ("crsql_site_id", 0, plain, f::site_id),
        // crsql_rows_impacted() -> base rows written by merges in this transaction
        ("crsql_rows_impacted", 0, plain, f::rows_impacted),
        // crsql_config_set('merge-equal-values', 0|1) -> the value set
        ("crsql_config_set", 2, direct, f::config_set),
        // crsql_config_get('merge-equal-values') -> 0|1
        ("crsql_config_get", 1, plain, f::config_get),
        // crsql_pack_columns(v1, v2, ...) -> packed blob
        ("crsql_pack_columns", -1, det, f::pack_columns),
        // crsql_finalize() -> 'OK' (nothing to release; kept for cr-sqlite code)
        ("crsql_finalize", 0, plain, f::finalize),
        // patina_version() -> '0.1.0'
        ("patina_version", 0, det, f::version),
        // patina_flush() -> 'OK': applies changes queued on the batched merge path
        ("patina_flush", 0, plain, f::flush),
        // patina_new_site_id() -> the new 16-byte site id (restore, cloned files)
        ("patina_new_site_id", 0, direct, f::new_site_id),
        // patina_origin_summary() -> JSON: per origin site, head, versions held, gaps
        ("patina_origin_summary", 0, plain, f::origin_summary),
        // patina_origin_missing(site_id, a, b) -> JSON ranges of a..=b of that origin not held
        ("patina_origin_missing", 3, plain, f::origin_missing),
        // patina_collect_tombstones('{"<site hex>": version}') -> '{"removed": n, "floors": {..}}'
        (
            "patina_collect_tombstones",
            1,
            direct,
            f::collect_tombstones,
        ),
    ];
    for (name, n, flags, func) in list {
        sqlite::create_function(conn, name, *n, flags.bits(), *func, shared.clone())?;
    }
    let aux = Arc::into_raw(shared) as *mut c_void;
    // SAFETY: aux is a strong count SQLite owns from here and releases with drop_shared.
    let rc = unsafe {
        sqlite::create_module(
            conn,
            c"crsql_changes",
            &changes::MODULE,
            aux,
            Some(drop_shared),
        )
    };
    if rc != sqlite::SQLITE_OK {
        return Err(error::Error::State(format!(
            "registering crsql_changes failed (code {rc})"
        )));
    }
    // First load into a writable database: create patina's state and a site id. A
    // read-only or busy database is fine; crsql_as_crr retries later.
    let _ = state::ensure(conn);
    Ok(())
}
