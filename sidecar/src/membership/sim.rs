//! Deterministic simulation of several membership cores: virtual time, a priority queue
//! of events, seeded latency, `kill` (silent death) and `leave` controls. Many seeds; the
//! seed is printed on failure.

#![allow(clippy::unwrap_used)]

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::time::Duration;

use foca::Timer;
use rand::{Rng, SeedableRng};

use super::swim::{Core, Effects, MemberId};

enum Event {
    Deliver {
        to: usize,
        from: SocketAddr,
        data: Vec<u8>,
    },
    Timer {
        node: usize,
        timer: Timer<MemberId>,
    },
    Bootstrap {
        node: usize,
    },
}

struct Network {
    nodes: Vec<Core>,
    /// false: killed (processes nothing, timers included).
    up: Vec<bool>,
    /// true: partitioned (its packets in and out are lost; its timers still run).
    cut: Vec<bool>,
    by_addr: HashMap<SocketAddr, usize>,
    now: Duration,
    seq: u64,
    queue: BinaryHeap<Reverse<(Duration, u64)>>,
    events: HashMap<u64, Event>,
    rng: rand::rngs::StdRng,
}

const BOOTSTRAP_EVERY: Duration = Duration::from_secs(1);

fn addr(i: usize) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7000 + i as u16))
}

impl Network {
    /// `n` nodes; every node but the first bootstraps from node 0.
    fn new(n: usize, seed: u64) -> Network {
        let mut net = Network {
            nodes: Vec::new(),
            up: vec![true; n],
            cut: vec![false; n],
            by_addr: HashMap::new(),
            now: Duration::ZERO,
            seq: 0,
            queue: BinaryHeap::new(),
            events: HashMap::new(),
            rng: rand::rngs::StdRng::seed_from_u64(seed),
        };
        for i in 0..n {
            let me = MemberId {
                addr: addr(i),
                site_id: [i as u8 + 1; 16],
                incarnation: 1,
            };
            let bootstrap = if i == 0 { vec![] } else { vec![addr(0)] };
            net.nodes
                .push(Core::new(me, bootstrap, seed.wrapping_add(i as u64)));
            net.by_addr.insert(addr(i), i);
            net.push(
                Duration::from_millis(i as u64 * 7),
                Event::Bootstrap { node: i },
            );
        }
        net
    }

    fn push(&mut self, after: Duration, ev: Event) {
        self.seq += 1;
        self.queue.push(Reverse((self.now + after, self.seq)));
        self.events.insert(self.seq, ev);
    }

    fn apply(&mut self, node: usize, fx: Effects) {
        let from = addr(node);
        for (to, data) in fx.sends {
            let Some(&to) = self.by_addr.get(&to) else {
                continue;
            };
            let latency = Duration::from_micros(self.rng.gen_range(200..5_000));
            self.push(latency, Event::Deliver { to, from, data });
        }
        for (after, timer) in fx.timers {
            self.push(after, Event::Timer { node, timer });
        }
    }

    fn run_for(&mut self, d: Duration) {
        let until = self.now + d;
        while let Some(Reverse((at, seq))) = self.queue.peek().copied() {
            if at > until {
                break;
            }
            self.queue.pop();
            self.now = at;
            let Some(ev) = self.events.remove(&seq) else {
                continue;
            };
            let (node, fx) = match ev {
                Event::Deliver { to, from, data } => {
                    let sender = self.by_addr.get(&from).copied().unwrap_or(to);
                    if !self.up[to] || self.cut[to] || self.cut[sender] {
                        continue;
                    }
                    (to, self.nodes[to].handle_data(from, &data))
                }
                Event::Timer { node, timer } => {
                    if !self.up[node] {
                        continue;
                    }
                    (node, self.nodes[node].handle_timer(timer))
                }
                Event::Bootstrap { node } => {
                    if !self.up[node] {
                        continue;
                    }
                    self.push(BOOTSTRAP_EVERY, Event::Bootstrap { node });
                    (node, self.nodes[node].bootstrap_tick())
                }
            };
            self.apply(node, fx);
        }
        self.now = until;
    }

    /// Silent death: the node stops processing and answering.
    fn kill(&mut self, i: usize) {
        self.up[i] = false;
    }

    fn leave(&mut self, i: usize) {
        let fx = self.nodes[i].leave();
        self.apply(i, fx);
        self.up[i] = false;
    }

    fn peers_of(&mut self, i: usize) -> Vec<SocketAddr> {
        self.nodes[i]
            .alive_peers()
            .into_iter()
            .map(|m| m.addr)
            .collect()
    }

    fn assert_views(&mut self, seed: u64, expected: &[usize], phase: &str) {
        for &i in expected {
            let want: Vec<_> = expected
                .iter()
                .filter(|&&j| j != i)
                .map(|&j| addr(j))
                .collect();
            let got = self.peers_of(i);
            assert_eq!(got, want, "seed {seed}, {phase}: node {i} sees {got:?}");
        }
    }
}

#[test]
fn converge_detect_death_and_see_leave() {
    for seed in 0..20u64 {
        let n = 3 + (seed % 3) as usize; // 3 to 5 nodes
        let mut net = Network::new(n, seed);
        let all: Vec<usize> = (0..n).collect();
        net.run_for(Duration::from_secs(15));
        net.assert_views(seed, &all, "after join");

        // The last node dies silently: SWIM must notice on its own.
        net.kill(n - 1);
        net.run_for(Duration::from_secs(60));
        let rest: Vec<usize> = (0..n - 1).collect();
        net.assert_views(seed, &rest, "after a silent death");

        // The next one leaves politely: the others drop it within a few seconds.
        net.leave(n - 2);
        net.run_for(Duration::from_secs(3));
        let rest: Vec<usize> = (0..n - 2).collect();
        net.assert_views(seed, &rest, "after a leave");
    }
}

#[test]
fn partitioned_node_rejoins_after_healing() {
    let seed = 42;
    let mut net = Network::new(3, seed);
    net.run_for(Duration::from_secs(10));
    net.assert_views(seed, &[0, 1, 2], "after join");
    // Node 2 is cut off long enough to be declared down, then the partition heals: it
    // learns it was declared down, renews its identity (a bumped incarnation) and the
    // cluster takes it back.
    net.cut[2] = true;
    net.run_for(Duration::from_secs(60));
    net.assert_views(seed, &[0, 1], "during the partition");
    assert!(net.peers_of(2).is_empty(), "the cut-off node sees nobody");
    net.cut[2] = false;
    net.run_for(Duration::from_secs(120));
    assert!(
        net.nodes[2].identity().incarnation > 1,
        "rejoined with a fresh identity"
    );
    net.assert_views(seed, &[0, 1, 2], "after healing");
}

#[test]
fn restarted_node_replaces_its_old_identity() {
    for seed in 0..10u64 {
        let mut net = Network::new(3, seed);
        net.run_for(Duration::from_secs(10));
        net.assert_views(seed, &[0, 1, 2], "after join");
        // Node 2 crashes and restarts at once (before anyone notices) with a fresh
        // foca and a larger incarnation, as the agent does on start.
        let me = MemberId {
            addr: addr(2),
            site_id: [3; 16],
            incarnation: 2,
        };
        net.events.retain(|_, e| {
            !matches!(
                e,
                Event::Timer { node: 2, .. } | Event::Bootstrap { node: 2 }
            )
        });
        net.nodes[2] = Core::new(me.clone(), vec![addr(0)], seed + 100);
        net.push(Duration::ZERO, Event::Bootstrap { node: 2 });
        net.run_for(Duration::from_secs(30));
        net.assert_views(seed, &[0, 1, 2], "after the restart");
        for i in 0..2 {
            let ids = net.nodes[i].alive_peers();
            assert!(
                ids.contains(&me),
                "seed {seed}: node {i} still has the old life: {ids:?}"
            );
        }
    }
}

#[test]
fn a_short_partition_declares_nobody_down() {
    for seed in 0..10u64 {
        let n = 6;
        let mut net = Network::new(n, seed);
        let all: Vec<usize> = (0..n).collect();
        net.run_for(Duration::from_secs(15));
        net.assert_views(seed, &all, "after join");
        // Cut for less than a probe period plus the suspicion: others suspect the node,
        // it refutes once healed, and their suspicion timers must then come to nothing.
        net.cut[n - 1] = true;
        net.run_for(Duration::from_secs(5));
        net.cut[n - 1] = false;
        net.run_for(Duration::from_secs(40));
        net.assert_views(seed, &all, "after healing");
        for (i, node) in net.nodes.iter().enumerate() {
            assert_eq!(
                node.identity().incarnation,
                1,
                "seed {seed}: node {i} was told it was down and rejoined"
            );
        }
    }
}
