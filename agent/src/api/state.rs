//! The API's view of a live snapshot: one service's state, health and counters as JSON.

use std::sync::atomic::Ordering;

use super::view::{BackendLive, CountersView, DrainProgress, ForwarderState, Health, ServiceState};
use crate::{
    catalog::Service,
    health::{BackendHealth, Counters, Verdict},
    live::Snapshot,
    registry::Source,
};

/// The live state of `s` at the snapshot's moment.
pub fn state(snap: &Snapshot, s: &Service, source: Option<Source>) -> ServiceState {
    let forwarder = snap.forwarder(s).map(|f| ForwarderState {
        active: f.active.load(Ordering::Relaxed),
        refused_limit: f.refused_limit.load(Ordering::Relaxed),
        refused_no_backend: f.refused_no_backend.load(Ordering::Relaxed),
        retries: f.retries.load(Ordering::Relaxed),
    });
    let backends = s
        .backends
        .iter()
        .map(|b| {
            let h = snap.health(s.addr, b.addr);
            let draining = h.is_some_and(|h| h.draining());
            BackendLive {
                address: b.addr,
                weight: b.weight,
                state: b.state,
                health: h.map_or(Health::Unknown, |h| health(h)),
                ejected_for_seconds: h
                    .and_then(|h| h.ejected_until())
                    .filter(|&t| t > snap.now())
                    .map(|t| (t - snap.now()).as_secs_f64()),
                draining,
                drain: h.filter(|_| draining).map(|h| DrainProgress {
                    open: h.counters.active.load(Ordering::Relaxed),
                    closed_at_deadline: h.counters.drained_closed.load(Ordering::Relaxed),
                }),
                counters: h.map(|h| counters(&h.counters)),
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
