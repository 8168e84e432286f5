//! SWIM membership (foca) over the QUIC transport's datagrams.
//!
//! # Layout
//! - `mod.rs`  — [`Membership`], the handle, and the driver task that owns the timers.
//! - `swim.rs` — [`MemberId`], the timings derived from the live count ([`config_for`]) and
//!   the I/O-free core around foca (effects into Vecs).
//! - `sim.rs`  — tests: many cores under virtual time (join, silent death, leave, partition).
//!
//! SWIM packets go from the transport straight to the driver ([`Transport::route_swim`]),
//! never through the sync driver nor behind the apply queue, and the driver runs on a
//! thread of its own, so neither sync work nor a busy runtime delays probes, acks or
//! timers. It answers through `Transport::send_datagram`, each send in its own task (a
//! peer being dialed delays nobody else). Sync reads [`Membership::alive_peers`] or
//! [`Membership::watch`]; `GET /v1/members` reads [`Membership::members`].

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use foca::{OwnedNotification, State, Timer};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::net::{SwimPacket, Transport};
use crate::node::MemberInfo;

#[cfg(test)]
mod sim;
mod swim;

pub use self::swim::{config_for, Core, Effects, MemberId, MAX_PACKET};

/// While no member is known, announce to the bootstrap list this often.
const BOOTSTRAP_EVERY: Duration = Duration::from_secs(1);
/// Upper bound on a graceful leave.
const LEAVE_WAIT: Duration = Duration::from_millis(900);
/// Inbound SWIM packets waiting for the driver; beyond this they are dropped (SWIM is
/// loss-tolerant by design, and this only happens when the driver is far behind).
const INBOX_DEPTH: usize = 1024;

enum Cmd {
    Leave(oneshot::Sender<()>),
}

/// Handle to the running membership. Cheap to clone.
#[derive(Clone)]
pub struct Membership {
    cmds: mpsc::Sender<Cmd>,
    alive: watch::Receiver<Vec<MemberId>>,
    members: Arc<RwLock<Vec<(MemberId, State)>>>,
    transport: Transport,
}

impl Membership {
    /// Starts the foca driver on a thread of its own (a current-thread runtime) and routes
    /// the transport's SWIM packets to it. It owns the timers and sends through
    /// `transport.send_datagram`. `me.incarnation` should grow across restarts (e.g. start
    /// time in ms) so a restarted node is a fresh identity. The thread ends once every
    /// handle is dropped or after [`Membership::leave`].
    pub fn start(
        transport: Transport,
        me: MemberId,
        bootstrap: Vec<SocketAddr>,
    ) -> Result<Membership, std::io::Error> {
        let (cmds, inbox) = mpsc::channel(1);
        let (packets_tx, packets) = mpsc::channel(INBOX_DEPTH);
        if !transport.route_swim(packets_tx) {
            return Err(std::io::Error::other(
                "SWIM packets of this transport are routed to another membership already",
            ));
        }
        let (alive_tx, alive) = watch::channel(Vec::new());
        let members = Arc::new(RwLock::new(Vec::new()));
        let core = Core::new(me, bootstrap, rand::random());
        let driver = Driver {
            core,
            transport: transport.clone(),
            timers: BinaryHeap::new(),
            seq: 0,
            alive: alive_tx,
            members: members.clone(),
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name("membership".to_string())
            .spawn(move || runtime.block_on(driver.run(inbox, packets)))?;
        Ok(Membership {
            cmds,
            alive,
            members,
            transport,
        })
    }

    /// Alive peers (not including self, nor peers claiming our site id), for sync fan-out
    /// and anti-entropy.
    pub fn alive_peers(&self) -> Vec<MemberId> {
        self.alive.borrow().clone()
    }

    /// Changes whenever the alive set changes.
    pub fn watch(&self) -> watch::Receiver<Vec<MemberId>> {
        self.alive.clone()
    }

    /// For `GET /v1/members`: every member known (down ones until foca forgets them),
    /// with the QUIC round-trip time when a connection to it is open.
    pub fn members(&self) -> Vec<MemberInfo> {
        let members = match self.members.read() {
            Ok(m) => m.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        members
            .into_iter()
            .map(|(id, state)| MemberInfo {
                site_id: hex::encode(id.site_id),
                addr: id.addr.to_string(),
                state: match state {
                    State::Alive => "alive",
                    State::Suspect => "suspect",
                    State::Down => "down",
                }
                .to_string(),
                rtt_ms: self
                    .transport
                    .rtt(id.addr)
                    .map(|d| d.as_secs_f64() * 1000.0),
            })
            .collect()
    }

    /// Graceful leave (SIGTERM): tells a few peers we are going, waits at most ~1 s. The
    /// driver stops afterwards.
    pub async fn leave(&self) {
        let (tx, rx) = oneshot::channel();
        if self.cmds.send(Cmd::Leave(tx)).await.is_ok() {
            let _ = tokio::time::timeout(LEAVE_WAIT + Duration::from_millis(100), rx).await;
        }
    }
}

/// Owns the core and the timer queue; the only place foca is touched.
struct Driver {
    core: Core,
    transport: Transport,
    timers: BinaryHeap<Reverse<(Instant, u64, Timer<MemberId>)>>,
    seq: u64,
    alive: watch::Sender<Vec<MemberId>>,
    members: Arc<RwLock<Vec<(MemberId, State)>>>,
}

impl Driver {
    async fn run(
        mut self,
        mut inbox: mpsc::Receiver<Cmd>,
        mut packets: mpsc::Receiver<SwimPacket>,
    ) {
        let mut bootstrap = tokio::time::interval(BOOTSTRAP_EVERY);
        bootstrap.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let next_timer = self.timers.peek().map(|Reverse((at, _, _))| *at);
            let fx = tokio::select! {
                packet = packets.recv() => match packet {
                    Some(SwimPacket { from, payload }) => self.core.handle_data(from, &payload),
                    // The transport is gone.
                    None => return,
                },
                cmd = inbox.recv() => match cmd {
                    Some(Cmd::Leave(done)) => {
                        self.leave().await;
                        let _ = done.send(());
                        return;
                    }
                    // Every handle is gone: nobody can read the membership any more.
                    None => return,
                },
                _ = sleep_until(next_timer) => {
                    let mut fx = Effects::default();
                    let now = Instant::now();
                    while let Some(Reverse((at, _, _))) = self.timers.peek() {
                        if *at > now {
                            break;
                        }
                        let Some(Reverse((_, _, timer))) = self.timers.pop() else { break };
                        let more = self.core.handle_timer(timer);
                        merge(&mut fx, more);
                    }
                    fx
                },
                _ = bootstrap.tick() => self.core.bootstrap_tick(),
            };
            self.apply(fx);
        }
    }

    fn apply(&mut self, fx: Effects) {
        for (to, data) in fx.sends {
            let transport = self.transport.clone();
            // Spawned: dialing a dead peer must not stall the protocol.
            tokio::spawn(async move {
                if let Err(e) = transport.send_datagram(to, data).await {
                    tracing::debug!(peer = %to, error = %e, "SWIM send to peer {to} failed");
                }
            });
        }
        let now = Instant::now();
        for (after, timer) in fx.timers {
            self.seq += 1;
            self.timers.push(Reverse((now + after, self.seq, timer)));
        }
        for n in fx.notifications {
            log_notification(&n);
        }
        self.publish();
    }

    fn publish(&mut self) {
        let alive = self.core.alive_peers();
        self.alive.send_if_modified(|current| {
            if *current == alive {
                false
            } else {
                *current = alive;
                true
            }
        });
        let members = self.core.members();
        match self.members.write() {
            Ok(mut m) => *m = members,
            Err(poisoned) => *poisoned.into_inner() = members,
        }
    }

    async fn leave(&mut self) {
        let fx = self.core.leave();
        let sends = fx.sends.into_iter().map(|(to, data)| {
            let transport = self.transport.clone();
            async move { transport.send_datagram(to, data).await }
        });
        let all = futures_join_all(sends);
        if tokio::time::timeout(LEAVE_WAIT, all).await.is_err() {
            tracing::warn!("leave announcement not confirmed within {LEAVE_WAIT:?}");
        }
        tracing::info!("left the cluster");
    }
}

/// Awaits every future concurrently (no `futures` crate in the tree).
async fn futures_join_all<F: std::future::Future + Send + 'static>(futs: impl Iterator<Item = F>)
where
    F::Output: Send,
{
    let mut set = tokio::task::JoinSet::new();
    for f in futs {
        set.spawn(f);
    }
    while set.join_next().await.is_some() {}
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn merge(into: &mut Effects, from: Effects) {
    into.sends.extend(from.sends);
    into.timers.extend(from.timers);
    into.notifications.extend(from.notifications);
}

fn log_notification(n: &OwnedNotification<MemberId>) {
    match n {
        OwnedNotification::MemberUp(m) => {
            tracing::info!(peer = %m.addr, site_id = %hex::encode(m.site_id), "member {} is up", m.addr)
        }
        OwnedNotification::MemberDown(m) => {
            tracing::info!(peer = %m.addr, site_id = %hex::encode(m.site_id), "member {} is down", m.addr)
        }
        OwnedNotification::Rename(old, new) => tracing::info!(
            peer = %new.addr,
            "member {} restarted (incarnation {} -> {})",
            new.addr,
            old.incarnation,
            new.incarnation
        ),
        OwnedNotification::Active => tracing::info!("joined the cluster"),
        OwnedNotification::Idle => tracing::warn!("no other member is reachable"),
        OwnedNotification::Defunct => {
            tracing::error!("this node was declared down and cannot rejoin")
        }
        OwnedNotification::Rejoin(me) => {
            tracing::warn!(
                incarnation = me.incarnation,
                "declared down by the cluster; rejoined with a fresh identity"
            )
        }
        #[allow(unreachable_patterns)]
        _ => {}
    }
}
