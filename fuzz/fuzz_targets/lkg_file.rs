//! Fuzz target `lkg_file`: see `switchyard::fuzzing::lkg_file` for the input it takes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| switchyard::fuzzing::lkg_file(data));
