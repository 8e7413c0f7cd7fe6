//! Builds the eBPF programs (crate `muxer-ebpf`) with nightly and bpf-linker, so that `muxer` can
//! embed the object file. `cargo xtask setup` installs what this needs.
use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    // Fuzz builds (cargo-fuzz sets `--cfg fuzzing`) exercise parsers only; they embed no object,
    // and the eBPF build would otherwise see the sanitizer flags.
    if std::env::var_os("CARGO_CFG_FUZZING").is_some() {
        let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").context("OUT_DIR")?);
        std::fs::write(out.join("muxer"), b"").context("writing the empty object")?;
        return Ok(());
    }
    let ebpf = aya_build::Package {
        name: "muxer-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../muxer-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], aya_build::Toolchain::default()).context(
        "building the eBPF programs failed; `cargo xtask setup` installs nightly's rust-src and bpf-linker",
    )
}
