//! The apply thread's side of the schema buffer (`db::buffer`; the rule: `sync::schema`):
//! keeping a unit that names a table or column this node lacks yet, and applying the
//! buffered units once the schema allows.

use std::collections::{btree_map, BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use rusqlite::{Connection, TransactionBehavior};

use super::apply::{note_origin, unix_now, JobError, JobOutcome, MAX_BATCH_CHANGES};
use super::bookkeeping;
use super::buffer::{self, Kind};
use super::inbox::{self, InboxLimits};
use super::packed::Packed;
use super::schema::SchemaCache;
use crate::node::Metrics;
use crate::sync::{
    describe_missing, held_after_unit, validate_chunk, validate_unit, waiting_origins, Applied,
    ApplyJob, Change, Missing, Schema, SiteId, Work,
};

/// How often the buffer is tried again without a schema change (a unit whose apply
/// failed for another reason, a schema changed between two checks).
const DRAIN_EVERY: Duration = Duration::from_secs(30);
/// How often the buffer's state is logged while it holds anything.
const REPORT_EVERY: Duration = Duration::from_secs(30);

/// The apply thread's view of the local schema and the schema buffer.
#[derive(Default)]
pub(super) struct SchemaState {
    pub(super) cache: SchemaCache,
    /// The buffer's last summary (the database is re-read only when it changed).
    pub(super) summary: buffer::Summary,
    /// Whether the buffer should be tried now.
    pub(super) due: bool,
    last_drain: Option<Instant>,
    last_report: Option<Instant>,
    /// When each "missing …" description was last logged at warn level.
    logged: std::collections::HashMap<String, Instant>,
    /// The fingerprint each origin's last unit carried; `seen_dirty` when it changed.
    seen: BTreeMap<SiteId, u64>,
    seen_dirty: bool,
}

impl SchemaState {
    /// Between batches: notices a schema change (then the buffer is due), keeps the
    /// age gauge current and logs the buffer's state now and then.
    pub(super) fn tick(&mut self, conn: &Connection, metrics: &Metrics) {
        match super::schema::schema_version(conn) {
            Ok(v) if self.cache.version() != Some(v) => {
                if let Err(e) = self.cache.refresh(conn) {
                    tracing::warn!("cannot read the replicated schema: {e}");
                }
                metrics.schema.publish(
                    Some(self.cache.fingerprint()),
                    self.summary.clone(),
                    unix_now(),
                );
                if self.summary.units > 0 {
                    self.due = true;
                }
                self.seen_dirty = true;
                self.publish_elsewhere(metrics);
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("cannot read PRAGMA schema_version: {e}"),
        }
        if self.summary.units == 0 {
            return;
        }
        if !matches!(self.last_drain, Some(t) if t.elapsed() < DRAIN_EVERY) {
            self.due = true;
        }
        if !matches!(self.last_report, Some(t) if t.elapsed() < REPORT_EVERY) {
            self.last_report = Some(Instant::now());
            let now = unix_now();
            let age = self
                .summary
                .oldest_received_at
                .map_or(0, |t| now.saturating_sub(t));
            tracing::warn!(
                units = self.summary.units,
                changes = self.summary.changes,
                oldest_s = age,
                "schema buffer: {} units ({} changes) wait for {}; the oldest arrived {age} s \
                 ago. They are applied once this node's schema has them (schema files + \
                 `patina reload`, or `/v1/migrations`)",
                self.summary.units,
                self.summary.changes,
                self.summary.missing.join(", ")
            );
        }
        metrics
            .schema
            .publish(None, self.summary.clone(), unix_now());
    }

    /// The local schema changed: which origins are elsewhere is to be computed again.
    pub(super) fn mark_seen_dirty(&mut self) {
        self.seen_dirty = true;
    }

    /// Notes the fingerprint a unit of `origin` carried.
    pub(super) fn saw(&mut self, origin: SiteId, fingerprint: u64) {
        if self.seen.insert(origin, fingerprint) != Some(fingerprint) {
            self.seen_dirty = true;
        }
    }

    /// Publishes the origins whose last unit carried another schema than this node's,
    /// when that may have changed.
    pub(super) fn publish_elsewhere(&mut self, metrics: &Metrics) {
        if !std::mem::take(&mut self.seen_dirty) {
            return;
        }
        let mine = self.cache.fingerprint();
        let list = self
            .seen
            .iter()
            .filter(|(_, f)| **f != mine)
            .map(|(o, f)| (hex::encode(o), format!("{f:016x}")))
            .collect();
        metrics.schema.publish_elsewhere(list);
    }

    /// A unit was buffered: one warn line per distinct description every
    /// `REPORT_EVERY`, debug otherwise (a rollout buffers many units).
    pub(super) fn log_buffered(&mut self, what: &str, from: &std::net::SocketAddr, missing: &str) {
        let loud = !matches!(self.logged.get(missing), Some(t) if t.elapsed() < REPORT_EVERY);
        if loud {
            self.logged.insert(missing.to_string(), Instant::now());
            self.logged.retain(|_, t| t.elapsed() < REPORT_EVERY);
            tracing::warn!(
                peer = %from,
                missing,
                "schema buffer: {what} from peer {from} names {missing}, which this node does \
                 not have yet: stored whole until it does (further units missing the same \
                 are logged at debug level)"
            );
        } else {
            tracing::debug!(peer = %from, missing, "schema buffer: {what} buffered");
        }
    }
}

/// A job kept in the schema buffer: what it did to the bookkeeping, and what it misses.
pub(super) struct Kept {
    pub(super) outcome: JobOutcome,
    pub(super) missing: Vec<Missing>,
}

/// Stores a job that failed to apply in the schema buffer, when it names a table or
/// column `schema` lacks, and records it as received — held versions (a unit's whole
/// range; a catch-up unit's claim, as `bookkeeping::mark_applied`), the cursor — exactly
/// as applying it would. `None` when nothing is missing (the failure is the job's own):
/// the caller rolls back whatever this wrote.
pub(super) fn buffer_job(
    conn: &Connection,
    local: &SiteId,
    job: &ApplyJob,
    schema: &Schema,
    now: i64,
) -> Result<Option<Kept>, JobError> {
    let c = match &job.work {
        Work::Unit(u) => {
            validate_unit(u)?;
            let missing = schema.missing(&u.changes);
            if missing.is_empty() {
                return Ok(None);
            }
            let held = held_after_unit(u, local);
            let mut w = buffer::start(conn, Kind::Unit, &u.origin, u.from, u.to, &missing, now)?;
            w.append(conn, &u.changes)?;
            w.finish(conn, Some(&held))?;
            bookkeeping::record_held(conn, &held)?;
            let outcome = JobOutcome {
                touched: vec![u.origin],
                ..JobOutcome::default()
            };
            return Ok(Some(Kept { outcome, missing }));
        }
        Work::Chunk(c) => c,
        Work::SeedPart(_) => return Ok(None),
    };
    validate_chunk(c)?;
    if c.unit_to <= bookkeeping::cursor(conn, &job.peer_site)? {
        return Ok(None);
    }
    let site = &job.peer_site;
    let mut split = Split {
        kind_from: c.unit_from,
        kind_to: c.unit_to,
        now,
        waiting: Default::default(),
        writers: Default::default(),
        merged: 0,
        touched: Vec::new(),
    };
    let held = if c.is_whole_unit() {
        split.waiting = waiting_origins(schema, &c.changes);
        if split.waiting.is_empty() {
            return Ok(None);
        }
        split.take(conn, schema, &c.changes)?;
        c.held.clone()
    } else {
        if !inbox::put(conn, site, c, now, &InboxLimits::default())? {
            return Ok(None);
        }
        // First which origins wait, over the whole unit (read only: the drain's removal
        // of the chunks is rolled back), then the split.
        conn.execute_batch("SAVEPOINT patina_scan")?;
        let mut waiting = BTreeSet::new();
        let scanned = inbox::drain::<JobError>(conn, site, c.unit_from, c.unit_to, |ch| {
            waiting.extend(waiting_origins(schema, &ch.changes));
            Ok(())
        });
        conn.execute_batch("ROLLBACK TO patina_scan; RELEASE patina_scan")?;
        scanned?;
        if waiting.is_empty() {
            return Ok(None);
        }
        split.waiting = waiting;
        let mut first_held = None;
        inbox::drain::<JobError>(conn, site, c.unit_from, c.unit_to, |ch| {
            split.take(conn, schema, &ch.changes)?;
            if ch.from == ch.unit_from {
                first_held = ch.held;
            }
            Ok(())
        })?;
        first_held
    };
    let mut missing = BTreeSet::new();
    for (_, (w, m)) in std::mem::take(&mut split.writers) {
        let m: Vec<Missing> = m.into_iter().collect();
        buffer::set_missing(conn, w.id(), &m)?;
        w.finish(conn, None)?;
        missing.extend(m);
    }
    let mut touched = split.touched;
    if let Some(list) = &held {
        touched.extend(list.iter().map(|o| o.site));
    }
    let cursor =
        bookkeeping::mark_applied(conn, site, local, c.unit_from, c.unit_to, held.as_deref())?;
    let outcome = JobOutcome {
        merged: split.merged,
        cursor: Some(cursor),
        touched,
    };
    Ok(Some(Kept {
        outcome,
        missing: missing.into_iter().collect(),
    }))
}

/// A catch-up unit being split by origin (`sync::schema`): the changes of the `waiting`
/// origins go to one buffer entry each, the others are merged.
struct Split {
    kind_from: i64,
    kind_to: i64,
    now: i64,
    waiting: BTreeSet<Vec<u8>>,
    /// Per waiting origin: its entry, and what its changes miss.
    writers: BTreeMap<Vec<u8>, (buffer::Writer, BTreeSet<Missing>)>,
    merged: u64,
    touched: Vec<SiteId>,
}

impl Split {
    fn take(
        &mut self,
        conn: &Connection,
        schema: &Schema,
        changes: &[Change],
    ) -> Result<(), JobError> {
        let mut packed = Packed::default();
        let mut kept: BTreeMap<Vec<u8>, Vec<Change>> = BTreeMap::new();
        for c in changes {
            if self.waiting.contains(&c.site_id) {
                kept.entry(c.site_id.clone()).or_default().push(c.clone());
            } else {
                packed.push(c);
                self.merged += 1;
                note_origin(&mut self.touched, c);
            }
        }
        packed.merge(conn)?;
        for (origin, list) in kept {
            let (w, m) = match self.writers.entry(origin.clone()) {
                btree_map::Entry::Occupied(e) => e.into_mut(),
                btree_map::Entry::Vacant(e) => {
                    let w = buffer::start(
                        conn,
                        Kind::CatchUp,
                        &origin,
                        self.kind_from,
                        self.kind_to,
                        &[],
                        self.now,
                    )?;
                    e.insert((w, Default::default()))
                }
            };
            m.extend(schema.missing(&list));
            w.append(conn, &list)?;
            note_origin(&mut self.touched, &list[0]);
        }
        Ok(())
    }
}

/// Applies, in one transaction, every buffered unit the local schema now allows (up to
/// `MAX_BATCH_CHANGES` changes; the rest on the next turn), each whole or not at all.
/// Returns the report for the sync machine when anything is buffered.
pub(super) fn drain_buffer(
    conn: &mut Connection,
    local: &SiteId,
    schema: &mut SchemaState,
    metrics: &Metrics,
) -> Option<Applied> {
    schema.due = false;
    schema.last_drain = Some(Instant::now());
    match try_drain(conn, local, schema) {
        Ok(None) => {
            schema.summary = buffer::Summary::default();
            metrics
                .schema
                .publish(None, schema.summary.clone(), unix_now());
            None
        }
        Ok(Some((applied, summary, unbuffered, more))) => {
            if unbuffered > 0 {
                tracing::info!(
                    units = unbuffered,
                    left = summary.units,
                    "schema buffer: applied {unbuffered} buffered units the schema now allows \
                     ({} still wait)",
                    summary.units
                );
                metrics.schema.unbuffered_total.inc_by(unbuffered);
            }
            schema.due = more;
            metrics.schema.publish(None, summary.clone(), unix_now());
            schema.summary = summary;
            Some(applied)
        }
        Err(e) => {
            let msg = format!("cannot apply buffered units: {e}");
            tracing::error!("{msg}");
            metrics.loops.apply.failed(msg);
            None
        }
    }
}

/// The transaction of [`drain_buffer`]: `None` when the buffer is empty, else the report,
/// the buffer's summary afterwards, the units applied, and whether more could be.
fn try_drain(
    conn: &mut Connection,
    local: &SiteId,
    schema: &mut SchemaState,
) -> Result<Option<(Applied, buffer::Summary, u64, bool)>, JobError> {
    if buffer::is_empty(conn)? {
        return Ok(None);
    }
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    schema.cache.refresh(&tx)?;
    let entries = buffer::entries(&tx)?;
    let mut touched: Vec<SiteId> = Vec::new();
    let mut unbuffered = 0u64;
    let mut changes = 0usize;
    let mut more = false;
    {
        for e in &entries {
            if changes >= MAX_BATCH_CHANGES {
                more = true;
                break;
            }
            tx.execute_batch("SAVEPOINT patina_unbuffer")?;
            // One entry's changes per statement: a refused entry takes nothing of the
            // next one with it.
            let mut packed = Packed::default();
            let mut missing = BTreeSet::new();
            let mut origins = Vec::new();
            let merged = buffer::parts::<JobError>(&tx, e.id, |part| {
                missing.extend(schema.cache.schema().missing(&part));
                if missing.is_empty() {
                    for c in &part {
                        packed.push(c);
                        note_origin(&mut origins, c);
                    }
                }
                Ok(())
            })
            .and_then(|()| {
                if missing.is_empty() {
                    packed.merge(&tx)?;
                }
                Ok(())
            });
            let missing: Vec<Missing> = missing.into_iter().collect();
            match merged {
                Ok(()) if missing.is_empty() => {
                    buffer::remove(&tx, e.id)?;
                    tx.execute_batch("RELEASE patina_unbuffer")?;
                    unbuffered += 1;
                    changes += e.changes.max(0) as usize;
                    touched.extend(origins);
                }
                Ok(()) => {
                    tx.execute_batch("ROLLBACK TO patina_unbuffer; RELEASE patina_unbuffer")?;
                    if describe_missing(&missing) != e.missing {
                        buffer::set_missing(&tx, e.id, &missing)?;
                    }
                }
                Err(err) => {
                    tx.execute_batch("ROLLBACK TO patina_unbuffer; RELEASE patina_unbuffer")?;
                    // Kept: it was recorded as received, so dropping it would lose it.
                    tracing::error!(
                        "schema buffer: buffered {} ({}, {}] of site {} does not apply although \
                         the schema has every table and column it names: {err}; it stays \
                         buffered",
                        if e.unit { "unit" } else { "catch-up unit" },
                        e.from,
                        e.to,
                        hex::encode(&e.site)
                    );
                }
            }
        }
    }
    let mut applied = Applied::default();
    touched.sort_unstable();
    touched.dedup();
    for origin in touched.into_iter().filter(|o| o != local) {
        applied
            .held
            .push((origin, bookkeeping::held_of(&tx, &origin)?));
    }
    applied.buffered = Some(buffer::held(&tx)?);
    let summary = buffer::summarize(&buffer::entries(&tx)?);
    tx.commit()?;
    Ok(Some((applied, summary, unbuffered, more)))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::sync::Arc;

    use super::*;
    use crate::db::apply::tests::{job, ApplyFixture};
    use crate::sync::{Chunk, OriginRanges};

    /// The schema change the buffered units of these tests wait for: column `t.b` and
    /// table `u`.
    const ADD_B_AND_U: &str = "SELECT crsql_begin_alter('t');
         ALTER TABLE t ADD COLUMN b TEXT;
         SELECT crsql_commit_alter('t');
         CREATE TABLE u (id INTEGER PRIMARY KEY NOT NULL, a TEXT);
         SELECT crsql_as_crr('u');";

    /// A unit of origin 2 writing column `t.b`, which the fixture's table lacks.
    fn writing_column_b(version: i64) -> ApplyJob {
        let mut j = job("t", version);
        if let Work::Unit(u) = &mut j.work {
            Arc::make_mut(u).changes[0].cid = "b".into();
        }
        j
    }

    /// The rule of `sync::schema` on the real apply thread: a unit naming a missing column
    /// and a catch-up unit naming a missing table are kept and recorded as received (held
    /// versions, cursor), a later unit of the same origin on known columns is applied
    /// meanwhile, and once the schema has them both are applied and leave the buffer.
    #[test]
    fn units_for_missing_tables_and_columns_wait_and_apply_once_the_schema_has_them() {
        let Some(ApplyFixture {
            _dir,
            setup,
            tx,
            mut done,
            metrics,
            stop,
            thread,
        }) = ApplyFixture::start()
        else {
            eprintln!("libpatina.so not built (cargo build -p patina): skipped");
            return;
        };
        let origin = [2u8; 16];

        // Version 1 writes column b, which this node lacks: kept, held, buffered.
        tx.send(writing_column_b(1)).expect("send");
        let a = done.blocking_recv().expect("reported");
        assert!(a.held.iter().any(|(o, r)| *o == origin && r.covers(1, 1)));
        let buffered = a.buffered.expect("the buffer changed");
        assert!(buffered.covers(&origin, 1, 1));
        assert_eq!(metrics.schema.buffered_units.get(), 1);
        assert_eq!(metrics.loops.apply.failures.load(Ordering::Relaxed), 0);

        // Version 2, on a known column, is applied meanwhile.
        tx.send(job("t", 2)).expect("send");
        let a = done.blocking_recv().expect("reported");
        assert!(a.held.iter().any(|(o, r)| *o == origin && r.covers(1, 2)));
        assert!(a.buffered.is_none(), "the buffer did not change");

        // A catch-up unit of peer 3's feed: its own change names table u (kept), origin
        // 4's names only known columns (applied at once); the cursor moves past it.
        let peer = [3u8; 16];
        let first = |j: ApplyJob| match j.work {
            Work::Unit(u) => u.changes[0].clone(),
            Work::Chunk(_) | Work::SeedPart(_) => unreachable!("job() builds units"),
        };
        let mut change = first(job("u", 1));
        change.site_id = peer.to_vec();
        let mut other = first(job("t", 7));
        other.site_id = vec![4; 16];
        other.db_version = 2;
        let catch_up = ApplyJob {
            from: "127.0.0.1:9".parse().expect("addr"),
            peer_site: peer,
            work: Work::Chunk(Chunk {
                unit_from: 0,
                unit_to: 5,
                from: 0,
                to: 5,
                changes: vec![change, other],
                held: Some(vec![
                    OriginRanges {
                        site: peer,
                        ranges: vec![(1, 1)],
                    },
                    OriginRanges {
                        site: [4; 16],
                        ranges: vec![(1, 7)],
                    },
                ]),
                schema: None,
            }),
        };
        tx.send(catch_up).expect("send");
        let a = done.blocking_recv().expect("reported");
        assert_eq!(a.cursors, vec![(peer, 5)]);
        assert!(a.held.iter().any(|(o, r)| *o == peer && r.covers(1, 1)));
        let buffered = a.buffered.expect("changed");
        assert!(buffered.contains(&peer, 1) && !buffered.contains(&[4; 16], 7));
        let n: i64 = setup
            .query_row("SELECT count(*) FROM t WHERE id = 7", [], |r| r.get(0))
            .expect("t");
        assert_eq!(
            n, 1,
            "the other origin's change of the catch-up is applied at once"
        );
        assert_eq!(metrics.schema.buffered_units.get(), 2);
        let (_, summary) = metrics.schema.snapshot();
        assert_eq!(summary.missing, vec!["column t.b", "table u"]);

        // The schema catches up: both are applied, whole, and the buffer empties.
        setup
            .execute_batch(&format!("BEGIN IMMEDIATE; {ADD_B_AND_U} COMMIT;"))
            .expect("migrate");
        let a = loop {
            let a = done.blocking_recv().expect("reported");
            if a.buffered.as_ref().is_some_and(|b| b.is_empty()) {
                break a;
            }
        };
        assert!(a.held.iter().any(|(o, _)| *o == origin));
        let b: String = setup
            .query_row("SELECT hex(b) FROM t WHERE id = 1", [], |r| r.get(0))
            .expect("the buffered column change was applied");
        assert_eq!(b, "FF00FE");
        let n: i64 = setup
            .query_row("SELECT count(*) FROM u", [], |r| r.get(0))
            .expect("u");
        assert_eq!(n, 1);
        assert!(buffer::is_empty(&setup).expect("empty"));
        assert_eq!(metrics.schema.buffered_units.get(), 0);
        assert_eq!(metrics.schema.unbuffered_total.get(), 2);
        assert_eq!(metrics.loops.apply.failures.load(Ordering::Relaxed), 0);
        stop.store(true, Ordering::SeqCst);
        drop(tx);
        let _ = thread.join();
    }

    /// A buffered unit the node now refuses (an app trigger) does not take the units
    /// drained after it down with it.
    #[test]
    fn a_refused_buffered_unit_does_not_block_the_next_one() {
        let Some(ApplyFixture {
            _dir,
            setup,
            tx,
            mut done,
            metrics: _,
            stop,
            thread,
        }) = ApplyFixture::start()
        else {
            eprintln!("libpatina.so not built (cargo build -p patina): skipped");
            return;
        };
        // Entry 1: origin 2 writes column b, which this node lacks: buffered.
        tx.send(writing_column_b(1)).expect("send");
        let a = done.blocking_recv().expect("reported");
        assert!(a.buffered.is_some(), "entry 1 buffered");
        // Entry 2: origin 5 writes table u, which this node lacks: buffered.
        let mut new_table = job("u", 1);
        new_table.peer_site = [5; 16];
        if let Work::Unit(u) = &mut new_table.work {
            let u = Arc::make_mut(u);
            u.origin = [5; 16];
            u.changes[0].site_id = vec![5; 16];
        }
        tx.send(new_table).expect("send");
        let a = done.blocking_recv().expect("reported");
        assert!(a.buffered.is_some(), "entry 2 buffered");

        // The schema catches up, but the app refuses any row with b set (entry 1 will fail).
        setup
            .execute_batch(&format!(
                "BEGIN IMMEDIATE; {ADD_B_AND_U}
                 CREATE TRIGGER no_b BEFORE INSERT ON t WHEN NEW.b IS NOT NULL
                 BEGIN SELECT RAISE(ABORT, 'app refuses b'); END;
                 COMMIT;"
            ))
            .expect("migrate");
        // Entry 2 is sound and must be applied by a drain.
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut n: i64 = 0;
        while Instant::now() < deadline {
            while done.try_recv().is_ok() {}
            n = setup
                .query_row("SELECT count(*) FROM u", [], |r| r.get(0))
                .expect("u");
            if n == 1 {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        stop.store(true, Ordering::SeqCst);
        drop(tx);
        let _ = thread.join();
        assert_eq!(
            n, 1,
            "the unit for table u was never applied: entry 1's refused changes rode along with it"
        );
    }
}
