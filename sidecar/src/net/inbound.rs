//! The read side: accepting connections, reading one frame per stream, datagrams.
//!
//! Every stream is read in its own task, so a slow, stalled or hostile stream never holds
//! up the others. A bad frame is refused (the stream is stopped with [`CODE_REFUSED`]),
//! logged with the peer's address and the reason, and counted; the connection stays up.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Semaphore};

use super::envelope::{self, FrameError, PREFIX_LEN};
use super::limits::{self, Budgets, FramePermit, FRAME_DEADLINE};
use super::{Channel, Incoming, Inner, PeerIdentity, SwimPacket};

/// Stream stop/reset codes, so the sender learns why.
const CODE_REFUSED: u32 = 1;
const CODE_NO_REPLY: u32 = 2;
const CODE_REPLY_TOO_LARGE: u32 = 3;

/// Explains a stop/reset code received from a peer.
pub(super) fn refusal_reason(code: quinn::VarInt) -> String {
    match code.into_inner() {
        c if c == u64::from(CODE_REFUSED) => "frame refused (see the peer's log)".to_string(),
        c if c == u64::from(CODE_NO_REPLY) => {
            "the peer dropped the request without answering".to_string()
        }
        c if c == u64::from(CODE_REPLY_TOO_LARGE) => {
            "the reply exceeds the frame limit".to_string()
        }
        c => format!("stream reset with code {c}"),
    }
}

/// Why reading a frame failed.
pub(super) enum ReadFail {
    /// The bytes were bad: refuse and count.
    Frame(FrameError),
    /// The peer reset the stream.
    Reset(quinn::VarInt),
    /// The connection failed or the stream stalled: nothing to count.
    Io(String),
}

/// Reads one length-prefixed frame that must fill the rest of the stream; returns the
/// envelope bytes and their share of the budgets. The prefix is checked against `max`
/// before any body is read, and the body is read only once its bytes are reserved from
/// `conn` and the node-wide `budgets` (`limits.rs`), into a buffer of exactly its size.
pub(super) async fn read_frame(
    recv: &mut quinn::RecvStream,
    max: usize,
    budgets: &Budgets,
    conn: &Arc<Semaphore>,
) -> Result<(Vec<u8>, FramePermit), ReadFail> {
    match tokio::time::timeout(FRAME_DEADLINE, read_frame_inner(recv, max, budgets, conn)).await {
        Ok(r) => r,
        Err(_) => Err(ReadFail::Io(format!(
            "frame not complete within {FRAME_DEADLINE:?}"
        ))),
    }
}

async fn read_frame_inner(
    recv: &mut quinn::RecvStream,
    max: usize,
    budgets: &Budgets,
    conn: &Arc<Semaphore>,
) -> Result<(Vec<u8>, FramePermit), ReadFail> {
    let mut prefix = [0u8; PREFIX_LEN];
    match recv.read_exact(&mut prefix).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(got)) => {
            return Err(ReadFail::Frame(FrameError::Truncated {
                expected: PREFIX_LEN,
                got,
            }))
        }
        Err(quinn::ReadExactError::ReadError(e)) => return Err(read_error(e)),
    }
    let len = envelope::frame_len(prefix, max).map_err(ReadFail::Frame)?;
    let permit = budgets.reserve(conn, len).await;
    let mut body = Vec::with_capacity(len);
    while body.len() < len {
        match recv.read_chunk(len - body.len(), true).await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk.bytes),
            Ok(None) => {
                return Err(ReadFail::Frame(FrameError::Truncated {
                    expected: len,
                    got: body.len(),
                }))
            }
            Err(e) => return Err(read_error(e)),
        }
    }
    match recv.read_chunk(1, true).await {
        Ok(None) => Ok((body, permit)),
        Ok(Some(_)) => Err(ReadFail::Frame(FrameError::Corrupt(
            "bytes after the announced frame length".to_string(),
        ))),
        Err(e) => Err(read_error(e)),
    }
}

fn read_error(e: quinn::ReadError) -> ReadFail {
    match e {
        quinn::ReadError::Reset(code) => ReadFail::Reset(code),
        other => ReadFail::Io(other.to_string()),
    }
}

/// Accepts connections until the endpoint closes. Past [`limits::MAX_HANDSHAKES`]
/// handshakes in progress or [`limits::MAX_CONNECTIONS`] connections peers opened, new
/// ones are refused (the peer sees CONNECTION_REFUSED and retries later).
pub(super) async fn accept_loop(inner: Arc<Inner>) {
    while let Some(incoming) = inner.endpoint.accept().await {
        let remote = incoming.remote_address();
        let (Ok(handshake), Ok(slot)) = (
            inner.handshakes.clone().try_acquire_owned(),
            inner.connections.clone().try_acquire_owned(),
        ) else {
            // Logged on the 1st, 2nd, 4th, 8th… refusal: a flood cannot flood the log.
            let n = inner.connections_refused.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                tracing::warn!(
                    peer = %remote,
                    "refusing a connection from {remote}: {} handshakes or {} connections \
                     already in progress ({n} refused so far)",
                    limits::MAX_HANDSHAKES,
                    limits::MAX_CONNECTIONS
                );
            }
            incoming.refuse();
            continue;
        };
        let inner = inner.clone();
        tokio::spawn(async move {
            let accepted = incoming.await;
            drop(handshake);
            match accepted {
                Ok(conn) => {
                    inner.adopt(&conn);
                    serve_connection(inner, conn).await;
                }
                Err(e) => log_handshake_failure(&inner, remote, &e, "accepting"),
            }
            // The connection slot is held until the connection is done.
            drop(slot);
        });
    }
}

/// Logs a failed handshake. Unreachable peers are routine (debug); a refused handshake —
/// a certificate from another CA, no client certificate — is a warning and is counted.
pub(super) fn log_handshake_failure(
    inner: &Inner,
    peer: SocketAddr,
    e: &quinn::ConnectionError,
    dir: &str,
) {
    use quinn::ConnectionError as E;
    match e {
        E::ConnectionClosed(c) if c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED => {
            tracing::debug!(%peer, error = %e, "peer {peer} is not accepting connections (shutting down?)");
        }
        E::TimedOut | E::LocallyClosed | E::Reset => {
            tracing::debug!(%peer, error = %e, "{dir} connection with peer {peer} failed");
        }
        _ => {
            inner.handshakes_rejected.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%peer, error = %e, "{dir} connection with peer {peer} refused: {e}");
        }
    }
}

/// The identity of the peer of `conn`: its certificate's fingerprint under mutual TLS
/// (the handshake verified it against the cluster CA), else its address.
fn identify(inner: &Inner, conn: &quinn::Connection) -> PeerIdentity {
    let addr = conn.remote_address();
    if !inner.authenticated {
        return PeerIdentity::Address(addr);
    }
    let certs = conn.peer_identity().and_then(|any| {
        any.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
            .ok()
    });
    match certs.as_deref().and_then(|c| c.first()) {
        Some(cert) => PeerIdentity::Certificate(hex::encode(
            ring::digest::digest(&ring::digest::SHA256, cert.as_ref()).as_ref(),
        )),
        // Mutual TLS always yields a certificate; should it not, the address is the
        // narrower claim (it cannot let another address take a binding over).
        None => PeerIdentity::Address(addr),
    }
}

/// Serves one connection (accepted or dialed) until it closes: streams and datagrams.
pub(super) async fn serve_connection(inner: Arc<Inner>, conn: quinn::Connection) {
    let _open = OpenConnection::count(&inner);
    let from = conn.remote_address();
    let peer = identify(&inner, &conn);
    let budget = limits::connection_budget(inner.max_frame);
    loop {
        tokio::select! {
            uni = conn.accept_uni() => match uni {
                Ok(recv) => {
                    let from = Source { addr: from, peer: peer.clone(), budget: budget.clone() };
                    tokio::spawn(serve_uni(inner.clone(), from, recv));
                }
                Err(e) => { closed(&inner, from, &conn, e).await; break; }
            },
            bi = conn.accept_bi() => match bi {
                Ok((send, recv)) => {
                    let from = Source { addr: from, peer: peer.clone(), budget: budget.clone() };
                    tokio::spawn(serve_bi(inner.clone(), from, send, recv));
                }
                Err(e) => { closed(&inner, from, &conn, e).await; break; }
            },
            dg = conn.read_datagram() => match dg {
                Ok(bytes) => match envelope::decode_as(&bytes, inner.cluster_id, inner.version) {
                    Ok(env) => deliver_swim(&inner, from, env.payload).await,
                    Err(e) => inner.reject(from, &format!("datagram: {e}")),
                },
                Err(e) => { closed(&inner, from, &conn, e).await; break; }
            },
        }
    }
}

async fn closed(
    inner: &Inner,
    from: SocketAddr,
    conn: &quinn::Connection,
    e: quinn::ConnectionError,
) {
    tracing::debug!(peer = %from, error = %e, "connection with peer {from} closed");
    inner.forget(from, conn).await;
}

/// Counts a connection as open for as long as it is served.
struct OpenConnection<'a>(&'a Inner);

impl<'a> OpenConnection<'a> {
    fn count(inner: &'a Inner) -> Self {
        inner.open_connections.fetch_add(1, Ordering::Relaxed);
        OpenConnection(inner)
    }
}

impl Drop for OpenConnection<'_> {
    fn drop(&mut self) {
        self.0.open_connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A SWIM packet: to the membership channel when one is routed, without waiting (a full
/// channel drops the packet: SWIM tolerates loss, and a reader stalled behind the
/// membership task would stall every stream of the connection too); else, as before, to
/// the [`Incoming`] channel, where awaiting is the backpressure.
async fn deliver_swim(inner: &Inner, from: SocketAddr, payload: Vec<u8>) {
    inner.usage.touch(from, Channel::Swim);
    let Some(swim) = inner.swim.get() else {
        return deliver(inner, Incoming::Datagram { from, payload }).await;
    };
    match swim.try_send(SwimPacket { from, payload }) {
        Ok(()) => {}
        Err(mpsc::error::TrySendError::Full(_)) => {
            let n = inner.swim_dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                tracing::warn!(
                    peer = %from,
                    "SWIM packet from peer {from} dropped: the membership task is behind \
                     ({n} dropped so far)"
                );
            }
        }
        // The membership task stopped: the node is shutting down.
        Err(mpsc::error::TrySendError::Closed(_)) => {}
    }
}

async fn deliver(inner: &Inner, msg: Incoming) {
    // An error means the receiver is gone (the node is shutting down): nothing to do.
    let _ = inner.incoming.send(msg).await;
}

/// Where a stream comes from: the connection's address, identity and frame budget.
struct Source {
    addr: SocketAddr,
    peer: PeerIdentity,
    budget: Arc<Semaphore>,
}

/// Reads and decodes one frame; the permit covers the decoded payload.
async fn read_envelope(
    inner: &Inner,
    from: &Source,
    recv: &mut quinn::RecvStream,
) -> Result<(envelope::Envelope, FramePermit), ReadFail> {
    let (bytes, permit) = read_frame(recv, inner.max_frame, &inner.budgets, &from.budget).await?;
    let env =
        envelope::decode_as(&bytes, inner.cluster_id, inner.version).map_err(ReadFail::Frame)?;
    Ok((env, permit))
}

async fn serve_uni(inner: Arc<Inner>, src: Source, mut recv: quinn::RecvStream) {
    let env = read_envelope(&inner, &src, &mut recv).await;
    let Source {
        addr: from, peer, ..
    } = src;
    match env {
        Ok((env, _permit)) if env.as_datagram || env.channel == Channel::Swim => {
            deliver_swim(&inner, from, env.payload).await
        }
        Ok((env, permit)) => {
            inner.usage.touch(from, env.channel);
            deliver(
                &inner,
                Incoming::Message {
                    from,
                    peer,
                    channel: env.channel,
                    payload: env.payload,
                    permit,
                    version: env.version,
                },
            )
            .await
        }
        Err(fail) => refuse(&inner, from, &mut recv, fail),
    }
    // `recv` is dropped only now: holding it while the channel is full keeps this stream's
    // credit, so a peer cannot open more streams than QUIC allows while we are behind.
}

fn refuse(inner: &Inner, from: SocketAddr, recv: &mut quinn::RecvStream, fail: ReadFail) {
    match fail {
        ReadFail::Frame(e) => {
            inner.reject(from, &e.to_string());
            let _ = recv.stop(CODE_REFUSED.into());
        }
        ReadFail::Reset(code) => tracing::debug!(peer = %from, %code, "peer reset its stream"),
        ReadFail::Io(e) => {
            tracing::debug!(peer = %from, error = %e, "stream from peer {from} failed");
            let _ = recv.stop(CODE_REFUSED.into());
        }
    }
}

async fn serve_bi(
    inner: Arc<Inner>,
    src: Source,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let env = read_envelope(&inner, &src, &mut recv).await;
    let Source {
        addr: from, peer, ..
    } = src;
    let (env, permit) = match env {
        Ok(e) => e,
        Err(fail) => {
            refuse(&inner, from, &mut recv, fail);
            let _ = send.reset(CODE_REFUSED.into());
            return;
        }
    };
    let (tx, rx) = oneshot::channel();
    let channel = env.channel;
    inner.usage.touch(from, channel);
    deliver(
        &inner,
        Incoming::Request {
            from,
            peer,
            channel,
            payload: env.payload,
            reply: tx,
            permit,
        },
    )
    .await;
    let Ok(reply) = rx.await else {
        let _ = send.reset(CODE_NO_REPLY.into());
        return;
    };
    if reply.len() + 64 > inner.max_frame {
        tracing::warn!(peer = %from, len = reply.len(), "reply to peer {from} exceeds the frame limit");
        let _ = send.reset(CODE_REPLY_TOO_LARGE.into());
        return;
    }
    let frame = inner.frame(channel, &reply, false);
    inner.usage.touch(from, channel);
    if super::write_frame(&mut send, &frame).await.is_err() {
        tracing::debug!(peer = %from, "writing the reply to peer {from} failed (it went away?)");
    }
}
