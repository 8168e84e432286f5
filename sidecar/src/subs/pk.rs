//! Packed primary keys (`crsql_changes.pk`, DESIGN §1) back into SQLite values, so a
//! touched key can be looked up in its table and named the way a subscription keys its
//! rows.

use rusqlite::types::Value;

use super::error::SubError;

/// Decodes a packed key: a count byte, then per value a header `(nbytes << 3) | type`
/// (1 integer, 2 real, 3 text, 4 blob, 5 null) and a big-endian payload.
pub fn unpack(blob: &[u8]) -> Result<Vec<Value>, SubError> {
    let bad = |what: &str| SubError::BadKey(format!("{what} in packed key {}", hex::encode(blob)));
    let (&count, mut rest) = blob.split_first().ok_or_else(|| bad("nothing"))?;
    let mut take = |n: usize| -> Result<&[u8], SubError> {
        if rest.len() < n {
            return Err(bad("truncated value"));
        }
        let (a, b) = rest.split_at(n);
        rest = b;
        Ok(a)
    };
    let be = |b: &[u8]| b.iter().fold(0u64, |acc, x| (acc << 8) | u64::from(*x));
    let mut out = Vec::with_capacity(usize::from(count));
    for _ in 0..count {
        let header = take(1)?[0];
        let width = usize::from(header >> 3);
        let v = match header & 0x07 {
            1 if width <= 8 => Value::Integer(be(take(width)?) as i64),
            2 => {
                let mut a = [0u8; 8];
                a.copy_from_slice(take(8)?);
                Value::Real(f64::from_be_bytes(a))
            }
            t @ (3 | 4) if width <= 4 => {
                let len = usize::try_from(be(take(width)?)).map_err(|_| bad("length"))?;
                let b = take(len)?.to_vec();
                if t == 3 {
                    // SQLite TEXT is bytes; the key is compared as stored.
                    match String::from_utf8(b) {
                        Ok(s) => Value::Text(s),
                        Err(_) => return Err(bad("TEXT that is not UTF-8")),
                    }
                } else {
                    Value::Blob(b)
                }
            }
            5 => Value::Null,
            _ => return Err(bad("unknown value header")),
        };
        out.push(v);
    }
    if !rest.is_empty() {
        return Err(bad("trailing bytes"));
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn unpacks_what_the_extension_packs() {
        // crsql_pack_columns('m-1', 7, NULL, x'00ff', -1, 1.5)
        let mut b = vec![6u8, (1 << 3) | 3, 3];
        b.extend_from_slice(b"m-1");
        b.extend_from_slice(&[(1 << 3) | 1, 7, 5, (1 << 3) | 4, 2, 0, 255, (8 << 3) | 1]);
        b.extend_from_slice(&(-1i64).to_be_bytes());
        b.push(2);
        b.extend_from_slice(&1.5f64.to_be_bytes());
        assert_eq!(
            unpack(&b).unwrap(),
            vec![
                Value::Text("m-1".into()),
                Value::Integer(7),
                Value::Null,
                Value::Blob(vec![0, 255]),
                Value::Integer(-1),
                Value::Real(1.5),
            ]
        );
        assert!(unpack(&[]).is_err());
        assert!(unpack(&[1, (1 << 3) | 3, 9, b'x']).is_err());
        assert!(unpack(&[1, 5, 5]).is_err());
    }
}
