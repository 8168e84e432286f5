//! `patina reseed`: re-seeds a STOPPED node by hand — what a node does by itself when it
//! learns it was away longer than `sync.tombstone_retention` (with `sync.auto_reseed`),
//! and what an operator runs on the side to discard after a partition that outlasted the
//! retention on both sides (`/v1/health` names the command).
//!
//! Same guards as `patina restore`: the database's claim, no node answering on `--api`,
//! no process holding a write lock. The database is first copied to
//! `<db>.before-reseed-<unix seconds>`, then its replicated tables and their clocks are
//! emptied (recording no change), what it knew of every origin and peer is dropped, and it
//! takes a fresh site id. Started again, the node joins as a new member and fills up
//! from its peers.

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;

use super::restore::{refuse_if_locked, refuse_if_node_answers};
use super::ReseedArgs;
use crate::config::Synchronous;

/// Runs `patina reseed`.
pub fn run(args: ReseedArgs) -> anyhow::Result<()> {
    let _claim = crate::claim::Claim::acquire(&args.db_path, "patina reseed")?;
    refuse_if_node_answers(&args.client.api)?;
    refuse_if_locked(&args.db_path)?;
    if !args.db_path.exists() {
        anyhow::bail!("{} does not exist", args.db_path.display());
    }
    let ext = crate::db::extension_path(args.db_extension_path.as_deref())?;
    let mut conn = crate::db::open(&args.db_path, &ext, Synchronous::Normal)?;
    crate::db::bookkeeping::ensure(&conn)
        .with_context(|| format!("cannot prepare {}", args.db_path.display()))?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let copy = crate::db::retention::reseed(&mut conn, &args.db_path, now)?;
    let site: Vec<u8> = conn
        .query_row("SELECT crsql_site_id()", [], |r| r.get(0))
        .context("cannot read the new site id")?;
    println!(
        "re-seeded {}: replicated tables emptied, fresh site id {}; start the node and it \
         fills up from its peers. The database as it was is in {}",
        args.db_path.display(),
        hex::encode(site),
        copy.display()
    );
    Ok(())
}
