//! The read side the API's state endpoints and the metrics share: the merged catalog, the health
//! board and the forwarder's table, looked at together at one moment.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::Arc,
    time::Instant,
};

use switchyard_common::maps::BackendStats;

use crate::{
    catalog::{Catalog, Mode, Protocol, Service, ServiceAddr},
    datapath::maps::KernelLearned,
    forwarder::{SharedTable, Table, table::ServiceShared},
    health::{BackendHealth, Board},
    registry::{Registry, Source},
};

/// Handles on everything the agent knows live; cheap to clone.
#[derive(Clone)]
pub struct Live {
    pub registry: Registry,
    pub board: Arc<Board>,
    pub table: SharedTable,
    /// What the eBPF programs count per kernel-mode backend (`None` in tests without them).
    pub kernel: Option<Arc<KernelLearned>>,
    /// HTTP mode's request counters (docs/http.md).
    pub http: Arc<crate::http::stats::Stats>,
}

/// One look at the catalog, the board and the table.
pub struct Snapshot {
    pub catalog: Arc<Catalog>,
    health: HashMap<(ServiceAddr, SocketAddr), Arc<BackendHealth>>,
    table: Arc<Table>,
    now: Instant,
    /// The programs' entries by (TCP service address, backend), read at this moment.
    kernel: HashMap<(SocketAddr, SocketAddr), BackendStats>,
    /// The programs' clock (CLOCK_MONOTONIC) at this moment.
    pub kernel_now_ns: u64,
    /// HTTP mode's request counters (live, not copied).
    pub http: Arc<crate::http::stats::Stats>,
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
        let kernel = self
            .kernel
            .as_ref()
            .map(|k| {
                k.read()
                    .into_iter()
                    .map(|l| ((l.service, l.backend), l.stats))
                    .collect()
            })
            .unwrap_or_default();
        Snapshot {
            catalog: self.registry.catalog(),
            health,
            table: self.table.load(),
            now: Instant::now(),
            kernel,
            kernel_now_ns: crate::datapath::maps::kernel_now_ns(),
            http: self.http.clone(),
        }
    }

    /// Kernel-mode TCP sockets the programs follow now.
    pub fn kernel_sockets(&self) -> Option<usize> {
        self.kernel.as_ref().map(|k| k.tracked_sockets())
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

    /// What the programs count for a backend of a kernel-mode TCP service.
    pub fn kernel(&self, s: &Service, backend: SocketAddr) -> Option<&BackendStats> {
        if s.mode != Mode::Kernel || s.addr.protocol != Protocol::Tcp {
            return None;
        }
        self.kernel.get(&(s.addr.vip, backend))
    }

    pub fn service(&self, name: &str) -> Option<&Service> {
        self.catalog
            .services
            .values()
            .find(|s| s.name == name)
            .map(|s| &**s)
    }

    /// When the snapshot was taken.
    pub fn now(&self) -> Instant {
        self.now
    }

    /// Whether a passive-outlier ejection holds the backend out now.
    pub fn ejected(&self, h: &BackendHealth) -> bool {
        h.ejected_until().is_some_and(|t| t > self.now)
    }
}
