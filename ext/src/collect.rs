//! Tombstone collection: removing the clock rows of deleted rows once the node that owns
//! this database has decided no replica can still need them.
//!
//! A deleted row keeps its clock row (even causal length) so that a late change for it
//! loses against the delete instead of bringing the row back. Deciding when that is no
//! longer needed takes knowledge of the whole cluster (which versions every member
//! holds), which only the node has; the extension only applies the decision, given as a
//! per-origin limit: the tombstone of a delete numbered `v` by origin `o` goes when
//! `v <= limit[o]`. Nothing here writes a change: a collected tombstone leaves no trace
//! in `crsql_changes`, which is the point (a joiner no longer receives the history of
//! deletions).
//!
//! Clock rows written before the origin counter existed have no origin number and are
//! never collected.

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::schema::{clock_table, quote, replicated_tables};
use crate::sqlite::{Conn, Value};
use crate::state;
use crate::triggers::{CL, S_OV, S_SITE};

/// `patina_collect_tombstones(limits)`: `limits` is a JSON object mapping an origin's
/// site id (32 hex digits) to the highest version of it whose deletes may be forgotten.
/// Returns JSON `{"removed": n, "floors": {"<site id hex>": v}}`: how many tombstones went
/// and, per origin, the highest delete version among them (what the node advertises as
/// collected). Origins this database never heard of are ignored; a malformed object is an
/// error naming what is wrong.
pub fn collect_tombstones(conn: Conn, limits_json: &str) -> Result<String> {
    state::ensure(conn)?;
    state::savepoint(conn, "patina_collect", || {
        let by_ordinal = ordinal_limits(conn, limits_json)?;
        let mut removed = 0i64;
        let mut floors: BTreeMap<String, i64> = BTreeMap::new();
        if by_ordinal != "{}" {
            for table in replicated_tables(conn)? {
                removed += collect_table(conn, &table, &by_ordinal, &mut floors)?;
            }
        }
        let floors: Vec<String> = floors
            .iter()
            .map(|(site, v)| format!("\"{site}\":{v}"))
            .collect();
        Ok(format!(
            "{{\"removed\":{removed},\"floors\":{{{}}}}}",
            floors.join(",")
        ))
    })
}

/// Collects one table's tombstones under `by_ordinal` (limits keyed by site ordinal):
/// one scan to learn what goes, one to delete it, whatever the number of origins.
fn collect_table(
    conn: Conn,
    table: &str,
    by_ordinal: &str,
    floors: &mut BTreeMap<String, i64>,
) -> Result<i64> {
    let collectable = format!(
        "FROM {clock} AS c WHERE c.{CL} % 2 = 0 AND c.{S_OV} IS NOT NULL \
         AND c.{S_OV} <= coalesce(json_extract(?1, '$.\"' || c.{S_SITE} || '\"'), -1)",
        clock = quote(&clock_table(table)),
    );
    let arg = [Value::Text(by_ordinal.as_bytes().to_vec())];
    let mut s = conn.prepare(&format!(
        "SELECT lower(hex(s.site_id)), max(c.{S_OV}), max(c.{CL}), count(*) {collectable_join} \
         GROUP BY c.{S_SITE}",
        collectable_join = collectable.replacen(
            " AS c WHERE",
            " AS c JOIN patina_sites AS s ON s.ord = c.__patina_s_site WHERE",
            1
        ),
    ))?;
    let rows = s.query_map(&arg, |r| {
        (
            r.column(0),
            r.column_i64(1),
            r.column_i64(2),
            r.column_i64(3),
        )
    })?;
    drop(s);
    if rows.is_empty() {
        return Ok(0);
    }
    let mut highest_cl = 0;
    for (site, ov, cl, _) in &rows {
        if let Value::Text(site) = site {
            let e = floors
                .entry(String::from_utf8_lossy(site).into_owned())
                .or_insert(0);
            *e = (*e).max(*ov);
        }
        highest_cl = highest_cl.max(*cl);
    }
    conn.prepare(&format!("DELETE {collectable}"))?
        .execute(&arg)?;
    let removed = conn.changes();
    // New rows must start above what was collected (see `patina_state.cl_floor`).
    conn.prepare("UPDATE patina_state SET cl_floor = max(cl_floor, ?1) WHERE id = 0")?
        .execute(&[Value::Integer(highest_cl)])?;
    Ok(removed)
}

/// Re-keys the limits by `patina_sites` ordinal (what clock rows store), checking the
/// shape on the way: an object of 32-hex-digit keys and integer values.
fn ordinal_limits(conn: Conn, limits_json: &str) -> Result<String> {
    const F: &str = "patina_collect_tombstones";
    let bad = |problem: String| Error::Argument {
        function: F,
        position: 1,
        name: "limits",
        problem,
    };
    let arg = [Value::Text(limits_json.as_bytes().to_vec())];
    let valid = conn
        .query_value(
            "SELECT CASE WHEN json_valid(?1) THEN json_type(?1) = 'object' ELSE 0 END",
            &arg,
        )?
        .and_then(|v| v.as_i64())
        .unwrap_or(0);
    if valid != 1 {
        return Err(bad(
            "must be a JSON object {\"<site id hex>\": version}".into()
        ));
    }
    let wrong = conn.query_value(
        "SELECT key FROM json_each(?1) WHERE length(key) <> 32 OR key GLOB '*[^0-9a-fA-F]*' \
         OR type <> 'integer' LIMIT 1",
        &arg,
    )?;
    if let Some(Value::Text(k)) = wrong {
        return Err(bad(format!(
            "entry '{}' must map a 16-byte site id in hex to an integer version",
            String::from_utf8_lossy(&k)
        )));
    }
    let out = conn.query_value(
        "SELECT json_group_object(s.ord, j.value) FROM json_each(?1) AS j \
         JOIN patina_sites AS s ON hex(s.site_id) = upper(j.key)",
        &arg,
    )?;
    match out {
        Some(Value::Text(t)) => Ok(String::from_utf8_lossy(&t).into_owned()),
        _ => Ok("{}".into()),
    }
}
