//! Descriptor headroom: the forwarder never takes the last descriptors of the process.
//!
//! Each forwarded connection holds two descriptors (client and upstream). Left alone, a flood
//! of connections takes every descriptor the agent may have; then the API, metrics, health
//! checks and registry sources cannot accept or connect either, and the operator cannot even
//! ask what is wrong (the fault-injection suite's `fd-limit` scenario showed exactly that).
//! HAProxy sizes `maxconn` from `ulimit -n` for the same reason. So a new connection that
//! would leave fewer than [`RESERVE`] descriptors is refused at once with a reset, like one
//! over a service's `max_connections`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tracing::{info, warn};

use crate::defaults::FD_RESERVE as RESERVE;

pub struct DescriptorReserve {
    /// Descriptors open before the forwarder took any (maps, programs, listeners).
    base: u64,
    /// Connections the forwarder holds now.
    held: AtomicU64,
    /// Whether the last connection was refused for want of room (log once per episode).
    full: AtomicBool,
    /// The soft descriptor limit as last read, and connections taken since.
    limit: AtomicU64,
    takes: AtomicU64,
}

/// The limit is read again every this many connections (and on every refusal): an operator may
/// change it on a running agent, and between two reads at most twice this many descriptors
/// can be taken, well inside [`RESERVE`]. Reading it on every connection cost a system call
/// each.
const REREAD: u64 = 16;

/// The descriptors of one connection, given back on drop.
pub struct Held<'a>(&'a DescriptorReserve);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.held.fetch_sub(1, Ordering::Relaxed);
    }
}

impl DescriptorReserve {
    /// Counts the descriptors open now as the base.
    pub fn new() -> Self {
        let base = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64);
        DescriptorReserve::with_base(base)
    }

    fn with_base(base: u64) -> Self {
        DescriptorReserve {
            base,
            held: AtomicU64::new(0),
            full: AtomicBool::new(false),
            limit: AtomicU64::new(soft_nofile()),
            takes: AtomicU64::new(0),
        }
    }

    fn limit(&self, fresh: bool) -> u64 {
        if fresh || self.takes.fetch_add(1, Ordering::Relaxed) % REREAD == REREAD - 1 {
            let limit = soft_nofile();
            self.limit.store(limit, Ordering::Relaxed);
            return limit;
        }
        self.limit.load(Ordering::Relaxed)
    }

    /// Whether `held` connections leave [`RESERVE`] descriptors free under `limit`.
    fn fits(&self, held: u64, limit: u64) -> bool {
        self.base + 2 * held + RESERVE <= limit
    }

    /// Descriptors for one more connection, if that leaves [`RESERVE`] descriptors free.
    pub fn take(&self) -> Option<Held<'_>> {
        // Near the limit as last read, read it again before refusing: it may have been raised.
        let cached = self.limit.load(Ordering::Relaxed);
        let limit = self.limit(!self.fits(self.held.load(Ordering::Relaxed) + 1, cached));
        let held = self.held.fetch_add(1, Ordering::Relaxed) + 1;
        if !self.fits(held, limit) {
            self.held.fetch_sub(1, Ordering::Relaxed);
            if !self.full.swap(true, Ordering::Relaxed) {
                warn!(
                    limit,
                    held = held - 1,
                    reserve = RESERVE,
                    "descriptors nearly exhausted: refusing new connections"
                );
            }
            return None;
        }
        // A load first: a swap on every connection would bounce the line between workers.
        if self.full.load(Ordering::Relaxed) && self.full.swap(false, Ordering::Relaxed) {
            info!(limit, held, "descriptors available again: accepting");
        }
        Some(Held(self))
    }
}

impl Default for DescriptorReserve {
    fn default() -> Self {
        Self::new()
    }
}

fn soft_nofile() -> u64 {
    // SAFETY: getrlimit fills a valid struct for our own process.
    let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return u64::MAX;
    }
    lim.rlim_cur
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_is_refused_near_the_limit_and_given_back_on_drop() {
        let limit = soft_nofile();
        let reserve = DescriptorReserve::with_base(limit - RESERVE - 4);
        let a = reserve.take().expect("first fits");
        let b = reserve.take().expect("second fits");
        assert!(reserve.take().is_none(), "a third would eat the reserve");
        drop(a);
        let c = reserve.take().expect("fits again after a close");
        drop((b, c));
        assert_eq!(reserve.held.load(Ordering::Relaxed), 0);
    }
}
