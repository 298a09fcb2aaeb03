//! How the forwarder stops: it stops accepting (the listeners go to a successor, or the kernel
//! fallback takes new connections), copies the connections it has until they end or the drain
//! deadline, then closes what is left with a reset and counts it.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use tokio::sync::watch;

/// Shared by every worker thread (tokio's watch channels work across runtimes).
pub struct Exit {
    /// `true` once the forwarder must stop accepting.
    stop: watch::Sender<bool>,
    /// `true` once the drain deadline has passed.
    cut: watch::Sender<bool>,
    open: AtomicU64,
    cut_count: AtomicU64,
}

impl Default for Exit {
    fn default() -> Self {
        Exit {
            stop: watch::Sender::new(false),
            cut: watch::Sender::new(false),
            open: AtomicU64::new(0),
            cut_count: AtomicU64::new(0),
        }
    }
}

/// What a drain came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// Connections open when the drain began.
    pub open_at_start: u64,
    /// Connections still open at the deadline, closed with a reset.
    pub cut: u64,
}

/// Counts one connection as open while it lives.
pub struct Open<'a>(&'a Exit);

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Exit {
    pub fn stop_accepting(&self) {
        self.stop.send_replace(true);
    }

    /// Closes every connection now, as the deadline would.
    pub fn cut_now(&self) {
        self.cut.send_replace(true);
    }

    /// Resolves once the forwarder must stop accepting.
    pub async fn stopped(&self) {
        let mut rx = self.stop.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    pub fn open(&self) -> Open<'_> {
        self.open.fetch_add(1, Ordering::Relaxed);
        Open(self)
    }

    pub fn open_now(&self) -> u64 {
        self.open.load(Ordering::Relaxed)
    }

    /// The cut, for each thread's sweep (see [`super::conns`]): `true` once the drain
    /// deadline has passed.
    pub fn cut_signal(&self) -> watch::Receiver<bool> {
        self.cut.subscribe()
    }

    /// `n` connections were closed with a reset at the cut.
    pub fn count_cut(&self, n: u64) {
        self.cut_count.fetch_add(n, Ordering::Relaxed);
    }

    /// Waits until every connection has ended or `deadline` has passed, then cuts the rest.
    pub async fn drain(&self, deadline: Duration) -> Drained {
        let open_at_start = self.open_now();
        let until = tokio::time::Instant::now() + deadline;
        while self.open_now() > 0 && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if self.open_now() > 0 {
            self.cut.send_replace(true);
            // Each connection's task notices on its own thread: give them a moment.
            let grace = tokio::time::Instant::now() + Duration::from_secs(1);
            while self.open_now() > 0 && tokio::time::Instant::now() < grace {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        Drained {
            open_at_start,
            cut: self.cut_count.load(Ordering::Relaxed),
        }
    }
}
