//! Every decision about which backend gets a connection, in either mode.
//!
//! Proxy mode: a [`Balancer`] is built per service from its backend list (hash tables are built
//! once, over every backend with a weight, so a drained or failed backend does not remap anyone
//! else's clients) and asked per connection attempt, over the [`candidates`] that health,
//! panic mode and the retry budget allow. State that must be shared by every client of the node
//! (active connections, latency, ejection) lives in the candidates, not here.
//!
//! Kernel mode: [`slots`] lays out the slot array the programs pick from.

pub mod candidates;
mod hash;
pub mod slots;
mod weighted;

use std::sync::Mutex;

use crate::catalog::Algorithm;

pub use candidates::{Upstream, UpstreamCandidate};
pub use hash::{Maglev, Ring, key_hash, ring_points};
pub use weighted::{fit_weights, smooth_weighted_order};

/// What a balancer sees of one backend.
pub trait Candidate {
    /// Effective weight (slow start applied); 0 takes nothing.
    fn weight(&self) -> u32;
    /// May take this attempt: ready, not tried yet, not ejected, not down.
    fn usable(&self) -> bool;
    /// Open connections, node-wide.
    fn active(&self) -> u64;
    /// Peak-EWMA connect latency, in nanoseconds.
    fn latency(&self) -> f64;
    /// Stable identity for consistent hashing.
    fn key(&self) -> u64;
}

pub enum Balancer {
    Random,
    WeightedRandom,
    /// Smooth weighted round robin (nginx's): even spacing, exact proportions.
    RoundRobin(Mutex<Vec<i64>>),
    /// Power of two choices on active connections per weight.
    LeastConnections,
    /// Power of two choices on latency × (active + 1) per weight.
    PeakEwma,
    Maglev(Maglev),
    Ring(Ring),
}

impl Balancer {
    /// A balancer for `algorithm` over `candidates` (hash tables are built here).
    pub fn new<C: Candidate>(algorithm: Algorithm, candidates: &[C]) -> Self {
        match algorithm {
            Algorithm::Random => Balancer::Random,
            Algorithm::WeightedRandom => Balancer::WeightedRandom,
            Algorithm::RoundRobin => Balancer::RoundRobin(Mutex::new(Vec::new())),
            Algorithm::LeastConnections => Balancer::LeastConnections,
            Algorithm::PeakEwma => Balancer::PeakEwma,
            Algorithm::Maglev => Balancer::Maglev(Maglev::build(candidates)),
            Algorithm::RingHash => Balancer::Ring(Ring::build(candidates)),
        }
    }

    /// Index of the chosen candidate, or `None` when none is usable. `client` is the hash of
    /// the client for the consistent-hash algorithms.
    pub fn pick<C: Candidate>(&self, candidates: &[C], client: u64) -> Option<usize> {
        match self {
            Balancer::Random => nth_usable(candidates, |n| fastrand::usize(..n)),
            Balancer::WeightedRandom => weighted_random(candidates),
            Balancer::RoundRobin(current) => {
                let mut current = current.lock().unwrap_or_else(|e| e.into_inner());
                weighted::next(&mut current, candidates)
            }
            // Ties on connection count (frequent at low load) go to the faster backend.
            Balancer::LeastConnections => p2c(candidates, |c| {
                (
                    (c.active() + 1) as f64 / c.weight().max(1) as f64,
                    c.latency(),
                )
            }),
            Balancer::PeakEwma => p2c(candidates, |c| {
                (
                    c.latency() * (c.active() + 1) as f64 / c.weight().max(1) as f64,
                    0.0,
                )
            }),
            Balancer::Maglev(m) => m.pick(candidates, client),
            Balancer::Ring(r) => r.pick(candidates, client),
        }
    }
}

fn nth_usable<C: Candidate>(
    candidates: &[C],
    choose: impl FnOnce(usize) -> usize,
) -> Option<usize> {
    let usable = candidates.iter().filter(|c| c.usable()).count();
    if usable == 0 {
        return None;
    }
    let n = choose(usable);
    candidates
        .iter()
        .enumerate()
        .filter(|(_, c)| c.usable())
        .nth(n)
        .map(|(i, _)| i)
}

fn weighted_random<C: Candidate>(candidates: &[C]) -> Option<usize> {
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

/// Two distinct usable candidates at random; the cheaper wins. Cheap, and avoids the herd
/// behaviour of always picking the global minimum from stale counts.
fn p2c<C: Candidate>(candidates: &[C], cost: impl Fn(&C) -> (f64, f64)) -> Option<usize> {
    let usable: Vec<usize> = (0..candidates.len())
        .filter(|&i| candidates[i].usable() && candidates[i].weight() > 0)
        .collect();
    match usable.len() {
        0 => None,
        1 => Some(usable[0]),
        n => {
            let a = fastrand::usize(..n);
            let b = (a + 1 + fastrand::usize(..n - 1)) % n;
            let (a, b) = (usable[a], usable[b]);
            let (ca, cb) = (cost(&candidates[a]), cost(&candidates[b]));
            Some(if cb.partial_cmp(&ca) == Some(std::cmp::Ordering::Less) {
                b
            } else {
                a
            })
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub struct C {
        pub weight: u32,
        pub usable: bool,
        pub active: u64,
        pub latency: f64,
        pub key: u64,
    }

    pub fn c(weight: u32, usable: bool) -> C {
        C {
            weight,
            usable,
            active: 0,
            latency: 1.0,
            key: weight as u64 * 7919 + usable as u64,
        }
    }

    impl Candidate for C {
        fn weight(&self) -> u32 {
            self.weight
        }
        fn usable(&self) -> bool {
            self.usable
        }
        fn active(&self) -> u64 {
            self.active
        }
        fn latency(&self) -> f64 {
            self.latency
        }
        fn key(&self) -> u64 {
            self.key
        }
    }

    #[test]
    fn round_robin_is_exact_and_weighted() {
        let cs = [c(1, true), c(3, true), c(1, false)];
        let b = Balancer::new(Algorithm::RoundRobin, &cs);
        let mut counts = [0; 3];
        for _ in 0..400 {
            counts[b.pick(&cs, 0).unwrap()] += 1;
        }
        assert_eq!(counts, [100, 300, 0]);
    }

    #[test]
    fn nothing_usable_picks_nothing() {
        let cs = [c(1, false)];
        for a in [
            Algorithm::Random,
            Algorithm::WeightedRandom,
            Algorithm::RoundRobin,
            Algorithm::LeastConnections,
            Algorithm::PeakEwma,
            Algorithm::Maglev,
            Algorithm::RingHash,
        ] {
            assert_eq!(Balancer::new(a, &cs).pick(&cs, 42), None, "{a:?}");
        }
    }

    #[test]
    fn weighted_random_follows_weights() {
        let cs = [c(1, true), c(3, true)];
        let b = Balancer::new(Algorithm::WeightedRandom, &cs);
        let heavy = (0..4000).filter(|_| b.pick(&cs, 0) == Some(1)).count();
        assert!((2700..3300).contains(&heavy), "{heavy}");
    }

    #[test]
    fn least_connections_avoids_the_busy_backend() {
        let mut cs = [c(1, true), c(1, true), c(1, true)];
        cs[1].active = 100;
        let b = Balancer::new(Algorithm::LeastConnections, &cs);
        let busy = (0..3000).filter(|_| b.pick(&cs, 0) == Some(1)).count();
        // P2C only picks the busy one when both draws hit it: never, as draws are distinct.
        assert_eq!(busy, 0);
    }

    #[test]
    fn peak_ewma_avoids_the_slow_backend() {
        let mut cs = [c(1, true), c(1, true)];
        cs[0].latency = 50e6;
        cs[1].latency = 1e6;
        let b = Balancer::new(Algorithm::PeakEwma, &cs);
        assert!((0..100).all(|_| b.pick(&cs, 0) == Some(1)));
    }
}
