//! Builds the eBPF programs (crate `switchyard-ebpf`) for the BPF target and leaves the object in
//! `OUT_DIR`, where `datapath::load` embeds it. Needs nightly with `rust-src` and `bpf-linker`;
//! `cargo xtask setup` installs them.
use std::path::Path;

use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    // The fuzz targets (`cargo xtask fuzz`) link the agent's parsers, never its programs: with
    // `AYA_BUILD_SKIP=1` (aya-build's own switch) the object embedded is empty, so that the
    // instrumented build needs no eBPF toolchain. Loading it would fail with a clear error.
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    if std::env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true")) {
        let out = std::env::var_os("OUT_DIR").context("OUT_DIR not set")?;
        std::fs::write(Path::new(&out).join("switchyard"), [])?;
        return Ok(());
    }
    // Read at run time, not compiled in: a build script reused from a target directory copied
    // or moved with another checkout must build this checkout's programs.
    let manifest = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR is not set")?;
    let ebpf = Path::new(&manifest)
        .parent()
        .ok_or_else(|| anyhow!("agent crate has no parent directory"))?
        .join("ebpf");
    let ebpf = ebpf.to_str().context("eBPF crate path is not UTF-8")?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "switchyard-ebpf",
            root_dir: ebpf,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
