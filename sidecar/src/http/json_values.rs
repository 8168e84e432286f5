//! SQLite values ↔ JSON, the way Corrosion writes them, and the statement forms the API
//! accepts.
//!
//! Out: integers as JSON integers (all 64 bits exact: `serde_json` keeps `i64`), reals as
//! numbers (a non-finite real, which JSON cannot carry, becomes `null`), text as strings,
//! blobs as arrays of byte values, NULL as `null`.
//! In (parameters): `null`; `true`/`false` as 1/0; integers that fit `i64` as integers, other
//! numbers as reals; strings as text; an array of integers 0–255 as a blob; any other
//! array or object as its JSON text (Corrosion's `SqliteParam::Json`).

use rusqlite::types::{ToSqlOutput, Value, ValueRef};
use rusqlite::ToSql;
use serde_json::Value as Json;

use super::error::HttpError;

/// Checks that a TEXT value is UTF-8 before it is answered as a JSON string.
///
/// Why: SQLite does not enforce UTF-8 (`CAST(X'FF00FE' AS TEXT)`, apps in C or Go), and a
/// lossy conversion (U+FFFD) would hand a read-modify-write client altered data to write
/// back. Such a value is refused with an error naming the column instead.
pub fn check_utf8(v: ValueRef<'_>, column: &str) -> Result<(), HttpError> {
    match v {
        ValueRef::Text(t) if std::str::from_utf8(t).is_err() => Err(HttpError::NotUtf8 {
            column: column.to_owned(),
            preview: preview(t),
        }),
        _ => Ok(()),
    }
}

/// The first bytes of a value in hex, for error messages.
fn preview(t: &[u8]) -> String {
    let shown = &t[..t.len().min(16)];
    let mut s = hex::encode(shown);
    if t.len() > shown.len() {
        s.push('…');
    }
    s
}

/// One SQLite value rendered as JSON; TEXT that is not UTF-8 is refused (see
/// [`check_utf8`]).
pub fn value_to_json(v: ValueRef<'_>, column: &str) -> Result<Json, HttpError> {
    check_utf8(v, column)?;
    Ok(match v {
        ValueRef::Null => Json::Null,
        ValueRef::Integer(i) => Json::from(i),
        ValueRef::Real(f) => serde_json::Number::from_f64(f).map_or(Json::Null, Json::Number),
        ValueRef::Text(t) => Json::String(String::from_utf8_lossy(t).into_owned()),
        ValueRef::Blob(b) => Json::Array(b.iter().map(|x| Json::from(*x)).collect()),
    })
}

/// An owned SQLite value rendered as JSON (parameters: their text came from JSON, so it
/// is UTF-8).
pub fn owned_to_json(v: &Value) -> Json {
    match v {
        Value::Null => Json::Null,
        Value::Integer(i) => Json::from(*i),
        Value::Real(f) => serde_json::Number::from_f64(*f).map_or(Json::Null, Json::Number),
        Value::Text(t) => Json::String(t.clone()),
        Value::Blob(b) => Json::Array(b.iter().map(|x| Json::from(*x)).collect()),
    }
}

/// How many bytes `v` takes as JSON (exactly, for the shapes [`JsonRef`] writes), so a
/// result can be refused against `api.max_result_bytes` before anything is copied.
pub fn json_len(v: ValueRef<'_>) -> usize {
    match v {
        ValueRef::Null => 4,
        ValueRef::Integer(i) => {
            let mut buf = itoa_len(i.unsigned_abs());
            if i < 0 {
                buf += 1;
            }
            buf
        }
        // Rust's shortest round-trip form never exceeds 24 characters.
        ValueRef::Real(_) => 24,
        ValueRef::Text(t) => {
            2 + t
                .iter()
                .map(|&b| match b {
                    b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 2,
                    0..=0x1f => 6,
                    _ => 1,
                })
                .sum::<usize>()
        }
        ValueRef::Blob(b) => {
            2 + b.len().saturating_sub(1)
                + b.iter()
                    .map(|&x| match x {
                        0..=9 => 1,
                        10..=99 => 2,
                        _ => 3,
                    })
                    .sum::<usize>()
        }
    }
}

/// Adds `v`'s JSON length and a separator to `size`, or fails with
/// [`HttpError::ResultTooLarge`] once `size` passes `limit`. A value whose smallest
/// possible encoding is already too large is refused without reading it (a 40 MB blob
/// costs nothing to refuse).
pub fn add_json_len(size: &mut usize, v: ValueRef<'_>, limit: usize) -> Result<(), HttpError> {
    let at_least = match v {
        ValueRef::Text(t) => t.len() + 2,
        ValueRef::Blob(b) => 2 * b.len() + 1,
        _ => 4,
    };
    if size.saturating_add(at_least) > limit {
        return Err(HttpError::ResultTooLarge { limit });
    }
    *size += json_len(v) + 1;
    if *size > limit {
        return Err(HttpError::ResultTooLarge { limit });
    }
    Ok(())
}

fn itoa_len(mut n: u64) -> usize {
    let mut len = 1;
    while n >= 10 {
        n /= 10;
        len += 1;
    }
    len
}

/// A borrowed SQLite value written as JSON without building a `serde_json::Value` tree
/// (a blob as a `Value` costs ~32 bytes per byte). TEXT must have passed [`check_utf8`];
/// if not, serializing fails rather than altering it.
pub struct JsonRef<'a>(pub ValueRef<'a>);

impl serde::Serialize for JsonRef<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            ValueRef::Null => s.serialize_unit(),
            ValueRef::Integer(i) => s.serialize_i64(i),
            ValueRef::Real(f) if f.is_finite() => s.serialize_f64(f),
            ValueRef::Real(_) => s.serialize_unit(),
            ValueRef::Text(t) => {
                let text = std::str::from_utf8(t).map_err(serde::ser::Error::custom)?;
                s.serialize_str(text)
            }
            ValueRef::Blob(b) => s.collect_seq(b),
        }
    }
}

/// One value of a result kept until its transaction has ended (see `exec`): owned, its
/// TEXT already checked to be UTF-8.
#[derive(Clone, Debug, PartialEq)]
pub struct Cell(pub Value);

impl Cell {
    /// Copies `v` out of SQLite, refusing TEXT that is not UTF-8.
    pub fn from_ref(v: ValueRef<'_>, column: &str) -> Result<Cell, HttpError> {
        check_utf8(v, column)?;
        Ok(Cell(match v {
            ValueRef::Null => Value::Null,
            ValueRef::Integer(i) => Value::Integer(i),
            ValueRef::Real(f) => Value::Real(f),
            ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
            ValueRef::Blob(b) => Value::Blob(b.to_vec()),
        }))
    }
}

impl serde::Serialize for Cell {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        JsonRef(ValueRef::from(&self.0)).serialize(s)
    }
}

/// A statement parameter as given in JSON.
#[derive(Clone, Debug, PartialEq)]
pub struct Param(pub Value);

impl Param {
    /// Interprets one JSON parameter (see the module doc for the rules).
    pub fn from_json(j: &Json) -> Param {
        Param(match j {
            Json::Null => Value::Null,
            Json::Bool(b) => Value::Integer(i64::from(*b)),
            Json::Number(n) => match n.as_i64() {
                Some(i) => Value::Integer(i),
                None => Value::Real(n.as_f64().unwrap_or(f64::NAN)),
            },
            Json::String(s) => Value::Text(s.clone()),
            Json::Array(items) => match blob_bytes(items) {
                Some(bytes) => Value::Blob(bytes),
                None => Value::Text(j.to_string()),
            },
            Json::Object(_) => Value::Text(j.to_string()),
        })
    }
}

/// `Some(bytes)` when every item is an integer 0–255.
fn blob_bytes(items: &[Json]) -> Option<Vec<u8>> {
    items
        .iter()
        .map(|x| x.as_u64().and_then(|b| u8::try_from(b).ok()))
        .collect()
}

impl ToSql for Param {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(ValueRef::from(&self.0)))
    }
}

/// The parameters of one statement.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum Params {
    #[default]
    None,
    Positional(Vec<Param>),
    /// Names as given; `:`, `@` or `$` is added when the name has none.
    Named(Vec<(String, Param)>),
}

/// One statement of a request: SQL text (possibly several statements when there are no
/// parameters) and its parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct StatementSpec {
    pub sql: String,
    pub params: Params,
}

impl StatementSpec {
    /// A statement without parameters.
    pub fn plain(sql: impl Into<String>) -> Self {
        StatementSpec {
            sql: sql.into(),
            params: Params::None,
        }
    }

    /// Parses Corrosion's statement forms: `"sql"`, `["sql"]`, `["sql", [params]]`,
    /// `["sql", {named}]`, `{"query", "params", "named_params"}`.
    pub fn from_json(j: &Json) -> Result<StatementSpec, HttpError> {
        let bad = || {
            HttpError::MalformedJson(format!(
                "a statement must be \"sql\", [\"sql\", [params]], [\"sql\", {{named}}] or \
                 {{\"query\", \"params\", \"named_params\"}}; got {}",
                short(j)
            ))
        };
        match j {
            Json::String(s) => Ok(StatementSpec::plain(s.clone())),
            Json::Array(items) => {
                let sql = items.first().and_then(Json::as_str).ok_or_else(bad)?;
                let params = match items.get(1) {
                    None | Some(Json::Null) => Params::None,
                    Some(Json::Array(ps)) => {
                        Params::Positional(ps.iter().map(Param::from_json).collect())
                    }
                    Some(Json::Object(m)) => Params::Named(
                        m.iter()
                            .map(|(k, v)| (k.clone(), Param::from_json(v)))
                            .collect(),
                    ),
                    Some(_) => return Err(bad()),
                };
                if items.len() > 2 {
                    return Err(bad());
                }
                Ok(StatementSpec {
                    sql: sql.to_owned(),
                    params,
                })
            }
            Json::Object(m) => {
                let sql = m.get("query").and_then(Json::as_str).ok_or_else(bad)?;
                let positional = match m.get("params") {
                    None | Some(Json::Null) => None,
                    Some(Json::Array(ps)) => Some(ps.iter().map(Param::from_json).collect()),
                    Some(_) => return Err(bad()),
                };
                let named = match m.get("named_params") {
                    None | Some(Json::Null) => None,
                    Some(Json::Object(n)) => Some(
                        n.iter()
                            .map(|(k, v)| (k.clone(), Param::from_json(v)))
                            .collect(),
                    ),
                    Some(_) => return Err(bad()),
                };
                let params = match (positional, named) {
                    (Some(_), Some(_)) => {
                        return Err(HttpError::BadRequest(
                            "give either \"params\" or \"named_params\", not both".into(),
                        ))
                    }
                    (Some(p), None) => Params::Positional(p),
                    (None, Some(n)) => Params::Named(n),
                    (None, None) => Params::None,
                };
                Ok(StatementSpec {
                    sql: sql.to_owned(),
                    params,
                })
            }
            _ => Err(bad()),
        }
    }

    /// The statement as JSON again (persisted subscriptions keep their query this way).
    pub fn to_json(&self) -> Json {
        match &self.params {
            Params::None => Json::String(self.sql.clone()),
            Params::Positional(ps) => Json::Array(vec![
                Json::String(self.sql.clone()),
                Json::Array(ps.iter().map(|p| owned_to_json(&p.0)).collect()),
            ]),
            Params::Named(ns) => Json::Array(vec![
                Json::String(self.sql.clone()),
                Json::Object(
                    ns.iter()
                        .map(|(k, p)| (k.clone(), owned_to_json(&p.0)))
                        .collect(),
                ),
            ]),
        }
    }
}

/// Parses a request body as JSON; malformed JSON is 422 as in Corrosion.
pub fn parse_body(body: &[u8]) -> Result<Json, HttpError> {
    serde_json::from_slice(body)
        .map_err(|e| HttpError::MalformedJson(format!("malformed JSON: {e}")))
}

/// The first characters of a JSON value, for error messages.
fn short(j: &Json) -> String {
    let s = j.to_string();
    match s.char_indices().nth(80) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// `v` as [`JsonRef`] writes it.
    fn written(v: ValueRef<'_>) -> String {
        serde_json::to_string(&JsonRef(v)).unwrap()
    }

    #[test]
    fn text_that_is_not_utf8_is_refused_by_column_name() {
        let bad = ValueRef::Text(b"\xff\x00\xfe");
        let err = value_to_json(bad, "status").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("\"status\""), "{msg}");
        assert!(msg.contains("ff00fe"), "{msg}");
        assert!(msg.contains("CAST(status AS BLOB)"), "{msg}");
        assert_eq!(err.status(), axum::http::StatusCode::BAD_REQUEST);
        assert!(Cell::from_ref(bad, "status").is_err());
        // Serializing never alters it either.
        assert!(serde_json::to_string(&JsonRef(bad)).is_err());
        // Valid UTF-8, including NUL and non-ASCII, passes unchanged.
        let ok = ValueRef::Text("a\u{0}é".as_bytes());
        assert_eq!(
            value_to_json(ok, "c").unwrap(),
            Json::String("a\u{0}é".into())
        );
    }

    #[test]
    fn json_len_is_exact() {
        let texts: [&[u8]; 4] = [b"", b"plain", b"q\"b\\n\n\x01", "é".as_bytes()];
        for t in texts {
            assert_eq!(
                json_len(ValueRef::Text(t)),
                written(ValueRef::Text(t)).len()
            );
        }
        let blobs: [&[u8]; 3] = [&[], &[0, 9, 10, 99, 100, 255], &[7]];
        for b in blobs {
            assert_eq!(
                json_len(ValueRef::Blob(b)),
                written(ValueRef::Blob(b)).len()
            );
        }
        for i in [0, 9, 10, -1, i64::MAX, i64::MIN] {
            assert_eq!(
                json_len(ValueRef::Integer(i)),
                written(ValueRef::Integer(i)).len()
            );
        }
        assert_eq!(json_len(ValueRef::Null), 4);
        assert!(json_len(ValueRef::Real(-1.234_567_890_123_4e-300)) >= 23);
    }

    #[test]
    fn big_integers_stay_exact() {
        let j = value_to_json(ValueRef::Integer(i64::MAX), "c").unwrap();
        assert_eq!(j.to_string(), "9223372036854775807");
        let j = value_to_json(ValueRef::Integer(i64::MIN), "c").unwrap();
        assert_eq!(j.to_string(), "-9223372036854775808");
        let p = Param::from_json(&serde_json::json!(9223372036854775807i64));
        assert_eq!(p.0, Value::Integer(i64::MAX));
    }

    #[test]
    fn blobs_are_byte_arrays() {
        assert_eq!(
            value_to_json(ValueRef::Blob(&[0, 255]), "c")
                .unwrap()
                .to_string(),
            "[0,255]"
        );
        assert_eq!(written(ValueRef::Blob(&[0, 255])), "[0,255]");
        assert_eq!(
            Param::from_json(&serde_json::json!([0, 255])).0,
            Value::Blob(vec![0, 255])
        );
        // Not bytes: kept as JSON text.
        assert_eq!(
            Param::from_json(&serde_json::json!([1, 256])).0,
            Value::Text("[1,256]".into())
        );
    }

    #[test]
    fn non_finite_reals_are_null() {
        assert_eq!(
            value_to_json(ValueRef::Real(f64::INFINITY), "c").unwrap(),
            Json::Null
        );
        assert_eq!(
            value_to_json(ValueRef::Real(1.5), "c").unwrap().to_string(),
            "1.5"
        );
        assert_eq!(written(ValueRef::Real(f64::NAN)), "null");
        assert_eq!(written(ValueRef::Real(1.5)), "1.5");
    }

    #[test]
    fn statement_forms() {
        let s = StatementSpec::from_json(&serde_json::json!("SELECT 1")).unwrap();
        assert_eq!(s, StatementSpec::plain("SELECT 1"));
        let s = StatementSpec::from_json(&serde_json::json!(["SELECT ?", [1, "a"]])).unwrap();
        assert_eq!(
            s.params,
            Params::Positional(vec![
                Param(Value::Integer(1)),
                Param(Value::Text("a".into()))
            ])
        );
        let s = StatementSpec::from_json(&serde_json::json!(["SELECT :x", {"x": null}])).unwrap();
        assert_eq!(
            s.params,
            Params::Named(vec![("x".into(), Param(Value::Null))])
        );
        let s =
            StatementSpec::from_json(&serde_json::json!({"query": "SELECT ?", "params": [true]}))
                .unwrap();
        assert_eq!(s.params, Params::Positional(vec![Param(Value::Integer(1))]));
        assert!(StatementSpec::from_json(&serde_json::json!(42)).is_err());
        assert!(StatementSpec::from_json(&serde_json::json!(["SELECT 1", 3])).is_err());
        let round = StatementSpec::from_json(&s.to_json()).unwrap();
        assert_eq!(round, s);
    }
}
