//! Fuzz target `sock_diag`: see `switchyard::fuzzing::sock_diag` for the input it takes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| switchyard::fuzzing::sock_diag(data));
