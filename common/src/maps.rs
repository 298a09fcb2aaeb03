//! Map keys, values and sizes.
//!
//! How a connect finds its backend: `SERVICES[{vip, port, proto}]` gives the service's id and
//! its live slot range; `SLOTS[{id, base + i}]` gives a backend id; `BACKENDS[id]` gives the
//! address. Slots hold only usable backends (ready, healthy), repeated by weight, or a Maglev
//! table; so the kernel picks an index and never filters.
//!
//! A service's slots are double-buffered: the agent writes the new set in the half that no
//! reader uses (`base` is `0` or [`SLOT_HALF`]), then flips `base` and `count` in one update of
//! the service entry. A concurrent `connect()` sees the old set or the new one, never a mix.

use crate::Addr;

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// The forwarder's own `getsockopt(SOL_TCP, ..)` for a redirected connection's original
/// destination, answered by the `getsockopt` hook. The kernel turns an unknown TCP option away
/// at once; `SO_ORIGINAL_DST` at `SOL_IP` would first take the socket lock, netfilter's option
/// mutex and a conntrack lookup that cannot succeed (docs/benchmarks.md, tenth pass).
pub const ORIG_DST_SOCKOPT: i32 = 0x5359;

/// Where a service's connections go.
pub mod mode {
    /// The kernel picks the backend and rewrites the destination.
    pub const KERNEL: u8 = 0;
    /// The destination is rewritten to the node's forwarder.
    pub const PROXY: u8 = 1;
}

/// How the kernel picks a slot. Weights are already expanded into the slots.
pub mod algorithm {
    pub const RANDOM: u8 = 0;
    pub const ROUND_ROBIN: u8 = 1;
    /// `slots` is a Maglev table indexed by the client's hash.
    pub const MAGLEV: u8 = 2;
    /// Power of two choices over the slots (one per usable backend): fewer connections (in
    /// progress and open) per weight wins. Counts are the programs' own ([`BackendStats`]).
    pub const LEAST_CONNECTIONS: u8 = 3;
    /// Power of two choices: peak-EWMA connect time × (connections + 1) per weight wins.
    pub const PEAK_EWMA: u8 = 4;
}

/// A backend's administrative state, as operators name it (HAProxy's words).
pub mod state {
    pub const READY: u8 = 0;
    pub const DRAIN: u8 = 1;
    pub const MAINT: u8 = 2;
}

pub const MAX_SERVICES: u32 = 65_536;
pub const MAX_BACKENDS: u32 = 262_144;
/// Slots of all services together (both halves).
pub const MAX_SLOTS: u32 = 1 << 21;
/// Offset of a service's second slot half.
pub const SLOT_HALF: u32 = 1 << 24;
/// Most slots one service may use in one half.
pub const MAX_SLOTS_PER_SERVICE: u32 = 65_536;
/// Maglev table size in the kernel: prime, small enough for many services, large enough that
/// removing one of N backends moves about 1/N of clients for N up to a few dozen.
pub const MAGLEV_KERNEL_SIZE: u32 = 4_093;
pub const MAX_AFFINITY: u32 = 65_536;
/// Service–backend pairs in `MEMBERS`: one per backend id.
pub const MAX_MEMBERS: u32 = MAX_BACKENDS;
/// Opted-out cgroups and ports (a sidecar's cgroup, a mesh's ports).
pub const MAX_OPT_OUT: u32 = 1_024;
/// Cgroup depth searched for an opted-out ancestor.
pub const MAX_CGROUP_DEPTH: i32 = 16;
/// `FORWARDER_LISTENERS` slots: one listening socket of the forwarder per family.
pub const LISTENER_V4: u32 = 0;
pub const LISTENER_V6: u32 = 1;
pub const LISTENER_SLOTS: u32 = 2;
/// Connections between `connect()` and the forwarder's `accept()`, or alive and tracked.
pub const MAX_TRACKED_SOCKETS: u32 = 262_144;
/// `ORIG_SLOTS` entries, a power of two. A slot is needed only from a redirected connect until
/// the forwarder's accept, so some tens of connections are in flight at once, and a slot taken
/// over before its accept sends that connection down the `getsockopt` path. 512 KiB: few
/// enough pages that the forwarder's reads rarely miss the TLB.
pub const ORIG_SLOT_COUNT: u32 = 1 << 13;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    pub addr: Addr,
    /// Host byte order.
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// Flags of a service entry.
pub mod service_flags {
    /// Session affinity by client: `affinity_timeout_s` holds the timeout.
    pub const AFFINITY: u8 = 1;
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceValue {
    pub id: u32,
    /// `0` or [`SLOT_HALF`]: which half of the service's slots is live.
    pub slot_base: u32,
    /// Live slots; `0` means no usable backend (connects fail fast).
    pub slot_count: u32,
    pub affinity_timeout_s: u32,
    pub mode: u8,
    pub algorithm: u8,
    pub flags: u8,
    pub _pad: u8,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SlotKey {
    pub service: u32,
    pub slot: u32,
}

pub type BackendId = u32;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    pub addr: Addr,
    /// Host byte order.
    pub port: u16,
    pub state: u8,
    /// Weight for the load-aware picks, 1..=255 (the agent reduces weights by their common
    /// divisor and caps them here); 0, as a map written before this field existed holds,
    /// counts as 1.
    pub weight: u8,
}

/// An address and port; used for the forwarder's addresses and original destinations.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: Addr,
    /// Host byte order.
    pub port: u16,
    pub _pad: u16,
}

/// Agent-wide settings the programs read (one entry of the `SETTINGS` array).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// Forwarder for IPv4 (and v4-mapped) proxy-mode services; port 0: none.
    pub forwarder4: Endpoint,
    /// Forwarder for IPv6 proxy-mode services; port 0: none.
    pub forwarder6: Endpoint,
    /// Sockets carrying this `SO_MARK` belong to the agent and are never steered.
    pub own_mark: u32,
    pub _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    pub service: u32,
    pub _pad: u32,
    /// The client's network namespace cookie.
    pub netns: u64,
    /// The client's bound address, or zero.
    pub addr: Addr,
}

/// A backend id listed by a service (`MEMBERS`): an affinity entry is honoured only while its
/// backend is one of its own service's current backends, whatever the ids were reused for.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MemberKey {
    pub service: u32,
    pub backend: BackendId,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AffinityValue {
    pub backend: BackendId,
    pub _pad: u32,
    pub last_used_ns: u64,
}

/// A TCP connection as its client sees it; the forwarder's accepted socket sees the mirror.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockTuple {
    pub local: Addr,
    pub remote: Addr,
    /// Host byte order.
    pub local_port: u16,
    /// Host byte order.
    pub remote_port: u16,
}

/// An `ORIG_SLOTS` entry: what `ORIG_DST` holds for one redirected connection,
/// in an array the forwarder maps into its memory, so that it finds the original destination
/// without a system call. 64 bytes, one cache line.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigSlot {
    pub tuple: SockTuple,
    pub vip: Endpoint,
    /// [`orig_slot_check`] of the two, written last: the kernel writes a slot while the
    /// forwarder may read it, and a reader that raced a writer sees a mismatch, not a mix.
    /// Zero: empty, or read.
    pub check: u64,
}

/// The `ORIG_SLOTS` index of a client's connection: its address and port are unique among the
/// connections redirected to one forwarder port.
#[inline(always)]
pub const fn orig_slot_index(client: &Addr, client_port: u16) -> u32 {
    let h = crate::hash::client_hash(client_port as u64, client);
    (h as u32) & (ORIG_SLOT_COUNT - 1)
}

/// The check of an [`OrigSlot`]: never zero.
#[inline(always)]
pub const fn orig_slot_check(tuple: &SockTuple, vip: &Endpoint) -> u64 {
    use crate::hash::mix64;
    const fn words(a: &Addr) -> u64 {
        (a[0] as u64) << 32 | a[1] as u64
    }
    const fn low(a: &Addr) -> u64 {
        (a[2] as u64) << 32 | a[3] as u64
    }
    let mut h = mix64(words(&tuple.local) ^ 0x5359);
    h = mix64(h ^ low(&tuple.local));
    h = mix64(h ^ words(&tuple.remote));
    h = mix64(h ^ low(&tuple.remote));
    h = mix64(h ^ ((tuple.local_port as u64) << 16 | tuple.remote_port as u64));
    h = mix64(h ^ words(&vip.addr));
    h = mix64(h ^ low(&vip.addr));
    h = mix64(h ^ vip.port as u64);
    h | 1
}

/// A UDP socket and the backend it talked to on a service's behalf: replies from that backend
/// are shown to the application as coming from the service address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RevKey {
    pub cookie: u64,
    pub addr: Addr,
    /// Host byte order.
    pub port: u16,
    pub _pad: [u8; 6],
}

/// What a steered socket was aimed at, kept by socket cookie.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    pub vip: Endpoint,
    pub mode: u8,
    pub _pad: [u8; 3],
}

/// What the programs learn about one backend, kept by backend id. The agent creates the entry
/// (zeroed, with `generation`, `service` and the starting `ewma_ns`) when it hands out the id
/// and removes it with the backend; in between only the programs write it, with atomic adds
/// (or a compare-and-swap for `ejected_until_ns`), so the counts are exact whatever the CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendStats {
    /// Unique per handed-out id: a socket filed under an older holder of the same id does not
    /// touch this one's counts when it closes.
    pub generation: u64,
    /// The service id this backend belongs to (ids are per service).
    pub service: u32,
    pub _pad: u32,
    /// Connects sent (SYN out) and not yet established or failed.
    pub connecting: u64,
    /// Established connections not yet closed.
    pub active: u64,
    /// Connects sent.
    pub opened: u64,
    /// Connects that were established.
    pub established: u64,
    /// Established connections that closed.
    pub closed: u64,
    /// Connects that ended before being established (refused, reset, timed out, abandoned).
    pub failed: u64,
    /// Connects whose SYN had to be sent again (the retransmission timer fired in `SYN_SENT`).
    pub syn_retransmits: u64,
    /// Failures since the last established connect.
    pub consecutive_failures: u64,
    /// Times passive outlier detection ejected the backend.
    pub ejections: u64,
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) until which connects skip the backend; 0: never.
    pub ejected_until_ns: u64,
    /// Peak-EWMA of the connect time (SYN out to established), in nanoseconds.
    pub ewma_ns: u64,
    /// When `ewma_ns` was last updated (CLOCK_MONOTONIC).
    pub ewma_stamp_ns: u64,
}

/// A service's passive outlier detection, by service id (an array entry; all zero: off).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OutlierPolicy {
    /// Consecutive failed connects that eject a backend; 0: no ejection.
    pub failures: u32,
    /// First ejection, in milliseconds; the n-th lasts n times as long, up to `max_ms`.
    pub base_ms: u32,
    pub max_ms: u32,
    /// At most this share of the service's slots may be ejected at once.
    pub max_ejected_percent: u32,
}

/// Flags of a [`SockLearn`] entry.
pub mod sock_learn {
    /// The SYN is out (`TCP_CONNECT_CB` ran).
    pub const CONNECTING: u32 = 1;
    /// The connect was established.
    pub const ESTABLISHED: u32 = 2;
    /// A SYN retransmission already counted as this connect's failure.
    pub const FAILURE_COUNTED: u32 = 4;
}

/// A kernel-mode TCP socket and the backend `connect()` chose for it, by socket cookie; removed
/// when the socket closes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockLearn {
    pub backend: BackendId,
    /// [`sock_learn`] flags.
    pub flags: u32,
    /// The backend entry's generation when the socket was filed.
    pub generation: u64,
    /// When the SYN went out (CLOCK_MONOTONIC).
    pub started_ns: u64,
}

/// Decay time of the peak EWMA (linkerd2-proxy's 10 s; the forwarder's too).
pub const EWMA_DECAY_NS: u64 = 10_000_000_000;

/// Most slots the ejection cap looks at (services with more usable slots are judged on their
/// first this many).
pub const EJECTION_SCAN: u32 = 64;

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: plain `repr(C)` data with every byte a named field.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for SlotKey {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for Endpoint {}
    unsafe impl aya::Pod for Settings {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for MemberKey {}
    unsafe impl aya::Pod for SockTuple {}
    unsafe impl aya::Pod for OrigDst {}
    unsafe impl aya::Pod for OrigSlot {}
    unsafe impl aya::Pod for RevKey {}
    unsafe impl aya::Pod for BackendStats {}
    unsafe impl aya::Pod for OutlierPolicy {}
    unsafe impl aya::Pod for SockLearn {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    /// Sizes pin the layouts: a change here is a change on both sides.
    #[test]
    fn layouts_have_no_hidden_padding() {
        assert_eq!(size_of::<ServiceKey>(), 20);
        assert_eq!(size_of::<ServiceValue>(), 20);
        assert_eq!(size_of::<SlotKey>(), 8);
        assert_eq!(size_of::<Backend>(), 20);
        assert_eq!(size_of::<Endpoint>(), 20);
        assert_eq!(size_of::<OrigSlot>(), 64);
        assert_eq!(size_of::<Settings>(), 48);
        assert_eq!(size_of::<AffinityKey>(), 32);
        assert_eq!(size_of::<AffinityValue>(), 16);
        assert_eq!(size_of::<MemberKey>(), 8);
        assert_eq!(size_of::<SockTuple>(), 36);
        assert_eq!(size_of::<OrigDst>(), 24);
        assert_eq!(size_of::<RevKey>(), 32);
        assert_eq!(size_of::<BackendStats>(), 112);
        assert_eq!(size_of::<OutlierPolicy>(), 16);
        assert_eq!(size_of::<SockLearn>(), 24);
    }
}
