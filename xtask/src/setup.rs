//! Installs what a task needs, idempotently: each missing piece gets one line saying what is
//! being installed and why, then the task goes on.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

/// How much a task needs.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Needs {
    /// Build the agent and its eBPF programs.
    Build,
    /// Also run the demo's world (namespaces, cgroups).
    Demo,
    /// Also every test's servers and tools.
    Test,
    /// The demo's world and the benchmark's peers, backends and load generators (not the
    /// tests' servers: a level beside `Test`, not above it).
    Bench,
}

/// Debian packages and why.
const BUILD_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    // etcd-client compiles etcd's gRPC protos: protoc and the well-known types it imports.
    "protobuf-compiler",
    "libprotobuf-dev",
];
const DEMO_PACKAGES: &[&str] = &["iproute2"];
/// The registry sources' servers: etcd (and `etcdctl` to write keys; `openssl` makes its TLS
/// test certificates), and dnsmasq for DNS (`dnsmasq-base`: the binary alone, without a system
/// service that would take port 53); podman builds the agent's image (with runc: crun refuses
/// hybrid cgroup hosts).
const TEST_PACKAGES: &[&str] = &[
    "etcd-server",
    "etcd-client",
    "openssl",
    "dnsmasq-base",
    "podman",
    "runc",
    // promtool and a real Prometheus server for the metrics tests.
    "prometheus",
    // HTTP mode's clients (curl, and nghttp for HTTP/2 on one connection) and the redis
    // server and client that `auto` detection must pass through untouched.
    "curl",
    "nghttp2-client",
    "redis-server",
    "redis-tools",
    // The kernel-learning tests' backend that is slow to accept.
    "python3",
];
/// The peers Switchyard is measured against (HAProxy, nginx `stream` and `http`), the backends
/// (nginx, iperf3, redis-server) and the load generators (wrk, iperf3, redis-benchmark, and
/// h2load from nghttp2-client for HTTP/2 and gRPC).
const BENCH_PACKAGES: &[&str] = &[
    "haproxy",
    "nginx",
    "libnginx-mod-stream",
    "wrk",
    "iperf3",
    "redis-server",
    "redis-tools",
    "nghttp2-client",
];

/// bpf-linker built against LLVM 22: its default feature wants LLVM 23, which Debian here lacks.
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_BIN: &str = "/usr/lib/llvm-22/bin";

pub fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
}

/// PATH with `$CARGO_HOME/bin` first, so a freshly installed bpf-linker is found.
pub fn path_with_cargo_bin() -> String {
    let bin = cargo_home().join("bin");
    let old = std::env::var("PATH").unwrap_or_default();
    format!("{}:{old}", bin.display())
}

pub fn run(needs: Needs) -> anyhow::Result<()> {
    let mut packages: Vec<&str> = BUILD_PACKAGES.to_vec();
    if needs >= Needs::Demo {
        packages.extend(DEMO_PACKAGES);
    }
    if needs == Needs::Test {
        packages.extend(TEST_PACKAGES);
    }
    if needs == Needs::Bench {
        packages.extend(BENCH_PACKAGES);
    }
    debian(&packages)?;
    nightly_rust_src()?;
    bpf_linker()?;
    Ok(())
}

fn quiet(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

fn debian(packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("setup: installing Debian packages: {}", missing.join(" "));
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "installing Debian packages needs root: run `sudo apt-get install {}`",
            missing.join(" ")
        );
    }
    let status = Command::new("apt-get")
        .args(["update", "-qq"])
        .stdout(Stdio::null())
        .status()
        .context("apt-get update")?;
    if !status.success() {
        bail!("apt-get update failed");
    }
    let status = Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdout(Stdio::null())
        .status()
        .context("apt-get install")?;
    if !status.success() {
        bail!("apt-get install {} failed", missing.join(" "));
    }
    Ok(())
}

fn nightly_rust_src() -> anyhow::Result<()> {
    let has_nightly = Command::new("rustup")
        .args(["toolchain", "list"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("nightly"));
    if !has_nightly {
        println!("setup: installing the nightly Rust toolchain (eBPF programs build with it)");
        let ok = Command::new("rustup")
            .args(["toolchain", "install", "nightly", "--profile", "minimal"])
            .args(["--component", "rust-src,clippy,rustfmt"])
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            bail!("rustup toolchain install nightly failed");
        }
    }
    let installed = Command::new("rustup")
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .output()
        .context("rustup component list")?;
    let installed = String::from_utf8_lossy(&installed.stdout).into_owned();
    for component in ["rust-src", "clippy"] {
        if !installed.lines().any(|l| l.starts_with(component)) {
            println!("setup: installing nightly's {component} (eBPF build and lint)");
            let ok = Command::new("rustup")
                .args(["component", "add", component, "--toolchain", "nightly"])
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                bail!("rustup component add {component} --toolchain nightly failed");
            }
        }
    }
    Ok(())
}

fn bpf_linker() -> anyhow::Result<()> {
    let path = path_with_cargo_bin();
    if quiet(
        Command::new("bpf-linker")
            .arg("--version")
            .env("PATH", &path),
    ) {
        return Ok(());
    }
    println!(
        "setup: installing bpf-linker {BPF_LINKER_VERSION} (built against LLVM 22, about 2 minutes)"
    );
    // llvm-sys finds llvm-config on PATH; /usr/bin/llvm-config is an older LLVM.
    let status = Command::new("cargo")
        .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
        .args(["--no-default-features", "--features", "llvm-22", "--quiet"])
        .env("PATH", format!("{LLVM_BIN}:{path}"))
        .status()
        .context("cargo install bpf-linker")?;
    if !status.success() {
        bail!("cargo install bpf-linker failed");
    }
    Ok(())
}

/// cargo-fuzz, for `cargo xtask fuzz` and `soak` only (the test suite runs the fuzz seeds as
/// ordinary tests and needs none of it).
pub fn cargo_fuzz() -> anyhow::Result<()> {
    nightly_rust_src()?;
    let path = path_with_cargo_bin();
    if quiet(
        Command::new("cargo")
            .args(["+nightly", "fuzz", "--version"])
            .env("PATH", &path),
    ) {
        return Ok(());
    }
    println!("setup: installing cargo-fuzz (runs the fuzz targets; a few minutes to build)");
    let status = Command::new("cargo")
        .args(["install", "cargo-fuzz", "--locked", "--quiet"])
        .env("PATH", &path)
        .status()
        .context("cargo install cargo-fuzz")?;
    if !status.success() {
        bail!("cargo install cargo-fuzz failed");
    }
    Ok(())
}
