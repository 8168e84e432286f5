//! The wire envelope every stream frame and datagram carries, as pure functions.
//!
//! An envelope is a CBOR array `[version, cluster_id, channel, payload, as_datagram?]`
//! (minicbor derive). Streams carry exactly one frame each: a 4-byte big-endian length
//! prefix and then the envelope; datagrams carry the bare envelope. Nothing here does I/O,
//! so every way a frame can be bad is unit-tested (and fuzzed with proptest) on its own.

use minicbor::{Decode, Encode};

use super::Channel;

/// The protocol version this build speaks.
///
/// # Rolling upgrades: the rule
/// From the per-origin protocol (version 3) on, release N (speaking version N)
/// interoperates with releases N−1 and N+1, so a fleet upgrades one node at a time: a
/// node accepts frames of [`accepted`]`(N)` = `max(3, N−1)..=N+1` and refuses any other
/// with both versions logged (and counted in `patina_frames_rejected_total`). Two
/// versions apart means upgrading through the release in between.
///
/// What makes adjacent versions work: every frame's envelope carries the sender's
/// version, and each node remembers, per peer, the version of the last frame it got from
/// it (`sync::PeerVersions`). A message kind or field introduced in version N+1 is
/// optional on the wire (new CBOR field numbers, skipped by older decoders) or a new
/// message kind sent only to peers known to speak N+1 or later; a peer not heard from
/// yet counts as speaking the oldest version this node accepts. A message kind a node
/// does not know (or knows only from a later version than its own) is ignored and
/// counted (`patina_sync_unknown_messages_total`), never a reason to drop the connection.
/// Tests simulate the next release with `PATINA_TEST_RELEASE_AHEAD` (agent, test-only).
///
/// Version 2 carries TEXT values as CBOR byte strings (they need not be UTF-8), which a
/// version-1 node cannot decode, so version 1 is refused rather than misread. Version 3
/// is per-origin sync (broadcast trees of origin units, summaries, catch-up pulls that
/// leave out what the requester holds); its messages share nothing with version 2's
/// cursor-relay protocol, so version 2 is refused the same way.
pub const PROTOCOL_VERSION: u16 = 3;

/// The oldest version any build interoperates with (see [`PROTOCOL_VERSION`]): the
/// per-origin protocol. Below it nothing is shared.
pub const MIN_PROTOCOL_VERSION: u16 = 3;

/// The versions a node speaking `ours` accepts: the one before it (not below
/// [`MIN_PROTOCOL_VERSION`]), its own and the one after it.
pub fn accepted(ours: u16) -> std::ops::RangeInclusive<u16> {
    ours.saturating_sub(1).max(MIN_PROTOCOL_VERSION)..=ours.saturating_add(1)
}

/// Bytes of the stream length prefix.
pub const PREFIX_LEN: usize = 4;

/// The envelope as it is encoded; `channel` stays a raw number so a frame from a newer
/// peer with an unknown channel is refused with a reason rather than a decode error.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
#[cbor(array)]
struct Wire {
    #[n(0)]
    version: u16,
    #[n(1)]
    cluster_id: u64,
    #[n(2)]
    channel: u8,
    #[cbor(n(3), with = "minicbor::bytes")]
    payload: Vec<u8>,
    /// Set when a datagram too large for the path travels on a uni stream instead, so the
    /// receiver still hands it to membership as a datagram.
    #[n(4)]
    as_datagram: Option<bool>,
}

/// A decoded, validated envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub version: u16,
    pub channel: Channel,
    pub payload: Vec<u8>,
    pub as_datagram: bool,
}

/// Why a frame was refused. Refusing changes nothing but the `frames_rejected` counter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The length prefix announces more than `max_frame_bytes`; the body is not read.
    #[error("frame of {len} bytes is larger than the limit of {max} bytes")]
    Oversized { len: usize, max: usize },
    /// The stream ended before the length prefix or the announced body was complete.
    #[error("truncated frame: expected {expected} bytes, got {got}")]
    Truncated { expected: usize, got: usize },
    /// The bytes are not a CBOR envelope (or carry bytes after it).
    #[error("corrupt frame: {0}")]
    Corrupt(String),
    /// A protocol version this node cannot interoperate with (see [`PROTOCOL_VERSION`]:
    /// a release interoperates with the one before and the one after it).
    #[error(
        "protocol version {theirs} is not supported: this node speaks version {ours} and \
         accepts {}..={}; a release interoperates only with the release before and the \
         one after it, so upgrade through the releases in between",
        accepted(*ours).start(),
        accepted(*ours).end()
    )]
    UnknownVersion { theirs: u16, ours: u16 },
    /// The peer belongs to another cluster (`gossip.cluster_id`).
    #[error("cluster id {theirs} does not match this node's cluster id {ours}")]
    WrongCluster { ours: u64, theirs: u64 },
    /// A channel number this build does not know.
    #[error("unknown channel {0}")]
    UnknownChannel(u8),
}

fn channel_code(channel: Channel) -> u8 {
    match channel {
        Channel::Swim => 0,
        Channel::Sync => 1,
    }
}

fn channel_from_code(code: u8) -> Option<Channel> {
    match code {
        0 => Some(Channel::Swim),
        1 => Some(Channel::Sync),
        _ => None,
    }
}

/// Encodes an envelope (no length prefix): the datagram form.
pub fn encode(cluster_id: u64, channel: Channel, payload: &[u8], as_datagram: bool) -> Vec<u8> {
    encode_with_version(PROTOCOL_VERSION, cluster_id, channel, payload, as_datagram)
}

/// [`encode`] with an explicit version (tests and adjacent-version checks).
pub fn encode_with_version(
    version: u16,
    cluster_id: u64,
    channel: Channel,
    payload: &[u8],
    as_datagram: bool,
) -> Vec<u8> {
    let wire = Wire {
        version,
        cluster_id,
        channel: channel_code(channel),
        payload: payload.to_vec(),
        as_datagram: as_datagram.then_some(true),
    };
    // Encoding this struct into a Vec cannot fail: the writer is infallible and no field
    // has a custom encoder that reports errors.
    minicbor::to_vec(&wire).unwrap_or_default()
}

/// Encodes a stream frame: length prefix, then the envelope.
pub fn encode_frame(
    cluster_id: u64,
    channel: Channel,
    payload: &[u8],
    as_datagram: bool,
) -> Vec<u8> {
    encode_frame_with_version(PROTOCOL_VERSION, cluster_id, channel, payload, as_datagram)
}

/// [`encode_frame`] with an explicit version (a node speaking another version).
pub fn encode_frame_with_version(
    version: u16,
    cluster_id: u64,
    channel: Channel,
    payload: &[u8],
    as_datagram: bool,
) -> Vec<u8> {
    let body = encode_with_version(version, cluster_id, channel, payload, as_datagram);
    let mut out = Vec::with_capacity(PREFIX_LEN + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// Reads the length prefix and checks it against the limit before any body is read.
pub fn frame_len(prefix: [u8; PREFIX_LEN], max: usize) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > max {
        return Err(FrameError::Oversized { len, max });
    }
    if len == 0 {
        return Err(FrameError::Corrupt("empty frame".to_string()));
    }
    Ok(len)
}

/// Decodes and validates one envelope (the whole slice must be the envelope) as a node
/// speaking [`PROTOCOL_VERSION`].
pub fn decode(bytes: &[u8], cluster_id: u64) -> Result<Envelope, FrameError> {
    decode_as(bytes, cluster_id, PROTOCOL_VERSION)
}

/// [`decode`] for a node speaking version `ours`: versions outside [`accepted`]`(ours)`
/// are refused.
pub fn decode_as(bytes: &[u8], cluster_id: u64, ours: u16) -> Result<Envelope, FrameError> {
    let mut d = minicbor::Decoder::new(bytes);
    let wire: Wire = d.decode().map_err(|e| FrameError::Corrupt(e.to_string()))?;
    if d.position() != bytes.len() {
        return Err(FrameError::Corrupt(format!(
            "{} bytes after the envelope",
            bytes.len() - d.position()
        )));
    }
    if !accepted(ours).contains(&wire.version) {
        return Err(FrameError::UnknownVersion {
            theirs: wire.version,
            ours,
        });
    }
    if wire.cluster_id != cluster_id {
        return Err(FrameError::WrongCluster {
            ours: cluster_id,
            theirs: wire.cluster_id,
        });
    }
    let channel =
        channel_from_code(wire.channel).ok_or(FrameError::UnknownChannel(wire.channel))?;
    Ok(Envelope {
        version: wire.version,
        channel,
        payload: wire.payload,
        as_datagram: wire.as_datagram == Some(true),
    })
}

/// Decodes a complete stream frame held in memory (prefix + envelope).
pub fn decode_frame(bytes: &[u8], cluster_id: u64, max: usize) -> Result<Envelope, FrameError> {
    let Some(prefix) = bytes.get(..PREFIX_LEN) else {
        return Err(FrameError::Truncated {
            expected: PREFIX_LEN,
            got: bytes.len(),
        });
    };
    let mut p = [0u8; PREFIX_LEN];
    p.copy_from_slice(prefix);
    let len = frame_len(p, max)?;
    let body = &bytes[PREFIX_LEN..];
    if body.len() < len {
        return Err(FrameError::Truncated {
            expected: len,
            got: body.len(),
        });
    }
    if body.len() > len {
        return Err(FrameError::Corrupt(format!(
            "{} bytes after the frame",
            body.len() - len
        )));
    }
    decode(body, cluster_id)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MAX: usize = 1 << 20;

    #[test]
    fn round_trip_stream_frame() {
        let frame = encode_frame(7, Channel::Sync, b"hello", false);
        let env = decode_frame(&frame, 7, MAX).unwrap();
        assert_eq!(env.channel, Channel::Sync);
        assert_eq!(env.payload, b"hello");
        assert_eq!(env.version, PROTOCOL_VERSION);
        assert!(!env.as_datagram);
    }

    #[test]
    fn round_trip_datagram_flag() {
        let env = decode(&encode(0, Channel::Swim, &[1, 2, 3], true), 0).unwrap();
        assert!(env.as_datagram);
        assert_eq!(env.payload, vec![1, 2, 3]);
    }

    #[test]
    fn wrong_cluster_is_refused() {
        let frame = encode(1, Channel::Sync, b"x", false);
        assert_eq!(
            decode(&frame, 2),
            Err(FrameError::WrongCluster { ours: 2, theirs: 1 })
        );
    }

    #[test]
    fn adjacent_version_accepted_others_refused() {
        let next = encode_with_version(PROTOCOL_VERSION + 1, 0, Channel::Sync, b"x", false);
        assert!(decode(&next, 0).is_ok());
        let far = encode_with_version(PROTOCOL_VERSION + 2, 0, Channel::Sync, b"x", false);
        assert_eq!(
            decode(&far, 0),
            Err(FrameError::UnknownVersion {
                theirs: PROTOCOL_VERSION + 2,
                ours: PROTOCOL_VERSION
            })
        );
        // Versions 1 (TEXT as CBOR text) and 2 (cursor relays): refused, with both
        // versions in the reason.
        for v in [1, 2] {
            let old = encode_with_version(v, 0, Channel::Sync, b"x", false);
            let err = decode(&old, 0).unwrap_err();
            assert_eq!(
                err,
                FrameError::UnknownVersion {
                    theirs: v,
                    ours: PROTOCOL_VERSION
                }
            );
            let msg = err.to_string();
            assert!(
                msg.contains(&format!("version {v} is not supported"))
                    && msg.contains("speaks version 3"),
                "{msg}"
            );
        }
    }

    #[test]
    fn a_release_accepts_the_one_before_and_the_one_after() {
        assert_eq!(accepted(3), 3..=4, "nothing below the per-origin protocol");
        assert_eq!(accepted(4), 3..=5);
        assert_eq!(accepted(9), 8..=10);
        // A simulated next release (4) and the current one (3) understand each other.
        let from_next = encode_with_version(4, 0, Channel::Sync, b"x", false);
        assert_eq!(decode_as(&from_next, 0, 3).map(|e| e.version), Ok(4));
        let from_current = encode_with_version(3, 0, Channel::Sync, b"x", false);
        assert_eq!(decode_as(&from_current, 0, 4).map(|e| e.version), Ok(3));
        // Two apart: refused both ways, both versions in the reason.
        let from_far = encode_with_version(5, 0, Channel::Sync, b"x", false);
        let err = decode_as(&from_far, 0, 3).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("version 5 is not supported") && msg.contains("speaks version 3"),
            "{msg}"
        );
        let err = decode_as(&from_current, 0, 5).unwrap_err();
        assert_eq!(err, FrameError::UnknownVersion { theirs: 3, ours: 5 });
        assert!(err.to_string().contains("accepts 4..=6"), "{err}");
        // The sync machine speaks what the transport speaks.
        assert_eq!(
            crate::sync::SyncConfig::default().protocol,
            PROTOCOL_VERSION
        );
    }

    #[test]
    fn newer_peer_with_extra_field_is_understood() {
        // A peer of the next version appending a field we do not know: skipped, not refused.
        let mut e = minicbor::Encoder::new(Vec::new());
        e.array(6).unwrap();
        e.u16(PROTOCOL_VERSION + 1)
            .unwrap()
            .u64(0)
            .unwrap()
            .u8(1)
            .unwrap()
            .bytes(b"p")
            .unwrap();
        e.null().unwrap().str("future").unwrap();
        let env = decode(&e.into_writer(), 0).unwrap();
        assert_eq!(env.payload, b"p");
    }

    #[test]
    fn unknown_channel_refused() {
        let mut e = minicbor::Encoder::new(Vec::new());
        e.array(4).unwrap();
        e.u16(PROTOCOL_VERSION)
            .unwrap()
            .u64(0)
            .unwrap()
            .u8(9)
            .unwrap()
            .bytes(b"p")
            .unwrap();
        assert_eq!(
            decode(&e.into_writer(), 0),
            Err(FrameError::UnknownChannel(9))
        );
    }

    #[test]
    fn oversized_prefix_refused_before_body() {
        let mut frame = encode_frame(0, Channel::Sync, &[0; 100], false);
        assert!(matches!(
            decode_frame(&frame, 0, 50),
            Err(FrameError::Oversized { max: 50, .. })
        ));
        frame[..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            decode_frame(&frame, 0, MAX),
            Err(FrameError::Oversized { .. })
        ));
    }

    #[test]
    fn truncated_and_trailing_refused() {
        let frame = encode_frame(0, Channel::Sync, b"abcdef", false);
        assert!(matches!(
            decode_frame(&frame[..frame.len() - 1], 0, MAX),
            Err(FrameError::Truncated { .. })
        ));
        assert!(matches!(
            decode_frame(&frame[..2], 0, MAX),
            Err(FrameError::Truncated { .. })
        ));
        let mut long = frame.clone();
        long.push(0);
        assert!(matches!(
            decode_frame(&long, 0, MAX),
            Err(FrameError::Corrupt(_))
        ));
        let body = encode(0, Channel::Sync, b"abc", false);
        let mut trailing = body.clone();
        trailing.push(0);
        assert!(matches!(decode(&trailing, 0), Err(FrameError::Corrupt(_))));
    }

    #[test]
    fn garbage_is_corrupt() {
        assert!(matches!(
            decode(b"\xff\xff garbage", 0),
            Err(FrameError::Corrupt(_))
        ));
        assert!(matches!(decode(&[], 0), Err(FrameError::Corrupt(_))));
        assert!(matches!(
            frame_len([0; 4], MAX),
            Err(FrameError::Corrupt(_))
        ));
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(&bytes, 0);
            let _ = decode_frame(&bytes, 0, MAX);
        }

        #[test]
        fn round_trip_any_payload(
            cluster in any::<u64>(),
            payload in proptest::collection::vec(any::<u8>(), 0..2048),
            sync in any::<bool>(),
            dgram in any::<bool>(),
        ) {
            let channel = if sync { Channel::Sync } else { Channel::Swim };
            let env = decode_frame(&encode_frame(cluster, channel, &payload, dgram), cluster, MAX)
                .unwrap();
            prop_assert_eq!(env.channel, channel);
            prop_assert_eq!(env.payload, payload);
            prop_assert_eq!(env.as_datagram, dgram);
        }

        #[test]
        fn flipped_bytes_never_panic(
            payload in proptest::collection::vec(any::<u8>(), 0..64),
            idx in any::<usize>(),
            val in any::<u8>(),
        ) {
            let mut frame = encode_frame(3, Channel::Sync, &payload, false);
            let i = idx % frame.len();
            frame[i] = val;
            let _ = decode_frame(&frame, 3, MAX);
        }
    }
}
