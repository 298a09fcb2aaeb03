//! Builds the eBPF programs (crate `switchyard-ebpf`) for the BPF target and leaves the object in
//! `OUT_DIR`, where `datapath::load` embeds it. Needs nightly with `rust-src` and `bpf-linker`;
//! `cargo xtask setup` installs them.
use std::path::Path;

use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let manifest = env!("CARGO_MANIFEST_DIR");
    let ebpf = Path::new(manifest)
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
