//! Fuzz target `proxy_header`: the property is `muxer_tests::fuzz_checks::proxy_header`.
#![no_main]
libfuzzer_sys::fuzz_target!(|bytes: &[u8]| muxer_tests::fuzz_checks::proxy_header(bytes));
