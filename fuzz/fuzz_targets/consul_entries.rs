//! Fuzz target `consul_entries`: see `switchyard::fuzzing::consul_entries` for the input it takes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| switchyard::fuzzing::consul_entries(data));
