//! Fuzz target `kubernetes_entries`: see `switchyard::fuzzing::kubernetes_entries` for the input it takes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| switchyard::fuzzing::kubernetes_entries(data));
