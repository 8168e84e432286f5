//! `patina restore PATH`: replaces a STOPPED node's database with a backup, offline.
//!
//! Refuses while any process holds the database's claim (`<db>.lock`, which a node holds
//! for its whole life; see `claim`), while a node answers on `--api`, or while any process
//! holds a write lock on the database; the restore holds the claim itself throughout, so
//! no node can start on the file half-way. The backup is copied beside the database, given
//! a fresh site id there (unless `--keep-site-id`: only for bringing back the very node a
//! `patina backup --keep-site-id` came from), and then renamed over the database, so a
//! failure leaves the old file untouched. Stale `-wal` and `-shm` files of the old database
//! are removed: they belong to the file being replaced.

use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};

use super::RestoreArgs;
use crate::config::Synchronous;

/// Runs `patina restore`.
pub fn run(args: RestoreArgs) -> anyhow::Result<()> {
    let _claim = crate::claim::Claim::acquire(&args.db_path, "patina restore")?;
    refuse_if_node_answers(&args.client.api)?;
    refuse_if_locked(&args.db_path)?;
    check_backup(&args.path)?;
    let tmp = PathBuf::from(format!("{}.restore-tmp", args.db_path.display()));
    std::fs::copy(&args.path, &tmp)
        .with_context(|| format!("cannot copy {} to {}", args.path.display(), tmp.display()))?;
    let result = (|| -> anyhow::Result<String> {
        let ext = crate::db::extension_path(args.db_extension_path.as_deref())?;
        let conn = crate::db::open(&tmp, &ext, Synchronous::Normal)?;
        let sql = if args.keep_site_id {
            "SELECT crsql_site_id()"
        } else {
            "SELECT patina_new_site_id()"
        };
        let site: Vec<u8> = conn
            .query_row(sql, [], |r| r.get(0))
            .with_context(|| format!("cannot read or renew the site id of {}", tmp.display()))?;
        conn.pragma_update(None, "journal_mode", "DELETE")
            .with_context(|| format!("cannot checkpoint {}", tmp.display()))?;
        drop(conn);
        let site = hex::encode(site);
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("cannot sync {}", tmp.display()))?;
        for suffix in ["-wal", "-shm"] {
            let stale = format!("{}{suffix}", args.db_path.display());
            match std::fs::remove_file(&stale) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(anyhow!("cannot remove stale {stale}: {e}")),
            }
        }
        std::fs::rename(&tmp, &args.db_path).with_context(|| {
            format!(
                "cannot move the restored copy over {}",
                args.db_path.display()
            )
        })?;
        Ok(site)
    })();
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", tmp.display()));
    }
    let site = result?;
    let how = if args.keep_site_id {
        "keeping the backup's site id"
    } else {
        "with fresh site id"
    };
    println!(
        "restored {} into {} {how} {site}",
        args.path.display(),
        args.db_path.display()
    );
    Ok(())
}

/// A node answering on `--api` is running: its database must not be replaced under it.
pub(super) fn refuse_if_node_answers(api: &str) -> anyhow::Result<()> {
    let hostport = api
        .trim_start_matches("http://")
        .trim_start_matches("https://")
        .trim_end_matches('/');
    let Ok(addrs) = hostport.to_socket_addrs() else {
        return Ok(());
    };
    for addr in addrs {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok() {
            bail!(
                "a node answers on {api}: stop it before restoring its database (restore works \
                 on a stopped node's file)"
            );
        }
    }
    Ok(())
}

/// Any process holding the database's write lock (a running node, an app) is a refusal.
pub(super) fn refuse_if_locked(db: &Path) -> anyhow::Result<()> {
    if !db.exists() {
        return Ok(());
    }
    let conn = rusqlite::Connection::open(db)
        .with_context(|| format!("cannot open {} to check it is not in use", db.display()))?;
    match conn.execute_batch("BEGIN IMMEDIATE; ROLLBACK;") {
        Ok(()) => Ok(()),
        Err(e) => bail!(
            "{} is locked by another process ({e}); stop the node (and any app writing it) first",
            db.display()
        ),
    }
}

/// The backup must be an SQLite database that passes a quick check.
fn check_backup(path: &Path) -> anyhow::Result<()> {
    let conn =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .with_context(|| format!("cannot open backup {}", path.display()))?;
    let check: String = conn
        .query_row("PRAGMA quick_check", [], |r| r.get(0))
        .with_context(|| format!("{} is not a usable SQLite database", path.display()))?;
    if check != "ok" {
        bail!(
            "backup {} fails its integrity check: {check}",
            path.display()
        );
    }
    Ok(())
}
