//! The maps, named as the agent opens them. Layouts are in `switchyard_common::maps`.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, SockMap},
};
use switchyard_common::{
    counters::{Counter, COUNTER_SLOTS},
    maps::*,
};

/// Hash maps that grow with the catalog allocate on insert rather than up front.
const NO_PREALLOC: u32 = 1;
/// `BPF_F_MMAPABLE`: an array userspace can map.
const MMAPABLE: u32 = 1 << 10;

// Every map is pinned by name under the agent's bpffs directory: a restarted agent finds the
// same maps, so kernel-mode services, round-robin positions and affinity survive it.

#[map]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::pinned(MAX_SERVICES, NO_PREALLOC);
#[map]
pub static SLOTS: HashMap<SlotKey, BackendId> = HashMap::pinned(MAX_SLOTS, NO_PREALLOC);
#[map]
pub static BACKENDS: HashMap<BackendId, Backend> = HashMap::pinned(MAX_BACKENDS, NO_PREALLOC);
/// Round-robin position per service id.
#[map]
pub static RR: Array<u64> = Array::pinned(MAX_SERVICES, 0);
/// `{service id, backend id}` for every backend a service lists: what affinity checks.
#[map]
pub static MEMBERS: HashMap<MemberKey, u8> = HashMap::pinned(MAX_MEMBERS, NO_PREALLOC);
#[map]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue> = LruHashMap::pinned(MAX_AFFINITY, 0);
/// Socket cookie → what the application connected to (for getpeername and sock_ops).
#[map]
pub static SOCK_ORIG: LruHashMap<u64, OrigDst> = LruHashMap::pinned(MAX_TRACKED_SOCKETS, 0);
/// 4-tuple → original destination of a proxied connection, until the forwarder reads it.
#[map]
pub static ORIG_DST: LruHashMap<SockTuple, Endpoint> = LruHashMap::pinned(MAX_TRACKED_SOCKETS, 0);
/// The same, in slots the forwarder maps into its memory and reads without a system call
/// ([`orig_slot_index`]); `ORIG_DST` stays for a connection whose slot another one took.
#[map]
pub static ORIG_SLOTS: Array<OrigSlot> = Array::pinned(ORIG_SLOT_COUNT, MMAPABLE);
/// (UDP socket cookie, backend) → service address, for `recvmsg` reverse translation.
#[map]
pub static REV_NAT: LruHashMap<RevKey, Endpoint> = LruHashMap::pinned(MAX_TRACKED_SOCKETS, 0);
/// Cgroup ids whose processes (and their descendants') are never steered.
#[map]
pub static OPT_OUT_CGROUPS: HashMap<u64, u8> = HashMap::pinned(MAX_OPT_OUT, 0);
/// Destination ports never steered.
#[map]
pub static OPT_OUT_PORTS: HashMap<u32, u8> = HashMap::pinned(MAX_OPT_OUT, 0);
#[map]
pub static SETTINGS: Array<Settings> = Array::pinned(1, 0);
/// One listening socket of the forwarder per family ([`LISTENER_V4`], [`LISTENER_V6`]); empty
/// while no forwarder listens (the kernel removes a socket that closes).
#[map]
pub static FORWARDER_LISTENERS: SockMap = SockMap::pinned(LISTENER_SLOTS, 0);
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(COUNTER_SLOTS, 0);
/// Backend id → what the programs learn of it (connections, failures, ejection, connect time).
#[map]
pub static BACKEND_STATS: HashMap<BackendId, BackendStats> =
    HashMap::pinned(MAX_BACKENDS, NO_PREALLOC);
/// Service id → its passive outlier detection settings.
#[map]
pub static OUTLIER: Array<OutlierPolicy> = Array::pinned(MAX_SERVICES, 0);
/// Socket cookie → the backend a kernel-mode TCP connect went to, until the socket closes (an
/// LRU only so that a socket the state callback never saw cannot fill it).
#[map]
pub static SOCK_LEARN: LruHashMap<u64, SockLearn> = LruHashMap::pinned(MAX_TRACKED_SOCKETS, 0);

#[inline(always)]
pub fn bump(counter: Counter) {
    if let Some(p) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, programs do not preempt each other on one CPU.
        unsafe { *p += 1 };
    }
}

#[inline(always)]
pub fn settings() -> Option<&'static Settings> {
    SETTINGS.get(0)
}
