//! Builds the eBPF programs (crate `muxer-ebpf`) with nightly and bpf-linker, so that `muxer` can
//! embed the object file. `cargo xtask setup` installs what this needs.
use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let ebpf = aya_build::Package {
        name: "muxer-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../muxer-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], aya_build::Toolchain::default()).context(
        "building the eBPF programs failed; `cargo xtask setup` installs nightly's rust-src and bpf-linker",
    )
}
