//! The command line.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Switchyard: a node-level service proxy agent. eBPF programs catch connections to service
/// addresses (VIP:port) in the kernel; the kernel balances them itself (kernel mode) or hands
/// them to the agent's forwarder (proxy mode).
#[derive(Debug, Parser)]
#[command(name = "switchyard", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: attach the programs to the configured cgroup, apply the services,
    /// forward proxy-mode connections. Stops cleanly on SIGINT or SIGTERM.
    Agent {
        /// The agent's TOML configuration (see README: Configuration).
        #[arg(long, short = 'c', value_name = "FILE")]
        config: PathBuf,
    },
    /// Detach the pinned programs and remove the pinned maps (run with the agent stopped).
    /// Kernel-mode services stop being steered.
    Cleanup {
        /// Take the pin directory from this configuration.
        #[arg(long, short = 'c', value_name = "FILE", conflicts_with = "pin_dir")]
        config: Option<PathBuf>,
        /// The pin directory itself (default: as the agent chooses it).
        #[arg(long, value_name = "DIR")]
        pin_dir: Option<PathBuf>,
    },
    /// Check a configuration file and exit: 0 if the agent would accept it.
    CheckConfig {
        #[arg(value_name = "FILE")]
        config: PathBuf,
    },
}
