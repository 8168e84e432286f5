//! Merging remote changes: `INSERT INTO crsql_changes (...) VALUES (...)`.
//!
//! Each change is validated first (table, column, pk blob, clocks), then decided by the
//! pure rules in `merge.rs`, then written: the base row (with a merge mark in
//! `patina_state.merging` so the capture triggers stay quiet) and the clock row, which gets
//! a fresh local change number. Its origin version is noted and written to
//! `patina_origin_ranges` at the next flush. Statements are prepared once per transaction
//! and finalized at its end.

use crate::error::Result;
use crate::merge::{self, ColumnClock, Plan};
use crate::merger::{key_where, keyed, queued, stmt, Checked, Incoming, Merger, QUEUE_LIMIT};
use crate::schema::{clock_table, quote, TableInfo};
use crate::sqlite::{Conn, Value};
use crate::triggers::{col_clock, CL, DBV, S_DBV, S_OV, S_SITE};

impl Merger {
    /// Notes one held origin version (the per-change path). It is written to
    /// `patina_origin_ranges` at the next flush, coalesced with the others (see
    /// [`Merger::flush`]): inside the merge's transaction, at the latest in `xSync`.
    fn record_held(&mut self, site_ord: i64, origin: i64) {
        self.held.push((site_ord, origin));
    }

    /// Validates and merges one change (or queues it on the batched path). Returns the base
    /// rows written (several when a full queue was applied).
    pub fn merge(&mut self, conn: Conn, ch: Incoming) -> Result<i64> {
        // Validation first: a refused change must not have written anything.
        let checked = self.check(conn, &ch.fields())?;

        // Local state.
        let (db_version, merging, equal_values) = self.state_now(conn)?;
        if merging {
            // The batched path: queue it; the queue is applied grouped by row.
            self.queue.push(queued(ch, checked));
            return if self.queue.len() >= QUEUE_LIMIT {
                self.flush(conn)
            } else {
                Ok(0)
            };
        }
        let Checked {
            keys,
            col,
            ncols: n,
            site_ord,
            origin,
            ..
        } = checked;
        let read_key = col.unwrap_or(n);
        let local = {
            let (info, st) = self.table(conn, &ch.table)?;
            let s = keyed(&mut st.read, read_key, conn, || read_sql(info, col))?;
            s.reset();
            s.bind_all(&keys)?;
            if !s.step()? {
                s.reset();
                LocalRow::unknown()
            } else {
                let r = LocalRow {
                    cl: if s.column_is_null(0) {
                        0
                    } else {
                        s.column_i64(0)
                    },
                    sentinel_site: if s.column_is_null(1) {
                        None
                    } else {
                        Some(s.column_i64(1))
                    },
                    col_version: s.column_i64(2),
                    col_site: if s.column_is_null(3) {
                        None
                    } else {
                        Some(s.column_i64(3))
                    },
                    value: s.column(4),
                };
                s.reset();
                r
            }
        };

        let plan = {
            let row_site = match (col, local.sentinel_site) {
                (None, Some(o)) => self.site_bytes(conn, o),
                _ => None,
            };
            let col_site = local.col_site.and_then(|o| self.site_bytes(conn, o));
            let local_row = merge::LocalRow {
                cl: local.cl,
                row_site: row_site.as_ref().map(|s| &s[..]),
                column: ColumnClock {
                    col_version: local.col_version,
                    value: &local.value,
                    site: col_site.as_ref().map(|s| &s[..]),
                },
            };
            let incoming = merge::IncomingChange {
                cl: ch.cl,
                site: &ch.site_id,
                column: col.map(|_| ColumnClock {
                    col_version: ch.col_version,
                    value: &ch.val,
                    site: Some(&ch.site_id),
                }),
            };
            merge::plan(&local_row, &incoming, equal_values)
        };
        if plan == Plan::Skip {
            // Superseded, but seen: its origin version is held all the same.
            self.record_held(site_ord, origin);
            return Ok(0);
        }

        // Write: one new local change number for this change, and the merge mark that
        // keeps the capture triggers quiet during this change's base write. Where only
        // patina's triggers are on the table, the mark is a token equal to this
        // connection's `total_changes() + 2` while the base write runs, which the next
        // completed statement makes stale, so no clearing write is needed per change (the
        // commit clears it, see `Merger::flush`). Another trigger's writes would move
        // `total_changes()` under ours, so such tables get a plain flag set and cleared.
        let new_dbv = db_version + 1;
        // (A database whose triggers predate the mark gets the flag too.)
        let token =
            !self.table(conn, &ch.table)?.1.other_triggers && self.triggers_know_mark(conn)?;
        let before = conn.total_changes();
        let schema_moved;
        {
            let s = stmt(&mut self.state_write, conn, || {
                "UPDATE patina_state SET db_version = ?1, merging = ?2 WHERE id = 0".into()
            })?;
            let mark = if token { before + 3 } else { 1 };
            s.execute(&[Value::Integer(new_dbv), Value::Integer(mark)])?;
            // The schema changed since this transaction's first merge (a trigger may have
            // been added to the table after `other_triggers` was read): flag from now on.
            schema_moved = s.reprepares() > 0;
        }
        self.token_left |= token;
        // The token works only if that write counted as exactly one change; otherwise
        // fall back to the flag.
        let flagged = !token || schema_moved || conn.total_changes() != before + 1;
        if flagged && token {
            let s = stmt(&mut self.flag_write, conn, || {
                "UPDATE patina_state SET merging = ?1 WHERE id = 0".into()
            })?;
            s.execute(&[Value::Integer(1)])?;
        }
        // SQLite cannot open a savepoint while the INSERT runs, so atomicity comes from the
        // order: each change makes at most one base-table statement (atomic by itself),
        // before any clock write; if it fails, the counter and mark are put back.
        if let Err(e) = self.write_base(conn, &ch, &keys, col, plan) {
            let s = stmt(&mut self.state_write, conn, String::new)?;
            s.execute(&[Value::Integer(db_version), Value::Integer(0)])?;
            self.forget_state();
            return Err(e);
        }
        // A delete of a row this replica never had changes no base row.
        let base_changed = plan != Plan::Delete || conn.changes() > 0;
        let result = self.write_clock(conn, &ch, &keys, col, plan, site_ord, origin, new_dbv);
        if flagged {
            let s = stmt(&mut self.flag_write, conn, || {
                "UPDATE patina_state SET merging = ?1 WHERE id = 0".into()
            })?;
            s.execute(&[Value::Integer(0)])?;
        }
        match &result {
            Ok(()) => self.remember_state(conn, new_dbv, false, equal_values),
            Err(_) => self.forget_state(),
        }
        result?;
        // After the write, never before: a failure here leaves a change applied but not
        // recorded (asked for again, harmlessly), never a version recorded but not held.
        self.record_held(site_ord, origin);
        Ok(i64::from(plan.impacts(base_changed)))
    }

    /// The one base-table statement of a change, if any.
    fn write_base(
        &mut self,
        conn: Conn,
        ch: &Incoming,
        keys: &[Value],
        col: Option<usize>,
        plan: Plan,
    ) -> Result<()> {
        let (info, st) = self.table(conn, &ch.table)?;
        let npk = keys.len();
        let mut params = keys.to_vec();
        match (plan, col) {
            (Plan::Skip | Plan::CreditRow | Plan::SetColumn { write_base: false }, _)
            | (Plan::SetColumn { .. }, None) => Ok(()),
            (Plan::Delete, _) => {
                let s = stmt(&mut st.delete_base, conn, || {
                    format!(
                        "DELETE FROM {} WHERE {}",
                        quote(&info.name),
                        key_where(info, 1)
                    )
                })?;
                s.execute(keys)
            }
            (Plan::NewLife, None) => {
                let s = stmt(&mut st.insert_base, conn, || {
                    let params: Vec<String> = (1..=npk).map(|i| format!("?{i}")).collect();
                    format!(
                        "INSERT OR REPLACE INTO {} ({}) VALUES ({})",
                        quote(&info.name),
                        crate::triggers::pk_list(info, ""),
                        params.join(", ")
                    )
                })?;
                s.execute(keys)
            }
            (Plan::NewLife, Some(i)) => {
                let s = keyed(&mut st.replace_with_column, i, conn, || {
                    let params: Vec<String> = (1..=npk + 1).map(|i| format!("?{i}")).collect();
                    format!(
                        "INSERT OR REPLACE INTO {} ({}, {}) VALUES ({})",
                        quote(&info.name),
                        crate::triggers::pk_list(info, ""),
                        quote(&info.columns[i].name),
                        params.join(", ")
                    )
                })?;
                params.push(ch.val.clone());
                s.execute(&params)
            }
            (Plan::SetColumn { write_base: true }, Some(i)) => {
                let s = keyed(&mut st.update_base, i, conn, || {
                    format!(
                        "UPDATE {} SET {} = ?{} WHERE {}",
                        quote(&info.name),
                        quote(&info.columns[i].name),
                        npk + 1,
                        key_where(info, 1)
                    )
                })?;
                params.push(ch.val.clone());
                s.execute(&params)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn write_clock(
        &mut self,
        conn: Conn,
        ch: &Incoming,
        keys: &[Value],
        col: Option<usize>,
        plan: Plan,
        site: i64,
        origin: i64,
        dbv: i64,
    ) -> Result<()> {
        let (info, st) = self.table(conn, &ch.table)?;
        let npk = keys.len();
        // A new life or delete sets `cl` and restarts the columns; the row's own clock is
        // credited only by the change that set it (see `merge::Plan::NewLife`).
        let life = match (plan, col) {
            (Plan::Delete, _) | (Plan::NewLife, None) => Some(Some((site, origin))),
            (Plan::NewLife, Some(_)) => Some(None),
            _ => None,
        };
        // A new life's column change rides in the same upsert.
        let with_column = match (life, col) {
            (Some(None), Some(i)) => Some(i),
            _ => None,
        };
        if let Some(life) = life {
            let s = match with_column {
                Some(i) => keyed(&mut st.new_life_with, i, conn, || {
                    new_life_sql(info, Some(i))
                })?,
                None => stmt(&mut st.new_life, conn, || new_life_sql(info, None))?,
            };
            let (s_site, s_ov, s_dbv) = match life {
                Some((site, ov)) => (
                    Value::Integer(site),
                    Value::Integer(ov),
                    Value::Integer(dbv),
                ),
                None => (Value::Null, Value::Null, Value::Null),
            };
            let mut params = keys.to_vec();
            params.extend([
                Value::Integer(ch.cl),
                Value::Integer(dbv),
                s_dbv,
                s_site,
                s_ov,
            ]);
            if with_column.is_some() {
                params.extend([
                    Value::Integer(ch.col_version),
                    Value::Integer(dbv),
                    Value::Integer(site),
                    Value::Integer(origin),
                ]);
            }
            s.execute(&params)?;
        }
        if plan == Plan::CreditRow {
            let s = stmt(&mut st.set_sentinel, conn, || {
                format!(
                    "UPDATE {} SET {S_DBV} = ?{a}, {DBV} = ?{a}, {S_SITE} = ?{b}, {S_OV} = ?{c} WHERE {w}",
                    quote(&clock_table(&info.name)),
                    a = npk + 1,
                    b = npk + 2,
                    c = npk + 3,
                    w = key_where(info, 1)
                )
            })?;
            let mut params = keys.to_vec();
            params.extend([
                Value::Integer(dbv),
                Value::Integer(site),
                Value::Integer(origin),
            ]);
            s.execute(&params)?;
        }
        if let (Some(i), Plan::SetColumn { .. }) = (col, plan) {
            let s = keyed(&mut st.set_column, i, conn, || {
                let [v, d, si, ov] = col_clock(&info.columns[i].name).map(|x| quote(&x));
                format!(
                    "UPDATE {} SET {v} = ?{a}, {d} = ?{b}, {DBV} = ?{b}, {si} = ?{c}, {ov} = ?{e} WHERE {w}",
                    quote(&clock_table(&info.name)),
                    a = npk + 1,
                    b = npk + 2,
                    c = npk + 3,
                    e = npk + 4,
                    w = key_where(info, 1)
                )
            })?;
            let mut params = keys.to_vec();
            params.extend([
                Value::Integer(ch.col_version),
                Value::Integer(dbv),
                Value::Integer(site),
                Value::Integer(origin),
            ]);
            s.execute(&params)?;
        }
        Ok(())
    }
}

struct LocalRow {
    cl: i64,
    sentinel_site: Option<i64>,
    col_version: i64,
    col_site: Option<i64>,
    value: Value,
}

impl LocalRow {
    /// A key this replica has never seen.
    fn unknown() -> LocalRow {
        LocalRow {
            cl: 0,
            sentinel_site: None,
            col_version: 0,
            col_site: None,
            value: Value::Null,
        }
    }
}

/// The local clock of a key (no row when unknown) and, for a column, its clock and the
/// base table's current value.
fn read_sql(t: &TableInfo, col: Option<usize>) -> String {
    let clock = quote(&clock_table(&t.name));
    let key = crate::triggers::pk_params(t, "k", 1);
    match col {
        Some(i) => {
            let [v, _, s, _] = col_clock(&t.columns[i].name).map(|x| quote(&x));
            let on =
                t.pk.iter()
                    .map(|c| format!("b.{q} = k.{q}", q = quote(&c.name)))
                    .collect::<Vec<_>>()
                    .join(" AND ");
            format!(
                "SELECT k.{CL}, k.{S_SITE}, k.{v}, k.{s}, b.{val} FROM {clock} AS k LEFT JOIN {table} AS b ON {on} WHERE {key}",
                val = quote(&t.columns[i].name),
                table = quote(&t.name),
            )
        }
        None => format!("SELECT k.{CL}, k.{S_SITE}, 0, NULL, NULL FROM {clock} AS k WHERE {key}"),
    }
}

/// Upserts the row's clock for a new life (or delete): sets cl and the row clock, and
/// restarts every column clock but `col`, which takes the incoming change's clock (so a
/// change that starts a new life costs one clock statement, not two).
fn new_life_sql(t: &TableInfo, col: Option<usize>) -> String {
    let npk = t.pk.len();
    let mut names = vec![
        crate::triggers::pk_list(t, ""),
        CL.into(),
        DBV.into(),
        S_DBV.into(),
        S_SITE.into(),
        S_OV.into(),
    ];
    let mut sets = vec![
        format!("{CL} = excluded.{CL}"),
        format!("{DBV} = excluded.{DBV}"),
        format!("{S_DBV} = excluded.{S_DBV}"),
        format!("{S_SITE} = excluded.{S_SITE}"),
        format!("{S_OV} = excluded.{S_OV}"),
    ];
    for (i, c) in t.columns.iter().enumerate() {
        let [v, d, s, ov] = col_clock(&c.name).map(|x| quote(&x));
        if Some(i) == col {
            for x in [v, d, s, ov] {
                sets.push(format!("{x} = excluded.{x}"));
                names.push(x);
            }
        } else {
            sets.extend([
                format!("{v} = 0"),
                format!("{d} = NULL"),
                format!("{s} = NULL"),
                format!("{ov} = NULL"),
            ]);
        }
    }
    let n = npk + 5 + if col.is_some() { 4 } else { 0 };
    let params: Vec<String> = (1..=n).map(|i| format!("?{i}")).collect();
    format!(
        "INSERT INTO {clock} ({names}) VALUES ({params}) ON CONFLICT ({pk}) DO UPDATE SET {sets}",
        clock = quote(&clock_table(&t.name)),
        names = names.join(", "),
        pk = crate::triggers::pk_list(t, ""),
        params = params.join(", "),
        sets = sets.join(", "),
    )
}
