//! The API's view of a live snapshot: one service's state, health and counters as JSON (HTTP
//! mode's request counts too: [`http_state`]).

use std::sync::atomic::Ordering;

use switchyard_common::maps::BackendStats;

use super::view::{
    BackendLive, CountersView, DrainProgress, ForwarderState, Health, HttpState, KernelBackendView,
    RequestCounts, RouteRequests, ServiceState,
};
use crate::{
    catalog::Service,
    datapath::learned,
    health::{BackendHealth, Counters, Verdict},
    http::stats::{CLASSES, Totals},
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
            let k = snap.kernel(s, b.addr);
            let mut counters = h.map(|h| counters(&h.counters));
            if let Some(k) = k {
                kernel_counters(counters.get_or_insert_with(Default::default), k);
            }
            BackendLive {
                address: b.addr,
                weight: b.weight,
                state: b.state,
                health: h.map_or(Health::Unknown, |h| health(h)),
                ejected_for_seconds: h
                    .and_then(|h| h.ejected_until())
                    .filter(|&t| t > snap.now())
                    .map(|t| (t - snap.now()).as_secs_f64())
                    .or_else(|| k.and_then(|k| learned::ejected_for(k, snap.kernel_now_ns))),
                draining,
                drain: h.filter(|_| draining).map(|h| DrainProgress {
                    open: h.counters.active.load(Ordering::Relaxed),
                    closed_at_deadline: h.counters.drained_closed.load(Ordering::Relaxed),
                }),
                counters,
                kernel: k.map(|k| kernel_view(k, snap.kernel_now_ns)),
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
        http: http_state(snap, s),
    }
}

/// An HTTP-mode service's request counts, and per route that sent it requests.
pub fn http_state(snap: &Snapshot, s: &Service) -> Option<HttpState> {
    if s.mode != crate::catalog::Mode::Proxy || s.policy.app_protocol.is_tcp() {
        return None;
    }
    let routes = snap
        .http
        .service_routes(&s.name)
        .into_iter()
        .map(|(route, t)| RouteRequests {
            route,
            requests: request_counts(&t),
        })
        .collect();
    Some(HttpState {
        requests: request_counts(&snap.http.service_totals(&s.name)),
        routes,
    })
}

fn request_counts(t: &Totals) -> RequestCounts {
    RequestCounts {
        by_class: CLASSES
            .iter()
            .zip(t.requests)
            .filter(|(_, n)| *n > 0)
            .map(|(c, n)| (c.to_string(), n))
            .collect(),
        by_proxy: t.by_proxy,
        retries: t.retries,
        in_flight: t.in_flight,
    }
}

/// The programs' counts in the forwarder's terms: active from the connect on, and every
/// attempt that ended (failed connects too) closed, so `opened = active + closed` holds.
fn kernel_counters(c: &mut CountersView, k: &BackendStats) {
    c.active = k.connecting.wrapping_add(k.active);
    c.opened = k.opened;
    c.closed = k.closed + k.failed;
    c.connect_failures = k.failed;
    c.ejections = k.ejections;
}

fn kernel_view(k: &BackendStats, now_ns: u64) -> KernelBackendView {
    KernelBackendView {
        connecting: k.connecting,
        established_open: k.active,
        opened: k.opened,
        established: k.established,
        closed: k.closed,
        failed: k.failed,
        syn_retransmits: k.syn_retransmits,
        consecutive_failures: k.consecutive_failures,
        ejections: k.ejections,
        connect_ewma_seconds: learned::ewma_seconds(k, now_ns),
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
