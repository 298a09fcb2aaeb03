//! The agent's side of what the programs learn per backend (see `docs/kernel-learning.md`):
//! the entries and settings the reconciler writes for them, and a watch that logs what they
//! decided (ejections) while the agent runs. The programs eject on their own, agent or not.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use switchyard_common::maps::{BackendStats, OutlierPolicy};
use tracing::{info, warn};

use super::maps::{KernelLearned, kernel_now_ns};
use crate::{
    catalog::{Mode, Protocol, Service},
    defaults,
};

/// A fresh learning entry for a backend id just handed out in service `service`.
pub fn fresh(service: u32) -> BackendStats {
    let now = kernel_now_ns();
    BackendStats {
        generation: next_generation(now),
        service,
        ewma_ns: defaults::EWMA_DEFAULT_RTT.as_nanos() as u64,
        ewma_stamp_ns: now,
        ..BackendStats::default()
    }
}

/// Unique over the agent's life and across restarts: the monotonic clock, bumped past the
/// last value handed out.
fn next_generation(now: u64) -> u64 {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let mut last = LAST.load(Ordering::Relaxed);
    loop {
        let next = now.max(last + 1);
        match LAST.compare_exchange(last, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return next,
            Err(seen) => last = seen,
        }
    }
}

/// The kernel's passive outlier detection for `s`: kernel-mode TCP services only (the
/// forwarder runs its own for proxy mode; UDP has no connect to fail). Same defaults as the
/// forwarder's.
pub fn outlier_policy(s: &Service) -> OutlierPolicy {
    if s.mode != Mode::Kernel || s.addr.protocol != Protocol::Tcp {
        return OutlierPolicy::default();
    }
    let ms = |d: Duration| d.as_millis().min(u32::MAX as u128) as u32;
    let base = s
        .policy
        .outlier_ejection
        .unwrap_or(defaults::OUTLIER_BASE_EJECTION);
    OutlierPolicy {
        failures: s
            .policy
            .outlier_failures
            .unwrap_or(defaults::OUTLIER_CONSECUTIVE_FAILURES),
        base_ms: ms(base).max(1),
        max_ms: ms(defaults::OUTLIER_MAX_EJECTION.max(base)),
        max_ejected_percent: defaults::OUTLIER_MAX_EJECTED_PERCENT,
    }
}

/// Weights as the programs compare them: reduced by their common divisor, within a byte.
pub fn kernel_weights(weights: &[u32]) -> Vec<u8> {
    fn gcd(a: u32, b: u32) -> u32 {
        if b == 0 { a } else { gcd(b, a % b) }
    }
    let divisor = weights.iter().fold(0, |g, &w| gcd(g, w)).max(1);
    weights
        .iter()
        .map(|&w| (w / divisor).clamp(1, u8::MAX as u32) as u8)
        .collect()
}

/// Seconds the programs still hold a backend out, if they do.
pub fn ejected_for(stats: &BackendStats, now_ns: u64) -> Option<f64> {
    (stats.ejected_until_ns > now_ns)
        .then(|| Duration::from_nanos(stats.ejected_until_ns - now_ns).as_secs_f64())
}

/// The peak EWMA decayed to `now_ns`, as the programs read it when they pick.
pub fn ewma_seconds(k: &BackendStats, now_ns: u64) -> f64 {
    let elapsed = now_ns.saturating_sub(k.ewma_stamp_ns) as f64;
    let decay = switchyard_common::maps::EWMA_DECAY_NS as f64;
    k.ewma_ns as f64 * (-elapsed / decay).exp() / 1e9
}

/// Logs the programs' ejections and returns, once a second, while the agent runs. The maps
/// are read on a blocking thread: at 10,000 services that is 100,000 look-ups, which on the
/// runtime's one worker would hold up the API and every catalog change behind them.
pub async fn watch(learned: KernelLearned) {
    let learned = std::sync::Arc::new(learned);
    let mut seen: HashMap<(SocketAddr, SocketAddr), (u64, bool)> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let reader = learned.clone();
        let Ok(read) = tokio::task::spawn_blocking(move || reader.read()).await else {
            continue;
        };
        let now = kernel_now_ns();
        for l in read {
            let key = (l.service, l.backend);
            let out = l.stats.ejected_until_ns > now;
            let (ejections, was_out) = seen.get(&key).copied().unwrap_or((l.stats.ejections, out));
            if l.stats.ejections > ejections {
                warn!(
                    service = %l.service,
                    backend = %l.backend,
                    seconds = ejected_for(&l.stats, now).unwrap_or(0.0).round() as u64,
                    times = l.stats.ejections,
                    "the kernel ejected the backend after consecutive failed connects"
                );
            } else if was_out && !out {
                info!(service = %l.service, backend = %l.backend, "kernel ejection over: backend returns");
            }
            seen.insert(key, (l.stats.ejections, out));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_reduce_and_fit_a_byte() {
        assert_eq!(kernel_weights(&[2, 6]), vec![1, 3]);
        assert_eq!(kernel_weights(&[1, 256]), vec![1, 255]);
        assert_eq!(kernel_weights(&[0, 3]), vec![1, 1]);
    }

    #[test]
    fn generations_never_repeat() {
        let a = next_generation(5);
        let b = next_generation(5);
        assert!(b > a);
    }

    #[test]
    fn the_kernel_decays_on_the_forwarders_clock() {
        assert_eq!(
            switchyard_common::maps::EWMA_DECAY_NS,
            defaults::EWMA_DECAY.as_nanos() as u64
        );
    }
}
