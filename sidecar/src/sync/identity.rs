//! Which peer may speak for a site id (issue 7, item 5).
//!
//! A site id names a feed, and whoever speaks for it moves our cursor for that feed. It
//! used to be freed 30 s after its node was last seen, so any peer could take over the id
//! of a node that was down and push an empty unit `(0, 2^62]` past its real changes. Now
//! a site id is bound, once and for good, to the first peer identity that presents it —
//! the SHA-256 fingerprint of its TLS certificate with mutual TLS, its address when the
//! transport is unauthenticated — and the binding is stored in the database
//! (`patina_site_bindings`, see `db::bookkeeping`) so a restart keeps it. Anyone else
//! claiming that id is refused and logged with both identities.
//!
//! Moving a node to another certificate (or, unauthenticated, another address) therefore
//! needs an operator: give the node a fresh site id (`patina restore` does by default), or
//! delete its row from `patina_site_bindings` on each peer while that peer is stopped.
//! The fresh id is the way to prefer under mutual TLS: a snapshot carries its sender's
//! certificate bindings to the nodes it seeds (`db::seed`), so a row left on one peer
//! reaches every node that peer seeds until it is deleted there too.

use std::collections::HashMap;

use super::msg::SiteId;

/// How a certificate identity is spelled (`net::PeerIdentity`'s display): this prefix,
/// then the certificate's SHA-256 in lowercase hex.
pub const CERTIFICATE_PREFIX: &str = "certificate sha256:";

/// Whether a binding to `identity` means the same peer on every node, so a snapshot may
/// carry it to a joiner. A certificate fingerprint does; an address does not, since
/// another node may reach the same peer at another address (through NAT, or another
/// interface) and would then refuse it.
pub fn is_portable(identity: &str) -> bool {
    identity.strip_prefix(CERTIFICATE_PREFIX).is_some_and(|fp| {
        fp.len() == 64 && fp.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

/// Site ids one identity may hold. A node keeps its identity when it gets a fresh site id
/// (`patina restore`), so it may need a few over its life; a peer minting ids to fill
/// `patina_site_bindings` is refused past this.
pub const MAX_SITES_PER_IDENTITY: usize = 16;

/// What to do with a message that claims `site` from a peer presenting `identity`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The site id is bound to this identity: accept.
    Held,
    /// The site id was never seen: bind it to this identity (durably), then accept.
    New,
    /// The site id is bound to another identity: refuse.
    Conflict { holder: String },
    /// The site id is new but this identity already holds [`MAX_SITES_PER_IDENTITY`]:
    /// refuse.
    TooMany,
}

/// The one decision: is `identity` the one `site` is bound to?
pub fn check_claim(bindings: &HashMap<SiteId, String>, site: &SiteId, identity: &str) -> Claim {
    match bindings.get(site) {
        None if bindings.values().filter(|h| *h == identity).count() >= MAX_SITES_PER_IDENTITY => {
            Claim::TooMany
        }
        None => Claim::New,
        Some(holder) if holder == identity => Claim::Held,
        Some(holder) => Claim::Conflict {
            holder: holder.clone(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::test_support::{addr, drain, ident, machine};
    use crate::sync::{Effect, Msg, OriginUnit};
    use std::time::Duration;

    #[test]
    fn only_certificate_bindings_are_portable() {
        let fp = "ab".repeat(32);
        assert!(is_portable(&format!("{CERTIFICATE_PREFIX}{fp}")));
        assert!(!is_portable("address 10.0.0.1:7000"));
        assert!(!is_portable(&format!(
            "{CERTIFICATE_PREFIX}{}",
            "AB".repeat(32)
        )));
        assert!(!is_portable(&format!(
            "{CERTIFICATE_PREFIX}{}",
            "ab".repeat(31)
        )));
        assert!(!is_portable(&format!("{CERTIFICATE_PREFIX}{fp} ")));
    }

    #[test]
    fn a_site_is_bound_to_the_first_identity_for_good() {
        let mut s = machine(1);
        let push = |from, to| Msg::Unit {
            site: [2; 16],
            unit: std::sync::Arc::new(OriginUnit {
                origin: [2; 16],
                from,
                to,
                committed_ms: 0,
                changes: vec![],
                schema: None,
            }),
            relay: true,
        };
        s.handle_message(addr(2), &ident(2), push(0, 1), Duration::ZERO);
        let eff: Vec<Effect> = std::iter::from_fn(|| s.poll_effect()).collect();
        assert!(
            matches!(&eff[0], Effect::Bind { site, identity } if *site == [2; 16] && *identity == ident(2))
        );
        assert!(matches!(&eff[1], Effect::Apply(_)));
        // Long after node 2 went quiet, another peer claims its id: refused, whatever the
        // time (the binding does not expire).
        s.handle_message(
            addr(3),
            &ident(3),
            push(0, 1 << 62),
            Duration::from_secs(3600),
        );
        assert!(drain(&mut s).is_empty());
        assert_eq!(s.stats().refused, 1);
        // After a restart the binding comes from the database: still refused.
        let mut restarted = machine(1);
        restarted.set_bindings(HashMap::from([([2; 16], ident(2))]));
        restarted.handle_message(addr(3), &ident(3), push(0, 1 << 62), Duration::ZERO);
        assert!(std::iter::from_fn(|| restarted.poll_effect())
            .next()
            .is_none());
        restarted.handle_message(addr(2), &ident(2), push(1, 2), Duration::ZERO);
        assert!(drain(&mut restarted)
            .iter()
            .any(|e| matches!(e, Effect::Apply(_))));
    }

    #[test]
    fn first_identity_holds_the_site_for_good() {
        let mut b = HashMap::new();
        let site = [2u8; 16];
        assert_eq!(check_claim(&b, &site, "address 127.0.0.1:2"), Claim::New);
        b.insert(site, "address 127.0.0.1:2".to_string());
        assert_eq!(check_claim(&b, &site, "address 127.0.0.1:2"), Claim::Held);
        assert_eq!(
            check_claim(&b, &site, "address 127.0.0.1:3"),
            Claim::Conflict {
                holder: "address 127.0.0.1:2".to_string()
            }
        );
        assert_eq!(check_claim(&b, &[3; 16], "address 127.0.0.1:3"), Claim::New);
        for i in 0..MAX_SITES_PER_IDENTITY as u8 - 1 {
            b.insert([100 + i; 16], "address 127.0.0.1:2".to_string());
        }
        assert_eq!(
            check_claim(&b, &[3; 16], "address 127.0.0.1:2"),
            Claim::TooMany
        );
        assert_eq!(check_claim(&b, &site, "address 127.0.0.1:2"), Claim::Held);
    }
}
