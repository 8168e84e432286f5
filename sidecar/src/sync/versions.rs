//! Rolling upgrades on the sync channel: the protocol version each peer speaks, which
//! message kinds it may be sent, and decoding a payload that may hold a kind this node
//! does not know (the rule is written at `net::envelope::PROTOCOL_VERSION`).
//!
//! Each peer's version is learned from the envelope of every frame it sends (the caller
//! passes it in); a peer not heard from yet counts as speaking the oldest version this
//! node accepts. A message kind introduced in version V ([`Msg::since`]) goes only to
//! peers known to speak V or later; the machine drops it for the others when its
//! effects are drained. Pure, like the rest of `sync`.

use std::collections::HashMap;
use std::net::SocketAddr;

use super::msg::Msg;

/// The per-origin protocol: every message kind whose [`Msg::since`] is not later. The
/// oldest version any release interoperates with.
pub const BASE_VERSION: u16 = 3;

/// The top-level kinds (CBOR variant numbers of [`Msg`]) this build can decode. A kind
/// outside this list is one a later release added. A new kind needs its number here
/// (`msg.rs`'s round-trip test checks) and, unless every accepted version has it, its
/// version in [`Msg::since`].
pub const KINDS: &[u32] = &[0, 1, 2, 3, 4, 5, 6, 7, 8, 12, 13];

/// The version each peer speaks, as far as its frames told.
#[derive(Clone, Debug)]
pub struct PeerVersions {
    ours: u16,
    by_addr: HashMap<SocketAddr, u16>,
}

impl PeerVersions {
    /// For a node speaking `ours`.
    pub fn new(ours: u16) -> PeerVersions {
        PeerVersions {
            ours,
            by_addr: HashMap::new(),
        }
    }

    /// The version this node speaks.
    pub fn ours(&self) -> u16 {
        self.ours
    }

    /// The oldest version this node accepts: what a peer not heard from yet is assumed
    /// to speak.
    pub fn oldest(&self) -> u16 {
        self.ours.saturating_sub(1).max(BASE_VERSION)
    }

    /// `addr` sent a frame of `version`. Returns the version it was known to speak
    /// before when this changes it (`None` for the first frame or no change).
    pub fn note(&mut self, addr: SocketAddr, version: u16) -> Option<Option<u16>> {
        match self.by_addr.insert(addr, version) {
            Some(v) if v == version => None,
            before => Some(before),
        }
    }

    /// The version `addr` speaks (the oldest accepted when not known yet).
    pub fn of(&self, addr: &SocketAddr) -> u16 {
        self.by_addr.get(addr).copied().unwrap_or(self.oldest())
    }

    /// Whether `msg` may be sent to `to`: its kind exists in the version `to` speaks.
    pub fn may_send(&self, to: &SocketAddr, msg: &Msg) -> bool {
        msg.since() <= self.of(to)
    }

    /// Keeps the peers for which `keep` holds (members only: no unbounded growth).
    pub fn retain(&mut self, mut keep: impl FnMut(&SocketAddr) -> bool) {
        self.by_addr.retain(|a, _| keep(a));
    }

    /// How many known peers speak each version.
    pub fn counts(&self) -> Vec<(u16, usize)> {
        let mut c: std::collections::BTreeMap<u16, usize> = Default::default();
        for v in self.by_addr.values() {
            *c.entry(*v).or_default() += 1;
        }
        c.into_iter().collect()
    }
}

/// A short name of a message's kind, for `patina_sync_messages_received_total{kind}`.
pub fn kind_name(msg: &Msg) -> &'static str {
    match msg {
        Msg::Unit { .. } => "unit",
        Msg::Summary { .. } => "summary",
        Msg::Behind { .. } => "behind",
        Msg::Pull { .. } => "pull",
        Msg::Changes { .. } => "changes",
        Msg::Repair { .. } => "repair",
        Msg::Offer { .. } => "offer",
        Msg::Want { .. } => "want",
        Msg::Notify { .. } => "notify",
        Msg::Heard { .. } => "heard",
        Msg::Seed { .. } => "seed",
        #[allow(unreachable_patterns)]
        _ => "other",
    }
}

/// A sync payload, decoded by a node speaking some version.
#[derive(Debug, PartialEq)]
pub enum Decoded {
    Known(Msg),
    /// A message kind this node does not know, or knows only from a later version than
    /// the one it speaks: ignored (and counted) rather than an error, so a newer peer can
    /// add kinds without breaking its connections to older ones.
    Unknown {
        kind: u32,
    },
}

/// Decodes a sync payload as a node speaking `ours`. Bytes that are not a message at all
/// stay an error (the caller refuses and counts them).
pub fn decode(bytes: &[u8], ours: u16) -> Result<Decoded, minicbor::decode::Error> {
    let mut d = minicbor::Decoder::new(bytes);
    d.array()?;
    let kind = d.u32()?;
    if !KINDS.contains(&kind) {
        return Ok(Decoded::Unknown { kind });
    }
    let msg = Msg::decode(bytes)?;
    if msg.since() > ours {
        return Ok(Decoded::Unknown { kind });
    }
    Ok(Decoded::Known(msg))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::msg::HeardAge;

    fn addr(p: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], p))
    }

    fn heard() -> Msg {
        Msg::Heard {
            site: [1; 16],
            ages: vec![HeardAge {
                site: [2; 16],
                age_ms: 300,
            }],
        }
    }

    #[test]
    fn a_kind_of_the_next_version_goes_only_to_peers_known_to_speak_it() {
        let mut v = PeerVersions::new(4);
        assert_eq!(v.oldest(), 3);
        let behind = Msg::Behind { site: [1; 16] };
        assert!(v.may_send(&addr(1), &behind));
        assert!(!v.may_send(&addr(1), &heard()), "not heard from: assumed 3");
        assert_eq!(v.note(addr(1), 4), Some(None));
        assert_eq!(v.note(addr(1), 4), None);
        assert!(v.may_send(&addr(1), &heard()));
        assert_eq!(v.note(addr(1), 3), Some(Some(4)), "downgraded in place");
        assert!(!v.may_send(&addr(1), &heard()));
        v.note(addr(2), 4);
        assert_eq!(v.counts(), vec![(3, 1), (4, 1)]);
        v.retain(|a| *a == addr(2));
        assert_eq!(v.counts(), vec![(4, 1)]);
        assert_eq!(PeerVersions::new(3).oldest(), 3);
    }

    /// Through the real machine: a node speaking 4 sends `Heard` with each round's
    /// summary, but only to a peer whose frames said it speaks 4; a node speaking 3
    /// never sends it.
    #[test]
    fn the_machine_sends_a_newer_kind_only_to_peers_that_speak_it() {
        use crate::sync::test_support::{addr, drain};
        use crate::sync::{Effect, Held, Replicator, SyncConfig};
        use rand::SeedableRng;
        use std::time::Duration;
        let node = |protocol| {
            Replicator::new(
                [1; 16],
                SyncConfig {
                    protocol,
                    ..SyncConfig::default()
                },
                HashMap::new(),
                Held::default(),
                rand::rngs::StdRng::seed_from_u64(7),
                Duration::ZERO,
            )
        };
        let heard_to = |m: &mut Replicator, t| {
            m.handle_timer(Duration::from_secs(t));
            drain(m)
                .into_iter()
                .filter_map(|e| match e {
                    Effect::Send {
                        to,
                        msg: Msg::Heard { .. },
                    } => Some(to),
                    _ => None,
                })
                .collect::<Vec<_>>()
        };
        let mut next = node(4);
        next.set_peers([(addr(2), [2; 16])], Duration::ZERO);
        assert!(heard_to(&mut next, 5).is_empty(), "version not known yet");
        assert_eq!(next.stats().withheld, 1);
        next.note_version(addr(2), 3);
        assert!(heard_to(&mut next, 10).is_empty(), "a version-3 peer");
        next.note_version(addr(2), 4);
        assert_eq!(heard_to(&mut next, 15), vec![addr(2)]);
        let mut current = node(3);
        current.set_peers([(addr(2), [2; 16])], Duration::ZERO);
        current.note_version(addr(2), 4);
        assert!(heard_to(&mut current, 5).is_empty(), "3 has no such kind");
        assert_eq!(current.stats().withheld, 0);
    }

    #[test]
    fn unknown_kinds_are_ignored_not_errors() {
        // A kind no release of this build knows: `[99, [..]]`.
        let mut e = minicbor::Encoder::new(Vec::new());
        e.array(2)
            .and_then(|e| e.u32(99))
            .and_then(|e| e.array(1))
            .and_then(|e| e.str("from the future"))
            .expect("encode");
        let bytes = e.into_writer();
        let ok = |b: &[u8], v| decode(b, v).ok();
        assert_eq!(ok(&bytes, 3), Some(Decoded::Unknown { kind: 99 }));
        // A kind of version 4, received by a node speaking 3: as if it did not exist.
        let h = heard().encode();
        assert_eq!(ok(&h, 3), Some(Decoded::Unknown { kind: 12 }));
        assert_eq!(ok(&h, 4), Some(Decoded::Known(heard())));
        // Garbage stays an error.
        assert!(decode(&[0xff, 0x13], 3).is_err());
        let behind = Msg::Behind { site: [3; 16] };
        assert_eq!(
            ok(&behind.encode(), 3),
            Some(Decoded::Known(behind.clone()))
        );
    }
}
