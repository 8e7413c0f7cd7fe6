//! Fuzz target `probes`: the property is `muxer_tests::fuzz_checks::probes`.
#![no_main]
libfuzzer_sys::fuzz_target!(|bytes: &[u8]| muxer_tests::fuzz_checks::probes(bytes));
