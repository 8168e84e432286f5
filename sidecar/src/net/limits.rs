//! Memory limits of the QUIC side (issue 7, item 6): what any set of peers — also ones
//! that never finish a frame — can make this node hold.
//!
//! 30 unauthenticated connections each sending one unfinished 60 MB frame used to push a
//! node to 2 GB RSS: every stream was read into its own growing buffer, with no cap but
//! the 64 MiB frame limit and none across streams or connections. Now, layer by layer:
//!
//! | limit | value | bounds |
//! |---|---|---|
//! | frame size ([`super::DEFAULT_MAX_FRAME`]) | 16 MiB | one frame; refused at its length prefix, before any body |
//! | QUIC stream receive window | 1 MiB | unread bytes quinn holds per stream |
//! | QUIC connection receive window | 2 MiB | unread bytes quinn holds per connection, all streams |
//! | concurrent streams per connection | 16 uni, 8 bidi | streams a peer may open at once |
//! | frame bodies per connection | one frame size (16 MiB) | large frames one connection buffers at once |
//! | frame bodies node-wide ([`LARGE_BUDGET`]) | 32 MiB | large frames all connections buffer at once |
//! | small frames node-wide ([`SMALL_BUDGET`]) | 4 MiB for frames ≤ 64 KiB | membership and pulls never wait behind large frames |
//! | incoming connections ([`MAX_CONNECTIONS`]) | 128 | connections peers opened to us; more are refused |
//! | handshakes in progress ([`MAX_HANDSHAKES`]) | 16 | more are refused |
//! | frame deadline ([`FRAME_DEADLINE`]) | 60 s | a frame (waiting for budget included) not complete by then is refused |
//!
//! A frame body is read only after its bytes are reserved from the per-connection and
//! node-wide budgets, into a buffer of exactly the announced size; the reservation
//! travels with the payload ([`FramePermit`] in `Incoming`) until the receiver has taken
//! it, so a busy receiver pushes back through QUIC flow control instead of queueing
//! frames in memory. A frame waiting for budget is not read, so the peer's data stays
//! bounded by the receive windows. Worst case, bytes held for peers:
//! `MAX_CONNECTIONS × 2 MiB + 32 MiB + 4 MiB` — the window term only with 128 hostile
//! connections; 30 connections: about 96 MiB.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Frames up to this size draw on [`SMALL_BUDGET`] instead of the large-frame budgets.
pub const SMALL_FRAME: usize = 64 * 1024;
/// Node-wide bytes of small frames buffered at once.
pub const SMALL_BUDGET: usize = 4 * 1024 * 1024;
/// Node-wide bytes of large frames buffered at once (never below the frame limit).
pub const LARGE_BUDGET: usize = 32 * 1024 * 1024;
/// Unread bytes quinn buffers per stream (QUIC stream flow control).
pub const STREAM_WINDOW: u32 = 1024 * 1024;
/// Unread bytes quinn buffers per connection, all streams together.
pub const CONNECTION_WINDOW: u32 = 2 * 1024 * 1024;
/// Uni streams a peer may have open at once.
pub const MAX_UNI_STREAMS: u32 = 16;
/// Bidi streams a peer may have open at once.
pub const MAX_BIDI_STREAMS: u32 = 8;
/// Connections peers opened to this node, at once; more are refused.
pub const MAX_CONNECTIONS: usize = 128;
/// Handshakes in progress at once; more are refused.
pub const MAX_HANDSHAKES: usize = 16;
/// A frame must be complete within this long after its stream opened.
pub const FRAME_DEADLINE: Duration = Duration::from_secs(60);

/// The node-wide frame budgets, shared by all connections.
#[derive(Debug)]
pub(super) struct Budgets {
    small: Arc<Semaphore>,
    large: Arc<Semaphore>,
    large_total: usize,
}

impl Budgets {
    pub(super) fn new(max_frame: usize) -> Budgets {
        let large_total = LARGE_BUDGET.max(max_frame);
        Budgets {
            small: Arc::new(Semaphore::new(SMALL_BUDGET)),
            large: Arc::new(Semaphore::new(large_total)),
            large_total,
        }
    }

    /// Bytes of large frames buffered right now (for tests and metrics).
    pub(super) fn large_in_use(&self) -> usize {
        self.large_total - self.large.available_permits()
    }

    /// Reserves `len` bytes for one frame body: from the small pool, or from the
    /// connection's own budget and then the node-wide one. Waits while they are in use.
    pub(super) async fn reserve(&self, conn: &Arc<Semaphore>, len: usize) -> FramePermit {
        // `len` is at most the frame limit, which fits u32 (the length prefix is a u32).
        let n = u32::try_from(len).unwrap_or(u32::MAX);
        let mut permits = Vec::with_capacity(2);
        if len <= SMALL_FRAME {
            if let Ok(p) = self.small.clone().acquire_many_owned(n).await {
                permits.push(p);
            }
        } else {
            if let Ok(p) = conn.clone().acquire_many_owned(n).await {
                permits.push(p);
            }
            if let Ok(p) = self.large.clone().acquire_many_owned(n).await {
                permits.push(p);
            }
        }
        FramePermit { _permits: permits }
    }
}

/// The per-connection budget of large frame bodies: one frame's worth.
pub(super) fn connection_budget(max_frame: usize) -> Arc<Semaphore> {
    Arc::new(Semaphore::new(max_frame.max(SMALL_FRAME)))
}

/// Bytes reserved for a received frame; released when dropped (once the receiver has
/// decoded the payload).
#[derive(Debug, Default)]
pub struct FramePermit {
    _permits: Vec<OwnedSemaphorePermit>,
}

/// The QUIC transport limits of the table above, on top of `base`.
pub(super) fn apply_transport_limits(t: &mut quinn::TransportConfig) {
    t.max_concurrent_uni_streams(MAX_UNI_STREAMS.into());
    t.max_concurrent_bidi_streams(MAX_BIDI_STREAMS.into());
    t.stream_receive_window(STREAM_WINDOW.into());
    t.receive_window(CONNECTION_WINDOW.into());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn large_frames_wait_for_the_node_budget_small_ones_do_not() {
        let b = Budgets::new(16 << 20);
        let conns: Vec<Arc<Semaphore>> = (0..3).map(|_| connection_budget(16 << 20)).collect();
        let p1 = b.reserve(&conns[0], 16 << 20).await;
        let p2 = b.reserve(&conns[1], 16 << 20).await;
        assert_eq!(b.large_in_use(), 32 << 20);
        // A third connection's large frame waits; a small frame does not.
        let third = b.reserve(&conns[2], 1 << 20);
        tokio::pin!(third);
        assert!(futures_poll_once(third.as_mut()).await.is_none());
        let small = b.reserve(&conns[2], 100).await;
        drop(p1);
        let p3 = third.await;
        assert_eq!(b.large_in_use(), (16 << 20) + (1 << 20));
        // One connection cannot hold more than one frame's worth.
        let same = b.reserve(&conns[1], 1 << 20);
        tokio::pin!(same);
        assert!(futures_poll_once(same.as_mut()).await.is_none());
        drop((p2, p3, small));
        let _ = same.await;
    }

    /// Polls a future once: `Some` if it completed.
    async fn futures_poll_once<F: std::future::Future + Unpin>(f: F) -> Option<F::Output> {
        tokio::time::timeout(Duration::from_millis(0), f).await.ok()
    }
}
