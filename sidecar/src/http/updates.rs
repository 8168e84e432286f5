//! `POST /v1/updates/{table}`: Corrosion's stream of changed primary keys, the call behind
//! `corro-client`'s `updates()`.
//!
//! No snapshot: the stream starts at the node's current `crsql_db_version()` and sends
//! `{"notify": ["update", [pk...]]}` (inserts included, as Corrosion does) or
//! `{"notify": ["delete", [pk...]]}` for every key of the table changed later — local
//! writes, merged remote changes and writes by apps that loaded nothing alike, because it
//! reads the change feed (`crsql_changes WHERE db_version > ?`) each time the node's
//! version moves. Several changes to one key in one read are one notification, the last
//! state winning. The header `corro-query-id` names the stream (the client requires it).

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderName, HeaderValue};
use axum::response::Response;
use rusqlite::types::ValueRef;
use serde_json::{json, Value as Json};
use tokio::sync::mpsc;

use super::json_values::value_to_json;
use super::queries::{line, ndjson_lines_response};
use super::{AppState, HttpError};

/// Feed rows read per round trip.
const PAGE: i64 = 10_000;

/// `POST /v1/updates/{table}`.
pub async fn post_updates(
    State(st): State<AppState>,
    Path(table): Path<String>,
) -> Result<Response, HttpError> {
    let t = table.clone();
    let start = st
        .pool
        .read(move |api| {
            let keys: i64 = api
                .conn
                .query_row(
                    "SELECT count(*) FROM pragma_table_info(?1) WHERE pk > 0",
                    [&t],
                    |r| r.get(0),
                )
                .map_err(|e| HttpError::from_sqlite(e, None))?;
            if keys == 0 || t.starts_with("patina_") || t.starts_with("crsql_") {
                return Err(HttpError::NotFound(format!(
                    "no replicated table {t:?} with a primary key"
                )));
            }
            api.conn
                .query_row("SELECT crsql_db_version()", [], |r| r.get::<_, i64>(0))
                .map_err(|e| HttpError::from_sqlite(e, None))
        })
        .await?;
    let id = new_uuid();
    let (tx, rx) = mpsc::channel::<Bytes>(256);
    tokio::spawn(follow(st, table, start, tx));
    let mut resp = ndjson_lines_response(rx);
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut()
            .insert(HeaderName::from_static("corro-query-id"), v);
    }
    Ok(resp)
}

/// Sends a notification per changed key after `cursor` until the client leaves or the
/// server stops.
async fn follow(st: AppState, table: String, mut cursor: i64, tx: mpsc::Sender<Bytes>) {
    let mut versions = st.shared.db_version.clone();
    let mut stop = st.stop.clone();
    loop {
        if *stop.borrow() {
            return;
        }
        let latest = *versions.borrow_and_update();
        if latest > cursor {
            let t = table.clone();
            let after = cursor;
            let page = st.pool.read(move |api| read_page(api, &t, after)).await;
            let (events, next) = match page {
                Ok(p) => p,
                Err(e) => {
                    let _ = tx.send(line(&json!({ "error": e.to_string() }))).await;
                    return;
                }
            };
            for ev in events {
                if tx.send(line(&ev)).await.is_err() {
                    return;
                }
            }
            if next > cursor {
                cursor = next;
                continue;
            }
        }
        tokio::select! {
            r = versions.changed() => if r.is_err() { return },
            _ = tx.closed() => return,
            _ = stop.changed() => return,
        }
    }
}

/// The notifications for `table` in the feed after `after`, and the last version read.
/// The table is matched here rather than in SQL so the read stays the feed's plain range
/// scan on `db_version`.
fn read_page(
    api: &super::pool::ApiConn,
    table: &str,
    after: i64,
) -> Result<(Vec<Json>, i64), HttpError> {
    let sql_err = |e| HttpError::from_sqlite(e, None);
    let mut stmt = api
        .conn
        .prepare_cached(
            "SELECT \"table\", pk, cid, cl, db_version FROM crsql_changes \
             WHERE db_version > ?1 ORDER BY db_version LIMIT ?2",
        )
        .map_err(sql_err)?;
    let mut rows = stmt
        .query(rusqlite::params![after, PAGE])
        .map_err(sql_err)?;
    let mut last = after;
    // (packed key, deleted?) in order of first sight; the last change of a key wins.
    let mut seen: Vec<(Vec<u8>, bool)> = Vec::new();
    let mut index: std::collections::HashMap<Vec<u8>, usize> = Default::default();
    while let Some(r) = rows.next().map_err(sql_err)? {
        last = r.get::<_, i64>(4).map_err(sql_err)?;
        if r.get_ref(0).map_err(sql_err)?.as_bytes().ok() != Some(table.as_bytes()) {
            continue;
        }
        let pk: Vec<u8> = r.get(1).map_err(sql_err)?;
        let cid: String = r.get(2).map_err(sql_err)?;
        let cl: i64 = r.get(3).map_err(sql_err)?;
        let deleted = cid == "-1" && cl % 2 == 0;
        match index.get(&pk) {
            Some(&i) => seen[i].1 = deleted,
            None => {
                index.insert(pk.clone(), seen.len());
                seen.push((pk, deleted));
            }
        }
    }
    let mut events = Vec::with_capacity(seen.len());
    for (pk, deleted) in seen {
        let values = unpack(&pk).map_err(HttpError::Internal)?;
        let kind = if deleted { "delete" } else { "update" };
        events.push(json!({ "notify": [kind, values] }));
    }
    Ok((events, last))
}

/// Decodes cr-sqlite's packed primary key (DESIGN §1: a count byte, then per value a
/// header `(nbytes << 3) | type` and a big-endian payload) into JSON values.
fn unpack(blob: &[u8]) -> Result<Vec<Json>, String> {
    let bad = |what: &str| format!("malformed packed primary key ({what}): {blob:?}");
    let (&count, mut rest) = blob.split_first().ok_or_else(|| bad("empty"))?;
    let take = |n: usize, rest: &mut &[u8]| -> Result<Vec<u8>, String> {
        if rest.len() < n {
            return Err(bad("truncated"));
        }
        let (a, b) = rest.split_at(n);
        *rest = b;
        Ok(a.to_vec())
    };
    let mut out = Vec::with_capacity(usize::from(count));
    for _ in 0..count {
        let header = take(1, &mut rest)?[0];
        let width = usize::from(header >> 3);
        let be = |b: &[u8]| b.iter().fold(0u64, |acc, x| (acc << 8) | u64::from(*x));
        let v = match header & 0x07 {
            1 if width <= 8 => Json::from(be(&take(width, &mut rest)?) as i64),
            2 => {
                let b = take(8, &mut rest)?;
                let mut a = [0u8; 8];
                a.copy_from_slice(&b);
                value_to_json(ValueRef::Real(f64::from_be_bytes(a)), "primary key")
                    .map_err(|e| e.to_string())?
            }
            t @ (3 | 4) if width <= 4 => {
                let len =
                    usize::try_from(be(&take(width, &mut rest)?)).map_err(|_| bad("length"))?;
                let b = take(len, &mut rest)?;
                if t == 3 {
                    value_to_json(ValueRef::Text(&b), "primary key").map_err(|e| e.to_string())?
                } else {
                    value_to_json(ValueRef::Blob(&b), "primary key").map_err(|e| e.to_string())?
                }
            }
            5 => Json::Null,
            _ => return Err(bad("header")),
        };
        out.push(v);
    }
    Ok(out)
}

/// A random (version 4) UUID in its hyphenated form, as the client parses it.
pub fn new_uuid() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    super::actor_id(&hex::encode(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpacks_every_type() {
        // 3 values: int 258 (2 bytes), text "ab", null.
        let blob = [3u8, (2 << 3) | 1, 1, 2, (1 << 3) | 3, 2, b'a', b'b', 5];
        assert_eq!(
            unpack(&blob).expect("valid"),
            vec![json!(258), json!("ab"), Json::Null]
        );
        // -1 is 8 bytes wide.
        let mut neg = vec![1u8, (8 << 3) | 1];
        neg.extend_from_slice(&(-1i64).to_be_bytes());
        assert_eq!(unpack(&neg).expect("valid"), vec![json!(-1)]);
        assert!(unpack(&[2, (1 << 3) | 1, 7]).is_err(), "truncated");
        assert!(unpack(&[]).is_err());
    }
}
