//! The eBPF object built from `muxer-ebpf` by `build.rs`, embedded so the binary is self-contained.

/// The ELF object holding muxer's TC/XDP programs and maps, aligned for aya's loader.
pub(crate) static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/muxer"));

#[cfg(test)]
mod tests {
    #[test]
    fn embedded_object_is_a_bpf_elf_with_our_program() {
        let object = super::OBJECT;
        assert_eq!(&object[..4], b"\x7fELF");
        let machine = u16::from_le_bytes([object[18], object[19]]);
        assert_eq!(machine, 247, "e_machine must be EM_BPF");
        let has = |needle: &[u8]| object.windows(needle.len()).any(|w| w == needle);
        assert!(has(b"tc_ingress"));
        assert!(has(muxer_common::COUNTERS_MAP.as_bytes()));
    }
}
