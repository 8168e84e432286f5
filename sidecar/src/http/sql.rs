//! `POST /sql`: SQL text (`application/sql` or `text/plain`), every statement in order in
//! one transaction. The answer is the last statement's result — `columns` and `rows` for
//! a query — plus `rows_affected` summed over all statements and `version`, the node's
//! `crsql_db_version()` after the commit (`null` when nothing replicated changed).

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::Json;
use serde_json::{json, Value as Json_};

use super::json_values::StatementSpec;
use super::pool::WriteRequest;
use super::{body_bytes, media_type, AppState, HttpError};

/// `POST /sql`.
pub async fn post_sql(
    State(st): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Json_>, HttpError> {
    let body = body_bytes(body, st.api.max_body)?;
    match media_type(&headers).as_deref() {
        Some("application/sql") | Some("text/plain") => {}
        Some(other) => {
            return Err(HttpError::UnsupportedMediaType(format!(
                "Content-Type {other} is not accepted by /sql; send application/sql or text/plain"
            )))
        }
        None => {
            return Err(HttpError::UnsupportedMediaType(
                "no Content-Type: /sql takes application/sql or text/plain".into(),
            ))
        }
    }
    let text = std::str::from_utf8(&body)
        .map_err(|e| HttpError::BadRequest(format!("the SQL text is not UTF-8: {e}")))?;
    if text.trim().is_empty() {
        return Err(HttpError::BadRequest(
            "empty body: send one or more SQL statements".into(),
        ));
    }
    let out = st
        .pool
        .write(WriteRequest {
            specs: vec![StatementSpec::plain(text)],
            keep_rows: true,
        })
        .await?;
    let total: usize = out.results.iter().map(|r| r.rows_affected).sum();
    let mut answer = match out.results.last().and_then(|r| r.rows.as_ref()) {
        Some((columns, rows)) => json!({ "columns": columns, "rows": rows }),
        None => json!({}),
    };
    answer["rows_affected"] = json!(total);
    answer["version"] = json!(out.version);
    Ok(Json(answer))
}
