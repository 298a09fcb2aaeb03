//! What the node knows of each backend's health, shared by every client: passive outlier
//! ejection from the forwarder's failures, active checks, peak-EWMA latency, slow start after a
//! return, and drain deadlines.
//!
//! [`Board`] holds one [`BackendHealth`] per (service, backend). The forwarder's table and the
//! checkers hold the same `Arc`s, so a verdict reached by one is seen by all at once; active
//! check verdicts also reach the kernel maps (see [`Board::down`]).

pub mod board;
pub mod check;
mod timings;

pub use board::{BackendHealth, Board, Counters, Verdict};
pub use timings::Timings;
