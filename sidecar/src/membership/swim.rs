//! The membership core without I/O: foca plus our identity, effects collected into Vecs.
//!
//! The caller feeds it packets, fired timers and bootstrap ticks, and carries out what
//! comes back ([`Effects`]: packets to send, timers to schedule, notifications). No clock,
//! no socket, randomness seeded by the caller — so tests run many instances under
//! virtual time (see `sim.rs`).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::num::{NonZeroU8, NonZeroUsize};
use std::time::Duration;

use foca::{
    Codec, Config, Foca, Header, Identity, Incarnation, Member, Message, NoCustomBroadcast,
    Notification, OwnedNotification, PeriodicParams, PostcardCodec, Runtime, State, Timer,
};
use rand_foca::rngs::StdRng;
use rand_foca::SeedableRng;

/// Largest SWIM packet: fits one QUIC datagram at the minimum path MTU (1200) after QUIC
/// and envelope overhead, so SWIM rarely needs the stream fallback.
pub const MAX_PACKET: usize = 1100;

/// How often a node probes one member. Fixed for the life of a node (foca cannot change
/// it at run time), so it is chosen for the largest cluster and the slowest link.
pub const PROBE_PERIOD: Duration = Duration::from_secs(3);
/// How long a direct probe waits for its ack before asking others to probe indirectly:
/// 3 × a 300 ms round trip, which also covers dialing a fresh QUIC connection first (one
/// round trip) — the idle reaper closes connections SWIM alone used. The indirect cycle
/// gets the other 2 s: up to four one-way trips plus two handshakes at 300 ms.
pub const PROBE_RTT: Duration = Duration::from_secs(1);
/// Bounds on how long a suspect stays suspect before it is declared down. The upper one
/// keeps a silent death visible within 30 s at any size: at most one probe period until
/// some member probes it, one for the probe to fail, this, and a few gossip rounds.
pub const SUSPECT_MIN: Duration = Duration::from_secs(6);
pub const SUSPECT_MAX: Duration = Duration::from_secs(18);
/// Suspects told directly of their suspicion per probe period, at most.
const MAX_REMINDERS: usize = 64;
/// Members asked to probe a silent member indirectly.
const INDIRECT_PROBES: usize = 3;

/// A member as foca knows it. `incarnation` distinguishes lives of the same node: a
/// restarted node should start with a larger one (e.g. the start time in ms), and
/// [`Identity::renew`] bumps it to rejoin after being declared down.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct MemberId {
    pub addr: SocketAddr,
    pub site_id: [u8; 16],
    pub incarnation: u64,
}

impl Identity for MemberId {
    type Addr = SocketAddr;

    fn renew(&self) -> Option<Self> {
        Some(MemberId {
            incarnation: self.incarnation.wrapping_add(1),
            ..self.clone()
        })
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The later life of a node wins; the site id breaks ties deterministically.
    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        (self.incarnation, self.site_id) > (adversary.incarnation, adversary.site_id)
    }
}

/// What one call into the core asks the caller to do.
#[derive(Default, Debug)]
pub struct Effects {
    /// SWIM packets to send, best effort.
    pub sends: Vec<(SocketAddr, Vec<u8>)>,
    /// Timers to hand back through [`Core::handle_timer`] after the given delay.
    pub timers: Vec<(Duration, Timer<MemberId>)>,
    pub notifications: Vec<OwnedNotification<MemberId>>,
}

impl Runtime<MemberId> for Effects {
    fn notify(&mut self, notification: Notification<'_, MemberId>) {
        self.notifications.push(notification.to_owned());
    }

    fn send_to(&mut self, to: MemberId, data: &[u8]) {
        self.sends.push((to.addr, data.to_vec()));
    }

    fn submit_after(&mut self, event: Timer<MemberId>, after: Duration) {
        self.timers.push((after, event));
    }
}

type Swim = Foca<MemberId, PostcardCodec, StdRng, NoCustomBroadcast>;

/// foca, the bootstrap list and duplicate-site-id bookkeeping.
pub struct Core {
    foca: Swim,
    /// The configuration in force (foca has no getter), derived for `sized_for` live
    /// members, us included.
    config: Config,
    sized_for: usize,
    /// Our foca incarnation (not public in foca), read from the packets we send.
    incarnation: Incarnation,
    /// A self-refutation is allowed once per probe period (see [`Core::handle_data`]).
    may_refute: bool,
    bootstrap: Vec<SocketAddr>,
    /// Peers already reported for claiming our site id (log once per peer).
    duplicates_logged: HashSet<SocketAddr>,
}

/// The SWIM parameters for a cluster of `live` members (us included), WAN-safe at any
/// size; see README "Membership timings". Pure, so it is tested on its own.
///
/// - probe period 3 s and probe timeout 1 s, whatever the size (see [`PROBE_PERIOD`]);
/// - suspicion: 2 probe periods × log10(live), within 6..=18 s (10.2 s at 50 members,
///   17.4 s at 800): more members take longer to hear a suspicion and refute it;
/// - transmissions of each update: 3 × ⌈log10(live + 1)⌉ + 3 (9 at 50, 12 at 800), so an
///   update reaches everyone with high probability;
/// - gossip of pending updates every 500 ms to 3 members; an announce to 1 member every
///   60 s (finds members we missed) and to 2 down members every 30 s (heals partitions).
pub fn config_for(live: usize) -> Config {
    let n = live.max(1) as f64;
    let suspicion = (2.0 * PROBE_PERIOD.as_secs_f64() * n.log10())
        .clamp(SUSPECT_MIN.as_secs_f64(), SUSPECT_MAX.as_secs_f64());
    let transmissions = 3 * (n + 1.0).log10().ceil() as u32 + 3;
    let nz = |v: usize| NonZeroUsize::new(v).unwrap_or(NonZeroUsize::MIN);
    let mut c = Config::simple();
    c.probe_period = PROBE_PERIOD;
    c.probe_rtt = PROBE_RTT;
    c.num_indirect_probes = nz(INDIRECT_PROBES);
    c.max_transmissions =
        NonZeroU8::new(transmissions.min(u8::MAX as u32) as u8).unwrap_or(NonZeroU8::MIN);
    c.suspect_to_down_after = Duration::from_millis((suspicion * 1000.0) as u64);
    c.max_packet_size = nz(MAX_PACKET);
    c.notify_down_members = true;
    c.periodic_gossip = Some(PeriodicParams {
        frequency: Duration::from_millis(500),
        num_members: nz(3),
    });
    c.periodic_announce = Some(PeriodicParams {
        frequency: Duration::from_secs(60),
        num_members: nz(1),
    });
    c.periodic_announce_to_down_members = Some(PeriodicParams {
        frequency: Duration::from_secs(30),
        num_members: nz(2),
    });
    c
}

/// The parameters of [`config_for`] that depend on the size, to tell whether a new size
/// changes anything.
fn sized(c: &Config) -> (Duration, u8) {
    (c.suspect_to_down_after, c.max_transmissions.get())
}

impl Core {
    /// `bootstrap` is announced to (see [`Core::bootstrap_tick`]); our own address in it
    /// is ignored.
    /// The configuration starts as [`config_for`] one member and follows the live count
    /// from then on (see [`Core::fit_config`]).
    pub fn new(me: MemberId, bootstrap: Vec<SocketAddr>, seed: u64) -> Core {
        let bootstrap = bootstrap.into_iter().filter(|a| *a != me.addr).collect();
        Core {
            foca: Foca::new(
                me,
                config_for(1),
                StdRng::seed_from_u64(seed),
                PostcardCodec,
            ),
            config: config_for(1),
            sized_for: 1,
            incarnation: Incarnation::default(),
            may_refute: true,
            bootstrap,
            duplicates_logged: HashSet::new(),
        }
    }

    pub fn identity(&self) -> &MemberId {
        self.foca.identity()
    }

    /// A SWIM packet from the network. Bad packets are logged at debug (SWIM is lossy and
    /// foca rejects, e.g., packets from members it declared down) and change nothing.
    pub fn handle_data(&mut self, from: SocketAddr, data: &[u8]) -> Effects {
        let mut fx = Effects::default();
        let sender = Codec::<MemberId>::decode_header(&mut PostcardCodec, data)
            .ok()
            .map(|h| h.src);
        let from_suspect = sender.is_some_and(|src| self.is_suspect(&src));
        if let Err(e) = self.foca.handle_data(data, &mut fx) {
            tracing::debug!(peer = %from, error = %e, "SWIM packet from peer {from} not handled");
        }
        if from_suspect && self.may_refute {
            // We hear from a member we suspect: there was a partition between us, so it
            // likely suspects us too — but the updates saying so may have run out of
            // transmissions while the partition lasted, and SWIM only lets the suspect
            // itself refute. Refute pre-emptively (foca bumps our incarnation and
            // gossips it): costs a few packets, saves being declared down after every
            // partition that heals within the suspicion timeout.
            self.may_refute = false;
            let me = Member::new(
                self.foca.identity().clone(),
                self.incarnation,
                State::Suspect,
            );
            if let Err(e) = self.foca.apply_many(std::iter::once(me), true, &mut fx) {
                tracing::debug!(error = %e, "refuting a likely suspicion failed");
            }
            // And the other way round: tell the members we suspect, directly, so they can
            // refute in time (the "buddy system" of Lifeguard, which foca lacks).
            self.remind_suspects(&mut fx);
        }
        self.after(&mut fx);
        fx
    }

    /// A timer scheduled earlier has fired.
    pub fn handle_timer(&mut self, timer: Timer<MemberId>) -> Effects {
        let mut fx = Effects::default();
        if let Timer::ChangeSuspectToDown {
            member_id,
            incarnation,
            ..
        } = &timer
        {
            if !self.still_suspect(member_id, *incarnation) {
                // foca 2.0.0 sends TurnUndead ("you are down") to the member when this
                // timer fires even if the member refuted the suspicion meanwhile (or
                // rejoined under a new identity), without declaring it down itself: the
                // live member then believes it was declared down and rejoins with a new
                // identity — and the next stale timer does it again. Seen after an 8 s
                // partition healed: 25 of 50 live nodes rejoined, 1,225 renames logged.
                // The timer is void in that case, so it is dropped here.
                return fx;
            }
        }
        if matches!(timer, Timer::ProbeRandomMember(_)) {
            self.may_refute = true;
        }
        if let Err(e) = self.foca.handle_timer(timer, &mut fx) {
            tracing::debug!(error = %e, "SWIM timer not handled");
        }
        self.after(&mut fx);
        fx
    }

    /// Bookkeeping after every call into foca: our incarnation as our packets carry it,
    /// and the configuration for the live count.
    fn after(&mut self, fx: &mut Effects) {
        if let Some((_, data)) = fx.sends.last() {
            if let Ok(h) = Codec::<MemberId>::decode_header(&mut PostcardCodec, data.as_slice()) {
                if &h.src == self.foca.identity() {
                    self.incarnation = h.src_incarnation;
                }
            }
        }
        self.fit_config();
    }

    /// Sends each member we suspect (at most [`MAX_REMINDERS`]) a gossip message holding
    /// just that suspicion, encoded as foca encodes its own.
    fn remind_suspects(&mut self, fx: &mut Effects) {
        let me = self.foca.identity().clone();
        let suspects: Vec<Member<MemberId>> = self
            .foca
            .iter_membership_state()
            .filter(|m| m.state() == State::Suspect && m.id().addr != me.addr)
            .take(MAX_REMINDERS)
            .cloned()
            .collect();
        for suspect in suspects {
            let header = Header {
                src: me.clone(),
                src_incarnation: self.incarnation,
                dst: suspect.id().clone(),
                message: Message::Gossip,
            };
            let mut buf = Vec::with_capacity(256);
            let encoded = PostcardCodec
                .encode_header(&header, &mut buf)
                .and_then(|()| {
                    buf.extend_from_slice(&1u16.to_be_bytes());
                    PostcardCodec.encode_member(&suspect, &mut buf)
                });
            match encoded {
                Ok(()) => fx.sends.push((suspect.id().addr, buf)),
                Err(e) => tracing::debug!(error = %e, "cannot encode a suspicion reminder"),
            }
        }
    }

    /// Whether we hold `id` (this very identity) as suspect.
    fn is_suspect(&self, id: &MemberId) -> bool {
        self.foca
            .iter_membership_state()
            .any(|m| m.id() == id && m.state() == State::Suspect)
    }

    /// Whether `id` (this very identity, not a later life at its address) is still
    /// suspect at foca incarnation `incarnation`, i.e. has not refuted the suspicion.
    fn still_suspect(&self, id: &MemberId, incarnation: Incarnation) -> bool {
        self.foca
            .iter_membership_state()
            .any(|m| m.id() == id && m.incarnation() == incarnation && m.state() == State::Suspect)
    }

    /// Live members, us included.
    pub fn live(&self) -> usize {
        self.foca.num_members() + 1
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Re-derives the configuration from the live count when it changed. Timers already
    /// scheduled keep their delays; new suspicions use the new ones.
    fn fit_config(&mut self) {
        let live = self.live();
        if live == self.sized_for {
            return;
        }
        let next = config_for(live);
        if sized(&next) != sized(&self.config) {
            let (suspect, transmissions) = sized(&next);
            match self.foca.set_config(next.clone()) {
                Ok(()) => {
                    tracing::debug!(
                        live,
                        suspect_to_down_ms = suspect.as_millis() as u64,
                        max_transmissions = transmissions,
                        "SWIM configuration re-derived for {live} live members"
                    );
                    self.config = next;
                }
                // Only a changed probe period or timeout is refused, and config_for keeps
                // both fixed.
                Err(e) => tracing::warn!(live, "SWIM configuration not changed: {e}"),
            }
        }
        self.sized_for = live;
    }

    /// Called periodically: while no member is known, announce to every bootstrap address.
    /// The destination's identity is unknown, so a placeholder with its address is used
    /// (foca accepts an announce addressed to any identity with its address).
    pub fn bootstrap_tick(&mut self) -> Effects {
        let mut fx = Effects::default();
        if self.foca.num_members() > 0 {
            return fx;
        }
        for addr in &self.bootstrap {
            let placeholder = MemberId {
                addr: *addr,
                site_id: [0; 16],
                incarnation: 0,
            };
            if let Err(e) = self.foca.announce(placeholder, &mut fx) {
                tracing::debug!(peer = %addr, error = %e, "announce to bootstrap peer {addr} failed");
            }
        }
        fx
    }

    /// Declares ourselves down to a few members so the cluster learns at once.
    pub fn leave(&mut self) -> Effects {
        let mut fx = Effects::default();
        if let Err(e) = self.foca.leave_cluster(&mut fx) {
            tracing::debug!(error = %e, "leaving the cluster");
        }
        fx
    }

    /// Active members other than us, minus any claiming our site id (a copied database
    /// file): those are logged once per peer at ERROR and never synced with.
    pub fn alive_peers(&mut self) -> Vec<MemberId> {
        let me = self.foca.identity().clone();
        let mut out = Vec::new();
        for m in self.foca.iter_members() {
            let id = m.id();
            if id.addr == me.addr {
                continue;
            }
            if id.site_id == me.site_id {
                if self.duplicates_logged.insert(id.addr) {
                    tracing::error!(
                        peer = %id.addr,
                        site_id = %hex::encode(me.site_id),
                        "peer {} claims this node's site id {}; a database file was copied? refusing it",
                        id.addr,
                        hex::encode(me.site_id)
                    );
                }
                continue;
            }
            out.push(id.clone());
        }
        out.sort_by_key(|m| m.addr);
        out
    }

    /// Every member foca remembers (down ones until it forgets them), without us.
    pub fn members(&self) -> Vec<(MemberId, State)> {
        let me = self.foca.identity().addr;
        let mut out: Vec<_> = self
            .foca
            .iter_membership_state()
            .filter(|m| m.id().addr != me)
            .map(|m: &Member<MemberId>| (m.id().clone(), m.state()))
            .collect();
        out.sort_by_key(|(m, _)| m.addr);
        out
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn id(port: u16, site: u8, inc: u64) -> MemberId {
        MemberId {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            site_id: [site; 16],
            incarnation: inc,
        }
    }

    /// Delivers every packet between two cores until both are quiet (timers ignored).
    fn pump(a: &mut Core, b: &mut Core, mut fx: Effects, from_a: bool) {
        let mut queue: Vec<(bool, Vec<u8>)> =
            fx.sends.drain(..).map(|(_, d)| (!from_a, d)).collect();
        while let Some((to_a, data)) = queue.pop() {
            let (core, from) = if to_a {
                (&mut *a, b.identity().addr)
            } else {
                (&mut *b, a.identity().addr)
            };
            let out = core.handle_data(from, &data);
            queue.extend(out.sends.into_iter().map(|(_, d)| (!to_a, d)));
        }
    }

    #[test]
    fn renew_bumps_incarnation_and_later_life_wins() {
        let old = id(1, 1, 5);
        let new = old.renew().unwrap();
        assert_eq!(new.incarnation, 6);
        assert_eq!(new.addr, old.addr);
        assert!(new.win_addr_conflict(&old));
        assert!(!old.win_addr_conflict(&new));
    }

    #[test]
    fn bootstrap_announces_until_a_member_is_known() {
        let mut a = Core::new(id(1, 1, 0), vec![], 1);
        let mut b = Core::new(id(2, 2, 0), vec![id(2, 2, 0).addr, id(1, 1, 0).addr], 2);
        let fx = b.bootstrap_tick();
        assert_eq!(
            fx.sends.len(),
            1,
            "announces to the bootstrap peer only, never itself"
        );
        pump(&mut a, &mut b, fx, false);
        assert_eq!(a.alive_peers(), vec![id(2, 2, 0)]);
        assert_eq!(b.alive_peers(), vec![id(1, 1, 0)]);
        assert!(
            b.bootstrap_tick().sends.is_empty(),
            "no announce once joined"
        );
    }

    #[test]
    fn peer_with_our_site_id_is_excluded() {
        let mut a = Core::new(id(1, 7, 0), vec![], 1);
        let mut copy = Core::new(id(2, 7, 0), vec![id(1, 7, 0).addr], 2);
        let fx = copy.bootstrap_tick();
        pump(&mut a, &mut copy, fx, false);
        assert_eq!(a.members().len(), 1, "foca knows it");
        assert!(a.alive_peers().is_empty(), "but it is never a sync peer");
        assert!(a.alive_peers().is_empty());
    }

    #[test]
    fn config_follows_the_size_and_stays_wan_safe() {
        let secs = |n: usize| config_for(n).suspect_to_down_after.as_secs_f64();
        let tx = |n: usize| config_for(n).max_transmissions.get();
        for n in [0, 1, 2, 10, 50, 100, 800, 1000, 100_000] {
            let c = config_for(n);
            assert_eq!(
                c.probe_period, PROBE_PERIOD,
                "{n}: fixed, foca cannot change it"
            );
            assert_eq!(c.probe_rtt, PROBE_RTT, "{n}");
            assert!(
                c.probe_rtt >= Duration::from_millis(900),
                "3 × a 300 ms RTT"
            );
            assert!(
                c.probe_period >= c.probe_rtt * 3,
                "{n}: room for the indirect cycle"
            );
            assert!((SUSPECT_MIN..=SUSPECT_MAX).contains(&c.suspect_to_down_after));
            // Detecting a silent death: until someone probes it, the failed probe, the
            // suspicion, and 3 s of gossip — within 30 s at any size.
            let worst = c.probe_period * 2 + c.suspect_to_down_after + Duration::from_secs(3);
            assert!(worst <= Duration::from_secs(30), "{n}: {worst:?}");
            assert!(c.max_packet_size.get() <= MAX_PACKET);
            assert!(c.notify_down_members, "lets a wrongly-downed member rejoin");
            assert!(
                c.periodic_announce_to_down_members.is_some(),
                "heals partitions"
            );
            // Re-deriving must always be allowed by foca.
            let mut f = Foca::new(
                id(1, 1, 1),
                config_for(1),
                StdRng::seed_from_u64(1),
                PostcardCodec,
            );
            assert!(f.set_config(c).is_ok(), "{n}");
        }
        assert_eq!(secs(10), 6.0);
        assert!((secs(50) - 10.19).abs() < 0.01, "{}", secs(50));
        assert!((secs(800) - 17.42).abs() < 0.01, "{}", secs(800));
        assert_eq!(secs(1000), 18.0);
        assert_eq!(
            (tx(1), tx(9), tx(50), tx(99), tx(800), tx(1000)),
            (6, 6, 9, 9, 12, 15)
        );
        for n in 1..2000 {
            assert!(
                secs(n + 1) >= secs(n) && tx(n + 1) >= tx(n),
                "monotonic at {n}"
            );
        }
    }

    #[test]
    fn core_rederives_its_config_as_the_cluster_grows() {
        let mut a = Core::new(id(1, 1, 0), vec![], 1);
        assert_eq!(a.live(), 1);
        assert_eq!(a.config().suspect_to_down_after, SUSPECT_MIN);
        // 20 members join through a; each announce is handled as a packet.
        for i in 2..=20u16 {
            let mut b = Core::new(id(i, i as u8, 0), vec![id(1, 1, 0).addr], u64::from(i));
            let fx = b.bootstrap_tick();
            pump(&mut a, &mut b, fx, false);
        }
        assert_eq!(a.live(), 20);
        let want = config_for(20);
        assert_eq!(a.config().suspect_to_down_after, want.suspect_to_down_after);
        assert!(a.config().suspect_to_down_after > SUSPECT_MIN);
        assert_eq!(a.config().max_transmissions, want.max_transmissions);
    }
}
