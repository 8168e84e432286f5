//! The scalar SQL functions. Each validates its arguments and names the argument at fault.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use sqlite_loadable::ext::{sqlite3_context, sqlite3_value};
use sqlite_loadable::Result as SlResult;

use crate::error::{Error, Result};
use crate::sqlite::{self as sq, Conn, Value};
use crate::{collect, crr, origins, pk, state, Shared};

/// The shape of every function in the registration list.
pub type Func = fn(*mut sqlite3_context, &[*mut sqlite3_value], &Arc<Shared>) -> SlResult<()>;

// The functions below have the safe signature sqlite-loadable's registration requires;
// they are private to the crate and only ever called by SQLite through that registration,
// with the context and arguments of the call now running. The helpers here rely on that.

/// The connection of the running call.
fn conn(ctx: *mut sqlite3_context) -> Conn {
    // SAFETY: ctx is the running call's context (see above); its connection is open.
    unsafe { Conn::from_raw(sqlite_loadable::api::context_db_handle(ctx)) }
}

/// Copies the running call's arguments.
fn values(args: &[*mut sqlite3_value]) -> Vec<Value> {
    // SAFETY: args are the running call's arguments (see above).
    args.iter()
        .map(|a| unsafe { Value::from_raw(*a) })
        .collect()
}

fn finish(ctx: *mut sqlite3_context, r: Result<Value>) -> SlResult<()> {
    match r {
        Ok(v) => {
            // SAFETY: ctx is the running call's context (see above).
            unsafe { sq::result_value(ctx, &v) };
            Ok(())
        }
        Err(e) => Err(sqlite_loadable::Error::new_message(e.to_string())),
    }
}

/// The table-name argument of `function`: TEXT, non-empty; with two arguments the first is
/// the schema, which must be `main`.
fn table_arg(function: &'static str, args: &[*mut sqlite3_value]) -> Result<String> {
    let values: Vec<Value> = values(args);
    let (pos, v) = match values.as_slice() {
        [t] => (1, t),
        [schema, t] => {
            match schema {
                Value::Text(s) if s.eq_ignore_ascii_case(b"main") => {}
                other => {
                    return Err(Error::Argument {
                        function,
                        position: 1,
                        name: "schema",
                        problem: format!(
                            "must be 'main' (patina replicates tables of the main schema), got {}",
                            describe(other)
                        ),
                    })
                }
            }
            (2, t)
        }
        _ => {
            return Err(Error::Argument {
                function,
                position: 1,
                name: "table",
                problem: "is missing".into(),
            })
        }
    };
    match v {
        Value::Text(t) if !t.is_empty() => Ok(String::from_utf8_lossy(t).into_owned()),
        other => Err(Error::Argument {
            function,
            position: pos,
            name: "table",
            problem: format!("must be a table name (TEXT), got {}", describe(other)),
        }),
    }
}

fn describe(v: &Value) -> String {
    match v {
        Value::Text(t) if t.is_empty() => "an empty string".into(),
        Value::Null => "NULL".into(),
        other => other.type_name().into(),
    }
}

fn ok() -> Value {
    Value::Text(b"OK".to_vec())
}

/// Runs a table-level operation named `function` on its table argument; answers 'OK'.
fn on_table(
    ctx: *mut sqlite3_context,
    args: &[*mut sqlite3_value],
    function: &'static str,
    op: fn(Conn, &str) -> Result<()>,
) -> SlResult<()> {
    finish(
        ctx,
        table_arg(function, args)
            .and_then(|t| op(conn(ctx), &t))
            .map(|_| ok()),
    )
}

pub fn as_crr(
    ctx: *mut sqlite3_context,
    args: &[*mut sqlite3_value],
    _: &Arc<Shared>,
) -> SlResult<()> {
    on_table(ctx, args, "crsql_as_crr", crr::as_crr)
}

pub fn as_table(
    ctx: *mut sqlite3_context,
    args: &[*mut sqlite3_value],
    _: &Arc<Shared>,
) -> SlResult<()> {
    on_table(ctx, args, "crsql_as_table", crr::as_table)
}

pub fn begin_alter(
    ctx: *mut sqlite3_context,
    args: &[*mut sqlite3_value],
    _: &Arc<Shared>,
) -> SlResult<()> {
    on_table(ctx, args, "crsql_begin_alter", crr::begin_alter)
}

pub fn commit_alter(
    ctx: *mut sqlite3_context,
    args: &[*mut sqlite3_value],
    _: &Arc<Shared>,
) -> SlResult<()> {
    on_table(ctx, args, "crsql_commit_alter", crr::commit_alter)
}

pub fn flush(
    ctx: *mut sqlite3_context,
    _: &[*mut sqlite3_value],
    shared: &Arc<Shared>,
) -> SlResult<()> {
    finish(ctx, shared.flush(conn(ctx)).map(|_| ok()))
}

pub fn db_version(
    ctx: *mut sqlite3_context,
    _: &[*mut sqlite3_value],
    shared: &Arc<Shared>,
) -> SlResult<()> {
    let c = conn(ctx);
    finish(
        ctx,
        shared
            .flush(c)
            .and_then(|_| state::db_version(c))
            .map(Value::Integer),
    )
}

pub fn site_id(
    ctx: *mut sqlite3_context,
    _: &[*mut sqlite3_value],
    _: &Arc<Shared>,
) -> SlResult<()> {
    finish(ctx, state::site_id(conn(ctx)).map(Value::Blob))
}

pub fn rows_impacted(
    ctx: *mut sqlite3_context,
    _: &[*mut sqlite3_value],
    shared: &Arc<Shared>,
) -> SlResult<()> {
    finish(
        ctx,
        shared
            .flush(conn(ctx))
            .map(|_| Value::Integer(shared.rows_impacted.load(Ordering::Relaxed))),
    )
}

const MERGE_EQUAL_VALUES: &[u8] = b"merge-equal-values";

fn config_name(function: &'static str, v: Value) -> Result<()> {
    match v {
        Value::Text(t) if t == MERGE_EQUAL_VALUES => Ok(()),
        other => Err(Error::Argument {
            function,
            position: 1,
            name: "name",
            problem: format!(
                "must be 'merge-equal-values' (the one setting), got {}",
                match other {
                    Value::Text(t) => format!("'{}'", String::from_utf8_lossy(&t)),
                    o => describe(&o),
                }
            ),
        }),
    }
}

pub fn config_set(
    ctx: *mut sqlite3_context,
    args: &[*mut sqlite3_value],
    _: &Arc<Shared>,
) -> SlResult<()> {
    let r = (|| {
        let args = values(args);
        let [name, value] = <[Value; 2]>::try_from(args).map_err(|_| Error::Argument {
            function: "crsql_config_set",
            position: 1,
            name: "name",
            problem: "and a value are required".into(),
        })?;
        config_name("crsql_config_set", name)?;
        let on = match value {
            Value::Integer(i @ (0 | 1)) => i,
            other => {
                return Err(Error::Argument {
                    function: "crsql_config_set",
                    position: 2,
                    name: "value",
                    problem: format!("must be 0 or 1, got {}", describe(&other)),
                })
            }
        };
        let c = conn(ctx);
        state::ensure(c)?;
        let mut s = c.prepare("UPDATE patina_state SET merge_equal_values = ?1 WHERE id = 0")?;
        s.execute(&[Value::Integer(on)])?;
        Ok(Value::Integer(on))
    })();
    finish(ctx, r)
}

pub fn config_get(
    ctx: *mut sqlite3_context,
    args: &[*mut sqlite3_value],
    _: &Arc<Shared>,
) -> SlResult<()> {
    let name = values(args).into_iter().next().unwrap_or(Value::Null);
    let r = config_name("crsql_config_get", name).and_then(|_| {
        let c = conn(ctx);
        if !state::initialized(c)? {
            return Ok(Value::Integer(0));
        }
        Ok(Value::Integer(
            c.query_i64("SELECT merge_equal_values FROM patina_state WHERE id = 0")?
                .unwrap_or(0),
        ))
    });
    finish(ctx, r)
}

pub fn pack_columns(
    ctx: *mut sqlite3_context,
    args: &[*mut sqlite3_value],
    _: &Arc<Shared>,
) -> SlResult<()> {
    let values: Vec<Value> = values(args);
    if values.is_empty() {
        return finish(
            ctx,
            Err(Error::Argument {
                function: "crsql_pack_columns",
                position: 1,
                name: "value",
                problem: "is missing: pack at least one value".into(),
            }),
        );
    }
    finish(ctx, pk::pack(&values).map(Value::Blob))
}

pub fn finalize(
    ctx: *mut sqlite3_context,
    _: &[*mut sqlite3_value],
    _: &Arc<Shared>,
) -> SlResult<()> {
    finish(ctx, Ok(ok()))
}

pub fn version(
    ctx: *mut sqlite3_context,
    _: &[*mut sqlite3_value],
    _: &Arc<Shared>,
) -> SlResult<()> {
    finish(
        ctx,
        Ok(Value::Text(env!("CARGO_PKG_VERSION").as_bytes().to_vec())),
    )
}

pub fn new_site_id(
    ctx: *mut sqlite3_context,
    _: &[*mut sqlite3_value],
    _: &Arc<Shared>,
) -> SlResult<()> {
    finish(ctx, crr::new_site_id(conn(ctx)).map(Value::Blob))
}

pub fn origin_summary(
    ctx: *mut sqlite3_context,
    _: &[*mut sqlite3_value],
    shared: &Arc<Shared>,
) -> SlResult<()> {
    // A flush first: versions merged one by one are written to the ranges table there.
    let c = conn(ctx);
    finish(
        ctx,
        shared
            .flush(c)
            .and_then(|_| origins::summary(c))
            .map(|s| Value::Text(s.into_bytes())),
    )
}

/// The arguments of `patina_origin_missing(site_id, a, b)`: a 16-byte blob and two integers.
fn missing_args(args: &[*mut sqlite3_value]) -> Result<(Vec<u8>, i64, i64)> {
    const F: &str = "patina_origin_missing";
    let v = values(args);
    let site = match v.first() {
        Some(Value::Blob(b)) if b.len() == 16 => b.clone(),
        other => {
            return Err(Error::Argument {
                function: F,
                position: 1,
                name: "site_id",
                problem: format!(
                    "must be a 16-byte blob, got {}",
                    other.map_or_else(|| "nothing".to_string(), describe)
                ),
            })
        }
    };
    let int = |pos: usize, name: &'static str| match v.get(pos - 1) {
        Some(Value::Integer(i)) => Ok(*i),
        other => Err(Error::Argument {
            function: F,
            position: pos,
            name,
            problem: format!(
                "must be an integer version, got {}",
                other.map_or_else(|| "nothing".to_string(), describe)
            ),
        }),
    };
    Ok((site, int(2, "from")?, int(3, "to")?))
}

pub fn origin_missing(
    ctx: *mut sqlite3_context,
    args: &[*mut sqlite3_value],
    shared: &Arc<Shared>,
) -> SlResult<()> {
    let c = conn(ctx);
    let r = missing_args(args).and_then(|(site, a, b)| {
        shared.flush(c)?;
        origins::missing(c, &site, a, b)
    });
    finish(ctx, r.map(|s| Value::Text(s.into_bytes())))
}

/// `patina_collect_tombstones(limits)`: the node's tombstone collection (see `collect`).
pub fn collect_tombstones(
    ctx: *mut sqlite3_context,
    args: &[*mut sqlite3_value],
    shared: &Arc<Shared>,
) -> SlResult<()> {
    let c = conn(ctx);
    let r = match values(args).first() {
        Some(Value::Text(t)) => {
            let limits = String::from_utf8_lossy(t).into_owned();
            shared
                .flush(c)
                .and_then(|_| collect::collect_tombstones(c, &limits))
                .map(|json| Value::Text(json.into_bytes()))
        }
        other => Err(Error::Argument {
            function: "patina_collect_tombstones",
            position: 1,
            name: "limits",
            problem: format!(
                "must be TEXT (a JSON object), got {}",
                describe(other.unwrap_or(&Value::Null))
            ),
        }),
    };
    finish(ctx, r)
}
