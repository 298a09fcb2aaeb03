//! What the node knows of each backend's health, shared by every client: passive outlier
//! ejection from the forwarder's failures, active checks, peak-EWMA latency, slow start after a
//! return, and drain deadlines.
//!
//! [`Board`] holds one [`BackendHealth`] per (service, backend). The forwarder's table and the
//! checkers hold the same `Arc`s, so a verdict reached by one is seen by all at once; active
//! check verdicts also reach the kernel maps (see [`Board::down`]).

pub mod board;
pub mod check;

pub use board::{BackendHealth, Board, Counters, Verdict};

/// Panic mode, one rule for both modes: with fewer than the panic threshold of a service's
/// admitted backends healthy, health (and, in the forwarder, ejection) is ignored and every
/// admitted backend takes connections, rather than the service refusing everyone.
pub fn panics(admitted: usize, healthy: usize) -> bool {
    admitted > 0 && healthy * 100 < admitted * crate::defaults::PANIC_THRESHOLD_PERCENT as usize
}

#[cfg(test)]
mod tests {
    #[test]
    fn panic_mode_below_half_healthy() {
        assert!(!super::panics(0, 0));
        assert!(super::panics(2, 0));
        assert!(!super::panics(2, 1));
        assert!(super::panics(3, 1));
        assert!(!super::panics(4, 2));
    }
}
