//! The grouped merge path: changes applied grouped by row, many rows per statement.
//!
//! Changes arrive two ways: queued one `INSERT INTO crsql_changes` at a time while the
//! caller holds `patina_state.merging = 1` for its transaction, or as one `patina_batch`
//! blob (already checked, `changes::check_batch`), applied before its statement returns.
//! Every change is decided by the same pure rules (`merge.rs`), in arrival order, so the
//! outcome is the one-by-one outcome. Rows go in chunks: one read of the chunk's clocks
//! and rows, one multi-row write of the rows written whole, one multi-row clock upsert;
//! a row whose key is not plain (`merger::plain_key`) goes alone.
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
use crate::merger::{key_where, keyed, stmt, Merger, Queued};
use crate::ranges::RangeSet;
use crate::schema::{clock_table, quote, TableInfo};
use crate::sqlite::{Conn, Value};
use crate::triggers::{clock_columns, col_clock, pk_list, pk_match, CL, S_DBV, S_OV, S_SITE};

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

/// Rows per multi-row statement at most: SQLite's cost per statement run (and the copies
/// of pages into its statement journal) is then paid per chunk rather than per row.
const CHUNK: usize = 64;

impl Row {
    fn unknown(ncols: usize) -> Row {
        Row {
            cl: 0,
            base: false,
            s_dbv: None,
            s_site: None,
            s_ov: None,
            cols: vec![Col::reset(); ncols],
        }
    }
}

/// What a row's changes do to its base row.
enum BaseWrite {
    None,
    Delete,
    /// The columns in `mask` set to `values`; `replace`: the row is written whole (a new
    /// life), otherwise those columns are updated in place.
    Write {
        replace: bool,
        mask: Vec<bool>,
        values: Vec<Value>,
    },
}

/// A row's decided outcome: its base write and its clock row (after the key).
struct Decided {
    keys: Vec<Value>,
    base: BaseWrite,
    clock: Vec<Value>,
}

/// `n` comma-separated groups of `width` numbered parameters each, from `?1`.
fn param_rows(n: usize, width: usize) -> String {
    (0..n)
        .map(|r| {
            let cells: Vec<String> = (0..width)
                .map(|c| format!("?{}", 1 + r * width + c))
                .collect();
            format!("({})", cells.join(", "))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The local clock, values and base presence of `n` keys, each tagged with its position:
/// parameters are `(position, key...)` per key.
fn read_sql(t: &TableInfo, n: usize) -> String {
    let mut cols = vec![
        "q.i".to_string(),
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
    let qcols: Vec<String> = (0..t.pk.len()).map(|i| format!("k{i}")).collect();
    let on_q: Vec<String> =
        t.pk.iter()
            .enumerate()
            .map(|(i, c)| format!("k.{} = q.k{i}", quote(&c.name)))
            .collect();
    format!(
        "WITH q(i, {}) AS (VALUES {}) SELECT {} FROM q JOIN {} AS k ON {} LEFT JOIN {} AS b ON {}",
        qcols.join(", "),
        param_rows(n, 1 + t.pk.len()),
        cols.join(", "),
        quote(&clock_table(&t.name)),
        on_q.join(" AND "),
        quote(&t.name),
        pk_match(t, "b", "k"),
    )
}

/// Upserts `n` clock rows.
fn upsert_sql(t: &TableInfo, n: usize) -> String {
    let names = clock_columns(t);
    // Every clock column but the key (the first entry) is taken from the new row.
    let sets: Vec<String> = names[1..]
        .iter()
        .map(|c| format!("{c} = excluded.{c}"))
        .collect();
    let width = t.pk.len() + 5 + 4 * t.columns.len();
    format!(
        "INSERT INTO {} ({}) VALUES {} ON CONFLICT ({}) DO UPDATE SET {}",
        quote(&clock_table(&t.name)),
        names.join(", "),
        param_rows(n, width),
        pk_list(t, ""),
        sets.join(", ")
    )
}

fn masked<'a>(t: &'a TableInfo, mask: &[bool]) -> Vec<&'a str> {
    t.columns
        .iter()
        .zip(mask)
        .filter(|(_, m)| **m)
        .map(|(c, _)| c.name.as_str())
        .collect()
}

/// Writes `n` whole rows (a new life): the key and the columns in `mask`, the others
/// taking their DEFAULT.
fn replace_sql(t: &TableInfo, mask: &[bool], n: usize) -> String {
    let cols = masked(t, mask);
    let mut names = vec![pk_list(t, "")];
    names.extend(cols.iter().map(|c| quote(c)));
    format!(
        "INSERT OR REPLACE INTO {} ({}) VALUES {}",
        quote(&t.name),
        names.join(", "),
        param_rows(n, t.pk.len() + cols.len())
    )
}

/// Updates the columns in `mask` of one row.
fn update_sql(t: &TableInfo, mask: &[bool]) -> String {
    let npk = t.pk.len();
    let sets: Vec<String> = masked(t, mask)
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

impl Merger {
    /// Merges a `patina_batch` (`INSERT INTO crsql_changes (patina_batch) VALUES (?)`),
    /// its changes already checked (`changes::check_batch`, so a batch with one invalid
    /// change writes nothing): they join the queue after anything the caller queued
    /// before, and the queue is applied, grouped by row, before the statement returns,
    /// whether or not the caller set `merging`. Returns the base rows written, counted as
    /// the one-by-one path counts them.
    pub fn merge_batch(&mut self, conn: Conn, mut changes: Vec<Queued>) -> Result<i64> {
        // What the caller queued (or noted as held) before a savepoint still open must not
        // be written inside it: `ROLLBACK TO` would undo the write and, the queue being
        // gone, lose it. Then the batch is applied on its own and the queue stays (the
        // rules are order-independent, so the outcome is the same).
        if self
            .marks
            .iter()
            .any(|(_, queued, held)| *queued > 0 || *held > 0)
        {
            let result = self.apply_queue(conn, changes);
            if result.is_err() {
                self.forget_state();
            }
            return result;
        }
        self.queue.append(&mut changes);
        self.flush(conn)
    }

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
                        .or_insert_with(|| (q.site.to_vec(), RangeSet::new()));
                    run = Some((q.site_ord, RangeSet::from_range(q.origin, q.origin)));
                }
            }
        }
        if let Some((ord, set)) = run {
            held.entry(ord).or_default().1.union(&set);
        }
        // Group by row, keeping arrival order inside each group and the groups in order
        // of their first change.
        let mut group_of = Vec::with_capacity(queue.len());
        let mut ngroups = 0usize;
        {
            let mut index: HashMap<(&str, &[u8]), usize> = HashMap::with_capacity(queue.len());
            for q in &queue {
                let g = *index
                    .entry((&*q.table, q.pk.as_slice()))
                    .or_insert_with(|| {
                        ngroups += 1;
                        ngroups - 1
                    });
                group_of.push(g);
            }
        }
        let mut rows: Vec<Vec<Queued>> = (0..ngroups).map(|_| Vec::new()).collect();
        for (q, g) in queue.into_iter().zip(group_of) {
            rows[g].push(q);
        }
        if !merging {
            // Flushed after the caller cleared `merging` (or at commit): hold it while writing.
            let s = stmt(&mut self.counter_write, conn, || {
                "UPDATE patina_state SET db_version = ?1, merging = ?2 WHERE id = 0".into()
            })?;
            s.execute(&[Value::Integer(counter), Value::Integer(1)])?;
        }
        let applied = self.apply_rows(conn, &mut rows, &mut counter, equal_values);
        // Whether or not every row was written: the counter covers every number handed
        // out to a clock already written, and `merging` is back as the caller left it, so
        // a caller that goes on after the error (rather than rolling back, as it should:
        // earlier chunks stay written) still has its own writes captured and numbered
        // after these.
        let s = stmt(&mut self.counter_write, conn, || {
            "UPDATE patina_state SET db_version = ?1, merging = ?2 WHERE id = 0".into()
        })?;
        s.execute(&[Value::Integer(counter), Value::Integer(i64::from(merging))])?;
        let impacted = applied?;
        for (site, versions) in held.values() {
            self.ranges.record(conn, site, versions)?;
        }
        self.remember_state(conn, counter, merging, equal_values);
        Ok(impacted)
    }

    /// Applies grouped rows in chunks: consecutive rows of one table, as many as one
    /// statement carries. Returns the changes that wrote a base row.
    fn apply_rows(
        &mut self,
        conn: Conn,
        rows: &mut [Vec<Queued>],
        counter: &mut i64,
        equal_values: bool,
    ) -> Result<i64> {
        let mut impacted = 0;
        let mut start = 0;
        while start < rows.len() {
            let table = rows[start][0].table.clone();
            // A row whose key is not plain may be the same row as another key of the
            // chunk in other bytes: it goes alone, read after the writes before it.
            let limit = if rows[start][0].plain_key {
                self.chunk_rows(conn, &table)?
            } else {
                1
            };
            let mut end = start + 1;
            while end < rows.len()
                && end - start < limit
                && rows[end][0].table == table
                && rows[end][0].plain_key
            {
                end += 1;
            }
            impacted +=
                self.apply_chunk(conn, &table, &mut rows[start..end], counter, equal_values)?;
            start = end;
        }
        Ok(impacted)
    }

    /// Rows per multi-row statement for `table`: [`CHUNK`], or fewer where a row binds
    /// many parameters (wide tables), so no statement binds more than the connection
    /// allows. A table whose one clock row binds more than that is refused with the
    /// figures (the one-by-one path binds a few per change and still merges it).
    fn chunk_rows(&mut self, conn: Conn, table: &str) -> Result<usize> {
        let limit = conn.variable_limit();
        let (info, _) = self.table(conn, table)?;
        let per_row = info.pk.len() + 5 + 4 * info.columns.len();
        if per_row > limit {
            return Err(Error::Change(format!(
                "table '{}' has too many columns for a grouped merge on this connection: \
                 its clock row binds {per_row} parameters and SQLite allows {limit} \
                 (SQLITE_LIMIT_VARIABLE_NUMBER); merge its changes one INSERT INTO \
                 crsql_changes at a time, without merging = 1",
                info.name
            )));
        }
        Ok((limit / per_row).clamp(1, CHUNK))
    }

    /// Reads, decides and writes a chunk of rows of one table; returns how many of their
    /// changes wrote a base row (`merge::Plan::impacts`, counted per change as on the
    /// one-by-one path).
    fn apply_chunk(
        &mut self,
        conn: Conn,
        table: &str,
        rows: &mut [Vec<Queued>],
        counter: &mut i64,
        equal_values: bool,
    ) -> Result<i64> {
        let locals = self.read_rows(conn, table, rows)?;
        let mut impacted = 0;
        let mut decided = Vec::with_capacity(rows.len());
        for (changes, row) in rows.iter_mut().zip(locals) {
            let (n, d) = self.decide_row(conn, std::mem::take(changes), row, counter, equal_values);
            impacted += n;
            decided.extend(d);
        }
        self.write_rows(conn, table, &decided)?;
        Ok(impacted)
    }

    /// The local state of each row of `rows` (cl 0 when unknown here), in order, read with
    /// one statement: the keys are a `VALUES` list joined to the clock table by its key.
    fn read_rows(&mut self, conn: Conn, table: &str, rows: &[Vec<Queued>]) -> Result<Vec<Row>> {
        let (info, st) = self.table(conn, table)?;
        let ncols = info.columns.len();
        let n = rows.len();
        let s = keyed(&mut st.batch.reads, n, conn, || read_sql(info, n))?;
        s.reset();
        let mut at = 1;
        for (i, changes) in rows.iter().enumerate() {
            s.bind(at, &Value::Integer(i as i64))?;
            at += 1;
            for k in &changes[0].keys {
                s.bind(at, k)?;
                at += 1;
            }
        }
        let mut out: Vec<Row> = (0..n).map(|_| Row::unknown(ncols)).collect();
        while s.step()? {
            let Some(slot) = usize::try_from(s.column_i64(0))
                .ok()
                .and_then(|i| out.get_mut(i))
            else {
                continue;
            };
            let cols = (0..ncols)
                .map(|i| {
                    let at = 5 + i * 5;
                    Col {
                        v: s.column_i64(at),
                        dbv: opt(s.column(at + 1)),
                        site: opt(s.column(at + 2)),
                        ov: opt(s.column(at + 3)),
                        value: Some(s.column(at + 4)),
                    }
                })
                .collect();
            *slot = Row {
                cl: s.column_i64(1),
                base: s.column_i64(5 + ncols * 5) != 0,
                s_dbv: opt(s.column(2)),
                s_site: opt(s.column(3)),
                s_ov: opt(s.column(4)),
                cols,
            };
        }
        s.reset();
        Ok(out)
    }

    /// Decides one row's queued changes in arrival order (pure rules, `merge::plan`);
    /// returns how many wrote the base row, and what to write (None: nothing changed).
    fn decide_row(
        &mut self,
        conn: Conn,
        changes: Vec<Queued>,
        mut row: Row,
        counter: &mut i64,
        equal_values: bool,
    ) -> (i64, Option<Decided>) {
        let ncols = row.cols.len();
        let mut keys = Vec::new();
        let mut next = || {
            *counter += 1;
            *counter
        };
        let mut life_changed = false;
        let mut base_present = row.base;
        let mut clock_dirty = false;
        let mut dirty = vec![false; ncols];
        let mut impacted = 0;
        let unwritten = Col::reset();
        for mut q in changes {
            if keys.is_empty() {
                keys = std::mem::take(&mut q.keys);
            }
            let plan = {
                let row_site = match q.col {
                    None => row.s_site.and_then(|o| self.site_bytes(conn, o)),
                    Some(_) => None,
                };
                let c = q.col.map_or(&unwritten, |i| &row.cols[i]);
                let col_site = c.site.and_then(|o| self.site_bytes(conn, o));
                let local = merge::LocalRow {
                    cl: row.cl,
                    row_site: row_site.as_ref().map(|s| &s[..]),
                    column: ColumnClock {
                        col_version: c.v,
                        value: c.value.as_ref().unwrap_or(&Value::Null),
                        site: col_site.as_ref().map(|s| &s[..]),
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
                    value: Some(std::mem::replace(&mut q.val, Value::Null)),
                };
                if let Plan::SetColumn { write_base: true } = plan {
                    dirty[i] = true;
                }
            }
        }
        if !clock_dirty {
            return (impacted, None);
        }

        let alive = row.cl % 2 == 1;
        let base = if life_changed && !alive {
            BaseWrite::Delete
        } else if life_changed || dirty.iter().any(|d| *d) {
            let mask: Vec<bool> = if life_changed {
                row.cols.iter().map(|c| c.v > 0).collect()
            } else {
                dirty
            };
            let values = row
                .cols
                .iter_mut()
                .zip(&mask)
                .filter(|(_, m)| **m)
                .map(|(c, _)| c.value.take().unwrap_or(Value::Null))
                .collect();
            BaseWrite::Write {
                replace: life_changed,
                mask,
                values,
            }
        } else {
            BaseWrite::None
        };
        let row_dbv = row
            .cols
            .iter()
            .filter_map(|c| c.dbv)
            .chain(row.s_dbv)
            .max()
            .unwrap_or(*counter);
        let int = |v: Option<i64>| v.map_or(Value::Null, Value::Integer);
        let mut clock = Vec::with_capacity(5 + 4 * ncols);
        clock.extend([
            Value::Integer(row.cl),
            Value::Integer(row_dbv),
            int(row.s_dbv),
            int(row.s_site),
            int(row.s_ov),
        ]);
        for c in &row.cols {
            clock.extend([Value::Integer(c.v), int(c.dbv), int(c.site), int(c.ov)]);
        }
        let decided = Decided { keys, base, clock };
        (impacted, Some(decided))
    }

    /// Writes decided rows in order: base rows, then the clock rows of every row whose
    /// base write went through, even when a later one failed (an app's CHECK constraint
    /// or trigger can refuse a row), so no base row holds a value its clock does not
    /// credit.
    fn write_rows(&mut self, conn: Conn, table: &str, rows: &[Decided]) -> Result<()> {
        let mut running = (0, 0);
        let bases = self.write_bases(conn, table, rows, &mut running);
        let (done, failed_end) = running;
        let mut credited: Vec<&Decided> = rows[..done].iter().collect();
        if bases.is_err() {
            // The statement that failed may have written some of its rows (a trigger's
            // RAISE(FAIL) keeps what came before it; an AFTER trigger fails after its row
            // was written): credit each of its rows whose base row holds what was written.
            for r in &rows[done..failed_end] {
                if self.base_holds(conn, table, r).unwrap_or(false) {
                    credited.push(r);
                }
            }
        }
        let clocks = self.write_clocks(conn, table, &credited);
        bases.and(clocks)
    }

    /// Whether the base row holds what `row`'s write meant: gone for a delete, the
    /// written columns equal (`IS`, with the columns' affinity) for a write.
    fn base_holds(&mut self, conn: Conn, table: &str, row: &Decided) -> Result<bool> {
        let (info, _) = self.table(conn, table)?;
        let key = key_where(info, 1);
        let (sql, params) = match &row.base {
            BaseWrite::None => return Ok(true),
            BaseWrite::Delete => (
                format!(
                    "SELECT NOT EXISTS (SELECT 1 FROM {} WHERE {key})",
                    quote(&info.name)
                ),
                row.keys.clone(),
            ),
            BaseWrite::Write { mask, values, .. } => {
                let npk = row.keys.len();
                let same: String = masked(info, mask)
                    .iter()
                    .enumerate()
                    .map(|(i, c)| format!(" AND {} IS ?{}", quote(c), npk + 1 + i))
                    .collect();
                let mut params = row.keys.clone();
                params.extend(values.iter().cloned());
                (
                    format!(
                        "SELECT EXISTS (SELECT 1 FROM {} WHERE {key}{same})",
                        quote(&info.name)
                    ),
                    params,
                )
            }
        };
        Ok(conn.query_value(&sql, &params)?.and_then(|v| v.as_i64()) == Some(1))
    }

    /// Base rows in order: runs of rows replaced with the same columns share one
    /// multi-row statement; updates and deletes go one by one. `running` is the range of
    /// rows of the statement running: written before it, not after; on success, all.
    fn write_bases(
        &mut self,
        conn: Conn,
        table: &str,
        rows: &[Decided],
        running: &mut (usize, usize),
    ) -> Result<()> {
        let (info, st) = self.table(conn, table)?;
        let mut i = 0;
        while i < rows.len() {
            *running = (i, i + 1);
            let d = &rows[i];
            match &d.base {
                BaseWrite::None => i += 1,
                BaseWrite::Delete => {
                    let s = stmt(&mut st.batch.delete, conn, || {
                        format!(
                            "DELETE FROM {} WHERE {}",
                            quote(&info.name),
                            key_where(info, 1)
                        )
                    })?;
                    s.execute(&d.keys)?;
                    i += 1;
                }
                BaseWrite::Write {
                    replace: false,
                    mask,
                    values,
                } => {
                    let s = keyed(&mut st.batch.writes, mask.clone(), conn, || {
                        update_sql(info, mask)
                    })?;
                    let mut params = d.keys.clone();
                    params.extend(values.iter().cloned());
                    s.execute(&params)?;
                    i += 1;
                }
                BaseWrite::Write {
                    replace: true,
                    mask,
                    ..
                } => {
                    let mut end = i + 1;
                    while end < rows.len()
                        && matches!(&rows[end].base, BaseWrite::Write { replace: true, mask: m, .. } if m == mask)
                    {
                        end += 1;
                    }
                    let n = end - i;
                    *running = (i, end);
                    let s = keyed(&mut st.batch.replaces, (mask.clone(), n), conn, || {
                        replace_sql(info, mask, n)
                    })?;
                    s.reset();
                    let mut at = 1;
                    for r in &rows[i..end] {
                        let values = match &r.base {
                            BaseWrite::Write { values, .. } => values.as_slice(),
                            _ => &[],
                        };
                        for v in r.keys.iter().chain(values) {
                            s.bind(at, v)?;
                            at += 1;
                        }
                    }
                    s.run()?;
                    i = end;
                }
            }
        }
        *running = (rows.len(), rows.len());
        Ok(())
    }

    /// Upserts the clock rows of `rows`, all in one statement.
    fn write_clocks(&mut self, conn: Conn, table: &str, rows: &[&Decided]) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let (info, st) = self.table(conn, table)?;
        let n = rows.len();
        let s = keyed(&mut st.batch.upserts, n, conn, || upsert_sql(info, n))?;
        s.reset();
        let all = rows.iter().flat_map(|r| r.keys.iter().chain(&r.clock));
        for (at, v) in (1..).zip(all) {
            s.bind(at, v)?;
        }
        s.run()
    }
}
