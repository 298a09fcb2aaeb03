//! A backend's connect latency and connection duration, as histograms (proxy mode): kept with
//! its counters on the board, exported by the metrics.

use std::time::{Duration, Instant};

use prometheus_client::metrics::histogram::Histogram;

/// Connect latency: from well under a millisecond (a backend on the node's bridge) to the
/// longest connect timeout anyone sets.
const CONNECT_BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];
/// Connection duration: a request-response exchange to a connection held for hours.
const DURATION_BUCKETS: [f64; 14] = [
    0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0,
];

/// A backend's connect latency and connection duration histograms (proxy mode).
#[derive(Debug)]
pub struct Timings {
    /// Connect latency, seconds.
    pub connect: Histogram,
    /// Connection duration, seconds.
    pub duration: Histogram,
}

impl Default for Timings {
    fn default() -> Self {
        Timings {
            connect: Histogram::new(CONNECT_BUCKETS),
            duration: Histogram::new(DURATION_BUCKETS),
        }
    }
}

impl Timings {
    /// A connect to the backend succeeded after `latency`.
    pub fn connected(&self, latency: Duration) {
        self.connect.observe(latency.as_secs_f64());
    }

    /// A connection opened at `since` ended.
    pub fn closed(&self, since: Instant) {
        self.duration.observe(since.elapsed().as_secs_f64());
    }
}
