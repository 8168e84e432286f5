//! Every byte string a peer can send on a stream or as a datagram: the length-prefixed
//! envelope, then the sync message inside it. Decoding must refuse or accept without
//! panicking, and whatever decodes re-encodes to something that decodes the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use patina_sidecar::net::envelope;
use patina_sidecar::sync::msg::Msg;
use patina_sidecar::sync::versions::{self, Decoded};

const CLUSTER: u64 = 7;
const MAX: usize = 1 << 20;

fuzz_target!(|data: &[u8]| {
    if let Ok(env) = envelope::decode_frame(data, CLUSTER, MAX) {
        let again = envelope::decode(
            &envelope::encode(CLUSTER, env.channel, &env.payload, env.as_datagram),
            CLUSTER,
        );
        assert_eq!(again.as_ref().map(|e| &e.payload), Ok(&env.payload));
    }
    let _ = envelope::decode(data, CLUSTER);
    // A node of each adjacent version: a kind it does not speak is Unknown, never a panic.
    let _ = envelope::decode_as(data, CLUSTER, envelope::PROTOCOL_VERSION + 1);
    for ours in [versions::BASE_VERSION, versions::BASE_VERSION + 1] {
        if let Ok(Decoded::Known(msg)) = versions::decode(data, ours) {
            assert!(msg.since() <= ours, "a kind of a later version decoded as known");
        }
    }
    if let Ok(msg) = Msg::decode(data) {
        let round = Msg::decode(&msg.encode()).expect("a decoded message re-encodes");
        assert_eq!(round.site(), msg.site());
    }
});
