//! Choosing a backend in the forwarder. State (positions, active connections) is shared by all
//! connections of the node, not per client.

mod weighted;

use std::sync::{
    Mutex,
    atomic::{AtomicUsize, Ordering},
};

use crate::catalog::Algorithm;

pub use weighted::smooth_weighted_order;

/// What a balancer sees of one backend.
pub trait Candidate {
    fn weight(&self) -> u32;
    /// Ready, and not excluded for this attempt (already tried, ejected).
    fn usable(&self) -> bool;
}

pub enum Balancer {
    Random,
    WeightedRandom,
    /// Smooth weighted round robin (nginx's): even spacing, exact proportions.
    RoundRobin(Mutex<Vec<i64>>),
    /// Until the forwarder has its own table, a client-hashed service uses round robin.
    Hash(AtomicUsize),
}

impl Balancer {
    pub fn new(algorithm: Algorithm) -> Self {
        match algorithm {
            Algorithm::Random => Balancer::Random,
            Algorithm::WeightedRandom => Balancer::WeightedRandom,
            Algorithm::RoundRobin => Balancer::RoundRobin(Mutex::new(Vec::new())),
            Algorithm::Maglev => Balancer::Hash(AtomicUsize::new(0)),
        }
    }

    /// Index of the chosen candidate, or `None` when none is usable.
    pub fn pick<C: Candidate>(&self, candidates: &[C]) -> Option<usize> {
        let usable = candidates.iter().filter(|c| c.usable()).count();
        if usable == 0 {
            return None;
        }
        match self {
            Balancer::Random => {
                let n = fastrand::usize(..usable);
                candidates
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| c.usable())
                    .nth(n)
                    .map(|(i, _)| i)
            }
            Balancer::WeightedRandom => {
                let total: u64 = candidates
                    .iter()
                    .filter(|c| c.usable())
                    .map(|c| c.weight() as u64)
                    .sum();
                if total == 0 {
                    return None;
                }
                let mut point = fastrand::u64(..total);
                for (i, c) in candidates.iter().enumerate().filter(|(_, c)| c.usable()) {
                    let w = c.weight() as u64;
                    if point < w {
                        return Some(i);
                    }
                    point -= w;
                }
                None
            }
            Balancer::RoundRobin(current) => {
                let mut current = current.lock().unwrap_or_else(|e| e.into_inner());
                weighted::next(&mut current, candidates)
            }
            Balancer::Hash(position) => {
                let n = position.fetch_add(1, Ordering::Relaxed) % usable;
                candidates
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| c.usable())
                    .nth(n)
                    .map(|(i, _)| i)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct C(u32, bool);
    impl Candidate for C {
        fn weight(&self) -> u32 {
            self.0
        }
        fn usable(&self) -> bool {
            self.1
        }
    }

    #[test]
    fn round_robin_is_exact_and_weighted() {
        let b = Balancer::new(Algorithm::RoundRobin);
        let cs = [C(1, true), C(3, true), C(1, false)];
        let mut counts = [0; 3];
        for _ in 0..400 {
            counts[b.pick(&cs).unwrap()] += 1;
        }
        assert_eq!(counts, [100, 300, 0]);
    }

    #[test]
    fn nothing_usable_picks_nothing() {
        for a in [
            Algorithm::Random,
            Algorithm::WeightedRandom,
            Algorithm::RoundRobin,
        ] {
            assert_eq!(Balancer::new(a).pick(&[C(1, false)]), None);
        }
    }

    #[test]
    fn weighted_random_follows_weights() {
        let b = Balancer::new(Algorithm::WeightedRandom);
        let cs = [C(1, true), C(3, true)];
        let heavy = (0..4000).filter(|_| b.pick(&cs) == Some(1)).count();
        assert!((2700..3300).contains(&heavy), "{heavy}");
    }
}
