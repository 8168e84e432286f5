//! `GET /v1/status`, `POST /v1/backup`, `POST /v1/reload`: what the `patina status`,
//! `patina backup` and `patina reload` subcommands call.

use std::convert::Infallible;
use std::io::Read;
use std::path::{Path, PathBuf};

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
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
    // This node counts, as in /v1/health and /v1/members.
    let alive = super::health::alive_with_self(&all);
    Json(json!({
        "site_id": st.shared.site_id_hex,
        "actor_id": actor_id(&st.shared.site_id_hex),
        "db_version": *st.shared.db_version.borrow(),
        "db_path": st.shared.db_path.display().to_string(),
        "members": all.len() + 1,
        "members_alive": alive,
        "apply_queue_depth": m.apply_queue_depth.get(),
        "broadcast_queue_depth": m.broadcast_queue_depth.get(),
        "changes_applied": m.changes_applied.get(),
        "changes_broadcast": m.changes_broadcast.get(),
        "subscriptions": st.subs.count(),
        "subscription_streams": st.subs.streams(),
        "latency": latency(&st),
        "version": env!("CARGO_PKG_VERSION"),
        "protocol_version": m.protocol_version.get(),
        "staleness": staleness(&st),
    }))
}

/// The last staleness report, one object per origin, with `silent_secs` as of now.
fn staleness(st: &AppState) -> serde_json::Value {
    let report = st.shared.metrics.staleness.report();
    let now = crate::db::tail::unix_ms() as i64;
    report
        .rows
        .iter()
        .map(|r| {
            let mut v = serde_json::to_value(r).unwrap_or_default();
            v["silent_secs"] = json!(r.silent_secs(now, report.started_ms));
            v
        })
        .collect()
}

/// p50/p99 of the node's and the API's histograms.
fn latency(st: &AppState) -> serde_json::Value {
    let mut families = st.shared.metrics.gather();
    families.extend(st.stats.gather());
    super::latency::summary(&families)
}

/// `POST /v1/reload`: re-applies the schema files; `{"tables": [...]}`.
pub async fn post_reload(State(st): State<AppState>) -> Result<Json<serde_json::Value>, HttpError> {
    let reload = st.shared.reload.clone();
    let tables = tokio::task::spawn_blocking(move || reload())
        .await
        .map_err(|e| HttpError::Internal(format!("reload task failed: {e}")))?
        .map_err(|e| HttpError::BadRequest(format!("reload failed: {e}")))?;
    st.subs.refresh_all();
    Ok(Json(json!({ "tables": tables })))
}

/// `?keep_site_id=true`.
#[derive(Debug, Default, serde::Deserialize)]
pub struct BackupParams {
    /// Keep the node's site id in the copy (to bring this very node back after losing its
    /// disk); by default the copy gets a fresh one, so it can seed a new node.
    #[serde(default)]
    pub keep_site_id: bool,
}

/// `POST /v1/backup[?keep_site_id=true]`: a consistent snapshot (`VACUUM INTO` on a
/// connection of the node's own, outside the authorizer), streamed back as
/// `application/vnd.sqlite3`. By default the copy gets a fresh site id so it carries no
/// node identity; the header `patina-site-id` says which id the copy holds.
pub async fn post_backup(
    State(st): State<AppState>,
    query: Result<Query<BackupParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, HttpError> {
    let Query(p) = query.map_err(|e| HttpError::BadRequest(format!("bad query string: {e}")))?;
    let db = st.shared.db_path.clone();
    let ext = st.shared.extension_path.clone();
    let keep = p.keep_site_id;
    let (file, len, site) = tokio::task::spawn_blocking(move || snapshot_file(&db, &ext, keep))
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
    if let Ok(v) = HeaderValue::from_str(&site) {
        h.insert(header::HeaderName::from_static("patina-site-id"), v);
    }
    Ok(resp)
}

/// Writes the snapshot beside the database, renews its identity unless `keep`, opens it
/// and unlinks it (the open file stays readable), so no copy is left behind whatever the
/// client does. Returns the file, its length and the copy's site id (hex).
fn snapshot_file(
    db: &Path,
    ext: &Path,
    keep: bool,
) -> Result<(std::fs::File, u64, String), HttpError> {
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
        let site: Vec<u8> = if keep {
            copy.query_row("SELECT crsql_site_id()", [], |r| r.get(0))
        } else {
            copy.query_row("SELECT patina_new_site_id()", [], |r| r.get(0))
        }
        .map_err(|e| {
            HttpError::Internal(format!("backup: cannot read or renew the site id: {e}"))
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
        Ok((file, len, hex::encode(site)))
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
