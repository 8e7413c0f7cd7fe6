//! Fuzz target `config`: the property is `muxer_tests::fuzz_checks::config`.
#![no_main]
libfuzzer_sys::fuzz_target!(|bytes: &[u8]| muxer_tests::fuzz_checks::config(bytes));
