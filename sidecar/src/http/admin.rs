//! `GET /v1/status`, `POST /v1/backup`, `POST /v1/reload`: what the `patina status`,
//! `patina backup` and `patina reload` subcommands call.

use std::convert::Infallible;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

use super::health::members;
use super::{actor_id, AppState, HttpError};
use crate::config::Synchronous;

/// Bytes per chunk of a streamed backup.
const CHUNK: usize = 256 * 1024;

/// `GET /v1/status`.
pub async fn get_status(State(st): State<AppState>) -> Json<serde_json::Value> {
    let m = &st.shared.metrics;
    let all = members(&st);
    let alive = all.iter().filter(|x| x.state == "alive").count();
    Json(json!({
        "site_id": st.shared.site_id_hex,
        "actor_id": actor_id(&st.shared.site_id_hex),
        "db_version": *st.shared.db_version.borrow(),
        "db_path": st.shared.db_path.display().to_string(),
        "members": all.len(),
        "members_alive": alive,
        "apply_queue_depth": m.apply_queue_depth.load(Ordering::Relaxed),
        "broadcast_queue_depth": m.broadcast_queue_depth.load(Ordering::Relaxed),
        "changes_applied": m.changes_applied.load(Ordering::Relaxed),
        "changes_broadcast": m.changes_broadcast.load(Ordering::Relaxed),
        "subscriptions": st.subs.count(),
        "subscription_streams": st.subs.streams(),
        "version": env!("CARGO_PKG_VERSION"),
    }))
}

/// `POST /v1/reload`: re-applies the schema files; `{"tables": [...]}`.
pub async fn post_reload(State(st): State<AppState>) -> Result<Json<serde_json::Value>, HttpError> {
    let reload = st.shared.reload.clone();
    let tables = tokio::task::spawn_blocking(move || reload())
        .await
        .map_err(|e| HttpError::Internal(format!("reload task failed: {e}")))?
        .map_err(|e| HttpError::BadRequest(format!("reload failed: {e}")))?;
    st.subs.poke();
    Ok(Json(json!({ "tables": tables })))
}

/// `POST /v1/backup`: a consistent snapshot (`VACUUM INTO` on a connection of the node's
/// own, outside the authorizer), given a fresh site id so the copy carries no node identity,
/// streamed back as `application/vnd.sqlite3`.
pub async fn post_backup(State(st): State<AppState>) -> Result<Response, HttpError> {
    let db = st.shared.db_path.clone();
    let ext = st.shared.extension_path.clone();
    let (file, len) = tokio::task::spawn_blocking(move || snapshot_file(&db, &ext))
        .await
        .map_err(|e| HttpError::Internal(format!("backup task failed: {e}")))??;
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    tokio::task::spawn_blocking(move || {
        let mut file = file;
        loop {
            let mut buf = vec![0u8; CHUNK];
            match file.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    buf.truncate(n);
                    if tx.blocking_send(Bytes::from(buf)).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reading the backup copy failed");
                    return;
                }
            }
        }
    });
    let stream = ReceiverStream::new(rx).map(Ok::<Bytes, Infallible>);
    let mut resp = Body::from_stream(stream).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/vnd.sqlite3"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    Ok(resp)
}

/// Writes the snapshot beside the database, strips its identity, opens it and unlinks it
/// (the open file stays readable), so no copy is left behind whatever the client does.
fn snapshot_file(db: &Path, ext: &Path) -> Result<(std::fs::File, u64), HttpError> {
    let tmp = temp_path(db);
    let result = (|| {
        let conn = rusqlite::Connection::open(db).map_err(|e| {
            HttpError::Internal(format!("backup: cannot open {}: {e}", db.display()))
        })?;
        conn.busy_timeout(crate::db::conn::BUSY_TIMEOUT)
            .map_err(|e| HttpError::Internal(format!("backup: {e}")))?;
        conn.execute("VACUUM INTO ?1", [tmp.display().to_string()])
            .map_err(|e| HttpError::from_sqlite(e, None))?;
        drop(conn);
        let copy = crate::db::open(&tmp, ext, Synchronous::Normal)
            .map_err(|e| HttpError::Internal(format!("backup: {e}")))?;
        copy.query_row("SELECT patina_new_site_id()", [], |_| Ok(()))
            .map_err(|e| {
                HttpError::Internal(format!("backup: cannot give the copy a fresh site id: {e}"))
            })?;
        copy.pragma_update(None, "journal_mode", "DELETE")
            .map_err(|e| HttpError::Internal(format!("backup: {e}")))?;
        drop(copy);
        let file = std::fs::File::open(&tmp).map_err(|e| {
            HttpError::Internal(format!("backup: cannot read {}: {e}", tmp.display()))
        })?;
        let len = file
            .metadata()
            .map_err(|e| HttpError::Internal(format!("backup: {e}")))?
            .len();
        Ok((file, len))
    })();
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", tmp.display()));
    }
    result
}

/// `<db>.backup-<random>.tmp`, beside the database (same filesystem, same permissions).
fn temp_path(db: &Path) -> PathBuf {
    let r: u64 = rand::random();
    PathBuf::from(format!("{}.backup-{r:016x}.tmp", db.display()))
}
