//! What the forwarder knows of the proxy-mode services. Replaced whole by the reconciler;
//! per-backend statistics carry over from one table to the next.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use crate::{
    balance::{Balancer, Candidate},
    catalog::{BackendState, Catalog, Mode, Protocol, ServiceAddr},
};

/// Counters of one backend of one service, kept across catalog changes.
#[derive(Debug, Default)]
pub struct UpstreamStats {
    pub active: AtomicU64,
    pub opened: AtomicU64,
    pub connect_failures: AtomicU64,
}

pub struct Upstream {
    pub addr: SocketAddr,
    pub weight: u32,
    pub state: BackendState,
    pub stats: Arc<UpstreamStats>,
}

pub struct ProxyService {
    pub name: String,
    pub backends: Vec<Upstream>,
    pub balancer: Balancer,
    pub connect_timeout: Duration,
    pub retries: u32,
}

/// One upstream as a balancing candidate for one attempt.
pub struct Attempt<'a> {
    pub upstream: &'a Upstream,
    pub tried: bool,
}

impl Candidate for Attempt<'_> {
    fn weight(&self) -> u32 {
        self.upstream.weight
    }
    fn usable(&self) -> bool {
        !self.tried && self.upstream.state == BackendState::Ready && self.upstream.weight > 0
    }
}

#[derive(Default)]
pub struct Table {
    services: HashMap<SocketAddr, Arc<ProxyService>>,
}

impl Table {
    pub fn get(&self, vip: &SocketAddr) -> Option<Arc<ProxyService>> {
        self.services.get(vip).cloned()
    }

    /// The table for a catalog; statistics of backends present in `previous` carry over.
    pub fn build(
        catalog: &Catalog,
        previous: &Table,
        connect_timeout: Duration,
        retries: u32,
    ) -> Table {
        let mut services = HashMap::new();
        for (addr, s) in &catalog.services {
            if s.mode != Mode::Proxy || addr.protocol != Protocol::Tcp {
                continue;
            }
            let old = previous.services.get(&addr.vip);
            let backends = s
                .backends
                .iter()
                .map(|b| Upstream {
                    addr: b.addr,
                    weight: b.weight,
                    state: b.state,
                    stats: old
                        .and_then(|o| o.backends.iter().find(|u| u.addr == b.addr))
                        .map(|u| u.stats.clone())
                        .unwrap_or_default(),
                })
                .collect();
            services.insert(
                addr.vip,
                Arc::new(ProxyService {
                    name: s.name.clone(),
                    backends,
                    balancer: Balancer::new(s.algorithm),
                    connect_timeout,
                    retries,
                }),
            );
        }
        Table { services }
    }

    pub fn contains(&self, addr: &ServiceAddr) -> bool {
        addr.protocol == Protocol::Tcp && self.services.contains_key(&addr.vip)
    }

    pub fn active_connections(&self) -> u64 {
        self.services
            .values()
            .flat_map(|s| s.backends.iter())
            .map(|u| u.stats.active.load(Ordering::Relaxed))
            .sum()
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
