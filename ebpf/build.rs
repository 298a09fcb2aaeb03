use which::which;

/// Rebuild when bpf-linker changes: cargo cannot see it, since it is only the BPF target's linker.
fn main() {
    if let Ok(linker) = which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
