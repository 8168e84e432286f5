//! Fixtures shared by the end-to-end test crates (`replication`, `api`).

use std::net::{SocketAddr, TcpListener, UdpSocket};

/// A loopback TCP port free at the time of asking (for a node's HTTP API).
pub fn free_tcp() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("free TCP port")
}

/// A loopback UDP port free at the time of asking (for a node's QUIC gossip).
pub fn free_udp() -> SocketAddr {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("free UDP port")
}
