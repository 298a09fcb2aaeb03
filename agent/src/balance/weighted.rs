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
/// cycle (sum of weights long). The kernel's round-robin slots are laid out in this order.
pub fn smooth_weighted_order(weights: &[u32]) -> Vec<usize> {
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
    let items: Vec<W> = weights.iter().map(|&w| W(w)).collect();
    let total: u64 = weights.iter().map(|&w| w as u64).sum();
    let mut current = Vec::new();
    (0..total)
        .filter_map(|_| next(&mut current, &items))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spreads_heavy_backends_out() {
        assert_eq!(smooth_weighted_order(&[5, 1, 1]), vec![0, 0, 1, 0, 2, 0, 0]);
    }
}
