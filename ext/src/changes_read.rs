//! Reading the change feed: `SELECT ... FROM crsql_changes WHERE db_version > ?`.
//!
//! Each clock table is range-scanned on its `__patina_dbv` index (the newest change in
//! the row), joined to the base table for current values; the row's own clock and every
//! column whose change number is in range become one change each. All of it happens in
//! the caller's read transaction, so one read sees whole transactions only.

use std::rc::Rc;

use crate::error::Result;
use crate::pk;
use crate::schema::{clock_table, quote, TableInfo};
use crate::sqlite::{Conn, Value};
use crate::state::Sites;
use crate::triggers::{col_clock, CL, DBV, S_DBV, S_OV, S_SITE};

/// The sentinel column id of a row's own clock (cr-sqlite's name for it).
pub const SENTINEL: &str = "-1";

/// One row of `crsql_changes`.
#[derive(Clone, Debug)]
pub struct Change {
    pub table: Rc<str>,
    pub pk: Rc<[u8]>,
    pub cid: Rc<str>,
    pub val: Value,
    pub col_version: i64,
    pub db_version: i64,
    pub site_id: Option<Rc<[u8]>>,
    pub cl: i64,
    pub origin_version: i64,
}

/// A change's `(db_version, site_id, origin_version)` as read from a clock.
type ClockRef = (i64, Option<Rc<[u8]>>, i64);

/// What the caller's WHERE clause let us narrow the read to.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// Exclusive lower bound on db_version.
    pub after: i64,
    /// Inclusive upper bound on db_version.
    pub up_to: i64,
    pub table: Option<String>,
    pub site_eq: Option<Vec<u8>>,
    pub site_ne: Option<Vec<u8>>,
}

impl Filter {
    pub fn all() -> Filter {
        Filter {
            after: i64::MIN,
            up_to: i64::MAX,
            ..Filter::default()
        }
    }

    pub fn keeps_site(&self, site: Option<&[u8]>) -> bool {
        if let Some(eq) = &self.site_eq {
            if site != Some(eq.as_slice()) {
                return false;
            }
        }
        if let Some(ne) = &self.site_ne {
            if site == Some(ne.as_slice()) {
                return false;
            }
        }
        true
    }

    fn in_range(&self, v: i64) -> bool {
        v > self.after && v <= self.up_to
    }
}

fn read_sql(t: &TableInfo) -> String {
    let clock = quote(&clock_table(&t.name));
    let mut cols: Vec<String> =
        t.pk.iter()
            .map(|c| format!("k.{}", quote(&c.name)))
            .collect();
    cols.extend([CL, S_DBV, S_SITE, S_OV].iter().map(|c| format!("k.{c}")));
    for c in &t.columns {
        cols.extend(col_clock(&c.name).iter().map(|x| format!("k.{}", quote(x))));
        cols.push(format!("b.{}", quote(&c.name)));
    }
    cols.push(format!("b.{} IS NOT NULL", quote(&t.pk[0].name)));
    let join =
        t.pk.iter()
            .map(|c| format!("b.{q} = k.{q}", q = quote(&c.name)))
            .collect::<Vec<_>>()
            .join(" AND ");
    format!(
        "SELECT {} FROM {clock} AS k LEFT JOIN {} AS b ON {join} WHERE k.{DBV} > ?1",
        cols.join(", "),
        quote(&t.name)
    )
}

/// Appends the changes of one table that pass `f`, calling `after_row` after each clock
/// row (so a caller can bound memory).
pub fn read_table(
    conn: Conn,
    t: &TableInfo,
    sites: &Sites,
    f: &Filter,
    out: &mut Vec<Change>,
    after_row: &mut dyn FnMut(&mut Vec<Change>),
) -> Result<()> {
    let mut s = conn.prepare(&read_sql(t))?;
    s.reset();
    // Only the lower bound can narrow rows: a row whose newest change is past `up_to` may
    // still hold older changes inside the window.
    s.bind_all(&[Value::Integer(f.after)])?;
    let table: Rc<str> = Rc::from(t.name.as_str());
    let npk = t.pk.len();
    let cids: Vec<Rc<str>> = t
        .columns
        .iter()
        .map(|c| Rc::from(c.name.as_str()))
        .collect();
    let sentinel: Rc<str> = Rc::from(SENTINEL);
    let site_of =
        |v: &Value| -> Option<Rc<[u8]>> { v.as_i64().and_then(|o| sites.id(o)).map(Rc::from) };
    // A clock is three consecutive columns (change number, site, origin's number); it
    // yields a change when it is set and passes the filter.
    let clock = |s: &crate::sqlite::Stmt, at: usize| -> Option<ClockRef> {
        if s.column_is_null(at) {
            return None;
        }
        let dbv = s.column_i64(at);
        let site = site_of(&s.column(at + 1));
        if !f.in_range(dbv) || !f.keeps_site(site.as_deref()) {
            return None;
        }
        let ov = if s.column_is_null(at + 2) {
            dbv
        } else {
            s.column_i64(at + 2)
        };
        Some((dbv, site, ov))
    };
    while s.step()? {
        let keys: Vec<Value> = (0..npk).map(|i| s.column(i)).collect();
        let pk: Rc<[u8]> = Rc::from(pk::pack(&keys)?);
        let cl = s.column_i64(npk);
        let base = npk + 4;
        let alive = s.column_i64(base + cids.len() * 5) != 0;
        let change = |cid: &Rc<str>,
                      val: Value,
                      col_version: i64,
                      (db_version, site_id, origin_version)| Change {
            table: table.clone(),
            pk: pk.clone(),
            cid: cid.clone(),
            val,
            col_version,
            db_version,
            site_id,
            cl,
            origin_version,
        };
        // The row's own clock, unless its credit is still open (see changes_write).
        if !s.column_is_null(npk + 2) {
            if let Some(c) = clock(&s, npk + 1) {
                out.push(change(&sentinel, Value::Null, cl, c));
            }
        }
        if cl % 2 == 1 && alive {
            for (i, cid) in cids.iter().enumerate() {
                let at = base + i * 5;
                let version = s.column_i64(at);
                if version <= 0 {
                    continue;
                }
                if let Some(c) = clock(&s, at + 1) {
                    out.push(change(cid, s.column(at + 4), version, c));
                }
            }
        }
        after_row(out);
    }
    s.reset();
    Ok(())
}
