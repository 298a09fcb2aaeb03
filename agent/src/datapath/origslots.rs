//! `ORIG_SLOTS`, mapped into the agent's memory: the forwarder finds a redirected connection's
//! original destination with a few loads after its accept, not a `getsockopt` (whose system
//! call and hook were the largest cost the agent adds to a new connection; docs/benchmarks.md,
//! "Eleventh pass").
//!
//! The kernel writes a slot while the forwarder may be reading it, so a slot is copied out and
//! believed only if its check matches what it holds; taking it is a compare-and-swap of the
//! check to zero, which leaves alone a slot that another connection has rewritten meanwhile.

use std::{
    os::fd::{AsFd, AsRawFd},
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering},
};

use aya::{Ebpf, maps::MapData};
use switchyard_common::{
    Addr,
    maps::{Endpoint, ORIG_SLOT_COUNT, OrigSlot, orig_slot_check, orig_slot_index},
};

use super::maps::MapsError;

/// What the forwarder knows of an accepted connection without a system call.
pub struct Accepted<'a> {
    /// The client's address and port, as `accept` returned them.
    pub client: &'a Addr,
    pub client_port: u16,
    /// The listener's address, if it is bound to one (not the wildcard), and its port.
    pub forwarder: Option<&'a Addr>,
    pub forwarder_port: u16,
}

pub struct OrigSlots {
    base: NonNull<OrigSlot>,
    bytes: usize,
    /// Keeps the map's descriptor with the mapping.
    _map: MapData,
}

// SAFETY: the mapping is shared memory that lives as long as this value; it is only read with
// volatile loads and changed with atomic compare-and-swap, from any thread.
unsafe impl Send for OrigSlots {}
unsafe impl Sync for OrigSlots {}

impl OrigSlots {
    /// Maps the array. An error leaves the forwarder on the `getsockopt` path.
    pub fn map(ebpf: &mut Ebpf) -> Result<Self, MapsError> {
        const NAME: &str = "ORIG_SLOTS";
        let map = ebpf.take_map(NAME).ok_or(MapsError::Missing(NAME))?;
        let aya::maps::Map::Array(map) = map else {
            return Err(MapsError::Mmap {
                name: NAME,
                source: std::io::Error::other("not an array map"),
            });
        };
        let bytes = ORIG_SLOT_COUNT as usize * size_of::<OrigSlot>();
        let fd = map.fd().as_fd().as_raw_fd();
        // SAFETY: a fresh shared mapping of the map's values (the kernel checks the flags and
        // the length against the map); nothing else in this process maps it.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(MapsError::Mmap {
                name: NAME,
                source: std::io::Error::last_os_error(),
            });
        }
        let base = NonNull::new(base.cast::<OrigSlot>()).ok_or(MapsError::Mmap {
            name: NAME,
            source: std::io::Error::other("mapped at address zero"),
        })?;
        Ok(OrigSlots {
            base,
            bytes,
            _map: map,
        })
    }

    /// The original destination of `conn`, if its slot still holds it; the slot is emptied.
    pub fn take(&self, conn: &Accepted<'_>) -> Option<Endpoint> {
        take_from(self.slot(conn.client, conn.client_port), conn)
    }

    /// Starts fetching a client's slot into the cache. The kernel wrote it on the client's
    /// core, so reading it is a miss; the accept loop asks for a whole batch of accepted
    /// connections' slots at once, and the misses overlap while their tasks are spawned.
    pub fn prefetch(&self, client: &Addr, client_port: u16) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a prefetch reads nothing and cannot fault; the address is inside the mapping.
        unsafe {
            use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
            _mm_prefetch::<_MM_HINT_T0>(self.slot(client, client_port).cast::<i8>());
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (client, client_port);
    }

    fn slot(&self, client: &Addr, client_port: u16) -> *mut OrigSlot {
        let index = orig_slot_index(client, client_port) as usize;
        // SAFETY: the index is masked to the array's length, so the slot is inside the mapping.
        unsafe { self.base.as_ptr().add(index) }
    }
}

/// [`OrigSlots::take`] on one slot of shared memory.
fn take_from(slot: *mut OrigSlot, conn: &Accepted<'_>) -> Option<Endpoint> {
    // SAFETY: `slot` is valid for reads; the kernel may be writing it, so it is copied out
    // with a volatile load and checked before it is believed.
    let seen = unsafe { std::ptr::read_volatile(slot) };
    let t = &seen.tuple;
    let ours = seen.check != 0
        && t.local == *conn.client
        && t.local_port == conn.client_port
        && t.remote_port == conn.forwarder_port
        && conn.forwarder.is_none_or(|f| t.remote == *f);
    if !ours || orig_slot_check(t, &seen.vip) != seen.check {
        return None;
    }
    // SAFETY: `check` is 8-aligned (the mapping is page-aligned, slots are 64 bytes and the
    // field's offset 56) and only ever accessed atomically or with volatile loads.
    let check = unsafe { AtomicU64::from_ptr(std::ptr::addr_of_mut!((*slot).check)) };
    // Taken: a later connection with the same tuple must not find it. Failing means the slot
    // was rewritten since the copy, which stays valid.
    let _ = check.compare_exchange(seen.check, 0, Ordering::Relaxed, Ordering::Relaxed);
    Some(seen.vip)
}

impl Drop for OrigSlots {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.bytes) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_common::{addr::v4_mapped, maps::SockTuple};

    fn slot_for(tuple: SockTuple, vip: Endpoint) -> OrigSlot {
        OrigSlot {
            tuple,
            vip,
            check: orig_slot_check(&tuple, &vip),
        }
    }

    fn sample() -> (SockTuple, Endpoint) {
        let tuple = SockTuple {
            local: v4_mapped(u32::from_ne_bytes([10, 77, 0, 2])),
            remote: v4_mapped(u32::from_ne_bytes([10, 77, 0, 1])),
            local_port: 40_000,
            remote_port: 15_001,
        };
        let vip = Endpoint {
            addr: v4_mapped(u32::from_ne_bytes([10, 96, 0, 20])),
            port: 80,
            _pad: 0,
        };
        (tuple, vip)
    }

    fn accepted(t: &SockTuple) -> Accepted<'_> {
        Accepted {
            client: &t.local,
            client_port: t.local_port,
            forwarder: Some(&t.remote),
            forwarder_port: t.remote_port,
        }
    }

    #[test]
    fn a_slot_is_taken_once() {
        let (tuple, vip) = sample();
        let mut slot = slot_for(tuple, vip);
        assert_eq!(take_from(&mut slot, &accepted(&tuple)), Some(vip));
        assert_eq!(slot.check, 0);
        assert_eq!(take_from(&mut slot, &accepted(&tuple)), None);
    }

    #[test]
    fn another_connections_slot_is_left_alone() {
        let (tuple, vip) = sample();
        let mut slot = slot_for(tuple, vip);
        let mut other = tuple;
        other.local_port += 1;
        assert_eq!(take_from(&mut slot, &accepted(&other)), None);
        let mut elsewhere = tuple;
        elsewhere.remote_port += 1;
        assert_eq!(take_from(&mut slot, &accepted(&elsewhere)), None);
        assert_ne!(slot.check, 0);
        // A wildcard listener does not know the address it was reached on.
        let wildcard = Accepted {
            forwarder: None,
            ..accepted(&tuple)
        };
        assert_eq!(take_from(&mut slot, &wildcard), Some(vip));
    }

    #[test]
    fn a_torn_slot_is_not_believed() {
        let (tuple, vip) = sample();
        // A writer caught between the fields: the tuple is this connection's, the service
        // address another one's, the check the old one's.
        let mut slot = slot_for(tuple, vip);
        slot.vip.port = 443;
        assert_eq!(take_from(&mut slot, &accepted(&tuple)), None);
        assert_ne!(slot.check, 0, "a slot that was not believed is not taken");
    }
}
