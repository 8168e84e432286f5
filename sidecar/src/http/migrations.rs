//! `POST /v1/migrations`: Corrosion's schema call — a JSON array of `CREATE TABLE` /
//! `CREATE INDEX` statements — with the same effect as a schema file.
//!
//! The statements are kept as files in a folder beside the database,
//! `<db.path>.schema.d/`, one file per table (`t-<name>.sql`) and per index
//! (`x-<name>.sql`, after the tables in name order). The node applies that folder after
//! `db.schema_paths` at every start and `reload`, so a restart keeps what was migrated.
//! Sending a table again replaces its file: like Corrosion's schema, the declaration is
//! the wanted state, and the schema code adds the missing columns.
//!
//! A migration is staged in a copy of the folder and applied from there (one
//! transaction, see `db::schema`); only when that succeeds does the copy replace the
//! folder. A refused migration changes neither the database nor the folder.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::{actor_id, body_bytes, require_json, AppState, HttpError};
use crate::db::schema;

/// One migration at a time: staging and swapping the folder is not concurrent-safe.
static MIGRATING: Mutex<()> = Mutex::new(());

/// The folder holding the statements received through `/v1/migrations`.
pub fn migrations_dir(db: &Path) -> PathBuf {
    let mut s = db.as_os_str().to_owned();
    s.push(".schema.d");
    PathBuf::from(s)
}

/// The schema paths a node applies: the configured ones, then the migrations folder when
/// it exists.
pub fn schema_paths(configured: &[PathBuf], db: &Path) -> Vec<PathBuf> {
    let mut paths = configured.to_vec();
    let dir = migrations_dir(db);
    if dir.is_dir() {
        paths.push(dir);
    }
    paths
}

/// `POST /v1/migrations`: 200 `{"results": [], "time", "version": null, "actor_id"}` as
/// Corrosion answered; a refused migration is 400 with `{"results": [{"error"}], ...}`.
pub async fn post_migrations(
    State(st): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, HttpError> {
    require_json(&headers)?;
    let body = body_bytes(body, st.api.max_body)?;
    let statements: Vec<String> = serde_json::from_slice(&body).map_err(|e| {
        HttpError::MalformedJson(format!(
            "expected a JSON array of SQL strings (CREATE TABLE / CREATE INDEX): {e}"
        ))
    })?;
    let start = Instant::now();
    let actor = actor_id(&st.shared.site_id_hex);
    let shared = st.shared.clone();
    let res = tokio::task::spawn_blocking(move || {
        let _one = MIGRATING.lock().unwrap_or_else(|p| p.into_inner());
        migrate(&shared, &statements)
    })
    .await
    .map_err(|e| HttpError::Internal(format!("migration task failed: {e}")))?;
    let time = start.elapsed().as_secs_f64();
    match res {
        Ok(tables) => {
            tracing::info!(?tables, "schema migrated through /v1/migrations");
            st.subs.refresh_all();
            Ok(Json(json!({
                "results": [], "time": time, "version": null, "actor_id": actor
            }))
            .into_response())
        }
        Err(MigrationError::Refused(error)) => Ok((
            StatusCode::BAD_REQUEST,
            Json(json!({
                "results": [{ "error": error }], "time": time, "version": null, "actor_id": actor
            })),
        )
            .into_response()),
        Err(MigrationError::Node(e)) => Err(e),
    }
}

/// Why a migration did not happen; neither changed the database or the folder.
#[derive(Debug)]
enum MigrationError {
    /// The statements are not an acceptable schema (the caller's mistake).
    Refused(String),
    /// The node could not stage or swap the folder (its own fault).
    Node(HttpError),
}

/// Validates, stages, applies and persists one migration; returns the replicated tables.
fn migrate(
    shared: &crate::node::NodeShared,
    statements: &[String],
) -> Result<Vec<String>, MigrationError> {
    let files = declare(statements).map_err(MigrationError::Refused)?;
    let dir = migrations_dir(&shared.db_path);
    let staged = sibling(&dir, "new");
    let node = |what: &str, e: std::io::Error| {
        MigrationError::Node(HttpError::Internal(format!(
            "migration: cannot {what} {}: {e}",
            staged.display()
        )))
    };
    let _ = std::fs::remove_dir_all(&staged);
    std::fs::create_dir_all(&staged).map_err(|e| node("create", e))?;
    let result = (|| {
        if dir.is_dir() {
            for entry in std::fs::read_dir(&dir).map_err(|e| node("read the folder for", e))? {
                let entry = entry.map_err(|e| node("read the folder for", e))?;
                std::fs::copy(entry.path(), staged.join(entry.file_name()))
                    .map_err(|e| node("copy into", e))?;
            }
        }
        for (name, sql) in &files {
            std::fs::write(staged.join(name), format!("{sql};\n"))
                .map_err(|e| node("write into", e))?;
        }
        let mut paths = shared.schema_paths.clone();
        paths.push(staged.clone());
        let mut conn = crate::db::open(&shared.db_path, &shared.extension_path, shared.synchronous)
            .map_err(|e| MigrationError::Node(HttpError::Internal(format!("migration: {e}"))))?;
        let tables = schema::apply(&mut conn, &paths).map_err(|e| {
            // Name the folder the files will live in, not the staging copy.
            let msg = e
                .to_string()
                .replace(&staged.display().to_string(), &dir.display().to_string());
            MigrationError::Refused(format!(
                "migration refused, nothing changed: {msg} (schema files: {})",
                schema::describe(&shared.schema_paths)
            ))
        })?;
        drop(conn);
        // Swap: the staged folder becomes the folder. A crash between the two renames
        // leaves the old folder under `.old`, and the schema already applied.
        let old = sibling(&dir, "old");
        let _ = std::fs::remove_dir_all(&old);
        if dir.is_dir() {
            std::fs::rename(&dir, &old).map_err(|e| node("move aside the folder beside", e))?;
        }
        std::fs::rename(&staged, &dir).map_err(|e| node("install", e))?;
        let _ = std::fs::remove_dir_all(&old);
        Ok(tables)
    })();
    let _ = std::fs::remove_dir_all(&staged);
    result
}

/// `<dir>.<what>`, beside the folder.
fn sibling(dir: &Path, what: &str) -> PathBuf {
    let mut s = dir.as_os_str().to_owned();
    s.push(format!(".{what}"));
    PathBuf::from(s)
}

/// Runs the statements into a scratch database and returns one `(file name, SQL)` per
/// table and index they declare. Anything else (a view, a trigger, a statement that
/// writes rows) is refused, since a schema file could not carry it either.
fn declare(statements: &[String]) -> Result<Vec<(String, String)>, String> {
    if statements.is_empty() {
        return Err("at least 1 statement is required".into());
    }
    let scratch = rusqlite::Connection::open_in_memory()
        .map_err(|e| format!("cannot open a scratch database: {e}"))?;
    for (i, sql) in statements.iter().enumerate() {
        scratch
            .execute_batch(sql)
            .map_err(|e| format!("statement {} ({sql:?}): {e}", i + 1))?;
    }
    if scratch.total_changes() > 0 {
        return Err(
            "migrations take CREATE TABLE and CREATE INDEX only; a statement wrote rows".into(),
        );
    }
    let mut stmt = scratch
        .prepare(
            "SELECT type, name, sql FROM sqlite_schema WHERE sql IS NOT NULL \
             AND name NOT LIKE 'sqlite_%' ORDER BY rowid",
        )
        .map_err(|e| e.to_string())?;
    let objects: Vec<(String, String, String)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .and_then(|it| it.collect())
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for (kind, name, sql) in objects {
        let prefix = match kind.as_str() {
            "table" => "t",
            "index" => "x",
            other => {
                return Err(format!(
                    "migrations take CREATE TABLE and CREATE INDEX only; {name:?} is a {other}"
                ))
            }
        };
        out.push((format!("{prefix}-{}.sql", file_stem(&name)), sql));
    }
    if out.is_empty() {
        return Err("the statements declare no table or index".into());
    }
    Ok(out)
}

/// A file name for an object: its name when plainly spelled, else its hex.
fn file_stem(name: &str) -> String {
    if !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        name.to_owned()
    } else {
        format!("hex-{}", hex::encode(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declares_tables_before_indexes_and_refuses_the_rest() {
        let files = declare(&[
            "CREATE INDEX IF NOT EXISTS i ON t (a)".into(),
            "CREATE TABLE t (id INTEGER PRIMARY KEY NOT NULL, a TEXT)".into(),
        ])
        .err();
        assert!(files.is_some(), "an index before its table fails in order");
        let files = declare(&[
            "CREATE TABLE \"odd name\" (id INTEGER PRIMARY KEY NOT NULL, a TEXT)".into(),
            "CREATE INDEX i ON \"odd name\" (a)".into(),
        ])
        .expect("valid");
        let names: Vec<&str> = files.iter().map(|f| f.0.as_str()).collect();
        assert_eq!(names, ["t-hex-6f6464206e616d65.sql", "x-i.sql"]);
        assert!(declare(&[]).is_err());
        assert!(declare(&["CREATE VIEW v AS SELECT 1".into()]).is_err());
        assert!(declare(&[
            "CREATE TABLE t (id INTEGER PRIMARY KEY NOT NULL); INSERT INTO t VALUES (1)".into()
        ])
        .is_err());
    }
}
