//! The snapshots this node made for joiners (`db::seed`, `sync::seed`), served part by
//! part and deleted once the last part went out, or when no one asked for them lately.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::db::seed::{export, SeedError};
use crate::sync::SeedAsk;

/// A snapshot no part was asked of for this long is deleted.
const IDLE: Duration = Duration::from_secs(60);
/// Snapshots kept at once (each is a copy of the replicated tables on disk); a joiner
/// asking beyond it is served the feed instead.
const MAX_LIVE: usize = 2;

struct Made {
    path: PathBuf,
    total: u64,
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
}

impl Snapshots {
    pub fn new(db: PathBuf, part_bytes: usize) -> Snapshots {
        Snapshots {
            db,
            part_bytes: part_bytes.clamp(1, crate::sync::seed::PART_BYTES),
            made: HashMap::new(),
        }
    }

    /// The part `ask` names: of a new snapshot when `ask.id` is 0, made now.
    pub fn part(&mut self, ask: SeedAsk, to: SocketAddr) -> Result<Part, SeedError> {
        self.expire();
        let id = if ask.id == 0 {
            if self.made.len() >= MAX_LIVE {
                return Err(SeedError::Refused(format!(
                    "{MAX_LIVE} snapshots are being sent already"
                )));
            }
            let id = loop {
                let id: u64 = rand::random();
                if id != 0 && !self.made.contains_key(&id) {
                    break id;
                }
            };
            let path = PathBuf::from(format!("{}.seed-out-{id:016x}", self.db.display()));
            let started = Instant::now();
            let total = export(&self.db, &path)?;
            tracing::info!(
                peer = %to,
                bytes = total,
                ms = started.elapsed().as_millis() as u64,
                "made a snapshot for joining peer {to}: {total} bytes"
            );
            self.made.insert(
                id,
                Made {
                    path,
                    total,
                    last_asked: Instant::now(),
                },
            );
            id
        } else {
            ask.id
        };
        let made = self
            .made
            .get_mut(&id)
            .ok_or_else(|| SeedError::Refused(format!("no snapshot {id:016x} (expired?)")))?;
        made.last_asked = Instant::now();
        let io = |source| SeedError::Io {
            path: made.path.clone(),
            source,
        };
        if ask.offset > made.total {
            return Err(SeedError::Refused(format!(
                "offset {} beyond the snapshot's {} bytes",
                ask.offset, made.total
            )));
        }
        let len = (made.total - ask.offset).min(self.part_bytes as u64) as usize;
        let mut bytes = vec![0; len];
        let mut f = std::fs::File::open(&made.path).map_err(io)?;
        f.seek(SeekFrom::Start(ask.offset)).map_err(io)?;
        f.read_exact(&mut bytes).map_err(io)?;
        let part = Part {
            id,
            offset: ask.offset,
            total: made.total,
            bytes,
        };
        if ask.offset + len as u64 >= made.total {
            if let Some(m) = self.made.remove(&id) {
                let _ = std::fs::remove_file(m.path);
            }
        }
        Ok(part)
    }

    fn expire(&mut self) {
        self.made.retain(|_, m| {
            let keep = m.last_asked.elapsed() < IDLE;
            if !keep {
                let _ = std::fs::remove_file(&m.path);
            }
            keep
        });
    }
}

impl Drop for Snapshots {
    fn drop(&mut self) {
        for m in self.made.values() {
            let _ = std::fs::remove_file(&m.path);
        }
    }
}
