//! Fuzz target `path`: the property is `muxer_tests::fuzz_checks::path`.
#![no_main]
libfuzzer_sys::fuzz_target!(|bytes: &[u8]| muxer_tests::fuzz_checks::path(bytes));
