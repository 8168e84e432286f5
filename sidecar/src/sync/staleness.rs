//! Staleness per origin, as values: how far behind this node is on each origin's writes,
//! and how long ago it last heard from it (DESIGN §2, "Staleness is visible").
//!
//! Pure: the sync machine records *when* it heard of an origin ([`HeardLog`]) and hands
//! what it holds and what it knows exists to [`compute`]; the node publishes the result
//! (the `patina_staleness` table, `/v1/health`, `/metrics`, `patina status`).
//!
//! **Heard from**, precisely: this node last heard from origin O at the last moment it
//! received (a) any sync message sent by O itself (a summary, an offer, a unit, an
//! answer to a pull — whatever it is), or (b) from anyone, a unit of O's writes or a
//! summary, offer or notice naming a version of O newer than the newest this node knew
//! to exist. (b) is how an origin that is not in direct contact shows it is alive and
//! writing: in a large cluster a node exchanges summaries with one random peer per round,
//! so an idle origin is heard from directly only about every n/2 rounds.
//!
//! An origin that is not heard from any more drops out of the report ([`FORGET_AFTER`]):
//! a node that departed or crashed stops counting against thresholds once it has been
//! silent that long, nothing is missing of it and it is not an alive member.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use super::held::Held;
use super::msg::{HeardAge, SiteId};

/// An origin silent this long, with nothing missing and not an alive member, is
/// forgotten: out of the table, the metrics and the thresholds. Long enough to cover any
/// partition an operator would still call a partition; a member that comes back is
/// reported again at its first message.
pub const FORGET_AFTER: Duration = Duration::from_secs(600);

/// When each origin was last heard from (see the module docs), in the machine's time.
#[derive(Clone, Debug, Default)]
pub struct HeardLog {
    at: HashMap<SiteId, Duration>,
}

impl HeardLog {
    /// `origin` was heard from at `now`.
    pub fn heard(&mut self, origin: SiteId, now: Duration) {
        let t = self.at.entry(origin).or_insert(now);
        *t = (*t).max(now);
    }

    /// When `origin` was last heard from, if ever since this node started.
    pub fn last(&self, origin: &SiteId) -> Option<Duration> {
        self.at.get(origin).copied()
    }

    /// What `Msg::Heard` says (protocol 4): each origin heard from, by age at `now`.
    pub fn to_wire(&self, now: Duration) -> Vec<HeardAge> {
        self.at
            .iter()
            .map(|(site, t)| HeardAge {
                site: *site,
                age_ms: now.saturating_sub(*t).as_millis() as u64,
            })
            .collect()
    }

    /// A peer's `Msg::Heard`, received at `now`: an origin it heard from more recently
    /// than this node did counts as heard at `now - age` (transit time not subtracted;
    /// ages only grow as they are passed on, so a departed origin still fades away).
    /// Ages of [`FORGET_AFTER`] or more, and this node's own id, are ignored.
    pub fn merge_wire(&mut self, ages: &[HeardAge], me: &SiteId, now: Duration) {
        for a in ages {
            let age = Duration::from_millis(a.age_ms);
            if a.site == *me || age >= FORGET_AFTER {
                continue;
            }
            if let Some(t) = now.checked_sub(age) {
                self.heard(a.site, t);
            }
        }
    }

    /// Drops entries older than [`FORGET_AFTER`] (bounded memory: departed origins go).
    pub fn expire(&mut self, now: Duration) {
        self.at.retain(|_, t| now.saturating_sub(*t) < FORGET_AFTER);
    }
}

/// One origin as this node sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OriginStaleness {
    pub site: SiteId,
    /// This node's own site (it is never behind on itself).
    pub is_self: bool,
    /// The newest version of the origin known to exist (from its units, summaries,
    /// offers and notices, and what this node holds).
    pub known: i64,
    /// This node holds every version `1..=contiguous` (0 when it lacks version 1).
    pub contiguous: i64,
    /// The newest version held.
    pub newest_held: i64,
    /// How many versions are held.
    pub held: i64,
    /// Versions in `1..=known` not held.
    pub missing: i64,
    /// When last heard from, in the machine's time; `None`: not since this node started.
    pub last_heard: Option<Duration>,
    /// How long it has been silent: `now - last_heard`, or the time since this node
    /// started when it was never heard from (zero for this node itself).
    pub silent_for: Duration,
}

/// The staleness of every origin worth reporting, ordered by site id: this node, every
/// alive peer, every origin with versions missing and every origin heard from within
/// [`FORGET_AFTER`] (from what is held, what is known to exist and when each was heard).
pub fn compute(
    me: &SiteId,
    held: &Held,
    heads: &HashMap<SiteId, i64>,
    heard: &HeardLog,
    alive: &BTreeSet<SiteId>,
    now: Duration,
) -> Vec<OriginStaleness> {
    let mut origins: BTreeSet<SiteId> = held.iter().map(|(s, _)| *s).collect();
    origins.extend(heads.keys().copied());
    origins.extend(alive.iter().copied());
    origins.insert(*me);
    let mut out = Vec::with_capacity(origins.len());
    for site in origins {
        let is_self = site == *me;
        let ranges = held.of(&site);
        let newest_held = ranges.head();
        let known = heads.get(&site).copied().unwrap_or(0).max(newest_held);
        let contiguous = match ranges.ranges().first() {
            Some(&(1, end)) => end,
            _ => 0,
        };
        let count = ranges.count();
        let missing = if is_self {
            0
        } else {
            known.saturating_sub(count).max(0)
        };
        let last_heard = if is_self {
            Some(now)
        } else {
            heard.last(&site)
        };
        let silent_for = now.saturating_sub(last_heard.unwrap_or(Duration::ZERO));
        let forgotten =
            !is_self && !alive.contains(&site) && missing == 0 && silent_for >= FORGET_AFTER;
        if forgotten {
            continue;
        }
        out.push(OriginStaleness {
            site,
            is_self,
            known,
            contiguous,
            newest_held,
            held: count,
            missing,
            last_heard: if is_self { None } else { last_heard },
            silent_for,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: SiteId = [1; 16];
    const B: SiteId = [2; 16];
    const C: SiteId = [3; 16];
    const GONE: SiteId = [4; 16];

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn missing_counts_versions_known_to_exist_and_not_held() {
        let mut held = Held::default();
        held.insert(ME, 1, 9);
        held.insert(B, 1, 4);
        held.insert(B, 7, 8);
        let heads = HashMap::from([(B, 12), (ME, 9)]);
        let mut heard = HeardLog::default();
        heard.heard(B, secs(5));
        let alive = BTreeSet::from([B]);
        let r = compute(&ME, &held, &heads, &heard, &alive, secs(8));
        assert_eq!(r.len(), 2);
        let me = &r[0];
        assert!(me.is_self && me.missing == 0 && me.known == 9 && me.contiguous == 9);
        assert_eq!(me.silent_for, Duration::ZERO);
        let b = &r[1];
        assert_eq!(
            (b.known, b.contiguous, b.newest_held, b.held, b.missing),
            (12, 4, 8, 6, 6),
            "5, 6 and 9..=12 are missing"
        );
        assert_eq!(b.last_heard, Some(secs(5)));
        assert_eq!(b.silent_for, secs(3));
    }

    #[test]
    fn an_alive_peer_never_heard_from_is_silent_since_the_start() {
        let r = compute(
            &ME,
            &Held::default(),
            &HashMap::new(),
            &HeardLog::default(),
            &BTreeSet::from([C]),
            secs(40),
        );
        let c = r
            .iter()
            .find(|o| o.site == C)
            .expect("alive peers are reported");
        assert_eq!((c.known, c.missing, c.last_heard), (0, 0, None));
        assert_eq!(c.silent_for, secs(40));
    }

    #[test]
    fn a_silent_departed_origin_is_forgotten_unless_something_is_missing() {
        let mut held = Held::default();
        held.insert(GONE, 1, 3);
        let mut heard = HeardLog::default();
        heard.heard(GONE, secs(10));
        let alive = BTreeSet::new();
        let at = |t| compute(&ME, &held, &HashMap::new(), &heard, &alive, t);
        assert!(at(secs(10) + FORGET_AFTER - secs(1))
            .iter()
            .any(|o| o.site == GONE));
        assert!(!at(secs(10) + FORGET_AFTER).iter().any(|o| o.site == GONE));
        // Versions known and not held keep it reported, however long it is silent.
        let heads = HashMap::from([(GONE, 5)]);
        let r = compute(&ME, &held, &heads, &heard, &alive, secs(5000));
        let gone = r.iter().find(|o| o.site == GONE).expect("still missing");
        assert_eq!(gone.missing, 2);
    }

    /// Through the real machine: a message of the origin itself, and a summary of a
    /// third node naming a newer version, count as hearing from it; a summary repeating
    /// what is known does not.
    #[test]
    fn the_machine_hears_from_origins_directly_and_through_newer_versions() {
        use crate::sync::msg::{Msg, OriginRanges};
        use crate::sync::test_support::{addr, ident, machine};
        let mut m = machine(1);
        m.set_peers([(addr(2), B), (addr(3), C)], secs(0));
        let summary = |site: SiteId, head: i64| Msg::Summary {
            site,
            held: vec![OriginRanges {
                site: C,
                ranges: vec![(1, head)],
            }],
            reply: false,
            urgent: false,
            collected: None,
            cl_floor: None,
        };
        m.handle_message(addr(2), &ident(2), summary(B, 5), secs(3));
        let at = |m: &crate::sync::Replicator, t| {
            m.staleness(t)
                .into_iter()
                .map(|o| (o.site, (o.last_heard, o.missing)))
                .collect::<HashMap<_, _>>()
        };
        let r = at(&m, secs(4));
        assert_eq!(r[&B], (Some(secs(3)), 0), "B itself spoke");
        assert_eq!(
            r[&C],
            (Some(secs(3)), 5),
            "B named C's versions 1..=5, unseen before"
        );
        m.handle_message(addr(2), &ident(2), summary(B, 5), secs(6));
        let r = at(&m, secs(7));
        assert_eq!(r[&B].0, Some(secs(6)));
        assert_eq!(
            r[&C].0,
            Some(secs(3)),
            "nothing newer of C: not heard again"
        );
    }

    #[test]
    fn ages_passed_on_never_make_an_origin_younger() {
        let mut a = HeardLog::default();
        a.heard(C, secs(10));
        let wire = a.to_wire(secs(14));
        assert_eq!(
            wire,
            vec![HeardAge {
                site: C,
                age_ms: 4000
            }]
        );
        let mut b = HeardLog::default();
        b.heard(C, secs(12));
        b.merge_wire(&wire, &ME, secs(15));
        assert_eq!(b.last(&C), Some(secs(12)), "its own, newer, stays");
        let mut c = HeardLog::default();
        c.merge_wire(&wire, &ME, secs(15));
        assert_eq!(c.last(&C), Some(secs(11)));
        c.merge_wire(
            &[HeardAge {
                site: ME,
                age_ms: 0,
            }],
            &ME,
            secs(15),
        );
        assert_eq!(c.last(&ME), None, "never about itself");
    }

    #[test]
    fn heard_keeps_the_latest_time_and_expires() {
        let mut h = HeardLog::default();
        h.heard(B, secs(9));
        h.heard(B, secs(4));
        assert_eq!(h.last(&B), Some(secs(9)));
        h.expire(secs(9) + FORGET_AFTER);
        assert_eq!(h.last(&B), None);
    }
}
