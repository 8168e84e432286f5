//! QUIC transport between peers: one quinn endpoint per node, used as client and server.
//!
//! # Layout
//! - `mod.rs`      — the public surface: [`Transport`], [`Incoming`], [`NetError`], sending.
//! - `inbound.rs`  — accepting connections and reading streams and datagrams.
//! - `envelope.rs` — the CBOR envelope and stream framing, pure functions.
//! - `tls.rs`      — rustls configuration (mutual TLS, or unauthenticated on loopback).
//! - `limits.rs`   — what peers can make this node hold: windows, streams, byte budgets.
//! - `idle.rs`     — when a cached connection counts as idle, and the reaper that closes it.
//!
//! Because one endpoint both dials and accepts, the remote address of every connection is
//! the peer's listen address, so `from` in [`Incoming`] is where to answer. `net` never
//! interprets payloads; it only checks the envelope (version, cluster id, size).
//!
//! SWIM traffic can be routed to its own bounded channel ([`Transport::route_swim`]): it
//! then never waits behind sync messages in the [`Incoming`] channel, and when the
//! membership task is behind, SWIM packets are dropped (SWIM tolerates loss) rather than
//! stalling the connection's reader.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

pub mod envelope;
mod idle;
mod inbound;
pub mod limits;
pub(crate) mod tls;

pub use envelope::{accepted, PROTOCOL_VERSION};
pub use limits::FramePermit;

/// Frames larger than this are refused unless configured otherwise. Chunks are at most
/// 4 MiB, so 16 MiB leaves room for one change (a value) up to about 15 MiB; a larger
/// value cannot replicate (the API's `max_body` is 8 MiB). See `limits.rs` for why it is
/// not larger: it is also what one connection may make this node buffer.
pub const DEFAULT_MAX_FRAME: usize = 16 * 1024 * 1024;

/// Depth of the [`Incoming`] channel. When it is full, readers stop reading (QUIC flow
/// control then pushes back on the senders); nothing accepted is dropped.
const INCOMING_DEPTH: usize = 1024;

/// Refused frames of one peer are logged at most this often (all are counted).
const REJECT_LOG_EVERY: Duration = Duration::from_secs(10);

/// How long dialing a peer may take before `send`/`request` give up on it.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How the transport binds and authenticates.
#[derive(Debug, Clone)]
pub struct NetConfig {
    pub bind: SocketAddr,
    pub cluster_id: u64,
    /// None: unauthenticated mode (only allowed when bind is loopback or insecure was set;
    /// `config.validate()` enforces that): an ephemeral self-signed certificate, no
    /// verification.
    pub tls: Option<TlsFiles>,
    /// Frames larger than this are refused (the reader stops reading, logs, counts).
    pub max_frame_bytes: usize,
}

/// PEM files for mutual TLS from a cluster CA.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// What a message is for; net never interprets payloads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Channel {
    Swim,
    Sync,
}

/// Who is at the other end of a connection, as far as the transport can vouch for it.
/// The sync layer binds site ids to it (a site id may only be spoken for by the identity
/// that first presented it), so it must not change while the peer stays the same.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum PeerIdentity {
    /// Mutual TLS: the SHA-256 fingerprint (hex) of the peer's end-entity certificate,
    /// which the cluster CA signed. Survives address changes; a new certificate is a new
    /// identity.
    Certificate(String),
    /// Unauthenticated transport: the peer's address is all we know. (Its ephemeral
    /// self-signed certificate changes on every start, so it is no identity.)
    Address(SocketAddr),
}

impl std::fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerIdentity::Certificate(fp) => {
                write!(f, "{}{fp}", crate::sync::CERTIFICATE_PREFIX)
            }
            PeerIdentity::Address(a) => write!(f, "address {a}"),
        }
    }
}

/// Something a peer sent us.
#[derive(Debug)]
pub enum Incoming {
    Message {
        from: SocketAddr,
        peer: PeerIdentity,
        channel: Channel,
        payload: Vec<u8>,
        /// The frame's share of the receive budget: drop it once the payload is decoded.
        permit: FramePermit,
        /// The protocol version of the frame's envelope: the version the peer speaks.
        version: u16,
    },
    /// Answer through `reply`; dropping it resets the peer's request.
    Request {
        from: SocketAddr,
        peer: PeerIdentity,
        channel: Channel,
        payload: Vec<u8>,
        reply: oneshot::Sender<Vec<u8>>,
        /// The frame's share of the receive budget: drop it once the payload is decoded.
        permit: FramePermit,
    },
    Datagram {
        from: SocketAddr,
        payload: Vec<u8>,
    },
}

/// One SWIM packet for the membership task (see [`Transport::route_swim`]).
#[derive(Debug)]
pub struct SwimPacket {
    pub from: SocketAddr,
    pub payload: Vec<u8>,
}

/// Transport failures. None of them leaves the transport unusable; a failed connection
/// is dropped from the cache and the next call dials again.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// Binding the UDP socket failed; no transport exists.
    #[error("cannot bind QUIC endpoint on {addr}: {error}")]
    Bind {
        addr: SocketAddr,
        error: std::io::Error,
    },
    /// A TLS file could not be read or used; no transport exists.
    #[error("TLS file {}: {reason}", file.display())]
    Tls { file: PathBuf, reason: String },
    /// Building the rustls/quinn configuration failed; no transport exists.
    #[error("TLS configuration: {0}")]
    TlsConfig(String),
    /// Dialing the peer failed (unreachable, timed out, or the TLS handshake was refused
    /// by either side); nothing was sent.
    #[error("cannot connect to peer {addr}: {reason}")]
    Connect { addr: SocketAddr, reason: String },
    /// The connection failed while sending, even after one reconnect; the message may or
    /// may not have arrived. The connection was dropped from the cache.
    #[error("sending to peer {addr} failed: {reason}")]
    Send { addr: SocketAddr, reason: String },
    /// The peer refused the frame or request (reset or stopped the stream).
    #[error("peer {addr} refused the request: {reason}")]
    Refused { addr: SocketAddr, reason: String },
    /// No response within the timeout; the peer may still process the request.
    #[error("peer {addr} did not answer within {after:?}")]
    Timeout { addr: SocketAddr, after: Duration },
    /// The peer's response frame was invalid (counted in `frames_rejected`).
    #[error("bad response from peer {addr}: {reason}")]
    BadResponse { addr: SocketAddr, reason: String },
    /// The payload exceeds `max_frame_bytes`; nothing was sent.
    #[error("message of {len} bytes for peer {addr} exceeds the frame limit of {max} bytes")]
    TooLarge {
        addr: SocketAddr,
        len: usize,
        max: usize,
    },
    /// [`Transport::close`] was called; nothing was sent.
    #[error("transport is closed")]
    Closed,
}

/// A cached connection slot per peer. The async mutex serialises dialing one peer without
/// blocking sends to others.
type Slot = Arc<tokio::sync::Mutex<Option<quinn::Connection>>>;

pub(crate) struct Inner {
    endpoint: quinn::Endpoint,
    local_addr: SocketAddr,
    cluster_id: u64,
    /// The protocol version this node speaks (`envelope::PROTOCOL_VERSION`, or another
    /// one when a test simulates another release).
    version: u16,
    max_frame: usize,
    /// Mutual TLS is on: peers are identified by certificate, not address.
    authenticated: bool,
    conns: Mutex<HashMap<SocketAddr, Slot>>,
    /// The runtime the transport was bound in: connections dialed from another one (the
    /// membership thread's) are still served here.
    runtime: tokio::runtime::Handle,
    /// When each peer's connection was last used, for the idle reaper (`idle.rs`).
    usage: idle::Usage,
    /// QUIC connections open right now, dialed or accepted, cached or not.
    open_connections: AtomicU64,
    incoming: mpsc::Sender<Incoming>,
    /// Where SWIM packets go once [`Transport::route_swim`] was called; until then they
    /// arrive as [`Incoming::Datagram`].
    swim: OnceLock<mpsc::Sender<SwimPacket>>,
    /// SWIM packets dropped because the membership task was behind.
    swim_dropped: AtomicU64,
    /// Node-wide budgets of frame bodies being read or waiting to be taken.
    budgets: limits::Budgets,
    /// Connections peers opened to us ([`limits::MAX_CONNECTIONS`]).
    connections: Arc<tokio::sync::Semaphore>,
    /// Handshakes in progress ([`limits::MAX_HANDSHAKES`]).
    handshakes: Arc<tokio::sync::Semaphore>,
    /// Connections refused because a cap above was reached.
    connections_refused: AtomicU64,
    frames_rejected: AtomicU64,
    /// Per peer: when a refused frame was last logged, and how many were refused since
    /// (a peer of an incompatible release refuses every packet; one line per 10 s).
    reject_logged: Mutex<HashMap<SocketAddr, (std::time::Instant, u64)>>,
    handshakes_rejected: AtomicU64,
    closed: AtomicBool,
}

/// The QUIC transport. Cheap to clone.
///
/// Its accept and connection tasks hold the endpoint, so it lives until [`Transport::close`];
/// the [`Incoming`] channel stays open while any handle exists (select on shutdown rather
/// than waiting for it to close).
#[derive(Clone)]
pub struct Transport {
    inner: Arc<Inner>,
}

impl Transport {
    /// Binds the endpoint and starts accepting. Incoming traffic arrives on the returned
    /// bounded channel.
    pub async fn bind(cfg: NetConfig) -> Result<(Transport, mpsc::Receiver<Incoming>), NetError> {
        Transport::bind_as(cfg, PROTOCOL_VERSION).await
    }

    /// [`Transport::bind`] for a node speaking protocol `version`: its frames carry it, and
    /// frames outside [`accepted`]`(version)` are refused.
    pub async fn bind_as(
        cfg: NetConfig,
        version: u16,
    ) -> Result<(Transport, mpsc::Receiver<Incoming>), NetError> {
        let tls = tls::configure(cfg.tls.as_ref())?;
        let mut endpoint =
            quinn::Endpoint::server(tls.server, cfg.bind).map_err(|error| NetError::Bind {
                addr: cfg.bind,
                error,
            })?;
        endpoint.set_default_client_config(tls.client);
        let local_addr = endpoint.local_addr().map_err(|error| NetError::Bind {
            addr: cfg.bind,
            error,
        })?;
        let (tx, rx) = mpsc::channel(INCOMING_DEPTH);
        let inner = Arc::new(Inner {
            endpoint,
            local_addr,
            cluster_id: cfg.cluster_id,
            version,
            max_frame: cfg.max_frame_bytes,
            authenticated: cfg.tls.is_some(),
            conns: Mutex::new(HashMap::new()),
            runtime: tokio::runtime::Handle::current(),
            usage: idle::Usage::default(),
            open_connections: AtomicU64::new(0),
            incoming: tx,
            swim: OnceLock::new(),
            swim_dropped: AtomicU64::new(0),
            budgets: limits::Budgets::new(cfg.max_frame_bytes),
            connections: Arc::new(tokio::sync::Semaphore::new(limits::MAX_CONNECTIONS)),
            handshakes: Arc::new(tokio::sync::Semaphore::new(limits::MAX_HANDSHAKES)),
            connections_refused: AtomicU64::new(0),
            frames_rejected: AtomicU64::new(0),
            reject_logged: Mutex::new(HashMap::new()),
            handshakes_rejected: AtomicU64::new(0),
            closed: AtomicBool::new(false),
        });
        tokio::spawn(inbound::accept_loop(inner.clone()));
        tokio::spawn(idle::reap(Arc::downgrade(&inner)));
        if cfg.tls.is_none() {
            tracing::warn!(addr = %local_addr, "QUIC transport is UNAUTHENTICATED (no gossip.tls files)");
        }
        Ok((Transport { inner }, rx))
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    /// The protocol version this node speaks.
    pub fn version(&self) -> u16 {
        self.inner.version
    }

    /// Frames refused so far (wrong cluster, bad version, corrupt, truncated, oversized).
    pub fn frames_rejected(&self) -> u64 {
        self.inner.frames_rejected.load(Ordering::Relaxed)
    }

    /// Bytes of large frame bodies buffered right now, node-wide (see `limits.rs`).
    pub fn frame_bytes_buffered(&self) -> usize {
        self.inner.budgets.large_in_use()
    }

    /// TLS handshakes that failed, in either direction (e.g. a certificate from another CA).
    pub fn handshakes_rejected(&self) -> u64 {
        self.inner.handshakes_rejected.load(Ordering::Relaxed)
    }

    /// From now on, SWIM packets (datagrams, and SWIM frames that fell back to a stream)
    /// go to `to` instead of the [`Incoming`] channel, without ever waiting: when `to` is
    /// full the packet is dropped and counted. Only the first call takes effect; it
    /// returns false for the others.
    pub fn route_swim(&self, to: mpsc::Sender<SwimPacket>) -> bool {
        self.inner.swim.set(to).is_ok()
    }

    /// SWIM packets dropped so far because the membership task was behind.
    pub fn swim_dropped(&self) -> u64 {
        self.inner.swim_dropped.load(Ordering::Relaxed)
    }

    /// QUIC connections open right now (dialed and accepted).
    pub fn peer_connections(&self) -> u64 {
        self.inner.open_connections.load(Ordering::Relaxed)
    }

    /// Smoothed RTT of the cached connection to `addr`, if there is one.
    pub fn rtt(&self, addr: SocketAddr) -> Option<Duration> {
        let slot = self.inner.slot_if_any(addr)?;
        let guard = slot.try_lock().ok()?;
        guard
            .as_ref()
            .filter(|c| c.close_reason().is_none())
            .map(|c| c.rtt())
    }

    /// One message, reliably: a QUIC uni stream on a cached connection, reconnecting once
    /// on failure. Returns once the peer's QUIC stack acknowledged all of it.
    pub async fn send(
        &self,
        to: SocketAddr,
        channel: Channel,
        payload: Vec<u8>,
    ) -> Result<(), NetError> {
        self.check_len(to, payload.len())?;
        self.inner.usage.touch(to, channel);
        let frame = self.inner.frame(channel, &payload, false);
        let sent = self.send_frame(to, &frame).await;
        // A long send must not leave its connection looking idle.
        self.inner.usage.touch(to, channel);
        sent
    }

    /// Request/response on a bidirectional stream (anti-entropy pulls).
    pub async fn request(
        &self,
        to: SocketAddr,
        channel: Channel,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, NetError> {
        self.check_len(to, payload.len())?;
        self.inner.usage.touch(to, channel);
        let frame = self.inner.frame(channel, &payload, false);
        let answer = tokio::time::timeout(timeout, self.request_frame(to, &frame)).await;
        // A long request must not leave its connection looking idle.
        self.inner.usage.touch(to, channel);
        match answer {
            Ok(r) => r,
            Err(_) => Err(NetError::Timeout {
                addr: to,
                after: timeout,
            }),
        }
    }

    /// Best-effort datagram (SWIM); falls back to a uni stream when larger than the path
    /// allows.
    pub async fn send_datagram(&self, to: SocketAddr, payload: Vec<u8>) -> Result<(), NetError> {
        self.check_len(to, payload.len())?;
        self.inner.usage.touch(to, Channel::Swim);
        let dgram = envelope::encode_with_version(
            self.inner.version,
            self.inner.cluster_id,
            Channel::Swim,
            &payload,
            false,
        );
        for attempt in 0..2 {
            let conn = self.inner.connection(to).await?;
            if conn
                .max_datagram_size()
                .is_some_and(|max| dgram.len() <= max)
            {
                match conn.send_datagram(dgram.clone().into()) {
                    Ok(()) => return Ok(()),
                    Err(quinn::SendDatagramError::ConnectionLost(e)) if attempt == 0 => {
                        tracing::debug!(peer = %to, error = %e, "connection lost; reconnecting");
                        self.inner.forget(to, &conn).await;
                        continue;
                    }
                    Err(quinn::SendDatagramError::TooLarge) => {}
                    Err(e) => {
                        return Err(NetError::Send {
                            addr: to,
                            reason: e.to_string(),
                        })
                    }
                }
            }
            let frame = self.inner.frame(Channel::Swim, &payload, true);
            return self.send_frame(to, &frame).await;
        }
        Err(NetError::Send {
            addr: to,
            reason: "connection lost twice".to_string(),
        })
    }

    /// Test hook: writes `bytes` verbatim (no framing) on a fresh uni stream, so tests can
    /// play a hostile peer (garbage, truncated and oversized frames).
    #[doc(hidden)]
    pub async fn send_raw_stream(&self, to: SocketAddr, bytes: Vec<u8>) -> Result<(), NetError> {
        let conn = self.inner.connection(to).await?;
        let mut send = conn.open_uni().await.map_err(|e| NetError::Send {
            addr: to,
            reason: e.to_string(),
        })?;
        // The peer may stop the stream before we finish writing: that is the point.
        let _ = write_frame(&mut send, &bytes).await;
        let _ = send.stopped().await;
        Ok(())
    }

    /// Test hook: opens a uni stream and hands it over, so a test can play a peer that
    /// never finishes its frame (memory limits, `limits.rs`).
    #[doc(hidden)]
    pub async fn open_raw_uni(&self, to: SocketAddr) -> Result<quinn::SendStream, NetError> {
        let conn = self.inner.connection(to).await?;
        conn.open_uni().await.map_err(|e| NetError::Send {
            addr: to,
            reason: e.to_string(),
        })
    }

    /// Closes connections politely and waits (at most 2 s) for the endpoint to go idle.
    pub async fn close(&self) {
        self.inner.closed.store(true, Ordering::SeqCst);
        self.inner.endpoint.close(0u32.into(), b"shutdown");
        let _ = tokio::time::timeout(Duration::from_secs(2), self.inner.endpoint.wait_idle()).await;
    }

    fn check_len(&self, to: SocketAddr, len: usize) -> Result<(), NetError> {
        if self.inner.closed.load(Ordering::SeqCst) {
            return Err(NetError::Closed);
        }
        // The envelope adds a few bytes; keep a margin so the receiver's check agrees.
        if len + 64 > self.inner.max_frame {
            return Err(NetError::TooLarge {
                addr: to,
                len,
                max: self.inner.max_frame,
            });
        }
        Ok(())
    }

    async fn send_frame(&self, to: SocketAddr, frame: &[u8]) -> Result<(), NetError> {
        let mut last = String::new();
        for _ in 0..2 {
            let conn = self.inner.connection(to).await?;
            match send_on(&conn, frame).await {
                Ok(()) => return Ok(()),
                Err(SendFail::Refused(code)) => {
                    return Err(NetError::Refused {
                        addr: to,
                        reason: inbound::refusal_reason(code),
                    })
                }
                Err(SendFail::Conn(e)) => {
                    tracing::debug!(peer = %to, error = %e, "send failed; reconnecting once");
                    self.inner.forget(to, &conn).await;
                    last = e;
                }
            }
        }
        Err(NetError::Send {
            addr: to,
            reason: last,
        })
    }

    async fn request_frame(&self, to: SocketAddr, frame: &[u8]) -> Result<Vec<u8>, NetError> {
        let mut last = String::new();
        for _ in 0..2 {
            let conn = self.inner.connection(to).await?;
            let (mut send, mut recv) = match conn.open_bi().await {
                Ok(s) => s,
                Err(e) => {
                    self.inner.forget(to, &conn).await;
                    last = e.to_string();
                    continue;
                }
            };
            match write_frame(&mut send, frame).await {
                Ok(()) => {}
                Err(SendFail::Refused(code)) => {
                    return Err(NetError::Refused {
                        addr: to,
                        reason: inbound::refusal_reason(code),
                    })
                }
                Err(SendFail::Conn(e)) => {
                    self.inner.forget(to, &conn).await;
                    last = e;
                    continue;
                }
            }
            let budget = limits::connection_budget(self.inner.max_frame);
            let read = inbound::read_frame(
                &mut recv,
                self.inner.max_frame,
                &self.inner.budgets,
                &budget,
            )
            .await;
            return match read {
                Ok((bytes, _permit)) => {
                    match envelope::decode_as(&bytes, self.inner.cluster_id, self.inner.version) {
                        Ok(env) => Ok(env.payload),
                        Err(e) => {
                            self.inner.reject(to, &e.to_string());
                            Err(NetError::BadResponse {
                                addr: to,
                                reason: e.to_string(),
                            })
                        }
                    }
                }
                Err(inbound::ReadFail::Frame(e)) => {
                    self.inner.reject(to, &e.to_string());
                    Err(NetError::BadResponse {
                        addr: to,
                        reason: e.to_string(),
                    })
                }
                Err(inbound::ReadFail::Reset(code)) => Err(NetError::Refused {
                    addr: to,
                    reason: inbound::refusal_reason(code),
                }),
                Err(inbound::ReadFail::Io(e)) => {
                    self.inner.forget(to, &conn).await;
                    Err(NetError::Send {
                        addr: to,
                        reason: e,
                    })
                }
            };
        }
        Err(NetError::Send {
            addr: to,
            reason: last,
        })
    }
}

/// Why writing a frame failed.
enum SendFail {
    /// The peer stopped the stream: it refused the frame. Retrying would not help.
    Refused(quinn::VarInt),
    /// The connection failed: worth one reconnect.
    Conn(String),
}

/// Writes one frame on a fresh uni stream and waits for the peer to acknowledge it.
async fn send_on(conn: &quinn::Connection, frame: &[u8]) -> Result<(), SendFail> {
    let mut send = conn
        .open_uni()
        .await
        .map_err(|e| SendFail::Conn(e.to_string()))?;
    write_frame(&mut send, frame).await?;
    match send.stopped().await {
        Ok(None) => Ok(()),
        Ok(Some(code)) => Err(SendFail::Refused(code)),
        Err(e) => Err(SendFail::Conn(e.to_string())),
    }
}

async fn write_frame(send: &mut quinn::SendStream, frame: &[u8]) -> Result<(), SendFail> {
    match send.write_all(frame).await {
        Ok(()) => {}
        Err(quinn::WriteError::Stopped(code)) => return Err(SendFail::Refused(code)),
        Err(e) => return Err(SendFail::Conn(e.to_string())),
    }
    send.finish().map_err(|e| SendFail::Conn(e.to_string()))
}

impl Inner {
    /// A stream frame of this node's version and cluster.
    fn frame(&self, channel: Channel, payload: &[u8], as_datagram: bool) -> Vec<u8> {
        envelope::encode_frame_with_version(
            self.version,
            self.cluster_id,
            channel,
            payload,
            as_datagram,
        )
    }

    fn slot_if_any(&self, addr: SocketAddr) -> Option<Slot> {
        self.conns.lock().ok()?.get(&addr).cloned()
    }

    fn slot(&self, addr: SocketAddr) -> Slot {
        match self.conns.lock() {
            Ok(mut map) => map.entry(addr).or_default().clone(),
            // A panic elsewhere poisoned the map; dial uncached rather than fail.
            Err(_) => Slot::default(),
        }
    }

    /// The cached live connection to `addr`, dialing it if needed.
    async fn connection(self: &Arc<Self>, addr: SocketAddr) -> Result<quinn::Connection, NetError> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(NetError::Closed);
        }
        let slot = self.slot(addr);
        let mut guard = slot.lock().await;
        if let Some(c) = guard.as_ref() {
            if c.close_reason().is_none() {
                return Ok(c.clone());
            }
        }
        *guard = None;
        let server_name = addr.ip().to_string();
        let connecting =
            self.endpoint
                .connect(addr, &server_name)
                .map_err(|e| NetError::Connect {
                    addr,
                    reason: e.to_string(),
                })?;
        let conn = match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                inbound::log_handshake_failure(self, addr, &e, "dialing");
                return Err(NetError::Connect {
                    addr,
                    reason: e.to_string(),
                });
            }
            Err(_) => {
                return Err(NetError::Connect {
                    addr,
                    reason: format!("timed out after {CONNECT_TIMEOUT:?}"),
                })
            }
        };
        // Opening counts as use, so the reaper leaves a fresh connection alone.
        self.usage.touch(addr, Channel::Swim);
        self.runtime
            .spawn(inbound::serve_connection(self.clone(), conn.clone()));
        *guard = Some(conn.clone());
        Ok(conn)
    }

    /// Caches an accepted connection unless a live one to that peer exists (or is being
    /// dialed right now); both stay served either way.
    fn adopt(&self, conn: &quinn::Connection) {
        self.usage.touch(conn.remote_address(), Channel::Swim);
        let slot = self.slot(conn.remote_address());
        if let Ok(mut guard) = slot.try_lock() {
            let live = guard.as_ref().is_some_and(|c| c.close_reason().is_none());
            if !live {
                *guard = Some(conn.clone());
            }
        };
    }

    /// Drops `conn` from the cache if it is still the cached one.
    async fn forget(&self, addr: SocketAddr, conn: &quinn::Connection) {
        let Some(slot) = self.slot_if_any(addr) else {
            return;
        };
        let mut guard = slot.lock().await;
        if guard
            .as_ref()
            .is_some_and(|c| c.stable_id() == conn.stable_id())
        {
            *guard = None;
        }
    }

    /// Counts and logs a refused frame: at most one line per peer per
    /// [`REJECT_LOG_EVERY`], saying how many more were refused in between.
    fn reject(&self, from: SocketAddr, reason: &str) {
        self.frames_rejected.fetch_add(1, Ordering::Relaxed);
        let now = std::time::Instant::now();
        let suppressed = match self.reject_logged.lock() {
            Ok(mut logged) => {
                if logged.len() > 4096 {
                    logged.retain(|_, (t, _)| now.duration_since(*t) < REJECT_LOG_EVERY);
                }
                match logged.get_mut(&from) {
                    Some((t, n)) if now.duration_since(*t) < REJECT_LOG_EVERY => {
                        *n += 1;
                        return;
                    }
                    Some((t, n)) => {
                        *t = now;
                        std::mem::take(n)
                    }
                    None => {
                        logged.insert(from, (now, 0));
                        0
                    }
                }
            }
            Err(_) => 0,
        };
        if suppressed > 0 {
            tracing::warn!(
                peer = %from,
                "refused frame from peer {from}: {reason} ({suppressed} more refused since the last report)"
            );
        } else {
            tracing::warn!(peer = %from, "refused frame from peer {from}: {reason}");
        }
    }
}
