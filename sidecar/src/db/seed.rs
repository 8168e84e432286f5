//! Snapshots for seeding a node that holds nothing (`sync::seed`): made by the peer
//! asked, installed by the joiner.
//!
//! A snapshot is a SQLite file holding, as of one read transaction, every replicated
//! table's rows (`"data:<table>"`), its clock rows (`"clock:<table>"`, the extension's
//! layout, site ordinals of the sender), the sender's `patina_sites`, what it holds per
//! origin, what it collected, its site bindings to certificates (`patina_seed_bindings`;
//! a snapshot of an older release has none), and its counters (`patina_seed_meta`). Tables the app keeps
//! to itself are not in it. Columns are declared without types so no affinity touches a
//! value on the way; the joiner's own tables apply theirs, as they did at the sender.
//!
//! Installing copies rows and clocks in one transaction with the extension's merge flag
//! set (the capture triggers stay quiet), maps the sender's site ordinals to the joiner's,
//! and records what the sender held, its `db_version` (so the joiner's feed continues the
//! numbers of the clocks it copied) and the cursor into the sender's feed. It refuses —
//! changing nothing — unless the joiner holds nothing: no row in any replicated table,
//! no write of its own, nothing of any origin.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OptionalExtension};

use super::schema::{has_table, has_table_in, quote, replicated_tables, CLOCK_SUFFIX};
use super::{bookkeeping, retention};
use crate::sync::seed::SeedPart;
use crate::sync::{is_portable, SiteId, MAX_SITES_PER_IDENTITY, MAX_VERSION};

/// The snapshot layout this build writes and reads.
const FORMAT: i64 = 1;
/// Name of the snapshot database while attached.
const SCHEMA: &str = "patina_seed";
/// The most site bindings a snapshot may carry (as many as a summary may name origins).
const MAX_BINDINGS: i64 = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error("{0}")]
    Sql(#[from] rusqlite::Error),
    #[error("cannot write the snapshot file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The snapshot does not fit this database; nothing was changed.
    #[error("{0}")]
    Refused(String),
}

fn refused(why: impl Into<String>) -> SeedError {
    SeedError::Refused(why.into())
}

/// Columns of `table` in `schema`, in order (generated columns left out: they are
/// computed, not stored).
fn columns(conn: &Connection, schema: &str, table: &str) -> rusqlite::Result<Vec<String>> {
    let mut s = conn.prepare("SELECT name FROM pragma_table_info(?1, ?2) ORDER BY cid")?;
    let rows = s.query_map(params![table, schema], |r| r.get::<_, String>(0))?;
    rows.collect()
}

/// Key columns of `table` in `main`.
fn key_columns(conn: &Connection, table: &str) -> rusqlite::Result<Vec<String>> {
    let mut s = conn.prepare("SELECT name FROM pragma_table_info(?1) WHERE pk > 0 ORDER BY pk")?;
    let rows = s.query_map(params![table], |r| r.get::<_, String>(0))?;
    rows.collect()
}

/// Writes a snapshot of the database at `db` to `out` (replaced if it exists), as of one
/// read transaction; returns its size in bytes. Uses a connection of its own: it never
/// holds the node's feed reader, and never blocks a writer (WAL).
pub fn export(db: &Path, out: &Path) -> Result<u64, SeedError> {
    let io = |source| SeedError::Io {
        path: out.to_path_buf(),
        source,
    };
    match std::fs::remove_file(out) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    let conn = Connection::open(db)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.execute("ATTACH ?1 AS patina_seed", params![out.to_string_lossy()])?;
    let made = write_snapshot(&conn);
    let _ = conn.execute_batch("DETACH patina_seed");
    if let Err(e) = made {
        let _ = std::fs::remove_file(out);
        return Err(e);
    }
    Ok(std::fs::metadata(out).map_err(io)?.len())
}

fn write_snapshot(conn: &Connection) -> Result<(), SeedError> {
    conn.execute_batch(
        "PRAGMA patina_seed.journal_mode = OFF; PRAGMA patina_seed.synchronous = OFF;",
    )?;
    // One read transaction over main: every table as of the same instant.
    conn.execute_batch("BEGIN")?;
    let r = copy_out(conn);
    match r {
        Ok(()) => conn.execute_batch("COMMIT")?,
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            return Err(e);
        }
    }
    Ok(())
}

fn copy_out(conn: &Connection) -> Result<(), SeedError> {
    conn.execute_batch(&format!(
        "CREATE TABLE {SCHEMA}.patina_seed_meta (format, site_id, db_version, origin_version, \
                                                 cl_floor, layout);
         INSERT INTO {SCHEMA}.patina_seed_meta
             SELECT {FORMAT}, site_id, db_version, origin_version, cl_floor, layout
             FROM main.patina_state WHERE id = 0;
         CREATE TABLE {SCHEMA}.patina_seed_tables (name);
         CREATE TABLE {SCHEMA}.patina_seed_sites (ord, site_id);
         INSERT INTO {SCHEMA}.patina_seed_sites SELECT ord, site_id FROM main.patina_sites;
         CREATE TABLE {SCHEMA}.patina_seed_ranges (site_id, start, \"end\");
         INSERT INTO {SCHEMA}.patina_seed_ranges
             SELECT site_id, start, \"end\" FROM main.patina_origin_ranges;
         CREATE TABLE {SCHEMA}.patina_seed_collected (site_id, upto);"
    ))?;
    if has_table(conn, "patina_collected")? {
        conn.execute_batch(&format!(
            "INSERT INTO {SCHEMA}.patina_seed_collected SELECT site_id, upto FROM main.patina_collected"
        ))?;
    }
    // Site bindings to certificates only (see `sync::is_portable`), each with when its
    // site was last seen alive, so the joiner forgets it as this node would
    // (`retention::forget_departed`). A site not recorded as seen yet (the record is
    // written every 30 s) counts as seen now. Odd rows stay here.
    conn.execute_batch(&format!(
        "CREATE TABLE {SCHEMA}.patina_seed_bindings (site_id, identity, last_seen);"
    ))?;
    if has_table(conn, "patina_site_bindings")? {
        let now = i64::try_from(super::tail::unix_ms()).unwrap_or(i64::MAX);
        let seen = if has_table(conn, "patina_site_seen")? {
            "(SELECT s.last_seen FROM main.patina_site_seen AS s WHERE s.site_id = b.site_id)"
        } else {
            "NULL"
        };
        let mut read = conn.prepare(&format!(
            "SELECT site_id, identity, last_seen FROM \
             (SELECT b.site_id, b.identity, coalesce({seen}, ?1) AS last_seen \
              FROM main.patina_site_bindings AS b) \
             WHERE {ok}",
            ok = well_formed_binding("site_id", "identity", "last_seen")
        ))?;
        let rows = read.query_map([now], |r| {
            Ok((
                r.get::<_, Vec<u8>>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })?;
        let mut write = conn.prepare(&format!(
            "INSERT INTO {SCHEMA}.patina_seed_bindings (site_id, identity, last_seen) \
             VALUES (?1, ?2, ?3)"
        ))?;
        for row in rows {
            let (site, identity, last_seen) = row?;
            if is_portable(&identity) {
                write.execute(params![site, identity, last_seen])?;
            }
        }
    }
    // Versions held only in the schema buffer are recorded as held but are in no table:
    // a snapshot would make the joiner claim them without their changes (`serve_pull`
    // leaves them out of a feed the same way). The joiner gets the feed instead.
    if has_table(conn, "patina_schema_buffer")? {
        let waiting: i64 =
            conn.query_row("SELECT count(*) FROM main.patina_schema_buffer", [], |r| {
                r.get(0)
            })?;
        if waiting > 0 {
            return Err(refused(format!(
                "{waiting} unit(s) wait in the schema buffer for a schema change here"
            )));
        }
    }
    if conn.query_row(
        &format!("SELECT count(*) FROM {SCHEMA}.patina_seed_meta"),
        [],
        |r| r.get::<_, i64>(0),
    )? != 1
    {
        return Err(refused("this database has no patina state"));
    }
    for table in replicated_tables(conn)? {
        let clock = format!("{table}{CLOCK_SUFFIX}");
        for (kind, source) in [("data", &table), ("clock", &clock)] {
            let cols = columns(conn, "main", source)?;
            if cols.is_empty() {
                return Err(refused(format!("table {source} has no columns")));
            }
            let list = cols.iter().map(|c| quote(c)).collect::<Vec<_>>().join(", ");
            let copy = quote(&format!("{kind}:{table}"));
            conn.execute_batch(&format!(
                "CREATE TABLE {SCHEMA}.{copy} ({list});
                 INSERT INTO {SCHEMA}.{copy} SELECT {list} FROM main.{src};",
                src = quote(source)
            ))?;
        }
        conn.execute(
            &format!("INSERT INTO {SCHEMA}.patina_seed_tables (name) VALUES (?1)"),
            params![table],
        )?;
    }
    Ok(())
}

/// Where a joiner writes the snapshot it receives: beside its database.
pub fn incoming_file(db: &Path) -> PathBuf {
    PathBuf::from(format!("{}.seed-in", db.display()))
}

/// Where a node makes snapshot `id` for a joiner: beside its database.
pub fn outgoing_file(db: &Path, id: u64) -> PathBuf {
    PathBuf::from(format!("{}{id:016x}", outgoing_prefix(db)))
}

fn outgoing_prefix(db: &Path) -> String {
    format!("{}.seed-out-", db.display())
}

/// Writes `part` into the snapshot being received at `path`. Only a snapshot's first part
/// creates (or empties) the file: a part still queued after the attempt was abandoned and
/// the file deleted fails instead of re-creating it.
pub fn write_part(path: &Path, part: &SeedPart) -> std::io::Result<()> {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new()
        .create(part.offset == 0)
        .write(true)
        .truncate(false)
        .open(path)?;
    if part.offset == 0 {
        f.set_len(0)?;
    }
    f.seek(SeekFrom::Start(part.offset))?;
    f.write_all(&part.bytes)
}

/// Removes snapshot files a previous run left beside the database at `db` (made for a
/// joiner, `<db>.seed-out-*`, or being received, `<db>.seed-in`): a process killed while
/// sending or receiving one. Returns how many it removed.
pub fn remove_leftovers(db: &Path) -> usize {
    let Some(dir) = db.parent() else {
        return 0;
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let (out, inc) = (outgoing_prefix(db), incoming_file(db));
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().starts_with(&out) || *p == inc)
        .filter(|p| std::fs::remove_file(p).is_ok())
        .count()
}

/// Whether this database holds nothing a snapshot could clash with: no write of its own,
/// nothing of any other origin, no row in any replicated table. Checked again inside the
/// install's transaction.
pub fn holds_nothing(conn: &Connection) -> rusqlite::Result<bool> {
    Ok(why_not_empty(conn)?.is_none())
}

/// What this database holds that a snapshot could clash with (`None`: nothing).
fn why_not_empty(conn: &Connection) -> rusqlite::Result<Option<String>> {
    let (own, held): (i64, i64) = conn.query_row(
        "SELECT (SELECT origin_version FROM main.patina_state WHERE id = 0), \
                (SELECT count(*) FROM main.patina_origin_ranges)",
        [],
        |r| Ok((r.get::<_, Option<i64>>(0)?.unwrap_or(0), r.get(1)?)),
    )?;
    if own > 0 {
        return Ok(Some("this node has written changes of its own".into()));
    }
    if held > 0 {
        return Ok(Some(
            "this node already holds changes of other nodes".into(),
        ));
    }
    for table in replicated_tables(conn)? {
        let any: Option<i64> = conn
            .query_row(
                &format!("SELECT 1 FROM main.{} LIMIT 1", quote(&table)),
                [],
                |r| r.get(0),
            )
            .optional()?;
        if any.is_some() {
            return Ok(Some(format!("table {table} is not empty here")));
        }
    }
    Ok(None)
}

/// What an install did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    /// Versions of every origin now held (what the snapshot stands for in changes).
    pub versions: u64,
    /// The cursor now stored for the sender's feed (its `db_version` at the snapshot).
    pub cursor: i64,
    /// The sender's site bindings to certificates now stored here too: those for sites
    /// this node had bound to no one (see `store_bindings`).
    pub bindings: Vec<(SiteId, String)>,
}

/// Installs the snapshot at `file`, sent by `sender`, into `conn` (the node's apply
/// connection, extension loaded), whose own site is `local`. All or nothing.
pub fn install(
    conn: &mut Connection,
    file: &Path,
    sender: &SiteId,
    local: &SiteId,
) -> Result<Installed, SeedError> {
    conn.execute("ATTACH ?1 AS patina_seed", params![file.to_string_lossy()])?;
    let r = (|| {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let done = copy_in(&tx, sender, local)?;
        tx.commit()?;
        Ok(done)
    })();
    let _ = conn.execute_batch("DETACH patina_seed");
    r
}

/// The largest clock value or version a snapshot may carry: the bound every merge
/// enforces (`ext/src/merge.rs` `MAX_CLOCK`, `sync::MAX_VERSION`).
const MAX_CLOCK: i64 = MAX_VERSION;

/// A snapshot is a file from a peer: before anything is read from it, it must be a sound
/// SQLite file holding plain tables only (no view or trigger whose SQL would run here).
fn check_file(conn: &Connection) -> Result<(), SeedError> {
    let check: String =
        conn.query_row(&format!("PRAGMA {SCHEMA}.quick_check(1)"), [], |r| r.get(0))?;
    if check != "ok" {
        return Err(refused(format!("the snapshot file is damaged: {check}")));
    }
    let other: i64 = conn.query_row(
        &format!(
            "SELECT count(*) FROM {SCHEMA}.sqlite_schema WHERE type NOT IN ('table', 'index')"
        ),
        [],
        |r| r.get(0),
    )?;
    if other > 0 {
        return Err(refused("the snapshot holds views or triggers"));
    }
    Ok(())
}

/// Every clock column of a copied clock table, and every range, within bounds.
fn check_bounds(conn: &Connection, copy: &str, clock_cols: &[String]) -> Result<(), SeedError> {
    for c in clock_cols
        .iter()
        .filter(|c| c.starts_with("__patina") || c.contains("__patina_"))
    {
        let bad: Option<i64> = conn
            .query_row(
                &format!(
                    "SELECT 1 FROM {SCHEMA}.{t} WHERE {c} IS NOT NULL AND \
                     (typeof({c}) <> 'integer' OR {c} < 0 OR {c} > {MAX_CLOCK}) LIMIT 1",
                    t = quote(copy),
                    c = quote(c)
                ),
                [],
                |r| r.get(0),
            )
            .optional()?;
        if bad.is_some() {
            return Err(refused(format!(
                "clock column {c} of the snapshot holds a value out of bounds"
            )));
        }
    }
    Ok(())
}

fn copy_in(conn: &Connection, sender: &SiteId, local: &SiteId) -> Result<Installed, SeedError> {
    check_file(conn)?;
    let meta = conn
        .query_row(
            &format!(
                "SELECT format, site_id, db_version, origin_version, cl_floor, layout \
                 FROM {SCHEMA}.patina_seed_meta"
            ),
            [],
            |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, Vec<u8>>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, i64>(5)?,
                ))
            },
        )
        .optional()?
        .ok_or_else(|| refused("the snapshot has no header"))?;
    let (format, site, db_version, origin_version, cl_floor, layout) = meta;
    if format != FORMAT {
        return Err(refused(format!(
            "snapshot format {format}; this build reads {FORMAT}"
        )));
    }
    if site.as_slice() != sender.as_slice() {
        return Err(refused("the snapshot is not of the peer that sent it"));
    }
    let bounded = |v: i64| (0..=MAX_CLOCK).contains(&v);
    if !(bounded(db_version) && bounded(origin_version) && bounded(cl_floor)) {
        return Err(refused("the snapshot's counters are out of bounds"));
    }
    let bad_ranges: i64 = conn.query_row(
        &format!(
            "SELECT count(*) FROM {SCHEMA}.patina_seed_ranges WHERE typeof(site_id) <> 'blob' \
             OR length(site_id) <> 16 OR typeof(start) <> 'integer' OR typeof(\"end\") <> 'integer' \
             OR start < 1 OR \"end\" < start OR \"end\" > {MAX_CLOCK}"
        ),
        [],
        |r| r.get(0),
    )?;
    if bad_ranges > 0 {
        return Err(refused("the snapshot names versions out of bounds"));
    }
    let bad_sites: i64 = conn.query_row(
        &format!(
            "SELECT count(*) FROM {SCHEMA}.patina_seed_sites WHERE typeof(ord) <> 'integer' \
             OR typeof(site_id) <> 'blob' OR length(site_id) <> 16"
        ),
        [],
        |r| r.get(0),
    )?;
    if bad_sites > 0 {
        return Err(refused("the snapshot names malformed site ids"));
    }
    let bindings = seed_bindings(conn, sender, local)?;
    let ours_layout: i64 = conn.query_row(
        "SELECT layout FROM main.patina_state WHERE id = 0",
        [],
        |r| r.get(0),
    )?;
    if layout != ours_layout {
        return Err(refused(format!(
            "the snapshot's clocks are of layout {layout}, this database's of {ours_layout}"
        )));
    }
    if let Some(why) = why_not_empty(conn)? {
        return Err(refused(why));
    }
    let knows_us: Option<i64> = conn
        .query_row(
            &format!("SELECT 1 FROM {SCHEMA}.patina_seed_sites WHERE site_id = ?1"),
            params![local.as_slice()],
            |r| r.get(0),
        )
        .optional()?;
    if knows_us.is_some() {
        return Err(refused(
            "the snapshot holds changes credited to this node's own site id",
        ));
    }
    let ours = replicated_tables(conn)?;
    let theirs: Vec<String> = conn
        .prepare(&format!("SELECT name FROM {SCHEMA}.patina_seed_tables"))?
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    // Tables are copied one after another: a child row may come before its parent.
    // Foreign keys (when the app turned them on) are checked at the commit instead.
    conn.execute_batch("PRAGMA defer_foreign_keys = ON")?;
    conn.execute("UPDATE main.patina_state SET merging = 1 WHERE id = 0", [])?;
    conn.execute_batch(&format!(
        "INSERT INTO main.patina_sites (site_id)
             SELECT site_id FROM {SCHEMA}.patina_seed_sites WHERE true
             ON CONFLICT (site_id) DO NOTHING;
         DROP TABLE IF EXISTS temp.patina_seed_ords;
         CREATE TEMP TABLE patina_seed_ords (old INTEGER PRIMARY KEY, new INTEGER NOT NULL);
         INSERT INTO temp.patina_seed_ords
             SELECT s.ord, m.ord FROM {SCHEMA}.patina_seed_sites s
             JOIN main.patina_sites m ON m.site_id = s.site_id;"
    ))?;
    for table in &theirs {
        if !ours.contains(table) {
            return Err(refused(format!(
                "the sender replicates table {table}, which this node does not have (yet)"
            )));
        }
        let clock = format!("{table}{CLOCK_SUFFIX}");
        let keys = key_columns(conn, table)?;
        for (kind, target) in [("data", table), ("clock", &clock)] {
            let copy = format!("{kind}:{table}");
            let here = columns(conn, "main", target)?;
            let there = columns(conn, SCHEMA, &copy)?;
            if here != there {
                return Err(refused(format!(
                    "table {target} has columns ({}) here and ({}) at the sender",
                    here.join(", "),
                    there.join(", ")
                )));
            }
            if kind == "clock" {
                check_bounds(conn, &copy, &here)?;
            }
            let list = here.iter().map(|c| quote(c)).collect::<Vec<_>>().join(", ");
            // Clock columns naming a site hold the sender's ordinals: mapped to ours.
            let select = here
                .iter()
                .map(|c| {
                    let site_column = kind == "clock"
                        && !keys.contains(c)
                        && (c == "__patina_s_site" || c.ends_with("__patina_site"));
                    if site_column {
                        format!(
                            "(SELECT new FROM temp.patina_seed_ords WHERE old = {q})",
                            q = quote(c)
                        )
                    } else {
                        quote(c)
                    }
                })
                .collect::<Vec<_>>()
                .join(", ");
            conn.execute_batch(&format!(
                "INSERT INTO main.{t} ({list}) SELECT {select} FROM {SCHEMA}.{c};",
                t = quote(target),
                c = quote(&copy)
            ))?;
        }
    }
    conn.execute_batch(&format!(
        "INSERT INTO main.patina_origin_ranges (site_id, start, \"end\")
             SELECT site_id, start, \"end\" FROM {SCHEMA}.patina_seed_ranges;
         INSERT INTO main.patina_collected (site_id, upto)
             SELECT site_id, upto FROM {SCHEMA}.patina_seed_collected WHERE true
             ON CONFLICT (site_id) DO UPDATE SET upto = max(upto, excluded.upto);
         DROP TABLE temp.patina_seed_ords;"
    ))?;
    if origin_version > 0 {
        conn.execute(
            "INSERT INTO main.patina_origin_ranges (site_id, start, \"end\") VALUES (?1, 1, ?2)",
            params![sender.as_slice(), origin_version],
        )?;
    }
    let bindings = store_bindings(conn, bindings)?;
    conn.execute(
        "UPDATE main.patina_state SET db_version = max(db_version, ?1), \
         cl_floor = max(cl_floor, ?2), merging = 0 WHERE id = 0",
        params![db_version, cl_floor],
    )?;
    conn.execute(
        "INSERT INTO patina_sync_cursors (peer_site, after) VALUES (?1, ?2) \
         ON CONFLICT (peer_site) DO UPDATE SET after = max(after, excluded.after)",
        params![sender.as_slice(), db_version],
    )?;
    let versions: i64 = conn.query_row(
        "SELECT coalesce(sum(\"end\" - start + 1), 0) FROM main.patina_origin_ranges",
        [],
        |r| r.get(0),
    )?;
    Ok(Installed {
        versions: u64::try_from(versions).unwrap_or(0),
        cursor: db_version,
        bindings,
    })
}

/// SQL that holds for a binding row worth reading: a 16-byte site id, a short text
/// identity, an integer time.
fn well_formed_binding(site: &str, identity: &str, seen: &str) -> String {
    format!(
        "typeof({site}) = 'blob' AND length({site}) = 16 AND typeof({identity}) = 'text' \
         AND length({identity}) <= {MAX_IDENTITY_LEN} AND typeof({seen}) = 'integer'"
    )
}

/// The longest identity a binding may name (a certificate identity is 83 bytes).
const MAX_IDENTITY_LEN: usize = 256;

/// The snapshot's site bindings to certificates, with when each site was last seen:
/// checked (at most [`MAX_BINDINGS`] rows, every one well formed, or the snapshot is
/// refused); kinds of identity this build does not carry (`sync::is_portable`), this
/// node's own site and the sender's left out. A snapshot of a release that carried none
/// has no table: no bindings.
fn seed_bindings(
    conn: &Connection,
    sender: &SiteId,
    local: &SiteId,
) -> Result<Vec<(SiteId, String, i64)>, SeedError> {
    if !has_table_in(conn, SCHEMA, "patina_seed_bindings")? {
        return Ok(Vec::new());
    }
    let (count, odd): (i64, i64) = conn.query_row(
        &format!(
            "SELECT count(*), count(*) FILTER (WHERE NOT ({ok})) \
             FROM {SCHEMA}.patina_seed_bindings",
            ok = well_formed_binding("site_id", "identity", "last_seen")
        ),
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    if count > MAX_BINDINGS {
        return Err(refused(format!(
            "the snapshot carries {count} site bindings (at most {MAX_BINDINGS})"
        )));
    }
    if odd > 0 {
        return Err(refused("the snapshot carries a malformed site binding"));
    }
    let mut read = conn.prepare(&format!(
        "SELECT site_id, identity, last_seen FROM {SCHEMA}.patina_seed_bindings"
    ))?;
    let rows = read.query_map([], |r| {
        Ok((
            r.get::<_, Vec<u8>>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, i64>(2)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (site, identity, seen) = row?;
        let Ok(site) = SiteId::try_from(site.as_slice()) else {
            return Err(refused("the snapshot carries a malformed site binding"));
        };
        // This node's own site is never bound; the sender's is bound to the peer that
        // sent the snapshot, which this node saw itself.
        if site != *local && site != *sender && is_portable(&identity) {
            out.push((site, identity, seen));
        }
    }
    Ok(out)
}

/// Stores the carried bindings where this node has none of its own: a site id stays
/// bound to the first identity this node saw present it, or failing that the one its
/// sender saw. A carried binding that disagrees with one this node made is logged and
/// dropped, and so is one past [`MAX_SITES_PER_IDENTITY`] for its identity (a snapshot
/// cannot use up an honest peer's allowance). Each stored binding's site gets the
/// sender's last-seen time, so it is forgotten as the sender would forget it. Returns
/// the bindings stored.
fn store_bindings(
    conn: &Connection,
    carried: Vec<(SiteId, String, i64)>,
) -> Result<Vec<(SiteId, String)>, SeedError> {
    let mut held = bookkeeping::load_bindings(conn)?;
    let mut per_identity: HashMap<String, usize> = HashMap::new();
    for identity in held.values() {
        *per_identity.entry(identity.clone()).or_default() += 1;
    }
    let mut stored = Vec::new();
    for (site, identity, last_seen) in carried {
        match held.get(&site) {
            Some(mine) if *mine == identity => continue,
            Some(mine) => {
                tracing::warn!(
                    site_id = %hex::encode(site),
                    "the snapshot binds site id {} to {identity}, but this node bound it to \
                     {mine}; keeping {mine}",
                    hex::encode(site)
                );
                continue;
            }
            None => {}
        }
        let n = per_identity.entry(identity.clone()).or_default();
        if *n >= MAX_SITES_PER_IDENTITY {
            tracing::warn!(
                site_id = %hex::encode(site),
                "the snapshot binds site id {} to {identity}, which holds \
                 {MAX_SITES_PER_IDENTITY} site ids here already; not bound",
                hex::encode(site)
            );
            continue;
        }
        *n += 1;
        bookkeeping::bind_site(conn, &site, &identity)?;
        retention::note_seen(conn, &site, last_seen)?;
        held.insert(site, identity.clone());
        stored.push((site, identity));
    }
    Ok(stored)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Synchronous;
    use crate::db::bookkeeping;

    const SCHEMA_SQL: &str = "CREATE TABLE t (id INTEGER PRIMARY KEY NOT NULL, a TEXT, b);
                              CREATE TABLE k (x TEXT NOT NULL, y INTEGER NOT NULL, PRIMARY KEY (x, y));
                              SELECT crsql_as_crr('t'); SELECT crsql_as_crr('k');";

    /// A node's database with the extension loaded and the tables above; `None` when
    /// libpatina.so is not built.
    fn node(dir: &Path, name: &str, schema: &str) -> Option<(Connection, PathBuf)> {
        let ext = crate::db::extension_path(None).ok()?;
        let path = dir.join(name);
        let conn = crate::db::open(&path, &ext, Synchronous::Normal).expect("open");
        conn.execute_batch(schema).expect("schema");
        bookkeeping::ensure(&conn).expect("bookkeeping");
        Some((conn, path))
    }

    fn site(conn: &Connection) -> SiteId {
        let v: Vec<u8> = conn
            .query_row("SELECT crsql_site_id()", [], |r| r.get(0))
            .expect("site id");
        SiteId::try_from(v.as_slice()).expect("16 bytes")
    }

    /// Rows, clocks as the feed shows them, and what is held per origin.
    fn state(conn: &Connection) -> Vec<String> {
        let mut out = Vec::new();
        for sql in [
            "SELECT id || '|' || quote(a) || '|' || quote(b) FROM t ORDER BY id",
            "SELECT x || '|' || y FROM k ORDER BY x, y",
            "SELECT \"table\" || '|' || hex(pk) || '|' || cid || '|' || quote(val) || '|' || \
             col_version || '|' || cl || '|' || hex(site_id) FROM crsql_changes ORDER BY 1",
            "SELECT hex(site_id) || '|' || start || '|' || \"end\" FROM patina_origin_held \
             ORDER BY 1",
        ] {
            let mut s = conn.prepare(sql).expect("prepare");
            let rows = s.query_map([], |r| r.get::<_, String>(0)).expect("query");
            out.extend(rows.map(|r| r.expect("row")));
            out.push("--".into());
        }
        out
    }

    /// Merges every change of `from` into `into` (cr-sqlite's way: plain inserts).
    fn merge_all(from: &Connection, into: &Connection) {
        let mut s = from
            .prepare(
                "SELECT \"table\", pk, cid, val, col_version, db_version, site_id, cl, seq, \
                 origin_version FROM crsql_changes",
            )
            .expect("read feed");
        let rows: Vec<Vec<rusqlite::types::Value>> = s
            .query_map([], |r| (0..10).map(|i| r.get(i)).collect())
            .expect("query")
            .map(|r| r.expect("row"))
            .collect();
        for row in rows {
            into.execute(
                "INSERT INTO crsql_changes (\"table\", pk, cid, val, col_version, db_version, \
                 site_id, cl, seq, origin_version) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                rusqlite::params_from_iter(row),
            )
            .expect("merge");
        }
    }

    /// A sender holding its own writes (insert, update, delete, resurrection) and another
    /// origin's, merged.
    fn sender(dir: &Path) -> Option<(Connection, PathBuf)> {
        let (other, _) = node(dir, "other.db", SCHEMA_SQL)?;
        other
            .execute_batch(
                "INSERT INTO t VALUES (100, 'other', 1); INSERT INTO k VALUES ('o', 1);
                 UPDATE t SET b = 2 WHERE id = 100;",
            )
            .expect("other writes");
        let (s, path) = node(dir, "sender.db", SCHEMA_SQL)?;
        s.execute_batch(
            "INSERT INTO t VALUES (1, 'a', NULL), (2, 'b', X'00FF'), (3, 'c', 3.5);
             UPDATE t SET a = 'A' WHERE id = 1;
             DELETE FROM t WHERE id = 2;
             DELETE FROM t WHERE id = 3; INSERT INTO t VALUES (3, 'again', NULL);
             INSERT INTO k VALUES ('s', 1), ('s', 2); DELETE FROM k WHERE y = 2;",
        )
        .expect("sender writes");
        merge_all(&other, &s);
        Some((s, path))
    }

    #[test]
    fn a_snapshot_installs_rows_clocks_and_held_versions_exactly() {
        let dir = tempfile::tempdir().expect("tempdir");
        let Some((s, sender_path)) = sender(dir.path()) else {
            return;
        };
        let file = dir.path().join("snap");
        let size = export(&sender_path, &file).expect("export");
        assert!(size > 0);
        let Some((mut j, _)) = node(dir.path(), "joiner.db", SCHEMA_SQL) else {
            return;
        };
        let (sender_site, joiner_site) = (site(&s), site(&j));
        let done = install(&mut j, &file, &sender_site, &joiner_site).expect("install");
        let dbv: i64 = s
            .query_row("SELECT crsql_db_version()", [], |r| r.get(0))
            .expect("db version");
        assert_eq!(done.cursor, dbv);
        assert_eq!(
            state(&j),
            state(&s),
            "rows, clocks and held versions identical"
        );
        assert_eq!(
            bookkeeping::cursor(&j, &sender_site).expect("cursor"),
            dbv,
            "the joiner's cursor into the sender's feed"
        );
        // The joiner's own next write is its own, numbered after the copied clocks.
        j.execute("UPDATE t SET a = 'joiner' WHERE id = 1", [])
            .expect("write");
        let (own, jdbv): (i64, i64) = j
            .query_row(
                "SELECT origin_version, db_version FROM patina_state",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .expect("counters");
        assert_eq!(own, 1);
        assert!(jdbv > dbv);
        // And it replicates back: the sender converges to the joiner's state.
        merge_all(&j, &s);
        assert_eq!(
            state(&s),
            state(&j),
            "the sender holds the joiner's write too"
        );
    }

    #[test]
    fn a_snapshot_carries_the_senders_certificate_bindings_where_the_joiner_has_none() {
        let dir = tempfile::tempdir().expect("tempdir");
        let Some((s, sender_path)) = sender(dir.path()) else {
            return;
        };
        let Some((mut j, _)) = node(dir.path(), "joiner.db", SCHEMA_SQL) else {
            return;
        };
        let (sender_site, joiner_site) = (site(&s), site(&j));
        let cert = |n: u8| {
            format!(
                "{}{}",
                crate::sync::CERTIFICATE_PREFIX,
                hex::encode([n; 32])
            )
        };
        let seen = |conn: &Connection, site: &SiteId, t: i64| {
            conn.execute(
                "INSERT INTO patina_site_seen (site_id, last_seen) VALUES (?1, ?2)",
                params![site.as_slice(), t],
            )
            .expect("seen");
        };
        // At the sender, each with a last-seen time unless said otherwise.
        for (site, identity, t) in [
            ([3; 16], cert(3), Some(1234)),                        // carried
            ([7; 16], cert(7), Some(1234)),                        // the joiner bound it to another
            ([4; 16], cert(9), Some(1234)), // cert 9 holds 16 ids at the joiner
            ([6; 16], cert(6), None),       // not recorded as seen yet
            ([8; 16], "address 10.0.0.8:7000".into(), Some(1234)), // an address: not carried
            (joiner_site, cert(1), Some(1234)), // the joiner's own id
            (sender_site, cert(2), Some(1234)), // the sender's own id
        ] {
            bookkeeping::bind_site(&s, &site, &identity).expect("bind at the sender");
            if let Some(t) = t {
                seen(&s, &site, t);
            }
        }
        // At the joiner, made while joining.
        bookkeeping::bind_site(&j, &[7; 16], "address 10.9.9.9:7000").expect("bind");
        for k in 0..MAX_SITES_PER_IDENTITY {
            bookkeeping::bind_site(&j, &[100 + k as u8; 16], &cert(9)).expect("bind");
        }
        let before = bookkeeping::load_bindings(&j).expect("bindings");
        let file = dir.path().join("snap");
        export(&sender_path, &file).expect("export");

        // A malformed binding refuses the snapshot, changing nothing; an identity of a kind
        // this build does not carry is skipped.
        let bad = dir.path().join("bad");
        let cases = [
            ("x'0102', 'x', 1", true),
            ("zeroblob(16), x'00', 1", true),
            ("zeroblob(16), 'spiffe://cluster/node', 1", false),
        ];
        for (n, (row, refused_whole)) in cases.into_iter().enumerate() {
            std::fs::copy(&file, &bad).expect("copy");
            Connection::open(&bad)
                .and_then(|c| {
                    c.execute_batch(&format!("INSERT INTO patina_seed_bindings VALUES ({row})"))
                })
                .expect("tamper");
            let Some((mut fresh, _)) = node(dir.path(), &format!("fresh-{n}.db"), SCHEMA_SQL)
            else {
                return;
            };
            let fresh_site = site(&fresh);
            let r = install(&mut fresh, &bad, &sender_site, &fresh_site);
            if refused_whole {
                let e = r.expect_err("refused");
                assert!(e.to_string().contains("malformed site binding"), "{e}");
                assert!(bookkeeping::load_bindings(&fresh)
                    .expect("bindings")
                    .is_empty());
            } else {
                let done = r.expect("installed");
                assert!(done
                    .bindings
                    .iter()
                    .all(|(_, i)| i.starts_with("certificate ")));
            }
        }

        let done = install(&mut j, &file, &sender_site, &joiner_site).expect("install");
        let mut carried = done.bindings.clone();
        carried.sort();
        assert_eq!(carried, vec![([3; 16], cert(3)), ([6; 16], cert(6))]);
        let mut expected = before;
        expected.insert([3; 16], cert(3));
        expected.insert([6; 16], cert(6));
        assert_eq!(
            bookkeeping::load_bindings(&j).expect("bindings"),
            expected,
            "only the certificate binding of a site seen and unbound here; the joiner's own \
             binding kept; nothing past 16 sites for one certificate; nothing for the joiner's \
             own site or the sender's"
        );
        // Carried with the sender's last-seen time (or the export's, for a site the
        // sender had not recorded yet), it is forgotten as the sender would forget it.
        let gone = crate::db::retention::forget_departed(&mut j, 2000).expect("forget");
        assert_eq!(gone, vec![[3; 16]]);
        let left = bookkeeping::load_bindings(&j).expect("bindings");
        assert!(!left.contains_key(&[3; 16]) && left.contains_key(&[6; 16]));
    }

    #[test]
    fn no_snapshot_while_units_wait_in_the_schema_buffer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let Some((s, path)) = sender(dir.path()) else {
            return;
        };
        crate::db::buffer::ensure(&s).expect("buffer tables");
        s.execute(
            "INSERT INTO patina_schema_buffer (kind, site, from_v, to_v, missing, received_at) \
             VALUES ('unit', x'07', 0, 3, 'table x', 0)",
            [],
        )
        .expect("a buffered unit");
        let file = dir.path().join("snap");
        let e = export(&path, &file).expect_err("refused");
        assert!(e.to_string().contains("schema buffer"), "{e}");
        assert!(!file.exists(), "no file left behind");
    }

    #[test]
    fn leftover_snapshot_files_are_removed_and_nothing_else() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("node.db");
        for f in [
            "node.db",
            "node.db.seed-in",
            "node.db.seed-out-00ff",
            "other.db.seed-in",
        ] {
            std::fs::write(dir.path().join(f), b"x").expect("write");
        }
        assert_eq!(remove_leftovers(&db), 2);
        assert!(db.exists() && dir.path().join("other.db.seed-in").exists());
        assert!(!dir.path().join("node.db.seed-in").exists());
    }

    #[test]
    fn an_install_that_does_not_fit_changes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let Some((s, sender_path)) = sender(dir.path()) else {
            return;
        };
        let sender_site = site(&s);
        let file = dir.path().join("snap");
        export(&sender_path, &file).expect("export");

        // Not empty: the joiner's app wrote a row.
        let Some((mut j, _)) = node(dir.path(), "written.db", SCHEMA_SQL) else {
            return;
        };
        j.execute("INSERT INTO t VALUES (7, 'mine', NULL)", [])
            .expect("write");
        let before = state(&j);
        let local = site(&j);
        let e = install(&mut j, &file, &sender_site, &local).expect_err("refused");
        assert!(matches!(e, SeedError::Refused(_)), "{e}");
        assert_eq!(state(&j), before, "nothing changed");

        // Another schema.
        let Some((mut j, _)) = node(
            dir.path(),
            "other-schema.db",
            "CREATE TABLE t (id INTEGER PRIMARY KEY NOT NULL, a TEXT);
             CREATE TABLE k (x TEXT NOT NULL, y INTEGER NOT NULL, PRIMARY KEY (x, y));
             SELECT crsql_as_crr('t'); SELECT crsql_as_crr('k');",
        ) else {
            return;
        };
        let local = site(&j);
        let e = install(&mut j, &file, &sender_site, &local).expect_err("refused");
        assert!(e.to_string().contains("columns"), "{e}");
        let copied: i64 = j
            .query_row(
                "SELECT (SELECT count(*) FROM t) + (SELECT count(*) FROM k) \
                 + (SELECT count(*) FROM patina_origin_ranges)",
                [],
                |r| r.get(0),
            )
            .expect("count");
        assert_eq!(copied, 0, "nothing changed");

        // Not from the peer that sent it.
        let Some((mut j, _)) = node(dir.path(), "j3.db", SCHEMA_SQL) else {
            return;
        };
        let local = site(&j);
        let e = install(&mut j, &file, &[9; 16], &local).expect_err("refused");
        assert!(e.to_string().contains("not of the peer"), "{e}");

        // A clock out of bounds.
        let bad = dir.path().join("bad");
        std::fs::copy(&file, &bad).expect("copy");
        Connection::open(&bad)
            .and_then(|c| {
                c.execute(
                    "UPDATE \"clock:t\" SET a__patina_v = (1 << 62) + 1 WHERE id = 1",
                    [],
                )
            })
            .expect("tamper");
        let e = install(&mut j, &bad, &sender_site, &local).expect_err("refused");
        assert!(e.to_string().contains("out of bounds"), "{e}");

        // A view smuggled in.
        std::fs::copy(&file, &bad).expect("copy");
        Connection::open(&bad)
            .and_then(|c| c.execute_batch("CREATE VIEW v AS SELECT 1"))
            .expect("tamper");
        let e = install(&mut j, &bad, &sender_site, &local).expect_err("refused");
        assert!(e.to_string().contains("views"), "{e}");

        // A damaged file.
        let bytes = std::fs::read(&file).expect("read");
        std::fs::write(&bad, &bytes[..bytes.len() / 2]).expect("truncate");
        assert!(install(&mut j, &bad, &sender_site, &local).is_err());
        assert!(state(&j).iter().all(|l| l == "--"), "nothing changed");

        // The right file still installs afterwards.
        install(&mut j, &file, &sender_site, &local).expect("install");
        assert_eq!(state(&j), state(&s));
    }
}
