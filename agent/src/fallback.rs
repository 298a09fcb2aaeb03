//! The kernel fallback, seen from the agent: while no forwarder listens, the connect hook
//! balances proxy-mode services in the kernel (docs/zero-downtime.md). The agent says when it
//! starts (a graceful stop) and, at the next start, when it ended and how many connections it
//! took: the kernel's counter is pinned, and each agent notes its value when it starts
//! listening, in the run directory, for the next one to compare.

use std::path::{Path, PathBuf};

use switchyard_common::counters::Counter;
use tracing::{info, warn};

use crate::datapath::KernelMaps;

const MARK: &str = "fallback.count";

fn mark_path(run_dir: &Path) -> PathBuf {
    run_dir.join(MARK)
}

fn count(maps: &KernelMaps) -> Option<u64> {
    match maps.counters() {
        Ok(all) => all
            .into_iter()
            .find(|(c, _)| *c == Counter::Fallback)
            .map(|(_, n)| n),
        Err(e) => {
            warn!("kernel counters not read: {e}");
            None
        }
    }
}

/// The forwarder listens again (its sockets are filed for the hooks): reports what the
/// fallback carried since the previous agent started listening, and notes the count.
pub fn ended(maps: &KernelMaps, run_dir: &Path) {
    let Some(now) = count(maps) else { return };
    let before = std::fs::read_to_string(mark_path(run_dir))
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    match before {
        // The counter is pinned with the maps; a smaller value means they were made anew.
        Some(b) if now > b => info!(
            connections = now - b,
            total = now,
            "kernel fallback ended: the forwarder listens again; proxy-mode connections \
             balanced in the kernel while none listened"
        ),
        None if now > 0 => info!(
            connections = now,
            total = now,
            "kernel fallback ended: the forwarder listens again; proxy-mode connections \
             balanced in the kernel while none listened (since the maps were made)"
        ),
        _ => {}
    }
    if let Err(e) = std::fs::create_dir_all(run_dir)
        .and_then(|()| std::fs::write(mark_path(run_dir), format!("{now}\n")))
    {
        warn!(dir = %run_dir.display(), "cannot note the fallback counter: {e}");
    }
}

/// The listeners were taken out of the hooks' sight: new proxy-mode connections are balanced
/// in the kernel from now on.
pub fn started(maps: &KernelMaps) {
    info!(
        total = count(maps).unwrap_or(0),
        "kernel fallback started: no forwarder listens from now on; new proxy-mode connections \
         are balanced in the kernel until an agent listens again"
    );
}
