//! The harness for Switchyard's integration tests and demo.
//!
//! A test builds a small world of its own and tears it down whatever happens (every piece is a
//! drop guard): a child cgroup v2 (never the root), a "node" network namespace with a bridge,
//! "pod" and "backend" namespaces joined to it by veth pairs with no route anywhere else, real
//! backends (`sy-probe serve`), the servers the registry sources follow (etcd, dnsmasq:
//! [`servers`]; stand-ins for the Kubernetes API and Consul, which cannot run here: [`standin`]), and
//! the agent as a real process, reached through its API socket, `switchyard ctl` and its metrics
//! address ([`control`]). Nothing it starts is ended but by its PID. The fault-injection
//! suite's load, held connections and reports are in [`fault`]; what the tests write into the
//! agent's config ([`entries`]) and ask of the answers ([`expect`]) is shared too.

pub mod agent;
pub mod cgroup;
pub mod control;
pub mod entries;
pub mod expect;
pub mod fault;
pub mod http;
pub mod netns;
pub mod process;
pub mod servers;
pub mod standin;
pub mod topology;

use std::path::PathBuf;

pub use agent::Agent;
pub use cgroup::Cgroup;
pub use netns::Netns;
pub use process::Process;
pub use topology::Topology;

/// Root-only tests call this first. Not root: under `CI=true` it fails the test; elsewhere it
/// says loudly that the test is skipped, and the test returns.
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test}: needs root (eBPF, cgroups, network namespaces), and CI must run it");
    }
    eprintln!("\n*** SKIPPED {test}: needs root (eBPF, cgroups, network namespaces) ***\n");
    false
}

/// A built binary of this workspace: `$ENV` if set (xtask sets them), else `target/debug/NAME`.
pub fn binary(env: &str, name: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        return p.into();
    }
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    dir.join("debug").join(name)
}

/// A name unique to this process and call, short enough for interface names (15 bytes).
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{}x{n}", std::process::id() % 100_000)
}
