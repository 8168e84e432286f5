//! The membership core without I/O: foca plus our identity, effects collected into Vecs.
//!
//! The caller feeds it packets, fired timers and bootstrap ticks, and carries out what
//! comes back ([`Effects`]: packets to send, timers to schedule, notifications). No clock,
//! no socket, randomness seeded by the caller — so tests run many instances under
//! virtual time (see `sim.rs`).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::time::Duration;

use foca::{
    Config, Foca, Identity, Member, NoCustomBroadcast, Notification, OwnedNotification,
    PostcardCodec, Runtime, State, Timer,
};
use rand_foca::rngs::StdRng;
use rand_foca::SeedableRng;

/// Largest SWIM packet: fits one QUIC datagram at the minimum path MTU (1200) after QUIC
/// and envelope overhead, so SWIM rarely needs the stream fallback.
pub const MAX_PACKET: usize = 1100;

/// Cluster size foca tunes transmissions and suspicion timeouts for.
const CLUSTER_SIZE_HINT: u32 = 16;

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
    bootstrap: Vec<SocketAddr>,
    /// Peers already reported for claiming our site id (log once per peer).
    duplicates_logged: HashSet<SocketAddr>,
}

/// foca's LAN defaults (memberlist's), with packets sized for QUIC datagrams.
pub fn config() -> Config {
    let mut c = Config::new_lan(NonZeroU32::new(CLUSTER_SIZE_HINT).unwrap_or(NonZeroU32::MIN));
    c.max_packet_size = NonZeroUsize::new(MAX_PACKET).unwrap_or(NonZeroUsize::MIN);
    c
}

impl Core {
    /// `bootstrap` is announced to (see [`Core::bootstrap_tick`]); our own address in it
    /// is ignored.
    pub fn new(me: MemberId, bootstrap: Vec<SocketAddr>, config: Config, seed: u64) -> Core {
        let bootstrap = bootstrap.into_iter().filter(|a| *a != me.addr).collect();
        Core {
            foca: Foca::new(me, config, StdRng::seed_from_u64(seed), PostcardCodec),
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
        if let Err(e) = self.foca.handle_data(data, &mut fx) {
            tracing::debug!(peer = %from, error = %e, "SWIM packet from peer {from} not handled");
        }
        fx
    }

    /// A timer scheduled earlier has fired.
    pub fn handle_timer(&mut self, timer: Timer<MemberId>) -> Effects {
        let mut fx = Effects::default();
        if let Err(e) = self.foca.handle_timer(timer, &mut fx) {
            tracing::debug!(error = %e, "SWIM timer not handled");
        }
        fx
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
        let mut a = Core::new(id(1, 1, 0), vec![], config(), 1);
        let mut b = Core::new(
            id(2, 2, 0),
            vec![id(2, 2, 0).addr, id(1, 1, 0).addr],
            config(),
            2,
        );
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
        let mut a = Core::new(id(1, 7, 0), vec![], config(), 1);
        let mut copy = Core::new(id(2, 7, 0), vec![id(1, 7, 0).addr], config(), 2);
        let fx = copy.bootstrap_tick();
        pump(&mut a, &mut copy, fx, false);
        assert_eq!(a.members().len(), 1, "foca knows it");
        assert!(a.alive_peers().is_empty(), "but it is never a sync peer");
        assert!(a.alive_peers().is_empty());
    }
}
