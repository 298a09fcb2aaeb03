//! Typed access to the kernel maps. Only the reconciler writes through this.

use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, MapError, PerCpuArray, SockMap},
};
use switchyard_common::{
    counters::Counter,
    maps::{
        Backend, BackendId, BackendStats, Endpoint, LISTENER_V4, LISTENER_V6, MemberKey,
        OutlierPolicy, RevKey, ServiceKey, ServiceValue, Settings, SlotKey, SockLearn, SockTuple,
    },
};

#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    #[error("map {0} is missing from the eBPF object")]
    Missing(&'static str),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("map {name}: cannot map it into memory: {source}")]
    Mmap {
        name: &'static str,
        #[source]
        source: std::io::Error,
    },
}

fn take<T: TryFrom<aya::maps::Map, Error = MapError>>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<T, MapsError> {
    let map = ebpf.take_map(name).ok_or(MapsError::Missing(name))?;
    T::try_from(map).map_err(|source| MapsError::Map { name, source })
}

fn op<T>(name: &'static str, r: Result<T, MapError>) -> Result<T, MapsError> {
    r.map_err(|source| MapsError::Map { name, source })
}

/// Removing what is already gone is fine: the reconciler may retry after a failure.
fn gone_ok(name: &'static str, r: Result<(), MapError>) -> Result<(), MapsError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        r => op(name, r),
    }
}

/// The contents of the maps when the agent starts.
pub struct Existing {
    pub services: Vec<(ServiceKey, ServiceValue)>,
    pub slots: Vec<(SlotKey, BackendId)>,
    pub backends: Vec<(BackendId, Backend)>,
    /// Empty over maps pinned by an agent that did not keep `MEMBERS`.
    pub members: Vec<MemberKey>,
}

pub struct KernelMaps {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    slots: HashMap<MapData, SlotKey, BackendId>,
    backends: HashMap<MapData, BackendId, Backend>,
    members: HashMap<MapData, MemberKey, u8>,
    settings: Array<MapData, Settings>,
    counters: PerCpuArray<MapData, u64>,
    rev_nat: HashMap<MapData, RevKey, Endpoint>,
    opt_out_cgroups: HashMap<MapData, u64, u8>,
    opt_out_ports: HashMap<MapData, u32, u8>,
    listeners: SockMap<MapData>,
    backend_stats: HashMap<MapData, BackendId, BackendStats>,
    outlier: Array<MapData, OutlierPolicy>,
    sock_learn: HashMap<MapData, u64, SockLearn>,
}

impl KernelMaps {
    pub fn take(ebpf: &mut Ebpf) -> Result<Self, MapsError> {
        Ok(KernelMaps {
            services: take(ebpf, "SERVICES")?,
            slots: take(ebpf, "SLOTS")?,
            backends: take(ebpf, "BACKENDS")?,
            members: take(ebpf, "MEMBERS")?,
            settings: take(ebpf, "SETTINGS")?,
            counters: take(ebpf, "COUNTERS")?,
            rev_nat: take(ebpf, "REV_NAT")?,
            opt_out_cgroups: take(ebpf, "OPT_OUT_CGROUPS")?,
            opt_out_ports: take(ebpf, "OPT_OUT_PORTS")?,
            listeners: take(ebpf, "FORWARDER_LISTENERS")?,
            backend_stats: take(ebpf, "BACKEND_STATS")?,
            outlier: take(ebpf, "OUTLIER")?,
            sock_learn: take(ebpf, "SOCK_LEARN")?,
        })
    }

    /// Creates a backend's learning entry (zeroed counts), for an id just handed out. Never
    /// called on a live entry: the programs' atomic adds would be lost.
    pub fn create_backend_stats(
        &mut self,
        id: BackendId,
        stats: &BackendStats,
    ) -> Result<(), MapsError> {
        op("BACKEND_STATS", self.backend_stats.insert(id, stats, 0))
    }

    pub fn remove_backend_stats(&mut self, id: BackendId) -> Result<(), MapsError> {
        gone_ok("BACKEND_STATS", self.backend_stats.remove(&id))
    }

    /// A backend's learning entry, if it has one.
    pub fn backend_stats(&self, id: BackendId) -> Option<BackendStats> {
        self.backend_stats.get(&id, 0).ok()
    }

    /// Every learning entry (id → its service id), for adoption.
    pub fn all_backend_stats(&self) -> Result<Vec<(BackendId, BackendStats)>, MapsError> {
        self.backend_stats
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| MapsError::Map {
                name: "BACKEND_STATS",
                source,
            })
    }

    /// A backend's address and state as the programs see them.
    pub fn backend(&self, id: BackendId) -> Option<Backend> {
        self.backends.get(&id, 0).ok()
    }

    pub fn set_outlier(&mut self, service: u32, p: &OutlierPolicy) -> Result<(), MapsError> {
        op("OUTLIER", self.outlier.set(service, p, 0))
    }

    /// A read-only view of what the programs learn, for the API and metrics (own descriptors
    /// on the same maps, as [`KernelMaps::counters_handle`]).
    pub fn learned_handle(&self) -> Result<KernelLearned, MapsError> {
        use aya::maps::IterableMap as _;
        Ok(KernelLearned {
            stats: HashMap::try_from(aya::maps::Map::HashMap(dup(
                "BACKEND_STATS",
                self.backend_stats.map(),
            )?))
            .map_err(map_err("BACKEND_STATS"))?,
            backends: HashMap::try_from(aya::maps::Map::HashMap(dup(
                "BACKENDS",
                self.backends.map(),
            )?))
            .map_err(map_err("BACKENDS"))?,
            services: HashMap::try_from(aya::maps::Map::HashMap(dup(
                "SERVICES",
                self.services.map(),
            )?))
            .map_err(map_err("SERVICES"))?,
            sockets: HashMap::try_from(aya::maps::Map::LruHashMap(dup(
                "SOCK_LEARN",
                self.sock_learn.map(),
            )?))
            .map_err(map_err("SOCK_LEARN"))?,
        })
    }

    pub fn set_settings(&mut self, s: &Settings) -> Result<(), MapsError> {
        op("SETTINGS", self.settings.set(0, s, 0))
    }

    pub fn put_service(&mut self, k: &ServiceKey, v: &ServiceValue) -> Result<(), MapsError> {
        op("SERVICES", self.services.insert(k, v, 0))
    }

    pub fn remove_service(&mut self, k: &ServiceKey) -> Result<(), MapsError> {
        gone_ok("SERVICES", self.services.remove(k))
    }

    pub fn put_slot(&mut self, k: &SlotKey, backend: BackendId) -> Result<(), MapsError> {
        op("SLOTS", self.slots.insert(k, backend, 0))
    }

    pub fn remove_slot(&mut self, k: &SlotKey) -> Result<(), MapsError> {
        gone_ok("SLOTS", self.slots.remove(k))
    }

    pub fn put_backend(&mut self, id: BackendId, b: &Backend) -> Result<(), MapsError> {
        op("BACKENDS", self.backends.insert(id, b, 0))
    }

    pub fn remove_backend(&mut self, id: BackendId) -> Result<(), MapsError> {
        gone_ok("BACKENDS", self.backends.remove(&id))
    }

    pub fn put_member(&mut self, k: &MemberKey) -> Result<(), MapsError> {
        op("MEMBERS", self.members.insert(k, 1, 0))
    }

    pub fn remove_member(&mut self, k: &MemberKey) -> Result<(), MapsError> {
        gone_ok("MEMBERS", self.members.remove(k))
    }

    /// What a previous agent left in the (pinned) maps, for the reconciler to adopt.
    pub fn existing(&self) -> Result<Existing, MapsError> {
        let services = self
            .services
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| MapsError::Map {
                name: "SERVICES",
                source,
            })?;
        let slots = self
            .slots
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| MapsError::Map {
                name: "SLOTS",
                source,
            })?;
        let backends = self
            .backends
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| MapsError::Map {
                name: "BACKENDS",
                source,
            })?;
        let members = self
            .members
            .keys()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| MapsError::Map {
                name: "MEMBERS",
                source,
            })?;
        Ok(Existing {
            services,
            slots,
            backends,
            members,
        })
    }

    /// Makes the opted-out cgroup ids and ports exactly these (the maps are pinned: entries a
    /// previous configuration left are removed).
    pub fn set_opt_out(&mut self, cgroups: &[u64], ports: &[u16]) -> Result<(), MapsError> {
        let old: Vec<u64> = self.opt_out_cgroups.keys().filter_map(Result::ok).collect();
        for id in old.iter().filter(|id| !cgroups.contains(id)) {
            gone_ok("OPT_OUT_CGROUPS", self.opt_out_cgroups.remove(id))?;
        }
        for id in cgroups {
            op("OPT_OUT_CGROUPS", self.opt_out_cgroups.insert(id, 1, 0))?;
        }
        let old: Vec<u32> = self.opt_out_ports.keys().filter_map(Result::ok).collect();
        for p in old
            .iter()
            .filter(|p| !ports.iter().any(|q| *q as u32 == **p))
        {
            gone_ok("OPT_OUT_PORTS", self.opt_out_ports.remove(p))?;
        }
        for &p in ports {
            op("OPT_OUT_PORTS", self.opt_out_ports.insert(p as u32, 1, 0))?;
        }
        Ok(())
    }

    /// Files the forwarder's listening sockets (one per family) where the connect hooks look:
    /// from now on they steer proxy-mode services to the forwarder instead of balancing them
    /// in the kernel. The kernel drops an entry by itself when its socket closes.
    pub fn set_listeners(&mut self, listeners: &[&std::net::TcpListener]) -> Result<(), MapsError> {
        for family_v4 in [true, false] {
            let index = if family_v4 { LISTENER_V4 } else { LISTENER_V6 };
            let found = listeners
                .iter()
                .find(|l| l.local_addr().is_ok_and(|a| a.is_ipv4() == family_v4));
            match found {
                Some(l) => op("FORWARDER_LISTENERS", self.listeners.set(index, *l, 0))?,
                None => gone_ok("FORWARDER_LISTENERS", self.listeners.clear_index(&index))?,
            }
        }
        Ok(())
    }

    /// Empties the listener slots: proxy-mode services fall back to the kernel's choice at
    /// once, before the forwarder closes its listeners (a graceful stop).
    pub fn clear_listeners(&mut self) -> Result<(), MapsError> {
        for index in [LISTENER_V4, LISTENER_V6] {
            gone_ok("FORWARDER_LISTENERS", self.listeners.clear_index(&index))?;
        }
        Ok(())
    }

    /// Whether the hooks steered this UDP socket to `backend` (a `REV_NAT` entry exists).
    pub fn steered_udp(&self, cookie: u64, backend: std::net::SocketAddr) -> bool {
        let key = RevKey {
            cookie,
            addr: super::addr::to_words(backend.ip()),
            port: backend.port(),
            _pad: [0; 6],
        };
        self.rev_nat.get(&key, 0).is_ok()
    }

    /// Kernel counters summed over CPUs.
    pub fn counters(&self) -> Result<Vec<(Counter, u64)>, MapsError> {
        Counter::ALL
            .iter()
            .map(|&c| {
                let per_cpu = op("COUNTERS", self.counters.get(&(c as u32), 0))?;
                Ok((c, per_cpu.iter().sum()))
            })
            .collect()
    }

    /// A read-only handle on the counters for the metrics task: its own descriptor
    /// on the same map, so the reconciler keeps the maps it writes to itself.
    pub fn counters_handle(&self) -> Result<KernelCounters, MapsError> {
        use aya::maps::IterableMap as _;
        use std::os::fd::AsFd as _;
        let map = |source| MapsError::Map {
            name: "COUNTERS",
            source,
        };
        let fd = self
            .counters
            .map()
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|io_error| {
                map(aya::sys::SyscallError {
                    call: "dup",
                    io_error,
                }
                .into())
            })?;
        let data = MapData::from_fd(fd).map_err(map)?;
        let array = PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data)).map_err(map)?;
        Ok(KernelCounters(array))
    }
}

fn map_err(name: &'static str) -> impl Fn(MapError) -> MapsError {
    move |source| MapsError::Map { name, source }
}

/// Its own descriptor on a map.
fn dup(name: &'static str, map: &MapData) -> Result<MapData, MapsError> {
    use std::os::fd::AsFd as _;
    let fd = map.fd().as_fd().try_clone_to_owned().map_err(|io_error| {
        map_err(name)(
            aya::sys::SyscallError {
                call: "dup",
                io_error,
            }
            .into(),
        )
    })?;
    MapData::from_fd(fd).map_err(map_err(name))
}

/// One backend as the programs learned it.
#[derive(Clone, Copy, Debug)]
pub struct Learned {
    pub service: std::net::SocketAddr,
    pub backend: std::net::SocketAddr,
    pub stats: BackendStats,
}

/// What the programs learn, readable from any task (see [`KernelMaps::learned_handle`]).
pub struct KernelLearned {
    stats: HashMap<MapData, BackendId, BackendStats>,
    backends: HashMap<MapData, BackendId, Backend>,
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    sockets: HashMap<MapData, u64, SockLearn>,
}

impl KernelLearned {
    /// Every backend with a learning entry, with its service's address (TCP services).
    pub fn read(&self) -> Vec<Learned> {
        let ids: std::collections::HashMap<u32, std::net::SocketAddr> = self
            .services
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, _)| k.proto == switchyard_common::maps::PROTO_TCP)
            .map(|(k, v)| {
                (
                    v.id,
                    std::net::SocketAddr::new(super::addr::from_words(&k.addr), k.port),
                )
            })
            .collect();
        self.stats
            .iter()
            .filter_map(Result::ok)
            .filter_map(|(id, stats)| {
                let service = *ids.get(&stats.service)?;
                let b = self.backends.get(&id, 0).ok()?;
                Some(Learned {
                    service,
                    backend: std::net::SocketAddr::new(super::addr::from_words(&b.addr), b.port),
                    stats,
                })
            })
            .collect()
    }

    /// Kernel-mode TCP sockets the programs are following now.
    pub fn tracked_sockets(&self) -> usize {
        self.sockets.keys().filter(Result::is_ok).count()
    }
}

/// `bpf_ktime_get_ns()`: the programs' clock (CLOCK_MONOTONIC), for their timestamps.
pub fn kernel_now_ns() -> u64 {
    // SAFETY: a zeroed timespec for the kernel to fill.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The kernel counters, readable from any task (see [`KernelMaps::counters_handle`]).
pub struct KernelCounters(PerCpuArray<MapData, u64>);

impl KernelCounters {
    /// Counters summed over CPUs.
    pub fn read(&self) -> Result<Vec<(Counter, u64)>, MapsError> {
        Counter::ALL
            .iter()
            .map(|&c| {
                let per_cpu = op("COUNTERS", self.0.get(&(c as u32), 0))?;
                Ok((c, per_cpu.iter().sum()))
            })
            .collect()
    }
}

/// The original-destination table, for a forwarder that cannot use `getsockopt` (an agent in
/// the root cgroup, where the hook is not attached).
pub struct OrigDstTable {
    map: HashMap<MapData, SockTuple, Endpoint>,
}

impl OrigDstTable {
    pub fn take(ebpf: &mut Ebpf) -> Result<Self, MapsError> {
        Ok(OrigDstTable {
            map: take(ebpf, "ORIG_DST")?,
        })
    }

    /// Reads and removes the entry, as the `getsockopt` hook does.
    pub fn consume(&mut self, tuple: &SockTuple) -> Option<Endpoint> {
        let found = self.map.get(tuple, 0).ok()?;
        let _ = self.map.remove(tuple);
        Some(found)
    }
}
