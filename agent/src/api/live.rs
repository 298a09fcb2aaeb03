//! The read side the API's state endpoints and the metrics share: the merged catalog, the health
//! board and the forwarder's table, looked at together at one moment.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::Instant,
};

use super::view::{BackendLive, CountersView, DrainProgress, ForwarderState, Health, ServiceState};
use crate::{
    catalog::{Catalog, Service, ServiceAddr},
    forwarder::{SharedTable, Table, table::ServiceShared},
    health::{BackendHealth, Board, Counters, Verdict},
    registry::{Registry, Source},
};

/// Handles on everything the agent knows live; cheap to clone.
#[derive(Clone)]
pub struct Live {
    pub registry: Registry,
    pub board: Arc<Board>,
    pub table: SharedTable,
}

/// One look at the catalog, the board and the table.
pub struct Snapshot {
    pub catalog: Arc<Catalog>,
    health: HashMap<(ServiceAddr, SocketAddr), Arc<BackendHealth>>,
    table: Arc<Table>,
    now: Instant,
}

pub use crate::registry::Ownership;

impl Live {
    pub fn snapshot(&self) -> Snapshot {
        let health = self
            .board
            .all()
            .into_iter()
            .map(|h| ((h.service, h.addr), h))
            .collect();
        Snapshot {
            catalog: self.registry.catalog(),
            health,
            table: self.table.load(),
            now: Instant::now(),
        }
    }

    /// Every source's layer, in precedence order.
    pub fn layers(&self) -> Vec<(Source, BTreeMap<String, Service>)> {
        self.registry
            .status()
            .into_iter()
            .map(|s| (s.source, self.registry.entries(s.source)))
            .collect()
    }

    /// Who serves each service of `catalog`, by service name: one look-up per service in the
    /// registry's indexes (this was a scan of every layer per service, quadratic in the catalog).
    pub fn owners(&self, catalog: &Catalog) -> HashMap<String, Ownership> {
        let owners = self.registry.owners();
        catalog
            .services
            .values()
            .filter_map(|s| Some((s.name.clone(), *owners.get(&s.addr)?)))
            .collect()
    }
}

impl Snapshot {
    pub fn health(&self, service: ServiceAddr, backend: SocketAddr) -> Option<&Arc<BackendHealth>> {
        self.health.get(&(service, backend))
    }

    /// The forwarder's service-wide counters (proxy mode only).
    pub fn forwarder(&self, s: &Service) -> Option<Arc<ServiceShared>> {
        self.table
            .get(&s.addr.vip)
            .filter(|p| p.addr == s.addr)
            .map(|p| p.shared.clone())
    }

    pub fn service(&self, name: &str) -> Option<&Service> {
        self.catalog
            .services
            .values()
            .find(|s| s.name == name)
            .map(|s| &**s)
    }

    /// The live state of `s`.
    pub fn state(&self, s: &Service, source: Option<Source>) -> ServiceState {
        let forwarder = self.forwarder(s).map(|f| ForwarderState {
            active: f.active.load(Ordering::Relaxed),
            refused_limit: f.refused_limit.load(Ordering::Relaxed),
            refused_no_backend: f.refused_no_backend.load(Ordering::Relaxed),
            retries: f.retries.load(Ordering::Relaxed),
        });
        let backends = s
            .backends
            .iter()
            .map(|b| {
                let h = self.health(s.addr, b.addr);
                let draining = h.is_some_and(|h| h.draining());
                BackendLive {
                    address: b.addr,
                    weight: b.weight,
                    state: b.state,
                    health: h.map_or(Health::Unknown, |h| health(h)),
                    ejected_for_seconds: h
                        .and_then(|h| h.ejected_until())
                        .filter(|&t| t > self.now)
                        .map(|t| (t - self.now).as_secs_f64()),
                    draining,
                    drain: h.filter(|_| draining).map(|h| DrainProgress {
                        open: h.counters.active.load(Ordering::Relaxed),
                        closed_at_deadline: h.counters.drained_closed.load(Ordering::Relaxed),
                    }),
                    counters: h.map(|h| counters(&h.counters)),
                }
            })
            .collect();
        ServiceState {
            name: s.name.clone(),
            vip: s.addr.vip,
            protocol: s.addr.protocol,
            mode: s.mode,
            source,
            forwarder,
            backends,
        }
    }

    /// Whether a passive-outlier ejection holds the backend out now.
    pub fn ejected(&self, h: &BackendHealth) -> bool {
        h.ejected_until().is_some_and(|t| t > self.now)
    }
}

pub fn health(h: &BackendHealth) -> Health {
    match h.verdict() {
        Verdict::Unknown => Health::Unknown,
        Verdict::Up => Health::Up,
        Verdict::Down => Health::Down,
    }
}

pub fn counters(c: &Counters) -> CountersView {
    let n = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    CountersView {
        active: n(&c.active),
        opened: n(&c.opened),
        closed: n(&c.closed),
        bytes_in: n(&c.bytes_in),
        bytes_out: n(&c.bytes_out),
        connect_failures: n(&c.connect_failures),
        connect_timeouts: n(&c.connect_timeouts),
        resets: n(&c.resets),
        ejections: n(&c.ejections),
        drained_closed: n(&c.drained_closed),
        checks_passed: n(&c.checks_passed),
        checks_failed: n(&c.checks_failed),
    }
}
