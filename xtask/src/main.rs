//! `cargo xtask …`: the project's tasks, each installing what it needs first.

mod bench;
mod bench_registry;
mod build;
mod demo;
mod fuzz;
mod setup;
mod soak;
mod test;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Switchyard's tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing: nightly rust-src, LLVM 22, bpf-linker, Debian packages.
    Setup,
    /// Build the agent (with its eBPF programs) and the test probe.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Build, make a small world (cgroup, namespaces, three backends), start the agent and
    /// show connections to a kernel-mode and a proxy-mode service address being balanced.
    Demo,
    /// Format check, clippy (host crates and the eBPF crate), then every test.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// The fault-injection suite, longer and larger: 30 s of load per scenario, 10,000 idle
    /// connections; prints a table of the scenario reports (target/soak/report.jsonl). Then
    /// every fuzz target for a minute.
    Soak {
        /// Bound on the whole run; the load per scenario shrinks to fit (3 to 30 s).
        #[arg(long, default_value_t = 10.0)]
        minutes: f64,
        /// Idle connections the concurrency scenario holds.
        #[arg(long, default_value_t = 10_000)]
        idle: usize,
    },
    /// Every fuzz target (`fuzz/`) under libFuzzer for a while each, from its committed seeds
    /// (installs cargo-fuzz if missing). The test suite runs the seeds alone.
    Fuzz {
        /// How long each target runs.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Only this target.
        #[arg(long)]
        target: Option<String>,
    },
    /// Load 10,000 services × 10 backends from a file and from etcd (time, RSS), and time
    /// etcd changes to the first new connection that uses them.
    BenchRegistry {
        /// Fewer propagation samples.
        #[arg(long)]
        quick: bool,
    },
    /// Benchmark direct, kernel mode, proxy mode, HTTP mode, HAProxy and nginx side by side
    /// (wrk, iperf3, redis-benchmark, h2load, gRPC); print ratios, write
    /// target/bench/result.json and charts, and regenerate the README's benchmark section.
    Bench {
        /// About a minute and a half: 1 s per case, one repetition; leaves the README alone.
        #[arg(long)]
        quick: bool,
        /// Only one part of the cases: `l4` (wrk, iperf3, redis over the L4 paths) or `http`
        /// (wrk, h2load, gRPC over HTTP mode, the HTTP peers, proxy mode and direct); leaves
        /// the README alone.
        #[arg(long, value_name = "PART")]
        only: Option<String>,
        /// Instead of the tables: one workload (`new-connections` or `keep-alive`) with the
        /// agent and HAProxy under `strace -c` and `perf record`, system calls per connection
        /// side by side (target/bench/profile-*.txt); with `--only http`, HTTP mode and
        /// HAProxy `mode http`.
        #[arg(long, value_name = "WORKLOAD")]
        profile: Option<String>,
        /// Instead of the tables: one workload (`new-connections` or `keep-alive`), the agent
        /// and HAProxy in 2 s turns, 16 pairs in alternating order; per pair the ratio of
        /// throughput and of CPU (user and system) per connection or request, then their
        /// medians. The tightest side-by-side the machine allows, for before/after of a change
        /// (`SWITCHYARD_BIN` and `SY_PROBE_BIN` set: those binaries). With `--only http`,
        /// HTTP mode and HAProxy `mode http`.
        #[arg(long, value_name = "WORKLOAD", conflicts_with = "profile")]
        pairs: Option<String>,
    },
}

fn main() -> std::process::ExitCode {
    match task(Cli::parse().task) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn task(task: Task) -> anyhow::Result<()> {
    match task {
        Task::Setup => setup::run(setup::Needs::Test),
        Task::Build { release } => {
            setup::run(setup::Needs::Build)?;
            build::agent(release)
        }
        Task::Demo => demo::run(),
        Task::Test { args } => test::run(&args),
        Task::Soak { minutes, idle } => soak::run(minutes, idle),
        Task::Fuzz { seconds, target } => fuzz::run(seconds, target.as_deref()),
        Task::Bench {
            quick,
            only,
            profile,
            pairs,
        } => bench::run(
            quick,
            bench::Instead::of(profile.as_deref(), pairs.as_deref())?,
            only.as_deref(),
        ),
        Task::BenchRegistry { quick } => bench_registry::run(quick),
    }
}
