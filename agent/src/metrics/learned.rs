//! Per-backend series of kernel-mode TCP services, from what the eBPF programs count (see
//! `docs/kernel-learning.md`). Where a proxy-mode family means the same thing (connections
//! opened, closed, active, failed connects, ejections, ejected now), the kernel's value is a
//! sample of that family, written by [`backends`](super::backends) through [`shared`]; what
//! only the kernel measures has families of its own, written here.

use std::fmt;

use switchyard_common::maps::BackendStats;

use prometheus_client::{encoding::DescriptorEncoder, registry::Unit};

use super::{
    Scraped,
    family::{counter, gauge},
};
use crate::datapath::learned;

/// The kernel's value for a proxy-mode family (its name without `switchyard_` and `_total`),
/// if it has one: active counts from the connect on and closed counts every attempt that ended,
/// as the forwarder's do.
pub fn shared(family: &str, k: &BackendStats, now_ns: u64) -> Option<u64> {
    Some(match family {
        "backend_connections_opened" => k.opened,
        "backend_connections_closed" => k.closed + k.failed,
        "backend_connections_active" => k.connecting.wrapping_add(k.active),
        "backend_connect_failures" => k.failed,
        "backend_ejections" => k.ejections,
        "backend_ejected" => u64::from(k.ejected_until_ns > now_ns),
        _ => return None,
    })
}

pub fn encode(enc: &mut DescriptorEncoder, seen: &Scraped) -> fmt::Result {
    let now = seen.snap.kernel_now_ns;
    let kernel = &seen.kernel;
    counter(
        enc,
        "backend_connections_established",
        "Kernel mode: connects to the backend that were established (SYN to established).",
        None,
        kernel
            .iter()
            .map(|(s, b, k)| (seen.labels(s, *b), k.established)),
    )?;
    counter(
        enc,
        "backend_syn_retransmits",
        "Kernel mode: connects whose SYN to the backend had to be sent again.",
        None,
        kernel
            .iter()
            .map(|(s, b, k)| (seen.labels(s, *b), k.syn_retransmits)),
    )?;
    gauge(
        enc,
        "backend_connect_ewma",
        "Kernel mode: peak-EWMA of the connect time to the backend, decayed to now (what peak_ewma compares).",
        Some(Unit::Seconds),
        kernel
            .iter()
            .map(|(s, b, k)| (seen.labels(s, *b), learned::ewma_seconds(k, now))),
    )?;
    Ok(())
}
