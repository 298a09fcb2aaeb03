//! Fuzz target `service_json`: see `switchyard::fuzzing::service_json` for the input it takes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| switchyard::fuzzing::service_json(data));
