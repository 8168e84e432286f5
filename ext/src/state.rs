//! `patina_state` and `patina_sites`: the change counter, this site's origin counter, the
//! merge flag, this database's site id, and the ordinals that stand for site ids inside clock rows.

use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::sqlite::{Conn, Value};

const STATE_SQL: &str = include_str!("../../sql/ext/state.sql");

/// `patina_state.layout` of databases this build writes. 2: the triggers recognise a
/// one-by-one merge's mark (`triggers::capturing`); 3: a new row starts above
/// `patina_state.cl_floor` (`collect`). Databases at an older layout get the column and
/// their triggers regenerated when the extension loads.
pub const LAYOUT: i64 = 3;

/// Creates the state tables and a site id if this database has none yet. Runs in a
/// savepoint: either all of it exists afterwards or none of it.
pub fn ensure(conn: Conn) -> Result<()> {
    if initialized(conn)? {
        if crate::origins::needs_migration(conn)? {
            savepoint(conn, "patina_migrate", || {
                crate::origins::migrate(conn, STATE_SQL)
            })?;
        }
        let layout = conn
            .query_i64("SELECT layout FROM patina_state WHERE id = 0")?
            .unwrap_or(LAYOUT);
        if layout < LAYOUT {
            savepoint(conn, "patina_migrate", || {
                let has_floor = conn.query_value(
                    "SELECT 1 FROM pragma_table_info('patina_state') WHERE name = 'cl_floor'",
                    &[],
                )?;
                if has_floor.is_none() {
                    conn.exec(
                        "ALTER TABLE patina_state ADD COLUMN cl_floor INTEGER NOT NULL DEFAULT 0",
                    )?;
                }
                for table in crate::schema::replicated_tables(conn)? {
                    crate::crr::install_triggers(conn, &table)?;
                }
                conn.exec(&format!(
                    "UPDATE patina_state SET layout = {LAYOUT} WHERE id = 0"
                ))
            })?;
        }
        return Ok(());
    }
    savepoint(conn, "patina_init", || {
        conn.exec(STATE_SQL)?;
        if conn
            .query_i64("SELECT count(*) FROM patina_state")?
            .unwrap_or(0)
            == 0
        {
            let site: [u8; 16] = rand::random();
            let ord = site_ordinal_insert(conn, &site)?;
            let mut s = conn.prepare(
                "INSERT INTO patina_state (id, site_id, local_site, layout) VALUES (0, ?1, ?2, ?3)",
            )?;
            s.execute(&[
                Value::Blob(site.to_vec()),
                Value::Integer(ord),
                Value::Integer(LAYOUT),
            ])?;
        }
        Ok(())
    })
}

pub fn initialized(conn: Conn) -> Result<bool> {
    Ok(conn
        .query_value(
            "SELECT 1 FROM main.sqlite_schema WHERE type = 'table' AND name = 'patina_state'",
            &[],
        )?
        .is_some())
}

/// Runs `f` inside `SAVEPOINT name`, rolled back entirely when it fails.
pub fn savepoint<T>(conn: Conn, name: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    conn.exec(&format!("SAVEPOINT {name}"))?;
    match f() {
        Ok(v) => {
            conn.exec(&format!("RELEASE {name}"))?;
            Ok(v)
        }
        Err(e) => {
            let _ = conn.exec(&format!("ROLLBACK TO {name}; RELEASE {name}"));
            Err(e)
        }
    }
}

fn not_initialized() -> Error {
    Error::State(
        "patina is not initialized in this database (it was read-only or busy when the extension loaded); \
         run SELECT crsql_as_crr('<table>') on a writable connection"
            .into(),
    )
}

pub fn site_id(conn: Conn) -> Result<Vec<u8>> {
    match conn.query_value("SELECT site_id FROM patina_state WHERE id = 0", &[]) {
        Ok(Some(Value::Blob(b))) => Ok(b),
        Ok(_) => Err(not_initialized()),
        Err(_) if !initialized(conn)? => Err(not_initialized()),
        Err(e) => Err(e),
    }
}

pub fn local_site(conn: Conn) -> Result<i64> {
    conn.query_i64("SELECT local_site FROM patina_state WHERE id = 0")?
        .ok_or_else(not_initialized)
}

/// The last change number handed out; 0 before patina was initialized here. One
/// statement on the common path: the API asks for it after every write.
pub fn db_version(conn: Conn) -> Result<i64> {
    match conn.query_i64("SELECT db_version FROM patina_state WHERE id = 0") {
        Ok(v) => Ok(v.unwrap_or(0)),
        Err(_) if !initialized(conn)? => Ok(0),
        Err(e) => Err(e),
    }
}

/// The last number of this site's own numbering (`1..=` it are the versions it wrote).
pub fn origin_version(conn: Conn) -> Result<i64> {
    conn.query_i64("SELECT origin_version FROM patina_state WHERE id = 0")?
        .ok_or_else(not_initialized)
}

pub(crate) fn site_ordinal_insert(conn: Conn, site: &[u8]) -> Result<i64> {
    let mut s = conn.prepare(
        "INSERT INTO patina_sites (site_id) VALUES (?1) ON CONFLICT (site_id) DO NOTHING",
    )?;
    s.execute(&[Value::Blob(site.to_vec())])?;
    conn.query_value(
        "SELECT ord FROM patina_sites WHERE site_id = ?1",
        &[Value::Blob(site.to_vec())],
    )?
    .and_then(|v| v.as_i64())
    .ok_or_else(|| Error::State("site ordinal vanished after insert".into()))
}

/// Ordinals ↔ site ids, cached per connection and refreshed on a miss.
#[derive(Default)]
pub struct Sites {
    by_id: HashMap<Vec<u8>, i64>,
    by_ord: HashMap<i64, Vec<u8>>,
}

impl Sites {
    pub fn reload(&mut self, conn: Conn) -> Result<()> {
        let mut s = conn.prepare("SELECT ord, site_id FROM patina_sites")?;
        let rows = s.query_map(&[], |r| (r.column_i64(0), r.column(1)))?;
        self.by_id.clear();
        self.by_ord.clear();
        for (ord, id) in rows {
            if let Value::Blob(b) = id {
                self.by_id.insert(b.clone(), ord);
                self.by_ord.insert(ord, b);
            }
        }
        Ok(())
    }

    /// The ordinal for `site`, registering it when new.
    pub fn ordinal(&mut self, conn: Conn, site: &[u8]) -> Result<i64> {
        if let Some(o) = self.by_id.get(site) {
            return Ok(*o);
        }
        let ord = site_ordinal_insert(conn, site)?;
        self.by_id.insert(site.to_vec(), ord);
        self.by_ord.insert(ord, site.to_vec());
        Ok(ord)
    }

    /// The site id of an ordinal (None for NULL or an unknown ordinal).
    pub fn id(&self, ord: i64) -> Option<&[u8]> {
        self.by_ord.get(&ord).map(Vec::as_slice)
    }

    pub fn forget(&mut self) {
        self.by_id.clear();
        self.by_ord.clear();
    }
}
