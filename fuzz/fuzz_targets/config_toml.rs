//! Fuzz target `config_toml`: see `switchyard::fuzzing::config_toml` for the input it takes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| switchyard::fuzzing::config_toml(data));
