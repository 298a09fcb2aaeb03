//! Per-backend series: the forwarder's and the health checks' counters on the board, the
//! backend's state, and its two histograms.

use std::{
    fmt,
    sync::atomic::{AtomicU64, Ordering},
};

use prometheus_client::{encoding::DescriptorEncoder, metrics::MetricType, registry::Unit};

use super::{
    Scraped,
    family::{counter, family, gauge},
};
use crate::{
    catalog::BackendState,
    health::{Counters, Verdict},
};

/// A per-backend counter: its name (without `switchyard_` and `_total`), help, unit, and where
/// the board keeps it.
type BackendCounter = (
    &'static str,
    &'static str,
    Option<Unit>,
    fn(&Counters) -> &AtomicU64,
);

/// Per-backend counters exported as `switchyard_<name>_total`.
const BACKEND_COUNTERS: [BackendCounter; 11] = [
    (
        "backend_connections_opened",
        "Connections the forwarder opened to the backend.",
        None,
        |c| &c.opened,
    ),
    (
        "backend_connections_closed",
        "Forwarded connections to the backend that ended.",
        None,
        |c| &c.closed,
    ),
    (
        "backend_sent",
        "Bytes sent to the backend (from clients).",
        Some(Unit::Bytes),
        |c| &c.bytes_out,
    ),
    (
        "backend_received",
        "Bytes received from the backend (for clients).",
        Some(Unit::Bytes),
        |c| &c.bytes_in,
    ),
    (
        "backend_connect_failures",
        "Connects to the backend that failed (refused, unreachable, timed out).",
        None,
        |c| &c.connect_failures,
    ),
    (
        "backend_connect_timeouts",
        "Connects to the backend that timed out.",
        None,
        |c| &c.connect_timeouts,
    ),
    (
        "backend_resets",
        "Connections the backend reset, or closed before its first byte.",
        None,
        |c| &c.resets,
    ),
    (
        "backend_ejections",
        "Times passive outlier detection ejected the backend.",
        None,
        |c| &c.ejections,
    ),
    (
        "backend_drain_closed",
        "Connections closed because the backend's drain deadline passed.",
        None,
        |c| &c.drained_closed,
    ),
    (
        "backend_health_checks_passed",
        "Active health checks that passed.",
        None,
        |c| &c.checks_passed,
    ),
    (
        "backend_health_checks_failed",
        "Active health checks that failed.",
        None,
        |c| &c.checks_failed,
    ),
];

pub fn encode(enc: &mut DescriptorEncoder, seen: &Scraped) -> fmt::Result {
    let (snap, services, backends) = (seen.snap, &seen.services, &seen.backends);
    for (name, help, unit, get) in BACKEND_COUNTERS {
        counter(
            enc,
            name,
            help,
            unit,
            backends.iter().map(|(s, b, h)| {
                (
                    seen.labels(s, b.addr),
                    get(&h.counters).load(Ordering::Relaxed),
                )
            }),
        )?;
    }
    gauge(
        enc,
        "backend_connections_active",
        "Forwarded connections to the backend open now.",
        None,
        backends.iter().map(|(s, b, h)| {
            (
                seen.labels(s, b.addr),
                h.counters.active.load(Ordering::Relaxed),
            )
        }),
    )?;
    gauge(
        enc,
        "backend_ejected",
        "1 while passive outlier detection holds the backend out.",
        None,
        backends
            .iter()
            .map(|(s, b, h)| (seen.labels(s, b.addr), u64::from(snap.ejected(h)))),
    )?;
    gauge(
        enc,
        "backend_health_down",
        "1 while active health checks hold the backend down.",
        None,
        backends.iter().map(|(s, b, h)| {
            (
                seen.labels(s, b.addr),
                u64::from(h.verdict() == Verdict::Down),
            )
        }),
    )?;
    gauge(
        enc,
        "backend_draining",
        "1 while the backend drains (state drain or maint, or removed): open connections run on until the deadline.",
        None,
        backends
            .iter()
            .map(|(s, b, h)| (seen.labels(s, b.addr), u64::from(h.draining()))),
    )?;
    gauge(
        enc,
        "backend_weight",
        "The backend's configured weight (0 while not ready).",
        None,
        services.iter().flat_map(|s| {
            s.backends.iter().map(|b| {
                let w = if b.state == BackendState::Ready {
                    b.weight
                } else {
                    0
                };
                (seen.labels(&s.name, b.addr), u64::from(w))
            })
        }),
    )?;
    family(
        enc,
        "backend_connect_duration",
        "Time to connect to the backend (successful connects).",
        Some(Unit::Seconds),
        MetricType::Histogram,
        backends
            .iter()
            .map(|(s, b, h)| (seen.labels(s, b.addr), h.counters.timings.connect.clone())),
    )?;
    family(
        enc,
        "backend_connection_duration",
        "How long forwarded connections to the backend lasted.",
        Some(Unit::Seconds),
        MetricType::Histogram,
        backends
            .iter()
            .map(|(s, b, h)| (seen.labels(s, b.addr), h.counters.timings.duration.clone())),
    )?;
    Ok(())
}
