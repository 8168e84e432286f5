//! The sync payload: what peers say to each other on `Channel::Sync`, encoded as CBOR.
//!
//! The net layer wraps these bytes in its own versioned, cluster-id-checked envelope; this
//! module owns only the payload. Field numbers are the compatibility contract: new fields
//! get new numbers and are optional, so nodes of adjacent versions still understand each
//! other (minicbor skips unknown fields and defaults missing `Option`s).

use std::sync::Arc;

use minicbor::{CborLen, Decode, Encode};

use super::held::Held;

/// A node's 16-byte site id (`crsql_site_id()`).
pub type SiteId = [u8; 16];

/// One SQLite value as `crsql_changes.val` holds it.
///
/// TEXT travels as its exact bytes (a CBOR byte string), not as a CBOR text string:
/// SQLite does not guarantee TEXT is UTF-8 (`CAST(X'FF00FE' AS TEXT)` by any app), and
/// such a value must replicate byte-exact rather than stop the feed (issue 7, item 1).
#[derive(Clone, Debug, PartialEq, Encode, Decode, CborLen)]
pub enum Value {
    #[n(0)]
    Null,
    #[n(1)]
    Integer(#[n(0)] i64),
    #[n(2)]
    Real(#[n(0)] f64),
    #[n(3)]
    Text(#[cbor(n(0), with = "minicbor::bytes")] Vec<u8>),
    #[n(4)]
    Blob(#[cbor(n(0), with = "minicbor::bytes")] Vec<u8>),
}

impl Value {
    /// Rough wire size, used to keep chunks under the frame limit.
    pub fn approx_size(&self) -> usize {
        match self {
            Value::Null => 1,
            Value::Integer(_) | Value::Real(_) => 9,
            Value::Text(s) => s.len() + 5,
            Value::Blob(b) => b.len() + 5,
        }
    }
}

/// One row of `crsql_changes`, exactly as read from the origin's feed. `db_version` and
/// `seq` are the sender's local numbers; the receiver's extension assigns its own.
#[derive(Clone, Debug, PartialEq, Encode, Decode, CborLen)]
pub struct Change {
    #[n(0)]
    pub table: String,
    #[cbor(n(1), with = "minicbor::bytes")]
    pub pk: Vec<u8>,
    #[n(2)]
    pub cid: String,
    #[n(3)]
    pub val: Value,
    #[n(4)]
    pub col_version: i64,
    #[n(5)]
    pub db_version: i64,
    #[cbor(n(6), with = "minicbor::bytes")]
    pub site_id: Vec<u8>,
    #[n(7)]
    pub cl: i64,
    #[n(8)]
    pub seq: i64,
    #[n(9)]
    pub origin_version: Option<i64>,
}

impl Change {
    /// Rough wire size, used to keep chunks under the frame limit.
    pub fn approx_size(&self) -> usize {
        self.table.len() + self.pk.len() + self.cid.len() + self.val.approx_size() + 16 + 40
    }
}

/// Versions of one origin, as inclusive ranges: one entry of a summary or of `known`.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode, CborLen)]
pub struct OriginRanges {
    #[cbor(n(0), with = "minicbor::bytes")]
    pub site: SiteId,
    #[n(1)]
    pub ranges: Vec<(i64, i64)>,
}

/// One unit of an origin's own writes: its versions `(from, to]` (whole transactions,
/// one read of the origin's feed) and the changes among them still current at the
/// origin when it was read. Versions of the range without a change were superseded
/// before they were sent: a receiver that applies the unit holds the whole range.
#[derive(Clone, Debug, PartialEq, Encode, Decode, CborLen)]
pub struct OriginUnit {
    #[cbor(n(0), with = "minicbor::bytes")]
    pub origin: SiteId,
    #[n(1)]
    pub from: i64,
    #[n(2)]
    pub to: i64,
    /// The origin's wall clock when it read the unit (ms since the Unix epoch): the
    /// commit→applied latency histogram. Clocks of different machines differ.
    #[n(3)]
    pub committed_ms: u64,
    #[n(4)]
    pub changes: Vec<Change>,
    /// The origin's schema fingerprint when it read the unit (`sync::Schema::fingerprint`;
    /// `None` from a node before issue 12, or when its schema changed during the read).
    /// A receiver with the same fingerprint knows every table and column the unit names.
    #[n(5)]
    pub schema: Option<u64>,
}

impl OriginUnit {
    /// Rough wire size.
    pub fn approx_size(&self) -> usize {
        self.changes.iter().map(Change::approx_size).sum::<usize>() + 48
    }
}

/// A slice `(from, to]` of the sender's feed, part of the unit `(unit_from, unit_to]`:
/// the answer to a catch-up pull.
///
/// A unit is one feed read (one read transaction, so whole transactions only). A small
/// unit travels as a single chunk (`from == unit_from && to == unit_to`); a large one in
/// several version-ranged chunks that the receiver buffers durably and applies atomically
/// once they cover the whole unit.
#[derive(Clone, Debug, PartialEq, Encode, Decode, CborLen)]
pub struct Chunk {
    #[n(0)]
    pub unit_from: i64,
    #[n(1)]
    pub unit_to: i64,
    #[n(2)]
    pub from: i64,
    #[n(3)]
    pub to: i64,
    #[n(4)]
    pub changes: Vec<Change>,
    /// On the first chunk of a unit: every origin version the sender held when it fixed
    /// the unit. Once the receiver has applied the whole unit on top of everything before
    /// it in the sender's feed, it holds (or holds newer than) all of these.
    #[n(5)]
    pub held: Option<Vec<OriginRanges>>,
    /// The sender's schema fingerprint when it read the chunk (as `OriginUnit::schema`).
    #[n(6)]
    pub schema: Option<u64>,
}

impl Chunk {
    /// True when this chunk is the whole unit.
    pub fn is_whole_unit(&self) -> bool {
        self.from == self.unit_from && self.to == self.unit_to
    }
    /// True when more chunks of this unit follow.
    pub fn more(&self) -> bool {
        self.to < self.unit_to
    }
}

/// "I last heard from `site` `age_ms` ago" (`Msg::Heard`; `sync::staleness`).
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode, CborLen)]
pub struct HeardAge {
    #[cbor(n(0), with = "minicbor::bytes")]
    pub site: SiteId,
    #[n(1)]
    pub age_ms: u64,
}

/// A snapshot request (`Msg::Pull::seed`): the snapshot `id` (0: make one) from byte
/// `offset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode, CborLen)]
pub struct SeedAsk {
    #[n(0)]
    pub id: u64,
    #[n(1)]
    pub offset: u64,
}

/// Everything said on the sync channel. Every message names the sender's site id, so a
/// receiver can refuse a peer that claims its own id (a copied database file).
#[derive(Clone, Debug, PartialEq, Encode, Decode, CborLen)]
pub enum Msg {
    /// Broadcast of an origin's unit. `relay` is set on the broadcast tree (the receiver
    /// forwards it to its own children in the origin's tree); a repair is not relayed.
    #[n(0)]
    Unit {
        #[cbor(n(0), with = "minicbor::bytes")]
        site: SiteId,
        /// Shared: the relays to each child, the repair cache and the apply queue hold
        /// one decoded unit.
        #[cbor(n(1), with = "shared")]
        unit: Arc<OriginUnit>,
        #[n(2)]
        relay: bool,
    },
    /// Anti-entropy: what the sender holds (held and being applied), per origin. The
    /// receiver answers with an `Offer` of what the sender lacks, and its own summary
    /// when `reply`.
    /// `urgent` asks for no grace period, about the origins it names only (the sender saw
    /// a gap in a broadcast of one origin).
    #[n(1)]
    Summary {
        #[cbor(n(0), with = "minicbor::bytes")]
        site: SiteId,
        #[n(1)]
        held: Vec<OriginRanges>,
        #[n(2)]
        reply: bool,
        #[n(3)]
        urgent: bool,
        /// Per origin, the highest version whose deletes the sender may have forgotten
        /// (tombstones collected, `sync::stability`), each as one range `(1, floor)`. A
        /// receiver that does not hold all of it must be re-seeded.
        #[n(4)]
        collected: Option<Vec<OriginRanges>>,
        /// The sender's `patina_state.cl_floor`: new rows start above it, everywhere.
        #[n(5)]
        cl_floor: Option<i64>,
    },
    /// "I hold versions you lack that I no longer keep in memory: pull my feed."
    #[n(2)]
    Behind {
        #[cbor(n(0), with = "minicbor::bytes")]
        site: SiteId,
    },
    /// Catch-up: "send me your feed after `after`". `unit` is set on a continuation: the
    /// unit being fetched, so the responder reads the same fixed range. Changes whose
    /// origin version `known` holds are left out.
    #[n(3)]
    Pull {
        #[cbor(n(0), with = "minicbor::bytes")]
        site: SiteId,
        #[n(1)]
        after: i64,
        #[n(2)]
        unit: Option<(i64, i64)>,
        #[n(3)]
        known: Vec<OriginRanges>,
        /// Set by a node that holds nothing yet (a joiner): "send me a snapshot of your
        /// replicated tables instead, from this byte" (`sync::seed`). A responder that
        /// cannot, or a release without snapshots (the field is skipped there), answers
        /// the pull as usual.
        #[n(4)]
        seed: Option<SeedAsk>,
    },
    /// One part of a snapshot (`Pull::seed`): bytes `offset..offset + bytes.len()` of a
    /// file of `total` bytes, which the requester installs when it has them all. Sent only
    /// in answer to `Pull::seed`, which releases without snapshots never set: it needs no
    /// protocol version of its own (`since` stays the base).
    #[n(13)]
    Seed {
        #[cbor(n(0), with = "minicbor::bytes")]
        site: SiteId,
        #[n(1)]
        id: u64,
        #[n(2)]
        offset: u64,
        #[n(3)]
        total: u64,
        #[cbor(n(4), with = "minicbor::bytes")]
        bytes: Vec<u8>,
    },
    /// The answer to a `Pull`: one chunk; `chunk.more()` asks for a continuation.
    #[n(4)]
    Changes {
        #[cbor(n(0), with = "minicbor::bytes")]
        site: SiteId,
        #[n(1)]
        chunk: Chunk,
    },
    /// Repairs: whole units the receiver's summary lacked, several per message so that a
    /// repair arrives at once (never relayed).
    #[n(6)]
    Repair {
        #[cbor(n(0), with = "minicbor::bytes")]
        site: SiteId,
        #[n(1)]
        units: Vec<OriginUnit>,
    },
    /// The answer to a summary: the versions the summary lacked that the sender keeps in
    /// memory as whole units (`have`) and those it holds beyond that (`more`). The
    /// receiver asks for what it still lacks (`Want`), or pulls the sender's feed.
    #[n(7)]
    Offer {
        #[cbor(n(0), with = "minicbor::bytes")]
        site: SiteId,
        #[n(1)]
        have: Vec<OriginRanges>,
        #[n(2)]
        more: Vec<OriginRanges>,
    },
    /// "Send me the units holding these versions" (answered with `Repair`).
    #[n(8)]
    Want {
        #[cbor(n(0), with = "minicbor::bytes")]
        site: SiteId,
        #[n(1)]
        ranges: Vec<OriginRanges>,
    },
    /// "Origin `origin` wrote a unit up to `head` too large to broadcast; I hold it":
    /// the receiver pulls the sender's feed, then tells its own children in the tree.
    #[n(5)]
    Notify {
        #[cbor(n(0), with = "minicbor::bytes")]
        site: SiteId,
        #[cbor(n(1), with = "minicbor::bytes")]
        origin: SiteId,
        #[n(2)]
        head: i64,
    },
    /// Protocol version 4 (the simulated next release, `PATINA_TEST_RELEASE_AHEAD`): when
    /// the sender last heard from each origin, as ages, sent with each round's summary.
    /// Lets a node tell an origin it rarely talks to is alive (`sync::staleness`). Sent
    /// only to peers known to speak version 4 or later ([`Msg::since`]).
    #[n(12)]
    Heard {
        #[cbor(n(0), with = "minicbor::bytes")]
        site: SiteId,
        #[n(1)]
        ages: Vec<HeardAge>,
    },
}

impl Msg {
    /// The sender's site id.
    pub fn site(&self) -> &SiteId {
        match self {
            Msg::Unit { site, .. }
            | Msg::Summary { site, .. }
            | Msg::Behind { site }
            | Msg::Pull { site, .. }
            | Msg::Changes { site, .. }
            | Msg::Repair { site, .. }
            | Msg::Offer { site, .. }
            | Msg::Want { site, .. }
            | Msg::Notify { site, .. }
            | Msg::Heard { site, .. }
            | Msg::Seed { site, .. } => site,
        }
    }

    /// The protocol version that introduced this kind: it is sent only to peers known to
    /// speak that version or a later one (`sync::versions`).
    pub fn since(&self) -> u16 {
        match self {
            Msg::Heard { .. } => super::versions::BASE_VERSION + 1,
            _ => super::versions::BASE_VERSION,
        }
    }

    /// Changes this message carries (what `patina_sync_changes_received_total` counts).
    pub fn change_count(&self) -> usize {
        match self {
            Msg::Unit { unit, .. } => unit.changes.len(),
            Msg::Changes { chunk, .. } => chunk.changes.len(),
            Msg::Repair { units, .. } => units.iter().map(|u| u.changes.len()).sum(),
            _ => 0,
        }
    }

    /// The length of [`Msg::encode`]'s bytes, computed without encoding (what the
    /// simulation counts as bytes on the wire).
    pub fn encoded_len(&self) -> usize {
        minicbor::len(self)
    }

    /// CBOR bytes of this message.
    pub fn encode(&self) -> Vec<u8> {
        // Encoding into a Vec cannot fail (the writer is infallible).
        minicbor::to_vec(self).unwrap_or_default()
    }

    /// Parses CBOR bytes from a peer.
    pub fn decode(bytes: &[u8]) -> Result<Msg, minicbor::decode::Error> {
        minicbor::decode(bytes)
    }
}

/// An `Arc<T>` travels as `T` itself: sharing is a matter of memory, not of the wire.
mod shared {
    use std::sync::Arc;

    use minicbor::decode::{self, Decoder};
    use minicbor::encode::{self, Encoder, Write};
    use minicbor::{CborLen, Decode, Encode};

    pub fn encode<Ctx, T: Encode<Ctx>, W: Write>(
        v: &Arc<T>,
        e: &mut Encoder<W>,
        ctx: &mut Ctx,
    ) -> Result<(), encode::Error<W::Error>> {
        T::encode(v, e, ctx)
    }

    pub fn decode<'b, Ctx, T: Decode<'b, Ctx>>(
        d: &mut Decoder<'b>,
        ctx: &mut Ctx,
    ) -> Result<Arc<T>, decode::Error> {
        T::decode(d, ctx).map(Arc::new)
    }

    pub fn cbor_len<Ctx, T: CborLen<Ctx>>(v: &Arc<T>, ctx: &mut Ctx) -> usize {
        T::cbor_len(v, ctx)
    }
}

/// Whether the requester of a pull already holds `c` (by its origin version).
pub fn known_covers(known: &Held, c: &Change) -> bool {
    let (Some(ov), Ok(site)) = (c.origin_version, SiteId::try_from(c.site_id.as_slice())) else {
        return false;
    };
    known.contains(&site, ov)
}

/// Splits one feed read into chunks of at most `max_changes` changes and about
/// `max_bytes` bytes. The chunks' ranges tile `(unit_from, unit_to]` exactly, so a
/// receiver can tell when it holds the whole unit.
pub fn chunk_unit(
    unit_from: i64,
    unit_to: i64,
    changes: Vec<Change>,
    held: Option<Vec<OriginRanges>>,
    max_changes: usize,
    max_bytes: usize,
) -> Vec<Chunk> {
    let mut chunks = Vec::new();
    let mut current: Vec<Change> = Vec::new();
    let mut bytes = 0usize;
    let mut from = unit_from;
    for c in changes {
        let size = c.approx_size();
        if !current.is_empty() && (current.len() >= max_changes || bytes + size > max_bytes) {
            let to = current.last().map(|c| c.db_version).unwrap_or(from);
            chunks.push(Chunk {
                unit_from,
                unit_to,
                from,
                to,
                changes: std::mem::take(&mut current),
                held: if chunks.is_empty() {
                    held.clone()
                } else {
                    None
                },
                schema: None,
            });
            from = to;
            bytes = 0;
        }
        bytes += size;
        current.push(c);
    }
    chunks.push(Chunk {
        unit_from,
        unit_to,
        from,
        to: unit_to,
        changes: current,
        held: if chunks.is_empty() { held } else { None },
        schema: None,
    });
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(v: i64) -> Change {
        Change {
            table: "t".into(),
            pk: vec![1, 9, v as u8],
            cid: "a".into(),
            val: Value::Text(format!("v{v}").into_bytes()),
            col_version: 1,
            db_version: v,
            site_id: vec![7; 16],
            cl: 1,
            seq: 0,
            origin_version: Some(v),
        }
    }

    #[test]
    fn messages_round_trip() {
        let known = vec![OriginRanges {
            site: [6; 16],
            ranges: vec![(1, 3), (7, 9)],
        }];
        let msgs = vec![
            Msg::Unit {
                site: [3; 16],
                unit: Arc::new(OriginUnit {
                    origin: [7; 16],
                    from: 0,
                    to: 2,
                    committed_ms: 1_700_000_000_000,
                    changes: vec![change(1), change(2)],
                    schema: Some(0x1234_5678_9abc_def0),
                }),
                relay: true,
            },
            Msg::Summary {
                site: [3; 16],
                held: known.clone(),
                reply: true,
                urgent: false,
                collected: Some(known.clone()),
                cl_floor: Some(4),
            },
            Msg::Behind { site: [3; 16] },
            Msg::Repair {
                site: [3; 16],
                units: vec![OriginUnit {
                    origin: [7; 16],
                    from: 4,
                    to: 5,
                    committed_ms: 0,
                    changes: vec![change(5)],
                    schema: None,
                }],
            },
            Msg::Pull {
                site: [4; 16],
                after: 17,
                unit: Some((17, 99)),
                known: known.clone(),
                seed: None,
            },
            Msg::Pull {
                site: [4; 16],
                after: 0,
                unit: None,
                known: vec![],
                seed: Some(SeedAsk {
                    id: 7,
                    offset: 1 << 22,
                }),
            },
            Msg::Seed {
                site: [4; 16],
                id: 7,
                offset: 1 << 22,
                total: (1 << 22) + 3,
                bytes: vec![1, 2, 3],
            },
            Msg::Changes {
                site: [4; 16],
                chunk: Chunk {
                    unit_from: 0,
                    unit_to: 2,
                    from: 0,
                    to: 2,
                    changes: vec![change(1)],
                    held: Some(known),
                    schema: Some(u64::MAX),
                },
            },
            Msg::Notify {
                site: [4; 16],
                origin: [5; 16],
                head: 9,
            },
            Msg::Heard {
                site: [4; 16],
                ages: vec![HeardAge {
                    site: [5; 16],
                    age_ms: 1500,
                }],
            },
        ];
        for m in msgs {
            let bytes = m.encode();
            assert_eq!(m.encoded_len(), bytes.len(), "encoded_len of {m:?}");
            assert!(
                matches!(
                    super::super::versions::decode(&bytes, u16::MAX),
                    Ok(super::super::versions::Decoded::Known(_))
                ),
                "every kind is in versions::KINDS"
            );
            assert_eq!(Msg::decode(&bytes).expect("decodes"), m);
        }
        let vals = [
            Value::Null,
            Value::Integer(i64::MIN),
            Value::Real(1.5),
            Value::Text(b"x".to_vec()),
            Value::Text(vec![0xff, 0x00, 0xfe]),
            Value::Blob(vec![0, 255]),
        ];
        for v in vals {
            let bytes = minicbor::to_vec(&v).expect("encodes");
            assert_eq!(minicbor::len(&v), bytes.len());
            assert_eq!(minicbor::decode::<Value>(&bytes).expect("decodes"), v);
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(Msg::decode(&[0xff, 0x00, 0x13]).is_err());
        assert!(Msg::decode(&[]).is_err());
        let full = Msg::Pull {
            site: [1; 16],
            after: 5,
            unit: None,
            known: vec![],
            seed: None,
        }
        .encode();
        assert!(Msg::decode(&full[..full.len() - 3]).is_err());
    }

    #[test]
    fn chunks_tile_the_unit() {
        let changes: Vec<Change> = (11..=30).map(change).collect();
        let chunks = chunk_unit(10, 35, changes, None, 6, usize::MAX);
        assert_eq!(chunks.len(), 4);
        assert_eq!(chunks[0].from, 10);
        for w in chunks.windows(2) {
            assert_eq!(w[0].to, w[1].from);
        }
        assert_eq!(chunks.last().map(|c| c.to), Some(35));
        assert_eq!(chunks.iter().map(|c| c.changes.len()).sum::<usize>(), 20);
        assert!(chunks[0].more() && !chunks[3].more());
        let one = chunk_unit(10, 12, vec![change(11)], None, 6, usize::MAX);
        assert!(one.len() == 1 && one[0].is_whole_unit());
        let empty = chunk_unit(10, 12, vec![], None, 6, usize::MAX);
        assert!(empty.len() == 1 && empty[0].changes.is_empty());
    }

    #[test]
    fn chunks_respect_the_byte_limit() {
        let changes: Vec<Change> = (1..=10).map(change).collect();
        let size = changes[0].approx_size();
        let chunks = chunk_unit(0, 10, changes, None, 1000, size * 3);
        assert!(chunks.iter().all(|c| c.changes.len() <= 3));
    }
}
