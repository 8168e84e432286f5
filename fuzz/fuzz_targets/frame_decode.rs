//! Every byte string a peer can send on a stream or as a datagram: the length-prefixed
//! envelope, then the sync message inside it. Decoding must refuse or accept without
//! panicking, and whatever decodes re-encodes to something that decodes the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use patina_sidecar::net::envelope;
use patina_sidecar::sync::msg::Msg;

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
    if let Ok(msg) = Msg::decode(data) {
        let round = Msg::decode(&msg.encode()).expect("a decoded message re-encodes");
        assert_eq!(round.site(), msg.site());
    }
});
