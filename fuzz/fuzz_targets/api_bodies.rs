//! The bodies of `POST /v1/transactions` and `POST /v1/queries`: any bytes are parsed into
//! statements or refused with a typed error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use patina_sidecar::http::json_values::{parse_body, StatementSpec};

fuzz_target!(|data: &[u8]| {
    let Ok(json) = parse_body(data) else { return };
    // /v1/queries: one statement.
    if let Ok(spec) = StatementSpec::from_json(&json) {
        let round = StatementSpec::from_json(&spec.to_json()).expect("a parsed spec re-parses");
        assert_eq!(round.sql, spec.sql);
    }
    // /v1/transactions: an array of statements.
    if let Some(items) = json.as_array() {
        for item in items {
            let _ = StatementSpec::from_json(item);
        }
    }
});
