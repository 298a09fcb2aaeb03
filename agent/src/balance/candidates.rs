//! Which backends may take a proxied connection attempt: the node-wide health of each backend
//! (active checks, outlier ejection, slow start) turned into balancing candidates, the panic
//! threshold, the ejection cap and the retry budget.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::Instant,
};

use super::Candidate;
use crate::{
    catalog::BackendState,
    datapath::addr::to_words,
    defaults,
    health::{BackendHealth, Verdict},
};

/// One backend of a proxy-mode service, as the forwarder holds it.
pub struct Upstream {
    pub addr: SocketAddr,
    pub weight: u32,
    pub state: BackendState,
    pub health: Arc<BackendHealth>,
    key: u64,
}

impl Upstream {
    pub fn new(
        addr: SocketAddr,
        weight: u32,
        state: BackendState,
        health: Arc<BackendHealth>,
    ) -> Self {
        Upstream {
            addr,
            weight,
            state,
            health,
            key: backend_key(addr),
        }
    }

    /// Not held down by an active check, not ejected.
    fn healthy(&self, now: Instant) -> bool {
        self.health.verdict() != Verdict::Down && !self.health.is_ejected(now)
    }

    fn admitted(&self) -> bool {
        self.state == BackendState::Ready && self.weight > 0
    }
}

/// A backend's identity for consistent hashing, the same in the forwarder and in the kernel's
/// Maglev table, so both modes send a client to the same backend.
pub fn backend_key(addr: SocketAddr) -> u64 {
    switchyard_common::maglev::backend_key(&to_words(addr.ip()), addr.port())
}

/// One upstream as a balancing candidate for one connection attempt.
pub struct UpstreamCandidate<'a> {
    pub upstream: &'a Upstream,
    pub tried: bool,
    /// Panic mode: health and ejection are ignored (too few healthy backends).
    pub panic: bool,
    pub now: Instant,
}

impl Candidate for UpstreamCandidate<'_> {
    fn weight(&self) -> u32 {
        self.upstream
            .health
            .effective_weight(self.upstream.weight, self.now, defaults::SLOW_START)
    }
    fn usable(&self) -> bool {
        !self.tried && self.upstream.admitted() && (self.panic || self.upstream.healthy(self.now))
    }
    fn active(&self) -> u64 {
        self.upstream.health.counters.active.load(Ordering::Relaxed)
    }
    fn latency(&self) -> f64 {
        self.upstream.health.latency_ns()
    }
    fn key(&self) -> u64 {
        self.upstream.key
    }
}

/// Panic mode, one rule for both modes (the kernel's slots follow it too, see `reconcile`):
/// with fewer than the panic threshold of a service's admitted backends healthy, health (and,
/// in the forwarder, ejection) is ignored and every admitted backend takes connections, rather
/// than the service refusing everyone.
pub fn panics(admitted: usize, healthy: usize) -> bool {
    admitted > 0 && healthy * 100 < admitted * defaults::PANIC_THRESHOLD_PERCENT as usize
}

/// Candidates for one attempt (`tried`: per backend, whether this connection tried it
/// already); panic mode when under the panic threshold of the admitted backends are healthy.
pub fn candidates<'a>(backends: &'a [Upstream], tried: &[bool]) -> Vec<UpstreamCandidate<'a>> {
    candidates_at(backends, tried, Instant::now())
}

/// [`candidates`] as of `now`, a clock the caller has read anyway.
pub fn candidates_at<'a>(
    backends: &'a [Upstream],
    tried: &[bool],
    now: Instant,
) -> Vec<UpstreamCandidate<'a>> {
    let admitted = backends.iter().filter(|u| u.admitted()).count();
    let healthy = backends
        .iter()
        .filter(|u| u.admitted() && u.healthy(now))
        .count();
    let panic = panics(admitted, healthy);
    backends
        .iter()
        .zip(tried)
        .map(|(upstream, &tried)| UpstreamCandidate {
            upstream,
            tried,
            panic,
            now,
        })
        .collect()
}

/// Every backend as a candidate, health aside: what the hash tables are built over, so that a
/// drained or failed backend does not remap anyone else's clients.
pub fn all(backends: &[Upstream]) -> Vec<UpstreamCandidate<'_>> {
    let now = Instant::now();
    backends
        .iter()
        .map(|upstream| UpstreamCandidate {
            upstream,
            tried: false,
            panic: true,
            now,
        })
        .collect()
}

/// Whether ejecting one more backend keeps the service within its ejection cap.
pub fn may_eject(backends: &[Upstream]) -> bool {
    let now = Instant::now();
    let total = backends.len().max(1);
    let ejected = backends.iter().filter(|u| u.health.is_ejected(now)).count();
    (ejected + 1) * 100 <= total * defaults::OUTLIER_MAX_EJECTED_PERCENT as usize
}

/// A retry may start if retries in flight stay within the budget (Envoy's retry budget):
/// `active` connections of the service, `in_flight` retries now.
pub fn retry_allowed(active: u64, in_flight: u32) -> bool {
    let budget =
        (active as u32 * defaults::RETRY_BUDGET_PERCENT / 100).max(defaults::RETRY_BUDGET_MIN);
    in_flight < budget
}

#[cfg(test)]
mod panic_tests {
    #[test]
    fn panic_mode_below_half_healthy() {
        assert!(!super::panics(0, 0));
        assert!(super::panics(2, 0));
        assert!(!super::panics(2, 1));
        assert!(super::panics(3, 1));
        assert!(!super::panics(4, 2));
    }
}
