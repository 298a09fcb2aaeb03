use std::io::IsTerminal;

use clap::Parser;
use switchyard::{
    cli::{Cli, Command},
    config::AgentConfig,
    datapath::pin,
    run,
};
use tracing_subscriber::EnvFilter;

/// mimalloc rather than glibc's malloc: tokio's task cells and I/O registrations are
/// 128-byte aligned, and glibc's `posix_memalign` for each of them was the largest part of the
/// forwarder's own CPU on a new connection (docs/benchmarks.md, ninth pass). Built with
/// `no_thp` (agent/Cargo.toml): with transparent huge pages the agent's peak RSS doubled.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Kernel lines are already filtered in the kernel (`datapath.kernel_log`): show them all.
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,kernel=trace".into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match cli.command {
        // The control side; the forwarder runs its own threads (forwarder::workers).
        Command::Agent {
            config,
            no_handover,
            wait_after_handover,
        } => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?
            .block_on(run::agent(
                &config,
                run::Options {
                    handover: !no_handover,
                    wait_after_handover,
                },
            )),
        Command::Cleanup { config, pin_dir } => {
            let dir = match (config, pin_dir) {
                (_, Some(dir)) => dir,
                (Some(c), None) => AgentConfig::load(&c)?
                    .datapath
                    .pin_dir
                    .unwrap_or_else(pin::default_dir),
                (None, None) => pin::default_dir(),
            };
            run::cleanup(&dir)
        }
        Command::CheckConfig { config } => {
            let c = AgentConfig::load(&config)?;
            println!(
                "{}: ok, {} services",
                config.display(),
                c.catalog.services.len()
            );
            Ok(())
        }
        // The client's own exit status: 0 done, 1 refused, 2 unreachable or bad usage.
        Command::Ctl(args) => std::process::exit(switchyard::ctl::run(args)),
    }
}
