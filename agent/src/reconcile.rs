//! The reconciler: userspace's writer of the kernel's service maps and of the forwarder's
//! table. It translates a catalog into map entries (what balancing decides comes from
//! [`balance::slots`]) and writes them incrementally (unchanged services are not touched),
//! never letting a concurrent `connect()` see a half-written backend set (see
//! `switchyard_common::maps`). The agent's loop in `run.rs` calls [`Reconciler::apply`] with
//! every catalog the registry publishes, and again when a health verdict changes.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    net::SocketAddr,
    sync::Arc,
};

use switchyard_common::maps::{
    self as kmaps, Backend as KernelBackend, BackendId, Endpoint, MemberKey, SLOT_HALF, ServiceKey,
    ServiceValue, Settings, SlotKey,
};
use tracing::{info, warn};

use crate::{
    balance::{self, slots::slot_layout},
    catalog::{Algorithm, BackendState, Catalog, Mode, Protocol, Service, ServiceAddr},
    datapath::{
        KernelMaps, MapsError,
        addr::{from_words, to_words},
        learned,
    },
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
    /// Its backends' ids, kept for the same addresses so affinity entries stay valid and what
    /// the programs count for open connections carries over the restart.
    backend_ids: HashMap<SocketAddr, BackendId>,
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
    /// Backend entries found at start; those the first `apply` did not take over are removed.
    inherited_backends: HashSet<BackendId>,
    /// `MEMBERS` entries found at start; likewise.
    inherited_members: Vec<MemberKey>,
    /// Whether an `apply` has completed: from then on the maps hold exactly the catalog.
    settled: bool,
    /// Services whose kernel view is in panic mode (too few healthy backends).
    panicking: HashSet<ServiceAddr>,
    /// What the last `apply` made the kernel and the forwarder hold, completely: the next one
    /// compares against it, so that it costs what changed (persistent maps diff by skipping
    /// what they share). `None` (at start, or after an `apply` failed part-way): compare
    /// everything.
    last: Option<Last>,
}

/// The catalog and its kernel view as last applied.
struct Last {
    catalog: Catalog,
    view: Catalog,
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
            inherited_backends: HashSet::new(),
            inherited_members: Vec::new(),
            settled: false,
            panicking: HashSet::new(),
            last: None,
        }
    }

    /// Takes over what a previous agent left in the pinned maps, so that its services keep
    /// working until `apply` rewrites them: their ids are kept (each service's new slots go into
    /// the half its readers do not use), and no id in use is handed out again.
    pub fn adopt(&mut self) -> Result<usize, MapsError> {
        let existing = self.maps.existing()?;
        let mut half_len: HashMap<u32, [u32; 2]> = HashMap::new();
        // A service's backends: what `MEMBERS` lists, and (over maps pinned before it) what
        // its slots point at.
        let mut listed: HashMap<u32, HashSet<BackendId>> = HashMap::new();
        for (k, bid) in &existing.slots {
            let half = (k.slot >= SLOT_HALF) as usize;
            let len = &mut half_len.entry(k.service).or_default()[half];
            *len = (*len).max(k.slot % SLOT_HALF + 1);
            listed.entry(k.service).or_default().insert(*bid);
        }
        for m in &existing.members {
            listed.entry(m.service).or_default().insert(m.backend);
        }
        let backends: HashMap<BackendId, KernelBackend> =
            existing.backends.iter().copied().collect();
        for (key, value) in &existing.services {
            self.service_ids.reserve(value.id);
            let mut backend_ids = HashMap::new();
            for bid in listed.get(&value.id).into_iter().flatten() {
                if let Some(b) = backends.get(bid) {
                    let addr = SocketAddr::new(from_words(&b.addr), b.port);
                    backend_ids.entry(addr).or_insert(*bid);
                }
            }
            self.inherited.insert(
                *key,
                Inherited {
                    id: value.id,
                    live_half: (value.slot_base >= SLOT_HALF) as usize,
                    half_len: half_len.get(&value.id).copied().unwrap_or_default(),
                    backend_ids,
                },
            );
        }
        for &(id, _) in &existing.backends {
            self.backend_ids.reserve(id);
        }
        self.inherited_backends = existing.backends.iter().map(|&(id, _)| id).collect();
        self.inherited_members = existing.members;
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

    /// Files the forwarder's listening sockets where the hooks look: proxy-mode services go to
    /// the forwarder from now on, instead of the kernel fallback.
    pub fn set_listeners(&mut self, listeners: &[&std::net::TcpListener]) -> Result<(), MapsError> {
        self.maps.set_listeners(listeners)
    }

    /// Takes them out: new proxy-mode connections are balanced in the kernel (a graceful stop).
    pub fn clear_listeners(&mut self) -> Result<(), MapsError> {
        self.maps.clear_listeners()
    }

    pub fn maps(&self) -> &KernelMaps {
        &self.maps
    }

    /// Makes the kernel and the forwarder match `catalog`. Backends that active health checks
    /// hold down are left out of the kernel's choices (the forwarder sees their health itself).
    pub fn apply(&mut self, catalog: &Catalog) -> Result<Changes, ReconcileError> {
        let applied = self.apply_changes(catalog);
        if applied.is_err() {
            // Part of it may be in the maps: the next apply compares everything again.
            self.last = None;
        }
        applied
    }

    fn apply_changes(&mut self, catalog: &Catalog) -> Result<Changes, ReconcileError> {
        let started = std::time::Instant::now();
        let mut changes = Changes::default();
        let (kernel_view, panicking) = without_down(catalog, &self.board.down());
        let kernel_view: Catalog = kernel_view.into_owned();
        for s in panicking.difference(&self.panicking) {
            warn!(
                service = %s,
                "too few healthy backends: panic mode, the kernel's choices keep every admitted \
                 backend (as the forwarder does)"
            );
        }
        for s in self.panicking.difference(&panicking) {
            info!(service = %s, "enough healthy backends again: panic mode over");
        }
        self.panicking = panicking;
        // The services to look at: those that differ from the last apply's catalog or kernel
        // view (a health verdict changes the view alone), or all of them.
        let keys: BTreeSet<ServiceAddr> = match &self.last {
            Some(last) => last
                .catalog
                .services
                .diff(&catalog.services)
                .chain(last.view.services.diff(&kernel_view.services))
                .map(diff_key)
                .collect(),
            None => self
                .applied
                .keys()
                .chain(kernel_view.services.keys())
                .copied()
                .collect(),
        };
        // The forwarder's table is rebuilt only when a change can alter it: a proxy-mode service
        // came, went or changed, a backend the health board knows left, or a service address
        // came or went at one of its backends' (which decides its upstream sockets' mark).
        let table = self.table.load();
        let rebuild = match &self.last {
            None => true,
            Some(last) => keys.iter().any(|k| {
                let (old, new) = (last.catalog.services.get(k), catalog.services.get(k));
                touches_table(old.map(|s| &**s), new.map(|s| &**s), &self.board)
                    || (old.is_some() != new.is_some() && table.has_backend(k.vip))
            }),
        };
        drop(table);
        if rebuild {
            // The forwarder learns of new proxy services before the kernel sends it their
            // clients, and forgets removed ones only after the kernel stops.
            let previous = self.table.load();
            let mut widened = catalog.clone();
            // Any mode: a service address still steered keeps the mark on connects to it.
            for k in &keys {
                if let Some(a) = self.applied.get(k)
                    && !catalog.services.contains_key(k)
                {
                    widened.services.insert(*k, Arc::new(a.service.clone()));
                }
            }
            self.table.store(Table::build(
                &widened,
                &previous,
                &self.board,
                self.forwarding,
            ));
        }

        let gone: Vec<ServiceAddr> = keys
            .iter()
            .filter(|k| self.applied.contains_key(k) && !catalog.services.contains_key(*k))
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
        for key in &keys {
            let Some(service) = kernel_view.services.get(key) else {
                continue;
            };
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
        if rebuild {
            let table = Table::build(catalog, &self.table.load(), &self.board, self.forwarding);
            self.table.store(table);
        }
        if !self.settled {
            changes.removed += self.drop_inherited()?;
            self.settled = true;
        }
        if changes != Changes::default() {
            info!(
                added = changes.added,
                updated = changes.updated,
                removed = changes.removed,
                services = self.applied.len(),
                compared = keys.len(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                elapsed_us = started.elapsed().as_micros() as u64,
                "catalog applied"
            );
        }
        self.last = Some(Last {
            catalog: catalog.clone(),
            view: kernel_view,
        });
        Ok(changes)
    }

    fn upsert(&mut self, service: &Service) -> Result<(), ReconcileError> {
        let key = service_key(&service.addr);
        let state = (
            self.applied.remove(&service.addr),
            self.inherited.remove(&key),
        );
        if state.0.is_none()
            && service.mode == Mode::Kernel
            && service.algorithm == Algorithm::RingHash
        {
            info!(
                service = %service.addr,
                "ring_hash in kernel mode: the kernel has no ring and uses its Maglev table"
            );
        }
        // Whether `MEMBERS` already lists the backend ids known here (a previous agent's may
        // not have kept it).
        let members_written = state.0.is_some();
        let (id, half, mut half_len, mut backend_ids) = match state {
            (Some(a), _) => (a.id, 1 - a.half, a.half_len, a.backend_ids),
            (None, Some(old)) => (old.id, 1 - old.live_half, old.half_len, old.backend_ids),
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
        let weights: Vec<u32> = service.backends.iter().map(|b| b.weight).collect();
        let weights = learned::kernel_weights(&weights);
        let tcp = service.addr.protocol == Protocol::Tcp;
        for (b, &weight) in service.backends.iter().zip(&weights) {
            let (bid, known) = match backend_ids.get(&b.addr) {
                Some(&bid) => (bid, members_written),
                None => (
                    self.backend_ids
                        .take()
                        .ok_or(ReconcileError::TooManyBackends(kmaps::MAX_BACKENDS))?,
                    false,
                ),
            };
            backend_ids.insert(b.addr, bid);
            // The programs' counts for this backend: made once per id, never rewritten.
            if tcp && self.maps.backend_stats(bid).is_none_or(|s| s.service != id) {
                self.maps.create_backend_stats(bid, &learned::fresh(id))?;
            }
            let kb = KernelBackend {
                addr: to_words(b.addr.ip()),
                port: b.addr.port(),
                state: kernel_state(b.state),
                weight,
            };
            self.maps.put_backend(bid, &kb)?;
            if !known {
                self.maps.put_member(&MemberKey {
                    service: id,
                    backend: bid,
                })?;
            }
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
            algorithm: balance::slots::kernel_algorithm(service.algorithm, service.mode),
            flags: if service.affinity.is_some() {
                kmaps::service_flags::AFFINITY
            } else {
                0
            },
            _pad: 0,
        };
        self.maps
            .set_outlier(id, &learned::outlier_policy(service))?;
        self.maps.put_service(&key, &value)?;

        // Backends no longer listed: nothing points at them any more.
        let listed: HashSet<SocketAddr> = service.backends.iter().map(|b| b.addr).collect();
        let stale: Vec<(SocketAddr, BackendId)> = backend_ids
            .iter()
            .filter(|(a, _)| !listed.contains(a))
            .map(|(a, b)| (*a, *b))
            .collect();
        for (a, bid) in stale {
            // Membership first: from here no affinity entry resolves to this id for this
            // service, whoever the id is given to next.
            self.maps.remove_member(&MemberKey {
                service: id,
                backend: bid,
            })?;
            self.maps.remove_backend(bid)?;
            self.maps.remove_backend_stats(bid)?;
            self.backend_ids.give(bid);
            self.inherited_backends.remove(&bid);
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
            self.maps.remove_member(&MemberKey {
                service: a.id,
                backend: bid,
            })?;
            self.maps.remove_backend(bid)?;
            self.maps.remove_backend_stats(bid)?;
        }
        self.maps
            .set_outlier(a.id, &switchyard_common::maps::OutlierPolicy::default())?;
        if let Some(a) = self.applied.remove(addr) {
            for &b in a.backend_ids.values() {
                self.backend_ids.give(b);
                self.inherited_backends.remove(&b);
            }
            self.service_ids.give(a.id);
        }
        Ok(())
    }
}

impl Reconciler {
    /// After the first catalog: removes what a previous agent left that the catalog does not
    /// hold (services deleted while no agent ran, backend entries and ids no service uses), so
    /// nothing is steered that the catalog lacks and nothing leaks across restarts. Returns
    /// the services removed.
    fn drop_inherited(&mut self) -> Result<usize, ReconcileError> {
        let gone: Vec<(ServiceKey, Inherited)> = self.inherited.drain().collect();
        for (key, old) in &gone {
            self.maps.remove_service(key)?;
            for half in 0..2 {
                for i in 0..old.half_len[half] {
                    self.maps.remove_slot(&SlotKey {
                        service: old.id,
                        slot: half as u32 * SLOT_HALF + i,
                    })?;
                }
            }
            info!(
                vip = %SocketAddr::new(from_words(&key.addr), key.port),
                "removed a service a previous agent left that the catalog no longer has"
            );
        }
        let held: HashSet<(u32, BackendId)> = self
            .applied
            .values()
            .flat_map(|a| a.backend_ids.values().map(move |&b| (a.id, b)))
            .collect();
        for m in std::mem::take(&mut self.inherited_members) {
            if !held.contains(&(m.service, m.backend)) {
                self.maps.remove_member(&m)?;
            }
        }
        let in_use: HashSet<BackendId> = held.iter().map(|&(_, b)| b).collect();
        let mut freed = 0;
        for bid in std::mem::take(&mut self.inherited_backends) {
            if !in_use.contains(&bid) {
                self.maps.remove_backend(bid)?;
                self.maps.remove_backend_stats(bid)?;
                self.backend_ids.give(bid);
                freed += 1;
            }
        }
        for (_, old) in &gone {
            self.maps
                .set_outlier(old.id, &switchyard_common::maps::OutlierPolicy::default())?;
            self.service_ids.give(old.id);
        }
        if freed > 0 {
            info!(
                backends = freed,
                "removed backend entries a previous agent left that no service uses"
            );
        }
        Ok(gone.len())
    }
}

/// The catalog as the kernel should see it: backends held down by health checks are out of
/// service (`maint`), so no slot points at them and affinity lets go of them. A service with
/// too few healthy backends is in panic mode, as the forwarder's candidates are: its slots hold
/// every admitted backend, down or not, rather than refuse every client. Returns the view and
/// the services in panic mode. Costs what is down: the view shares the rest of the catalog.
fn without_down<'a>(
    catalog: &'a Catalog,
    down: &HashSet<(ServiceAddr, SocketAddr)>,
) -> (std::borrow::Cow<'a, Catalog>, HashSet<ServiceAddr>) {
    let mut panicking = HashSet::new();
    if down.is_empty() {
        return (std::borrow::Cow::Borrowed(catalog), panicking);
    }
    let mut by_service: HashMap<ServiceAddr, HashSet<SocketAddr>> = HashMap::new();
    for (service, backend) in down {
        by_service.entry(*service).or_default().insert(*backend);
    }
    let mut view = catalog.clone();
    for (addr, held_down) in &by_service {
        let Some(s) = catalog.services.get(addr) else {
            continue;
        };
        let admitted = s.usable().count();
        let held = s.usable().filter(|b| held_down.contains(&b.addr)).count();
        if held == 0 {
            continue;
        }
        if balance::candidates::panics(admitted, admitted - held) {
            panicking.insert(*addr);
            continue;
        }
        // Only the services with a backend down are copied.
        let mut copy = (**s).clone();
        for b in copy.backends.iter_mut() {
            if held_down.contains(&b.addr) {
                b.state = BackendState::Maint;
            }
        }
        view.services.insert(*addr, Arc::new(copy));
    }
    (std::borrow::Cow::Owned(view), panicking)
}

/// The address a difference between two catalogs is about.
fn diff_key(item: imbl::ordmap::DiffItem<'_, '_, ServiceAddr, Arc<Service>>) -> ServiceAddr {
    match item {
        imbl::ordmap::DiffItem::Add(k, _) | imbl::ordmap::DiffItem::Remove(k, _) => *k,
        imbl::ordmap::DiffItem::Update { new: (k, _), .. } => *k,
    }
}

/// Whether a service going from `old` to `new` can change what [`Table::build`] makes: the
/// table holds the proxy-mode services, and forgets the board's entries for backends that
/// leave the catalog (a kernel-mode service's health-checked backends among them).
fn touches_table(old: Option<&Service>, new: Option<&Service>, board: &Board) -> bool {
    if old.into_iter().chain(new).any(|s| s.mode == Mode::Proxy) {
        return true;
    }
    let Some(old) = old else {
        return false;
    };
    let known: Vec<SocketAddr> = old
        .backends
        .iter()
        .filter(|b| board.find(old.addr, b.addr).is_some())
        .map(|b| b.addr)
        .collect();
    if known.is_empty() {
        return false;
    }
    let kept: HashSet<SocketAddr> = new
        .filter(|n| n.addr == old.addr)
        .map(|n| n.backends.iter().map(|b| b.addr).collect())
        .unwrap_or_default();
    known.iter().any(|b| !kept.contains(b))
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
