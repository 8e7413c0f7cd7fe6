//! Fuzz target `request_head`: the property is `muxer_tests::fuzz_checks::request_head`.
#![no_main]
libfuzzer_sys::fuzz_target!(|bytes: &[u8]| muxer_tests::fuzz_checks::request_head(bytes));
