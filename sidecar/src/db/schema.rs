//! Schema files: `.sql` files (or folders of them, in name order) of `CREATE TABLE` and
//! `CREATE INDEX`, applied at start and on reload.
//!
//! The files are first run into a scratch in-memory database to learn what they declare.
//! Then, against the node's database: a missing table is created from its declaration,
//! an existing table with fewer columns gets the new ones added inside
//! `crsql_begin_alter`/`crsql_commit_alter` (so the extension migrates its clocks without
//! a per-row backfill), missing indexes are created, and every declared table is made
//! replicated with `crsql_as_crr` (idempotent). All in one transaction.
//!
//! Also what the node knows of its own schema for replication ([`replicated`],
//! [`SchemaCache`]): the replicated tables and columns that remote changes may name,
//! and their fingerprint, which units carry (`sync::schema`).

use std::path::PathBuf;

use rusqlite::{Connection, TransactionBehavior};

use crate::sync::Schema;

/// Errors applying schema files; none of them has changed the database (one transaction).
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// A schema path could not be read.
    #[error("cannot read schema path {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A schema file is not valid SQL (checked in a scratch database).
    #[error("schema file {path}: {source}")]
    Invalid {
        path: PathBuf,
        source: rusqlite::Error,
    },
    /// Applying a table to the node's database failed (the extension's refusal names the
    /// offending column or index).
    #[error("schema table {table}: {source}")]
    Table {
        table: String,
        source: rusqlite::Error,
    },
    /// Opening or committing the schema transaction failed.
    #[error("applying schema: {0}")]
    Sqlite(#[from] rusqlite::Error),
}

/// The `.sql` files of `paths`: files as given, folders' `.sql` entries sorted by name.
pub fn schema_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, SchemaError> {
    let mut out = Vec::new();
    for p in paths {
        let meta = std::fs::metadata(p).map_err(|source| SchemaError::Read {
            path: p.clone(),
            source,
        })?;
        if meta.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(p)
                .map_err(|source| SchemaError::Read {
                    path: p.clone(),
                    source,
                })?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.extension().is_some_and(|x| x == "sql"))
                .collect();
            files.sort();
            out.extend(files);
        } else {
            out.push(p.clone());
        }
    }
    Ok(out)
}

struct Declared {
    tables: Vec<(String, String)>,
    indexes: Vec<(String, String)>,
}

/// Runs the files into a scratch database and reads back what they declare.
fn declared(files: &[PathBuf]) -> Result<(Declared, Connection), SchemaError> {
    let scratch = Connection::open_in_memory()?;
    for f in files {
        let text = std::fs::read_to_string(f).map_err(|source| SchemaError::Read {
            path: f.clone(),
            source,
        })?;
        scratch
            .execute_batch(&text)
            .map_err(|source| SchemaError::Invalid {
                path: f.clone(),
                source,
            })?;
    }
    let read = |kind: &str| -> rusqlite::Result<Vec<(String, String)>> {
        let mut stmt = scratch.prepare(
            "SELECT name, sql FROM sqlite_schema WHERE type = ?1 AND sql IS NOT NULL \
             AND name NOT LIKE 'sqlite_%' ORDER BY rowid",
        )?;
        let rows = stmt.query_map([kind], |r| Ok((r.get(0)?, r.get(1)?)))?;
        rows.collect()
    };
    let d = Declared {
        tables: read("table")?,
        indexes: read("index")?,
    };
    Ok((d, scratch))
}

/// A column as `pragma_table_info` describes it.
struct Column {
    name: String,
    decl_type: String,
    not_null: bool,
    default: Option<String>,
}

fn columns(conn: &Connection, table: &str) -> rusqlite::Result<Vec<Column>> {
    let mut stmt =
        conn.prepare("SELECT name, type, \"notnull\", dflt_value FROM pragma_table_info(?1)")?;
    let rows = stmt.query_map([table], |r| {
        Ok(Column {
            name: r.get(0)?,
            decl_type: r.get(1)?,
            not_null: r.get::<_, i64>(2)? != 0,
            default: r.get(3)?,
        })
    })?;
    rows.collect()
}

/// `ident` as a quoted SQL identifier.
pub fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// Whether `main` has a table named `name`.
pub fn has_table(conn: &Connection, name: &str) -> rusqlite::Result<bool> {
    has_table_in(conn, "main", name)
}

/// Whether the attached database `schema` (a name of ours, not a caller's) has table `name`.
pub fn has_table_in(conn: &Connection, schema: &str, name: &str) -> rusqlite::Result<bool> {
    conn.prepare_cached(&format!(
        "SELECT 1 FROM {schema}.sqlite_schema WHERE type = 'table' AND name = ?1"
    ))?
    .exists([name])
}

/// The replicated tables of `main` (those with a clock table, `<table>__patina_clock`).
pub fn replicated_tables(conn: &Connection) -> rusqlite::Result<Vec<String>> {
    let clocks: Vec<String> = conn
        .prepare_cached(
            "SELECT name FROM main.sqlite_schema WHERE type = 'table' \
             AND substr(name, -length(?1)) = ?1 ORDER BY name",
        )?
        .query_map([CLOCK_SUFFIX], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    Ok(clocks
        .iter()
        .filter_map(|c| c.strip_suffix(CLOCK_SUFFIX).filter(|t| !t.is_empty()))
        .map(str::to_string)
        .collect())
}

/// Applies the schema files to `conn`; returns the tables made replicated.
pub fn apply(conn: &mut Connection, paths: &[PathBuf]) -> Result<Vec<String>, SchemaError> {
    let files = schema_files(paths)?;
    if files.is_empty() {
        return Ok(Vec::new());
    }
    let (decl, scratch) = declared(&files)?;
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    for (table, sql) in &decl.tables {
        let t_err = |source| SchemaError::Table {
            table: table.clone(),
            source,
        };
        let existing = columns(&tx, table).map_err(t_err)?;
        if existing.is_empty() {
            tx.execute_batch(sql).map_err(t_err)?;
        } else {
            let wanted = columns(&scratch, table).map_err(t_err)?;
            let missing: Vec<&Column> = wanted
                .iter()
                .filter(|w| {
                    !existing
                        .iter()
                        .any(|e| e.name.eq_ignore_ascii_case(&w.name))
                })
                .collect();
            if !missing.is_empty() {
                // Make sure the table is replicated before altering it under the extension.
                tx.query_row("SELECT crsql_as_crr(?1)", [table], |_| Ok(()))
                    .map_err(t_err)?;
                tx.query_row("SELECT crsql_begin_alter(?1)", [table], |_| Ok(()))
                    .map_err(t_err)?;
                for c in missing {
                    let mut def = format!("{} {}", quote(&c.name), c.decl_type);
                    if c.not_null {
                        def.push_str(" NOT NULL");
                    }
                    if let Some(d) = &c.default {
                        def.push_str(&format!(" DEFAULT {d}"));
                    }
                    tx.execute_batch(&format!("ALTER TABLE {} ADD COLUMN {def}", quote(table)))
                        .map_err(t_err)?;
                    tracing::info!(table = %table, column = %c.name, "schema: added column");
                }
                tx.query_row("SELECT crsql_commit_alter(?1)", [table], |_| Ok(()))
                    .map_err(t_err)?;
            }
        }
    }
    for (index, sql) in &decl.indexes {
        let exists: i64 = tx.query_row(
            "SELECT count(*) FROM sqlite_schema WHERE type = 'index' AND name = ?1",
            [index],
            |r| r.get(0),
        )?;
        if exists == 0 {
            tx.execute_batch(sql).map_err(|source| SchemaError::Table {
                table: index.clone(),
                source,
            })?;
        }
    }
    let mut made = Vec::new();
    for (table, _) in &decl.tables {
        tx.query_row("SELECT crsql_as_crr(?1)", [table], |_| Ok(()))
            .map_err(|source| SchemaError::Table {
                table: table.clone(),
                source,
            })?;
        made.push(table.clone());
    }
    tx.commit()?;
    Ok(made)
}

/// Replicated tables whose columns no longer match their clocks: an app altered the table
/// without `crsql_begin_alter`/`crsql_commit_alter` (it need not load the extension to run
/// `ALTER TABLE`), so the capture triggers still describe the old columns. Each such table
/// is migrated with `crsql_commit_alter`, which regenerates its triggers; returns the
/// repaired tables. Cheap when nothing drifted: two pragma reads per replicated table.
pub fn repair_drift(conn: &Connection) -> Result<Vec<String>, SchemaError> {
    let mut repaired = Vec::new();
    for table in replicated_tables(conn)? {
        let table = table.as_str();
        let clock = format!("{table}{CLOCK_SUFFIX}");
        let names = |t: &str| -> rusqlite::Result<Vec<String>> {
            conn.prepare("SELECT name FROM pragma_table_info(?1) WHERE pk = 0")?
                .query_map([t], |r| r.get(0))?
                .collect()
        };
        let mut base: Vec<String> = names(table)?;
        let mut clocked: Vec<String> = names(&clock)?
            .into_iter()
            .filter_map(|c| c.strip_suffix("__patina_v").map(str::to_string))
            .collect();
        base.sort();
        clocked.sort();
        if base != clocked {
            conn.query_row("SELECT crsql_commit_alter(?1)", [table], |_| Ok(()))
                .map_err(|source| SchemaError::Table {
                    table: table.to_string(),
                    source,
                })?;
            tracing::warn!(
                table,
                "schema: the table was altered without crsql_begin_alter/crsql_commit_alter; \
                 its clocks and capture triggers were regenerated"
            );
            repaired.push(table.to_string());
        }
    }
    Ok(repaired)
}

/// The suffix of a replicated table's clock table: `<table>__patina_clock`
/// (`ext/src/schema.rs`).
pub const CLOCK_SUFFIX: &str = "__patina_clock";

/// The replicated tables of `conn` (those with a clock table) and all their columns: what
/// remote changes may name here (`sync::Schema`). A few pragma reads per table.
pub fn replicated(conn: &Connection) -> rusqlite::Result<Schema> {
    let mut tables = Vec::new();
    for table in replicated_tables(conn)? {
        let table = table.as_str();
        let cols: Vec<String> = conn
            .prepare_cached("SELECT name FROM pragma_table_info(?1)")?
            .query_map([table], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        if !cols.is_empty() {
            tables.push((table.to_string(), cols));
        }
    }
    Ok(Schema::new(tables))
}

/// `PRAGMA schema_version`: changes with every schema change, by any connection.
pub fn schema_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.prepare_cached("PRAGMA schema_version")?
        .query_row([], |r| r.get(0))
}

/// The replicated schema of one connection, re-read only when `PRAGMA schema_version`
/// moved: the tailer stamps every unit with its fingerprint and the apply thread checks
/// remote changes against it, both far more often than the schema changes.
#[derive(Debug, Default)]
pub struct SchemaCache {
    version: Option<i64>,
    schema: Schema,
    fingerprint: u64,
}

impl SchemaCache {
    /// Re-reads the schema if it changed since the last call; returns whether it did.
    pub fn refresh(&mut self, conn: &Connection) -> rusqlite::Result<bool> {
        let v = schema_version(conn)?;
        if self.version == Some(v) {
            return Ok(false);
        }
        self.schema = replicated(conn)?;
        self.fingerprint = self.schema.fingerprint();
        self.version = Some(v);
        Ok(true)
    }

    /// The `PRAGMA schema_version` the cache was read at (`None` before the first read).
    pub fn version(&self) -> Option<i64> {
        self.version
    }

    pub fn schema(&self) -> &Schema {
        &self.schema
    }

    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }
}

/// Display helper for logs.
pub fn describe(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folders_are_expanded_in_name_order_and_declarations_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("b.sql"), "CREATE INDEX t_a ON t(a);").expect("write");
        std::fs::write(
            dir.path().join("a.sql"),
            "CREATE TABLE t (id INTEGER PRIMARY KEY NOT NULL, a TEXT);",
        )
        .expect("write");
        std::fs::write(dir.path().join("notes.txt"), "x").expect("write");
        let files = schema_files(&[dir.path().to_path_buf()]).expect("files");
        let names: Vec<_> = files
            .iter()
            .filter_map(|f| f.file_name().and_then(|n| n.to_str()).map(String::from))
            .collect();
        assert_eq!(names, vec!["a.sql", "b.sql"]);
        let (d, _) = declared(&files).expect("declared");
        assert_eq!(d.tables.len(), 1);
        assert_eq!(d.indexes[0].0, "t_a");
    }

    #[test]
    fn a_bad_file_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("bad.sql");
        std::fs::write(&f, "CREATE TABLE (;").expect("write");
        let Err(err) = declared(&[f]) else {
            panic!("a bad schema file was accepted")
        };
        assert!(err.to_string().contains("bad.sql"), "{err}");
    }

    #[test]
    fn missing_path_is_named() {
        let err = schema_files(&[PathBuf::from("/nonexistent/x.sql")]).expect_err("error");
        assert!(err.to_string().contains("/nonexistent/x.sql"));
    }

    #[test]
    fn existing_tables_gain_new_columns_and_stay_replicated() {
        let Ok(ext) = crate::db::extension_path(None) else {
            eprintln!("libpatina.so not built (cargo build -p patina): skipped");
            return;
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("s.sql");
        let mut conn = crate::db::open(
            &dir.path().join("t.db"),
            &ext,
            crate::config::Synchronous::Normal,
        )
        .expect("open");
        std::fs::write(&f, "CREATE TABLE m (id TEXT PRIMARY KEY NOT NULL, a TEXT);")
            .expect("write");
        assert_eq!(
            apply(&mut conn, std::slice::from_ref(&f)).expect("apply"),
            vec!["m"]
        );
        conn.execute("INSERT INTO m (id, a) VALUES ('x', 'one')", [])
            .expect("insert");
        std::fs::write(
            &f,
            "CREATE TABLE m (id TEXT PRIMARY KEY NOT NULL, a TEXT, \
             b INTEGER NOT NULL DEFAULT 7);\nCREATE INDEX m_b ON m(b);",
        )
        .expect("write");
        apply(&mut conn, std::slice::from_ref(&f)).expect("migrate");
        apply(&mut conn, &[f]).expect("idempotent");
        let b: i64 = conn
            .query_row("SELECT b FROM m WHERE id = 'x'", [], |r| r.get(0))
            .expect("new column");
        assert_eq!(b, 7);
        conn.execute("UPDATE m SET b = 8 WHERE id = 'x'", [])
            .expect("update");
        let n: i64 = conn
            .query_row(
                "SELECT count(*) FROM crsql_changes WHERE \"table\" = 'm' AND cid = 'b'",
                [],
                |r| r.get(0),
            )
            .expect("changes");
        assert_eq!(n, 1, "writes to the new column are captured");
    }

    /// The cache re-reads the replicated schema only when it changed, and an added
    /// column (or a table made replicated) changes the fingerprint.
    #[test]
    fn the_cache_follows_schema_changes_and_the_fingerprint_sees_them() {
        let Ok(ext) = crate::db::extension_path(None) else {
            eprintln!("libpatina.so not built (cargo build -p patina): skipped");
            return;
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("s.sql");
        let mut conn = crate::db::open(
            &dir.path().join("t.db"),
            &ext,
            crate::config::Synchronous::Normal,
        )
        .expect("open");
        conn.execute_batch("CREATE TABLE plain (id INTEGER PRIMARY KEY NOT NULL, x);")
            .expect("a table that is not replicated");
        std::fs::write(&f, "CREATE TABLE m (id TEXT PRIMARY KEY NOT NULL, a TEXT);")
            .expect("write");
        apply(&mut conn, std::slice::from_ref(&f)).expect("apply");
        let mut cache = SchemaCache::default();
        assert!(cache.refresh(&conn).expect("read"));
        assert!(
            !cache.refresh(&conn).expect("read"),
            "unchanged: not re-read"
        );
        assert_eq!(cache.schema().tables().collect::<Vec<_>>(), vec!["m"]);
        assert_eq!(
            cache.fingerprint(),
            Schema::new([("m", ["id", "a"])]).fingerprint()
        );
        let before = cache.fingerprint();
        std::fs::write(
            &f,
            "CREATE TABLE m (id TEXT PRIMARY KEY NOT NULL, a TEXT, b TEXT);",
        )
        .expect("write");
        apply(&mut conn, std::slice::from_ref(&f)).expect("migrate");
        assert!(cache.refresh(&conn).expect("read"));
        assert_ne!(cache.fingerprint(), before);
        assert_eq!(
            cache.fingerprint(),
            Schema::new([("m", ["id", "a", "b"])]).fingerprint()
        );
    }
}
