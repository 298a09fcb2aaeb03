//! What a listener does when `accept` fails: shared by the forwarder's listeners, the API's
//! socket and the metrics endpoint.

use std::io;

/// Failed `accept`s (out of descriptors and the like) come in runs while the cause lasts, one
/// every back-off. The first of a run is logged, the rest are counted and summed up at most
/// every [`SUMMARY`], and the end of the run is logged: a log line per failure would be
/// twenty a second per listener.
#[derive(Debug, Default)]
pub struct AcceptFailures {
    run: Option<Run>,
}

#[derive(Debug)]
struct Run {
    count: u64,
    logged: std::time::Instant,
}

const SUMMARY: std::time::Duration = std::time::Duration::from_secs(10);

impl AcceptFailures {
    pub fn failed(&mut self, what: &str, e: &io::Error) {
        match &mut self.run {
            None => {
                tracing::warn!("{what}: accept failed: {e}; retrying every 50 ms");
                self.run = Some(Run {
                    count: 1,
                    logged: std::time::Instant::now(),
                });
            }
            Some(run) => {
                run.count += 1;
                if run.logged.elapsed() >= SUMMARY {
                    tracing::warn!("{what}: accept still failing ({} times): {e}", run.count);
                    run.logged = std::time::Instant::now();
                }
            }
        }
    }

    pub fn accepted(&mut self, what: &str) {
        if let Some(run) = self.run.take() {
            tracing::info!("{what}: accepting again after {} failures", run.count);
        }
    }
}
