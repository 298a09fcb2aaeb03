//! Backoff between a network source's attempts: doubled on each failure, with jitter so that
//! many nodes losing one server do not come back at it in step.

use std::time::Duration;

use crate::defaults::{SOURCE_RETRY_MAX, SOURCE_RETRY_MIN};

pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            next: SOURCE_RETRY_MIN,
        }
    }
}

impl Backoff {
    /// The wait before the next attempt: between half and all of the current step.
    pub fn next(&mut self) -> Duration {
        let step = self.next;
        self.next = (step * 2).min(SOURCE_RETRY_MAX);
        step.mul_f64(0.5 + fastrand::f64() / 2.0)
    }

    /// After a success: the next failure is retried quickly again.
    pub fn reset(&mut self) {
        self.next = SOURCE_RETRY_MIN;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_and_resets() {
        let mut b = Backoff::default();
        let waits: Vec<Duration> = (0..12).map(|_| b.next()).collect();
        assert!(waits[0] <= SOURCE_RETRY_MIN);
        assert!(waits.iter().all(|w| *w <= SOURCE_RETRY_MAX));
        assert!(waits[11] >= SOURCE_RETRY_MAX / 2);
        b.reset();
        assert!(b.next() <= SOURCE_RETRY_MIN);
    }
}
