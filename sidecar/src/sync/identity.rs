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

use std::collections::HashMap;

use super::msg::SiteId;

/// What to do with a message that claims `site` from a peer presenting `identity`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The site id is bound to this identity: accept.
    Held,
    /// The site id was never seen: bind it to this identity (durably), then accept.
    New,
    /// The site id is bound to another identity: refuse.
    Conflict { holder: String },
}

/// The one decision: is `identity` the one `site` is bound to?
pub fn check_claim(bindings: &HashMap<SiteId, String>, site: &SiteId, identity: &str) -> Claim {
    match bindings.get(site) {
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
    }
}
