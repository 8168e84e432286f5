//! Fixtures shared by the sync unit tests: a seeded machine, peer addresses and the
//! identities they present, and the effects a step produced.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use rand::SeedableRng;

use super::{Effect, Held, Replicator, SyncConfig};

/// A loopback peer address on port `p`.
pub fn addr(p: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], p))
}

/// The identity an insecure peer on port `p` presents (its address).
pub fn ident(p: u16) -> String {
    format!("address {}", addr(p))
}

/// A machine with site id `[site; 16]`, default config and a fixed seed, as if a peer's
/// summary had already been checked (`Replicator::assume_vetted`).
pub fn machine(site: u8) -> Replicator {
    let mut m = fresh_machine(site);
    m.assume_vetted();
    m
}

/// The same machine as it starts: it takes nothing from peers before a summary.
pub fn fresh_machine(site: u8) -> Replicator {
    Replicator::new(
        [site; 16],
        SyncConfig::default(),
        HashMap::new(),
        Held::default(),
        rand::rngs::StdRng::seed_from_u64(1),
        Duration::ZERO,
    )
}

/// Effects other than `Bind` (tested on their own).
pub fn drain(s: &mut Replicator) -> Vec<Effect> {
    std::iter::from_fn(|| s.poll_effect())
        .filter(|e| !matches!(e, Effect::Bind { .. }))
        .collect()
}
