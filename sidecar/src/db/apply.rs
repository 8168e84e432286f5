//! The apply thread: the one writer of remote changes.
//!
//! It takes [`ApplyJob`]s from a bounded channel (when it is full the network side stops
//! reading: backpressure, never a drop), and applies them in batches, one transaction per
//! batch, each job's changes in one `patina_batch` statement (`db::packed`), which the
//! extension applies grouped by row. Each job's changes and its cursor update are one
//! savepoint: a job that fails (a malformed change) is rolled back whole and logged,
//! never half-applied, and its cursor does not move, so anti-entropy fetches it again
//! later.
//!
//! A job that fails because it names a table or column this node does not have yet (a
//! rolling schema change) is not refused: it is rolled back and stored whole in the
//! schema buffer (`db::buffer`) in the same savepoint, which also records it as received
//! (held versions, cursor). After every schema change (and every 30 s while anything is
//! buffered) the thread applies each buffered unit the schema now allows, whole, in one
//! transaction. The rule and why it is safe: `sync::schema`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use rusqlite::{Connection, TransactionBehavior};
use tokio::sync::mpsc;

use super::bookkeeping;
use super::buffer::{self, BufferError};
use super::buffering::{buffer_job, drain_buffer, SchemaState};
use super::inbox::{self, InboxError, InboxLimits};
use super::packed::Packed;
use crate::node::Metrics;
use crate::sync::seed::SeedOutcome;
use crate::sync::{
    describe_missing, held_after_unit, validate_chunk, validate_unit, Applied, ApplyJob, Change,
    Chunk, OriginRanges, RangeError, SiteId, Work,
};

/// Most jobs in one transaction.
const MAX_BATCH_JOBS: usize = 256;
/// Most changes in one transaction (a larger single unit is still applied whole).
pub(super) const MAX_BATCH_CHANGES: usize = 50_000;

#[derive(Debug, thiserror::Error)]
pub(super) enum JobError {
    #[error("{0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("{0}")]
    Inbox(#[from] InboxError),
    /// The chunk breaks the range rule (`sync::validate_chunk`); checked again here so
    /// nothing reaches the inbox or the cursor without it.
    #[error("{0}")]
    Range(#[from] RangeError),
    #[error("{0}")]
    Buffer(#[from] BufferError),
}

/// Starts the apply thread on `conn` (its own connection, extension loaded).
pub fn spawn(
    mut conn: Connection,
    local: SiteId,
    rx: Receiver<ApplyJob>,
    done: mpsc::UnboundedSender<Applied>,
    metrics: Arc<Metrics>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("patina-apply".into())
        .spawn(move || {
            // Swept at start too: units left incomplete before a restart age out.
            let mut last_expire: Option<Instant> = None;
            let mut schema = SchemaState::default();
            // Units buffered before a restart are tried at once: the schema files were
            // applied at start and may have caught up.
            schema.due = true;
            while !stop.load(Ordering::Relaxed) {
                if !matches!(last_expire, Some(t) if t.elapsed() < EXPIRE_EVERY) {
                    expire_inbox(&conn);
                    last_expire = Some(Instant::now());
                }
                schema.tick(&conn, &metrics);
                if schema.due {
                    if let Some(a) = drain_buffer(&mut conn, &local, &mut schema, &metrics) {
                        let _ = done.send(a);
                    }
                }
                let first = match rx.recv_timeout(Duration::from_millis(100)) {
                    Ok(j) => j,
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => break,
                };
                let mut batch = vec![first];
                let mut changes = job_changes(&batch[0]);
                while batch.len() < MAX_BATCH_JOBS && changes < MAX_BATCH_CHANGES {
                    match rx.try_recv() {
                        Ok(j) => {
                            changes += job_changes(&j);
                            batch.push(j);
                        }
                        Err(_) => break,
                    }
                }
                metrics.apply_queue_depth.set(rx.len() as i64);
                // Snapshot parts are written down, not merged (`seed_part`); the machine
                // holds every other job back while a snapshot is on its way.
                let (parts, batch): (Vec<_>, Vec<_>) = batch
                    .into_iter()
                    .partition(|j| matches!(j.work, Work::SeedPart(_)));
                for job in &parts {
                    if let Some(a) = seed_part(&mut conn, &local, job, &metrics) {
                        let _ = done.send(a);
                    }
                }
                if batch.is_empty() {
                    continue;
                }
                let started = Instant::now();
                let mut backoff = Duration::from_millis(50);
                // A failed transaction (busy past the timeout, disk full) is retried with
                // the same jobs: they were accepted, so they are not dropped.
                let applied = loop {
                    match apply_batch(&mut conn, &local, &batch, &metrics, &mut schema) {
                        Ok((a, refused)) => {
                            if refused == 0 {
                                metrics.loops.apply.succeeded();
                            }
                            break a;
                        }
                        Err(e) => {
                            metrics
                                .loops
                                .apply
                                .failed(format!("cannot commit a batch of remote changes: {e}"));
                            tracing::error!(
                                jobs = batch.len(),
                                "cannot commit a batch of remote changes, retrying: {e}"
                            );
                            if stop.load(Ordering::Relaxed) {
                                return;
                            }
                            std::thread::sleep(backoff);
                            backoff = (backoff * 2).min(Duration::from_secs(5));
                        }
                    }
                };
                tracing::trace!(
                    jobs = batch.len(),
                    changes,
                    us = started.elapsed().as_micros() as u64,
                    "apply: batch committed"
                );
                metrics.observe_apply_batch(started.elapsed());
                let _ = done.send(applied);
            }
        })
}

fn job_changes(j: &ApplyJob) -> usize {
    match &j.work {
        Work::Unit(u) => u.changes.len(),
        Work::Chunk(c) => c.changes.len(),
        Work::SeedPart(_) => 0,
    }
}

/// Where the joiner writes the snapshot it receives (`db::seed::incoming_file`).
fn seed_file(conn: &Connection) -> Option<std::path::PathBuf> {
    conn.path()
        .filter(|p| !p.is_empty())
        .map(|p| super::seed::incoming_file(std::path::Path::new(p)))
}

/// Writes a snapshot part down; the last one installs the snapshot (`db::seed`). Returns
/// what the machine must learn when the attempt ended (installed or not).
fn seed_part(
    conn: &mut Connection,
    local: &SiteId,
    job: &ApplyJob,
    metrics: &Metrics,
) -> Option<Applied> {
    let Work::SeedPart(part) = &job.work else {
        return None;
    };
    let failed = |why: String| {
        Some(Applied {
            seed: Some(SeedOutcome::Failed(why)),
            ..Applied::default()
        })
    };
    let Some(path) = seed_file(conn) else {
        return failed("the database has no file to put a snapshot beside".into());
    };
    let written = super::seed::write_part(&path, part);
    if let Err(e) = written {
        let _ = std::fs::remove_file(&path);
        return failed(format!("cannot write {}: {e}", path.display()));
    }
    if !part.is_last() {
        return None;
    }
    let started = Instant::now();
    let installed = super::seed::install(conn, &path, &job.peer_site, local);
    let _ = std::fs::remove_file(&path);
    let installed = match installed {
        Ok(i) => i,
        Err(e) => return failed(e.to_string()),
    };
    let read = bookkeeping::load_held(conn).and_then(|h| {
        let collected = super::retention::load_collected(conn)?;
        Ok((h, collected, super::retention::cl_floor(conn)?))
    });
    let (held, collected, cl_floor) = match read {
        Ok(r) => r,
        Err(e) => return failed(format!("installed, but cannot read what is held: {e}")),
    };
    tracing::info!(
        peer = %job.from,
        versions = installed.versions,
        bytes = part.total,
        ms = started.elapsed().as_millis() as u64,
        "seeded from a snapshot of peer {}: {} versions, {} bytes",
        job.from,
        installed.versions,
        part.total
    );
    metrics.changes_applied.inc_by(installed.versions);
    Some(Applied {
        cursors: vec![(job.peer_site, installed.cursor)],
        held: held
            .iter()
            .filter(|(o, _)| *o != local)
            .map(|(o, r)| (*o, r.clone()))
            .collect(),
        seed: Some(SeedOutcome::Installed {
            versions: installed.versions,
            collected,
            cl_floor,
            bindings: installed.bindings,
        }),
        ..Applied::default()
    })
}

/// What one job did, inside the batch.
#[derive(Default)]
pub(super) struct JobOutcome {
    pub(super) merged: u64,
    /// The stored cursor, for a catch-up unit that completed.
    pub(super) cursor: Option<i64>,
    /// Origins whose held versions this job may have changed.
    pub(super) touched: Vec<SiteId>,
}

/// Applies a batch in one transaction; returns what the sync machine must learn (the
/// cursors moved, what is now held of every origin touched, the unit ranges released) and
/// how many jobs were refused (rolled back whole, counted as apply failures).
fn apply_batch(
    conn: &mut Connection,
    local: &SiteId,
    batch: &[ApplyJob],
    metrics: &Metrics,
    schema: &mut SchemaState,
) -> Result<(Applied, usize), JobError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    // Inside the write transaction: the schema cannot change until it ends.
    if schema.cache.refresh(&tx)? {
        metrics.schema.publish(
            Some(schema.cache.fingerprint()),
            schema.summary.clone(),
            unix_now(),
        );
        schema.due |= schema.summary.units > 0;
        schema.mark_seen_dirty();
    }
    let mut out = Applied::default();
    let mut touched: Vec<SiteId> = Vec::new();
    let mut applied_changes = 0u64;
    let mut refused = 0usize;
    let mut buffered = 0u64;
    for job in batch {
        if let Work::Unit(u) = &job.work {
            out.released.insert(u.origin, u.from + 1, u.to);
            if let Some(f) = u.schema {
                schema.saw(u.origin, f);
            }
        }
        if let Work::Chunk(Chunk {
            schema: Some(f), ..
        }) = &job.work
        {
            // A chunk carries its sender's fingerprint.
            schema.saw(job.peer_site, *f);
        }
        tx.execute_batch("SAVEPOINT patina_job")?;
        let e = match apply_job(&tx, local, job) {
            Ok(o) => {
                tx.execute_batch("RELEASE patina_job")?;
                applied_changes += o.merged;
                if let Some(cursor) = o.cursor {
                    out.cursors.push((job.peer_site, cursor));
                }
                touched.extend(o.touched);
                continue;
            }
            Err(e) => e,
        };
        tx.execute_batch("ROLLBACK TO patina_job")?;
        // A unit naming a table or column this node lacks yet is kept, not refused.
        let kept = buffer_job(&tx, local, job, schema.cache.schema(), unix_now());
        let e = match kept {
            Ok(Some(b)) => {
                tx.execute_batch("RELEASE patina_job")?;
                buffered += 1;
                if let Some(cursor) = b.outcome.cursor {
                    out.cursors.push((job.peer_site, cursor));
                }
                touched.extend(b.outcome.touched);
                schema.log_buffered(
                    &describe(&job.work),
                    &job.from,
                    &describe_missing(&b.missing),
                );
                continue;
            }
            Ok(None) => e.to_string(),
            Err(b) => format!("{e} (and it could not be buffered: {b})"),
        };
        tx.execute_batch("ROLLBACK TO patina_job; RELEASE patina_job")?;
        metrics.frames_rejected.inc();
        refused += 1;
        let msg = format!(
            "refusing {} from peer {} (site id {}): {e}; nothing of it was applied",
            describe(&job.work),
            job.from,
            hex::encode(job.peer_site),
        );
        tracing::error!(peer = %job.from, "{msg}");
        metrics.loops.apply.failed(msg);
    }
    touched.sort_unstable();
    touched.dedup();
    for origin in touched.into_iter().filter(|o| o != local) {
        out.held
            .push((origin, super::bookkeeping::held_of(&tx, &origin)?));
    }
    let summary = if buffered > 0 {
        out.buffered = Some(buffer::held(&tx)?);
        Some(buffer::summarize(&buffer::entries(&tx)?))
    } else {
        None
    };
    tx.commit()?;
    if let Some(s) = summary {
        metrics.schema.buffered_total.inc_by(buffered);
        metrics.schema.publish(None, s.clone(), unix_now());
        schema.summary = s;
    }
    // Origin commit (its wall clock, carried in the unit) to committed here.
    let now_ms = crate::db::tail::unix_ms();
    for job in batch {
        if let Work::Unit(u) = &job.work {
            if u.committed_ms > 0 {
                let ms = now_ms as f64 - u.committed_ms as f64;
                metrics.observe_commit_to_applied(ms / 1000.0);
            }
        }
    }
    schema.publish_elsewhere(metrics);
    metrics.units_received.inc_by(batch.len() as u64);
    metrics.changes_applied.inc_by(applied_changes);
    Ok((out, refused))
}

fn describe(w: &Work) -> String {
    match w {
        Work::Unit(u) => format!(
            "changes of unit ({}, {}] of origin {}",
            u.from,
            u.to,
            hex::encode(u.origin)
        ),
        Work::Chunk(c) => format!(
            "changes ({}, {}] of unit ({}, {}]",
            c.from, c.to, c.unit_from, c.unit_to
        ),
        Work::SeedPart(p) => format!("snapshot part at {} of {} bytes", p.offset, p.total),
    }
}

/// One job: merge a whole unit (buffering a partial catch-up unit), record what is now
/// held, move the cursor.
fn apply_job(conn: &Connection, local: &SiteId, job: &ApplyJob) -> Result<JobOutcome, JobError> {
    let mut packed = Packed::default();
    let mut out = JobOutcome::default();
    let c = match &job.work {
        Work::Unit(u) => {
            validate_unit(u)?;
            for change in &u.changes {
                packed.push(change);
            }
            out.merged += packed.len() as u64;
            packed.merge(conn)?;
            bookkeeping::record_held(conn, &held_after_unit(u, local))?;
            out.touched.push(u.origin);
            return Ok(out);
        }
        Work::Chunk(c) => c,
        Work::SeedPart(_) => return Ok(out), // handled before the batch (`seed_part`)
    };
    validate_chunk(c)?;
    let cursor = bookkeeping::cursor(conn, &job.peer_site)?;
    if c.unit_to <= cursor {
        // Already covered: everything up to the cursor is applied.
        out.cursor = Some(cursor);
        return Ok(out);
    }
    let held: Option<Vec<OriginRanges>> = if c.is_whole_unit() {
        for change in &c.changes {
            packed.push(change);
            out.merged += 1;
            note_origin(&mut out.touched, change);
        }
        c.held.clone()
    } else {
        if !inbox::put(conn, &job.peer_site, c, unix_now(), &InboxLimits::default())? {
            return Ok(out);
        }
        let mut first_held = None;
        let mut merged = 0u64;
        let mut touched = Vec::new();
        inbox::drain::<JobError>(conn, &job.peer_site, c.unit_from, c.unit_to, |ch| {
            for change in &ch.changes {
                packed.push(change);
                merged += 1;
                note_origin(&mut touched, change);
            }
            if ch.from == ch.unit_from {
                first_held = ch.held;
            }
            Ok(())
        })?;
        out.merged += merged;
        out.touched.extend(touched);
        first_held
    };
    // Merged now, grouped by row, inside this job's savepoint, so a refusal fails this
    // job alone.
    packed.merge(conn)?;
    if let Some(list) = &held {
        out.touched.extend(list.iter().map(|o| o.site));
    }
    let cursor = bookkeeping::mark_applied(
        conn,
        &job.peer_site,
        local,
        c.unit_from,
        c.unit_to,
        held.as_deref(),
    )?;
    out.cursor = Some(cursor);
    Ok(out)
}

pub(super) fn note_origin(touched: &mut Vec<SiteId>, c: &Change) {
    if let Ok(s) = SiteId::try_from(c.site_id.as_slice()) {
        if touched.last() != Some(&s) {
            touched.push(s);
        }
    }
}

/// Seconds since the Unix epoch (0 if the clock is before it): inbox ages.
pub(super) fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// How often the apply thread drops expired incomplete units (`db::inbox`).
const EXPIRE_EVERY: Duration = Duration::from_secs(60);

/// Drops incomplete units past their age; a failure is logged and retried next sweep.
fn expire_inbox(conn: &Connection) {
    match inbox::expire(conn, unix_now(), InboxLimits::default().max_age) {
        Ok(0) => {}
        Ok(n) => tracing::warn!(
            "sync inbox: dropped {n} chunks of units left incomplete for over {:?} \
             (anti-entropy fetches them again if they are still needed)",
            InboxLimits::default().max_age
        ),
        Err(e) => tracing::warn!("sync inbox: cannot drop expired units: {e}"),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::Synchronous;
    use crate::sync::OriginUnit;

    /// A real apply thread on a fresh database with one replicated table
    /// `t(id INTEGER PRIMARY KEY, a TEXT)`; `None` when libpatina.so is not built.
    pub(crate) struct ApplyFixture {
        pub _dir: tempfile::TempDir,
        /// A connection of the test's own to the same file.
        pub setup: Connection,
        pub tx: crossbeam_channel::Sender<ApplyJob>,
        pub done: tokio::sync::mpsc::UnboundedReceiver<Applied>,
        pub metrics: Arc<Metrics>,
        pub stop: Arc<AtomicBool>,
        pub thread: std::thread::JoinHandle<()>,
    }

    impl ApplyFixture {
        pub(crate) fn start() -> Option<ApplyFixture> {
            let ext = crate::db::extension_path(None).ok()?;
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("t.db");
            let setup = crate::db::open(&path, &ext, Synchronous::Normal).expect("open");
            setup
                .execute_batch(
                    "CREATE TABLE t (id INTEGER PRIMARY KEY NOT NULL, a TEXT);
                     SELECT crsql_as_crr('t');",
                )
                .expect("schema");
            bookkeeping::ensure(&setup).expect("bookkeeping");
            let conn = crate::db::open(&path, &ext, Synchronous::Normal).expect("open");
            let (tx, rx) = crossbeam_channel::bounded(4);
            let (done_tx, done) = tokio::sync::mpsc::unbounded_channel();
            let metrics = Arc::new(Metrics::default());
            let stop = Arc::new(AtomicBool::new(false));
            let thread =
                spawn(conn, [1; 16], rx, done_tx, metrics.clone(), stop.clone()).expect("spawn");
            Some(ApplyFixture {
                _dir: dir,
                setup,
                tx,
                done,
                metrics,
                stop,
                thread,
            })
        }
    }

    pub(crate) fn job(table: &str, v: i64) -> ApplyJob {
        ApplyJob {
            from: "127.0.0.1:9".parse().expect("addr"),
            peer_site: [2; 16],
            work: Work::Unit(Arc::new(OriginUnit {
                origin: [2; 16],
                from: v - 1,
                to: v,
                committed_ms: 0,
                changes: vec![Change {
                    table: table.into(),
                    pk: vec![1, 0x09, v as u8],
                    cid: "a".into(),
                    val: crate::sync::Value::Text(vec![0xff, 0x00, 0xfe]),
                    col_version: 1,
                    db_version: v,
                    site_id: vec![2; 16],
                    cl: 1,
                    seq: 0,
                    origin_version: Some(v),
                }],
                schema: None,
            })),
        }
    }

    /// Item 2 helpers: a refused unit counts as an apply failure and keeps the apply loop failing;
    /// the next batch applied whole clears it. Item 1: TEXT that is not UTF-8 is stored
    /// byte-exact, as TEXT.
    #[test]
    fn failures_are_recorded_and_cleared_and_bad_utf8_is_stored_byte_exact() {
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
        // A clock outside 1..=2^62 is malformed: refused (a missing table is buffered
        // instead, `db::buffering`).
        let mut bad = job("t", 1);
        if let Work::Unit(u) = &mut bad.work {
            Arc::make_mut(u).changes[0].col_version = 0;
        }
        tx.send(bad).expect("send");
        let deadline = Instant::now() + Duration::from_secs(20);
        while metrics.loops.apply.failures.load(Ordering::Relaxed) == 0 {
            assert!(Instant::now() < deadline, "the refusal was not recorded");
            std::thread::sleep(Duration::from_millis(10));
        }
        let err = metrics.loops.apply.stuck(Instant::now(), Duration::ZERO);
        assert!(err.is_some_and(|e| e.last_error.contains("refusing changes")));
        tx.send(job("t", 1)).expect("send");
        // The refused batch reported its unit released; the next one applied it.
        let refused = done.blocking_recv().expect("reported");
        assert!(refused.released.covers(&[2; 16], 1, 1) && refused.held.is_empty());
        let applied = done.blocking_recv().expect("applied");
        assert!(applied.released.covers(&[2; 16], 1, 1));
        assert_eq!(
            applied.held,
            vec![([2; 16], crate::sync::RangeSet::from_ranges([(1, 1)]))]
        );
        assert!(metrics
            .loops
            .apply
            .stuck(Instant::now(), Duration::ZERO)
            .is_none());
        assert_eq!(metrics.loops.apply.failures.load(Ordering::Relaxed), 1);
        let (ty, hex): (String, String) = setup
            .query_row("SELECT typeof(a), hex(a) FROM t", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .expect("row");
        assert_eq!((ty.as_str(), hex.as_str()), ("text", "FF00FE"));
        stop.store(true, Ordering::SeqCst);
        drop(tx);
        let _ = thread.join();
    }
}
