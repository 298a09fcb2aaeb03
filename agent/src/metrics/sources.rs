//! The registry's sources: entries, liveness, staleness, rejections.

use std::fmt;

use prometheus_client::{encoding::DescriptorEncoder, registry::Unit};

use super::family::{counter, gauge};
use crate::registry::{Registry, SourceStatus};

pub fn encode(enc: &mut DescriptorEncoder, registry: &Registry) -> fmt::Result {
    let status = registry.status();
    let src = |s: &SourceStatus| [("source", s.source.name())];
    gauge(
        enc,
        "registry_entries",
        "Entries in the source's layer.",
        None,
        status.iter().map(|s| (src(s), s.entries as u64)),
    )?;
    gauge(
        enc,
        "registry_live",
        "1 while the source is connected and current.",
        None,
        status.iter().map(|s| (src(s), u64::from(s.live))),
    )?;
    gauge(
        enc,
        "registry_staleness",
        "Seconds since the source last delivered a current view (absent: never).",
        Some(Unit::Seconds),
        status
            .iter()
            .filter_map(|s| Some((src(s), s.staleness_seconds?))),
    )?;
    counter(
        enc,
        "registry_rejected",
        "Entries of the source rejected since the agent started.",
        None,
        status.iter().map(|s| (src(s), s.rejected_total)),
    )?;
    Ok(())
}
