//! The eBPF programs' per-CPU counters, summed.

use std::fmt;

use prometheus_client::encoding::DescriptorEncoder;
use tracing::warn;

use super::family::counter;
use crate::datapath::maps::KernelCounters;

pub fn encode(enc: &mut DescriptorEncoder, kernel: Option<&KernelCounters>) -> fmt::Result {
    let kernel = match kernel {
        Some(k) => k.read().unwrap_or_else(|e| {
            warn!("kernel counters not read: {e}");
            Vec::new()
        }),
        None => Vec::new(),
    };
    counter(
        enc,
        "kernel_events",
        "Events the eBPF programs counted (summed over CPUs), by counter.",
        None,
        kernel.iter().map(|(c, n)| ([("counter", c.name())], *n)),
    )?;
    Ok(())
}
