//! The command line.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::defaults;

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
    /// forward proxy-mode connections. Stops cleanly on SIGINT or SIGTERM, draining its
    /// proxied connections. Started while another agent runs, it takes that agent's
    /// listening sockets over (README: Upgrade).
    Agent {
        /// The agent's TOML configuration (see README: Configuration).
        #[arg(long, short = 'c', value_name = "FILE")]
        config: PathBuf,
        /// Do not take the listeners over from a running agent (nor offer them to a successor).
        #[arg(long)]
        no_handover: bool,
        /// Once handed over and drained, wait for SIGTERM before exiting (under a DaemonSet an
        /// exited container is restarted, and would take the listeners back).
        #[arg(long)]
        wait_after_handover: bool,
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
        /// The agent's TOML configuration.
        #[arg(value_name = "FILE")]
        config: PathBuf,
    },
    /// Talk to a running agent through its local API (README: API and ctl): services,
    /// backends, live state, registry status. Tables by default, `--json` for scripts.
    ///
    /// Exit status: 0 done; 1 the agent refused the request (its message is printed); 2 the
    /// agent cannot be reached, or the command line or an input file is wrong.
    Ctl(CtlArgs),
}

#[derive(Debug, Args)]
pub struct CtlArgs {
    /// The agent's API socket (`[api] socket` in its config).
    #[arg(long, global = true, value_name = "PATH", default_value = defaults::API_SOCKET)]
    pub socket: PathBuf,
    /// Print the agent's JSON answer (or refusal) as it is, for scripts.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: CtlCommand,
}

#[derive(Debug, Subcommand)]
pub enum CtlCommand {
    /// List the services the agent serves, with the source each comes from.
    Services,
    /// Show, create, replace or delete one service; release an override.
    #[command(subcommand)]
    Service(ServiceCommand),
    /// Add or remove a service's backends; set their weight and state.
    ///
    /// On a service another source owns (the file, etcd, …) a change copies the service into
    /// the API's layer, which wins over the source until `ctl service release` hands it back.
    #[command(subcommand)]
    Backend(BackendCommand),
    /// List, show, create or replace, and delete HTTP routes (`[[route]]` tables).
    #[command(subcommand)]
    Route(RouteCommand),
    /// Live state: per backend, connections open and counted, health verdict, ejection, drain
    /// progress; per proxy-mode service, refusals and retries.
    State {
        /// Only this service.
        service: Option<String>,
    },
    /// The registry's sources: entries, live or not, last sync, staleness, rejected entries,
    /// last error.
    Registry,
    /// The agent's version and build, and this client's.
    Version,
}

#[derive(Debug, Subcommand)]
pub enum ServiceCommand {
    /// Show a service: its entry (as a `[[service]]` table writes it) and its source.
    Get {
        /// The service's name.
        name: String,
    },
    /// Create a service from FILE: JSON, or TOML, with the fields of a `[[service]]` table
    /// (`-` reads standard input). Refused if the name or the address is taken.
    Create {
        /// The entry: JSON, or TOML (fields, or one `[[service]]` table); `-` for stdin.
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Replace the service NAME with FILE's entry (created if there is none). On another
    /// source's service this makes an override.
    Replace {
        /// The service's name (the entry's `name`, if given, must be the same).
        name: String,
        /// The entry: JSON, or TOML (fields, or one `[[service]]` table); `-` for stdin.
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Delete a service the API created. Another source's service cannot be deleted here.
    Delete {
        /// The service's name.
        name: String,
    },
    /// Drop the API's override of another source's service: that source serves it again.
    Release {
        /// The service's name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum RouteCommand {
    /// Every route served, with its parent and source.
    List,
    /// Show a route as a `[[route]]` table writes it (JSON), and its source.
    Get {
        /// The route's name.
        name: String,
    },
    /// Create or replace the API's route NAME from FILE: JSON, or TOML with the fields of a
    /// `[[route]]` table (one `[[route]]` table is taken too); `-` reads standard input.
    Put {
        /// The route's name (the file's `name`, if given, must be the same).
        name: String,
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Delete a route the API made (another source's route cannot be deleted here).
    Delete {
        /// The route's name.
        name: String,
    },
}

/// A backend's administrative state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum StateArg {
    /// Takes new connections.
    Ready,
    /// No new connections; open ones run on until the service's drain deadline.
    Drain,
    /// Out of service: no new connections (open ones drain as for `drain`).
    Maint,
}

impl StateArg {
    pub fn name(self) -> &'static str {
        match self {
            StateArg::Ready => "ready",
            StateArg::Drain => "drain",
            StateArg::Maint => "maint",
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum BackendCommand {
    /// Add a backend to a service.
    Add {
        #[command(flatten)]
        backend: BackendRef,
        /// Share of new connections, 0 to 256 (default 1; 0 takes none).
        #[arg(long)]
        weight: Option<u32>,
        /// Administrative state (default ready).
        #[arg(long, value_enum)]
        state: Option<StateArg>,
    },
    /// Remove a backend from a service (its open proxied connections drain).
    Remove {
        #[command(flatten)]
        backend: BackendRef,
    },
    /// Set a backend's weight, state, or both.
    #[command(group = clap::ArgGroup::new("change").required(true).multiple(true))]
    Set {
        #[command(flatten)]
        backend: BackendRef,
        /// Share of new connections, 0 to 256 (0 takes none).
        #[arg(long, group = "change")]
        weight: Option<u32>,
        /// Administrative state.
        #[arg(long, value_enum, group = "change")]
        state: Option<StateArg>,
    },
    /// Drain a backend: no new connections, open ones finish (or close at the deadline).
    Drain {
        #[command(flatten)]
        backend: BackendRef,
    },
    /// Put a backend in maintenance: no new connections.
    Maint {
        #[command(flatten)]
        backend: BackendRef,
    },
    /// Make a backend ready again.
    Ready {
        #[command(flatten)]
        backend: BackendRef,
    },
}

/// Which backend of which service.
#[derive(Debug, Args)]
pub struct BackendRef {
    /// The service's name.
    pub service: String,
    /// The backend's address, `ip:port` (IPv6 as `[ip]:port`).
    pub address: String,
}
