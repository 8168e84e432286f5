//! Remote changes merged many per statement: the extension's `patina_batch` column.
//!
//! `INSERT INTO crsql_changes (patina_batch) VALUES (?1)` merges a blob of changes the way
//! inserting them one by one would, but grouped by row and many rows per statement
//! (README, "Merging many changes at once"). Each change is its ten `crsql_changes` fields
//! (`table` .. `origin_version`) packed the way `crsql_pack_columns` packs values: a count
//! byte, then per value a header `(nbytes << 3) | type` (1 integer, 2 real, 3 text, 4 blob,
//! 5 null) and a big-endian payload; integers take the fewest bytes that hold their set
//! bits (8 for a negative one), text and blobs a big-endian length first. The extension
//! checks every change before it writes anything, so a malformed batch changes nothing.

use rusqlite::Connection;

use crate::sync::{Change, Value};

const MERGE_SQL: &str = "INSERT INTO crsql_changes (patina_batch) VALUES (?1)";

/// Changes waiting to be merged in one statement.
#[derive(Default)]
pub(super) struct Packed {
    buf: Vec<u8>,
    count: usize,
}

impl Packed {
    pub(super) fn push(&mut self, c: &Change) {
        self.buf.push(10);
        text(&mut self.buf, c.table.as_bytes());
        blob(&mut self.buf, &c.pk);
        text(&mut self.buf, c.cid.as_bytes());
        value(&mut self.buf, &c.val);
        integer(&mut self.buf, c.col_version);
        integer(&mut self.buf, c.db_version);
        // An empty site id is NULL, as the one-change insert binds it (and is refused).
        if c.site_id.is_empty() {
            self.buf.push(T_NULL);
        } else {
            blob(&mut self.buf, &c.site_id);
        }
        integer(&mut self.buf, c.cl);
        integer(&mut self.buf, c.seq);
        match c.origin_version {
            Some(v) => integer(&mut self.buf, v),
            None => self.buf.push(T_NULL),
        }
        self.count += 1;
    }

    pub(super) fn len(&self) -> usize {
        self.count
    }

    /// Merges every change pushed so far, in one statement, and starts empty again,
    /// whether or not the merge succeeded: a refused batch must not ride along with the
    /// next one.
    pub(super) fn merge(&mut self, conn: &Connection) -> rusqlite::Result<()> {
        let buf = std::mem::take(&mut self.buf);
        let count = std::mem::replace(&mut self.count, 0);
        if count > 0 {
            conn.prepare_cached(MERGE_SQL)?.execute([&buf])?;
        }
        Ok(())
    }
}

const T_INTEGER: u8 = 1;
const T_REAL: u8 = 2;
const T_TEXT: u8 = 3;
const T_BLOB: u8 = 4;
const T_NULL: u8 = 5;

/// Bytes that hold `v`'s set bits: 0 for 0, 8 for any negative number.
fn width(v: u64) -> usize {
    (64 - v.leading_zeros() as usize).div_ceil(8)
}

fn big_endian(out: &mut Vec<u8>, v: u64, w: usize) {
    out.extend_from_slice(&v.to_be_bytes()[8 - w..]);
}

fn integer(out: &mut Vec<u8>, v: i64) {
    let w = width(v as u64);
    out.push(((w as u8) << 3) | T_INTEGER);
    big_endian(out, v as u64, w);
}

fn bytes(out: &mut Vec<u8>, ty: u8, b: &[u8]) {
    // Frames are far below 4 GiB, so a length always fits the 4 bytes the format allows.
    let len = b.len() as u64;
    let w = width(len);
    out.push(((w as u8) << 3) | ty);
    big_endian(out, len, w);
    out.extend_from_slice(b);
}

fn text(out: &mut Vec<u8>, b: &[u8]) {
    bytes(out, T_TEXT, b);
}

fn blob(out: &mut Vec<u8>, b: &[u8]) {
    bytes(out, T_BLOB, b);
}

fn value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::Null => out.push(T_NULL),
        Value::Integer(i) => integer(out, *i),
        Value::Real(f) => {
            out.push(T_REAL);
            out.extend_from_slice(&f.to_be_bytes());
        }
        // Exact bytes, not checked as UTF-8: a TEXT value arrives as it was read.
        Value::Text(b) => text(out, b),
        Value::Blob(b) => blob(out, b),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn sql_value(v: &Value) -> rusqlite::types::Value {
        use rusqlite::types::Value as V;
        match v {
            Value::Null => V::Null,
            Value::Integer(i) => V::Integer(*i),
            Value::Real(f) => V::Real(*f),
            Value::Text(b) => V::Text(String::from_utf8(b.clone()).unwrap()),
            Value::Blob(b) => V::Blob(b.clone()),
        }
    }

    fn change(val: Value, origin: Option<i64>) -> Change {
        Change {
            table: "t".into(),
            pk: vec![1, 9, 7],
            cid: "a".into(),
            val,
            col_version: 3,
            db_version: -5,
            site_id: vec![7; 16],
            cl: 1,
            seq: 0,
            origin_version: origin,
        }
    }

    /// The encoding is the extension's own: `crsql_pack_columns` of the same ten values
    /// gives the same bytes, for every kind of value and integers of every width.
    #[test]
    fn a_change_packs_as_crsql_pack_columns_packs_its_fields() {
        let Ok(ext) = crate::db::extension_path(None) else {
            return; // libpatina.so not built
        };
        let dir = tempfile::tempdir().unwrap();
        let conn = crate::db::open(
            &dir.path().join("p.db"),
            &ext,
            crate::config::Synchronous::Normal,
        )
        .unwrap();
        let long = vec![b'x'; 70_000];
        let cases = [
            change(Value::Null, None),
            change(Value::Integer(0), Some(0)),
            change(Value::Integer(255), Some(256)),
            change(Value::Integer(i64::MAX), Some(1 << 40)),
            change(Value::Integer(-1), Some(i64::MAX)),
            change(Value::Real(-0.5), Some(1)),
            change(Value::Text(b"caf\xc3\xa9".to_vec()), Some(2)),
            change(Value::Text(long.clone()), Some(3)),
            change(Value::Blob(long), Some(4)),
            change(Value::Blob(vec![]), Some(5)),
        ];
        for c in &cases {
            let mut p = Packed::default();
            p.push(c);
            let expected: Vec<u8> = conn
                .query_row(
                    "SELECT crsql_pack_columns(?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                    rusqlite::params![
                        c.table,
                        c.pk,
                        c.cid,
                        sql_value(&c.val),
                        c.col_version,
                        c.db_version,
                        c.site_id,
                        c.cl,
                        c.seq,
                        c.origin_version
                    ],
                    |r| r.get(0),
                )
                .unwrap();
            assert_eq!(p.buf, expected, "{:?}", c.val);
        }
    }
}
