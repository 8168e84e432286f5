//! `patina demo`: a local 3-node cluster in one command, showing a write replicate.
//!
//! The nodes are child processes of this same binary (`patina agent`), each with its own
//! database file, API port and gossip port, in a temporary directory (or `--dir`). The
//! demo writes `machine-123` straight into node 1's database file — the way any app
//! would, no API involved — and times its arrival in nodes 2 and 3.

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rusqlite::{Connection, OpenFlags, OptionalExtension};

use crate::cli::DemoArgs;
use crate::config::Synchronous;

/// The example schema, shipped inside the binary so the demo works from any directory.
const MACHINES_SQL: &str = include_str!("../../sql/schema/machines.sql");

struct Node {
    n: usize,
    db: PathBuf,
    api: SocketAddr,
    gossip: SocketAddr,
    child: Child,
}

/// Kills the children however the demo ends.
struct Cluster(Vec<Node>);

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.0 {
            // SIGTERM first: a clean leave; then make sure.
            // SAFETY: kill(2) on our own child's pid.
            unsafe {
                libc::kill(node.child.id() as libc::pid_t, libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for node in &mut self.0 {
            while Instant::now() < deadline {
                if let Ok(Some(_)) = node.child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = node.child.kill();
            let _ = node.child.wait();
        }
    }
}

/// Runs the demo.
pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    let ext = crate::db::extension_path(None)?;
    let (dir, temporary) = match &args.dir {
        Some(d) => (d.clone(), false),
        None => (
            std::env::temp_dir().join(format!("patina-demo-{}", std::process::id())),
            true,
        ),
    };
    let result = run_in(&args, &dir, &ext);
    if temporary && result.is_ok() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

fn run_in(args: &DemoArgs, dir: &Path, ext: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir.join("schema"))
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let schema = dir.join("schema/machines.sql");
    std::fs::write(&schema, MACHINES_SQL)
        .with_context(|| format!("cannot write {}", schema.display()))?;
    let exe = std::env::current_exe().context("cannot find the patina executable")?;
    let ports = pick_ports(args.api_port)?;
    println!("patina demo: starting 3 nodes in {}", dir.display());
    let mut cluster = Cluster(Vec::new());
    for (i, (api, gossip)) in ports.iter().enumerate() {
        let n = i + 1;
        let db = dir.join(format!("node{n}.db"));
        let log = std::fs::File::create(dir.join(format!("node{n}.log")))
            .with_context(|| format!("cannot create node{n}.log in {}", dir.display()))?;
        let mut cmd = Command::new(&exe);
        cmd.arg("agent")
            .arg("--db-path")
            .arg(&db)
            .arg("--db-schema-paths")
            .arg(dir.join("schema"))
            .arg("--db-extension-path")
            .arg(ext)
            .arg("--api-addr")
            .arg(api.to_string())
            .arg("--gossip-addr")
            .arg(gossip.to_string());
        for (j, (_, other)) in ports.iter().enumerate() {
            if j != i {
                cmd.arg("--gossip-bootstrap").arg(other.to_string());
            }
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
        die_with_parent(&mut cmd);
        let child = cmd.spawn().context("cannot start a patina agent")?;
        cluster.0.push(Node {
            n,
            db,
            api: *api,
            gossip: *gossip,
            child,
        });
    }
    wait_ready(&mut cluster, dir)?;

    let conn = crate::db::open(&cluster.0[0].db, ext, Synchronous::Normal)?;
    let started = Instant::now();
    conn.execute(
        "INSERT INTO machines (id, name, status, updated_at) \
         VALUES ('machine-123', 'web-1', 'provisioning', unixepoch()) \
         ON CONFLICT (id) DO UPDATE SET status = 'provisioning', updated_at = unixepoch()",
        [],
    )
    .context("cannot insert machine-123 into node 1")?;
    drop(conn);
    println!(
        "\nnode 1: INSERT machine-123 (written straight into {})",
        cluster.0[0].db.display()
    );
    for node in &cluster.0[1..] {
        let ms = wait_row(&node.db, started).with_context(|| {
            format!(
                "machine-123 did not reach node {} within 30 s; see {}",
                node.n,
                dir.join(format!("node{}.log", node.n)).display()
            )
        })?;
        println!("node {}: machine-123 arrived after {ms:.1} ms", node.n);
    }
    println!("\nThe cluster:");
    for node in &cluster.0 {
        println!(
            "  node {}: API http://{}  gossip {}  db {}",
            node.n,
            node.api,
            node.gossip,
            node.db.display()
        );
    }
    println!("\nTry it:");
    println!(
        "  sqlite3 {} \"SELECT * FROM machines;\"",
        cluster.0[2].db.display()
    );
    println!(
        "  curl -X POST -H \"Content-Type: application/sql\" -d \"UPDATE machines SET status = \
         'healthy' WHERE id = 'machine-123';\" http://{}/sql",
        cluster.0[0].api
    );
    println!("  logs: {}/node*.log", dir.display());
    if args.exit_after_convergence {
        println!("\nconverged; stopping (--exit-after-convergence)");
        return Ok(());
    }
    println!("\nRunning until Ctrl-C.");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(crate::shutdown::signal());
    println!("stopping the nodes");
    drop(cluster);
    Ok(())
}

/// Free loopback ports: (API, gossip) per node.
fn pick_ports(first_api: u16) -> anyhow::Result<Vec<(SocketAddr, SocketAddr)>> {
    let mut out = Vec::new();
    for i in 0..3u16 {
        let api = if first_api == 0 {
            TcpListener::bind("127.0.0.1:0")?.local_addr()?
        } else {
            SocketAddr::from(([127, 0, 0, 1], first_api + i))
        };
        let gossip = UdpSocket::bind("127.0.0.1:0")?.local_addr()?;
        out.push((api, gossip));
    }
    Ok(out)
}

/// Waits until every node answers its API and, where the API reports members, sees the
/// other two.
fn wait_ready(cluster: &mut Cluster, dir: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_millis(500))
        .build();
    for node in &mut cluster.0 {
        loop {
            if let Ok(Some(status)) = node.child.try_wait() {
                bail!(
                    "node {} exited ({status}); see {}",
                    node.n,
                    dir.join(format!("node{}.log", node.n)).display()
                );
            }
            let members = agent.get(&format!("http://{}/v1/members", node.api)).call();
            let ready = match members {
                Ok(resp) => match resp.into_json::<serde_json::Value>() {
                    Ok(v) => !matches!(member_count(&v), Some(n) if n < 2),
                    Err(_) => true,
                },
                // An API without the members route still proves the node is up.
                Err(ureq::Error::Status(..)) => true,
                Err(_) => false,
            };
            if ready {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "node {} is not ready after 30 s; see {}",
                    node.n,
                    dir.join(format!("node{}.log", node.n)).display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(())
}

/// Other members in a `/v1/members` answer (an array, or `{"members": [...]}`); the
/// node's own entry (`"self": true`) is not counted.
fn member_count(v: &serde_json::Value) -> Option<usize> {
    let arr = v
        .as_array()
        .or_else(|| v.get("members").and_then(|m| m.as_array()))?;
    Some(arr.iter().filter(|m| m["self"] != true).count())
}

/// Polls a node's database file (read-only, no extension needed) until the row is there.
fn wait_row(db: &Path, started: Instant) -> anyhow::Result<f64> {
    let conn = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    conn.busy_timeout(Duration::from_secs(1))?;
    let deadline = started + Duration::from_secs(30);
    while Instant::now() < deadline {
        let found: Option<String> = conn
            .query_row(
                "SELECT id FROM machines WHERE id = 'machine-123'",
                [],
                |r| r.get(0),
            )
            .optional()
            .unwrap_or(None);
        if found.is_some() {
            return Ok(started.elapsed().as_secs_f64() * 1000.0);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    bail!("timed out")
}

/// Children get SIGTERM if the demo dies, so no orphan nodes are left behind.
fn die_with_parent(cmd: &mut Command) {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
    }
}
