//! Fuzz target `dns_answer`: see `switchyard::fuzzing::dns_answer` for the input it takes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| switchyard::fuzzing::dns_answer(data));
