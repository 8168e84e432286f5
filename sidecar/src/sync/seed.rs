//! Seeding a node that holds nothing from one peer's snapshot.
//!
//! A joiner would otherwise fetch a peer's whole feed and merge every change of it: the
//! merge decides, change by change, what each one does to a row that does not exist yet.
//! Instead, its first catch-up pull asks for a snapshot (`Pull::seed`): the peer copies
//! its replicated tables, their clocks and what it holds per origin into a file
//! (`db::seed::export`), and sends the file in parts (`Msg::Seed`); the joiner installs it
//! in one transaction (`db::seed::install`), rows and clocks copied as they are. The
//! joiner then holds exactly what the peer held, and goes on like any other node. It also
//! takes the peer's site bindings to certificates (`identity`): a joiner would otherwise
//! bind each site id to whoever presents it first, and a copy of some node's database
//! met before that node would be taken for it.
//!
//! A peer that cannot make a snapshot, or a release without snapshots (it skips the field),
//! answers the pull with the feed as usual; a snapshot that cannot be installed (the
//! joiner was written to meanwhile, the schemas differ) ends the attempt, and the next
//! offer starts a normal pull. Units broadcast to the joiner meanwhile are kept and
//! applied after the install (`Replicator` defers them): applying one first would make
//! the database non-empty and refuse the snapshot.
//!
//! Pure: the state the machine keeps and the rule for a part.

use std::net::SocketAddr;

use super::msg::SiteId;
use super::ranges::RangeError;
use super::stability::Prefixes;

/// Bytes per `Msg::Seed` part: a quarter of the default frame limit.
pub const PART_BYTES: usize = 4 << 20;

/// The largest snapshot a peer may announce (1 TiB).
pub const MAX_SEED_BYTES: u64 = 1 << 40;

/// Apply jobs kept while a snapshot is fetched and installed; beyond it, units are left
/// to anti-entropy.
pub const MAX_DEFERRED: usize = 100_000;

/// One part of a snapshot, for the apply side (which writes it to a file and installs
/// the snapshot after the last part).
#[derive(Clone, Debug, PartialEq)]
pub struct SeedPart {
    pub id: u64,
    pub offset: u64,
    pub total: u64,
    pub bytes: Vec<u8>,
}

impl SeedPart {
    /// Whether this part ends the file.
    pub fn is_last(&self) -> bool {
        self.offset + self.bytes.len() as u64 >= self.total
    }
}

/// Where a node stands with seeding.
#[derive(Clone, Debug, PartialEq)]
pub enum SeedState {
    /// Not asked for: this node holds something, snapshots are off, or one was tried.
    Off,
    /// This node holds nothing: its first catch-up pull asks for a snapshot.
    Possible,
    /// Receiving parts from `from`; `next` is the offset expected next (`id` 0 and
    /// `total` unknown until the first part names the snapshot and its size).
    Fetching {
        from: SocketAddr,
        id: u64,
        next: u64,
        total: Option<u64>,
    },
    /// Every part is with the apply side, which installs the snapshot.
    Installing { from: SocketAddr },
}

impl SeedState {
    /// Whether a snapshot is being fetched or installed (from any peer).
    pub fn in_progress(&self) -> bool {
        matches!(
            self,
            SeedState::Fetching { .. } | SeedState::Installing { .. }
        )
    }

    /// The peer a snapshot is being fetched or installed from.
    pub fn peer(&self) -> Option<SocketAddr> {
        match self {
            SeedState::Fetching { from, .. } | SeedState::Installing { from } => Some(*from),
            _ => None,
        }
    }
}

/// What the apply side did with a snapshot.
#[derive(Clone, Debug, PartialEq)]
pub enum SeedOutcome {
    /// Installed: this many versions (of every origin) are now held; what the sender had
    /// collected, and its `cl_floor`, are now this node's (advertised in its summaries);
    /// the sender's site bindings to certificates are now this node's too (stored
    /// already; `bindings` puts them in force).
    Installed {
        versions: u64,
        collected: Prefixes,
        cl_floor: i64,
        bindings: Vec<(SiteId, String)>,
    },
    /// Not installed (nothing of it was): why.
    Failed(String),
}

/// Checks a part: it lies inside its file, and the file is not absurdly large.
pub fn validate_part(offset: u64, len: usize, total: u64) -> Result<(), RangeError> {
    let end = offset.checked_add(len as u64);
    let ok = total <= MAX_SEED_BYTES
        && len <= 4 * PART_BYTES
        && matches!(end, Some(e) if e <= total)
        && (len > 0 || total == 0);
    if ok {
        Ok(())
    } else {
        Err(RangeError::BadSeedPart { offset, len, total })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_part_must_lie_inside_its_file() {
        assert!(validate_part(0, 10, 10).is_ok());
        assert!(validate_part(5, 5, 10).is_ok());
        assert!(validate_part(0, 0, 0).is_ok());
        assert!(validate_part(6, 5, 10).is_err(), "past the end");
        assert!(validate_part(u64::MAX, 2, 10).is_err(), "overflow");
        assert!(
            validate_part(0, 0, 10).is_err(),
            "empty part of a non-empty file"
        );
        assert!(
            validate_part(0, 1, MAX_SEED_BYTES + 1).is_err(),
            "absurd size"
        );
        assert!(validate_part(0, 4 * PART_BYTES + 1, u64::MAX / 2).is_err());
    }

    #[test]
    fn the_last_part_ends_the_file() {
        let p = |offset, n, total| SeedPart {
            id: 1,
            offset,
            total,
            bytes: vec![0; n],
        };
        assert!(p(0, 10, 10).is_last());
        assert!(!p(0, 9, 10).is_last());
        assert!(p(0, 0, 0).is_last());
    }
}
