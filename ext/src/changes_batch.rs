//! The batched merge path: while the caller holds `patina_state.merging = 1` for its
//! whole transaction, merged changes are queued and applied grouped by row.
//!
//! Applied one by one, a row's changes (its own clock plus each column's) cost four or five
//! statements each. Grouped, a row costs one clock read, one base-table write and one
//! clock write, whatever the number of changes. Every change is decided by the same pure
//! rules (`merge.rs`), in arrival order, so the outcome is the one-by-one outcome.
//!
//! The queue is applied (flushed) by `SELECT patina_flush()`, which the caller runs before
//! clearing `merging`. Commit (`xSync`), reads of `crsql_changes`, the counter functions
//! and every [`QUEUE_LIMIT`] changes flush too. Until then the caller's own connection
//! does not see the queued rows. `ROLLBACK TO` drops what was queued after its savepoint.
//! A flush holds `merging` set while it writes, whoever calls it, so nothing it writes is
//! captured as a local change.

use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::merge::{self, ColumnClock, Plan};
use crate::merger::{key_where, stmt, Merger, Queued};
use crate::ranges::RangeSet;
use crate::schema::{clock_table, quote, TableInfo};
use crate::sqlite::{Conn, Stmt, Value};
use crate::triggers::{
    clock_columns, col_clock, pk_list, pk_match, pk_params, CL, S_DBV, S_OV, S_SITE,
};

#[derive(Clone, Debug)]
struct Col {
    v: i64,
    dbv: Option<i64>,
    site: Option<i64>,
    ov: Option<i64>,
    /// None after a reset: the column holds its DEFAULT.
    value: Option<Value>,
}

impl Col {
    fn reset() -> Col {
        Col {
            v: 0,
            dbv: None,
            site: None,
            ov: None,
            value: None,
        }
    }
}

struct Row {
    cl: i64,
    /// Whether the base table holds the row.
    base: bool,
    s_dbv: Option<i64>,
    s_site: Option<i64>,
    s_ov: Option<i64>,
    cols: Vec<Col>,
}

fn opt(v: Value) -> Option<i64> {
    v.as_i64()
}

fn read_sql(t: &TableInfo) -> String {
    let mut cols = vec![
        format!("k.{CL}"),
        format!("k.{S_DBV}"),
        format!("k.{S_SITE}"),
        format!("k.{S_OV}"),
    ];
    for c in &t.columns {
        cols.extend(col_clock(&c.name).iter().map(|x| format!("k.{}", quote(x))));
        cols.push(format!("b.{}", quote(&c.name)));
    }
    // Whether the base row exists (a key column is NOT NULL in any base row).
    cols.push(format!("b.{} IS NOT NULL", quote(&t.pk[0].name)));
    let on = pk_match(t, "b", "k");
    let key = pk_params(t, "k", 1);
    format!(
        "SELECT {} FROM {} AS k LEFT JOIN {} AS b ON {on} WHERE {key}",
        cols.join(", "),
        quote(&clock_table(&t.name)),
        quote(&t.name)
    )
}

fn upsert_sql(t: &TableInfo) -> String {
    let names = clock_columns(t);
    // Every clock column but the key (the first entry) is taken from the new row.
    let sets: Vec<String> = names[1..]
        .iter()
        .map(|c| format!("{c} = excluded.{c}"))
        .collect();
    let n = t.pk.len() + 5 + 4 * t.columns.len();
    let params: Vec<String> = (1..=n).map(|i| format!("?{i}")).collect();
    format!(
        "INSERT INTO {} ({}) VALUES ({}) ON CONFLICT ({}) DO UPDATE SET {}",
        quote(&clock_table(&t.name)),
        names.join(", "),
        params.join(", "),
        pk_list(t, ""),
        sets.join(", ")
    )
}

fn write_sql(t: &TableInfo, replace: bool, mask: &[bool]) -> String {
    let cols: Vec<&str> = t
        .columns
        .iter()
        .zip(mask)
        .filter(|(_, m)| **m)
        .map(|(c, _)| c.name.as_str())
        .collect();
    if replace {
        let mut names = vec![pk_list(t, "")];
        names.extend(cols.iter().map(|c| quote(c)));
        let params: Vec<String> = (1..=t.pk.len() + cols.len())
            .map(|i| format!("?{i}"))
            .collect();
        format!(
            "INSERT OR REPLACE INTO {} ({}) VALUES ({})",
            quote(&t.name),
            names.join(", "),
            params.join(", ")
        )
    } else {
        let npk = t.pk.len();
        let sets: Vec<String> = cols
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{} = ?{}", quote(c), npk + 1 + i))
            .collect();
        format!(
            "UPDATE {} SET {} WHERE {}",
            quote(&t.name),
            sets.join(", "),
            key_where(t, 1)
        )
    }
}

impl Merger {
    /// Records a savepoint's position in the queue (`xSavepoint`).
    pub fn savepoint(&mut self, n: i32) {
        self.marks.retain(|(m, _, _)| *m < n);
        self.marks.push((n, self.queue.len(), self.held.len()));
    }

    /// Forgets savepoints `n` and above (`xRelease`); the queue stays.
    pub fn release(&mut self, n: i32) {
        self.marks.retain(|(m, _, _)| *m < n);
    }

    /// Drops what was queued after savepoint `n` (`xRollbackTo`).
    pub fn rollback_to(&mut self, n: i32) {
        let (keep, keep_held) = self
            .marks
            .iter()
            .find(|(m, _, _)| *m == n)
            .map_or((0, 0), |(_, q, h)| (*q, *h));
        self.queue.truncate(keep);
        self.held.truncate(keep_held);
        self.marks.retain(|(m, _, _)| *m <= n);
        self.forget_state();
    }

    /// Applies every queued change, writes the per-change path's held versions and
    /// clears its mark; returns the base rows written.
    pub fn flush(&mut self, conn: Conn) -> Result<i64> {
        let mut impacted = 0;
        // Both the queue and the held versions end empty: no savepoint position survives.
        if !self.queue.is_empty() || !self.held.is_empty() {
            self.marks.clear();
        }
        if !self.queue.is_empty() {
            let queue = std::mem::take(&mut self.queue);
            let result = self.apply_queue(conn, queue);
            if result.is_err() {
                self.forget_state();
            }
            impacted = result?;
        }
        if !self.held.is_empty() {
            let result = self.write_held(conn);
            if result.is_err() {
                self.forget_state();
            }
            result?;
        }
        if self.token_left {
            let s = stmt(&mut self.mark_clear, conn, || {
                "UPDATE patina_state SET merging = 0 WHERE id = 0 AND merging > 1".into()
            })?;
            s.execute(&[])?;
            self.token_left = false;
        }
        Ok(impacted)
    }

    /// Writes the per-change path's held versions, a few statements per origin.
    fn write_held(&mut self, conn: Conn) -> Result<()> {
        let held = std::mem::take(&mut self.held);
        let mut by_site: HashMap<i64, RangeSet> = HashMap::new();
        let mut run: Option<(i64, RangeSet)> = None;
        for (ord, v) in held {
            match &mut run {
                Some((o, set)) if *o == ord => set.insert_one(v),
                _ => {
                    if let Some((o, set)) = run.take() {
                        by_site.entry(o).or_default().union(&set);
                    }
                    run = Some((ord, RangeSet::from_range(v, v)));
                }
            }
        }
        if let Some((o, set)) = run {
            by_site.entry(o).or_default().union(&set);
        }
        let before = conn.total_changes();
        for (ord, set) in &by_site {
            let site = self.site_bytes(conn, *ord).ok_or_else(|| {
                Error::State(format!("site ordinal {ord} is not in patina_sites"))
            })?;
            self.ranges.record(conn, &site, set)?;
        }
        self.state_still_valid(conn, before);
        Ok(())
    }

    fn apply_queue(&mut self, conn: Conn, queue: Vec<Queued>) -> Result<i64> {
        let (mut counter, merging, equal_values) = self.state_now(conn)?;
        // Held origin versions, coalesced per flush: a few range writes per origin, not a
        // statement per change. Superseded changes count (they were seen).
        let mut held: HashMap<i64, (Vec<u8>, RangeSet)> = HashMap::new();
        // Runs of one origin are common: a unit is one origin's feed read.
        let mut run: Option<(i64, RangeSet)> = None;
        for q in &queue {
            match &mut run {
                Some((ord, set)) if *ord == q.site_ord => set.insert_one(q.origin),
                _ => {
                    if let Some((ord, set)) = run.take() {
                        held.entry(ord).or_default().1.union(&set);
                    }
                    held.entry(q.site_ord)
                        .or_insert_with(|| (q.site.clone(), RangeSet::new()));
                    run = Some((q.site_ord, RangeSet::from_range(q.origin, q.origin)));
                }
            }
        }
        if let Some((ord, set)) = run {
            held.entry(ord).or_default().1.union(&set);
        }
        // Group by row, keeping arrival order inside each group.
        let mut order: Vec<(String, Vec<u8>)> = Vec::new();
        let mut groups: HashMap<(String, Vec<u8>), Vec<Queued>> = HashMap::new();
        for q in queue {
            let key = (q.table.clone(), q.pk.clone());
            groups
                .entry(key.clone())
                .or_insert_with(|| {
                    order.push(key);
                    Vec::new()
                })
                .push(q);
        }
        if !merging {
            // Flushed after the caller cleared `merging` (or at commit): hold it while writing.
            let s = stmt(&mut self.counter_write, conn, || {
                "UPDATE patina_state SET db_version = ?1, merging = ?2 WHERE id = 0".into()
            })?;
            s.execute(&[Value::Integer(counter), Value::Integer(1)])?;
        }
        let mut impacted = 0;
        for key in order {
            let Some(changes) = groups.remove(&key) else {
                continue;
            };
            impacted += self.apply_row(conn, &changes, &mut counter, equal_values)?;
        }
        let s = stmt(&mut self.counter_write, conn, || {
            "UPDATE patina_state SET db_version = ?1, merging = ?2 WHERE id = 0".into()
        })?;
        s.execute(&[Value::Integer(counter), Value::Integer(i64::from(merging))])?;
        for (site, versions) in held.values() {
            self.ranges.record(conn, site, versions)?;
        }
        self.remember_state(conn, counter, merging, equal_values);
        Ok(impacted)
    }

    /// Decides and writes one row's queued changes; returns how many of them wrote the base
    /// row (`merge::Plan::impacts`, counted per change as on the one-by-one path).
    fn apply_row(
        &mut self,
        conn: Conn,
        changes: &[Queued],
        counter: &mut i64,
        equal_values: bool,
    ) -> Result<i64> {
        let first = &changes[0];
        let keys = first.keys.clone();
        let ncols = self.table(conn, &first.table)?.0.columns.len();

        // The local row (cl 0 when unknown here).
        let mut row = {
            let (info, st) = self.table(conn, &first.table)?;
            let s = stmt(&mut st.batch.read, conn, || read_sql(info))?;
            s.reset();
            s.bind_all(&keys)?;
            let row = if s.step()? {
                let cols = (0..ncols)
                    .map(|i| {
                        let at = 4 + i * 5;
                        Col {
                            v: s.column_i64(at),
                            dbv: opt(s.column(at + 1)),
                            site: opt(s.column(at + 2)),
                            ov: opt(s.column(at + 3)),
                            value: Some(s.column(at + 4)),
                        }
                    })
                    .collect();
                Row {
                    cl: s.column_i64(0),
                    base: s.column_i64(4 + ncols * 5) != 0,
                    s_dbv: opt(s.column(1)),
                    s_site: opt(s.column(2)),
                    s_ov: opt(s.column(3)),
                    cols,
                }
            } else {
                Row {
                    cl: 0,
                    base: false,
                    s_dbv: None,
                    s_site: None,
                    s_ov: None,
                    cols: vec![Col::reset(); ncols],
                }
            };
            s.reset();
            row
        };

        let mut next = || {
            *counter += 1;
            *counter
        };
        let mut life_changed = false;
        let mut base_present = row.base;
        let mut clock_dirty = false;
        let mut dirty = vec![false; ncols];
        let mut impacted = 0;
        for q in changes {
            let plan = {
                let row_site = match q.col {
                    None => row.s_site.and_then(|o| self.site_bytes(conn, o)),
                    Some(_) => None,
                };
                let c = q.col.map_or_else(Col::reset, |i| row.cols[i].clone());
                let col_site = c.site.and_then(|o| self.site_bytes(conn, o));
                let local_value = c.value.unwrap_or(Value::Null);
                let local = merge::LocalRow {
                    cl: row.cl,
                    row_site: row_site.as_deref(),
                    column: ColumnClock {
                        col_version: c.v,
                        value: &local_value,
                        site: col_site.as_deref(),
                    },
                };
                let incoming = merge::IncomingChange {
                    cl: q.cl,
                    site: &q.site,
                    column: q.col.map(|_| ColumnClock {
                        col_version: q.col_version,
                        value: &q.val,
                        site: Some(&q.site),
                    }),
                };
                merge::plan(&local, &incoming, equal_values)
            };
            if plan.impacts(base_present) {
                impacted += 1;
            }
            match plan {
                Plan::Skip => continue,
                Plan::Delete | Plan::NewLife => {
                    row.cl = q.cl;
                    row.cols = vec![Col::reset(); ncols];
                    dirty = vec![false; ncols];
                    life_changed = true;
                    base_present = plan == Plan::NewLife;
                }
                Plan::CreditRow | Plan::SetColumn { .. } => {}
            }
            clock_dirty = true;
            // The row's own clock is credited only by the change that set it.
            match (plan, q.col) {
                (Plan::Delete | Plan::CreditRow, _) | (Plan::NewLife, None) => {
                    (row.s_dbv, row.s_site, row.s_ov) =
                        (Some(next()), Some(q.site_ord), Some(q.origin));
                }
                (Plan::NewLife, Some(_)) => (row.s_dbv, row.s_site, row.s_ov) = (None, None, None),
                _ => {}
            }
            if let (Plan::NewLife | Plan::SetColumn { .. }, Some(i)) = (plan, q.col) {
                row.cols[i] = Col {
                    v: q.col_version,
                    dbv: Some(next()),
                    site: Some(q.site_ord),
                    ov: Some(q.origin),
                    value: Some(q.val.clone()),
                };
                if let Plan::SetColumn { write_base: true } = plan {
                    dirty[i] = true;
                }
            }
        }
        if !clock_dirty {
            return Ok(0);
        }

        let (info, st) = self.table(conn, &first.table)?;
        let alive = row.cl % 2 == 1;
        if life_changed && !alive {
            let s = stmt(&mut st.batch.delete, conn, || {
                format!(
                    "DELETE FROM {} WHERE {}",
                    quote(&info.name),
                    key_where(info, 1)
                )
            })?;
            s.execute(&keys)?;
        } else if life_changed || dirty.iter().any(|d| *d) {
            let mask: Vec<bool> = if life_changed {
                row.cols.iter().map(|c| c.v > 0).collect()
            } else {
                dirty.clone()
            };
            let s = keyed_writes(
                &mut st.batch.writes,
                (life_changed, mask.clone()),
                conn,
                || write_sql(info, life_changed, &mask),
            )?;
            let mut params = keys.clone();
            params.extend(
                row.cols
                    .iter()
                    .zip(&mask)
                    .filter(|(_, m)| **m)
                    .map(|(c, _)| c.value.clone().unwrap_or(Value::Null)),
            );
            s.execute(&params)?;
        }
        let row_dbv = row
            .cols
            .iter()
            .filter_map(|c| c.dbv)
            .chain(row.s_dbv)
            .max()
            .unwrap_or(*counter);
        let s = stmt(&mut st.batch.upsert_clock, conn, || upsert_sql(info))?;
        let int = |v: Option<i64>| v.map_or(Value::Null, Value::Integer);
        let mut params = keys;
        params.extend([
            Value::Integer(row.cl),
            Value::Integer(row_dbv),
            int(row.s_dbv),
            int(row.s_site),
            int(row.s_ov),
        ]);
        for c in &row.cols {
            params.extend([Value::Integer(c.v), int(c.dbv), int(c.site), int(c.ov)]);
        }
        s.execute(&params)?;
        Ok(impacted)
    }
}

fn keyed_writes(
    map: &mut HashMap<(bool, Vec<bool>), Stmt>,
    k: (bool, Vec<bool>),
    conn: Conn,
    sql: impl FnOnce() -> String,
) -> Result<&mut Stmt> {
    if !map.contains_key(&k) {
        let s = conn.prepare(&sql())?;
        map.insert(k.clone(), s);
    }
    map.get_mut(&k)
        .ok_or_else(|| Error::State("statement cache".into()))
}
