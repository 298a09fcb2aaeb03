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

pub struct Room {
    /// Descriptors open before the forwarder took any (maps, programs, listeners).
    base: u64,
    /// Connections the forwarder holds now.
    held: AtomicU64,
    /// Whether the last connection was refused for want of room (log once per episode).
    full: AtomicBool,
}

/// Room for one connection, given back on drop.
pub struct Held<'a>(&'a Room);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.held.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Room {
    /// Counts the descriptors open now as the base.
    pub fn new() -> Self {
        let base = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64);
        Room {
            base,
            held: AtomicU64::new(0),
            full: AtomicBool::new(false),
        }
    }

    /// Room for one more connection, if it leaves [`RESERVE`] descriptors free. The limit is
    /// read each time (one cheap syscall): an operator may change it on a running agent.
    pub fn take(&self) -> Option<Held<'_>> {
        let limit = soft_nofile();
        let held = self.held.fetch_add(1, Ordering::Relaxed) + 1;
        let fits = self.base + 2 * held + RESERVE <= limit;
        if !fits {
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
        if self.full.swap(false, Ordering::Relaxed) {
            info!(limit, held, "descriptors available again: accepting");
        }
        Some(Held(self))
    }
}

impl Default for Room {
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
    fn room_is_refused_near_the_limit_and_given_back_on_drop() {
        let limit = soft_nofile();
        let room = Room {
            base: limit - RESERVE - 4,
            held: AtomicU64::new(0),
            full: AtomicBool::new(false),
        };
        let a = room.take().expect("first fits");
        let b = room.take().expect("second fits");
        assert!(room.take().is_none(), "a third would eat the reserve");
        drop(a);
        let c = room.take().expect("room again after a close");
        drop((b, c));
        assert_eq!(room.held.load(Ordering::Relaxed), 0);
    }
}
