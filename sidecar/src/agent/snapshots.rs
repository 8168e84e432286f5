//! The snapshots this node made for joiners (`db::seed`, `sync::seed`), served part by
//! part and deleted once the last part went out, or when no one asked for them lately.
//!
//! Making one copies the replicated tables, which takes a while on a large database: it
//! runs without holding the store, so parts of other snapshots keep flowing meanwhile.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::db::seed::{export, outgoing_file, SeedError};
use crate::sync::SeedAsk;

/// A snapshot no part was asked of for this long is deleted.
const IDLE: Duration = Duration::from_secs(60);
/// Snapshots kept (or being made) at once, each a copy of the replicated tables on disk;
/// a joiner asking beyond it is served the feed instead.
const MAX_LIVE: usize = 2;
/// One peer gets at most one new snapshot this often: asking again and again cannot
/// make this node copy its tables again and again.
const PER_PEER_EVERY: Duration = Duration::from_secs(60);

struct Made {
    path: PathBuf,
    /// `None` while it is being made.
    total: Option<u64>,
    last_asked: Instant,
}

/// One part to send.
pub struct Part {
    pub id: u64,
    pub offset: u64,
    pub total: u64,
    pub bytes: Vec<u8>,
}

pub struct Snapshots {
    db: PathBuf,
    /// Bytes per part: the node's chunk size (a quarter of its frame limit, at most
    /// `sync::seed::PART_BYTES`).
    part_bytes: usize,
    made: HashMap<u64, Made>,
    last_made_for: HashMap<SocketAddr, Instant>,
}

impl Snapshots {
    pub fn new(db: PathBuf, part_bytes: usize) -> Snapshots {
        Snapshots {
            db,
            part_bytes: part_bytes.clamp(1, crate::sync::seed::PART_BYTES),
            made: HashMap::new(),
            last_made_for: HashMap::new(),
        }
    }

    /// Deletes snapshots no one asked a part of lately (called on a timer, and before
    /// each new one).
    pub fn expire(&mut self) {
        self.made.retain(|_, m| {
            // One being made is never idle: its maker removes it if it fails.
            let keep = m.total.is_none() || m.last_asked.elapsed() < IDLE;
            if !keep {
                let _ = std::fs::remove_file(&m.path);
            }
            keep
        });
        self.last_made_for
            .retain(|_, t| t.elapsed() < PER_PEER_EVERY);
    }

    /// Reserves a new snapshot for `to`: its id and file.
    fn reserve(&mut self, to: SocketAddr) -> Result<(u64, PathBuf), SeedError> {
        self.expire();
        if self.made.len() >= MAX_LIVE {
            return Err(SeedError::Refused(format!(
                "{MAX_LIVE} snapshots are being sent already"
            )));
        }
        if self.last_made_for.contains_key(&to) {
            return Err(SeedError::Refused(format!(
                "a snapshot was made for {to} less than {PER_PEER_EVERY:?} ago"
            )));
        }
        let id = loop {
            let id: u64 = rand::random();
            if id != 0 && !self.made.contains_key(&id) {
                break id;
            }
        };
        let path = outgoing_file(&self.db, id);
        self.made.insert(
            id,
            Made {
                path: path.clone(),
                total: None,
                last_asked: Instant::now(),
            },
        );
        self.last_made_for.insert(to, Instant::now());
        Ok((id, path))
    }

    /// Reads the part `ask` names of the finished snapshot `id`; the last part deletes it.
    fn read(&mut self, id: u64, offset: u64) -> Result<Part, SeedError> {
        let made = self
            .made
            .get_mut(&id)
            .ok_or_else(|| SeedError::Refused(format!("no snapshot {id:016x} (expired?)")))?;
        let total = made
            .total
            .ok_or_else(|| SeedError::Refused(format!("snapshot {id:016x} is not made yet")))?;
        made.last_asked = Instant::now();
        let io = |source| SeedError::Io {
            path: made.path.clone(),
            source,
        };
        if offset > total {
            return Err(SeedError::Refused(format!(
                "offset {offset} beyond the snapshot's {total} bytes"
            )));
        }
        let len = (total - offset).min(self.part_bytes as u64) as usize;
        let mut bytes = vec![0; len];
        let mut f = std::fs::File::open(&made.path).map_err(io)?;
        f.seek(SeekFrom::Start(offset)).map_err(io)?;
        f.read_exact(&mut bytes).map_err(io)?;
        if offset + len as u64 >= total {
            if let Some(m) = self.made.remove(&id) {
                let _ = std::fs::remove_file(m.path);
            }
        }
        Ok(Part {
            id,
            offset,
            total,
            bytes,
        })
    }
}

/// The part `ask` names, for peer `to`: of a new snapshot when `ask.id` is 0, made now
/// (without holding `store`).
pub fn part(store: &Mutex<Snapshots>, ask: SeedAsk, to: SocketAddr) -> Result<Part, SeedError> {
    let unusable = || SeedError::Refused("the snapshot store is unusable".into());
    let id = if ask.id == 0 {
        let (id, path, db) = {
            let mut s = store.lock().map_err(|_| unusable())?;
            let (id, path) = s.reserve(to)?;
            (id, path, s.db.clone())
        };
        let started = Instant::now();
        let made = export(&db, &path);
        let mut s = store.lock().map_err(|_| unusable())?;
        match made {
            Ok(total) => {
                tracing::info!(
                    peer = %to,
                    bytes = total,
                    ms = started.elapsed().as_millis() as u64,
                    "made a snapshot for joining peer {to}: {total} bytes"
                );
                if let Some(m) = s.made.get_mut(&id) {
                    m.total = Some(total);
                    m.last_asked = Instant::now();
                }
            }
            Err(e) => {
                s.made.remove(&id);
                let _ = std::fs::remove_file(&path);
                return Err(e);
            }
        }
        id
    } else {
        ask.id
    };
    store.lock().map_err(|_| unusable())?.read(id, ask.offset)
}

impl Drop for Snapshots {
    fn drop(&mut self) {
        for m in self.made.values() {
            let _ = std::fs::remove_file(&m.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_gets_one_new_snapshot_a_minute_and_at_most_two_are_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = Snapshots::new(dir.path().join("db"), 1024);
        let a: SocketAddr = "127.0.0.1:1".parse().expect("addr");
        let b: SocketAddr = "127.0.0.1:2".parse().expect("addr");
        let c: SocketAddr = "127.0.0.1:3".parse().expect("addr");
        assert!(s.reserve(a).is_ok());
        assert!(s.reserve(a).is_err(), "the same peer again");
        assert!(s.reserve(b).is_ok());
        assert!(s.reserve(c).is_err(), "a third at once");
        assert!(s.read(1, 0).is_err(), "an unknown id");
    }
}
