//! End-to-end hardening of the sync path (issue 7): real `patina agent` processes fed
//! values, frames and peers that used to stall, sink or silently change a node.
//!
//! Needs the extension built beside the binary: `cargo build --workspace` first.

use std::process::Child;
use std::time::{Duration, Instant};

mod cluster;
mod common;

use cluster::*;
use rusqlite::Connection;

/// `typeof(note)` and `hex(note)` of one row on one node, if the row exists.
fn note_bytes(node: &Node, id: i64) -> Option<(String, String)> {
    node.conn()
        .query_row(
            "SELECT typeof(note), hex(note) FROM items WHERE id = ?1",
            [id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .ok()
}

/// Issue 7, item 1: a TEXT value that is not valid UTF-8, written by an app that loads
/// nothing, used to stop the node's outbound replication for good ("invalid utf-8").
/// It must arrive byte-exact, as TEXT, and later writes must keep replicating.
#[test]
fn text_that_is_not_utf8_replicates_byte_exact_and_later_writes_follow() {
    let nodes = cluster(2);
    {
        let app = Connection::open(&nodes[0].db).expect("plain connection, no extension");
        app.busy_timeout(Duration::from_secs(10))
            .expect("busy timeout");
        app.execute(
            "INSERT INTO items (id, node, note) VALUES (1, 'bad', CAST(X'FF00FE' AS TEXT))",
            [],
        )
        .expect("app writes bytes that are not UTF-8 as TEXT");
        app.execute(
            "INSERT INTO items (id, node, note) VALUES (2, CAST(X'C328' AS TEXT), 'ok')",
            [],
        )
        .expect("app writes a second bad value");
    }
    let want = Some(("text".to_string(), "FF00FE".to_string()));
    wait_for(
        "the bad TEXT value on node2",
        Duration::from_secs(30),
        || note_bytes(&nodes[1], 1) == want,
    );
    let node2: (String, String) = nodes[1]
        .conn()
        .query_row(
            "SELECT typeof(node), hex(node) FROM items WHERE id = 2",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .expect("row 2 on node2");
    assert_eq!(node2, ("text".to_string(), "C328".to_string()));
    // Replication goes on both ways: later writes on either node arrive.
    write_burst(&nodes[0], 100, 10, "a");
    write_burst(&nodes[1], 200, 10, "b");
    let ids: Vec<i64> = (100..110).chain(200..210).collect();
    wait_for(
        "later writes on both nodes",
        Duration::from_secs(30),
        || count_ids(&nodes[0], &ids) == ids.len() && count_ids(&nodes[1], &ids) == ids.len(),
    );
    assert_eq!(note_bytes(&nodes[0], 1), want);
    assert!(
        !nodes[0].log_text().contains("tailer cannot read"),
        "the tailer failed:\n{}",
        nodes[0].log_text()
    );
}

/// This node's stored cursor for `site` (0 when none).
fn stored_cursor(node: &Node, site: &[u8]) -> i64 {
    node.conn()
        .query_row(
            "SELECT coalesce((SELECT after FROM patina_sync_cursors WHERE peer_site = ?1), 0)",
            [site],
            |r| r.get(0),
        )
        .expect("cursor")
}

/// Issue 7, item 5: a peer reusing the site id of a node that is down pushed an empty
/// unit `(0, 2^62]`; our cursor for that site jumped there and the real node's writes
/// were never taken again. The id is now bound durably to the first identity (here, the
/// address: the cluster is unauthenticated) and the impostor is refused, also after a
/// restart of the victim, also with ranges that break the rule.
#[test]
fn a_peer_reusing_a_down_nodes_site_id_is_refused_and_cannot_move_the_cursor() {
    use patina_sidecar::net::{Channel, NetConfig, Transport, DEFAULT_MAX_FRAME};
    use patina_sidecar::sync::{Chunk, Msg, OriginUnit};

    let mut nodes = cluster(2);
    write_burst(&nodes[0], 100, 5, "a");
    let refs: Vec<&Node> = nodes.iter().collect();
    wait_converged(&refs, Duration::from_secs(60));
    let site_a: Vec<u8> = nodes[0]
        .conn()
        .query_row("SELECT crsql_site_id()", [], |r| r.get(0))
        .expect("site id of node1");
    let bound: String = nodes[1]
        .conn()
        .query_row(
            "SELECT identity FROM patina_site_bindings WHERE site_id = ?1",
            [&site_a],
            |r| r.get(0),
        )
        .expect("node2 stored node1's binding");
    assert_eq!(bound, format!("address {}", nodes[0].gossip));
    nodes[0].kill9();
    // node2 restarts: the binding must come from its database, not from memory.
    nodes[1].kill9();
    nodes[1].start();
    let before = stored_cursor(&nodes[1], &site_a);
    let mut site = [0u8; 16];
    site.copy_from_slice(&site_a);
    let target = nodes[1].gossip;
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let (impostor, _rx) = Transport::bind(NetConfig {
            bind: "127.0.0.1:0".parse().expect("addr"),
            cluster_id: 0,
            tls: None,
            max_frame_bytes: DEFAULT_MAX_FRAME,
        })
        .await
        .expect("impostor transport");
        // An unasked-for catch-up answer covering the victim's whole feed, one that
        // breaks the range rule, and a broadcast unit claiming the victim's versions.
        let empty = |unit_from, unit_to, from, to| Msg::Changes {
            site,
            chunk: Chunk {
                unit_from,
                unit_to,
                from,
                to,
                changes: vec![],
                held: None,
                schema: None,
            },
        };
        let unit = Msg::Unit {
            site,
            unit: std::sync::Arc::new(OriginUnit {
                origin: site,
                from: 0,
                to: 1 << 62,
                committed_ms: 0,
                changes: vec![],
                schema: None,
            }),
            relay: true,
        };
        for msg in [
            empty(0, 1 << 62, 0, 1 << 62),
            empty(1 << 62, 0, 1 << 62, 0),
            unit,
        ] {
            impostor
                .send(target, Channel::Sync, msg.encode())
                .await
                .expect("the frame itself is delivered");
        }
        impostor.close().await;
    });
    wait_for(
        "node2 to refuse the impostor",
        Duration::from_secs(30),
        || {
            let log = nodes[1].log_text();
            log.contains("which is bound to address")
                && log.contains("two nodes share one database identity")
        },
    );
    assert_eq!(
        stored_cursor(&nodes[1], &site_a),
        before,
        "the impostor moved the cursor"
    );
    let claimed: i64 = nodes[1]
        .conn()
        .query_row(
            "SELECT coalesce(max(\"end\"), 0) FROM patina_origin_held WHERE site_id = ?1",
            [&site_a],
            |r| r.get(0),
        )
        .expect("held of node1");
    assert!(
        claimed < 1 << 40,
        "the impostor's unit was recorded as held: {claimed}"
    );
    // The real node comes back and its new writes still arrive.
    nodes[0].start();
    write_burst(&nodes[0], 300, 5, "a2");
    let ids: Vec<i64> = (300..305).collect();
    wait_for(
        "node1's new writes on node2",
        Duration::from_secs(60),
        || count_ids(&nodes[1], &ids) == ids.len(),
    );
    wait_converged(&[&nodes[0], &nodes[1]], Duration::from_secs(60));
}

/// Issue 7, item 7: 50 never-completed 1 MB chunks left 50 rows in `patina_sync_inbox`
/// and grew the database from 0.4 to 69.5 MB. A peer now has at most 4 incomplete units
/// buffered (older ones dropped; all expire after `db::inbox::MAX_AGE`, unit-tested).
#[test]
fn never_completed_units_do_not_pile_up_in_the_inbox() {
    use patina_sidecar::net::{Channel, NetConfig, Transport, DEFAULT_MAX_FRAME};
    use patina_sidecar::sync::{Change, Chunk, Msg, Value};

    let nodes = cluster(1);
    let size = |n: &Node| std::fs::metadata(&n.db).map(|m| m.len()).unwrap_or(0);
    let before = size(&nodes[0]);
    let site = [0x5au8; 16];
    let target = nodes[0].gossip;
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let (peer, _rx) = Transport::bind(NetConfig {
            bind: "127.0.0.1:0".parse().expect("addr"),
            cluster_id: 0,
            tls: None,
            max_frame_bytes: DEFAULT_MAX_FRAME,
        })
        .await
        .expect("peer transport");
        // A node takes nothing from a peer before a summary (`Replicator` `vetted`): the
        // attacker says hello like any peer first.
        let hello = Msg::Summary {
            site,
            held: Vec::new(),
            reply: false,
            urgent: false,
            collected: None,
            cl_floor: None,
        };
        peer.send(target, Channel::Sync, hello.encode())
            .await
            .expect("summary delivered");
        for k in 0..50i64 {
            let (unit_from, unit_to) = (k * 10, k * 10 + 10);
            let msg = Msg::Changes {
                site,
                chunk: Chunk {
                    unit_from,
                    unit_to,
                    from: unit_from,
                    to: unit_from + 1,
                    changes: vec![Change {
                        table: "items".into(),
                        pk: vec![1, 9, 1],
                        cid: "note".into(),
                        val: Value::Blob(vec![k as u8; 1 << 20]),
                        col_version: 1,
                        db_version: unit_from + 1,
                        site_id: site.to_vec(),
                        cl: 1,
                        seq: 0,
                        origin_version: Some(unit_from + 1),
                    }],
                    held: None,
                    schema: None,
                },
            };
            peer.send(target, Channel::Sync, msg.encode())
                .await
                .expect("chunk delivered");
        }
        peer.close().await;
    });
    let last_unit = || {
        nodes[0]
            .conn()
            .query_row(
                "SELECT count(*) FROM patina_sync_inbox WHERE unit_from = 490",
                [],
                |r| r.get::<_, i64>(0),
            )
            .unwrap_or(0)
            == 1
    };
    wait_for(
        "the last chunk buffered",
        Duration::from_secs(60),
        last_unit,
    );
    let rows: i64 = nodes[0]
        .conn()
        .query_row("SELECT count(*) FROM patina_sync_inbox", [], |r| r.get(0))
        .expect("count");
    assert!(rows <= 4, "{rows} incomplete units buffered for one peer");
    let grown = size(&nodes[0]).saturating_sub(before);
    eprintln!("inbox rows {rows}, database grew by {grown} bytes");
    assert!(grown < 12 << 20, "the database grew by {grown} bytes");
}

/// `VmHWM` (peak RSS) and `VmRSS` of a process, in kB.
fn rss_kb(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// Issue 7, item 6 (measurement, run by `scripts/attack-quic`): 30 connections, each
/// sending unfinished frames at a real node, used to push it to 2 GB RSS. Two attacks:
/// (a) the issue's, one unfinished 60 MB frame per connection; (b) the worst the limits
/// allow, 4 streams per connection each announcing a frame of the largest size and never
/// finishing it. Prints the node's peak RSS (target ≤ 150 MB) and checks that writes on
/// another node still replicate to it during the attack.
#[test]
#[ignore = "measurement: scripts/attack-quic"]
fn quic_memory_attack_peak_rss() {
    use patina_sidecar::net::{NetConfig, Transport, DEFAULT_MAX_FRAME};

    let nodes = cluster(2);
    let target = nodes[1].gossip;
    let pid = nodes[1].child.as_ref().map(Child::id).expect("node2 runs");
    let (idle_peak, idle_rss) = rss_kb(pid);
    eprintln!("node2 before the attack: VmHWM {idle_peak} kB, VmRSS {idle_rss} kB");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let attack = |announce: u32, streams: usize, label: &str, base_id: i64| {
        let attackers = rt.block_on(async {
            let mut handles = Vec::new();
            let mut transports = Vec::new();
            for _ in 0..30 {
                let (t, _rx) = Transport::bind(NetConfig {
                    bind: "127.0.0.1:0".parse().expect("addr"),
                    cluster_id: 0,
                    tls: None,
                    max_frame_bytes: DEFAULT_MAX_FRAME,
                })
                .await
                .expect("attacker transport");
                for _ in 0..streams {
                    let Ok(mut s) = t.open_raw_uni(target).await else {
                        continue;
                    };
                    handles.push(tokio::spawn(async move {
                        let _ = s.write_all(&announce.to_be_bytes()).await;
                        let block = vec![0xA5u8; 1 << 20];
                        // Everything but the last byte: the frame never completes.
                        let mut left = announce as usize - 1;
                        while left > 0 {
                            let n = left.min(block.len());
                            if s.write_all(&block[..n]).await.is_err() {
                                break;
                            }
                            left -= n;
                        }
                        // Hold the stream open, unfinished.
                        std::future::pending::<()>().await;
                    }));
                }
                transports.push(t);
            }
            (handles, transports)
        });
        // Meanwhile node1's writes must still reach node2.
        let ids: Vec<i64> = (base_id..base_id + 20).collect();
        write_burst(&nodes[0], base_id, 20, label);
        let started = Instant::now();
        let mut peak = 0;
        while started.elapsed() < Duration::from_secs(8) {
            peak = peak.max(rss_kb(pid).1);
            std::thread::sleep(Duration::from_millis(100));
        }
        wait_for(
            "node1's writes on node2 during the attack",
            Duration::from_secs(30),
            || count_ids(&nodes[1], &ids) == ids.len(),
        );
        let (hwm, rss) = rss_kb(pid);
        eprintln!(
            "attack {label}: node2 VmHWM {hwm} kB ({} MB), sampled peak VmRSS {peak} kB, now {rss} kB",
            hwm / 1024
        );
        rt.block_on(async {
            for h in &attackers.0 {
                h.abort();
            }
            for t in &attackers.1 {
                t.close().await;
            }
        });
        hwm
    };
    let a = attack(60_000_000, 1, "a-60MB", 1_000);
    let b = attack(DEFAULT_MAX_FRAME as u32, 4, "b-maxframe", 2_000);
    assert!(a <= 150 * 1024, "attack a: peak RSS {a} kB");
    assert!(b <= 150 * 1024, "attack b: peak RSS {b} kB");
    assert!(nodes[1].child.is_some());
}
