//! Catalog fixtures for the unit tests: a service is a name, an address and its backends, with
//! everything else at its default (kernel mode, TCP, round robin); a test sets only what it is
//! about, with `Service { mode: Mode::Proxy, ..service(…) }`. And config files around the
//! section a test is about.

use std::path::Path;

use crate::{
    catalog::{Algorithm, Backend, BackendState, Mode, Policy, Protocol, Service, ServiceAddr},
    config::AgentConfig,
};

/// `vip` and every backend are `ip:port`; backends are ready, of weight 1.
pub fn service(name: &str, vip: &str, backends: &[&str]) -> Service {
    Service {
        name: name.into(),
        addr: ServiceAddr {
            vip: vip.parse().unwrap(),
            protocol: Protocol::Tcp,
        },
        mode: Mode::Kernel,
        algorithm: Algorithm::RoundRobin,
        affinity: None,
        policy: Policy::default(),
        backends: backends
            .iter()
            .map(|b| backend(b, 1, BackendState::Ready))
            .collect(),
    }
}

pub fn backend(addr: &str, weight: u32, state: BackendState) -> Backend {
    Backend {
        addr: addr.parse().unwrap(),
        weight,
        state,
    }
}

/// A config file as the tests of one section read it: `rest` under a two-line `[datapath]`
/// head; an error comes back as its message.
pub fn config(rest: &str) -> Result<AgentConfig, String> {
    read("[datapath]\ncgroup = \"pods\"\n", rest)
}

/// The same with a forwarder (four lines of head), for proxy-mode entries.
pub fn config_with_forwarder(rest: &str) -> Result<AgentConfig, String> {
    read(
        "[datapath]\ncgroup = \"pods\"\n[forwarder]\nlisten = [\"10.77.0.1:15001\"]\n",
        rest,
    )
}

fn read(head: &str, rest: &str) -> Result<AgentConfig, String> {
    AgentConfig::parse(Path::new("t.toml"), &format!("{head}{rest}")).map_err(|e| e.to_string())
}
