//! Per-service series: the forwarder's service-wide counters, sums over the backends, and the
//! backend counts.

use std::{
    fmt,
    sync::atomic::{AtomicU64, Ordering},
};

use prometheus_client::{encoding::DescriptorEncoder, metrics::gauge::ConstGauge};

use super::{
    Scraped,
    family::{counter, gauge, one},
};
use crate::health::{Counters, Verdict};

type OneLabel<'a> = [(&'static str, &'a str); 1];

fn service_label(service: &str) -> OneLabel<'_> {
    [("service", service)]
}

pub fn encode(enc: &mut DescriptorEncoder, seen: &Scraped) -> fmt::Result {
    let (snap, services, backends) = (seen.snap, &seen.services, &seen.backends);
    let shared: Vec<_> = services
        .iter()
        .filter_map(|s| Some((s.name.as_str(), snap.forwarder(s)?)))
        .collect();
    gauge(
        enc,
        "service_connections_active",
        "Forwarded connections of the service open now (proxy mode).",
        None,
        shared
            .iter()
            .map(|(n, f)| (service_label(n), f.active.load(Ordering::Relaxed))),
    )?;
    let sum = |name: &str, get: fn(&Counters) -> &AtomicU64| -> u64 {
        backends
            .iter()
            .filter(|(s, _, _)| *s == name)
            .map(|(_, _, h)| get(&h.counters).load(Ordering::Relaxed))
            .sum()
    };
    counter(
        enc,
        "service_connections_opened",
        "Connections the forwarder opened for the service (sum over its current backends).",
        None,
        shared
            .iter()
            .map(|(n, _)| (service_label(n), sum(n, |c| &c.opened))),
    )?;
    counter(
        enc,
        "service_connections_closed",
        "Forwarded connections of the service that ended (sum over its current backends).",
        None,
        shared
            .iter()
            .map(|(n, _)| (service_label(n), sum(n, |c| &c.closed))),
    )?;
    counter(
        enc,
        "service_retries",
        "Connect attempts on another backend after a failure.",
        None,
        shared
            .iter()
            .map(|(n, f)| (service_label(n), f.retries.load(Ordering::Relaxed))),
    )?;
    counter(
        enc,
        "service_refused_limit",
        "Connections refused because max_connections were open.",
        None,
        shared
            .iter()
            .map(|(n, f)| (service_label(n), f.refused_limit.load(Ordering::Relaxed))),
    )?;
    counter(
        enc,
        "service_refused_no_backend",
        "Connections the forwarder refused because no backend could be reached (fail fast).",
        None,
        shared.iter().map(|(n, f)| {
            (
                service_label(n),
                f.refused_no_backend.load(Ordering::Relaxed),
            )
        }),
    )?;
    gauge(
        enc,
        "service_backends",
        "Backends the service lists.",
        None,
        services
            .iter()
            .map(|s| (service_label(&s.name), s.backends.len() as u64)),
    )?;
    gauge(
        enc,
        "service_backends_usable",
        "Backends that may take new connections: ready, weight above 0, not held down or ejected.",
        None,
        services.iter().map(|s| {
            let usable = s
                .usable()
                .filter(|b| {
                    snap.health(s.addr, b.addr)
                        .is_none_or(|h| h.verdict() != Verdict::Down && !snap.ejected(h))
                })
                .count();
            (service_label(&s.name), usable as u64)
        }),
    )?;
    one(
        enc,
        "services",
        "Services in the catalog the datapath serves.",
        None,
        ConstGauge::new(services.len() as u64),
    )?;
    Ok(())
}
