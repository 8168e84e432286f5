//! cr-sqlite's packed encoding of primary keys (`crsql_pack_columns`, `crsql_changes.pk`).
//!
//! A count byte, then per value a header byte `(nbytes << 3) | type` (1 integer, 2 real,
//! 3 text, 4 blob, 5 null) followed by a big-endian payload. Integers use the fewest bytes
//! that hold their set bits (negative numbers therefore always take 8); text and blobs carry
//! a big-endian length of `nbytes` bytes, then the bytes; reals are 8 bytes with no length
//! bits. We produce the same bytes as cr-sqlite for the same values, so pk blobs compare
//! equal across both implementations.

use crate::error::{Error, Result};
use crate::sqlite::Value;

const T_INTEGER: u8 = 1;
const T_REAL: u8 = 2;
const T_TEXT: u8 = 3;
const T_BLOB: u8 = 4;
const T_NULL: u8 = 5;

/// Bytes needed for `v`'s set bits: 0 for 0, 8 for any negative number.
fn int_width(v: i64) -> usize {
    let u = v as u64;
    (64 - u.leading_zeros() as usize).div_ceil(8)
}

fn put_be(out: &mut Vec<u8>, v: u64, width: usize) {
    for i in (0..width).rev() {
        out.push((v >> (8 * i)) as u8);
    }
}

/// Packs values in order. At most 255 values (the count is one byte).
pub fn pack(values: &[Value]) -> Result<Vec<u8>> {
    let count = u8::try_from(values.len()).map_err(|_| {
        Error::Pk(format!(
            "{} values is more than the 255 a packed key holds",
            values.len()
        ))
    })?;
    let mut out = Vec::with_capacity(1 + values.len() * 9);
    out.push(count);
    for v in values {
        pack_one(&mut out, v)?;
    }
    Ok(out)
}

fn pack_one(out: &mut Vec<u8>, v: &Value) -> Result<()> {
    match v {
        Value::Null => out.push(T_NULL),
        Value::Integer(i) => {
            let w = int_width(*i);
            out.push(((w as u8) << 3) | T_INTEGER);
            put_be(out, *i as u64, w);
        }
        Value::Real(f) => {
            out.push(T_REAL);
            out.extend_from_slice(&f.to_be_bytes());
        }
        Value::Text(b) | Value::Blob(b) => {
            let len = u32::try_from(b.len())
                .ok()
                .filter(|l| *l <= i32::MAX as u32)
                .ok_or_else(|| {
                    Error::Pk(format!("a {}-byte value is too long to pack", b.len()))
                })?;
            let w = int_width(i64::from(len));
            let ty = if matches!(v, Value::Text(_)) {
                T_TEXT
            } else {
                T_BLOB
            };
            out.push(((w as u8) << 3) | ty);
            put_be(out, u64::from(len), w);
            out.extend_from_slice(b);
        }
    }
    Ok(())
}

/// A packed value, borrowed from the blob it was read from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Packed<'a> {
    Null,
    Integer(i64),
    Real(f64),
    Text(&'a [u8]),
    Blob(&'a [u8]),
}

impl Packed<'_> {
    pub fn to_value(self) -> Value {
        match self {
            Packed::Null => Value::Null,
            Packed::Integer(i) => Value::Integer(i),
            Packed::Real(f) => Value::Real(f),
            Packed::Text(b) => Value::Text(b.to_vec()),
            Packed::Blob(b) => Value::Blob(b.to_vec()),
        }
    }

    pub fn type_name(self) -> &'static str {
        match self {
            Packed::Null => "NULL",
            Packed::Integer(_) => "INTEGER",
            Packed::Real(_) => "REAL",
            Packed::Text(_) => "TEXT",
            Packed::Blob(_) => "BLOB",
        }
    }
}

impl<'a> From<&'a Value> for Packed<'a> {
    fn from(v: &'a Value) -> Packed<'a> {
        match v {
            Value::Null => Packed::Null,
            Value::Integer(i) => Packed::Integer(*i),
            Value::Real(f) => Packed::Real(*f),
            Value::Text(b) => Packed::Text(b),
            Value::Blob(b) => Packed::Blob(b),
        }
    }
}

/// Unpacks a blob made by [`pack`] (or by cr-sqlite). Every malformation is an error that
/// says what was wrong and where; nothing here panics on hostile input.
#[cfg(any(test, fuzzing))]
pub fn unpack(blob: &[u8]) -> Result<Vec<Value>> {
    unpack_canonical(blob).map(|(values, _)| values)
}

/// [`unpack`], and whether the blob is the canonical packing of its values (what
/// [`pack`] makes of them: every integer and length in the fewest bytes).
pub fn unpack_canonical(blob: &[u8]) -> Result<(Vec<Value>, bool)> {
    let mut r = Reader::new(blob)?;
    let mut out = Vec::with_capacity(r.count());
    while let Some(v) = r.next_value()? {
        out.push(v.to_value());
    }
    if !r.rest().is_empty() {
        return Err(Error::Pk(format!(
            "{} bytes left after {} values",
            r.rest().len(),
            out.len()
        )));
    }
    Ok((out, r.canonical))
}

/// Reads the packed values at the front of a blob one by one, borrowing text and blobs;
/// what follows them is [`Reader::rest`] (a batch of changes is packed records one after
/// another, `changes_batch`).
pub struct Reader<'a> {
    rest: &'a [u8],
    count: usize,
    read: usize,
    /// Every value read so far was packed in the fewest bytes.
    canonical: bool,
}

impl<'a> Reader<'a> {
    pub fn new(blob: &'a [u8]) -> Result<Reader<'a>> {
        let (&count, rest) = blob
            .split_first()
            .ok_or_else(|| Error::Pk("empty blob".into()))?;
        Ok(Reader {
            rest,
            count: usize::from(count),
            read: 0,
            canonical: true,
        })
    }

    /// Values the count byte announced.
    pub fn count(&self) -> usize {
        self.count
    }

    /// The bytes after the values read so far.
    pub fn rest(&self) -> &'a [u8] {
        self.rest
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if self.rest.len() < n {
            return Err(Error::Pk(format!(
                "value {}: {what} needs {n} bytes, {} left",
                self.read + 1,
                self.rest.len()
            )));
        }
        let (a, b) = self.rest.split_at(n);
        self.rest = b;
        Ok(a)
    }

    /// The next value, or None after the last one the count announced.
    pub fn next_value(&mut self) -> Result<Option<Packed<'a>>> {
        if self.read == self.count {
            return Ok(None);
        }
        let i = self.read + 1;
        let count = self.count;
        let header = *self
            .take(1, "header")
            .map_err(|_| Error::Pk(format!("blob ends before value {i} of {count}")))?
            .first()
            .ok_or_else(|| Error::Pk(format!("blob ends before value {i} of {count}")))?;
        let width = (header >> 3) as usize;
        let be = |b: &[u8]| b.iter().fold(0u64, |acc, x| (acc << 8) | u64::from(*x));
        let value = match header & 0x07 {
            T_NULL => Packed::Null,
            T_INTEGER => {
                if width > 8 {
                    return Err(Error::Pk(format!("value {i}: integer width {width} > 8")));
                }
                // Widths below 8 only ever hold non-negative numbers (see `int_width`).
                let v = be(self.take(width, "integer")?) as i64;
                self.canonical &= width == int_width(v);
                Packed::Integer(v)
            }
            T_REAL => {
                let mut a = [0u8; 8];
                a.copy_from_slice(self.take(8, "real")?);
                Packed::Real(f64::from_be_bytes(a))
            }
            t @ (T_TEXT | T_BLOB) => {
                if width > 4 {
                    return Err(Error::Pk(format!("value {i}: length width {width} > 4")));
                }
                let len = be(self.take(width, "length")?) as usize;
                self.canonical &= width == int_width(len as i64);
                let bytes = self.take(len, "payload")?;
                if t == T_TEXT {
                    Packed::Text(bytes)
                } else {
                    Packed::Blob(bytes)
                }
            }
            t => return Err(Error::Pk(format!("value {i}: unknown type {t}"))),
        };
        self.read += 1;
        Ok(Some(value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn only_the_fewest_bytes_are_canonical() {
        let canonical = |b: &[u8]| unpack_canonical(b).map(|(_, c)| c).unwrap();
        assert!(canonical(
            &pack(&[Value::Integer(1), Value::Text(b"ab".to_vec())]).unwrap()
        ));
        assert!(canonical(
            &pack(&[Value::Integer(-1), Value::Integer(0)]).unwrap()
        ));
        assert!(!canonical(&[1, 0x11, 0, 1]), "1 in two bytes");
        assert!(
            !canonical(&[1, 0x13, 0, 2, b'a', b'b']),
            "a length in two bytes"
        );
        assert_eq!(unpack(&[1, 0x11, 0, 1]).unwrap(), vec![Value::Integer(1)]);
    }

    #[test]
    fn matches_cr_sqlite_bytes() {
        // Values and bytes worked out from cr-sqlite's format description.
        assert_eq!(pack(&[Value::Integer(0)]).unwrap(), vec![1, 0x01]);
        assert_eq!(pack(&[Value::Integer(1)]).unwrap(), vec![1, 0x09, 1]);
        assert_eq!(pack(&[Value::Integer(256)]).unwrap(), vec![1, 0x11, 1, 0]);
        assert_eq!(
            pack(&[Value::Integer(-1)]).unwrap(),
            vec![1, 0x41, 255, 255, 255, 255, 255, 255, 255, 255]
        );
        assert_eq!(
            pack(&[Value::Text(b"ab".to_vec())]).unwrap(),
            vec![1, 0x0b, 2, b'a', b'b']
        );
        assert_eq!(pack(&[Value::Text(vec![])]).unwrap(), vec![1, 0x03]);
        assert_eq!(
            pack(&[Value::Null, Value::Blob(vec![7])]).unwrap(),
            vec![2, 5, 0x0c, 1, 7]
        );
        assert_eq!(
            pack(&[Value::Real(1.5)]).unwrap(),
            [vec![1, 2], 1.5f64.to_be_bytes().to_vec()].concat()
        );
    }

    #[test]
    fn byte_200_is_not_negative() {
        let b = pack(&[Value::Integer(200)]).unwrap();
        assert_eq!(unpack(&b).unwrap(), vec![Value::Integer(200)]);
    }

    #[test]
    fn hostile_blobs_are_errors() {
        for bad in [
            &[][..],
            &[1],
            &[1, 0x41, 1],
            &[1, 0x0b, 5, b'a'],
            &[1, 0x07],
            &[1, 0x09, 1, 9],
            &[1, 0x49, 0],
        ] {
            assert!(unpack(bad).is_err(), "{bad:?}");
        }
    }

    fn value() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<i64>().prop_map(Value::Integer),
            any::<f64>()
                .prop_filter("NaN is NULL in SQLite", |f| !f.is_nan())
                .prop_map(Value::Real),
            proptest::collection::vec(any::<u8>(), 0..300).prop_map(Value::Text),
            proptest::collection::vec(any::<u8>(), 0..300).prop_map(Value::Blob),
        ]
    }

    proptest! {
        #[test]
        fn round_trips(values in proptest::collection::vec(value(), 0..8)) {
            let packed = pack(&values).unwrap();
            prop_assert_eq!(unpack(&packed).unwrap(), values);
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = unpack(&bytes);
        }
    }
}
