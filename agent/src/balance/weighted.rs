//! Smooth weighted round robin: each turn every candidate gains its weight, the richest is
//! chosen and pays the total. Gives exact proportions with the picks spread out (a weight-3
//! backend is not hit three times in a row).

use super::Candidate;

pub(super) fn next<C: Candidate>(current: &mut Vec<i64>, candidates: &[C]) -> Option<usize> {
    if current.len() != candidates.len() {
        current.clear();
        current.resize(candidates.len(), 0);
    }
    let mut total = 0i64;
    let mut best: Option<usize> = None;
    for (i, c) in candidates.iter().enumerate() {
        if !c.usable() {
            continue;
        }
        let w = c.weight() as i64;
        current[i] += w;
        total += w;
        if best.is_none_or(|b| current[i] > current[b]) {
            best = Some(i);
        }
    }
    let b = best?;
    current[b] -= total;
    Some(b)
}

/// The order in which smooth weighted round robin visits items of these weights over one full
/// cycle (sum of weights long). The kernel's round-robin slots are laid out in this order; fit
/// the weights to the slots first ([`fit_weights`]).
///
/// Smooth weighted round robin costs the number of items per step; when a cycle would cost more
/// than `SWRR_MAX_WORK` steps × items, the cycle is laid out by stride instead (each item's
/// k-th visit at virtual time (k + ½) / weight, in that order): the same exact proportions, spread
/// a little less evenly, at a logarithmic cost per step.
pub fn smooth_weighted_order(weights: &[u32]) -> Vec<usize> {
    order(weights).0
}

/// Steps × items beyond which a cycle is laid out by stride (about 10 ms of work).
const SWRR_MAX_WORK: u64 = 1 << 24;

/// The order and the work it took (items looked at), so that tests can bound it.
fn order(weights: &[u32]) -> (Vec<usize>, u64) {
    let total: u64 = weights.iter().map(|&w| w as u64).sum();
    let n = weights.len() as u64;
    if total.saturating_mul(n) <= SWRR_MAX_WORK {
        let items: Vec<W> = weights.iter().map(|&w| W(w)).collect();
        let mut current = Vec::new();
        let order = (0..total)
            .filter_map(|_| next(&mut current, &items))
            .collect();
        return (order, total * n);
    }
    stride_order(weights, total)
}

fn stride_order(weights: &[u32], total: u64) -> (Vec<usize>, u64) {
    use std::{cmp::Reverse, collections::BinaryHeap};
    /// Item `i`'s visit at virtual time `(2k + 1) / (2 w)`, ordered by that time, then by `i`.
    #[derive(PartialEq, Eq)]
    struct Visit {
        k: u64,
        w: u64,
        i: usize,
    }
    impl Ord for Visit {
        fn cmp(&self, o: &Self) -> std::cmp::Ordering {
            let a = (2 * self.k + 1) as u128 * o.w as u128;
            let b = (2 * o.k + 1) as u128 * self.w as u128;
            a.cmp(&b).then(self.i.cmp(&o.i))
        }
    }
    impl PartialOrd for Visit {
        fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
            Some(self.cmp(o))
        }
    }
    let mut heap: BinaryHeap<Reverse<Visit>> = weights
        .iter()
        .enumerate()
        .filter(|&(_, &w)| w > 0)
        .map(|(i, &w)| {
            Reverse(Visit {
                k: 0,
                w: w as u64,
                i,
            })
        })
        .collect();
    let depth = (usize::BITS - heap.len().leading_zeros()) as u64 + 1;
    let mut out = Vec::with_capacity(total as usize);
    while let Some(Reverse(v)) = heap.pop() {
        out.push(v.i);
        if v.k + 1 < v.w {
            heap.push(Reverse(Visit { k: v.k + 1, ..v }));
        }
    }
    (out, total * depth)
}

/// `weights` scaled down to sum to at most `max` (a slot array's size), every item with a weight
/// keeping at least one: so that no backend is left out of the slots, where taking the first
/// `max` slots would silently drop the last backends. `None`: more items with a weight than
/// `max`, which cannot fit.
pub fn fit_weights(weights: &[u32], max: u64) -> Option<Vec<u32>> {
    let total: u64 = weights.iter().map(|&w| w as u64).sum();
    if total <= max {
        return Some(weights.to_vec());
    }
    let n = weights.iter().filter(|&&w| w > 0).count() as u64;
    if n > max {
        return None;
    }
    // Σ max(1, ⌊w (max − n) / total⌋) ≤ n + (max − n).
    Some(
        weights
            .iter()
            .map(|&w| match w as u64 {
                0 => 0,
                w => (w * (max - n) / total).max(1) as u32,
            })
            .collect(),
    )
}

struct W(u32);

impl Candidate for W {
    fn weight(&self) -> u32 {
        self.0
    }
    fn usable(&self) -> bool {
        self.0 > 0
    }
    fn active(&self) -> u64 {
        0
    }
    fn latency(&self) -> f64 {
        0.0
    }
    fn key(&self) -> u64 {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spreads_heavy_backends_out() {
        assert_eq!(smooth_weighted_order(&[5, 1, 1]), vec![0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn a_thousand_heavy_backends_cost_a_bounded_cycle() {
        // Σ weights × items was 256 million steps on the control thread.
        let weights = vec![crate::defaults::MAX_WEIGHT; 1000];
        let (order, work) = order(&weights);
        assert_eq!(order.len(), 256_000);
        assert!(work <= 256_000 * 12, "{work}");
        let mut counts = vec![0; 1000];
        for &i in &order {
            counts[i] += 1;
        }
        assert!(counts.iter().all(|&c| c == 256));
        // Uneven weights keep exact proportions by stride too.
        let (order, _) = stride_order(&[3, 1], 4);
        assert_eq!(order, [0, 0, 1, 0]);
    }

    #[test]
    fn weights_fit_the_slots_and_nobody_is_left_out() {
        assert_eq!(fit_weights(&[2, 6], 100), Some(vec![2, 6]));
        let weights: Vec<u32> = (0..1000).map(|i| if i == 999 { 1 } else { 256 }).collect();
        let fitted = fit_weights(&weights, 65_536).unwrap();
        assert!(fitted.iter().map(|&w| w as u64).sum::<u64>() <= 65_536);
        assert!(fitted.iter().all(|&w| w >= 1));
        assert!(fitted[0] > fitted[999]);
        assert_eq!(fit_weights(&[1, 1, 1], 2), None);
        assert_eq!(fit_weights(&[0, 5, 0], 1), Some(vec![0, 1, 0]));
    }
}
