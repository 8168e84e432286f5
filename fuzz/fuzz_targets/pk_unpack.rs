//! The packed-key decoder behind `crsql_pack_columns` and `crsql_changes.pk`: any bytes
//! are refused or unpacked, and unpacked values pack to bytes that unpack and pack to the
//! same bytes again (compared as bytes: a NaN real is not equal to itself).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    patina::fuzzing::pk_round_trip(data);
});
