//! What the forwarder knows of the proxy-mode services. Rebuilt whole by the reconciler; the
//! per-backend health and counters are the node-wide [`Board`]'s, so they carry over.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::{
        Arc, RwLock,
        atomic::{AtomicU32, AtomicU64},
    },
    time::Duration,
};

use crate::{
    balance::{self, Balancer, Upstream},
    catalog::{BackendState, BytePath, Catalog, HashKey, Mode, Protocol, Service, ServiceAddr},
    defaults,
    health::Board,
};

/// Service-wide state shared by all its connections (survives table rebuilds).
#[derive(Debug, Default)]
pub struct ServiceShared {
    pub active: AtomicU64,
    /// Connections admitted and not yet ended, connecting or not: what `max_connections`
    /// bounds (see `occupancy::Admission`).
    pub admitted: AtomicU64,
    pub retries_in_flight: AtomicU32,
    pub refused_limit: AtomicU64,
    pub refused_no_backend: AtomicU64,
    pub retries: AtomicU64,
}

pub struct ProxyService {
    /// The catalog entry this was built from: an unchanged entry reuses the whole service.
    spec: Service,
    pub name: String,
    pub addr: ServiceAddr,
    pub backends: Vec<Upstream>,
    pub balancer: Balancer,
    pub connect_timeout: Duration,
    pub retries: u32,
    pub max_connections: Option<u32>,
    /// Session affinity by client address, with its timeout.
    pub affinity: Option<Duration>,
    pub idle_timeout: Option<Duration>,
    pub hash_key: HashKey,
    pub byte_path: BytePath,
    pub outlier_failures: u32,
    pub outlier_ejection: Duration,
    pub shared: Arc<ServiceShared>,
    /// HTTP mode's upstream connections (empty for `tcp` services).
    pub pool: Arc<crate::http::Pool>,
    /// Some backend's address is itself a service address, which the connect hooks would
    /// steer: only then do upstream sockets carry the agent's mark. Otherwise the hooks let
    /// the connect pass anyway, and the mark would cost a `setsockopt` per connection.
    pub marked: bool,
}

#[derive(Default)]
pub struct Table {
    services: HashMap<SocketAddr, Arc<ProxyService>>,
    shared: HashMap<ServiceAddr, Arc<ServiceShared>>,
    /// The same services by name: route destinations are looked up per request.
    names: HashMap<String, Arc<ProxyService>>,
    /// The addresses of these services' backends: a service address that comes or goes at
    /// one of them changes which services are [`ProxyService::marked`].
    backend_addrs: HashSet<SocketAddr>,
}

/// Agent-wide forwarding settings (`[forwarder]`) a service's policy may override.
#[derive(Clone, Copy, Debug)]
pub struct ForwardingDefaults {
    pub connect_timeout: Duration,
    pub retries: u32,
}

impl Table {
    pub fn get(&self, vip: &SocketAddr) -> Option<Arc<ProxyService>> {
        self.services.get(vip).cloned()
    }

    /// A service by name (route destinations).
    pub fn by_name(&self, name: &str) -> Option<Arc<ProxyService>> {
        self.names.get(name).cloned()
    }

    pub fn services(&self) -> impl Iterator<Item = &Arc<ProxyService>> {
        self.services.values()
    }

    /// Whether `addr` is the address of one of these services' backends.
    pub fn has_backend(&self, addr: SocketAddr) -> bool {
        self.backend_addrs.contains(&canonical(addr))
    }

    /// The table for a catalog. Drains start for backends set to drain or maint, and for
    /// backends that left the catalog (their open connections still hold their health).
    pub fn build(
        catalog: &Catalog,
        previous: &Table,
        board: &Board,
        agent: ForwardingDefaults,
    ) -> Table {
        let mut services = HashMap::new();
        let mut shared = HashMap::new();
        // What the connect hooks steer: any mode's TCP service address.
        let steered: HashSet<SocketAddr> = catalog
            .services
            .keys()
            .filter(|a| a.protocol == Protocol::Tcp)
            .map(|a| canonical(a.vip))
            .collect();
        for (addr, s) in &catalog.services {
            if s.mode != Mode::Proxy || addr.protocol != Protocol::Tcp {
                continue;
            }
            let marked = s
                .backends
                .iter()
                .any(|b| steered.contains(&canonical(b.addr)));
            // Unchanged: keep it whole (its balancer state, its hash tables). A catalog of
            // thousands of services changes one at a time.
            if let Some(old) = previous.services.get(&addr.vip)
                && old.spec == **s
                && old.marked == marked
            {
                shared.insert(*addr, old.shared.clone());
                services.insert(addr.vip, old.clone());
                continue;
            }
            let drain_timeout = s.policy.drain_timeout.unwrap_or(defaults::DRAIN_TIMEOUT);
            let backends: Vec<Upstream> = s
                .backends
                .iter()
                .map(|b| {
                    let health = board.get(*addr, b.addr);
                    if b.state == BackendState::Ready {
                        health.undrain();
                    } else {
                        health.drain(drain_timeout);
                    }
                    Upstream::new(b.addr, b.weight, b.state, health)
                })
                .collect();
            let balancer = Balancer::new(s.algorithm, &balance::candidates::all(&backends));
            let svc_shared = previous.shared.get(addr).cloned().unwrap_or_default();
            shared.insert(*addr, svc_shared.clone());
            services.insert(
                addr.vip,
                Arc::new(ProxyService {
                    spec: (**s).clone(),
                    name: s.name.clone(),
                    addr: *addr,
                    backends,
                    balancer,
                    connect_timeout: s.policy.connect_timeout.unwrap_or(agent.connect_timeout),
                    retries: s.policy.retries.unwrap_or(agent.retries),
                    max_connections: s.policy.max_connections,
                    affinity: s.affinity,
                    idle_timeout: s.policy.idle_timeout,
                    hash_key: s.policy.hash_key,
                    byte_path: s.policy.byte_path,
                    outlier_failures: s
                        .policy
                        .outlier_failures
                        .unwrap_or(defaults::OUTLIER_CONSECUTIVE_FAILURES),
                    outlier_ejection: s
                        .policy
                        .outlier_ejection
                        .unwrap_or(defaults::OUTLIER_BASE_EJECTION),
                    shared: svc_shared,
                    pool: Arc::new(crate::http::Pool::new(if s.policy.app_protocol.is_tcp() {
                        0
                    } else {
                        s.backends.len()
                    })),
                    marked,
                }),
            );
        }
        // Backends gone from the catalog: drain what is still open, under the old service's
        // deadline, then forget them.
        let listed = |service: &ServiceAddr, addr: &SocketAddr| {
            catalog
                .services
                .get(service)
                .is_some_and(|s| s.backends.iter().any(|b| b.addr == *addr))
        };
        for gone in board.retain(listed) {
            let timeout = catalog
                .services
                .get(&gone.service)
                .and_then(|s| s.policy.drain_timeout)
                .unwrap_or(defaults::DRAIN_TIMEOUT);
            gone.drain(timeout);
        }
        let names = services
            .values()
            .map(|s| (s.name.clone(), s.clone()))
            .collect();
        let backend_addrs = services
            .values()
            .flat_map(|s| s.backends.iter().map(|b| canonical(b.addr)))
            .collect();
        Table {
            services,
            shared,
            names,
            backend_addrs,
        }
    }
}

/// A v4-mapped IPv6 address as its IPv4 address: the hooks key both the same way.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

impl ProxyService {
    pub fn app_protocol(&self) -> crate::catalog::AppProtocol {
        self.spec.policy.app_protocol
    }
}

impl crate::http::Target for ProxyService {
    fn view(&self) -> crate::http::View<'_> {
        crate::http::View {
            name: &self.name,
            backends: &self.backends,
            balancer: &self.balancer,
            policy: &self.spec.policy,
            connect_timeout: self.connect_timeout,
            retries: self.retries,
            retry_codes: None,
            retry_backoff: None,
            outlier_failures: self.outlier_failures,
            outlier_ejection: self.outlier_ejection,
            active: &self.shared.active,
            retries_in_flight: &self.shared.retries_in_flight,
            retries_total: &self.shared.retries,
            pool: &self.pool,
        }
    }

    fn client_hash(&self, peer: SocketAddr) -> u64 {
        super::client_hash(peer, self.hash_key)
    }
}

/// The table shared between the reconciler (writer) and the connection tasks (readers).
#[derive(Clone, Default)]
pub struct SharedTable(Arc<RwLock<Arc<Table>>>);

impl SharedTable {
    pub fn load(&self) -> Arc<Table> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn store(&self, table: Table) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(table);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::{
        catalog::{BackendState, Catalog, Mode, Service},
        registry::{Registry, Source},
        test_helpers::{backend, service},
    };

    fn catalog(services: &[Service]) -> Catalog {
        let (registry, _rx) = Registry::open(None);
        let entries = services
            .iter()
            .map(|s| (s.name.clone(), s.clone()))
            .collect::<BTreeMap<_, _>>();
        registry.replace(Source::File, entries, &[]);
        (*registry.catalog()).clone()
    }

    fn proxy(name: &str, vip: &str, backends: &[&str]) -> Service {
        Service {
            mode: Mode::Proxy,
            backends: backends
                .iter()
                .map(|b| backend(b, 1, BackendState::Ready))
                .collect(),
            ..service(name, vip, &[])
        }
    }

    fn marked(table: &Table, vip: &str) -> bool {
        table.get(&vip.parse().unwrap()).unwrap().marked
    }

    #[test]
    fn only_connects_the_hooks_would_steer_carry_the_mark() {
        let board = Board::default();
        let agent = ForwardingDefaults {
            connect_timeout: Duration::from_secs(1),
            retries: 0,
        };
        let web = proxy("web", "10.96.0.1:80", &["10.0.0.1:8080"]);
        // A backend that is another service's address, once as its v4-mapped form.
        let front = proxy("front", "10.96.0.2:80", &["[::ffff:10.96.0.3]:80"]);
        let one = catalog(&[web.clone(), front.clone()]);
        let table = Table::build(&one, &Table::default(), &board, agent);
        assert!(!marked(&table, "10.96.0.1:80"));
        assert!(!marked(&table, "10.96.0.2:80"));
        assert!(table.has_backend("10.96.0.3:80".parse().unwrap()));

        // A kernel-mode service comes at front's backend: front is rebuilt, marked.
        let inner = service("inner", "10.96.0.3:80", &["10.0.0.9:80"]);
        let two = catalog(&[web.clone(), front.clone(), inner]);
        let table = Table::build(&two, &table, &board, agent);
        assert!(!marked(&table, "10.96.0.1:80"));
        assert!(marked(&table, "10.96.0.2:80"));

        // And goes: the mark goes with it.
        let table = Table::build(&one, &table, &board, agent);
        assert!(!marked(&table, "10.96.0.2:80"));
    }
}
