//! Rolling upgrades with real `patina agent` processes: a mixed cluster of this release
//! and a simulated next one (`PATINA_TEST_RELEASE_AHEAD=1`, protocol version + 1, with a
//! message kind this release lacks) converging under writes — every replica's tables and
//! clocks compared by canonical dumps — and a peer two versions apart refused, with both
//! versions in the log.
//!
//! Needs the extension built beside the binary: `cargo build --workspace` first.

use std::time::Duration;

mod cluster;
mod common;

use cluster::*;
use patina_sidecar::net::PROTOCOL_VERSION;

const AHEAD: &str = "PATINA_TEST_RELEASE_AHEAD";

/// A node that simulates a release `ahead` versions later than this build.
fn ahead(mut node: Node, ahead: u16) -> Node {
    node.env.push((AHEAD.to_string(), ahead.to_string()));
    node
}

/// A labelled sample of the node's `/metrics` (`name{labels} value`).
fn labelled(node: &Node, series: &str) -> Option<f64> {
    let text = ureq::get(&format!("http://{}/metrics", node.api))
        .call()
        .ok()
        .and_then(|r| r.into_string().ok())
        .unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
}

#[test]
fn a_mixed_cluster_of_this_release_and_the_next_converges_under_writes() {
    let first = Node::new("current1", &[]);
    let boot = [first.gossip];
    let mut nodes = vec![
        first,
        Node::new("current2", &boot),
        ahead(Node::new("next1", &boot), 1),
        ahead(Node::new("next2", &boot), 1),
    ];
    for n in nodes.iter_mut() {
        n.start();
    }
    let next = PROTOCOL_VERSION + 1;
    // Every node sees the other three, whatever release they run.
    for n in &nodes {
        wait_for(
            &format!("{} to see three alive peers", n.name),
            Duration::from_secs(60),
            || {
                let peers = |v: u16| {
                    labelled(
                        n,
                        &format!("patina_peers_by_protocol_version{{version=\"{v}\"}}"),
                    )
                    .unwrap_or(0.0)
                };
                peers(PROTOCOL_VERSION) + peers(next) >= 3.0
            },
        );
    }
    // Writes on every node at once, the app that loads nothing among them.
    std::thread::scope(|s| {
        for (i, node) in nodes.iter().enumerate() {
            s.spawn(move || write_burst(node, 1_000_000 * (i as i64 + 1), 80, &node.name));
        }
        let db = nodes[2].db.clone();
        s.spawn(move || {
            let out = python_writer(&db, 9_000_000, 60);
            assert!(
                out.status.success(),
                "python writer failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        });
    });
    let all: Vec<&Node> = nodes.iter().collect();
    let dump = wait_converged(&all, Duration::from_secs(120));
    // Each burst inserts 80 rows and upserts the shared ids 1..=20; python inserts 60.
    assert_eq!(dump.rows.len(), 4 * 80 + 60 + 20, "every insert everywhere");
    let heard = "patina_sync_messages_received_total{kind=\"heard\"}";
    for n in &nodes[..2] {
        // The current release never got a message it does not know, and learned that
        // two peers speak the next version.
        assert_eq!(labelled(n, heard), None, "{} got the new kind", n.name);
        assert_eq!(
            metric(n, "patina_sync_unknown_messages_total"),
            0,
            "{}",
            n.name
        );
        assert_eq!(
            labelled(
                n,
                &format!("patina_peers_by_protocol_version{{version=\"{next}\"}}")
            ),
            Some(2.0),
            "{}",
            n.name
        );
        assert!(
            n.log_text().contains(&format!(
                "speaks protocol version {next} (this node {PROTOCOL_VERSION})"
            )),
            "{} logs the newer peers",
            n.name
        );
    }
    for n in &nodes[2..] {
        assert_eq!(metric(n, "patina_protocol_version"), u64::from(next));
        // The next release's nodes speak the new kind to each other…
        wait_for(
            &format!("{} to receive the new kind", n.name),
            Duration::from_secs(30),
            || labelled(n, heard).unwrap_or(0.0) > 0.0,
        );
        // …and kept it from the current release's nodes.
        wait_for(
            &format!("{} to withhold a newer message", n.name),
            Duration::from_secs(30),
            || metric(n, "patina_sync_messages_withheld_total") > 0,
        );
        assert_eq!(metric(n, "patina_sync_unknown_messages_total"), 0);
    }
    // Healthy with staleness thresholds on every node, whatever its release.
    for n in &nodes {
        wait_for(
            &format!("{} healthy", n.name),
            Duration::from_secs(30),
            || {
                ureq::get(&format!(
                    "http://{}/v1/health?max_lag_versions=0&max_lag_secs=10",
                    n.api
                ))
                .call()
                .is_ok()
            },
        );
    }
}

#[test]
fn a_peer_two_versions_apart_is_refused_with_both_versions_logged() {
    let mut far = ahead(Node::new("two-ahead", &[]), 2);
    let mut current = Node::new("current", &[far.gossip]);
    far.bootstrap = vec![current.gossip];
    far.start();
    current.start();
    let theirs = PROTOCOL_VERSION + 2;
    wait_for(
        "the current node to refuse the far one, naming both versions",
        Duration::from_secs(30),
        || {
            current.log_text().contains(&format!(
                "protocol version {theirs} is not supported: this node speaks version \
                 {PROTOCOL_VERSION}"
            ))
        },
    );
    wait_for(
        "the far node to refuse the current one, naming both versions",
        Duration::from_secs(30),
        || {
            far.log_text().contains(&format!(
                "protocol version {PROTOCOL_VERSION} is not supported: this node speaks \
                 version {theirs}"
            ))
        },
    );
    wait_for("the refusals counted", Duration::from_secs(10), || {
        metric(&current, "patina_frames_rejected_total") > 0
    });
    // Neither joined the other, and neither went down over it.
    for (n, other) in [(&current, &far), (&far, &current)] {
        let members: serde_json::Value = ureq::get(&format!("http://{}/v1/members", n.api))
            .call()
            .expect("members")
            .into_json()
            .expect("members JSON");
        let listed = members["members"]
            .as_array()
            .expect("a list")
            .iter()
            .any(|m| m["addr"] == other.gossip.to_string().as_str() && m["state"] == "alive");
        assert!(!listed, "{} holds {} alive: {members}", n.name, other.name);
        assert!(ureq::get(&format!("http://{}/v1/health", n.api))
            .call()
            .is_ok());
    }
}
