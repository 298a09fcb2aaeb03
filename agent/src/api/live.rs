//! The read side the API's state endpoints and the metrics share: the merged catalog, the health
//! board and the forwarder's table, looked at together at one moment.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::Instant,
};

use switchyard_common::maps::BackendStats;

use super::view::{
    BackendLive, CountersView, DrainProgress, ForwarderState, Health, KernelBackendView,
    ServiceState,
};
use crate::{
    catalog::{Catalog, Mode, Protocol, Service, ServiceAddr},
    datapath::{learned, maps::KernelLearned},
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
    /// What the eBPF programs count per kernel-mode backend (`None` in tests without them).
    pub kernel: Option<Arc<KernelLearned>>,
}

/// One look at the catalog, the board and the table.
pub struct Snapshot {
    pub catalog: Arc<Catalog>,
    health: HashMap<(ServiceAddr, SocketAddr), Arc<BackendHealth>>,
    table: Arc<Table>,
    now: Instant,
    /// The programs' entries by (TCP service address, backend), read at this moment.
    kernel: HashMap<(SocketAddr, SocketAddr), BackendStats>,
    /// The programs' clock at this moment.
    pub kernel_now_ns: u64,
}

/// Who serves a service: the source whose entry won, and the source an API override hides.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ownership {
    pub source: Source,
    pub overrides: Option<Source>,
}

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

    /// Who serves each service of `catalog`, by service name.
    pub fn owners(&self, catalog: &Catalog) -> HashMap<String, Ownership> {
        let layers = self.layers();
        catalog
            .services
            .values()
            .filter_map(|s| {
                let source = layers
                    .iter()
                    .find(|(_, entries)| entries.values().any(|e| e.addr == s.addr))
                    .map(|(source, _)| *source)?;
                let overrides = (source == Source::Api)
                    .then(|| {
                        layers
                            .iter()
                            .filter(|(src, _)| *src != Source::Api)
                            .find(|(_, entries)| {
                                entries
                                    .values()
                                    .any(|e| e.name == s.name || e.addr == s.addr)
                            })
                            .map(|(src, _)| *src)
                    })
                    .flatten();
                Some((s.name.clone(), Ownership { source, overrides }))
            })
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
        self.catalog.services.values().find(|s| s.name == name)
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
                let k = self.kernel(s, b.addr);
                let mut counters = h.map(|h| counters(&h.counters));
                if let Some(k) = k {
                    kernel_counters(counters.get_or_insert_with(Default::default), k);
                }
                BackendLive {
                    address: b.addr,
                    weight: b.weight,
                    state: b.state,
                    health: h.map_or(Health::Unknown, |h| health(h)),
                    ejected_for_seconds: h
                        .and_then(|h| h.ejected_until())
                        .filter(|&t| t > self.now)
                        .map(|t| (t - self.now).as_secs_f64())
                        .or_else(|| k.and_then(|k| learned::ejected_for(k, self.kernel_now_ns))),
                    draining,
                    drain: h.filter(|_| draining).map(|h| DrainProgress {
                        open: h.counters.active.load(Ordering::Relaxed),
                        closed_at_deadline: h.counters.drained_closed.load(Ordering::Relaxed),
                    }),
                    counters,
                    kernel: k.map(|k| kernel_view(k, self.kernel_now_ns)),
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

/// The programs' counts in the forwarder's terms: active from the connect on, and every
/// attempt that ended (failed connects too) closed, so `opened = active + closed` holds.
fn kernel_counters(c: &mut CountersView, k: &BackendStats) {
    c.active = k.connecting.wrapping_add(k.active);
    c.opened = k.opened;
    c.closed = k.closed + k.failed;
    c.connect_failures = k.failed;
    c.ejections = k.ejections;
}

/// The peak EWMA decayed to `now_ns` (as the programs read it when they pick).
pub fn kernel_ewma_seconds(k: &BackendStats, now_ns: u64) -> f64 {
    let elapsed = now_ns.saturating_sub(k.ewma_stamp_ns) as f64;
    let decay = switchyard_common::maps::EWMA_DECAY_NS as f64;
    k.ewma_ns as f64 * (-elapsed / decay).exp() / 1e9
}

fn kernel_view(k: &BackendStats, now_ns: u64) -> KernelBackendView {
    KernelBackendView {
        connecting: k.connecting,
        established_open: k.active,
        opened: k.opened,
        established: k.established,
        closed: k.closed,
        failed: k.failed,
        syn_retransmits: k.syn_retransmits,
        consecutive_failures: k.consecutive_failures,
        ejections: k.ejections,
        connect_ewma_seconds: kernel_ewma_seconds(k, now_ns),
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
