//! Builds the eBPF programs (crate `switchyard-ebpf`) for the BPF target and leaves the object in
//! `OUT_DIR`, where `datapath::load` embeds it. Needs nightly with `rust-src` and `bpf-linker`;
//! `cargo xtask setup` installs them.
use std::path::Path;

use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
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
