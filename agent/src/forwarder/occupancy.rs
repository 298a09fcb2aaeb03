//! A connection's hold on its backend, as a guard: the backend's and the service's active
//! counts go up when the connection takes the backend and come down when the guard drops,
//! however the connection ends (closed, aborted, retried on another backend, or its task
//! cancelled). Once the backend keeps the connection ([`Occupancy::open`]), the drop also
//! counts it closed, with its bytes and its duration.

use std::{sync::atomic::Ordering, time::Instant};

use super::{copy::Moved, table::ServiceShared};
use crate::health::BackendHealth;

pub struct Occupancy<'a> {
    backend: &'a BackendHealth,
    service: &'a ServiceShared,
    /// When the backend kept the connection (the copy began).
    opened: Option<Instant>,
    /// The bytes the copy moves, counted on the backend at the end.
    pub moved: Moved,
}

impl<'a> Occupancy<'a> {
    /// Counts the connection on its backend and service at once: balancing must see it from
    /// the connect on, not only after the backend's first byte (a slow backend would look idle).
    pub fn take(backend: &'a BackendHealth, service: &'a ServiceShared) -> Self {
        backend.counters.active.fetch_add(1, Ordering::Relaxed);
        service.active.fetch_add(1, Ordering::Relaxed);
        Occupancy {
            backend,
            service,
            opened: None,
            moved: Moved::default(),
        }
    }

    /// The backend keeps the connection: it counts as opened, and its end as closed.
    pub fn open(&mut self) {
        self.backend.counters.opened.fetch_add(1, Ordering::Relaxed);
        self.opened = Some(Instant::now());
    }
}

impl Drop for Occupancy<'_> {
    fn drop(&mut self) {
        let counters = &self.backend.counters;
        if let Some(since) = self.opened {
            let moved = &self.moved;
            let n = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
            counters
                .bytes_out
                .fetch_add(n(&moved.to_backend), Ordering::Relaxed);
            counters
                .bytes_in
                .fetch_add(n(&moved.to_client), Ordering::Relaxed);
            counters.closed.fetch_add(1, Ordering::Relaxed);
            counters.timings.closed(since);
        }
        counters.active.fetch_sub(1, Ordering::Relaxed);
        self.service.active.fetch_sub(1, Ordering::Relaxed);
    }
}
