//! The PostgreSQL gateway's session model stays in step with the server: random
//! Parse/Bind/Describe/Execute/Close/Sync/Query sequences (two bytes per message) between a
//! client and a model of PostgreSQL's names, transactions and errors, answers read at random
//! points. Panics where a row would go out unmasked, the denied DELETE would run, or the
//! gateway would lose track of the answers (`state/sim.rs`; the same check as the property
//! test `random_sequences`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    bulkhead::proxy::postgres::fuzz_state_sequences(data);
});
