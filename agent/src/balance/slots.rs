//! Balancing in the kernel: the slot array a service's `connect()` picks from, and the
//! algorithm the programs apply to it. The reconciler writes what these decide.

use switchyard_common::{
    maglev,
    maps::{self as kmaps, BackendId, MAGLEV_KERNEL_SIZE, MAX_SLOTS_PER_SERVICE},
};

use super::{candidates::backend_key, fit_weights, smooth_weighted_order};
use crate::catalog::{Algorithm, BackendState, Mode, Service};

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// The slot array the kernel picks from: usable backends only, expanded by weight for the
/// weighted algorithms, or a Maglev table. `ids[i]` is the kernel's id of `service.backends[i]`.
pub fn slot_layout(service: &Service, ids: &[BackendId]) -> Vec<BackendId> {
    let usable: Vec<(usize, u32)> = service
        .backends
        .iter()
        .enumerate()
        .filter(|(_, b)| b.state == BackendState::Ready && b.weight > 0)
        .map(|(i, b)| (i, b.weight))
        .collect();
    if usable.is_empty() {
        return Vec::new();
    }
    let divisor = usable.iter().fold(0, |g, &(_, w)| gcd(g, w)).max(1);
    let weights: Vec<u32> = usable.iter().map(|&(_, w)| w / divisor).collect();
    // Expanded by weight, the slots must fit the service's share of the map: the weights are
    // scaled down to fit, every backend keeping at least one slot (cutting the array at the
    // limit instead dropped the last backends without a word). Validation keeps the usable
    // backends within the limit, so the fallback of one slot each never truncates.
    let max = MAX_SLOTS_PER_SERVICE as usize;
    let expanded = || fit_weights(&weights, max as u64).unwrap_or_else(|| vec![1; weights.len()]);
    match service.algorithm {
        // The kernel's load-aware picks compare two distinct backends by their counts per
        // weight: one slot each.
        Algorithm::Random => usable.iter().map(|&(i, _)| ids[i]).take(max).collect(),
        Algorithm::LeastConnections | Algorithm::PeakEwma if service.mode == Mode::Kernel => {
            usable.iter().map(|&(i, _)| ids[i]).take(max).collect()
        }
        Algorithm::WeightedRandom => usable
            .iter()
            .zip(&expanded())
            .flat_map(|(&(i, _), &w)| std::iter::repeat_n(ids[i], w as usize))
            .take(max)
            .collect(),
        // A proxy-mode service's load-aware algorithms use the slots only while no forwarder
        // listens (the kernel fallback): in turn, weights honoured.
        Algorithm::RoundRobin | Algorithm::LeastConnections | Algorithm::PeakEwma => {
            smooth_weighted_order(&expanded())
                .into_iter()
                .map(|k| ids[usable[k].0])
                .take(max)
                .collect()
        }
        Algorithm::Maglev | Algorithm::RingHash => {
            let keys: Vec<u64> = usable
                .iter()
                .map(|&(i, _)| backend_key(service.backends[i].addr))
                .collect();
            let mut table = vec![0u32; MAGLEV_KERNEL_SIZE as usize];
            let mut next = vec![0u64; keys.len()];
            if !maglev::populate(&mut table, &keys, &weights, &mut next) {
                return Vec::new();
            }
            table
                .into_iter()
                .map(|k| ids[usable[k as usize].0])
                .collect()
        }
    }
}

/// How the programs pick among the slots for `algorithm`.
pub fn kernel_algorithm(algorithm: Algorithm, mode: Mode) -> u8 {
    match (algorithm, mode) {
        (Algorithm::Random | Algorithm::WeightedRandom, _) => kmaps::algorithm::RANDOM,
        (Algorithm::RoundRobin, _) => kmaps::algorithm::ROUND_ROBIN,
        (Algorithm::Maglev | Algorithm::RingHash, _) => kmaps::algorithm::MAGLEV,
        // On the programs' own counts (see `docs/kernel-learning.md`).
        (Algorithm::LeastConnections, Mode::Kernel) => kmaps::algorithm::LEAST_CONNECTIONS,
        (Algorithm::PeakEwma, Mode::Kernel) => kmaps::algorithm::PEAK_EWMA,
        // Proxy mode: the kernel picks only while no forwarder listens (the fallback), and
        // then goes round the weighted order.
        (Algorithm::LeastConnections | Algorithm::PeakEwma, Mode::Proxy) => {
            kmaps::algorithm::ROUND_ROBIN
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_helpers::{self, backend};
    use std::net::SocketAddr;

    use crate::catalog::Backend;

    fn service(algorithm: Algorithm, weights: &[(u32, BackendState)]) -> Service {
        Service {
            algorithm,
            backends: weights
                .iter()
                .enumerate()
                .map(|(i, &(weight, state))| {
                    backend(&format!("10.0.0.{}:80", i + 1), weight, state)
                })
                .collect(),
            ..test_helpers::service("s", "10.96.0.1:80", &[])
        }
    }

    #[test]
    fn slots_hold_only_usable_backends() {
        use BackendState::*;
        let s = service(
            Algorithm::RoundRobin,
            &[(1, Ready), (1, Drain), (1, Maint), (0, Ready)],
        );
        assert_eq!(slot_layout(&s, &[10, 11, 12, 13]), vec![10]);
        let s = service(Algorithm::RoundRobin, &[(1, Drain)]);
        assert!(slot_layout(&s, &[10]).is_empty());
    }

    #[test]
    fn weights_expand_reduced() {
        use BackendState::*;
        let s = service(Algorithm::WeightedRandom, &[(2, Ready), (6, Ready)]);
        let slots = slot_layout(&s, &[1, 2]);
        assert_eq!(slots.len(), 4);
        assert_eq!(slots.iter().filter(|&&b| b == 2).count(), 3);
        let s = service(Algorithm::Random, &[(2, Ready), (6, Ready)]);
        assert_eq!(slot_layout(&s, &[1, 2]), vec![1, 2]);
    }

    #[test]
    fn proxy_only_algorithms_fall_back_to_weighted_round_robin() {
        use BackendState::*;
        for a in [Algorithm::LeastConnections, Algorithm::PeakEwma] {
            let mut s = service(a, &[(1, Ready), (3, Ready), (1, Maint)]);
            s.mode = Mode::Proxy;
            let slots = slot_layout(&s, &[1, 2, 3]);
            assert_eq!(slots.len(), 4, "{a:?}");
            assert_eq!(slots.iter().filter(|&&b| b == 2).count(), 3, "{a:?}");
            assert_eq!(
                kernel_algorithm(a, Mode::Proxy),
                kmaps::algorithm::ROUND_ROBIN
            );
            // In kernel mode the programs compare two backends by their counts: one slot each.
            s.mode = Mode::Kernel;
            assert_eq!(slot_layout(&s, &[1, 2, 3]), vec![1, 2], "{a:?}");
        }
    }

    #[test]
    fn a_thousand_heavy_backends_all_get_slots_within_the_limit() {
        // 999 backends of weight 256 and one of weight 1: 255,745 slots reduced, four times the
        // limit; the last three quarters of the backends used to get none.
        let mut s = service(Algorithm::WeightedRandom, &[]);
        s.backends = (0..1000u32)
            .map(|i| Backend {
                addr: SocketAddr::new([10, 1, (i / 250) as u8, (i % 250) as u8 + 1].into(), 80),
                weight: if i == 999 {
                    1
                } else {
                    crate::defaults::MAX_WEIGHT
                },
                state: BackendState::Ready,
            })
            .collect();
        let ids: Vec<BackendId> = (0..1000).collect();
        for algorithm in [Algorithm::WeightedRandom, Algorithm::RoundRobin] {
            s.algorithm = algorithm;
            let slots = slot_layout(&s, &ids);
            assert!(
                slots.len() <= MAX_SLOTS_PER_SERVICE as usize,
                "{algorithm:?}"
            );
            let mut counts = vec![0usize; 1000];
            for &b in &slots {
                counts[b as usize] += 1;
            }
            assert!(
                counts.iter().all(|&c| c >= 1),
                "{algorithm:?}: a backend has no slot"
            );
            assert!(
                counts[0] > counts[999],
                "{algorithm:?}: weights still count"
            );
        }
    }

    #[test]
    fn maglev_fills_the_kernel_table() {
        use BackendState::*;
        let s = service(Algorithm::Maglev, &[(1, Ready), (1, Ready), (1, Ready)]);
        let slots = slot_layout(&s, &[7, 8, 9]);
        assert_eq!(slots.len(), MAGLEV_KERNEL_SIZE as usize);
        assert!(slots.iter().all(|b| [7, 8, 9].contains(b)));
    }
}
