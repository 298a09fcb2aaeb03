//! The reconciler: userspace's writer of the kernel's service maps and of the forwarder's
//! table. It translates a catalog into map entries (what balancing decides comes from
//! [`balance::slots`]) and writes them incrementally (unchanged services are not touched),
//! never letting a concurrent `connect()` see a half-written backend set (see
//! `switchyard_common::maps`).

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::Arc,
};

use switchyard_common::maps::{
    self as kmaps, Backend as KernelBackend, BackendId, Endpoint, SLOT_HALF, ServiceKey,
    ServiceValue, Settings, SlotKey,
};
use tracing::info;

use crate::{
    balance::{self, slots::slot_layout},
    catalog::{BackendState, Catalog, Mode, Protocol, Service, ServiceAddr},
    datapath::{KernelMaps, MapsError, addr::to_words},
    forwarder::{ForwardingDefaults, SharedTable, Table},
    health::Board,
};

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Maps(#[from] MapsError),
    #[error("more than {0} services: the service map is full")]
    TooManyServices(u32),
    #[error("more than {0} backends: the backend map is full")]
    TooManyBackends(u32),
}

/// Hands out small integer ids and takes them back.
struct IdPool {
    next: u32,
    free: Vec<u32>,
    max: u32,
}

impl IdPool {
    fn new(max: u32) -> Self {
        IdPool {
            next: 0,
            free: Vec::new(),
            max,
        }
    }
    fn take(&mut self) -> Option<u32> {
        self.free.pop().or_else(|| {
            (self.next < self.max).then(|| {
                self.next += 1;
                self.next - 1
            })
        })
    }
    fn give(&mut self, id: u32) {
        self.free.push(id);
    }
    /// Marks an id found in the maps as taken.
    fn reserve(&mut self, id: u32) {
        if id >= self.next {
            self.free.extend(self.next..id);
            self.next = id + 1;
        } else {
            self.free.retain(|&f| f != id);
        }
    }
}

/// A service a previous agent left in the maps.
struct Inherited {
    id: u32,
    live_half: usize,
    half_len: [u32; 2],
}

/// What the kernel holds for one service.
struct Applied {
    service: Service,
    id: u32,
    /// Which slot half is live (0 or 1) and how many slots each half holds.
    half: usize,
    half_len: [u32; 2],
    backend_ids: HashMap<SocketAddr, BackendId>,
}

/// What one `apply` changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub added: usize,
    pub updated: usize,
    pub removed: usize,
    /// Backends that left a UDP service's usable set: connected sockets pinned to them must be
    /// disconnected (see `datapath::udp`).
    pub udp_gone: Vec<SocketAddr>,
}

pub struct Reconciler {
    maps: KernelMaps,
    table: SharedTable,
    board: Arc<Board>,
    forwarding: ForwardingDefaults,
    applied: HashMap<ServiceAddr, Applied>,
    service_ids: IdPool,
    backend_ids: IdPool,
    /// Services found in the maps at start, not yet taken over by `apply`.
    inherited: HashMap<ServiceKey, Inherited>,
    /// Backend entries found at start; removed once the first `apply` has replaced them.
    inherited_backends: Vec<BackendId>,
}

impl Reconciler {
    pub fn new(
        maps: KernelMaps,
        table: SharedTable,
        board: Arc<Board>,
        forwarding: ForwardingDefaults,
    ) -> Self {
        Reconciler {
            maps,
            table,
            board,
            forwarding,
            applied: HashMap::new(),
            service_ids: IdPool::new(kmaps::MAX_SERVICES),
            backend_ids: IdPool::new(kmaps::MAX_BACKENDS),
            inherited: HashMap::new(),
            inherited_backends: Vec::new(),
        }
    }

    /// Takes over what a previous agent left in the pinned maps, so that its services keep
    /// working until `apply` rewrites them: their ids are kept (each service's new slots go into
    /// the half its readers do not use), and no id in use is handed out again.
    pub fn adopt(&mut self) -> Result<usize, MapsError> {
        let existing = self.maps.existing()?;
        let mut half_len: HashMap<u32, [u32; 2]> = HashMap::new();
        for k in &existing.slots {
            let half = (k.slot >= SLOT_HALF) as usize;
            let len = &mut half_len.entry(k.service).or_default()[half];
            *len = (*len).max(k.slot % SLOT_HALF + 1);
        }
        for (key, value) in &existing.services {
            self.service_ids.reserve(value.id);
            self.inherited.insert(
                *key,
                Inherited {
                    id: value.id,
                    live_half: (value.slot_base >= SLOT_HALF) as usize,
                    half_len: half_len.get(&value.id).copied().unwrap_or_default(),
                },
            );
        }
        for &id in &existing.backends {
            self.backend_ids.reserve(id);
        }
        self.inherited_backends = existing.backends;
        if !self.inherited.is_empty() {
            info!(
                services = self.inherited.len(),
                "adopted the services of a previous agent"
            );
        }
        Ok(self.inherited.len())
    }

    /// Tells the programs where the forwarder listens and how the agent marks its sockets.
    pub fn set_settings(&mut self, listen: &[SocketAddr], own_mark: u32) -> Result<(), MapsError> {
        let endpoint = |v4: bool| {
            listen
                .iter()
                .find(|a| a.is_ipv4() == v4)
                .map(|a| Endpoint {
                    addr: to_words(a.ip()),
                    port: a.port(),
                    _pad: 0,
                })
                .unwrap_or_default()
        };
        self.maps.set_settings(&Settings {
            forwarder4: endpoint(true),
            forwarder6: endpoint(false),
            own_mark,
            _pad: 0,
        })
    }

    /// Cgroups and ports the hooks must leave alone.
    pub fn set_opt_out(&mut self, cgroups: &[u64], ports: &[u16]) -> Result<(), MapsError> {
        self.maps.set_opt_out(cgroups, ports)
    }

    pub fn maps(&self) -> &KernelMaps {
        &self.maps
    }

    /// Makes the kernel and the forwarder match `catalog`. Backends that active health checks
    /// hold down are left out of the kernel's choices (the forwarder sees their health itself).
    pub fn apply(&mut self, catalog: &Catalog) -> Result<Changes, ReconcileError> {
        let started = std::time::Instant::now();
        let mut changes = Changes::default();
        let kernel_view = without_down(catalog, &self.board.down());
        let kernel_view: &Catalog = &kernel_view;
        // The forwarder learns of new proxy services before the kernel sends it their clients,
        // and forgets removed ones only after the kernel stops.
        let previous = self.table.load();
        let mut widened = catalog.clone();
        for (k, a) in &self.applied {
            if a.service.mode == Mode::Proxy && !catalog.services.contains_key(k) {
                widened.services.insert(*k, Arc::new(a.service.clone()));
            }
        }
        self.table.store(Table::build(
            &widened,
            &previous,
            &self.board,
            self.forwarding,
        ));

        let gone: Vec<ServiceAddr> = self
            .applied
            .keys()
            .filter(|k| !catalog.services.contains_key(k))
            .copied()
            .collect();
        for key in gone {
            if let Some(a) = self.applied.get(&key)
                && key.protocol == Protocol::Udp
            {
                changes.udp_gone.extend(a.service.usable().map(|b| b.addr));
            }
            self.remove(&key)?;
            changes.removed += 1;
        }
        for (key, service) in &kernel_view.services {
            if let Some(a) = self.applied.get(key)
                && key.protocol == Protocol::Udp
            {
                let now: HashSet<SocketAddr> = service.usable().map(|b| b.addr).collect();
                changes.udp_gone.extend(
                    a.service
                        .usable()
                        .map(|b| b.addr)
                        .filter(|b| !now.contains(b)),
                );
            }
            match self.applied.get(key) {
                Some(a) if a.service == **service => {}
                Some(_) => {
                    self.upsert(service)?;
                    changes.updated += 1;
                }
                None => {
                    self.upsert(service)?;
                    changes.added += 1;
                }
            }
        }
        let table = Table::build(catalog, &self.table.load(), &self.board, self.forwarding);
        self.table.store(table);
        if changes != Changes::default() {
            info!(
                added = changes.added,
                updated = changes.updated,
                removed = changes.removed,
                services = self.applied.len(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "catalog applied"
            );
        }
        Ok(changes)
    }

    fn upsert(&mut self, service: &Service) -> Result<(), ReconcileError> {
        let key = service_key(&service.addr);
        let state = (
            self.applied.remove(&service.addr),
            self.inherited.remove(&key),
        );
        let (id, half, mut half_len, mut backend_ids) = match state {
            (Some(a), _) => (a.id, 1 - a.half, a.half_len, a.backend_ids),
            (None, Some(old)) => (old.id, 1 - old.live_half, old.half_len, HashMap::new()),
            (None, None) => {
                let id = self
                    .service_ids
                    .take()
                    .ok_or(ReconcileError::TooManyServices(kmaps::MAX_SERVICES))?;
                (id, 0, [0, 0], HashMap::new())
            }
        };

        // Backends first: slots will point at them.
        let mut ids = Vec::with_capacity(service.backends.len());
        for b in &service.backends {
            let bid = match backend_ids.get(&b.addr) {
                Some(&bid) => bid,
                None => self
                    .backend_ids
                    .take()
                    .ok_or(ReconcileError::TooManyBackends(kmaps::MAX_BACKENDS))?,
            };
            backend_ids.insert(b.addr, bid);
            let kb = KernelBackend {
                addr: to_words(b.addr.ip()),
                port: b.addr.port(),
                state: kernel_state(b.state),
                _pad: 0,
            };
            self.maps.put_backend(bid, &kb)?;
            ids.push(bid);
        }

        // New slots into the half no reader uses, then flip the service entry to them.
        let slots = slot_layout(service, &ids);
        let base = half as u32 * SLOT_HALF;
        for (i, &bid) in slots.iter().enumerate() {
            let k = SlotKey {
                service: id,
                slot: base + i as u32,
            };
            self.maps.put_slot(&k, bid)?;
        }
        for i in slots.len() as u32..half_len[half] {
            self.maps.remove_slot(&SlotKey {
                service: id,
                slot: base + i,
            })?;
        }
        half_len[half] = slots.len() as u32;
        let value = ServiceValue {
            id,
            slot_base: base,
            slot_count: slots.len() as u32,
            affinity_timeout_s: service.affinity.map_or(0, |t| t.as_secs() as u32),
            mode: match service.mode {
                Mode::Kernel => kmaps::mode::KERNEL,
                Mode::Proxy => kmaps::mode::PROXY,
            },
            algorithm: balance::slots::kernel_algorithm(service.algorithm),
            flags: if service.affinity.is_some() {
                kmaps::service_flags::AFFINITY
            } else {
                0
            },
            _pad: 0,
        };
        self.maps.put_service(&key, &value)?;

        // Backends no longer listed: nothing points at them any more.
        let listed: HashSet<SocketAddr> = service.backends.iter().map(|b| b.addr).collect();
        let stale: Vec<(SocketAddr, BackendId)> = backend_ids
            .iter()
            .filter(|(a, _)| !listed.contains(a))
            .map(|(a, b)| (*a, *b))
            .collect();
        for (a, bid) in stale {
            self.maps.remove_backend(bid)?;
            self.backend_ids.give(bid);
            backend_ids.remove(&a);
        }

        self.applied.insert(
            service.addr,
            Applied {
                service: service.clone(),
                id,
                half,
                half_len,
                backend_ids,
            },
        );
        Ok(())
    }

    fn remove(&mut self, addr: &ServiceAddr) -> Result<(), ReconcileError> {
        let Some(a) = self.applied.get(addr) else {
            return Ok(());
        };
        self.maps.remove_service(&service_key(addr))?;
        for half in 0..2 {
            for i in 0..a.half_len[half] {
                let k = SlotKey {
                    service: a.id,
                    slot: half as u32 * SLOT_HALF + i,
                };
                self.maps.remove_slot(&k)?;
            }
        }
        for &bid in a.backend_ids.values() {
            self.maps.remove_backend(bid)?;
        }
        if let Some(a) = self.applied.remove(addr) {
            a.backend_ids
                .values()
                .for_each(|&b| self.backend_ids.give(b));
            self.service_ids.give(a.id);
        }
        Ok(())
    }
}

/// The catalog as the kernel should see it: backends held down by health checks are out of
/// service (`maint`), so no slot points at them and affinity lets go of them.
fn without_down<'a>(
    catalog: &'a Catalog,
    down: &HashSet<(ServiceAddr, SocketAddr)>,
) -> std::borrow::Cow<'a, Catalog> {
    if down.is_empty() {
        return std::borrow::Cow::Borrowed(catalog);
    }
    let mut view = catalog.clone();
    for (addr, s) in view.services.iter_mut() {
        // Only the services with a backend down are copied.
        if !s.backends.iter().any(|b| down.contains(&(*addr, b.addr))) {
            continue;
        }
        for b in Arc::make_mut(s).backends.iter_mut() {
            if down.contains(&(*addr, b.addr)) {
                b.state = BackendState::Maint;
            }
        }
    }
    std::borrow::Cow::Owned(view)
}

fn service_key(addr: &ServiceAddr) -> ServiceKey {
    ServiceKey {
        addr: to_words(addr.vip.ip()),
        port: addr.vip.port(),
        proto: match addr.protocol {
            Protocol::Tcp => kmaps::PROTO_TCP,
            Protocol::Udp => kmaps::PROTO_UDP,
        },
        _pad: 0,
    }
}

fn kernel_state(s: BackendState) -> u8 {
    match s {
        BackendState::Ready => kmaps::state::READY,
        BackendState::Drain => kmaps::state::DRAIN,
        BackendState::Maint => kmaps::state::MAINT,
    }
}
