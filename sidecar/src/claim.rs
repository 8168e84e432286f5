//! A process's exclusive claim on a database: `flock(LOCK_EX)` on `<db>.lock`, holding the
//! holder's pid and role.
//!
//! SQLite's own locks only exist while a transaction is open, so an idle node holds
//! nothing a second process could see: a second `patina agent` on the same file would
//! start and serve it under the same site id, and `patina restore` would delete a live
//! node's `-wal`/`-shm` files. The claim is held for the node's whole life (and for the
//! whole of a restore); the kernel drops it when the process dies, even by `kill -9`, so
//! a stale lock file never blocks anyone. The file is left in place on release: deleting
//! it would let two processes hold locks on two different inodes of one name.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// Why a claim was not taken. Nothing was changed by either.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    /// Another process holds the database; the message names it.
    #[error(
        "database {db} is in use by {holder} (lock file {lock}); stop that process first, \
         or point db.path elsewhere"
    )]
    Held {
        db: PathBuf,
        lock: PathBuf,
        holder: String,
    },
    /// The lock file could not be opened or locked.
    #[error("cannot lock {lock} for database {db}: {source}")]
    Io {
        db: PathBuf,
        lock: PathBuf,
        source: std::io::Error,
    },
}

/// A held claim; dropping it (or the process ending) releases it.
#[derive(Debug)]
pub struct Claim {
    _file: File,
    lock: PathBuf,
}

/// `<db>.lock`.
pub fn lock_path(db: &Path) -> PathBuf {
    let mut s = db.as_os_str().to_owned();
    s.push(".lock");
    PathBuf::from(s)
}

impl Claim {
    /// Takes the claim on `db` for this process, recording `role` (e.g. `patina agent`)
    /// beside the pid, or names the process holding it.
    pub fn acquire(db: &Path, role: &str) -> Result<Claim, ClaimError> {
        let lock = lock_path(db);
        let io = |source| ClaimError::Io {
            db: db.to_path_buf(),
            lock: lock.clone(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock)
            .map_err(io)?;
        // SAFETY: flock(2) on a descriptor this function owns for the call's duration.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(io(err));
            }
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            let holder = describe(&text);
            return Err(ClaimError::Held {
                db: db.to_path_buf(),
                lock,
                holder,
            });
        }
        let record = format!("{}\n{role}\n", std::process::id());
        file.set_len(0).map_err(io)?;
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        file.write_all(record.as_bytes()).map_err(io)?;
        let _ = file.sync_data();
        Ok(Claim { _file: file, lock })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.lock
    }
}

/// "pid 1234 (patina agent)" from the lock file's text, or a fallback when it is empty
/// (the holder has locked but not yet written).
fn describe(text: &str) -> String {
    let mut lines = text.lines();
    match (lines.next().map(str::trim), lines.next().map(str::trim)) {
        (Some(pid), Some(role)) if !pid.is_empty() => format!("pid {pid} ({role})"),
        (Some(pid), None) if !pid.is_empty() => format!("pid {pid}"),
        _ => "another process".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_claim_names_the_first_and_release_frees_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("n.db");
        let first = Claim::acquire(&db, "patina agent").expect("first claim");
        // flock locks belong to the open file description: a second open in this same
        // process conflicts exactly as another process would.
        let err = Claim::acquire(&db, "patina restore").expect_err("held");
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("pid {} (patina agent)", std::process::id())),
            "{msg}"
        );
        assert!(!db.exists(), "claiming creates only the lock file");
        drop(first);
        Claim::acquire(&db, "patina restore").expect("free after release");
    }
}
