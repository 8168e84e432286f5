//! Idle connections: when a cached connection counts as unused, and the reaper closing it.
//!
//! QUIC keep-alives (`tls.rs`) keep every connection open for as long as both ends live,
//! so without a reaper a node would hold a connection to every peer it ever spoke to —
//! N² connections in an N-node cluster, since SWIM probes everyone in turn. The reaper
//! closes a cached connection once neither sync nor SWIM used it for a while; the next
//! send dials again (one more round trip, which SWIM's probe timeout allows for).
//!
//! SWIM-only use keeps a connection for a shorter time than sync use: a probe touches one
//! random peer per probe period, so what SWIM keeps open is bounded by its rate
//! (about 2 × [`SWIM_IDLE`] / probe period connections), not by the cluster size.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Mutex, Weak};
use std::time::Duration;

use tokio::time::Instant;

use super::{Channel, Inner};

/// A connection no sync message used for this long may be closed.
pub const DATA_IDLE: Duration = Duration::from_secs(60);
/// ... if SWIM did not use it for this long either. Longer than a probe cycle (probe,
/// indirect probes, acks) so that no exchange in flight loses its connection.
pub const SWIM_IDLE: Duration = Duration::from_secs(20);
/// How often the reaper looks.
const REAP_EVERY: Duration = Duration::from_secs(5);
/// Application close code of a reaped connection (the peer logs it at debug).
const CODE_IDLE: u32 = 0;

/// When a peer's connection was last used, by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stamps {
    /// Sync traffic (messages, requests, replies), either direction.
    pub data: Option<Instant>,
    /// SWIM packets either direction, and the connection's opening.
    pub swim: Option<Instant>,
}

impl Stamps {
    /// Whether a connection last used as `self` says may be closed at `now`.
    pub fn is_idle(&self, now: Instant) -> bool {
        let quiet = |t: Option<Instant>, window: Duration| match t {
            None => true,
            Some(t) => now.saturating_duration_since(t) >= window,
        };
        quiet(self.data, DATA_IDLE) && quiet(self.swim, SWIM_IDLE)
    }
}

/// Usage stamps per peer address (the key of the connection cache).
#[derive(Default)]
pub struct Usage(Mutex<HashMap<SocketAddr, Stamps>>);

impl Usage {
    /// Records use of the connection to `peer` now.
    pub fn touch(&self, peer: SocketAddr, channel: Channel) {
        let now = Instant::now();
        let Ok(mut map) = self.0.lock() else { return };
        let stamps = map.entry(peer).or_default();
        match channel {
            Channel::Sync => stamps.data = Some(now),
            Channel::Swim => stamps.swim = Some(now),
        }
    }

    fn stamps(&self, peer: SocketAddr) -> Stamps {
        match self.0.lock() {
            Ok(map) => map.get(&peer).copied().unwrap_or_default(),
            // Poisoned: never reap on a guess.
            Err(_) => Stamps {
                data: Some(Instant::now()),
                swim: None,
            },
        }
    }
}

/// Closes idle cached connections every [`REAP_EVERY`] until the transport is closed or
/// dropped.
pub(super) async fn reap(inner: Weak<Inner>) {
    let mut tick = tokio::time::interval(REAP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        if inner.closed.load(Ordering::SeqCst) {
            return;
        }
        let closed = reap_once(&inner, Instant::now());
        if closed > 0 {
            tracing::debug!(
                closed,
                open = inner.open_connections.load(Ordering::Relaxed),
                "closed {closed} idle peer connections"
            );
        }
    }
}

/// One pass of the reaper; returns how many connections it closed. A slot that is busy
/// (being dialed or checked right now) is in use and left alone.
fn reap_once(inner: &Inner, now: Instant) -> usize {
    let slots: Vec<_> = match inner.conns.lock() {
        Ok(map) => map.iter().map(|(a, s)| (*a, s.clone())).collect(),
        Err(_) => return 0,
    };
    let mut closed = 0;
    for (addr, slot) in slots {
        if !inner.usage.stamps(addr).is_idle(now) {
            continue;
        }
        let Ok(mut guard) = slot.try_lock() else {
            continue;
        };
        if let Some(conn) = guard.take() {
            if conn.close_reason().is_none() {
                conn.close(CODE_IDLE.into(), b"idle");
                closed += 1;
            }
        }
    }
    closed
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::net::{NetConfig, Transport, DEFAULT_MAX_FRAME};

    fn cfg() -> NetConfig {
        NetConfig {
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            cluster_id: 1,
            tls: None,
            max_frame_bytes: DEFAULT_MAX_FRAME,
        }
    }

    async fn wait_for(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn the_reaper_closes_only_idle_connections() {
        let (a, _rx_a) = Transport::bind(cfg()).await.unwrap();
        let (b, _rx_b) = Transport::bind(cfg()).await.unwrap();
        a.send_datagram(b.local_addr(), vec![1]).await.unwrap();
        wait_for("the connection on both ends", || {
            a.peer_connections() == 1 && b.peer_connections() == 1
        })
        .await;
        assert_eq!(reap_once(&a.inner, Instant::now()), 0, "just used");
        assert_eq!(
            reap_once(&a.inner, Instant::now() + SWIM_IDLE),
            1,
            "used by SWIM only, 20 s ago"
        );
        wait_for("both ends to see it closed", || {
            a.peer_connections() == 0 && b.peer_connections() == 0
        })
        .await;
        // The next send dials again.
        a.send(b.local_addr(), Channel::Sync, vec![2])
            .await
            .unwrap();
        wait_for("a new connection", || a.peer_connections() == 1).await;
        let later = Instant::now() + SWIM_IDLE;
        assert_eq!(reap_once(&a.inner, later), 0, "sync used it: kept 60 s");
        assert_eq!(reap_once(&a.inner, later + DATA_IDLE), 1);
    }

    #[test]
    fn idle_only_when_both_kinds_of_use_are_old() {
        let t0 = Instant::now();
        let s = |data: Option<u64>, swim: Option<u64>| Stamps {
            data: data.map(|s| t0 + Duration::from_secs(s)),
            swim: swim.map(|s| t0 + Duration::from_secs(s)),
        };
        let at = |secs: u64| t0 + Duration::from_secs(secs);
        assert!(s(None, None).is_idle(at(0)), "never used");
        assert!(!s(None, Some(0)).is_idle(at(19)), "SWIM keeps it 20 s");
        assert!(s(None, Some(0)).is_idle(at(20)));
        assert!(!s(Some(0), None).is_idle(at(59)), "sync keeps it 60 s");
        assert!(s(Some(0), None).is_idle(at(60)));
        assert!(!s(Some(0), Some(50)).is_idle(at(65)), "recent SWIM use");
        assert!(!s(Some(50), Some(0)).is_idle(at(65)), "recent sync use");
        assert!(s(Some(0), Some(10)).is_idle(at(60)));
        assert!(
            !s(Some(100), None).is_idle(at(0)),
            "a stamp after now is recent"
        );
    }
}
