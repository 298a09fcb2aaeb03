//! Catalog fixtures for the unit tests: a service is a name, an address and its backends, with
//! everything else at its default (kernel mode, TCP, round robin); a test sets only what it is
//! about, with `Service { mode: Mode::Proxy, ..service(…) }`.

use crate::catalog::{
    Algorithm, Backend, BackendState, Mode, Policy, Protocol, Service, ServiceAddr,
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
